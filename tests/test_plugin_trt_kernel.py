"""The MultilevelRoIAlign CUDA kernel, without a GPU.

`maskrt plugin build` compiles libmaskrt_kernels.so with nvcc (one arch, sm_87, to stay fast);
its host-emulation entry point runs the kernel's own __host__ __device__ per-element code in a
host loop, which is checked here against independent references: the seed-notes worked
example, the float64 NumPy reference of tests/test_plugin_reference.py (written from the
contract text), and ONNX Runtime's RoiAlign. The CUDA launch itself needs a GPU:
bench/gpu_kernel.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from maskrt.cli import main as cli_main
from maskrt.errors import MaskrtError
from maskrt.plugins import build as plugin_build
from maskrt.plugins.kernel_lib import KernelLibrary, RoIAlignAttributes
from test_plugin_reference import big_adaptive_roi_case, reference_level, reference_multilevel_roi_align

REPO = Path(__file__).resolve().parent.parent
CONTRACT = json.loads((REPO / "plugins" / "multilevel_roi_align.json").read_text())
SCALES = (0.25, 0.125, 0.0625, 0.03125)
IMAGE_H, IMAGE_W = 64, 96


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> KernelLibrary:
    """libmaskrt_kernels.so built by `maskrt plugin build` without TensorRT headers."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: cannot build the CUDA kernel")
    try:
        plugin_build.find_nvcc()
    except MaskrtError as err:
        pytest.skip(f"no nvcc: {err}")
    build_dir = tmp_path_factory.mktemp("plugins")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TENSORRT_INCLUDE_DIR", raising=False)  # the kernel must build without TensorRT
        status = cli_main(["plugin", "build", "--build-dir", str(build_dir), "--cuda-archs", "87"])
    assert status == 0
    assert not (build_dir / plugin_build.PLUGIN_LIBRARY).exists(), "no headers, so no TensorRT plugin"
    return KernelLibrary(build_dir / plugin_build.KERNEL_LIBRARY)


def random_case(seed: int, dtype=np.float32, batch: int = 2, channels: int = 3, num_rois: int = 10):
    """Four-level maps of a 64x96 input and RoIs of every kind: random sizes, degenerate, outside."""
    rng = np.random.default_rng(seed)
    features = [rng.normal(size=(batch, channels, int(IMAGE_H * s), int(IMAGE_W * s))).astype(dtype)
                for s in SCALES]
    centres = rng.uniform([0, 0], [IMAGE_W, IMAGE_H], (batch, num_rois, 2))
    sizes = np.exp(rng.uniform(np.log(1.0), np.log(90), (batch, num_rois, 2)))
    rois = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=-1)
    rois[0, :5] = [
        [8.0, 8.0, 8.0, 20.0],         # zero width
        [40.0, 30.0, 20.0, 10.0],      # inverted
        [-50.0, -40.0, -10.0, -5.0],   # wholly outside
        [80.0, 50.0, 300.0, 200.0],    # mostly outside, large
        [-1.3, -0.6, 3.7, 2.2],        # over the top-left border
    ]
    return rois.astype(dtype), features


