"""Checkpoint import: torchvision and detectron2 Mask R-CNN R50-FPN -> our r50_fpn model.

The detectron2 checkpoint is synthesised here: its key names and shapes are written from
detectron2's source (modeling/backbone/resnet.py, fpn.py, proposal_generator/rpn.py,
roi_heads/box_head.py, fast_rcnn.py, mask_head.py), not read from our model, and its values
are random. References are plain torch.nn.functional calls on the detectron2 arrays.
"""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskrt.errors import MaskrtError
from maskrt.model.convert import (coco80_category_ids, coco80_class_names, coco91_class_names,
                                  from_detectron2, from_torchvision, load_detectron2_pickle,
                                  read_torchvision_state_dict)
from maskrt.model.presets import build_model

torch.set_num_threads(1)

# --- a detectron2 model-zoo checkpoint, from detectron2's source --------------------------

# ResNet-50 stages: (name, blocks, bottleneck width, output channels); BasicStem 64 channels.
D2_STAGES = (("res2", 3, 64, 256), ("res3", 4, 128, 512), ("res4", 6, 256, 1024), ("res5", 3, 512, 2048))
D2_NUM_CLASSES = 80  # ROI_HEADS.NUM_CLASSES; background is index 80 of cls_score
# Non-default pixel statistics (BGR, 0-255) prove the converter reads the checkpoint's own.
D2_PIXEL_MEAN_BGR = (101.0, 112.0, 125.0)
D2_PIXEL_STD_BGR = (57.0, 58.0, 59.0)
# Old detectron2 checkpoints carry the RPN's cell anchors: size 32, aspect ratios (h/w) 0.5, 1, 2
# give w x h = 45.2548 x 22.6274, 32 x 32, 22.6274 x 45.2548 (sqrt(2048) = 45.2548), unrounded.
D2_CELL_ANCHORS_32 = np.array([[-22.6274, -11.3137, 22.6274, 11.3137], [-16, -16, 16, 16],
                               [-11.3137, -22.6274, 11.3137, 22.6274]], np.float32)
DOG = 16  # detectron2's contiguous COCO class 16 is "dog" (COCO category id 18)


