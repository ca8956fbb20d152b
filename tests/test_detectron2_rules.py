"""detectron2's inference rules, each against a float64 NumPy reference written from
detectron2's source (commit 02b5c4e, 2026-06-06; file and lines named at each reference),
not from our code:

- anchors of a 1024x1024 input and of an 800-row input (P6's stride);
- box decoding and clipping (the same rule as torchvision's: no switch);
- the RoI -> FPN level rule on boundary sizes;
- the RPN's proposal selection (per-level top-k, NMS over levels ranked by logits, empty boxes);
- the detections kept after NMS (empty boxes take a place, then go);
- mask pasting at fractional boxes near the image border, model and runtime;
- the resized size (`ResizeShortestEdge`), model and runtime, and its pixels (PIL's bilinear on
  uint8, from Pillow's source, which detectron2's `ResizeTransform` calls);
- the boxes' clipping to the image inside a padded input (`content_sizes`).

detectron2 itself cannot run here (it needs torchvision, which does not load with this torch);
tests/test_detectron2_export.py runs a synthesised detectron2 checkpoint end to end.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from maskrt.model import ops
from maskrt.model.mask_rcnn import MaskRCNN
from maskrt.model.roi_heads import MultiLevelRoIPooler, RoIHeads
from maskrt.model.rpn import RegionProposalNetwork, RPNHead
from maskrt.model.transform import detectron2_paste_masks_in_image, paste_masks_in_image
from maskrt.runtime.postprocess import paste_mask_crops, paste_masks

torch.set_num_threads(1)


# --- anchors: modeling/anchor_generator.py ---------------------------------------------------

def d2_anchors_reference(grid_sizes, strides, sizes=(32, 64, 128, 256, 512), ratios=(0.5, 1.0, 2.0), offset=0.0):
    """DefaultAnchorGenerator: generate_cell_anchors (lines 203-216: w = sqrt(s^2 / a), h = a w,
    centred on 0, size-major), _create_grid_offsets (lines 39-55: arange(offset*stride,
    grid*stride, stride), meshgrid y-major) and _grid_anchors (lines 170-177: (shifts[:, None]
    + cells[None]).reshape(-1, 4)), in float64. OFFSET 0.0 (config/defaults.py line 195)."""
    levels = []
    for (grid_h, grid_w), stride, size in zip(grid_sizes, strides, sizes):
        cells = []
        for a in ratios:
            w = math.sqrt(size * size / a)
            h = a * w
            cells.append([-w / 2, -h / 2, w / 2, h / 2])
        cells = np.array(cells)
        shift_y, shift_x = np.meshgrid(np.arange(offset * stride, grid_h * stride, stride),
                                       np.arange(offset * stride, grid_w * stride, stride), indexing="ij")
        shifts = np.stack([shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel()], axis=1)
        levels.append((shifts[:, None, :] + cells[None, :, :]).reshape(-1, 4))
    return levels


def _rpn(anchor_rule: str, selection_rule: str = "torchvision", pre: int = 1000, post: int = 1000) -> RegionProposalNetwork:
    generator = ops.AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5, anchor_rule)
    return RegionProposalNetwork(generator, RPNHead(4, 3), 0.7, 0.3, 256, 0.5, {"training": pre, "testing": pre},
                                 {"training": post, "testing": post}, 0.7, 0.0, selection_rule).eval()


@pytest.mark.parametrize("height, width", [(1024, 1024), (800, 1216)])
def test_anchors_are_detectron2s(height: int, width: int) -> None:
    # Our FPN: P2..P5 at strides 4..32 of a padded input, P6 a stride-2 max-pool of P5.
    grids = [(height // s, width // s) for s in (4, 8, 16, 32)]
    grids.append(((grids[-1][0] + 1) // 2, (grids[-1][1] + 1) // 2))
    features = [torch.zeros(1, 4, h, w) for h, w in grids]
    reference = d2_anchors_reference(grids, (4, 8, 16, 32, 64))
    ours = _rpn("detectron2").anchors(features, (height, width))
    for level, (mine, theirs) in enumerate(zip(ours, reference)):
        # float32 storage of the float64 reference: within one ulp of a 1024-px coordinate.
        np.testing.assert_allclose(mine.double().numpy(), theirs, rtol=0, atol=1e-4, err_msg=f"level {level}")
    # torchvision's rule rounds the cell anchors (size 32, ratio 0.5: 45.25 x 22.63 -> 46 x 22).
    tv = _rpn("torchvision").anchors(features, (height, width))
    assert np.abs(tv[0].double().numpy() - reference[0]).max() > 0.3
    if height == 800:
        # 800 rows: P6 has 13 rows; torchvision's stride is 800 // 13 = 61, detectron2's 64,
        # so the last row of anchors sits 12 * 3 = 36 px higher.
        assert grids[4][0] == 13
        assert np.abs(tv[4].double().numpy() - reference[4]).max() > 35


def test_from_detectron2_settings_select_detectron2_rules() -> None:
    from maskrt.model.convert import DETECTRON2_SETTINGS, TORCHVISION_SETTINGS

    for key in ("anchor_rule", "selection_rule", "level_rule", "resize_rule", "paste_rule"):
        assert DETECTRON2_SETTINGS[key] == "detectron2"
        assert key not in TORCHVISION_SETTINGS  # torchvision-imported models keep the defaults


# --- box decoding and clipping: modeling/box_regression.py, structures/boxes.py -------------

def d2_apply_deltas(deltas: np.ndarray, boxes: np.ndarray, weights, scale_clamp=math.log(1000.0 / 16)) -> np.ndarray:
    """Box2BoxTransform.apply_deltas (lines 88-116; _DEFAULT_SCALE_CLAMP line 14), float64."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw, dh = np.minimum(deltas[:, 2::4] / ww, scale_clamp), np.minimum(deltas[:, 3::4] / wh, scale_clamp)
    pred_ctr_x, pred_ctr_y = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    pred_w, pred_h = np.exp(dw) * widths[:, None], np.exp(dh) * heights[:, None]
    return np.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                     pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h], axis=-1).reshape(deltas.shape)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])  # RPN, box head