def test_seed_example_1_in_fp32_and_fp16(kernels):
    """seed-notes example 1: 4x4 map 1..16, RoI (1.2,0.8)-(2.8,2.2), 2x2 bins, 1 sample -> [[7.2,8],[10,10.8]]."""
    feature = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
    roi = np.array([[[1.2, 0.8, 2.8, 2.2]]], np.float32)
    attrs = RoIAlignAttributes(output_height=2, output_width=2, sampling_ratio=1, spatial_scales=(1.0,))
    expected = np.array([[7.2, 8.0], [10.0, 10.8]])
    fp32 = kernels.host_emulation(roi, [feature], attrs)
    assert fp32.shape == (1, 1, 1, 2, 2) and fp32.dtype == np.float32
    assert np.abs(fp32[0, 0, 0] - expected).max() <= 1e-5
    fp16 = kernels.host_emulation(roi.astype(np.float16), [feature.astype(np.float16)], attrs)
    assert fp16.dtype == np.float16
    assert np.abs(fp16[0, 0, 0].astype(np.float64) - expected).max() <= 1e-2 * 10.8


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("aligned", [0, 1])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_fp32_equals_float64_reference(kernels, mode, aligned, sampling_ratio):
    rois, features = random_case(seed=7 * mode + 3 * aligned + sampling_ratio)
    # canonical_scale 24 spreads RoIs of a 64x96 input over all four levels.
    attrs = RoIAlignAttributes(output_height=5, output_width=4, sampling_ratio=sampling_ratio, aligned=aligned,
                               spatial_scales=SCALES, canonical_scale=24.0, mode=mode)
    assert {reference_level(box, SCALES, 24.0, 4) for box in rois.reshape(-1, 4)} == {0, 1, 2, 3}
    expected = reference_multilevel_roi_align(
        rois, features, SCALES, 5, 4, sampling_ratio, bool(aligned), 24.0, 4, "max" if mode else "avg")
    got = kernels.host_emulation(rois, features, attrs)
    assert got.shape == (2, 10, 3, 5, 4) and got.dtype == np.float32
    scale = np.abs(expected).max()
    assert scale > 0.5  # real values, not an all-zero output
    assert np.abs(got - expected).max() <= 1e-5 * scale


@pytest.mark.parametrize("mode", [0, 1])
def test_fp16_within_1e_2_of_float64_reference(kernels, mode):
    rois, features = random_case(seed=11 + mode, dtype=np.float16)
    attrs = RoIAlignAttributes(sampling_ratio=0, spatial_scales=SCALES, canonical_scale=24.0, mode=mode)
    # The reference sees the same fp16-rounded inputs, in float64.
    expected = reference_multilevel_roi_align(rois, features, SCALES, 7, 7, 0, False, 24.0, 4,
                                              "max" if mode else "avg")
    got = kernels.host_emulation(rois, features, attrs)
    assert got.dtype == np.float16
    error = np.abs(got.astype(np.float64) - expected).max() / np.abs(expected).max()
    assert error <= 1e-2
    assert error > 0  # fp16 output rounding shows: the fp16 path really ran


