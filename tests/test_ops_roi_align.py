"""RoIAlign / RoIPool / multilevel pooling against independent references.

References: the seed-notes worked example, float64 NumPy loops written from the contract
(plugins/README.md "The MultilevelRoIAlign contract" and torchvision's C++ kernels as
described there), ONNX Runtime's own RoiAlign, and hand-assembled per-level picks.
"""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

# torchvision's bilinear rule, written once from the contract for every op's tests.
from test_plugin_reference import bilinear_sample

from maskrt.errors import MaskrtError
from maskrt.model.ops import (
    fpn_level,
    infer_spatial_scales,
    multi_scale_roi_align,
    multilevel_roi_align,
    multilevel_roi_pool,
    roi_align,
    roi_align_backward,
    roi_pool,
)


# ---------------------------------------------------------------- NumPy references (plain loops)
def roi_align_ref(feat: np.ndarray, rois: np.ndarray, out_h: int, out_w: int, scale: float, sampling: int, aligned: bool, mode: str = "avg") -> np.ndarray:
    """feat [N,C,H,W], rois [K,5] -> [K,C,out_h,out_w], float64, one RoI/bin/sample at a time."""
    feat = feat.astype(np.float64)
    out = np.zeros((len(rois), feat.shape[1], out_h, out_w))
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.astype(np.float64)):
        x0, y0 = x1 * scale - offset, y1 * scale - offset
        roi_w, roi_h = (x2 * scale - offset) - x0, (y2 * scale - offset) - y0
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        grid_h = sampling if sampling > 0 else max(int(math.ceil(roi_h / out_h)), 0)
        grid_w = sampling if sampling > 0 else max(int(math.ceil(roi_w / out_w)), 0)
        for ph in range(out_h):
            for pw in range(out_w):
                values = []
                for iy in range(grid_h):
                    y = y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        values.append(bilinear_sample(feat[int(b)], y, x))
                if not values:
                    continue
                if mode == "avg":
                    out[k, :, ph, pw] = np.sum(values, axis=0) / max(grid_h * grid_w, 1)
                else:
                    out[k, :, ph, pw] = np.max(values, axis=0)
    return out


def _c_round(v: float) -> int:
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def roi_pool_ref(feat: np.ndarray, rois: np.ndarray, out_h: int, out_w: int, scale: float) -> np.ndarray:
    """torchvision's RoIPool, written from its description, float64 loops."""
    _, channels, height, width = feat.shape
    out = np.zeros((len(rois), channels, out_h, out_w))
    for k, (b, x1, y1, x2, y2) in enumerate(rois.astype(np.float64)):
        sw, sh, ew, eh = (_c_round(v * scale) for v in (x1, y1, x2, y2))
        roi_w, roi_h = max(ew - sw + 1, 1), max(eh - sh + 1, 1)
        bin_h, bin_w = roi_h / out_h, roi_w / out_w
        for ph in range(out_h):
            for pw in range(out_w):
                h0 = min(max(int(math.floor(ph * bin_h)) + sh, 0), height)
                h1 = min(max(int(math.ceil((ph + 1) * bin_h)) + sh, 0), height)
                w0 = min(max(int(math.floor(pw * bin_w)) + sw, 0), width)
                w1 = min(max(int(math.ceil((pw + 1) * bin_w)) + sw, 0), width)
                if h1 <= h0 or w1 <= w0:
                    continue
                out[k, :, ph, pw] = feat[int(b), :, h0:h1, w0:w1].reshape(channels, -1).max(axis=1)
    return out


def _random_rois(rng: np.random.Generator, count: int, batch: int, extent: float) -> np.ndarray:
    """Random xyxy RoIs in [-0.2*extent, 1.2*extent] (some out of image), plus degenerate ones."""
    xy = rng.uniform(-0.2 * extent, 1.0 * extent, size=(count, 2))
    wh = rng.uniform(0.0, 0.6 * extent, size=(count, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[0] = [3.0, 3.0, 3.0, 3.0]                        # zero-size
    boxes[1] = [5.0, 4.0, 2.0, 1.0]                        # inverted
    boxes[2] = [-3 * extent, -3 * extent, -2 * extent, -2 * extent]  # entirely outside
    boxes[3] = [0.0, 0.0, extent, extent]                  # the whole map
    batch_index = rng.integers(0, batch, size=(count, 1)).astype(np.float64)
    return np.concatenate([batch_index, boxes], axis=1)


# ---------------------------------------------------------------- RoIAlign
@pytest.fixture(params=["native", "pytorch"])
def forward_path(request, monkeypatch):
    """Runs a test twice: float32 CPU forwards on the native kernel, then on the pure-PyTorch
    fallback. Both must meet the same references."""
    module = importlib.import_module("maskrt.model.ops.roi_align")
    if request.param == "native":
        from maskrt.model.ops import native_cpu

        if not native_cpu.enabled():
            pytest.skip("no C++ compiler: the native RoIAlign forward is not built")
    monkeypatch.setattr(module, "_NATIVE_CPU", request.param == "native")
    return request.param


@pytest.mark.usefixtures("forward_path")
def test_seed_worked_example():
    feature = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 4, 4)
    rois = torch.tensor([[0.0, 1.2, 0.8, 2.8, 2.2]])
    out = roi_align(feature, rois, output_size=2, spatial_scale=1.0, sampling_ratio=1, aligned=False)
    expected = torch.tensor([[7.2, 8.0], [10.0, 10.8]])
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-5)
    # The list-of-boxes form is the same RoI.
    out_list = roi_align(feature, [torch.tensor([[1.2, 0.8, 2.8, 2.2]])], 2, 1.0, 1)
    torch.testing.assert_close(out_list, out)