def test_box_decoding_and_clipping_are_detectron2s(weights) -> None:
    rng = np.random.default_rng(4)
    boxes = np.concatenate([rng.uniform(0, 200, (50, 2)), rng.uniform(210, 400, (50, 2))], axis=1).astype(np.float32)
    deltas = rng.normal(0, 2, (50, 8)).astype(np.float32)
    deltas[:5, 2] = 40.0  # past the scale clamp
    reference = d2_apply_deltas(deltas.astype(np.float64), boxes.astype(np.float64), weights).reshape(50, 2, 4)
    ours = ops.BoxCoder(weights).decode_single(torch.from_numpy(deltas), torch.from_numpy(boxes)).reshape(50, 2, 4)
    np.testing.assert_allclose(ours.double().numpy(), reference, rtol=1e-5, atol=1e-3)
    # Boxes.clip (structures/boxes.py lines 183-197): x to [0, w], y to [0, h].
    clipped = ops.clip_boxes_to_image(ours, (300, 250)).double().numpy()
    expected = np.stack([np.clip(reference[..., 0], 0, 250), np.clip(reference[..., 1], 0, 300),
                         np.clip(reference[..., 2], 0, 250), np.clip(reference[..., 3], 0, 300)], axis=-1)
    np.testing.assert_allclose(clipped, expected, rtol=1e-5, atol=1e-3)


# --- level rule: modeling/poolers.py ---------------------------------------------------------

def d2_level_reference(sides: np.ndarray, canonical_size: float = 224.0, canonical_level: int = 4,
                       min_level: int = 2, max_level: int = 5) -> np.ndarray:
    """assign_boxes_to_levels (lines 51-59), float64: floor(k0 + log2(sqrt(area) / s0 + 1e-8))."""
    levels = np.floor(canonical_level + np.log2(np.sqrt(sides * sides) / canonical_size + 1e-8))
    return np.clip(levels, min_level, max_level).astype(np.int64) - min_level