@pytest.mark.parametrize("aligned", [0, 1])
def test_single_level_equals_onnxruntime_roialign(kernels, aligned):
    """ONNX Runtime's RoiAlign (opset 16, avg) is torchvision's roi_align: an independent implementation."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    features = rng.normal(size=(2, 4, 16, 24)).astype(np.float32)
    rois, _ = random_case(seed=3, num_rois=6)
    attrs = RoIAlignAttributes(output_height=7, output_width=6, sampling_ratio=0, aligned=aligned,
                               spatial_scales=(0.25,))
    got = kernels.host_emulation(rois, [features], attrs)

    mode = "half_pixel" if aligned else "output_half_pixel"
    node = helper.make_node("RoiAlign", ["X", "rois", "batch_indices"], ["Y"], mode="avg", output_height=7,
                            output_width=6, sampling_ratio=0, spatial_scale=0.25,
                            coordinate_transformation_mode=mode)
    graph = helper.make_graph(
        [node], "roialign",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("rois", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("batch_indices", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8  # ONNX Runtime reads at most IR 13; onnx 1.23 writes 14 by default
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batch_indices = np.repeat(np.arange(2), 6).astype(np.int64)
    (expected,) = session.run(None, {"X": features, "rois": rois.reshape(-1, 4), "batch_indices": batch_indices})
    assert np.abs(got.reshape(12, 4, 7, 6) - expected).max() <= 1e-5 * np.abs(expected).max()


def test_level_mapping_boundaries(kernels):
    """Each level's map holds its level number, so the output names the level each RoI pooled from.

    With canonical_scale 224 (anchors.md, PyramidROIAlign's rule): sqrt(area) < 112 -> P2,
    < 224 -> P3, < 448 -> P4, else P5; area 0 -> P2; inverted on both axes: by size (torchvision's
    area); inverted on one axis (negative area) -> P2.
    """
    sides = [1.0, 111.5, 112.0, 223.5, 224.0, 447.0, 448.0, 2000.0]
    expected_levels = [0, 0, 1, 1, 2, 2, 3, 3]
    # Centred on the origin: the single sample point is (0, 0), inside every map.
    rois = [[-side / 2, -side / 2, side / 2, side / 2] for side in sides]
    rois += [[5.0, 5.0, 5.0, 90.0], [90.0, 90.0, 10.0, 10.0]]  # zero width, inverted
    # inverted on both axes (300 x 300 -> P4), on one axis (area < 0 -> P2); samples inside every map
    rois += [[1.0, 1.0, -299.0, -299.0], [1.0, 1.0, -299.0, 301.0]]
    expected_levels += [0, 0, 2, 0]
    rois = np.array([rois], np.float32)
    features = [np.full((1, 1, 256 >> level, 256 >> level), float(level), np.float32) for level in range(4)]
    got = kernels.host_emulation(rois, features, RoIAlignAttributes(output_height=1, output_width=1,
                                                                    sampling_ratio=1))
    assert [reference_level(box, SCALES) for box in rois[0]] == expected_levels
    assert got[0, :, 0, 0, 0].tolist() == [float(level) for level in expected_levels]


def test_zero_rois_give_an_empty_output(kernels):
    features = [np.ones((3, 2, 8, 8), np.float32)]
    got = kernels.host_emulation(np.zeros((3, 0, 4), np.float32), features, RoIAlignAttributes(spatial_scales=(0.5,)))
    assert got.shape == (3, 0, 2, 7, 7)


@pytest.mark.parametrize("change, message", [
    (dict(mode=3), "mode"),
    (dict(output_height=0), "output_height"),
    (dict(sampling_ratio=-1), "sampling_ratio"),
    (dict(aligned=2), "aligned"),
    (dict(spatial_scales=(0.25, 0.0625)), "halve"),
    (dict(spatial_scales=(0.3, 0.15)), "power of two"),
    (dict(canonical_scale=0.0), "canonical_scale"),
])
def test_bad_parameters_refused_with_a_message(kernels, change, message):
    base = dict(RoIAlignAttributes().__dict__)
    attrs = RoIAlignAttributes(**{**base, **change})
    shapes = [(16, 16), (8, 8)] if len(attrs.spatial_scales) == 2 else [(16, 16), (8, 8), (4, 4), (2, 2)]
    problem = kernels.check(1, 1, 1, shapes, attrs)
    assert problem is not None and message in problem
    assert kernels.check(1, 1, 1, [(16, 16), (8, 8), (4, 4), (2, 2)], RoIAlignAttributes()) is None
    rois = np.zeros((1, 1, 4), np.float32)
    features = [np.zeros((1, 1, h, w), np.float32) for h, w in shapes]
    with pytest.raises(MaskrtError, match="refused"):
        kernels.host_emulation(rois, features, attrs)


def test_contract_json_defaults_match_the_kernel_library():
    """plugins/multilevel_roi_align.json is what export and the CPU twin read: its defaults and ranges."""
    attributes = {a["name"]: a for a in CONTRACT["attributes"]}
    assert list(attributes) == ["output_height", "output_width", "sampling_ratio", "aligned", "spatial_scales",
                                "canonical_scale", "canonical_level", "mode"]
    defaults = RoIAlignAttributes()
    for name, attribute in attributes.items():
        expected = getattr(defaults, name)
        assert attribute["default"] == (list(expected) if isinstance(expected, tuple) else expected), name
    assert (CONTRACT["op"], CONTRACT["version"], CONTRACT["namespace"]) == ("MultilevelRoIAlign", "1", "maskrt")
    assert attributes["mode"]["options"] == [0, 1] and attributes["aligned"]["options"] == [0, 1]
    assert attributes["output_height"]["range"] == {"min": 1}
    assert attributes["sampling_ratio"]["range"] == {"min": 0}
    assert attributes["spatial_scales"]["length"]["max"] == 5


def test_plugin_build_without_cmake_or_nvcc_is_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither cmake nor nvcc on PATH
    assert cli_main(["plugin", "build", "--build-dir", str(tmp_path / "b")]) == 2
    assert "cmake not found" in capsys.readouterr().err
    if shutil.which("cmake", path="/usr/bin:/bin") is None:
        pytest.skip("no cmake in /usr/bin to test the missing-nvcc message alone")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.delenv("CUDACXX", raising=False)
    if shutil.which("nvcc") is not None:
        pytest.skip("nvcc is in /usr/bin: cannot hide it")
    assert cli_main(["plugin", "build", "--build-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maskrt: error: nvcc not found") and err.count("\n") == 1


def test_plugin_build_rejects_bad_arguments(tmp_path, capsys):
    assert cli_main(["plugin", "build", "--build-dir", str(tmp_path), "--cuda-archs", "sm_87"]) == 2
    assert "--cuda-archs" in capsys.readouterr().err
    assert cli_main(["plugin", "build", "--build-dir", str(tmp_path), "--tensorrt-include", str(tmp_path)]) == 2
    assert "NvInferRuntime.h" in capsys.readouterr().err


def test_gpu_harness_inputs_exercise_every_level():
    """bench/gpu_kernel.py (run on a GPU machine) must time all four levels, not only P2."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_kernel", REPO / "bench" / "gpu_kernel.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    rois, features = harness.random_inputs(batch=2, num_rois=512, channels=1, size=800, dtype=np.float16)
    assert rois.dtype == np.float16 and [f.shape[2] for f in features] == [200, 100, 50, 25]
    assert {reference_level(box, SCALES) for box in rois.reshape(-1, 4).astype(np.float64)} == {0, 1, 2, 3}


def test_plugin_config_yaml_agrees_with_the_json_contract():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO / "plugins" / "multilevel_roi_align" /
                             "MultilevelRoIAlign_PluginConfig.yaml").read_text())
    assert (config["name"], config["namespace"], list(config["versions"])) == ("MultilevelRoIAlign", "maskrt", ["1"])
    version = config["versions"]["1"]
    attributes = CONTRACT["attributes"]
    assert version["attributes"] == [a["name"] for a in attributes]
    assert version["attribute_defaults"] == {a["name"]: a["default"] for a in attributes}
    assert version["attribute_types"] == {a["name"]: a["trt_field_type"].lower() for a in attributes}


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_nan_and_infinite_rois_give_zeros_not_garbage(kernels, mode, sampling_ratio):
    """Corrupt RoIs must not read outside the maps (float-to-int of NaN is undefined on the host)."""
    features = [np.ones((1, 2, 16 >> level, 16 >> level), np.float32) for level in range(4)]
    rois = np.array([[[np.nan, 0, 10, 10], [0, 0, np.inf, 10], [-np.inf, -np.inf, 4, 4], [0, 0, 8, 8]]], np.float32)
    got = kernels.host_emulation(rois, features, RoIAlignAttributes(sampling_ratio=sampling_ratio, mode=mode,
                                                                    output_height=2, output_width=2))
    assert np.all(got[0, :3] == 0)
    assert np.all(got[0, 3] == 1.0)  # a normal RoI beside them is pooled as usual


