"""Box math, the box coder, NMS and anchors against NumPy references written from their descriptions."""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from maskrt.errors import MaskrtError
from maskrt.model.ops import (
    AnchorGenerator,
    BoxCoder,
    batched_nms,
    box_area,
    box_iou,
    clip_boxes_to_image,
    nms,
    remove_small_boxes,
)


def _random_boxes(rng: np.random.Generator, count: int, extent: float = 100.0, max_side: float = 40.0) -> np.ndarray:
    xy = rng.uniform(0, extent, size=(count, 2))
    wh = rng.uniform(0.5, max_side, size=(count, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def _iou_ref(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else float("nan")


def nms_ref(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS, one box at a time: the textbook loop."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        if all(not (_iou_ref(boxes[i], boxes[j]) > threshold) for j in keep):
            keep.append(i)
    return keep


def batched_nms_ref(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float) -> list[int]:
    keep: list[int] = []
    for g in np.unique(groups):
        members = np.where(groups == g)[0]
        keep += [int(members[i]) for i in nms_ref(boxes[members], scores[members], threshold)]
    return sorted(keep, key=lambda i: -scores[i])


# ---------------------------------------------------------------- box math
def test_box_area_iou_match_reference():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 7), _random_boxes(rng, 5)
    np.testing.assert_allclose(box_area(torch.tensor(a)).numpy(), (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))
    expected = np.array([[_iou_ref(x, y) for y in b] for x in a])
    np.testing.assert_allclose(box_iou(torch.tensor(a), torch.tensor(b)).numpy(), expected, rtol=1e-12)
    # Known values: identical boxes 1, half-overlapping 1/3, disjoint 0.
    iou = box_iou(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[0.0, 0, 10, 10], [5.0, 0, 15, 10], [20.0, 20, 30, 30]]))
    torch.testing.assert_close(iou, torch.tensor([[1.0, 1 / 3, 0.0]]))
    # float16 areas are computed in float32 (65504 would overflow half).
    assert box_area(torch.tensor([[0, 0, 1000, 1000]], dtype=torch.float16)).item() == 1e6


def test_clip_and_remove_small():
    boxes = torch.tensor([[-5.0, -3.0, 50.0, 70.0], [10.0, 10.0, 12.0, 30.0], [1.0, 2.0, 3.0, 4.0]])
    clipped = clip_boxes_to_image(boxes, (60, 40))  # (height, width)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 40.0, 60.0], [10.0, 10.0, 12.0, 30.0], [1.0, 2.0, 3.0, 4.0]]))
    assert clip_boxes_to_image(boxes[None].expand(2, 3, 4), (60, 40)).shape == (2, 3, 4)
    assert remove_small_boxes(boxes, 2.0).tolist() == [0, 1, 2]
    assert remove_small_boxes(boxes, 2.5).tolist() == [0]


def test_box_coder_matches_formulas_and_round_trips():
    rng = np.random.default_rng(1)
    proposals, gt = _random_boxes(rng, 6), _random_boxes(rng, 6)
    weights = (10.0, 10.0, 5.0, 5.0)
    coder = BoxCoder(weights)
    deltas = coder.encode_single(torch.tensor(gt), torch.tensor(proposals)).numpy()
    pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    expected = np.stack([
        10 * ((gt[:, 0] + gw / 2) - (proposals[:, 0] + pw / 2)) / pw,
        10 * ((gt[:, 1] + gh / 2) - (proposals[:, 1] + ph / 2)) / ph,
        5 * np.log(gw / pw), 5 * np.log(gh / ph)], axis=1)
    np.testing.assert_allclose(deltas, expected, rtol=1e-12)
    decoded = coder.decode(torch.tensor(deltas), [torch.tensor(proposals[:4]), torch.tensor(proposals[4:])])
    assert decoded.shape == (6, 1, 4)
    np.testing.assert_allclose(decoded[:, 0].numpy(), gt, rtol=1e-10)
    # List form of encode returns per-image tuples.
    parts = coder.encode([torch.tensor(gt[:2]), torch.tensor(gt[2:])], [torch.tensor(proposals[:2]), torch.tensor(proposals[2:])])
    assert [p.shape[0] for p in parts] == [2, 4]
    # Class-specific deltas [K, 4*C] and batched [B,N,4*C] decode alike; dw is clipped.
    codes = torch.zeros(2, 3, 8, dtype=torch.float64)
    codes[..., 6] = 100.0  # class 1's dw: clipped to log(1000/16)
    anchors = torch.tensor(proposals[:6]).view(2, 3, 4)
    out = coder.decode_single(codes, anchors)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out[..., :4], anchors)
    width = anchors[..., 2] - anchors[..., 0]
    torch.testing.assert_close(out[..., 6] - out[..., 4], width * 1000 / 16)