def detectron2_shapes() -> dict[str, tuple[int, ...]]:
    """Every entry of a detectron2 Mask R-CNN R50-FPN state dict, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_with_frozen_bn(prefix: str, out_channels: int, in_channels: int, kernel: int) -> None:
        # detectron2 `Conv2d(..., bias=False, norm=FrozenBatchNorm2d)`: the norm is a submodule.
        shapes[f"{prefix}.weight"] = (out_channels, in_channels, kernel, kernel)
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.norm.{field}"] = (out_channels,)

    def conv_with_bias(prefix: str, out_channels: int, in_channels: int, kernel: int) -> None:
        shapes[f"{prefix}.weight"] = (out_channels, in_channels, kernel, kernel)
        shapes[f"{prefix}.bias"] = (out_channels,)

    conv_with_frozen_bn("backbone.bottom_up.stem.conv1", 64, 3, 7)
    in_channels = 64
    for stage, blocks, width, out_channels in D2_STAGES:
        for index in range(blocks):
            prefix = f"backbone.bottom_up.{stage}.{index}"
            if index == 0:  # in_channels != out_channels: a projection shortcut
                conv_with_frozen_bn(f"{prefix}.shortcut", out_channels, in_channels, 1)
            conv_with_frozen_bn(f"{prefix}.conv1", width, in_channels, 1)
            conv_with_frozen_bn(f"{prefix}.conv2", width, width, 3)
            conv_with_frozen_bn(f"{prefix}.conv3", out_channels, width, 1)
            in_channels = out_channels
    for level, (_, _, _, channels) in zip(range(2, 6), D2_STAGES):
        conv_with_bias(f"backbone.fpn_lateral{level}", 256, channels, 1)
        conv_with_bias(f"backbone.fpn_output{level}", 256, 256, 3)
    conv_with_bias("proposal_generator.rpn_head.conv", 256, 256, 3)
    conv_with_bias("proposal_generator.rpn_head.objectness_logits", 3, 256, 1)
    conv_with_bias("proposal_generator.rpn_head.anchor_deltas", 12, 256, 1)
    shapes["roi_heads.box_head.fc1.weight"] = (1024, 256 * 7 * 7)
    shapes["roi_heads.box_head.fc1.bias"] = (1024,)
    shapes["roi_heads.box_head.fc2.weight"] = (1024, 1024)
    shapes["roi_heads.box_head.fc2.bias"] = (1024,)
    shapes["roi_heads.box_predictor.cls_score.weight"] = (D2_NUM_CLASSES + 1, 1024)
    shapes["roi_heads.box_predictor.cls_score.bias"] = (D2_NUM_CLASSES + 1,)
    shapes["roi_heads.box_predictor.bbox_pred.weight"] = (D2_NUM_CLASSES * 4, 1024)
    shapes["roi_heads.box_predictor.bbox_pred.bias"] = (D2_NUM_CLASSES * 4,)
    for index in range(1, 5):
        conv_with_bias(f"roi_heads.mask_head.mask_fcn{index}", 256, 256, 3)
    shapes["roi_heads.mask_head.deconv.weight"] = (256, 256, 2, 2)  # ConvTranspose2d: [in, out, k, k]
    shapes["roi_heads.mask_head.deconv.bias"] = (256,)
    conv_with_bias("roi_heads.mask_head.predictor", D2_NUM_CLASSES, 256, 1)
    return shapes


def detectron2_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 values at a sane scale (unit-variance convs, positive variances), so a
    forward pass stays finite; the dog logit bias dominates every RoI's scores."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for key, shape in detectron2_shapes().items():
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key.endswith("norm.weight"):
            value = rng.uniform(0.2, 0.6, shape).astype(np.float32)
        elif len(shape) > 1:
            fan_in = int(np.prod(shape[1:])) if "deconv" not in key else shape[0]
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(fan_in))
        else:
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
        arrays[key] = value
    arrays["roi_heads.box_predictor.cls_score.bias"][DOG] = 25.0
    return arrays


@pytest.fixture(scope="module")
def d2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A model-zoo style .pkl: {"model": {name: array}, "__author__": ..., "matching_heuristics": ...}."""
    arrays = detectron2_arrays()
    model_dict: dict[str, np.ndarray] = OrderedDict(arrays)
    model_dict["pixel_mean"] = np.array(D2_PIXEL_MEAN_BGR, np.float32).reshape(3, 1, 1)
    model_dict["pixel_std"] = np.array(D2_PIXEL_STD_BGR, np.float32).reshape(3, 1, 1)
    for level in range(5):  # sizes 32, 64, ..., 512
        model_dict[f"proposal_generator.anchor_generator.cell_anchors.{level}"] = D2_CELL_ANCHORS_32 * 2**level
    path = tmp_path_factory.mktemp("d2") / "model_final.pkl"
    with path.open("wb") as file:
        # Protocol 4 for speed; the unpickler test below covers protocols 0, 2, 4 and 5.
        pickle.dump({"model": model_dict, "__author__": "Detectron2 Model Zoo",
                     "matching_heuristics": True}, file, protocol=4)
    return path, arrays


@pytest.fixture(scope="module")
def d2_model(d2_checkpoint):
    path, _ = d2_checkpoint
    # Fewer proposals and detections than detectron2's 1000 / 100 keep the forward pass fast.
    return from_detectron2(path, rpn_post_nms_top_n_test=50, box_detections_per_img=10)


def test_d2_every_entry_lands_in_exactly_one_model_tensor(d2_model, d2_checkpoint) -> None:
    _, arrays = d2_checkpoint
    state = d2_model.state_dict()
    # Every model tensor's sum is the sum of one distinct d2 array: flips, row permutations
    # and zero background blocks keep sums, and random arrays have distinct sums.
    remaining = {key: float(value.astype(np.float64).sum()) for key, value in arrays.items()}
    for key, tensor in state.items():
        total = float(tensor.double().sum())
        match = [d2_key for d2_key, d2_sum in remaining.items() if abs(d2_sum - total) <= 1e-6 * (1 + abs(d2_sum))]
        assert len(match) == 1, f"{key}: {len(match)} detectron2 arrays have its sum"
        del remaining[match[0]]
    assert remaining == {}, f"detectron2 arrays not consumed: {list(remaining)[:5]}"
    assert sum(t.numel() for t in state.values()) == (
        sum(a.size for a in arrays.values()) + 4 * 1024 + 4 + 256 + 1)  # the zero background blocks