def test_a_cache_from_another_nvcc_is_dropped_before_configuring(tmp_path):
    """CMake re-configures from scratch on a compiler change and would lose -DTENSORRT_INCLUDE_DIR."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("")
    cache = tmp_path / "CMakeCache.txt"
    cache.write_text(f"CMAKE_CUDA_COMPILER:FILEPATH={nvcc}\nTENSORRT_INCLUDE_DIR:PATH=/x\n")
    plugin_build._forget_other_compiler(tmp_path, str(nvcc.resolve()))
    assert cache.is_file()
    (tmp_path / "CMakeFiles").mkdir()
    plugin_build._forget_other_compiler(tmp_path, "/usr/local/cuda/bin/nvcc")
    assert not cache.exists() and not (tmp_path / "CMakeFiles").exists()


def test_kernel_is_compiled_without_multiply_add_contraction(kernels, tmp_path):
    """nvcc contracts a*b+c into FMA by default (ptxas fuses plain mul.f32/add.f32), the host
    compilers of the CPU twin and the host emulation do not: fp32 GPU results then drift from the
    CPU twin beyond the contract's bound. The build compiles the kernel with --fmad=false, which
    leaves only explicitly rounded (.rn, never fused) float arithmetic in the PTX; the remaining
    fma.rn.f32 are inside CUDA's own log2f/sqrtf. Compiled here with the build's own command."""
    import shlex
    import subprocess
    commands = json.loads((kernels.path.parent / "compile_commands.json").read_text())
    entry = next(e for e in commands if e["file"].endswith("MultilevelRoIAlignKernel.cu"))
    command = shlex.split(entry["command"])
    assert "--fmad=false" in command and "-Xcompiler=-ffp-contract=off" in command
    command = command[:command.index("-o")] + ["-o", str(tmp_path / "kernel.ptx")]
    command = ["-ptx" if part == "-c" else part for part in command]
    subprocess.run(command, check=True, capture_output=True, cwd=entry.get("directory"), timeout=300)
    ptx = (tmp_path / "kernel.ptx").read_text()
    import re
    assert not re.findall(r"\b(?:mul|add|sub)\.f32\b", ptx), "contractible float arithmetic in the kernel"
    assert len(re.findall(r"\b(?:mul|add|sub)\.rn\.f32\b", ptx)) > 50


def test_fp32_host_emulation_equals_the_cpu_twin_on_the_gpu_checks_case(kernels):
    """Without contraction the kernel's fp32 arithmetic is the CPU twin's, operation for operation:
    on the GPU check's own inputs (bench/gpu_kernel.py, smaller) the two agree bit for bit, so the
    GPU check's 1e-5 bound (plugins/README.md) has only the device's log2f/sqrtf to absorb."""
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from gpu_kernel import random_inputs
    finally:
        sys.path.remove(str(REPO / "bench"))
    from maskrt.plugins.cpu import multilevel_roi_align as cpu_twin
    for sampling_ratio in (2, 0):
        rois, features = random_inputs(2, 128, 8, 800, np.float32, seed=sampling_ratio)
        ours = kernels.host_emulation(rois, features, RoIAlignAttributes(sampling_ratio=sampling_ratio))
        theirs = cpu_twin(rois, features, list(SCALES), 7, 7, sampling_ratio)
        assert np.array_equal(ours, theirs)


def test_adaptive_grid_is_capped_like_the_contract(kernels):
    """At most 64 samples per bin side (was 2^20: up to 2^40 iterations in one GPU thread while
    TensorRT times the plugin on arbitrary data)."""
    rois, features = big_adaptive_roi_case()
    expected = reference_multilevel_roi_align(rois, features, [1.0], 1, 1, 0, canonical_level=0)
    attrs = RoIAlignAttributes(output_height=1, output_width=1, sampling_ratio=0, spatial_scales=(1.0,),
                               canonical_level=0)
    np.testing.assert_allclose(kernels.host_emulation(rois, features, attrs), expected, rtol=0, atol=1e-5)
    huge = np.array([[[0.0, 0.0, 1e9, 1e9]]], np.float32)  # would be 2^40 samples: now 64 x 64
    assert np.isfinite(kernels.host_emulation(huge, features, attrs)).all()


def test_feature_maps_out_of_level_order_are_refused_by_the_kernel(kernels):
    """The plugin's enqueue/onShapeChange check (validateMultilevelRoIAlignParams): maps must shrink
    level by level as spatial_scales say, rounded either way."""
    attrs = RoIAlignAttributes()
    finest_first = [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert kernels.check(2, 3, 4, finest_first, attrs) is None
    assert kernels.check(2, 3, 4, [(13, 19), (7, 10), (3, 5), (2, 2)], attrs) is None  # odd sizes, either rounding
    for bad in (finest_first[::-1], [(16, 24), (4, 6), (8, 12), (2, 3)], [(16, 24)] * 4, [(16, 24), (8, 24), (4, 6), (2, 3)]):
        message = kernels.check(2, 3, 4, bad, attrs)
        assert message is not None and message.startswith("feature maps must be finest first"), (bad, message)
