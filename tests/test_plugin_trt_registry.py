"""The TensorRT plugin library (libmaskrt_plugins.so), without a GPU.

Built by `maskrt plugin build` against the real TensorRT headers ($TENSORRT_INCLUDE_DIR; no
package carries them, so CI without them skips, saying why), then:
- maskrt_plugin_check (C++, plugins/multilevel_roi_align/MultilevelRoIAlignPluginCheck.cpp)
  drives it through TensorRT's interfaces: serialisation round trip, build-phase queries,
  enqueue's shape checks, refused fields;
- the real TensorRT lean runtime's plugin registry (pip `tensorrt-lean-cu13`, the `tensorrt`
  extra) loads it and creates plugins from the fields of plugins/multilevel_roi_align.json.
$TENSORRT10_INCLUDE_DIR and $TENSORRT11_INCLUDE_DIR (optional) name TensorRT 10.x headers (JetPack 6
ships 10.3) and 11.x headers for the same build and check, and for the cross-major tests: a library
serves only the TensorRT major it was built for (maskrt_host_check, a stand-in host of either
major, and the real lean 11.4 registry show it refuses the other major instead of crashing).
"""
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
from maskrt.plugins import build as plugin_build

REPO = Path(__file__).resolve().parent.parent
CONTRACT = json.loads((REPO / "plugins" / "multilevel_roi_align.json").read_text())


def _skip(reason: str) -> None:
    print(f"SKIPPED: {reason}", file=sys.stderr)
    pytest.skip(reason)


def _build(include_env: str, tmp_path_factory) -> plugin_build.PluginBuild:
    include = os.environ.get(include_env)
    if not include:
        _skip(f"{include_env} is unset: the TensorRT plugin compiles only against TensorRT's headers, which no "
              f"package carries (get include/ from github.com/NVIDIA/TensorRT and set {include_env})")
    return _build_against(include, tmp_path_factory)


def _build_against(include: str, tmp_path_factory) -> plugin_build.PluginBuild:
    try:
        plugin_build.find_cmake()
        plugin_build.find_nvcc()
    except MaskrtError as err:
        _skip(str(err))
    return plugin_build.build_plugins(tmp_path_factory.mktemp("plugins"), include, "87")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> plugin_build.PluginBuild:
    return _build("TENSORRT_INCLUDE_DIR", tmp_path_factory)