@pytest.mark.usefixtures("forward_path")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling", [0, 2, 3])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_matches_numpy_reference(dtype, aligned, sampling, mode):
    rng = np.random.default_rng(7 + sampling + 10 * aligned)
    feat = rng.standard_normal((2, 3, 9, 11))
    rois = _random_rois(rng, 10, batch=2, extent=22.0)
    scale = 0.5
    expected = roi_align_ref(feat, rois, 3, 4, scale, sampling, aligned, mode)
    out = roi_align(torch.tensor(feat, dtype=dtype), torch.tensor(rois, dtype=dtype), (3, 4), scale, sampling, aligned, mode)
    assert out.dtype == dtype and out.shape == (10, 3, 3, 4)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=tol, atol=tol)
    # The degenerate/outside RoIs are actually exercised, not trivially zero everywhere.
    assert np.abs(expected[3]).sum() > 0


@pytest.mark.usefixtures("forward_path")
def test_roi_align_float16_accumulates_in_float32():
    rng = np.random.default_rng(3)
    feat = rng.standard_normal((1, 4, 8, 8)).astype(np.float16)
    rois = _random_rois(rng, 6, batch=1, extent=8.0)
    expected = roi_align_ref(feat.astype(np.float64), rois.astype(np.float16).astype(np.float64), 2, 2, 1.0, 2, False)
    out = roi_align(torch.tensor(feat), torch.tensor(rois, dtype=torch.float16), 2, 1.0, 2, False)
    assert out.dtype == torch.float16
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("aligned,sampling,mode", [(False, 2, "avg"), (True, 0, "avg"), (False, 0, "max"), (True, 2, "max")])
def test_roi_align_gradcheck(aligned, sampling, mode):
    # The numerical Jacobian checks roi_align_backward (the op's explicit gradient).
    torch.manual_seed(0)
    feat = torch.randn(2, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 4.2, 3.9], [1, 1.1, 0.2, 5.6, 4.4], [1, -1.0, 2.0, 2.5, 6.5], [0, 2.0, 2.0, 2.0, 2.0]],
                        dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, 2, 1.0, sampling, aligned, mode), (feat,))
    grad = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    direct = roi_align_backward(grad, feat.detach(), rois, 1.0, sampling, aligned, mode)
    assert direct.abs().sum() > 0


def test_roi_pool_gradcheck():
    torch.manual_seed(1)
    feat = torch.randn(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.3, 0.7, 5.2, 3.9], [1, 1.1, 0.2, 6.6, 4.4], [1, -3.0, -2.0, -1.0, -1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_pool(f, rois, (2, 3), 1.0), (feat,))


