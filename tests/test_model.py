"""maskrt.model: shapes and formats, the fixed-shape inference path against torchvision-order
list references, transform rules against hand-computed values, weights I/O, presets."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskrt.errors import MaskrtError
from maskrt.model import build_model, load_model, read_metadata, save_model
from maskrt.model import ops
from maskrt.model.backbone import Bottleneck, FrozenBatchNorm2d, ResNet, group_norm_groups
from maskrt.model.matching import BalancedPositiveNegativeSampler, Matcher
from maskrt.model.transform import (batch_images, paste_masks_in_image, resize_boxes, resize_image, resized_size)

# A tiny edge-like model: every code path, a fraction of a second per forward on 2 cores.
TINY = dict(min_size=96, max_size=96, backbone_width=8, fpn_channels=16, representation_size=64, box_head_convs=[16],
            mask_layers=[16, 16], mask_dim_reduced=16, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=60,
            rpn_pre_nms_top_n_test=80, rpn_post_nms_top_n_test=40, box_batch_size_per_image=32,
            box_detections_per_img=12, box_score_thresh=0.5)


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("edge", 3, ["__background__", "disc", "square"], **{**TINY, **overrides})
    # Spread the class scores so that some, not all, of the 12 detection slots fill at
    # box_score_thresh 0.5 (an untrained head scores every class ~1/3).
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0.0, 0.5)
    return model


def two_shapes(size: int = 96, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An RGB image in [0, 1] with a disc (label 1) and a square (label 2), and its target."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (xx - size * 0.3) ** 2 + (yy - size * 0.35) ** 2 <= (size * 0.18) ** 2
    square = (xx >= size * 0.55) & (xx < size * 0.9) & (yy >= size * 0.5) & (yy < size * 0.85)
    image = 0.2 + 0.05 * torch.rand(3, size, size, generator=generator)
    image[0][disc] = 0.9
    image[2][square] = 0.85
    masks = torch.stack([disc, square]).to(torch.uint8)
    boxes = []
    for mask in masks:
        ys, xs = torch.where(mask > 0)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
    return image, {"boxes": torch.tensor(boxes), "labels": torch.tensor([1, 2]), "masks": masks}


# --- presets and parameter names -------------------------------------------------------------

def test_r50_fpn_matches_torchvision_layout_and_parameter_count():
    model = build_model("r50_fpn", 91)
    keys = set(model.state_dict())
    for key in ("backbone.body.conv1.weight", "backbone.body.bn1.running_var",
                "backbone.body.layer1.0.downsample.0.weight", "backbone.body.layer4.2.conv3.weight",
                "backbone.fpn.inner_blocks.0.0.weight", "backbone.fpn.layer_blocks.3.0.bias",
                "rpn.head.conv.0.0.weight", "rpn.head.cls_logits.weight", "rpn.head.bbox_pred.bias",
                "roi_heads.box_head.fc6.weight", "roi_heads.box_head.fc7.bias",
                "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.bbox_pred.weight",
                "roi_heads.mask_head.0.0.weight", "roi_heads.mask_head.3.0.weight",
                "roi_heads.mask_predictor.conv5_mask.weight",
                "roi_heads.mask_predictor.mask_fcn_logits.weight"):
        assert key in keys, key
    assert not any(k.endswith("num_batches_tracked") or "pixel_" in k or k.startswith("transform") for k in keys)
    # torchvision's maskrcnn_resnet50_fpn(num_classes=91): 44,401,393 parameters.
    assert sum(p.numel() for p in model.parameters()) == 44_401_393
    # trainable_backbone_layers=3: the stem and layer1 are frozen, layer2..4 train.
    assert not model.backbone.body.conv1.weight.requires_grad
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad
    assert model.roi_heads.box_head.fc6.in_features == 256 * 7 * 7
    assert model.rpn.head.cls_logits.out_channels == 3
    assert model.mask_size == 28 and model.detections_per_img == 100


def test_edge_box_head_is_convs_then_fc_and_pools_by_its_own_level_rule():
    model = build_model("edge", 4)
    head = model.roi_heads.box_head
    # torchvision's FastRCNNConvFCHead key layout: <i>.0 conv (no bias), <i>.1 norm, then the fc.
    keys = set(head.state_dict())
    assert {"0.0.weight", "0.1.weight", "1.0.weight", "1.1.bias", "3.weight", "3.bias"} <= keys
    assert "0.0.bias" not in keys
    torch.manual_seed(0)
    roi_features = torch.randn(5, 64, 7, 7)
    out = head(roi_features)
    assert out.shape == (5, 256) and bool((out >= 0).all())
    # The same computation written out: conv -> GroupNorm -> ReLU twice, flatten, fc, ReLU.
    x = roi_features
    for block in (head[0], head[1]):
        x = torch.relu(torch.nn.functional.group_norm(torch.nn.functional.conv2d(x, block[0].weight, padding=1),
                                                      block[1].num_groups, block[1].weight, block[1].bias))
    torch.testing.assert_close(out, torch.relu(head[3](x.flatten(1))))
    # Level rule: the edge poolers map a 70 px box to P3 (224 would give P2), a 112 px box to P4.
    pooler = model.roi_heads.box_roi_pool
    assert pooler.canonical_scale == 112.0 == model.roi_heads.mask_roi_pool.canonical_scale
    from maskrt.model.ops import fpn_level
    boxes = torch.tensor([[0.0, 0.0, 70.0, 70.0], [0.0, 0.0, 112.0, 112.0]])
    assert fpn_level(boxes, 2, 5, pooler.canonical_scale).tolist() == [3, 4]
    assert fpn_level(boxes, 2, 5, 224.0).tolist() == [2, 3]
    # r50_fpn keeps torchvision's two-fc head and 224.
    r50 = build_model("r50_fpn", 3)
    assert r50.roi_heads.box_roi_pool.canonical_scale == 224.0 and hasattr(r50.roi_heads.box_head, "fc6")


def test_build_model_rejects_unknown_preset_and_option():
    with pytest.raises(MaskrtError, match="unknown preset"):
        build_model("r101", 3)
    with pytest.raises(MaskrtError, match="unknown model option"):
        build_model("edge", 3, box_score_threshold=0.3)
    with pytest.raises(MaskrtError, match="class names"):
        build_model("edge", 3, ["__background__", "a"])
    with pytest.raises(MaskrtError, match="roi_op"):
        build_model("edge", 3, roi_op="warp")
    with pytest.raises(MaskrtError, match="mask_positives_per_image"):
        build_model("edge", 3, mask_positives_per_image=0)


# --- backbone pieces --------------------------------------------------------------------------

def test_frozen_batchnorm_equals_batchnorm_in_eval_and_drops_counter():
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        for tensor in (reference.weight, reference.bias, reference.running_mean):
            tensor.normal_()
        reference.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(reference.state_dict())  # includes num_batches_tracked
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(frozen(x), reference(x), rtol=1e-5, atol=1e-6)
    assert len(list(frozen.parameters())) == 0


def test_frozen_batchnorm_folded_into_the_conv_equals_conv_then_bn(monkeypatch):
    """The backbone folds each frozen BN into its conv (one pass over the activations): the
    block's output and the trainable conv's gradient equal conv -> BN, in float64."""
    from maskrt.model import backbone

    torch.manual_seed(0)
    block = Bottleneck(16, 8, 2, "frozen_bn").double()
    for module in block.modules():
        if isinstance(module, FrozenBatchNorm2d):
            for name in ("weight", "bias", "running_mean"):
                getattr(module, name).normal_()
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    results = []
    for fold in (True, False):
        monkeypatch.setattr(backbone, "FOLD_FROZEN_BN", fold)
        block.zero_grad()
        out = block(x)
        out.square().sum().backward()
        results.append((out.detach(), block.conv2.weight.grad.clone(), block.downsample[0].weight.grad.clone()))
    for folded, unfolded in zip(*results):
        torch.testing.assert_close(folded, unfolded, rtol=1e-12, atol=1e-12)
    # The folded path skips the BN modules, unless a hook watches them (then it runs them).
    monkeypatch.setattr(backbone, "FOLD_FROZEN_BN", True)
    runs = []
    monkeypatch.setattr(FrozenBatchNorm2d, "forward", lambda self, t, original=FrozenBatchNorm2d.forward: runs.append(1) or original(self, t))
    block(x)
    assert runs == []
    calls = []
    block.bn1.register_forward_hook(lambda *args: calls.append(1))
    torch.testing.assert_close(block(x), results[0][0], rtol=1e-12, atol=1e-12)
    assert calls == [1] and len(runs) == 1


def test_stride_in_1x1_moves_the_stride_and_keeps_shapes():
    torch_v15 = Bottleneck(64, 64, 2, "frozen_bn", stride_in_1x1=False)
    msra = Bottleneck(64, 64, 2, "frozen_bn", stride_in_1x1=True)
    assert torch_v15.conv2.stride == (2, 2) and torch_v15.conv1.stride == (1, 1)
    assert msra.conv1.stride == (2, 2) and msra.conv2.stride == (1, 1)
    x = torch.rand(1, 64, 16, 16)
    assert torch_v15(x).shape == msra(x).shape == (1, 256, 8, 8)
    small = ResNet(18, "group", base_width=8)
    outputs = small(torch.rand(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [(1, 8, 16, 24), (1, 16, 8, 12), (1, 32, 4, 6), (1, 64, 2, 3)]
    assert group_norm_groups(256) == 32 and group_norm_groups(16) == 4 and group_norm_groups(8) == 2


def test_fpn_levels_shapes_and_p6_is_strided_p5():
    model = tiny_model()
    features = model.backbone(torch.rand(1, 3, 96, 160))
    assert [tuple(f.shape[-2:]) for f in features] == [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
    torch.testing.assert_close(features[4], features[3][..., ::2, ::2])


# --- transform --------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width,min_size,max_size", [
    (480, 640, 800, 1333), (300, 1000, 800, 1333), (427, 640, 800, 1333), (375, 500, 256, 256), (97, 31, 96, 96),
])
def test_resize_rule_matches_float32_formula(height, width, min_size, max_size):
    # Independent float32 computation of torchvision's rule, then floor in float64 as interpolate
    # does. torchvision divides `python float / float32 tensor`, which PyTorch evaluates as
    # reciprocal(tensor) * float in float32: (1/480)*800 rounds to 1.6666667, not 1.6666666.
    one = np.float32(1.0)
    scale = min((one / np.float32(min(height, width))) * np.float32(min_size),
                (one / np.float32(max(height, width))) * np.float32(max_size))
    expected = (math.floor(height * float(scale)), math.floor(width * float(scale)))
    assert resized_size(height, width, min_size, max_size) == expected
    assert tuple(resize_image(torch.rand(3, height, width), min_size, max_size).shape[-2:]) == expected


def test_resize_example_values():
    # 300x1000: max_size binds, scale ~1.333 -> 300 * 1.333 = 399.9 -> 399 rows, 1333 columns.
    assert resized_size(300, 1000, 800, 1333) == (399, 1333)
    # 480x640: min_size binds, 480 -> 800 (the float32 scale rounds up), 640 * 5/3 = 1066.7 -> 1066.
    assert resized_size(480, 640, 800, 1333) == (800, 1066)


def test_batch_images_pads_with_mean_to_multiples_of_32():
    images = [torch.rand(3, 40, 50), torch.rand(3, 70, 33)]
    batch = batch_images(images, [0.1, 0.2, 0.3])
    assert batch.shape == (2, 3, 96, 64)
    torch.testing.assert_close(batch[0, :, :40, :50], images[0])
    assert torch.all(batch[0, 1, 40:] == 0.2) and torch.all(batch[1, 2, :, 33:] == 0.3)


def paste_reference(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision's paste algorithm, written out one mask at a time: pad by 1, scale the box
    by (M+2)/M about its centre, truncate to int, resize to (y2-y1+1, x2-x1+1), place, clip."""
    out = torch.zeros(masks.shape[0], height, width)
    size = masks.shape[-1]
    scale = (size + 2) / size
    for index in range(masks.shape[0]):
        padded = F.pad(masks[index], (1, 1, 1, 1))
        x1, y1, x2, y2 = boxes[index].tolist()
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * scale, (y2 - y1) / 2 * scale
        bx1, by1, bx2, by2 = (int(torch.tensor(v, dtype=torch.float32).to(torch.int64)) for v in
                              (cx - hw, cy - hh, cx + hw, cy + hh))
        w, h = max(bx2 - bx1 + 1, 1), max(by2 - by1 + 1, 1)
        resized = F.interpolate(padded[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        xa, xb = max(bx1, 0), min(bx2 + 1, width)
        ya, yb = max(by1, 0), min(by2 + 1, height)
        if xb > xa and yb > ya:
            out[index, ya:yb, xa:xb] = resized[ya - by1:yb - by1, xa - bx1:xb - bx1]
    return out


def test_paste_masks_matches_per_mask_reference():
    torch.manual_seed(0)
    masks = torch.rand(7, 28, 28)
    boxes = torch.tensor([[10.3, 5.7, 60.2, 40.9], [-8.0, -3.5, 20.0, 30.0], [50.0, 60.0, 130.0, 99.0],
                          [30.0, 30.0, 30.5, 31.0], [0.0, 0.0, 120.0, 100.0], [5.0, 80.0, 17.0, 80.2],
                          [100.0, 10.0, 90.0, 20.0]])
    pasted = paste_masks_in_image(masks[:, None], boxes, (100, 120))
    assert pasted.shape == (7, 1, 100, 120)
    torch.testing.assert_close(pasted[:, 0], paste_reference(masks, boxes, 100, 120), rtol=0, atol=2e-6)
    assert paste_masks_in_image(masks[:0, None], boxes[:0], (10, 12)).shape == (0, 1, 10, 12)


def test_resize_boxes_back_to_original():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    torch.testing.assert_close(resize_boxes(boxes, (100, 200), (50, 400)), torch.tensor([[20.0, 10.0, 60.0, 20.0]]))


# --- matching and sampling -------------------------------------------------------------------

def test_matcher_thresholds_and_low_quality_matches():
    quality = torch.tensor([[0.8, 0.2, 0.5, 0.0], [0.1, 0.25, 0.6, 0.0]])
    # best per prediction: 0.8 (gt 0), 0.25 (below 0.3), 0.6 (between), 0.0 (below)
    assert Matcher(0.7, 0.3)(quality.clone()).tolist() == [0, -1, -2, -1]
    # gt 1's best is prediction 2 (0.6): it becomes a match with its best gt, 1.
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(quality.clone()).tolist() == [0, -1, 1, -1]


def test_sampler_caps_positives_and_fills_with_negatives():
    torch.manual_seed(0)
    labels = torch.tensor([1, 0, 0, 2, -1, 0, 0, 3, 0, 0])
    pos, neg = BalancedPositiveNegativeSampler(4, 0.5)([labels])
    assert pos[0].sum() == 2 and neg[0].sum() == 2
    assert torch.all(labels[pos[0]] >= 1) and torch.all(labels[neg[0]] == 0)
    pos, neg = BalancedPositiveNegativeSampler(4, 0.5)([torch.tensor([1, 0, 0, 0, 0, -1])])
    assert pos[0].sum() == 1 and neg[0].sum() == 3


# --- inference: fixed shapes against list-based torchvision-order references ------------------

def test_rpn_predictions_flatten_in_anchor_order():
    """Anchor (y*W + x)*A + a sits at cell (y, x) (ops.AnchorGenerator): the flattened
    objectness and deltas must put the head's output for (a, y, x) at that same index."""
    from maskrt.model.rpn import flatten_level
    batch, anchors_per_cell, height, width = 2, 3, 4, 5
    b, a, y, x = torch.meshgrid(*(torch.arange(n) for n in (batch, anchors_per_cell, height, width)), indexing="ij")
    logits = (1000 * b + 100 * a + 10 * y + x).float()  # [B, A, H, W]
    flat = flatten_level(logits, 1)[..., 0]
    for index in (0, 7, 31, 59):
        cell, anchor = divmod(index, anchors_per_cell)
        row, col = divmod(cell, width)
        assert float(flat[1, index]) == 1000 + 100 * anchor + 10 * row + col
    # Deltas: channel a*4 + k holds coordinate k of anchor a (torchvision's layout).
    k = torch.arange(4).view(1, 1, 4, 1, 1)
    deltas = (logits[:, :, None] * 10 + k).reshape(batch, anchors_per_cell * 4, height, width)
    flat_deltas = flatten_level(deltas, 4)
    cell, anchor = divmod(23, anchors_per_cell)
    row, col = divmod(cell, width)
    expected = [(100 * anchor + 10 * row + col) * 10 + coordinate for coordinate in range(4)]
    assert flat_deltas[0, 23].tolist() == expected



def rpn_reference(rpn, objectness, deltas, anchors_per_level, image_sizes):
    """torchvision's filter_proposals, one image at a time with variable-length tensors."""
    results = []
    counts = [a.shape[0] for a in anchors_per_level]
    anchors = torch.cat(anchors_per_level)
    for image in range(objectness.shape[0]):
        picks, levels, offset = [], [], 0
        for level, count in enumerate(counts):
            top = objectness[image, offset:offset + count].topk(min(rpn.pre_nms_top_n(), count)).indices + offset
            picks.append(top)
            levels.append(torch.full_like(top, level))
            offset += count
        picks, levels = torch.cat(picks), torch.cat(levels)
        boxes = rpn.box_coder.decode_single(deltas[image, picks], anchors[picks])
        boxes = ops.clip_boxes_to_image(boxes, tuple(image_sizes[image].tolist()))
        scores = objectness[image, picks].sigmoid()
        keep = ops.remove_small_boxes(boxes, 1e-3)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = torch.where(scores >= rpn.score_thresh)[0]
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = ops.batched_nms(boxes, scores, levels, rpn.nms_thresh)[:rpn.post_nms_top_n()]
        results.append(boxes[keep])
    return results


def heads_reference(heads, class_logits, box_deltas, proposals, image_sizes):
    """torchvision's postprocess_detections for one image's valid proposals [P, 4]."""
    boxes = heads.box_coder.decode_single(box_deltas, proposals).reshape(proposals.shape[0], -1, 4)
    boxes = ops.clip_boxes_to_image(boxes, image_sizes)
    scores = F.softmax(class_logits, -1)
    labels = torch.arange(scores.shape[1]).expand_as(scores)
    boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
    keep = torch.where(scores > heads.score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = ops.remove_small_boxes(boxes, 1e-2)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = ops.batched_nms(boxes, scores, labels, heads.nms_thresh)[:heads.detections_per_img]
    return boxes[keep], scores[keep], labels[keep]


@pytest.fixture(scope="module")
def eval_model():
    # Seed 1: its random heads give some but not all of the 12 detection slots on the
    # random test images (the tests below need both filled and empty slots).
    return tiny_model(seed=1).eval()


def test_rpn_fixed_shape_proposals_equal_list_reference(eval_model):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 96, 128)
    sizes = torch.tensor([[96, 128], [70, 101]])
    with torch.no_grad():
        features = eval_model.backbone(eval_model.normalize(images))
        proposals, valid, objectness, deltas, anchors = eval_model.rpn(features, (96, 128), sizes)
    assert proposals.shape == (2, 40, 4) and valid.shape == (2, 40)
    expected = rpn_reference(eval_model.rpn, objectness, deltas, anchors, sizes)
    for image in range(2):
        count = int(valid[image].sum())
        assert count == expected[image].shape[0] > 0
        assert torch.all(valid[image, :count]) and not torch.any(valid[image, count:])
        torch.testing.assert_close(proposals[image, :count], expected[image])
        assert torch.all(proposals[image, count:] == 0)
        assert float(proposals[image, :, 2].max()) <= float(sizes[image, 1])


def test_roi_heads_detect_equals_list_reference(eval_model):
    torch.manual_seed(2)
    images = torch.rand(2, 3, 96, 96)
    sizes = torch.tensor([[96, 96], [90, 80]])
    heads = eval_model.roi_heads
    with torch.no_grad():
        features = eval_model.backbone(eval_model.normalize(images))
        proposals, valid, *_ = eval_model.rpn(features, (96, 96), sizes)
        num_dets, boxes, scores, labels, masks = heads.detect(features[:-1], proposals, valid, (96, 96), sizes)
        for image in range(2):
            own = proposals[image][valid[image]]
            pooled = heads.box_roi_pool([f[image:image + 1] for f in features[:-1]], own[None], (96, 96))[0]
            logits, deltas = heads.box_predictor(heads.box_head(pooled))
            ref_boxes, ref_scores, ref_labels = heads_reference(heads, logits, deltas, own, tuple(sizes[image].tolist()))
            count = int(num_dets[image])
            assert 0 < count == ref_boxes.shape[0] <= heads.detections_per_img
            torch.testing.assert_close(boxes[image, :count], ref_boxes, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(scores[image, :count], ref_scores, rtol=1e-5, atol=1e-6)
            assert torch.equal(labels[image, :count], ref_labels)
            # Masks: the predicted class's sigmoid for each detection.
            mask_pool = heads.mask_roi_pool([f[image:image + 1] for f in features[:-1]], ref_boxes[None], (96, 96))[0]
            logits = heads.mask_predictor(heads.mask_head(mask_pool))
            ref_masks = logits[torch.arange(count), ref_labels].sigmoid()
            torch.testing.assert_close(masks[image, :count], ref_masks, rtol=1e-4, atol=1e-5)


def test_detect_batch_static_shapes_padding_zero_and_batch_independence(eval_model):
    torch.manual_seed(3)
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        batched = eval_model.detect_batch(images)
        singles = [eval_model.detect_batch(images[i:i + 1]) for i in range(2)]
    num_dets, boxes, scores, labels, masks = batched
    assert num_dets.dtype == torch.int32 and num_dets.shape == (2,)
    assert boxes.shape == (2, 12, 4) and scores.shape == (2, 12) and labels.shape == (2, 12)
    assert labels.dtype == torch.int64 and masks.shape == (2, 12, 28, 28)
    assert singles[0][1].shape == (1, 12, 4) and singles[0][4].shape == (1, 12, 28, 28)
    for image in range(2):
        count = int(num_dets[image])
        assert 0 < count < 12, "the fixture should give some but not all detections"
        assert torch.all(boxes[image, count:] == 0) and torch.all(scores[image, count:] == 0)
        assert torch.all(labels[image, count:] == 0) and torch.all(masks[image, count:] == 0)
        assert torch.all(labels[image, :count] >= 1) and torch.all(scores[image, :count] > 0.5)
        assert torch.all(scores[image, :count - 1] >= scores[image, 1:count])
        for got, single in zip(batched, singles[image]):
            torch.testing.assert_close(got[image], single[0], rtol=1e-5, atol=1e-5)


def test_eval_forward_returns_torchvision_format_in_original_pixels(eval_model):
    torch.manual_seed(4)
    images = [torch.rand(3, 120, 90), torch.rand(3, 64, 64)]
    with torch.no_grad():
        results = eval_model(images)
    assert len(results) == 2
    for image, result in zip(images, results):
        count = result["boxes"].shape[0]
        assert set(result) == {"boxes", "labels", "scores", "masks"}
        assert result["masks"].shape == (count, 1, *image.shape[-2:])
        assert result["labels"].dtype == torch.int64 and result["scores"].shape == (count,)
        assert float(result["boxes"][:, 2].max()) <= image.shape[-1] + 1e-3
        assert float(result["boxes"][:, 3].max()) <= image.shape[-2] + 1e-3
        assert 0.0 <= float(result["masks"].min()) and float(result["masks"].max()) <= 1.0
    # Same result as detect_batch on the resized image, mapped back by hand.
    resized = resize_image(images[0], 96, 96)
    batch = batch_images([resized], eval_model.image_mean)
    with torch.no_grad():
        num_dets, boxes, scores, labels, _ = eval_model.detect_batch(batch, torch.tensor([list(resized.shape[-2:])]))
    count = int(num_dets[0])
    ratio = torch.tensor([90 / resized.shape[-1], 120 / resized.shape[-2]] * 2)
    torch.testing.assert_close(results[0]["boxes"], boxes[0, :count] * ratio, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(results[0]["scores"], scores[0, :count])


def test_bad_inputs_raise_one_line_errors(eval_model):
    with pytest.raises(MaskrtError, match="list of images"):
        eval_model(torch.rand(3, 32, 32))
    with pytest.raises(MaskrtError, match="float"):
        eval_model([torch.zeros(3, 32, 32, dtype=torch.uint8)])
    with pytest.raises(MaskrtError, match=r"\[3, H, W\]"):
        eval_model([torch.rand(1, 32, 32)])
    model = tiny_model().train()
    image, target = two_shapes()
    with pytest.raises(MaskrtError, match="targets"):
        model([image])
    with pytest.raises(MaskrtError, match="masks"):
        model([image], [{"boxes": target["boxes"], "labels": target["labels"]}])
    with pytest.raises(MaskrtError, match="degenerate"):
        model([image], [{**target, "boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0], [1.0, 1.0, 4.0, 4.0]])}])
    with pytest.raises(MaskrtError, match="labels"):
        model([image], [{**target, "labels": torch.tensor([1, 3])}])


# --- training ---------------------------------------------------------------------------------

@pytest.mark.parametrize("roi_op", ["align", "pool"])
def test_train_forward_gives_five_finite_losses_with_gradients(roi_op):
    model = tiny_model(roi_op=roi_op).train()
    image, target = two_shapes()
    image2, target2 = two_shapes(80, seed=1)
    losses = model([image, image2], [target, target2])
    assert list(losses) == ["loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"]
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ("backbone.body.conv1.weight", "backbone.fpn.inner_blocks.0.0.weight", "rpn.head.cls_logits.weight",
                 "roi_heads.box_head.0.0.weight", "roi_heads.box_head.2.weight", "roi_heads.mask_head.0.0.weight",
                 "roi_heads.mask_predictor.mask_fcn_logits.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    model.eval()
    with torch.no_grad():
        num_dets, boxes, *_ = model.detect_batch(torch.rand(1, 3, 96, 96))
    assert boxes.shape == (1, 12, 4)


def test_train_with_an_image_without_objects():
    model = tiny_model().train()
    image, target = two_shapes()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 96, 96, dtype=torch.uint8)}
    losses = model([image, torch.rand(3, 96, 96)], [target, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    losses = model([torch.rand(3, 96, 96)], [empty])
    assert float(losses["loss_mask"].detach()) == 0.0 and float(losses["loss_box_reg"].detach()) == 0.0


# --- weights I/O ------------------------------------------------------------------------------

def test_save_load_round_trip_gives_identical_outputs(tmp_path, eval_model):
    path = tmp_path / "run" / "model.safetensors"
    eval_model.category_ids = [0, 7, 9]
    save_model(eval_model, path)
    assert not [p for p in path.parent.iterdir() if p.name != "model.safetensors"], "temp file left behind"
    metadata = read_metadata(path)
    assert metadata["format"] == "maskrt" and metadata["preset"] == "edge" and metadata["num_classes"] == 3
    assert metadata["class_names"] == ["__background__", "disc", "square"] and metadata["category_ids"] == [0, 7, 9]
    assert metadata["config"]["backbone_width"] == 8 and json.dumps(metadata["config"])
    loaded = load_model(path)
    assert not loaded.training and loaded.class_names == eval_model.class_names and loaded.category_ids == [0, 7, 9]
    images = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        for a, b in zip(eval_model.detect_batch(images), loaded.detect_batch(images)):
            assert torch.equal(a, b)
    stricter = load_model(path, box_score_thresh=0.9, box_detections_per_img=5)
    assert stricter.roi_heads.score_thresh == 0.9 and stricter.detections_per_img == 5
    renamed = load_model(path, class_names=["__background__", "a", "b"])
    assert renamed.class_names == ["__background__", "a", "b"] and renamed.category_ids == [0, 7, 9]


def test_load_model_errors_are_one_line(tmp_path):
    with pytest.raises(MaskrtError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(MaskrtError, match="not a readable safetensors"):
        load_model(garbage)
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(MaskrtError, match="without maskrt metadata"):
        load_model(foreign)
    wrong = tmp_path / "wrong.safetensors"
    metadata = {"format": "maskrt", "preset": "edge", "num_classes": 3, "config": TINY}
    save_file({"w": torch.zeros(2)}, str(wrong), metadata={"maskrt": json.dumps(metadata)})
    with pytest.raises(MaskrtError, match="do not fit"):
        load_model(wrong)
    for error_test in (garbage, foreign, wrong):
        try:
            load_model(error_test)
        except MaskrtError as err:
            assert "\n" not in str(err)


def test_detect_batch_exports_with_dynamic_batch_and_only_graph_ops(eval_model):
    """The static-shape contract: torch.export traces detect_batch for any batch size, and
    the only data-dependent work is the two maskrt graph ops (RPN + box NMS, box + mask pool)."""

    class Detect(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor):
            return self.model.detect_batch(images)

    batch = torch.export.Dim("batch", min=1, max=4)
    program = torch.export.export(Detect(eval_model), (torch.rand(2, 3, 96, 96),),
                                  dynamic_shapes={"images": {0: batch}})
    custom = sorted(str(node.target) for node in program.graph.nodes if "maskrt" in str(node.target))
    assert custom == ["maskrt.multilevel_roi_align.default"] * 2 + ["maskrt.nms_padded.default"] * 2
    assert not any("nonzero" in str(node.target) for node in program.graph.nodes)
    images = torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        for traced, eager in zip(program.module()(images), eval_model.detect_batch(images)):
            assert torch.equal(traced, eager)


def test_rpn_loss_with_zero_predictions_matches_float64_formula(eval_model):
    """Zero logits and deltas: BCE is ln 2 for every sampled anchor, and the box loss is the
    smooth-L1 (beta 1/9) of the positives' encoded targets over the 256 sampled anchors. All
    positives fit in the 128-positive quota, so the sum does not depend on the random draw."""
    rpn = eval_model.rpn
    features = [torch.zeros(1, 16, 96 // s, 96 // s) for s in (4, 8, 16, 32)] + [torch.zeros(1, 16, 2, 2)]
    anchors = rpn.anchors(features, (96, 96))
    gt = torch.tensor([[20.0, 30.0, 52.0, 62.0]])
    total = sum(a.shape[0] for a in anchors)
    torch.manual_seed(0)
    losses = rpn.compute_loss(torch.zeros(1, total), torch.zeros(1, total, 4), anchors, [{"boxes": gt}])
    assert abs(float(losses["loss_objectness"]) - math.log(2)) < 1e-6

    all_anchors = torch.cat(anchors).double().numpy()
    g = gt.double().numpy()[0]
    ix = np.clip(np.minimum(all_anchors[:, 2], g[2]) - np.maximum(all_anchors[:, 0], g[0]), 0, None)
    iy = np.clip(np.minimum(all_anchors[:, 3], g[3]) - np.maximum(all_anchors[:, 1], g[1]), 0, None)
    inter = ix * iy
    areas = (all_anchors[:, 2] - all_anchors[:, 0]) * (all_anchors[:, 3] - all_anchors[:, 1])
    iou = inter / (areas + (g[2] - g[0]) * (g[3] - g[1]) - inter)
    positive = (iou >= 0.7) | (iou == iou.max())
    assert 0 < positive.sum() <= 128
    a = all_anchors[positive]
    aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    targets = np.stack([((g[0] + g[2]) / 2 - (a[:, 0] + a[:, 2]) / 2) / aw,
                        ((g[1] + g[3]) / 2 - (a[:, 1] + a[:, 3]) / 2) / ah,
                        np.log((g[2] - g[0]) / aw), np.log((g[3] - g[1]) / ah)], axis=1)
    beta = 1 / 9
    err = np.abs(targets)
    smooth = np.where(err < beta, 0.5 * err**2 / beta, err - 0.5 * beta)
    assert smooth.sum() > 0.01  # the gt centre (36, 46) is off every anchor centre
    assert abs(float(losses["loss_rpn_box_reg"]) - smooth.sum() / 256) < 1e-6


def test_head_losses_with_zero_predictors_are_uniform_entropies():
    """Zero class logits: cross-entropy ln(3) on every sampled RoI; zero mask logits: BCE
    ln 2 per pixel; zero deltas on proposals equal to the gt boxes: box loss 0."""
    model = tiny_model().train()
    heads = model.roi_heads
    with torch.no_grad():
        for module in (heads.box_predictor.cls_score, heads.box_predictor.bbox_pred,
                       heads.mask_predictor.mask_fcn_logits):
            module.weight.zero_()
            module.bias.zero_()
    image, target = two_shapes()
    features = model.backbone(model.normalize(image[None]))
    gt_only = [target["boxes"].clone()]  # the gt boxes are appended again: every positive is exact
    losses = {name: float(value.detach()) for name, value in
              heads.losses(features[:-1], gt_only, (96, 96), [target]).items()}
    assert abs(losses["loss_classifier"] - math.log(3)) < 1e-5
    assert abs(losses["loss_mask"] - math.log(2)) < 1e-5
    assert losses["loss_box_reg"] == 0.0


def test_mask_positives_per_image_caps_the_rois_that_train_the_mask_head():
    """Many positive proposals per object: the mask head sees all sampled positives without
    a cap, a random `mask_positives_per_image` of them with one, and a cap above the count
    changes nothing."""
    image, target = two_shapes()
    jitter = torch.tensor([[dx, dy, dx, dy] for dx in (-2.0, 0.0, 2.0) for dy in (-2.0, 0.0, 2.0)])
    proposals = [(target["boxes"][:, None, :] + jitter[None]).reshape(-1, 4)]  # 18, IoU > 0.5 with their gt

    def mask_loss_and_rois(cap):
        model = tiny_model(mask_positives_per_image=cap).train()
        seen = []
        model.roi_heads.mask_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
        features = model.backbone(model.normalize(image[None]))
        torch.manual_seed(5)
        losses = model.roi_heads.losses(features[:-1], proposals, (96, 96), [target])
        return float(losses["loss_mask"].detach()), seen[0]

    positives = 32 * 0.25  # TINY: 32 RoIs per image, at most a quarter positive
    full_loss, full_rois = mask_loss_and_rois(None)
    assert full_rois == positives
    capped_loss, capped_rois = mask_loss_and_rois(3)
    assert capped_rois == 3 and math.isfinite(capped_loss)
    assert mask_loss_and_rois(100) == (full_loss, full_rois)