def _run_check(result: plugin_build.PluginBuild) -> str:
    checker = result.build_dir / "maskrt_plugin_check"
    run = subprocess.run([str(checker), str(result.plugin_library)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run.stdout


def test_plugin_library_builds_and_exports_both_entry_points(built):
    assert built.plugin_library is not None and built.plugin_library.is_file()
    library = ctypes.CDLL(str(built.plugin_library))
    assert hasattr(library, "getCreators") and hasattr(library, "setLoggerFinder")
    version = plugin_build.tensorrt_header_version(built.tensorrt_include)
    assert version.split(".")[0] in {"10", "11"}, version


def test_plugin_passes_the_interface_check(built):
    output = _run_check(built)
    passed = [line for line in output.splitlines() if line.startswith("PASS ")]
    assert "0 failures" in output
    assert len(passed) >= 40, output
    for name in ("serialised_fields_equal_creation_fields", "create_runtime_phase_from_serialised",
                 "configure_dynamic_batch_and_rois", "enqueue_zero_rois_is_noop", "bad_mode_3",
                 "bad_spatial_scales_6_levels", "bad_output_height_0", "fp16_linear_supported"):
        assert f"PASS {name}" in passed, name


def test_plugin_builds_and_passes_against_tensorrt_10_headers(tmp_path_factory):
    """JetPack 6 ships TensorRT 10.3: the same sources against those headers."""
    result = _build("TENSORRT10_INCLUDE_DIR", tmp_path_factory)
    assert plugin_build.tensorrt_header_version(result.tensorrt_include).startswith("10.")
    assert "0 failures" in _run_check(result)


# ---- one build per TensorRT major --------------------------------------------------------------

@pytest.fixture(scope="module")
def built_per_major(tmp_path_factory) -> dict[int, plugin_build.PluginBuild]:
    """{10: build against 10.x headers, 11: against 11.x}; skips without both header sets."""
    folders = {10: os.environ.get("TENSORRT10_INCLUDE_DIR"), 11: os.environ.get("TENSORRT11_INCLUDE_DIR")}
    if not folders[11] and os.environ.get("TENSORRT_INCLUDE_DIR"):
        candidate = Path(os.environ["TENSORRT_INCLUDE_DIR"])
        if plugin_build.tensorrt_header_version(candidate).startswith("11."):
            folders[11] = str(candidate)
    missing = [f"TENSORRT{major}_INCLUDE_DIR" for major, folder in folders.items() if not folder]
    if missing:
        _skip(f"{' and '.join(missing)} unset: the cross-major tests need TensorRT 10.x and 11.x headers")
    builds = {major: _build_against(folder, tmp_path_factory) for major, folder in folders.items()}
    for major, result in builds.items():
        assert plugin_build.tensorrt_header_version(result.tensorrt_include).startswith(f"{major}.")
    return builds


@pytest.mark.parametrize("host_major,plugin_major", [(10, 10), (11, 11), (10, 11), (11, 10)])
def test_a_build_serves_its_own_tensorrt_major_and_refuses_the_other(built_per_major, host_major, plugin_major):
    """TensorRT 11 moved ILoggerFinder::findLogger and ILogger::log in their vtables: a 11.x build in a
    10.x process used to crash on its first logged error, a 10.x build in an 11.x process lost every
    message. Now the same major logs through the host's logger, the other is refused, saying why."""
    checker = built_per_major[host_major].build_dir / "maskrt_host_check"
    library = built_per_major[plugin_major].plugin_library
    run = subprocess.run([str(checker), str(library)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr)
    if host_major == plugin_major:
        assert run.stdout.startswith("LOGGED maskrt::MultilevelRoIAlign: cannot create 'bad': mode must be 0"), run
    else:
        assert run.stdout.strip() == "REFUSED", run
        assert (f"built against TensorRT {plugin_major} headers but the process runs TensorRT {host_major}"
                in run.stderr), run.stderr


def test_the_library_records_its_tensorrt_major(built_per_major):
    assert plugin_build.plugin_library_tensorrt_major(built_per_major[10].plugin_library) == 10
    assert plugin_build.plugin_library_tensorrt_major(built_per_major[11].plugin_library) == 11


def test_real_lean_11_registry_refuses_a_tensorrt_10_build(built_per_major):
    pytest.importorskip("tensorrt_lean", reason="tensorrt_lean is not installed (the `tensorrt` extra)")
    script = ("import sys, tensorrt_lean as trt\n"
              "trt.Logger(trt.Logger.WARNING)\n"
              "registry = trt.get_plugin_registry()\n"
              "print(registry.load_library(sys.argv[1]) is None, "
              "registry.get_creator('MultilevelRoIAlign', '1', 'maskrt') is None)\n")
    run = subprocess.run([sys.executable, "-c", script, str(built_per_major[10].plugin_library)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True"]
    assert "built against TensorRT 10 headers but the process runs TensorRT 11" in run.stderr


# ---- the real TensorRT lean runtime's registry ----------------------------------------------

@pytest.fixture(scope="module")
def creator(built):
    trt = pytest.importorskip(
        "tensorrt_lean", reason="tensorrt_lean is not installed (pip install tensorrt-lean-cu13==11.4.0.106, "
                                "the `tensorrt` extra)")
    built_for = plugin_build.tensorrt_header_version(built.tensorrt_include).split(".")[0]
    if built_for != trt.__version__.split(".")[0]:
        _skip(f"the lean runtime is TensorRT {trt.__version__} and $TENSORRT_INCLUDE_DIR names TensorRT {built_for} "
              "headers: a build serves its own major only (the cross-major tests cover that case)")
    trt.Logger(trt.Logger.WARNING)
    registry = trt.get_plugin_registry()
    handle = registry.load_library(str(built.plugin_library))
    assert handle is not None, "load_library refused the library (are both entry points exported?)"
    found = registry.get_creator("MultilevelRoIAlign", "1", "maskrt")
    assert found is not None
    return trt, found


def test_runtime_loads_the_library_once_per_process_with_the_real_registry(creator, built):
    """The real registry's load_library returns None for plugins already registered (a second
    Predictor, a reopened engine): maskrt's loader asks for the creator first and succeeds."""
    from maskrt.runtime.backends.tensorrt import load_plugin_library
    trt, _ = creator
    assert trt.get_plugin_registry().load_library(str(built.plugin_library)) is None  # TensorRT's own behaviour
    load_plugin_library(trt, built.plugin_library)
    load_plugin_library(trt, built.plugin_library)
    assert trt.get_plugin_registry().get_creator("MultilevelRoIAlign", "1", "maskrt") is not None


def test_runtime_names_a_tensorrt_10_build_in_the_lean_11_runtime(built_per_major):
    trt = pytest.importorskip("tensorrt_lean", reason="tensorrt_lean is not installed (the `tensorrt` extra)")
    from maskrt.runtime.backends.tensorrt import load_plugin_library
    with pytest.raises(MaskrtError, match="built against TensorRT 10 headers but this is TensorRT 11"):
        load_plugin_library(trt, built_per_major[10].plugin_library)


def _fields(trt, **values):
    fields = []
    for name, value in values.items():
        spec = next(a for a in CONTRACT["attributes"] if a["name"] == name)
        dtype = np.int32 if spec["trt_field_type"] == "INT32" else np.float32
        fields.append(trt.PluginField(name, np.atleast_1d(np.array(value, dtype)),
                                      getattr(trt.PluginFieldType, spec["trt_field_type"])))
    return trt.PluginFieldCollection(fields)


def test_registry_creator_fields_are_the_json_contract(creator):
    trt, found = creator
    assert (found.name, found.plugin_version, found.plugin_namespace) == ("MultilevelRoIAlign", "1", "maskrt")
    got = [(f.name, f.type) for f in found.field_names]
    expected = [(a["name"], getattr(trt.PluginFieldType, a["trt_field_type"])) for a in CONTRACT["attributes"]]
    assert got == expected


@pytest.mark.parametrize("phase", ["BUILD", "RUNTIME"])
def test_registry_creates_plugins_in_both_phases(creator, phase):
    trt, found = creator
    fields = _fields(trt, output_height=14, output_width=14, sampling_ratio=0, aligned=1,
                     spatial_scales=[0.25, 0.125, 0.0625], canonical_scale=224.0, canonical_level=4, mode=1)
    plugin = found.create_plugin("mask_pooler", fields, getattr(trt.TensorRTPhase, phase))
    assert plugin is not None
    core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    assert (core.plugin_name, core.plugin_version, core.plugin_namespace) == ("MultilevelRoIAlign", "1", "maskrt")
    assert found.create_plugin("defaults", trt.PluginFieldCollection([]), getattr(trt.TensorRTPhase, phase)) is not None


@pytest.mark.parametrize("bad", [
    dict(spatial_scales=[0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625]),
    dict(spatial_scales=[0.25, 0.0625]),
    dict(mode=3),
    dict(output_height=0),
    dict(aligned=2),
    dict(canonical_scale=-1.0),
])
def test_registry_refuses_bad_fields(creator, bad):
    trt, found = creator
    assert found.create_plugin("bad", _fields(trt, **bad), trt.TensorRTPhase.BUILD) is None