@pytest.mark.parametrize("d2_key, our_key", [
    ("backbone.bottom_up.res4.5.conv2.norm.running_var", "backbone.body.layer3.5.bn2.running_var"),
    ("backbone.bottom_up.res3.0.shortcut.weight", "backbone.body.layer2.0.downsample.0.weight"),
    ("backbone.bottom_up.res5.0.shortcut.norm.bias", "backbone.body.layer4.0.downsample.1.bias"),
    ("backbone.bottom_up.stem.conv1.norm.weight", "backbone.body.bn1.weight"),
    ("backbone.fpn_lateral5.weight", "backbone.fpn.inner_blocks.3.0.weight"),
    ("backbone.fpn_output2.bias", "backbone.fpn.layer_blocks.0.0.bias"),
    ("proposal_generator.rpn_head.conv.weight", "rpn.head.conv.0.0.weight"),
    ("proposal_generator.rpn_head.objectness_logits.weight", "rpn.head.cls_logits.weight"),
    ("proposal_generator.rpn_head.anchor_deltas.bias", "rpn.head.bbox_pred.bias"),
    ("roi_heads.box_head.fc1.weight", "roi_heads.box_head.fc6.weight"),
    ("roi_heads.box_head.fc2.bias", "roi_heads.box_head.fc7.bias"),
    ("roi_heads.mask_head.mask_fcn3.weight", "roi_heads.mask_head.2.0.weight"),
    ("roi_heads.mask_head.deconv.weight", "roi_heads.mask_predictor.conv5_mask.weight"),
])
def test_d2_names_map_to_torchvision_names(d2_model, d2_checkpoint, d2_key: str, our_key: str) -> None:
    _, arrays = d2_checkpoint
    assert torch.equal(d2_model.state_dict()[our_key], torch.from_numpy(arrays[d2_key]))


def test_d2_settings_and_classes(d2_model) -> None:
    config = d2_model.config
    assert config["stride_in_1x1"] is True
    assert d2_model.backbone.body.layer2[0].conv1.stride == (2, 2)  # stride in the 1x1 conv
    assert d2_model.backbone.body.layer2[0].conv2.stride == (1, 1)
    assert config["roi_aligned"] is True
    assert config["box_sampling_ratio"] == 0 and config["mask_sampling_ratio"] == 0
    assert config["rpn_post_nms_top_n_test"] == 50  # the overrides win over detectron2's 1000 / 100
    assert config["box_detections_per_img"] == 10
    assert config["rpn_pre_nms_top_n_test"] == 1000 and config["rpn_nms_thresh"] == 0.7
    assert config["box_score_thresh"] == 0.05 and config["box_nms_thresh"] == 0.5
    # The checkpoint's pixel_mean/pixel_std (BGR, 0-255) as RGB [0, 1].
    np.testing.assert_allclose(config["image_mean"], [125.0 / 255, 112.0 / 255, 101.0 / 255], rtol=1e-6)
    np.testing.assert_allclose(config["image_std"], [59.0 / 255, 58.0 / 255, 57.0 / 255], rtol=1e-6)
    assert len(d2_model.class_names) == 81 and d2_model.class_names[0] == "__background__"
    assert d2_model.class_names[DOG + 1] == "dog" and d2_model.category_ids[DOG + 1] == 18
    assert d2_model.class_names[80] == "toothbrush" and d2_model.category_ids[80] == 90