@pytest.mark.parametrize("aligned,sampling", [(False, 2), (True, 2), (True, 0), (False, 0)])
def test_window_and_tap_forms_agree_with_reference(monkeypatch, aligned, sampling):
    """avg pooling has two forms (tap gather; window gather + separable weights): both must
    match the reference, forward and backward. Switching the window form off forces taps."""
    module = importlib.import_module("maskrt.model.ops.roi_align")
    rng = np.random.default_rng(17)
    feat = rng.standard_normal((2, 3, 12, 14))
    rois = _random_rois(rng, 16, batch=2, extent=28.0)
    rois[4] = [1, 2.0, 3.0, 27.0, 22.0]   # large: more cells than taps with sampling 2
    rois[5] = [0, 5.0, 5.0, 7.0, 6.5]     # small: fewer cells than taps
    rois5 = torch.tensor(rois)
    if sampling > 0:  # (adaptive grids make taps ~ 4x the cells: the window form wins them all)
        scaled = rois5 * torch.tensor([1, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
        plans = module._sample_plans(12, 14, 3, scaled, (2, 2), 1.0, sampling, aligned, "avg")
        assert {type(plan).__name__ for _, plan in plans} == {"_SamplePlan", "_WindowPlan"}
    expected = roi_align_ref(feat, rois, 2, 2, 0.5, sampling, aligned)
    grad_out = torch.tensor(rng.standard_normal((16, 3, 2, 2)))
    grads = []
    for window_form in (True, False):
        monkeypatch.setattr(module, "_WINDOW_FORM", window_form)
        leaf = torch.tensor(feat, requires_grad=True)
        out = roi_align(leaf, rois5, (2, 2), 0.5, sampling, aligned)
        np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
        out.backward(grad_out)
        grads.append(leaf.grad)
        one_channel = torch.tensor(feat[:, :1], requires_grad=True)
        assert torch.autograd.gradcheck(lambda f: roi_align(f, rois5[2:7], 2, 0.5, sampling, aligned), (one_channel,))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def _ort_roi_align(feat: np.ndarray, rois: np.ndarray, out_h: int, out_w: int, scale: float, sampling: int, aligned: bool) -> np.ndarray:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    node = helper.make_node(
        "RoiAlign", ["X", "rois", "batch_indices"], ["Y"], mode="avg", output_height=out_h, output_width=out_w,
        sampling_ratio=sampling, spatial_scale=scale,
        coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
    )
    graph = helper.make_graph(
        [node], "roi_align",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("rois", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("batch_indices", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 10  # ORT 1.31 reads IR <= 13; onnx 1.23 writes 14 by default
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": feat.astype(np.float32), "rois": rois[:, 1:].astype(np.float32),
                              "batch_indices": rois[:, 0].astype(np.int64)})[0]


@pytest.mark.usefixtures("forward_path")
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling", [0, 2])
def test_roi_align_matches_onnxruntime(aligned, sampling):
    rng = np.random.default_rng(11)
    feat = rng.standard_normal((2, 4, 12, 10)).astype(np.float32)
    rois = _random_rois(rng, 12, batch=2, extent=40.0)
    rois[1] = [0, 1.0, 2.0, 30.0, 20.0]  # ORT's contract excludes inverted boxes: not compared
    expected = _ort_roi_align(feat, rois, 5, 4, 0.25, sampling, aligned)
    out = roi_align(torch.tensor(feat), torch.tensor(rois, dtype=torch.float32), (5, 4), 0.25, sampling, aligned)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("forward_path")
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_roi_align_empty_and_chunked(monkeypatch, mode):
    torch.manual_seed(0)
    feat = torch.randn(1, 3, 6, 6, requires_grad=True)
    empty = roi_align(feat, torch.zeros(0, 5), 7, mode=mode)
    assert empty.shape == (0, 3, 7, 7) and roi_pool(feat, torch.zeros(0, 5), 7).shape == (0, 3, 7, 7)
    empty.sum().backward()  # no RoI: a zero gradient, not an error
    assert feat.grad.abs().sum() == 0
    feat = feat.detach()
    # Many RoIs with a tiny gather budget: the chunked (sorted, padded-grid) result equals
    # the one-chunk result, RoI for RoI in the caller's order.
    module = importlib.import_module("maskrt.model.ops.roi_align")
    rng = np.random.default_rng(5)
    rois = torch.tensor(_random_rois(rng, 40, batch=1, extent=24.0), dtype=torch.float32)
    whole = roi_align(feat, rois, 3, 0.25, 0, mode=mode)
    monkeypatch.setattr(module, "_GATHER_BUDGET", 3 * 3 * 4 * 3 * 5)  # a few RoIs per chunk
    chunked = roi_align(feat, rois, 3, 0.25, 0, mode=mode)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    expected = roi_align_ref(feat.double().numpy(), rois.double().numpy(), 3, 3, 0.25, 0, False, mode)
    np.testing.assert_allclose(chunked.double().numpy(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.usefixtures("forward_path")
def test_roi_align_bad_input_is_one_line_error():
    with pytest.raises(MaskrtError, match="Tensor\\[K,5\\]"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(3, 4), 2)
    with pytest.raises(MaskrtError, match="mode"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(3, 5), 2, mode="median")
    with pytest.raises(MaskrtError, match="batch indices"):
        roi_align(torch.zeros(2, 1, 4, 4), torch.tensor([[2.0, 0, 0, 1, 1]]), 2)
    with pytest.raises(MaskrtError, match="batch indices"):
        roi_pool(torch.zeros(2, 1, 4, 4), torch.tensor([[-1.0, 0, 0, 1, 1]]), 2)
    with pytest.raises(MaskrtError, match="N,C,H,W"):
        roi_align(torch.zeros(1, 4, 4), torch.zeros(3, 5), 2)


# ---------------------------------------------------------------- RoIPool
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_roi_pool_matches_numpy_reference(scale):
    rng = np.random.default_rng(2)
    feat = rng.standard_normal((2, 3, 10, 9))
    rois = _random_rois(rng, 12, batch=2, extent=9.0 / scale)
    rois[:, 1:] = np.round(rois[:, 1:] * 8) / 8  # exact in binary: C round() ties are deterministic
    expected = roi_pool_ref(feat, rois, 3, 2, scale)
    out = roi_pool(torch.tensor(feat), torch.tensor(rois), (3, 2), scale)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=0)
    out32 = roi_pool(torch.tensor(feat, dtype=torch.float32), torch.tensor(rois, dtype=torch.float32), (3, 2), scale)
    np.testing.assert_allclose(out32.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_roi_pool_rounds_half_away_from_zero_and_grads_argmax():
    feat = torch.arange(36, dtype=torch.float64).view(1, 1, 6, 6).requires_grad_()
    # x1*scale = 1.5 rounds to 2 (C round), not to 2 by luck: 2.5 -> 3 (torch.round would give 2).
    rois = torch.tensor([[0.0, 2.5, 0.5, 4.5, 3.0]], dtype=torch.float64)
    out = roi_pool(feat, rois, 1, 1.0)
    expected = roi_pool_ref(feat.detach().numpy(), rois.numpy(), 1, 1, 1.0)
    assert float(out.detach()) == float(expected.squeeze()) == 3 * 6 + 5
    out.sum().backward()
    assert feat.grad.sum() == 1 and feat.grad[0, 0, 3, 5] == 1


# ---------------------------------------------------------------- levels and multilevel pooling
def test_fpn_level_seed_examples():
    boxes = torch.tensor([[0, 0, 224, 224], [0, 0, 112, 112], [0, 0, 448, 448], [0, 0, 2, 3], [0, 0, 4000, 3000],
                          [10, 10, 10, 50], [5, 5, 1, 1], [0, 0, 111.9, 111.9], [0, 0, 223.9, 224]], dtype=torch.float32)
    levels = fpn_level(boxes, 2, 5)
    assert levels.dtype == torch.int64
    assert levels.tolist() == [4, 3, 5, 2, 5, 2, 2, 2, 3]


def test_infer_spatial_scales():
    shapes = [(1, 256, 200, 336), (1, 256, 100, 168), (1, 256, 50, 84), (1, 256, 25, 42)]
    assert infer_spatial_scales(shapes, (800, 1344)) == [0.25, 0.125, 0.0625, 0.03125]
    assert infer_spatial_scales([(13, 21)], (800, 1333)) == [1 / 64]


def _fpn_features(batch: int, channels: int, height: int, width: int, dtype=torch.float64) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(batch, channels, height // s, width // s, dtype=dtype) for s in (4, 8, 16, 32)]


def _mixed_size_rois(batch: int, per_image: int, seed: int) -> torch.Tensor:
    """[B,R,4] RoIs whose sizes span all four FPN levels (sqrt area from ~10 to ~600)."""
    rng = np.random.default_rng(seed)
    side = np.exp(rng.uniform(np.log(10), np.log(600), size=(batch, per_image, 2)))
    xy = rng.uniform(0, 256, size=(batch, per_image, 2))
    return torch.tensor(np.concatenate([xy, xy + side], axis=-1))


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_multilevel_roi_align_equals_per_level_picks(mode):
    features = _fpn_features(2, 3, 256, 320)
    rois = _mixed_size_rois(2, 16, seed=4)
    scales = [0.25, 0.125, 0.0625, 0.03125]
    out = multilevel_roi_align(rois, features, scales, 5, 4, 2, True, 224.0, 4, mode)
    assert out.shape == (2, 16, 3, 5, 4)
    levels_used = set()
    for b in range(2):
        for r in range(16):
            x1, y1, x2, y2 = rois[b, r].tolist()
            level = min(max(math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 224) + 1e-6), 2), 5)
            levels_used.add(level)
            pick = roi_align(features[level - 2], torch.tensor([[float(b), x1, y1, x2, y2]], dtype=torch.float64),
                             (5, 4), scales[level - 2], 2, True, mode)
            torch.testing.assert_close(out[b, r], pick[0], rtol=0, atol=1e-12)
    assert levels_used == {2, 3, 4, 5}


@pytest.mark.usefixtures("forward_path")
def test_multilevel_roi_align_float32_matches_numpy_reference():
    features = _fpn_features(1, 2, 128, 128, dtype=torch.float32)
    rois = _mixed_size_rois(1, 6, seed=9).float()
    scales = [0.25, 0.125, 0.0625, 0.03125]
    out = multilevel_roi_align(rois, features, scales, 3, 3, 0, False)
    for r in range(6):
        box = rois[0, r].double().numpy()
        area = max(box[2] - box[0], 0) * max(box[3] - box[1], 0)
        level = min(max(math.floor(4 + math.log2(math.sqrt(area) / 224) + 1e-6), 2), 5)
        expected = roi_align_ref(features[level - 2].double().numpy(), np.concatenate([[0.0], box])[None], 3, 3, scales[level - 2], 0, False)
        np.testing.assert_allclose(out[0, r].double().numpy(), expected[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_multilevel_roi_align_gradients_reach_every_level(mode):
    features = [f.requires_grad_() for f in _fpn_features(2, 2, 256, 320)]
    rois = _mixed_size_rois(2, 16, seed=4)
    out = multilevel_roi_align(rois, features, [0.25, 0.125, 0.0625, 0.03125], 3, 3, 2, False, 224.0, 4, mode)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    # Reference: the same gradient through the pure-torch per-level path.
    leaves = [f.detach().clone().requires_grad_() for f in features]
    from maskrt.model.ops import multilevel_roi_align_eager

    (multilevel_roi_align_eager(rois, leaves, [0.25, 0.125, 0.0625, 0.03125], 3, 3, 2, False, 224.0, 4, mode) * weights).sum().backward()
    for f, leaf in zip(features, leaves):
        # A level no RoI pooled from: autograd leaves None on the eager path, the op gives zeros.
        torch.testing.assert_close(f.grad, torch.zeros_like(f) if leaf.grad is None else leaf.grad)
    assert all(f.grad.abs().sum() > 0 for f in features)


def test_multilevel_roi_align_empty_and_errors():
    features = _fpn_features(2, 2, 64, 64)
    out = multilevel_roi_align(torch.zeros(2, 0, 4, dtype=torch.float64), features, [0.25, 0.125, 0.0625, 0.03125], 7, 7, 2, False)
    assert out.shape == (2, 0, 2, 7, 7)
    with pytest.raises(MaskrtError, match="spatial_scales"):
        multilevel_roi_align(torch.zeros(2, 3, 4, dtype=torch.float64), features, [0.25, 0.125], 7, 7, 2, False)
    with pytest.raises(MaskrtError, match="powers of two"):
        multilevel_roi_align(torch.zeros(2, 3, 4, dtype=torch.float64), features, [0.25, 0.1, 0.05, 0.025], 7, 7, 2, False)
    with pytest.raises(MaskrtError, match="B,R,4"):
        multilevel_roi_align(torch.zeros(3, 4, dtype=torch.float64), features, [0.25, 0.125, 0.0625, 0.03125], 7, 7, 2, False)


def test_multi_scale_roi_align_matches_hand_assembled_levels():
    features = _fpn_features(2, 3, 192, 256)
    image_sizes = [(180, 250), (192, 201)]
    boxes = [torch.tensor([[0, 0, 20, 30], [10, 10, 200, 150], [5, 5, 60, 90.5]], dtype=torch.float64),
             torch.tensor([[30, 40, 190, 180], [1, 2, 9, 7]], dtype=torch.float64)]
    out = multi_scale_roi_align(features, boxes, image_sizes, 7, 2)
    assert out.shape == (5, 3, 7, 7)
    rows = [(0, b) for b in boxes[0].tolist()] + [(1, b) for b in boxes[1].tolist()]
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]  # 48/192, 24/192, ... relative to the largest image height
    for i, (image, (x1, y1, x2, y2)) in enumerate(rows):
        level = min(max(math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 224) + 1e-6), 2), 5)
        expected = roi_align_ref(features[level - 2].numpy(), np.array([[image, x1, y1, x2, y2]]), 7, 7, scales[level - 2], 2, False)
        np.testing.assert_allclose(out[i].numpy(), expected[0], rtol=1e-12, atol=1e-12)


def test_multilevel_roi_pool_uses_the_level_rule():
    features = _fpn_features(1, 2, 128, 128)
    rois = _mixed_size_rois(1, 8, seed=2) * 0.5
    rois = torch.round(rois * 8) / 8
    out = multilevel_roi_pool(rois, features, [0.25, 0.125, 0.0625, 0.03125], 2)
    for r in range(8):
        x1, y1, x2, y2 = rois[0, r].tolist()
        level = min(max(math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 224) + 1e-6), 2), 5)
        expected = roi_pool_ref(features[level - 2].numpy(), np.array([[0, x1, y1, x2, y2]]), 2, 2, 2.0 ** -level)
        np.testing.assert_allclose(out[0, r].numpy(), expected[0], rtol=0, atol=0)


@pytest.mark.usefixtures("forward_path")
def test_roi_align_is_unchanged_under_bf16_autocast():
    # The trainer's bf16 mode runs the model under CPU autocast; the mask targets are RoIAligned
    # ground-truth masks. Small RoIs at 28x28 take the window form, whose bmm autocast would
    # run in bf16: the op turns autocast off, so forward and gradient are bit-identical.
    torch.manual_seed(0)
    masks = (torch.rand(3, 1, 40, 40) > 0.5).float().requires_grad_()
    rois = torch.tensor([[0, 2.0, 3.0, 14.0, 12.0], [1, 5.5, 1.25, 30.0, 33.0], [2, 0.0, 0.0, 9.0, 9.0]])
    weights = torch.randn(3, 1, 28, 28)
    expected = roi_align(masks, rois, 28, 1.0, 2)
    (expected * weights).sum().backward()
    expected_grad, masks.grad = masks.grad.clone(), None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(masks, rois, 28, 1.0, 2)
        (out * weights).sum().backward()
    assert out.dtype == torch.float32
    assert torch.equal(out, expected) and torch.equal(masks.grad, expected_grad)


# ---------------------------------------------------------------- the native CPU forward
def _native():
    from maskrt.model.ops import native_cpu
    from maskrt.plugins.cpu import find_compiler

    try:
        find_compiler()
    except MaskrtError:
        pytest.skip("no C++ compiler: the native RoIAlign forward is not built")
    return native_cpu


def test_native_forward_is_built_and_used(monkeypatch):
    """With a compiler present, float32 CPU roi_align and multilevel_roi_align run the native
    kernel (one call for all levels); float64 and autograd-tracked multilevel calls do not."""
    native_cpu = _native()
    assert native_cpu.enabled()
    calls = []
    original = native_cpu.roi_align_forward

    def counting(features, *args):
        calls.append(len(features))
        return original(features, *args)

    monkeypatch.setattr(native_cpu, "roi_align_forward", counting)
    feat = torch.randn(1, 2, 8, 8)
    roi_align(feat, torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]]), 2, 1.0, 2)
    roi_align(feat.double(), torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]], dtype=torch.float64), 2, 1.0, 2)
    features = _fpn_features(1, 2, 128, 128, dtype=torch.float32)
    multilevel_roi_align(_mixed_size_rois(1, 6, seed=9).float(), features, [0.25, 0.125, 0.0625, 0.03125], 3, 3, 2, False)
    assert calls == [1, 4]
    monkeypatch.setenv("MASKRT_NATIVE_CPU", "0")
    roi_align(feat, torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]]), 2, 1.0, 2)
    assert calls == [1, 4]


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("aligned,sampling", [(False, 2), (True, 0), (True, 3)])
def test_native_forward_equals_pytorch_path(monkeypatch, mode, aligned, sampling):
    """The native forward (channels-last and strided NCHW reads, 1 and 3 threads) and the
    PyTorch fallback give the same numbers on FPN-shaped input, degenerate RoIs included; the
    thread count does not change a bit."""
    native_cpu = _native()
    module = importlib.import_module("maskrt.model.ops.roi_align")
    features = _fpn_features(2, 5, 256, 320, dtype=torch.float32)
    rois = _mixed_size_rois(2, 24, seed=3).float()
    rois[0, 0] = torch.tensor([3.0, 3.0, 3.0, 3.0])                 # zero-size
    rois[0, 1] = torch.tensor([50.0, 40.0, 20.0, 10.0])             # inverted
    rois[1, 0] = torch.tensor([-900.0, -900.0, -800.0, -700.0])     # outside the map
    rois[1, 1] = torch.tensor([float("nan"), 2.0, 40.0, 40.0])      # NaN: zeros
    scales = [0.25, 0.125, 0.0625, 0.03125]
    native = multilevel_roi_align(rois, features, scales, 5, 4, sampling, aligned, 224.0, 4, mode)
    monkeypatch.setattr(module, "_NATIVE_CPU", False)
    fallback = multilevel_roi_align(rois, features, scales, 5, 4, sampling, aligned, 224.0, 4, mode)
    torch.testing.assert_close(native, fallback, rtol=1e-5, atol=1e-5)
    assert native[1, 1].abs().sum() == 0 and native.abs().sum() > 0

    flat = module._batched_rois(rois)
    levels = fpn_level(flat[:, 1:], 2, 5) - 2
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        for layout in (torch.channels_last, torch.contiguous_format):
            maps = [f.contiguous(memory_format=layout) for f in features]
            results.append(native_cpu.roi_align_forward(maps, scales, flat, levels, (5, 4), sampling, aligned, mode))
    assert torch.equal(results[0], results[2])  # channels-last, 1 vs 3 threads: bit for bit
    assert torch.equal(results[1], results[3])  # strided NCHW, 1 vs 3 threads
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0].view_as(native), native, rtol=0, atol=0)