def _boundary_sides() -> np.ndarray:
    """Square RoI sides around the P2/P3, P3/P4 and P4/P5 boundaries (112, 224, 448 px).
    Relative offsets 3e-7 .. 6e-7 below a boundary lie inside the band where torchvision's
    +1e-6 rounds up to the next level, and beyond float32 rounding (~2e-7 relative at 3 ulps)."""
    sides = [40.0, 111.0, 113.0, 200.0, 300.0, 447.0, 449.0, 900.0]
    for boundary in (112.0, 224.0, 448.0):
        for delta in (-6e-7, -5e-7, -4e-7, -3e-7, 3e-7, 1e-5, -1e-5):
            sides.append(boundary * (1.0 + delta))
    return np.array(sides, dtype=np.float32)


@pytest.mark.parametrize("rule", ["detectron2", "torchvision"])
def test_level_rule_on_boundary_sizes(rule: str) -> None:
    """Each level's map is the constant level index, so an RoI's pooled value says which level
    it was read from (aligned RoIAlign of a constant map inside the map is that constant)."""
    sides = _boundary_sides()
    rois = torch.from_numpy(np.stack([np.full_like(sides, 8.0), np.full_like(sides, 8.0),
                                      8.0 + sides, 8.0 + sides], axis=1))[None]
    features = [torch.full((1, 1, 1024 // s, 1024 // s), float(level)) for level, s in enumerate((4, 8, 16, 32))]
    pooler = MultiLevelRoIPooler(2, 0, aligned=True, level_rule=rule)
    pooled = pooler(features, rois, (1024, 1024))[0, :, 0]  # [R, 2, 2]
    ours = pooled.mean(dim=(1, 2)).round().long().numpy()
    # The same through the op's level function, with the scale the pooler hands the op.
    direct = ops.fpn_level(rois[0], 2, 5, pooler.op_canonical_scale, 4).numpy() - 2
    np.testing.assert_array_equal(ours, direct)
    reference = d2_level_reference(sides.astype(np.float64))
    if rule == "detectron2":
        np.testing.assert_array_equal(ours, reference)
    else:  # torchvision's rule puts the RoIs just below each boundary one level up
        differs = ours != reference
        assert differs.sum() == 12 and np.all(ours[differs] == reference[differs] + 1)


# --- RPN proposals: modeling/proposal_generator/proposal_utils.py ----------------------------

def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    width = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = width * height
    return inter / (area + areas - inter)


def batched_nms_reference(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float) -> np.ndarray:
    """torchvision's batched_nms semantics (what detectron2's layers/nms.py line 22 calls):
    greedy per group in decreasing score, a box suppressed by IoU > threshold; the kept indices
    by decreasing score."""
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for position, index in enumerate(order):
        if suppressed[index]:
            continue
        keep.append(index)
        later = order[position + 1:]
        same = later[groups[later] == groups[index]]
        suppressed[same[_iou(boxes[index], boxes[same]) > threshold]] = True
    return np.array(keep, dtype=np.int64)


def d2_find_top_rpn_proposals(proposals, logits, image_size, nms_thresh, pre_nms_topk, post_nms_topk):
    """find_top_rpn_proposals for one image at test time (lines 67-135), float64: per level the
    top pre_nms_topk by logit (line 79), concatenate, drop non-finite (105), clip (114), keep
    sides > 0 (117, Boxes.nonempty with MIN_SIZE 0), NMS over levels on the logits (121),
    first post_nms_topk (129). Returns (boxes [K, 4], logits [K])."""
    boxes, scores, levels = [], [], []
    for level, (level_boxes, level_logits) in enumerate(zip(proposals, logits)):
        k = min(len(level_logits), pre_nms_topk)
        top = np.argsort(-level_logits, kind="stable")[:k]
        boxes.append(level_boxes[top])
        scores.append(level_logits[top])
        levels.append(np.full(k, level))
    boxes, scores, levels = np.concatenate(boxes), np.concatenate(scores), np.concatenate(levels)
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    boxes, scores, levels = boxes[finite], scores[finite], levels[finite]
    height, width = image_size
    boxes = np.stack([np.clip(boxes[:, 0], 0, width), np.clip(boxes[:, 1], 0, height),
                      np.clip(boxes[:, 2], 0, width), np.clip(boxes[:, 3], 0, height)], axis=1)
    nonempty = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    boxes, scores, levels = boxes[nonempty], scores[nonempty], levels[nonempty]
    keep = batched_nms_reference(boxes, scores, levels, nms_thresh)[:post_nms_topk]
    return boxes[keep], scores[keep]


def _proposal_case(seed: int):
    """Two levels of random proposals in a 64x64 image: boxes that overlap (NMS has work),
    some past the border (clipping), some 5e-4 px thin (kept by detectron2, dropped by
    torchvision's 1e-3), and logits spread over +-30 so that many sigmoids are exactly 1.0
    in float32 and only the logits can rank them."""
    rng = np.random.default_rng(seed)
    per_level = []
    for count in (60, 24):
        centre = rng.uniform(-4, 68, (count, 2))
        size = rng.uniform(4, 30, (count, 2))
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        thin = rng.random(count) < 0.15
        boxes[thin, 2] = boxes[thin, 0] + 5e-4
        per_level.append(boxes.astype(np.float32))
    logits = [rng.normal(0, 15, len(b)).astype(np.float32) for b in per_level]
    return per_level, logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rpn_selection_is_detectron2s(seed: int) -> None:
    boxes, logits = _proposal_case(seed)
    pre, post = 40, 30
    reference_boxes, reference_logits = d2_find_top_rpn_proposals(
        [b.astype(np.float64) for b in boxes], [s.astype(np.float64) for s in logits], (64, 64), 0.7, pre, post)

    def select(rule: str) -> np.ndarray:
        rpn = _rpn("detectron2", rule, pre, post)
        # Zero deltas decode each anchor to itself: the anchors are the proposals.
        anchors = [torch.from_numpy(b) for b in boxes]
        objectness = torch.from_numpy(np.concatenate(logits))[None]
        deltas = torch.zeros(1, objectness.shape[1], 4)
        proposals, valid = rpn.select_proposals(objectness, deltas, anchors, [len(b) for b in boxes],
                                                torch.tensor([[64, 64]]))
        return proposals[0][valid[0]].double().numpy()

    ours = select("detectron2")
    assert ours.shape == reference_boxes.shape and len(ours) > 10
    np.testing.assert_allclose(ours, reference_boxes, rtol=0, atol=1e-4)
    # Saturated sigmoids and the 1e-3 side rule make torchvision's rule pick other proposals.
    tv = select("torchvision")
    assert tv.shape != reference_boxes.shape or np.abs(tv - reference_boxes).max() > 1.0


# --- detections after NMS: fast_rcnn.py, postprocessing.py -----------------------------------

def test_empty_detections_take_a_place_then_go() -> None:
    """fast_rcnn_inference_single_image keeps the top D after NMS (lines 162-165), empty boxes
    included; detector_postprocess then drops the empty ones (postprocessing.py line 58)."""
    boxes = torch.tensor([[[0.0, 0, 10, 10], [5, 5, 5, 9], [20, 20, 30, 30], [40, 0, 44, 0], [1, 1, 2, 2]]])
    keep = torch.tensor([[2, 1, 0, 3, -1, -1]])  # NMS order; -1 = empty slot
    kept_keep, kept = RoIHeads._drop_empty_detections(boxes, keep, keep >= 0)
    # Reference: walk the NMS order, keep non-empty boxes, in order.
    expected = [int(i) for i in keep[0] if i >= 0 and boxes[0, i, 2] > boxes[0, i, 0] and boxes[0, i, 3] > boxes[0, i, 1]]
    assert expected == [2, 0]
    assert kept[0].tolist() == [True, True, False, False, False, False]
    assert kept_keep[0, :2].tolist() == expected


# --- mask pasting: layers/mask_ops.py --------------------------------------------------------

def d2_paste_reference(mask: np.ndarray, box: np.ndarray, height: int, width: int) -> np.ndarray:
    """_do_paste_mask (lines 47-64) over the whole image, float64: pixel centre (x + 0.5, y + 0.5)
    -> grid g = (c - x0) / (x1 - x0) * 2 - 1 -> grid_sample with align_corners=False, i.e. mask
    coordinate u = ((g + 1) * M - 1) / 2, bilinear over the 4 neighbours, a neighbour outside
    the mask reading 0 (padding_mode "zeros")."""
    size = mask.shape[0]
    x0, y0, x1, y1 = box.astype(np.float64)
    gx = (np.arange(width) + 0.5 - x0) / (x1 - x0) * 2 - 1
    gy = (np.arange(height) + 0.5 - y0) / (y1 - y0) * 2 - 1
    u = ((gx + 1) * size - 1) / 2
    v = ((gy + 1) * size - 1) / 2
    out = np.zeros((height, width))
    for row in range(height):
        for col in range(width):
            u0, v0 = math.floor(u[col]), math.floor(v[row])
            fu, fv = u[col] - u0, v[row] - v0
            for dv, wv in ((0, 1 - fv), (1, fv)):
                for du, wu in ((0, 1 - fu), (1, fu)):
                    r, c = v0 + dv, u0 + du
                    if 0 <= r < size and 0 <= c < size:
                        out[row, col] += wv * wu * mask[r, c]
    return out


# Fractional boxes near and at the border of a 40x56 image (detectron2 clips boxes to the image
# before pasting), a thin one and one smaller than a pixel.
PASTE_BOXES = np.array([[0.3, 0.0, 17.6, 9.45], [40.25, 27.5, 56.0, 40.0], [12.7, 3.2, 13.9, 30.8],
                        [30.1, 11.6, 30.6, 12.05], [0.0, 20.2, 55.9, 39.7]], dtype=np.float32)


def _paste_masks(seed: int = 0, size: int = 28) -> np.ndarray:
    """Confident masks (logits of +-8 in blobs) with a soft edge, as a trained head gives."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (len(PASTE_BOXES), size, size))
    yy, xx = np.mgrid[0:size, 0:size]
    logits += 8 * np.where((yy - size / 2) ** 2 + (xx - size / 2.5) ** 2 < (size / 3) ** 2, 1, -1)
    return (1 / (1 + np.exp(-logits))).astype(np.float32)


def test_paste_matches_detectron2_at_fractional_boxes() -> None:
    masks = _paste_masks()
    height, width = 40, 56
    references = np.stack([d2_paste_reference(m.astype(np.float64), b, height, width)
                           for m, b in zip(masks, PASTE_BOXES)])
    model = detectron2_paste_masks_in_image(torch.from_numpy(masks), torch.from_numpy(PASTE_BOXES), (height, width))
    runtime = paste_masks(masks, PASTE_BOXES, (height, width), threshold=None, rule="detectron2")
    runtime_bool = paste_masks(masks, PASTE_BOXES, (height, width), rule="detectron2")
    for ours in (model[:, 0].numpy(), runtime):
        # Inside detectron2's CPU region the probabilities agree; outside it ours are 0 and the
        # reference is < 0.5 (a pixel centre outside the box reads at most half a mask cell).
        inside = ours != 0
        np.testing.assert_allclose(ours[inside], references[inside], rtol=0, atol=1e-5)
        assert np.all(references[~inside] < 0.5)
    # The runtime keeps each mask as its window: detectron2's CPU region, clipped to the image.
    crops = paste_mask_crops(masks, PASTE_BOXES, (height, width), rule="detectron2")
    for i, (x1, y1, x2, y2) in enumerate(PASTE_BOXES.tolist()):
        assert crops.window(i) == (max(math.floor(x1) - 1, 0), max(math.floor(y1) - 1, 0),
                                   min(math.ceil(x2) + 1, width), min(math.ceil(y2) + 1, height))
    assert np.array_equal(crops.full(), runtime_bool)
    near = np.abs(references - 0.5) < 1e-3
    assert np.array_equal(runtime_bool[~near], (references >= 0.5)[~near])
    assert runtime_bool.sum() > 500 and runtime_bool[1].any()
    # torchvision's padded, integer-box rule pastes other pixels.
    tv = paste_masks_in_image(torch.from_numpy(masks), torch.from_numpy(PASTE_BOXES), (height, width))[:, 0].numpy()
    assert ((tv > 0.5) != (references >= 0.5)).sum() > 20


def test_paste_skips_empty_boxes() -> None:
    masks = np.ones((2, 28, 28), np.float32)
    boxes = np.array([[5.0, 5, 5, 9], [3, 3, 9, 2]], np.float32)
    assert not paste_masks(masks, boxes, (16, 16), rule="detectron2").any()
    assert not detectron2_paste_masks_in_image(torch.from_numpy(masks), torch.from_numpy(boxes), (16, 16)).any()


# --- resize: data/transforms/augmentation_impl.py --------------------------------------------

@pytest.mark.parametrize("size, expected", [
    # 640 * 800 / 480 = 1066.67: detectron2 rounds to 1067, torchvision floors to 1066.
    ((480, 640), (800, 1067)),
    # 1000 * 800 / 300 = 2666.7 > 1333: scale 1333 / 2666.7 -> 399.9 x 1333 -> 400 x 1333.
    ((300, 1000), (400, 1333)),
    ((427, 640), (800, 1199)),  # 1199.06
    ((333, 500), (800, 1201)),  # 1201.2
    ((800, 800), (800, 800)),
])
def test_resize_rounding_is_detectron2s(size, expected) -> None:
    from maskrt.runtime.preprocess import detectron2_resized_size, resized_size

    assert detectron2_resized_size(size, 800, 1333) == expected
    # The runtime's rule, given an input that holds the result (800x1344, or larger).
    assert resized_size(size, (1344, 1344), "detectron2", 800, 1333) == expected


def test_runtime_resize_size_is_detectron2s_and_fits_a_small_input() -> None:
    from maskrt.runtime.preprocess import resized_size

    # 427x640 with (240, 400): 240 x 359.7 -> 240 x 360, padded to 256x384 (not stretched to it).
    assert resized_size((427, 640), (256, 384), "detectron2", 240, 400) == (240, 360)
    # torchvision's letterbox fills the input instead: min(256/427, 384/640) -> 255 x 383.
    assert resized_size((427, 640), (256, 384), "torchvision") == (255, 383)
    # An input smaller than detectron2's size: fitted, rounded half up (0.5995 * 427 = 255.98).
    assert resized_size((427, 640), (256, 384), "detectron2", 800, 1333) == (256, 384)


def pil_bilinear_reference(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """PIL's BILINEAR resize of a uint8 [h, w, C] image, which detectron2's ResizeTransform calls
    (data/transforms/transform.py lines 112-123), written from Pillow's libImaging/Resample.c:
    `precompute_coeffs` (per output pixel: scale = in/out, filterscale = max(scale, 1), support
    = filterscale, centre = (x + 0.5) scale, taps xmin = max(int(centre - support + 0.5), 0) ..
    min(int(centre + support + 0.5), in), weights triangle((i - centre + 0.5) / filterscale)
    normalised to sum 1), `normalize_coeffs_8bpc` (int(0.5 + w * 2^22)), then a horizontal pass
    and a vertical pass each on uint8: (sum k * p + 2^21) >> 22 clipped to 0..255. float64
    weights, int64 sums."""
    def coefficients(in_size: int, out_size: int) -> np.ndarray:
        scale = in_size / out_size
        filterscale = max(scale, 1.0)
        support = 1.0 * filterscale
        matrix = np.zeros((out_size, in_size), dtype=np.int64)
        for x in range(out_size):
            centre = (x + 0.5) * scale
            xmin = max(int(centre - support + 0.5), 0)
            xmax = min(int(centre + support + 0.5), in_size)
            taps = np.arange(xmin, xmax)
            weights = np.maximum(1.0 - np.abs((taps - centre + 0.5) / filterscale), 0.0)
            total = weights.sum()
            if total != 0.0:
                weights = weights / total
            matrix[x, xmin:xmax] = (0.5 + weights * (1 << 22)).astype(np.int64)
        return matrix

    def one_pass(pixels: np.ndarray, matrix: np.ndarray) -> np.ndarray:  # along axis 1 of [h, w, C]
        sums = np.einsum("ow,hwc->hoc", matrix, pixels.astype(np.int64)) + (1 << 21)
        return np.clip(sums >> 22, 0, 255).astype(np.uint8)

    h, w = image.shape[:2]
    out = image
    if new_w != w:
        out = one_pass(out, coefficients(w, new_w))
    if new_h != h:
        out = one_pass(out.transpose(1, 0, 2), coefficients(h, new_h)).transpose(1, 0, 2)
    return out


@pytest.mark.parametrize("new_size, short_long", [
    ((240, 360), (240, 400)),  # shrinking: PIL antialiases
    ((800, 1199), (800, 1333)),  # enlarging
    ((300, 640), None),  # one axis only (not a ResizeShortestEdge size: the resize alone)
])
def test_resize_pixels_are_pils_bilinear_on_uint8(new_size, short_long) -> None:
    """The runtime's letterbox and the model's resize under the detectron2 rule give PIL's
    bilinear pixels exactly."""
    from maskrt.model.transform import pil_bilinear_resize, resize_image
    from maskrt.runtime.commands import synthetic_shapes_image
    from maskrt.runtime.preprocess import letterbox

    rng = np.random.default_rng(3)
    image = synthetic_shapes_image(427, 640, seed=2)
    image[:100, :160] = rng.integers(0, 256, (100, 160, 3), dtype=np.uint8)  # noise: every weight shows
    expected_bgr = pil_bilinear_reference(image, *new_size)
    expected_rgb = expected_bgr[..., ::-1].transpose(2, 0, 1)
    rgb = torch.from_numpy(image[..., ::-1].copy()).permute(2, 0, 1).float() / 255.0
    resized = pil_bilinear_resize(rgb, new_size)
    np.testing.assert_array_equal((resized.numpy() * 255).round().astype(np.uint8), expected_rgb)
    if short_long is not None:
        input_size = (-(-new_size[0] // 32) * 32, -(-new_size[1] // 32) * 32)
        chw, placed = letterbox(image, input_size, (0.485, 0.456, 0.406), "detectron2", *short_long)
        assert placed.resized_size == new_size
        np.testing.assert_array_equal(chw[:, :new_size[0], :new_size[1]], expected_rgb.astype(np.float32) * np.float32(1 / 255))
        np.testing.assert_array_equal(resize_image(rgb, *short_long, "detectron2").numpy(), chw[:, :new_size[0], :new_size[1]])


def test_model_rejects_unknown_rules() -> None:
    from maskrt.errors import MaskrtError
    from maskrt.model.presets import build_model

    for key in ("anchor_rule", "selection_rule", "level_rule", "resize_rule", "paste_rule"):
        with pytest.raises(MaskrtError, match="detectron2"):
            build_model("edge", 3, **{key: "mmdet"})
    assert issubclass(MaskRCNN, torch.nn.Module)


def test_rules_survive_save_and_load(tmp_path) -> None:
    from maskrt.model.io import load_model, save_model
    from maskrt.model.presets import build_model

    rules = {key: "detectron2" for key in ("anchor_rule", "selection_rule", "level_rule", "resize_rule", "paste_rule")}
    save_model(build_model("edge", 3, **rules), tmp_path / "d2.safetensors")
    loaded = load_model(tmp_path / "d2.safetensors")
    assert (loaded.rpn.anchor_generator.rule, loaded.rpn.rule, loaded.roi_heads.selection_rule,
            loaded.roi_heads.box_roi_pool.level_rule, loaded.resize_rule, loaded.paste_rule) == ("detectron2",) * 6
    # A model without the keys (every file saved before they existed) keeps torchvision's rules.
    save_model(build_model("edge", 3), tmp_path / "tv.safetensors")
    plain = load_model(tmp_path / "tv.safetensors")
    assert "paste_rule" not in plain.config
    assert (plain.rpn.anchor_generator.rule, plain.rpn.rule, plain.roi_heads.mask_roi_pool.level_rule,
            plain.paste_rule) == ("torchvision",) * 4
    assert plain.roi_heads.box_roi_pool.op_canonical_scale == 112.0  # the edge preset's, untouched


# --- clipping to the image inside a padded input ---------------------------------------------
# torchvision clips proposals and detections to `ImageList.image_sizes`, the resized sizes before
# batching pads them (models/detection/rpn.py `filter_proposals`, roi_heads.py
# `postprocess_detections`); detectron2 likewise (proposal_generator/proposal_utils.py line 110
# `boxes.clip(image_size)`, roi_heads/fast_rcnn.py line 159 `boxes.clip(image_shape)`, with
# `images.image_sizes` from structures/image_list.py `from_tensors`). The exported graph has one
# input, the padded batch: it reads each image's size from the image_mean padding.

def test_content_sizes_read_the_padding() -> None:
    from maskrt.model.transform import batch_images, content_sizes

    mean = (0.485, 0.456, 0.406)
    rng = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 50, 70, generator=rng), torch.rand(3, 64, 96, generator=rng), torch.rand(3, 1, 1, generator=rng)]
    batch = batch_images(images, mean)  # [3, 3, 64, 96]
    fill = torch.tensor(mean).view(1, 3, 1, 1)
    assert content_sizes(batch, fill).tolist() == [[50, 70], [64, 96], [1, 1]]
    # One channel of one pixel in the last row/column is enough to count it.
    batch[0, :, 49, :] = fill[0, :, 0]
    batch[0, 2, 49, 3] = 0.0
    assert content_sizes(batch, fill)[0].tolist() == [50, 70]
    # An image equal to the mean everywhere counts as the whole input.
    assert content_sizes(fill.expand(1, 3, 64, 96), fill).tolist() == [[64, 96]]


def test_detect_batch_clips_to_the_content_as_eager_does() -> None:
    """detect_batch on a padded batch (what the graph runs) clips as with the true sizes given,
    and differs from clipping to the padded input (the graph's old rule)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_model import TINY

    from maskrt.model import build_model
    from maskrt.model.transform import batch_images

    torch.manual_seed(0)
    model = build_model("edge", num_classes=3, **{**TINY, "box_detections_per_img": 30}).eval()
    rng = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 70, 90, generator=rng), torch.rand(3, 96, 60, generator=rng)]
    batch = batch_images(images, model.image_mean)  # 96x96
    sizes = torch.tensor([[70, 90], [96, 60]])
    padded = torch.tensor([[96, 96], [96, 96]])
    with torch.no_grad():
        derived = model.detect_batch(batch)
        given = model.detect_batch(batch, sizes)
        old = model.detect_batch(batch, padded)
    for a, b in zip(derived, given):
        assert torch.equal(a, b)
    boxes, count = derived[1], derived[0]
    for index, (h, w) in enumerate(sizes.tolist()):
        kept = boxes[index, :int(count[index])]
        assert float(kept[:, 0::2].max()) <= w and float(kept[:, 1::2].max()) <= h
    assert not torch.equal(derived[1], old[1])


def test_runtime_metadata_carries_the_resize_rule() -> None:
    from maskrt.errors import MaskrtError
    from maskrt.runtime.metadata import parse_metadata

    base = {"class_names": '["__background__", "a"]', "input_size": "[256, 384]", "image_mean": "[0.4, 0.4, 0.4]"}
    info = parse_metadata(base, "old.onnx")  # graphs exported before the keys: torchvision's letterbox
    assert (info.resize_rule, info.min_size, info.max_size) == ("torchvision", 0, 0)
    info = parse_metadata({**base, "resize_rule": "detectron2", "min_size": "240", "max_size": "400"}, "d2.onnx")
    assert (info.resize_rule, info.min_size, info.max_size) == ("detectron2", 240, 400)
    with pytest.raises(MaskrtError, match="needs 'min_size' and 'max_size'"):
        parse_metadata({**base, "resize_rule": "detectron2"}, "d2.onnx")
    with pytest.raises(MaskrtError, match="resize_rule"):
        parse_metadata({**base, "resize_rule": "pil"}, "x.onnx")