def test_d2_class_permutation_in_predictors(d2_model, d2_checkpoint) -> None:
    """detectron2's class j (background last) is our label j+1 (background first)."""
    _, arrays = d2_checkpoint
    d2 = {key: torch.from_numpy(value).double() for key, value in arrays.items()}
    features = torch.randn(5, 1024, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    predictor = d2_model.roi_heads.box_predictor.double()
    ours_logits, ours_deltas = predictor(features)
    d2_logits = F.linear(features, d2["roi_heads.box_predictor.cls_score.weight"],
                         d2["roi_heads.box_predictor.cls_score.bias"])
    d2_deltas = F.linear(features, d2["roi_heads.box_predictor.bbox_pred.weight"],
                         d2["roi_heads.box_predictor.bbox_pred.bias"])
    torch.testing.assert_close(ours_logits[:, 1:], d2_logits[:, :80], rtol=0, atol=1e-10)
    torch.testing.assert_close(ours_logits[:, 0], d2_logits[:, 80], rtol=0, atol=1e-10)
    torch.testing.assert_close(ours_logits.softmax(-1)[:, 1:], d2_logits.softmax(-1)[:, :80])
    torch.testing.assert_close(ours_deltas.reshape(5, 81, 4)[:, 1:], d2_deltas.reshape(5, 80, 4),
                               rtol=0, atol=1e-10)
    assert torch.count_nonzero(ours_deltas.reshape(5, 81, 4)[:, 0]) == 0

    mask_features = torch.randn(2, 256, 14, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours_masks = d2_model.roi_heads.mask_predictor.double()(mask_features)
    hidden = F.relu(F.conv_transpose2d(mask_features, d2["roi_heads.mask_head.deconv.weight"],
                                       d2["roi_heads.mask_head.deconv.bias"], stride=2))
    d2_masks = F.conv2d(hidden, d2["roi_heads.mask_head.predictor.weight"], d2["roi_heads.mask_head.predictor.bias"])
    torch.testing.assert_close(ours_masks[:, 1:], d2_masks, rtol=0, atol=1e-10)
    d2_model.float()


def test_d2_bgr_flip_and_end_to_end_labels(d2_model, d2_checkpoint) -> None:
    """On an RGB [0,1] image, our stem conv output equals detectron2's stem conv on the same
    image as BGR 0-255 normalised with the checkpoint's pixel_mean/pixel_std; and the
    dominant detectron2 class (16, "dog") comes out as our label 17."""
    _, arrays = d2_checkpoint
    rng = np.random.default_rng(3)
    image_bgr = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # what OpenCV gives
    rgb01 = torch.from_numpy(image_bgr[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255.0

    bgr = torch.from_numpy(image_bgr).permute(2, 0, 1).double()[None]
    normalised = (bgr - torch.tensor(D2_PIXEL_MEAN_BGR, dtype=torch.float64).reshape(1, 3, 1, 1)) \
        / torch.tensor(D2_PIXEL_STD_BGR, dtype=torch.float64).reshape(1, 3, 1, 1)
    reference = F.conv2d(normalised, torch.from_numpy(arrays["backbone.bottom_up.stem.conv1.weight"]).double(),
                         stride=2, padding=3)

    captured: list[torch.Tensor] = []
    hook = d2_model.backbone.body.conv1.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            num_dets, boxes, scores, labels, masks = d2_model.detect_batch(rgb01[None])
    finally:
        hook.remove()
    assert len(captured) == 1
    torch.testing.assert_close(captured[0].double(), reference, rtol=1e-4, atol=1e-4)

    count = int(num_dets[0])
    assert count > 0
    assert torch.all(labels[0, :count] == DOG + 1)
    assert d2_model.class_names[int(labels[0, 0])] == "dog"
    assert torch.all(scores[0, :count] > 0.99)


def test_d2_pth_gives_the_same_model(d2_model, d2_checkpoint, tmp_path: Path) -> None:
    _, arrays = d2_checkpoint
    model_dict = {key: torch.from_numpy(value) for key, value in arrays.items()}
    model_dict["pixel_mean"] = torch.tensor(D2_PIXEL_MEAN_BGR).reshape(3, 1, 1)
    model_dict["pixel_std"] = torch.tensor(D2_PIXEL_STD_BGR).reshape(3, 1, 1)
    path = tmp_path / "model_final.pth"
    torch.save({"model": model_dict, "iteration": 90000}, path)
    converted = from_detectron2(path)
    assert converted.config["rpn_post_nms_top_n_test"] == 1000  # detectron2's POST_NMS_TOPK_TEST
    assert converted.config["box_detections_per_img"] == 100  # TEST.DETECTIONS_PER_IMAGE
    expected = d2_model.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    for key, value in converted.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert converted.config["image_mean"] == d2_model.config["image_mean"]


def test_d2_model_survives_save_and_load(d2_model, tmp_path: Path) -> None:
    from maskrt.model.io import load_model, save_model
    save_model(d2_model, tmp_path / "d2.safetensors")
    loaded = load_model(tmp_path / "d2.safetensors")
    assert loaded.class_names == d2_model.class_names
    assert loaded.category_ids == d2_model.category_ids == coco80_category_ids()
    assert loaded.config["image_mean"] == d2_model.config["image_mean"]
    assert loaded.config["stride_in_1x1"] is True and loaded.config["roi_aligned"] is True
    for key, value in d2_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def _small_d2_pickle(path: Path, model_dict: dict, protocol: int = 4) -> Path:
    with path.open("wb") as file:
        pickle.dump({"model": model_dict, "__author__": "test"}, file, protocol=protocol)
    return path


def test_d2_missing_and_unknown_keys_are_one_line(d2_checkpoint, tmp_path: Path) -> None:
    _, arrays = d2_checkpoint
    broken = dict(arrays)
    del broken["backbone.bottom_up.res3.2.conv2.norm.running_mean"]
    broken["backbone.bottom_up.res4.6.conv1.weight"] = np.zeros((256, 1024, 1, 1), np.float32)  # an R-101 block
    path = _small_d2_pickle(tmp_path / "broken.pkl", broken)
    with pytest.raises(MaskrtError) as error:
        from_detectron2(path)
    message = str(error.value)
    assert "\n" not in message
    assert "backbone.body.layer2.2.bn2.running_mean" in message
    assert "backbone.bottom_up.res4.6.conv1.weight" in message


def test_d2_class_agnostic_heads_repeat_per_class(d2_checkpoint, tmp_path: Path) -> None:
    """CLS_AGNOSTIC_BBOX_REG / CLS_AGNOSTIC_MASK: one 4-row box head and one mask channel,
    used by detectron2 for every class, become the same rows for each of our labels 1..80."""
    _, arrays = d2_checkpoint
    model_dict = dict(arrays)
    for field in ("weight", "bias"):
        model_dict[f"roi_heads.box_predictor.bbox_pred.{field}"] = arrays[f"roi_heads.box_predictor.bbox_pred.{field}"][:4]
        model_dict[f"roi_heads.mask_head.predictor.{field}"] = arrays[f"roi_heads.mask_head.predictor.{field}"][:1]
    model = from_detectron2(_small_d2_pickle(tmp_path / "agnostic.pkl", model_dict))
    box_weight = model.roi_heads.box_predictor.bbox_pred.weight.reshape(81, 4, 1024)
    mask_bias = model.roi_heads.mask_predictor.mask_fcn_logits.bias
    agnostic_box_weight = torch.from_numpy(model_dict["roi_heads.box_predictor.bbox_pred.weight"])
    for label in (1, 17, 80):
        assert torch.equal(box_weight[label], agnostic_box_weight)
        assert mask_bias[label] == float(model_dict["roi_heads.mask_head.predictor.bias"][0])
    assert torch.count_nonzero(box_weight[0]) == 0 and mask_bias[0] == 0


def test_d2_cell_anchors_are_checked(d2_checkpoint, tmp_path: Path) -> None:
    _, arrays = d2_checkpoint
    # The anchors are checked before anything else is converted: the class count is all else it needs.
    model_dict = {key: arrays[key] for key in ("roi_heads.box_predictor.cls_score.weight",)}
    model_dict["proposal_generator.anchor_generator.cell_anchors.0"] = D2_CELL_ANCHORS_32 * 1.25  # size 40
    with pytest.raises(MaskrtError, match=r"cell_anchors\.0 .* sizes \[32\].*anchor_sizes"):
        from_detectron2(_small_d2_pickle(tmp_path / "anchors.pkl", model_dict))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_unpickler_reads_numpy_arrays(tmp_path: Path, protocol: int) -> None:
    arrays = OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.array([1.5, -2.0]))
    data = load_detectron2_pickle(_small_d2_pickle(tmp_path / "small.pkl", arrays, protocol))
    assert data["__author__"] == "test"
    np.testing.assert_array_equal(data["model"]["a"], arrays["a"])
    np.testing.assert_array_equal(data["model"]["b"], arrays["b"])


class _RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _small_d2_pickle(tmp_path / "evil.pkl", {"x": _RunsAShellCommand(marker)})
    # Sanity: the plain unpickler would run the command.
    with path.open("rb") as file:
        pickle.load(file)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(MaskrtError, match=r"refusing to unpickle global (posix|os|nt)\.system"):
        from_detectron2(path)
    assert not marker.exists()


def test_d2_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "caffe2.pkl"
    with path.open("wb") as file:
        pickle.dump({"blobs": {"conv1_w": np.zeros(3)}}, file)
    with pytest.raises(MaskrtError, match="no 'model' state dict"):
        from_detectron2(path)
    with pytest.raises(MaskrtError, match="not found"):
        from_detectron2(tmp_path / "absent.pkl")


# --- torchvision ---------------------------------------------------------------------------

# Fewer proposals and detections than torchvision's 1000 / 100 keep the forward pass fast.
FAST = {"rpn_post_nms_top_n_test": 50, "box_detections_per_img": 5}


def _randomised_r50_fpn(seed: int):
    """Our r50_fpn model for 91 classes with every tensor random (a stand-in for trained
    torchvision weights); its state dict is a torchvision-layout state dict."""
    model = build_model("r50_fpn", 91, **FAST)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                fan_in = max(1, tensor[0].numel()) if tensor.ndim > 1 else 400
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in ** 0.5)
        # One confident class, so that detections (and their masks) exist to compare.
        model.roi_heads.box_predictor.cls_score.bias[1] = 10.0
    return model


def _legacy_torchvision_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names of torchvision < 0.13 checkpoints (torchvision's FPN, RPNHead and
    MaskRCNNHeads `_load_from_state_dict` rename these), plus BatchNorm counters."""
    legacy: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")):
            key = ".".join(parts[:4] + parts[5:])  # drop the Conv2dNormActivation index
        elif key.startswith("rpn.head.conv.0.0."):
            key = "rpn.head.conv." + parts[-1]
        elif key.startswith("roi_heads.mask_head."):
            key = f"roi_heads.mask_head.mask_fcn{int(parts[2]) + 1}.{parts[-1]}"
        legacy[key] = value
    legacy["backbone.body.bn1.num_batches_tracked"] = torch.tensor(0)
    return legacy


@pytest.fixture(scope="module")
def torchvision_reference():
    return _randomised_r50_fpn(seed=5).eval()


def test_torchvision_conversion_matches_direct_loading(torchvision_reference, tmp_path: Path) -> None:
    state = {key: value.clone() for key, value in torchvision_reference.state_dict().items()}
    legacy = _legacy_torchvision_names(state)
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn4.bias" in legacy
    assert "backbone.fpn.inner_blocks.2.weight" in legacy

    converted = from_torchvision(legacy, **FAST)
    assert converted.class_names == coco91_class_names()
    assert converted.class_names[1] == "person" and converted.class_names[12] == "N/A"
    assert converted.class_names[90] == "toothbrush" and converted.category_ids == list(range(91))
    assert converted.config["image_mean"] == [0.485, 0.456, 0.406]
    assert converted.config["roi_aligned"] is False and converted.config["box_sampling_ratio"] == 2

    image = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = torchvision_reference.detect_batch(image)
        got = converted.detect_batch(image)
    assert int(expected[0][0]) > 0
    for name, a, b in zip(("num_dets", "boxes", "scores", "labels", "masks"), expected, got):
        assert torch.equal(a, b), name

    # The same weights from files: .pth (weights only) and .safetensors.
    from safetensors.torch import save_file
    torch.save(legacy, tmp_path / "tv.pth")
    save_file(state, str(tmp_path / "tv.safetensors"))
    for path, saved in ((tmp_path / "tv.pth", legacy), (tmp_path / "tv.safetensors", state)):
        loaded = read_torchvision_state_dict(path)
        assert loaded.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(loaded[key], value), (path.suffix, key)


def test_torchvision_bad_keys_are_one_line(torchvision_reference) -> None:
    state = dict(torchvision_reference.state_dict())
    del state["backbone.body.layer1.0.conv2.weight"]
    state["roi_heads.box_head.fc8.weight"] = torch.zeros(3)
    with pytest.raises(MaskrtError) as error:
        from_torchvision(state)
    message = str(error.value)
    assert "\n" not in message
    assert "backbone.body.layer1.0.conv2.weight" in message and "roi_heads.box_head.fc8.weight" in message

    state = dict(torchvision_reference.state_dict())
    state["roi_heads.box_head.fc6.weight"] = torch.zeros(1024, 100)
    with pytest.raises(MaskrtError, match=r"roi_heads\.box_head\.fc6\.weight \(1024, 100\)"):
        from_torchvision(state)
    state = dict(torchvision_reference.state_dict())
    state["rpn.head.conv.weight"] = state["rpn.head.conv.0.0.weight"]  # legacy and current spelling
    with pytest.raises(MaskrtError, match=r"unexpected 1 key\(s\): rpn\.head\.conv\.weight"):
        from_torchvision(state)
    with pytest.raises(MaskrtError, match="pass num_classes=91"):
        from_torchvision(dict(torchvision_reference.state_dict()), num_classes=21)


def test_torchvision_refuses_a_pickled_object(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save({"model": _RunsAShellCommand(tmp_path / "pwned")}, path)
    with pytest.raises(MaskrtError, match="weights-only"):
        from_torchvision(path)
    assert not (tmp_path / "pwned").exists()


def test_coco80_ids_are_coco91_positions() -> None:
    names91 = coco91_class_names()
    for name, category_id in zip(coco80_class_names()[1:], coco80_category_ids()[1:]):
        assert names91[category_id] == name
    assert names91.count("N/A") == 10