def test_native_forward_rejects_bad_arguments():
    native_cpu = _native()
    feat = torch.randn(1, 2, 8, 8)
    with pytest.raises(MaskrtError, match="bad arguments"):  # batch index 1 of a batch of 1
        native_cpu.roi_align_forward([feat], [1.0], torch.tensor([[1.0, 0, 0, 4, 4]]), None, (2, 2), 2, False, "avg")
    with pytest.raises(MaskrtError, match="float32"):
        native_cpu.roi_align_forward([feat.double()], [1.0], torch.tensor([[0.0, 0, 0, 4, 4]]), None, (2, 2), 2, False, "avg")


def test_native_forward_caps_adaptive_grids_as_the_contract(monkeypatch):
    """A RoI spanning 300 cells pooled to 2x2 asks for 150 adaptive samples per side; the contract
    caps that at ADAPTIVE_GRID_MAX (64) in every implementation, the native kernel included."""
    _native()
    module = importlib.import_module("maskrt.model.ops.roi_align")
    torch.manual_seed(2)
    feat = torch.randn(1, 3, 300, 300)
    rois = torch.tensor([[0, 0.0, 0.0, 299.0, 299.0], [0, 10.0, 20.0, 290.0, 150.0]])
    native = roi_align(feat, rois, 2, 1.0, 0)
    monkeypatch.setattr(module, "_NATIVE_CPU", False)
    torch.testing.assert_close(native, roi_align(feat, rois, 2, 1.0, 0), rtol=1e-5, atol=1e-5)
    capped = roi_align_ref(feat.double().numpy(), rois.double().numpy(), 2, 2, 1.0, 64, False)  # 64 x 64 samples
    np.testing.assert_allclose(native.double().numpy(), capped, rtol=2e-5, atol=2e-5)