# ---------------------------------------------------------------- NMS
@pytest.fixture(params=["native", "pytorch"])
def nms_path(request, monkeypatch):
    """Runs a test twice: float32 CPU NMS on the native code, then on the PyTorch fallback.
    Both must meet the same references."""
    module = importlib.import_module("maskrt.model.ops.nms")
    if request.param == "native":
        from maskrt.model.ops import native_cpu

        if not native_cpu.nms_enabled():
            pytest.skip("no C++ compiler: the native NMS is not built")
    monkeypatch.setattr(module, "_NATIVE_CPU", request.param == "native")
    return request.param


@pytest.mark.usefixtures("nms_path")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_reference(dtype, threshold):
    rng = np.random.default_rng(int(threshold * 10))
    boxes = _random_boxes(rng, 200)
    scores = rng.permutation(200) / 200.0  # distinct scores
    keep = nms(torch.tensor(boxes, dtype=dtype), torch.tensor(scores, dtype=dtype), threshold)
    assert keep.dtype == torch.int64
    expected = nms_ref(boxes, scores, threshold)
    assert keep.tolist() == expected
    assert 20 < len(expected) < 200  # suppression actually happens


@pytest.mark.usefixtures("nms_path")
def test_nms_edge_cases():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    # IoU exactly at the threshold does not suppress (strict >); two empty boxes never do (0/0).
    boxes = torch.tensor([[0.0, 0, 10, 10], [5.0, 0, 15, 10], [3.0, 3, 3, 3], [3.0, 3, 3, 3]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 1 / 3).tolist() == [0, 1, 2, 3]
    assert nms(boxes, scores, 0.33).tolist() == [0, 2, 3]
    with pytest.raises(MaskrtError, match="Tensor\\[N\\]"):
        nms(boxes, scores[:2], 0.5)


@pytest.mark.usefixtures("nms_path")
def test_batched_nms_matches_per_group_reference():
    rng = np.random.default_rng(5)
    boxes = _random_boxes(rng, 150)
    scores = rng.permutation(150) / 150.0
    groups = rng.integers(0, 4, size=150)
    keep = batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(groups), 0.5)
    assert keep.tolist() == batched_nms_ref(boxes, scores, groups, 0.5)
    # Identical boxes in different groups both survive; in the same group one does.
    same = torch.tensor([[0.0, 0, 10, 10]] * 2)
    assert sorted(batched_nms(same, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5).tolist()) == [0, 1]
    assert batched_nms(same, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), 0.5).tolist() == [0]


