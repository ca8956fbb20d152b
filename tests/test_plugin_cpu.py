"""The C++ CPU twin (plugins/cpu) against the float64 reference, ONNX Runtime's RoiAlign and the graph op."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maskrt.errors import MaskrtError
from maskrt.plugins import cpu
from test_plugin_reference import (big_adaptive_roi_case, SEED_EXPECTED, SEED_MAP, SEED_ROI, reference_level,
                                   reference_multilevel_roi_align)

REPO = Path(__file__).resolve().parent.parent
SCALES = [0.25, 0.125, 0.0625, 0.03125]
IMAGE_H, IMAGE_W = 96, 128  # not square: a swapped H/W shows


def random_case(seed: int, batch: int = 2, channels: int = 3, num_rois: int = 14):
    """Maps for a 96x128 image on four levels and RoIs of every kind the contract names."""
    rng = np.random.default_rng(seed)
    features = [rng.uniform(-1, 1, (batch, channels, int(IMAGE_H * s), int(IMAGE_W * s))).astype(np.float32)
                for s in SCALES]
    centres = rng.uniform([0, 0], [IMAGE_W, IMAGE_H], (batch, num_rois, 2))
    sizes = np.exp(rng.uniform(np.log(2), np.log(120), (batch, num_rois, 2)))
    rois = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=-1)
    special = np.array([
        [10.0, 10.0, 10.0, 30.0],      # zero width: area 0 -> finest level
        [40.0, 20.0, 40.0, 20.0],      # a point
        [50.0, 60.0, 30.0, 20.0],      # inverted
        [-60.0, -50.0, -20.0, -10.0],  # wholly outside, above-left
        [120.0, 90.0, 400.0, 300.0],   # mostly outside, below-right, large
        [0.0, 0.0, 128.0, 96.0],       # the whole image
        [-1.5, -0.7, 3.2, 2.9],        # straddling the top-left border
    ])
    rois[:, :len(special)] = special
    return rois.astype(np.float32), features


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_cpu_op_equals_float64_reference(aligned, sampling_ratio, mode):
    rois, features = random_case(seed=sampling_ratio * 10 + int(aligned) * 3 + (mode == "max"))
    # canonical_scale 32 spreads RoIs of a 96x128 image over all four levels
    attrs = dict(spatial_scales=SCALES, output_height=5, output_width=4, sampling_ratio=sampling_ratio,
                 aligned=aligned, canonical_scale=32.0, canonical_level=4, mode=mode)
    expected = reference_multilevel_roi_align(rois, features, **attrs)
    levels = {reference_level(box, SCALES, 32.0, 4) for box in rois.reshape(-1, 4)}
    assert levels == {0, 1, 2, 3}, "the case must exercise every level"
    got = cpu.multilevel_roi_align(rois, features, **attrs)
    assert got.shape == (2, 14, 3, 5, 4) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5
    assert np.abs(expected).max() > 0.1  # not all zeros


def test_cpu_op_default_attributes_on_default_levels():
    rois, features = random_case(seed=7)
    rois = rois * 4  # a 384x512 image's RoIs: default s0 = 224 then reaches P4/P5
    features = [np.repeat(np.repeat(f, 4, axis=2), 4, axis=3) for f in features]
    got = cpu.multilevel_roi_align(rois, features)
    expected = reference_multilevel_roi_align(rois, features, SCALES)
    assert got.shape == (2, 14, 3, 7, 7)
    assert np.abs(got - expected).max() <= 1e-5


def test_seed_example_1():
    got = cpu.multilevel_roi_align(SEED_ROI.astype(np.float32), [SEED_MAP.astype(np.float32)], [1.0],
                                   output_height=2, output_width=2, sampling_ratio=1, canonical_level=0)
    np.testing.assert_allclose(got[0, 0, 0], SEED_EXPECTED, atol=1e-5)
    assert got[0, 0, 0, 0, 0] == pytest.approx(7.2, abs=1e-5)


def test_zero_rois_gives_empty_output():
    _, features = random_case(seed=1)
    got = cpu.multilevel_roi_align(np.zeros((2, 0, 4), np.float32), features, SCALES, 7, 7)
    assert got.shape == (2, 0, 3, 7, 7)


def test_float16_is_float32_math_rounded_once():
    rois, features = random_case(seed=3)
    # values across the half range, subnormals (< 6.1e-5) included
    features = [f * np.float32(10.0) ** np.float32(-(i + 3)) for i, f in enumerate(features)]
    rois16, features16 = rois.astype(np.float16), [f.astype(np.float16) for f in features]
    got = cpu.multilevel_roi_align(rois16, features16, SCALES, 5, 4, 2, canonical_scale=32.0)
    assert got.dtype == np.float16
    # the same float16 values widened exactly to float32, computed there, rounded by NumPy once
    widened = cpu.multilevel_roi_align(rois16.astype(np.float32), [f.astype(np.float32) for f in features16],
                                       SCALES, 5, 4, 2, canonical_scale=32.0)
    assert np.array_equal(got.view(np.uint16), widened.astype(np.float16).view(np.uint16))
    assert np.count_nonzero(np.abs(got) < np.float16(6.1e-5)) > np.count_nonzero(got == 0)  # subnormals seen


def test_roi_levels_follow_the_level_rule():
    sides = np.array([1.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 5000.0])
    boxes = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], axis=-1)
    # zero area, small inverted -> finest; inverted on both axes -> by size (torchvision's area);
    # inverted on one axis (negative area) -> finest
    boxes = np.concatenate([boxes, [[5, 5, 5, 9], [9, 9, 1, 1], [400, 400, 100, 100], [400, 100, 100, 400]]])
    got = cpu.roi_levels(boxes)
    assert got.tolist() == [reference_level(b, SCALES) for b in boxes]
    assert got.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 2, 0]
    torch = pytest.importorskip("torch")
    from maskrt.model.ops import fpn_level
    assert (fpn_level(torch.tensor(boxes, dtype=torch.float32), 2, 5) - 2).tolist() == got.tolist()


def _ort_roi_align(feature: np.ndarray, boxes: np.ndarray, batch_indices: np.ndarray, height: int, width: int,
                   sampling_ratio: int, scale: float, aligned: bool) -> np.ndarray:
    """ONNX Runtime's own RoiAlign (opset 16, avg): torchvision's roi_align exactly (anchors.md)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    node = helper.make_node("RoiAlign", ["X", "rois", "batch_indices"], ["Y"], mode="avg",
                            output_height=height, output_width=width, sampling_ratio=sampling_ratio,
                            spatial_scale=scale,
                            coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel")
    graph = helper.make_graph([node], "roi_align", [
        helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("rois", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("batch_indices", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": feature, "rois": boxes, "batch_indices": batch_indices})[0]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_cpu_op_equals_onnxruntime_roi_align_per_level(aligned, sampling_ratio):
    # An independent implementation of the per-RoI part: route each RoI to its level with the
    # contract's rule, pool with ONNX Runtime's RoiAlign, compare (valid RoIs: ORT rejects none, but
    # inverted boxes are where implementations legitimately disagree on NaN handling).
    rois, features = random_case(seed=11 + sampling_ratio + int(aligned))
    rois = rois[:, 7:]  # the random RoIs
    got = cpu.multilevel_roi_align(rois, features, SCALES, 5, 4, sampling_ratio, aligned, canonical_scale=32.0)
    worst = 0.0
    for b in range(rois.shape[0]):
        for r in range(rois.shape[1]):
            level = reference_level(rois[b, r], SCALES, 32.0, 4)
            expected = _ort_roi_align(features[level], rois[b, r][None], np.array([b], np.int64), 5, 4,
                                      sampling_ratio, SCALES[level], aligned)
            worst = max(worst, float(np.abs(got[b, r] - expected[0]).max()))
    assert worst <= 1e-5


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_cpu_op_equals_pytorch_graph_op(mode):
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("maskrt.model.ops")
    if not hasattr(ops, "multilevel_roi_align"):
        pytest.skip("maskrt.model.ops.multilevel_roi_align is not written yet")
    for aligned in (False, True):
        for sampling_ratio in (0, 2):
            # every RoI kind of random_case, degenerate, inverted and out-of-image ones included
            rois, features = random_case(seed=21 + sampling_ratio + int(aligned))
            with torch.no_grad():
                expected = ops.multilevel_roi_align(torch.from_numpy(rois), [torch.from_numpy(f) for f in features],
                                                    SCALES, 5, 4, sampling_ratio, aligned, 32.0, 4, mode).numpy()
            got = cpu.multilevel_roi_align(rois, features, SCALES, 5, 4, sampling_ratio, aligned,
                                           canonical_scale=32.0, mode=mode)
            assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("call, message", [
    (lambda f: cpu.multilevel_roi_align(np.zeros((2, 3, 5), np.float32), f), "rois must be [B,R,4]"),
    (lambda f: cpu.multilevel_roi_align(np.zeros((2, 3, 4), np.float32), f[:3]), "3 feature maps but 4"),
    (lambda f: cpu.multilevel_roi_align(np.zeros((1, 3, 4), np.float32), f), "B must be 1"),
    (lambda f: cpu.multilevel_roi_align(np.zeros((2, 3, 4), np.float32), f, [0.25, 0.1, 0.05, 0.025]),
     "not a positive power of two"),
    (lambda f: cpu.multilevel_roi_align(np.zeros((2, 3, 4), np.float32), f, [0.25, 0.0625, 0.03125, 0.015625]),
     "must halve"),
    (lambda f: cpu.multilevel_roi_align(np.zeros((2, 3, 4), np.float32), f, mode="mean"), "mode must be"),
    (lambda f: cpu.multilevel_roi_align(np.zeros((2, 3, 4), np.float32), f, output_height=0), "output size"),
])
def test_bad_arguments_are_one_line_errors(call, message):
    _, features = random_case(seed=0)
    with pytest.raises(MaskrtError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        call(features)
    assert "\n" not in str(info.value)


def test_c_entry_point_returns_error_codes():
    library = cpu.load_library()
    feature = np.zeros((1, 1, 4, 4), np.float32)
    rois = np.zeros((1, 1, 4), np.float32)
    out = np.full((1, 1, 1, 2, 2), 42.0, np.float32)
    pointers = (ctypes.c_void_p * 1)(feature.ctypes.data)
    sizes = (ctypes.c_int64 * 1)(4)

    def call(scale=1.0, mode=0, dtype=0, levels=1, output_height=2):
        scales = (ctypes.c_float * 1)(scale)
        return library.maskrt_multilevel_roi_align_cpu(rois.ctypes.data, pointers, sizes, sizes, levels, 1, 1, 1,
                                                       scales, output_height, 2, 2, 0, 224.0, 0, mode, dtype,
                                                       out.ctypes.data)
    assert call(mode=2) == 5
    assert call(dtype=7) == 6
    assert call(scale=0.3) == 4
    assert call(levels=0) == 2
    assert call(output_height=0) == 3
    assert (out == 42.0).all(), "an error leaves the output untouched"
    assert call() == 0 and (out == 0.0).all()
    assert library.maskrt_cpu_error_string(5).decode().startswith("aligned and mode")


def test_library_is_cached_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKRT_BUILD_DIR", str(tmp_path))
    monkeypatch.delenv("MASKRT_CPU_LIB", raising=False)
    first = cpu.library_path()
    assert first.parent.name == f"cpu-{cpu.source_hash(cpu.find_compiler())}" and first.name == "libmaskrt_cpu.so"
    stamp = first.stat().st_mtime_ns
    assert cpu.library_path() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in first.parent.iterdir()] == ["libmaskrt_cpu.so"]  # no temporary left behind


def test_missing_compiler_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKRT_BUILD_DIR", str(tmp_path))
    monkeypatch.delenv("MASKRT_CPU_LIB", raising=False)
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MaskrtError, match="no C.. compiler found"):
        cpu.library_path()


def test_python_defaults_match_the_contract_json():
    contract = json.loads((REPO / "plugins" / "multilevel_roi_align.json").read_text())
    defaults = {a["name"]: a["default"] for a in contract["attributes"]}
    import inspect
    signature = inspect.signature(cpu.multilevel_roi_align).parameters
    assert list(defaults["spatial_scales"]) == list(signature["spatial_scales"].default)
    for name in ("output_height", "output_width", "sampling_ratio", "canonical_scale", "canonical_level"):
        assert defaults[name] == signature[name].default, name
    assert defaults["aligned"] == int(signature["aligned"].default)
    assert defaults["mode"] == {"avg": 0, "max": 1}[signature["mode"].default]


def test_plugins_import_and_run_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, maskrt.plugins, maskrt.plugins.cpu as cpu, maskrt.plugins.ort, maskrt.export.engine\n"
            "out = cpu.multilevel_roi_align(np.array([[[1.2, 0.8, 2.8, 2.2]]], np.float32),"
            " [np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)], [1.0], 2, 2, 1, canonical_level=0)\n"
            "assert abs(out[0, 0, 0, 0, 0] - 7.2) < 1e-5\n"
            "assert 'torch' not in [m.split('.')[0] for m, v in sys.modules.items() if v is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "tests")})


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_non_finite_roi_gives_zeros_and_terminates(sampling_ratio):
    """Contract (degenerate_rois.non_finite): NaN/inf RoIs pool to 0; the adaptive grid must not run away."""
    rng = np.random.default_rng(7)
    features = [rng.standard_normal((1, 2, 16 // 2**i, 16 // 2**i)).astype(np.float32) for i in range(3)]
    rois = np.array([[[0.0, 0.0, np.inf, 8.0], [np.nan, 1.0, 5.0, 5.0], [1.0, 1.0, 9.0, 9.0]]], np.float32)
    out = cpu.multilevel_roi_align(rois, features, spatial_scales=[0.25, 0.125, 0.0625],
                                   output_height=2, output_width=2, sampling_ratio=sampling_ratio)
    assert np.all(out[0, :2] == 0.0)
    assert np.any(out[0, 2] != 0.0)  # the finite RoI is pooled as usual


def test_adaptive_grid_is_capped_like_the_contract():
    """sampling_ratio 0 takes at most 64 samples per bin side (a grid of 100 x 90 here): the CPU twin
    and the PyTorch graph op equal the float64 reference, which equals a fixed grid of 64."""
    rois, features = big_adaptive_roi_case()
    expected = reference_multilevel_roi_align(rois, features, [1.0], 1, 1, 0, canonical_level=0)
    got = cpu.multilevel_roi_align(rois, features, [1.0], 1, 1, 0, canonical_level=0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    torch = pytest.importorskip("torch")
    from maskrt.model.ops import multilevel_roi_align
    with torch.no_grad():
        ours = multilevel_roi_align(torch.from_numpy(rois), [torch.from_numpy(features[0])], [1.0], 1, 1, 0,
                                    False, 224.0, 0, "avg").numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", ["coarsest_first", "swapped_middle", "same_size"])
def test_feature_maps_out_of_level_order_are_refused(order):
    """Maps must shrink level by level as spatial_scales say (each half the previous, rounded either
    way); in another order every RoI pooled silently from the wrong map. CPU twin and PyTorch op."""
    rois, features = random_case(seed=3)
    bad = {"coarsest_first": features[::-1], "swapped_middle": [features[0], features[2], features[1], features[3]],
           "same_size": [features[0]] * 4}[order]
    with pytest.raises(MaskrtError, match="feature maps must be finest first, each half the previous one"):
        cpu.multilevel_roi_align(rois, bad, SCALES, 5, 4)
    torch = pytest.importorskip("torch")
    from maskrt.model.ops import multilevel_roi_align
    with pytest.raises(MaskrtError, match="feature maps must be finest first, each half the previous one"):
        multilevel_roi_align(torch.from_numpy(rois), [torch.from_numpy(f) for f in bad], SCALES, 5, 4, 2, False)


def test_odd_map_sizes_rounded_either_way_are_accepted():
    """A 50 x 75 input's maps: 13x19 -> 7x10 (ceil) or 6x9 (floor) are both half the previous one."""
    rng = np.random.default_rng(4)
    rois = np.array([[[1.0, 2.0, 30.0, 40.0]]], np.float32)
    for sizes in ([(13, 19), (7, 10), (4, 5), (2, 3)], [(13, 19), (6, 9), (3, 4), (1, 2)]):
        features = [rng.normal(size=(1, 2, h, w)).astype(np.float32) for h, w in sizes]
        got = cpu.multilevel_roi_align(rois, features, SCALES, 2, 2, 2)
        expected = reference_multilevel_roi_align(rois, features, SCALES, 2, 2, 2)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