def test_without_a_compiler_roi_align_falls_back_to_pytorch(monkeypatch, recwarn):
    """No C++ compiler: the native library is not built, no warning is raised, and roi_align /
    multilevel_roi_align give the reference numbers on the PyTorch path."""
    from maskrt.model.ops import native_cpu

    def no_compiler() -> str:
        raise MaskrtError("no C++ compiler found (tried $CXX, g++, c++, clang++)")

    monkeypatch.setattr(native_cpu, "_libraries", {})
    monkeypatch.setattr(native_cpu, "find_compiler", no_compiler)
    monkeypatch.setattr(native_cpu, "roi_align_forward", lambda *args: pytest.fail("the native path ran"))
    assert not native_cpu.enabled()
    rng = np.random.default_rng(8)
    feat = rng.standard_normal((1, 2, 9, 11)).astype(np.float32)
    rois = _random_rois(rng, 6, batch=1, extent=22.0)
    out = roi_align(torch.tensor(feat), torch.tensor(rois, dtype=torch.float32), (3, 4), 0.5, 2)
    np.testing.assert_allclose(out.double().numpy(), roi_align_ref(feat, rois, 3, 4, 0.5, 2, False), rtol=2e-5, atol=2e-5)
    features = _fpn_features(1, 2, 128, 128, dtype=torch.float32)
    assert multilevel_roi_align(_mixed_size_rois(1, 4, seed=9).float(), features, [0.25, 0.125, 0.0625, 0.03125],
                                3, 3, 2, False).shape == (1, 4, 2, 3, 3)
    assert not [w for w in recwarn if "native" in str(w.message)]