def test_native_nms_keeps_the_boxes_of_the_pytorch_path(monkeypatch):
    """RPN-like input (5 levels as groups, heavy overlap, tied scores, NaN and empty boxes, float32
    IoUs near the threshold): the native NMS and the fallback keep the same indices in the same
    order, also when cut at max_keep, and through nms_padded."""
    from maskrt.model.ops import native_cpu, nms_padded

    if not native_cpu.nms_enabled():
        pytest.skip("no C++ compiler: the native NMS is not built")
    module = importlib.import_module("maskrt.model.ops.nms")
    rng = np.random.default_rng(11)
    count = 3000
    boxes = torch.tensor(_random_boxes(rng, count, extent=200.0, max_side=60.0), dtype=torch.float32)
    boxes[::97] = float("nan")
    boxes[5::89, 2:] = boxes[5::89, :2]  # empty boxes
    scores = torch.tensor(rng.integers(0, 400, size=count) / 400.0, dtype=torch.float32)  # many ties
    groups = torch.tensor(rng.integers(0, 5, size=count))
    # Pairs whose IoU is within float32 rounding of the threshold: a shifted copy at IoU ~ 0.7.
    boxes[1::50] = boxes[0::50][: boxes[1::50].shape[0]] + torch.tensor([3.0, 0.0, 3.0, 0.0])
    results = {}
    for path in ("native", "pytorch"):
        monkeypatch.setattr(module, "_NATIVE_CPU", path == "native")
        results[path] = (nms(boxes, scores, 0.7), batched_nms(boxes, scores, groups, 0.7),
                         batched_nms(boxes, scores, groups, 0.5, 100),
                         nms_padded(boxes[None], scores[None], groups[None], 0.7, 0.1, 1000))
    for native, fallback in zip(results["native"], results["pytorch"]):
        assert torch.equal(native, fallback)
    assert 100 < results["native"][1].numel() < count  # suppression happens, and the cut at 100 bites
    assert results["native"][2].numel() == 100


# ---------------------------------------------------------------- anchors
def test_anchor_count_seed_example():
    generator = AnchorGenerator()
    images = torch.zeros(1, 3, 1024, 1024)
    features = [torch.zeros(1, 1, 1024 // s, 1024 // s) for s in (4, 8, 16, 32, 64)]
    anchors = generator(images, features)
    assert anchors.shape == (261888, 4) == (3 * (256**2 + 128**2 + 64**2 + 32**2 + 16**2), 4)
    assert generator.num_anchors_per_location() == [3] * 5


def test_cell_anchors_use_torchvisions_rounding():
    generator = AnchorGenerator()
    # The well-known FPN cell anchors for size 32 (ratios 0.5, 1, 2 = h/w).
    torch.testing.assert_close(generator.cell_anchors[0], torch.tensor([[-23.0, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]]))
    for sizes, ratios, cells in zip(generator.sizes, generator.aspect_ratios, generator.cell_anchors):
        expected = []
        for r in ratios:
            for s in sizes:
                h, w = s * math.sqrt(r), s / math.sqrt(r)
                expected.append([-w / 2, -h / 2, w / 2, h / 2])
        # torch.round == NumPy round: halves to even.
        np.testing.assert_array_equal(cells.numpy(), np.round(np.array(expected, dtype=np.float32)))


def test_anchor_order_is_location_major():
    generator = AnchorGenerator(sizes=((16, 32),), aspect_ratios=((0.5, 1.0),))
    images = torch.zeros(2, 3, 64, 96)
    anchors = generator(images, [torch.zeros(2, 8, 4, 6)])
    stride_y, stride_x = 64 // 4, 96 // 6
    a = generator.num_anchors_per_location()[0]
    assert a == 4 and anchors.shape == (4 * 6 * 4, 4)
    cells = generator.cell_anchors[0]
    for y, x, c in [(0, 0, 0), (0, 1, 3), (2, 5, 1), (3, 5, 2)]:
        shift = torch.tensor([x * stride_x, y * stride_y, x * stride_x, y * stride_y], dtype=torch.float32)
        torch.testing.assert_close(anchors[(y * 6 + x) * a + c], cells[c] + shift)


def test_anchor_generator_rejects_level_mismatch():
    with pytest.raises(MaskrtError, match="levels"):
        AnchorGenerator()(torch.zeros(1, 3, 64, 64), [torch.zeros(1, 1, 16, 16)])