def test_native_forward_reads_nchw_maps_by_windows_bit_for_bit():
    """Few RoIs on a large NCHW map: the map is passed as it is and the kernel copies each RoI's
    window of cells to channels-last (bit-identical to pooling a channels-last copy of the whole
    map); many RoIs: the whole map is copied to channels-last first."""
    native_cpu = _native()
    module = importlib.import_module("maskrt.model.ops.roi_align")
    torch.manual_seed(4)
    feature = torch.randn(2, 16, 60, 80)
    rois = torch.tensor([[0, 10.0, 12.0, 90.0, 70.0], [1, -30.0, 200.0, 40.0, 260.0], [0, 300.0, 220.0, 340.0, 250.0],
                         [1, 5.0, 5.0, 5.0, 5.0], [0, 200.0, 100.0, 120.0, 60.0], [1, -50.0, -50.0, -10.0, -20.0]])
    assert module._native_layout(feature, rois[:, 1:], 0.25) is feature  # ~12 % of the map's cells: windows
    many = rois.repeat(40, 1)
    assert module._native_layout(feature, many[:, 1:], 0.25).is_contiguous(memory_format=torch.channels_last)
    channels_last = feature.contiguous(memory_format=torch.channels_last)
    for aligned, sampling, mode in ((False, 2, "avg"), (True, 0, "avg"), (False, 3, "max")):
        windows = native_cpu.roi_align_forward([feature], [0.25], rois, None, (7, 7), sampling, aligned, mode)
        whole = native_cpu.roi_align_forward([channels_last], [0.25], rois, None, (7, 7), sampling, aligned, mode)
        assert torch.equal(windows, whole)
        reference = roi_align_ref(feature.double().numpy(), rois.double().numpy(), 7, 7, 0.25, sampling, aligned) \
            if mode == "avg" else None
        if reference is not None:
            np.testing.assert_allclose(windows.double().numpy(), reference, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the native CPU backward (average mode)
def _jacobian_transpose_ref(feat_shape: tuple[int, ...], rois: np.ndarray, grad: np.ndarray, scale: float,
                            sampling: int, aligned: bool) -> np.ndarray:
    """J^T grad of the NumPy reference forward, J built column by column from unit maps (the
    forward is linear in the map): an independent float64 reference of the gradient."""
    n, c, h, w = feat_shape
    out_h, out_w = grad.shape[-2:]
    result = np.zeros(feat_shape)
    for index in range(n * h * w):  # channels do not mix: one unit cell, every channel at once
        unit = np.zeros(feat_shape)
        b, y, x = np.unravel_index(index, (n, h, w))
        unit[b, :, y, x] = 1.0
        column = roi_align_ref(unit, rois, out_h, out_w, scale, sampling, aligned)  # [K, C, oh, ow]
        result[b, :, y, x] = (column * grad).sum(axis=(0, 2, 3))
    return result


@pytest.mark.parametrize("aligned,sampling", [(False, 2), (True, 0), (False, 0), (True, 3)])
def test_native_backward_equals_the_reference_jacobian(monkeypatch, aligned, sampling):
    """roi_align's float32 CPU gradient (average mode) runs the native kernel and equals J^T g of
    the NumPy reference forward, RoIs past the map's last row and column, inverted, zero-size,
    outside and NaN included; the PyTorch fallback gives the same numbers."""
    native_cpu = _native()
    module = importlib.import_module("maskrt.model.ops.roi_align")
    calls = []
    original = native_cpu.roi_align_backward
    monkeypatch.setattr(native_cpu, "roi_align_backward", lambda *args: calls.append(1) or original(*args))
    rng = np.random.default_rng(11)
    feat = rng.standard_normal((2, 3, 7, 9)).astype(np.float32)
    rois = np.concatenate([_random_rois(rng, 9, batch=2, extent=14.0),
                           [[1, 10.0, 8.0, 17.9, 13.9],      # reaches past the last row and column
                            [0, 12.0, 9.0, 3.0, 2.0],        # inverted
                            [1, 4.0, 4.0, 4.0, 4.0],         # zero-size
                            [0, -40.0, -30.0, -20.0, -25.0],  # outside the map
                            [1, np.nan, 2.0, 6.0, 6.0]]]).astype(np.float32)  # NaN: zero output, zero gradient
    grad = rng.standard_normal((len(rois), 3, 3, 2)).astype(np.float32)
    finite = np.isfinite(rois).all(axis=1)
    expected = _jacobian_transpose_ref(feat.shape, rois[finite].astype(np.float64), grad[finite].astype(np.float64),
                                       0.5, sampling, aligned)
    leaf = torch.tensor(feat, requires_grad=True)
    roi_align(leaf, torch.tensor(rois), (3, 2), 0.5, sampling, aligned).backward(torch.tensor(grad))
    assert calls == [1]
    np.testing.assert_allclose(leaf.grad.double().numpy(), expected, rtol=2e-5, atol=2e-5)
    assert np.abs(expected).sum() > 0
    monkeypatch.setattr(module, "_NATIVE_BACKWARD", False)
    fallback = roi_align_backward(torch.tensor(grad), torch.tensor(feat), torch.tensor(rois), 0.5, sampling, aligned)
    assert calls == [1]
    torch.testing.assert_close(fallback, leaf.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned,sampling", [(False, 2), (True, 0)])
def test_native_multilevel_backward_is_one_call_and_thread_count_free(monkeypatch, aligned, sampling):
    """The multilevel op's float32 gradient is one native call for all levels; it equals the
    float64 gradient of the PyTorch path at every level, which itself meets the adjoint identity
    <roi_align(f), g> = <f, grad(g)> with the NumPy reference forward; 1 and 3 threads give the same bits (each image and block of channels is written
    by one thread, in one order)."""
    native_cpu = _native()
    module = importlib.import_module("maskrt.model.ops.roi_align")
    calls = []
    original = native_cpu.roi_align_backward
    monkeypatch.setattr(native_cpu, "roi_align_backward", lambda *args: calls.append(len(args[1])) or original(*args))
    scales = [0.25, 0.125, 0.0625, 0.03125]
    features = [f.requires_grad_() for f in _fpn_features(2, 20, 256, 320, dtype=torch.float32)]
    rois = torch.cat([_mixed_size_rois(2, 16, seed=4).float(),
                      torch.tensor([[[50.0, 40.0, 20.0, 10.0]], [[float("nan"), 2.0, 40.0, 40.0]]])], dim=1)  # inverted; NaN
    out = multilevel_roi_align(rois, features, scales, 5, 4, sampling, aligned, 224.0, 4)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert calls == [4]
    reference = module.multilevel_roi_align_backward_eager(grad.double(), rois.double(), [f.detach().double() for f in features],
                                                           scales, 5, 4, sampling, aligned, 224.0, 4)
    flat = module._batched_rois(rois).double().numpy()
    levels = (fpn_level(torch.tensor(flat[:, 1:]), 2, 5) - 2).numpy()
    grad_rows = grad.reshape(-1, 20, 5, 4).double().numpy()
    for level, (feature, expected) in enumerate(zip(features, reference)):
        assert expected.abs().sum() > 0  # every level pooled some RoI
        torch.testing.assert_close(feature.grad.double(), expected, rtol=1e-5, atol=2e-5)
        picks = (levels == level) & np.isfinite(flat).all(axis=1)
        probe = np.random.default_rng(level).standard_normal(tuple(feature.shape))
        forward = roi_align_ref(probe, flat[picks], 5, 4, scales[level], sampling, aligned)
        np.testing.assert_allclose((probe * expected.numpy()).sum(), (forward * grad_rows[picks]).sum(), rtol=1e-10)
    batched = module._batched_rois(rois)
    kernel_levels = fpn_level(batched[:, 1:], 2, 5) - 2
    shapes = [tuple(f.shape) for f in features]
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        results.append(original(grad.reshape(-1, 20, 5, 4), shapes, scales, batched, kernel_levels, sampling, aligned))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert all(torch.equal(a, f.grad) for a, f in zip(results[0], features))


def test_native_backward_leaves_max_mode_and_float64_to_pytorch(monkeypatch):
    """The native backward is the average mode's, for float32: max pooling and float64 take the
    PyTorch path (whose gradients the gradchecks above hold)."""
    native_cpu = _native()
    monkeypatch.setattr(native_cpu, "roi_align_backward", lambda *args: pytest.fail("the native backward ran"))
    features = [f.requires_grad_() for f in _fpn_features(1, 2, 128, 128, dtype=torch.float32)]
    rois = _mixed_size_rois(1, 6, seed=9).float()
    multilevel_roi_align(rois, features, [0.25, 0.125, 0.0625, 0.03125], 3, 3, 2, False, 224.0, 4, "max").sum().backward()
    feat = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    roi_align(feat, torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]], dtype=torch.float64), 2, 1.0, 2).sum().backward()
    assert feat.grad.abs().sum() > 0 and features[0].grad is not None


def test_native_backward_rejects_bad_arguments():
    native_cpu = _native()
    grad = torch.randn(1, 2, 2, 2)
    with pytest.raises(MaskrtError, match="bad arguments"):  # batch index 1 of a batch of 1
        native_cpu.roi_align_backward(grad, [(1, 2, 8, 8)], [1.0], torch.tensor([[1.0, 0, 0, 4, 4]]), None, 2, False)
    with pytest.raises(MaskrtError, match="the maps' C"):  # 2 gradient channels for 3-channel maps
        native_cpu.roi_align_backward(grad, [(1, 3, 8, 8)], [1.0], torch.tensor([[0.0, 0, 0, 4, 4]]), None, 2, False)
