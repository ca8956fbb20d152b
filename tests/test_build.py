"""`maskrt build`: clear errors without TensorRT, metadata read from raw ONNX bytes, and the
builder calls checked against a recording stand-in for the `tensorrt` module."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from maskrt.errors import MaskrtError
from maskrt.export import engine

METADATA = {"target": "tensorrt", "precision": "fp32", "class_names": json.dumps(["__background__", "cat"]),
            "input_size": "[64, 96]", "note": "ünïcode ✓"}


def write_graph(path: Path, batch: int | str = "B", maskrt_node: bool = True, big: bool = False) -> Path:
    """A small graph on input images [batch,3,64,96]; optionally a maskrt node and a 4 MB initializer."""
    nodes = [helper.make_node("Relu", ["images"], ["relu"])]
    initializers = []
    if maskrt_node:
        nodes.append(helper.make_node("MultilevelRoIAlign", ["rois", "relu"], ["pooled"], domain="maskrt",
                                      spatial_scales=[1.0], plugin_namespace="maskrt", plugin_version="1"))
    if big:  # pushes metadata behind a field whose length needs a multi-byte varint
        initializers.append(numpy_helper.from_array(np.zeros((1024, 1024), np.float32), "big"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 64, 96]),
                                           helper.make_tensor_value_info("rois", TensorProto.FLOAT, [batch, 5, 4])],
                              [helper.make_tensor_value_info("relu", TensorProto.FLOAT, None)], initializer=initializers)
    opsets = [helper.make_operatorsetid("", 17)] + ([helper.make_operatorsetid("maskrt", 1)] if maskrt_node else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    helper.set_model_props(model, METADATA)
    onnx.save(model, str(path))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maskrt", "build", *args], capture_output=True, text=True)


def test_build_without_tensorrt_is_exit_2_and_one_line(tmp_path):
    pytest.importorskip("onnx")
    if subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True).returncode == 0:
        pytest.skip("TensorRT's builder is installed here")
    graph = write_graph(tmp_path / "model.onnx")
    proc = run_cli("--onnx", str(graph), "--out", str(tmp_path / "model.engine"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskrt: error: TensorRT's builder")
    assert "pip install tensorrt" in lines[0] and "JetPack" in lines[0]
    assert not (tmp_path / "model.engine").exists()


def test_missing_onnx_file_is_one_line(tmp_path):
    proc = run_cli("--onnx", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "x.engine"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"maskrt: error: ONNX file not found: {tmp_path / 'nope.onnx'}"


@pytest.mark.parametrize("big", [False, True])
def test_summary_reads_metadata_and_domains_like_onnx(tmp_path, big):
    path = write_graph(tmp_path / "model.onnx", big=big)
    summary = engine.read_onnx_summary(path)
    model = onnx.load(str(path))
    assert summary.metadata == {p.key: p.value for p in model.metadata_props} == METADATA
    assert summary.opset_domains == {o.domain for o in model.opset_import} == {"", "maskrt"}


def test_summary_rejects_a_file_that_is_not_onnx(tmp_path):
    for name, content in [("text.onnx", b"hello, this is not protobuf\xff\xff"), ("empty.onnx", b"")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(MaskrtError, match="is not a readable ONNX model"):
            engine.read_onnx_summary(tmp_path / name)


def test_profile_shapes():
    assert engine.profile_shapes((-1, 3, 64, 96), None) == ((1, 3, 64, 96), (1, 3, 64, 96), (8, 3, 64, 96))
    assert engine.profile_shapes((-1, 3, 64, 96), 3)[2] == (3, 3, 64, 96)
    assert engine.profile_shapes((2, 3, 64, 96), None) is None
    assert engine.profile_shapes((2, 3, 64, 96), 2) is None
    with pytest.raises(MaskrtError, match="fixed batch of 2"):
        engine.profile_shapes((2, 3, 64, 96), 4)
    with pytest.raises(MaskrtError, match="fixed C, H, W"):
        engine.profile_shapes((-1, 3, -1, -1), None)


def test_dla_profile_is_a_fixed_batch():
    """The DLA needs min = opt = max; with GPU fallback a dynamic profile put every layer on the GPU."""
    assert engine.profile_shapes((-1, 3, 64, 96), None, dla=True) == ((1, 3, 64, 96),) * 3
    assert engine.profile_shapes((-1, 3, 64, 96), 4, dla=True) == ((4, 3, 64, 96),) * 3
    assert engine.profile_shapes((2, 3, 64, 96), None, dla=True) is None


# ---- a recording stand-in for the tensorrt module -----------------------------------------

class FakeTensorRT(types.ModuleType):
    """Just the API `maskrt build` uses, recording every call in `calls`."""

    def __init__(self, input_shape=(-1, 3, 64, 96), refuse_plugin=False, parse_ok=True, dla_cores=2):
        super().__init__("tensorrt")
        calls: list = []
        self.calls = calls
        self.__version__ = "10.3.0"
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
        self.BuilderFlag = types.SimpleNamespace(GPU_FALLBACK="GPU_FALLBACK", VERSION_COMPATIBLE="VERSION_COMPATIBLE",
                                                 EXCLUDE_LEAN_RUNTIME="EXCLUDE_LEAN_RUNTIME")

        class Logger:
            WARNING = "WARNING"

            def __init__(self, severity):
                calls.append(("Logger", severity))

        registered: set = set()

        class Registry:
            """TensorRT's behaviour: load_library returns None when the plugins are already registered."""

            def load_library(self, path):
                calls.append(("load_library", path))
                if refuse_plugin or registered:
                    return None
                registered.add(("MultilevelRoIAlign", "1", "maskrt"))
                return object()

            def get_creator(self, name, version, namespace):
                return object() if (name, version, namespace) in registered else None

        class Input:
            name = "images"
            shape = input_shape

        class Network:
            num_inputs = 1

            def get_input(self, index):
                return Input()

        class Config:
            def __init__(self):
                self.flags = []

            def set_memory_pool_limit(self, pool, size):
                calls.append(("memory_pool", pool, size))

            def add_optimization_profile(self, profile):
                calls.append(("profile", profile.shapes))

            def set_flag(self, flag):
                calls.append(("flag", flag))

            def __setattr__(self, name, value):
                if name != "flags":
                    calls.append(("config", name, value))
                object.__setattr__(self, name, value)

        class Profile:
            def set_shape(self, name, low, opt, high):
                self.shapes = (name, tuple(low), tuple(opt), tuple(high))

        class Builder:
            num_DLA_cores = dla_cores

            def __init__(self, logger):
                calls.append(("Builder",))

            def get_plugin_registry(self):
                return Registry()

            def create_network(self, flags):
                calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls.append(("build",))
                return b"ENGINE-BYTES"

        class Error:
            def desc(self):
                return "No importer registered for op: MultilevelRoIAlign"

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                calls.append(("parse", path))
                return parse_ok

            def get_error(self, index):
                return Error()

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser


def build_args(tmp_path: Path, **overrides) -> argparse.Namespace:
    values = dict(onnx=str(tmp_path / "model.onnx"), out=str(tmp_path / "out" / "model.engine"), plugin=None,
                  workspace=1024, dla=None, max_batch=None)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture
def plugin_file(tmp_path, monkeypatch):
    path = tmp_path / "libmaskrt_plugins.so"
    path.write_bytes(b"\x7fELF")  # only its existence matters to the stand-in
    monkeypatch.delenv("MASKRT_PLUGIN_LIB", raising=False)
    return path


def test_build_calls_the_builder_api_and_writes_engine_and_sidecar(tmp_path, monkeypatch, plugin_file):
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    write_graph(tmp_path / "model.onnx")
    assert engine.build_command(build_args(tmp_path, plugin=str(plugin_file), max_batch=4, dla=1)) == 0
    calls = fake.calls
    names = [c[0] for c in calls]
    assert names.index("load_library") < names.index("parse"), "the plugin must be registered before parsing"
    assert ("load_library", str(plugin_file)) in calls
    assert ("create_network", 1 << 5) in calls  # STRONGLY_TYPED only
    assert ("memory_pool", "WORKSPACE", 1024 << 20) in calls
    # --dla: min = opt = max (the DLA runs fixed shapes only)
    assert ("profile", ("images", (4, 3, 64, 96), (4, 3, 64, 96), (4, 3, 64, 96))) in calls
    assert ("config", "default_device_type", "DLA") in calls and ("config", "DLA_core", 1) in calls
    assert ("flag", "GPU_FALLBACK") in calls
    out = tmp_path / "out" / "model.engine"
    assert out.read_bytes() == b"ENGINE-BYTES"
    sidecar = json.loads((tmp_path / "out" / "model.engine.json").read_text())
    assert {k: sidecar[k] for k in METADATA} == METADATA
    assert all(isinstance(v, str) for v in sidecar.values())
    assert sidecar["engine_max_batch"] == sidecar["engine_min_batch"] == "4"
    assert sidecar["engine_tensorrt_version"] == "10.3.0" and sidecar["engine_dla_core"] == "1"


def test_two_builds_in_one_process_load_the_plugin_once(tmp_path, monkeypatch, plugin_file):
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    write_graph(tmp_path / "model.onnx")
    assert engine.build_command(build_args(tmp_path, plugin=str(plugin_file))) == 0
    assert engine.build_command(build_args(tmp_path, plugin=str(plugin_file), out=str(tmp_path / "b.engine"))) == 0
    assert [c for c in fake.calls if c[0] == "load_library"] == [("load_library", str(plugin_file))]


def test_version_compatible_engine_for_the_lean_runtime(tmp_path, monkeypatch, plugin_file):
    """The lean and dispatch runtimes run only version-compatible engines: --version-compatible sets
    the builder flag (and --exclude-lean-runtime its companion) and records it in the sidecar."""
    write_graph(tmp_path / "model.onnx")
    for extra, flags in (({}, []), ({"version_compatible": True}, ["VERSION_COMPATIBLE"]),
                         ({"version_compatible": True, "exclude_lean_runtime": True},
                          ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"])):
        fake = FakeTensorRT()
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        assert engine.build_command(build_args(tmp_path, plugin=str(plugin_file), **extra)) == 0
        assert [c[1] for c in fake.calls if c[0] == "flag"] == flags
        sidecar = json.loads((tmp_path / "out" / "model.engine.json").read_text())
        assert sidecar["engine_version_compatible"] == ("1" if flags else "0")
        assert sidecar["engine_lean_runtime_excluded"] == ("1" if len(flags) == 2 else "0")
    with pytest.raises(MaskrtError, match="--exclude-lean-runtime applies to version-compatible engines"):
        engine.build_command(build_args(tmp_path, plugin=str(plugin_file), exclude_lean_runtime=True))


def test_fixed_batch_graph_gets_no_profile(tmp_path, monkeypatch, plugin_file):
    fake = FakeTensorRT(input_shape=(2, 3, 64, 96))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    write_graph(tmp_path / "model.onnx", batch=2)
    assert engine.build_command(build_args(tmp_path, plugin=str(plugin_file))) == 0
    assert not [c for c in fake.calls if c[0] in ("profile", "config")]
    sidecar = json.loads((tmp_path / "out" / "model.engine.json").read_text())
    assert sidecar["engine_min_batch"] == sidecar["engine_max_batch"] == "2"


def test_refused_plugin_library_is_a_loud_error(tmp_path, monkeypatch, plugin_file):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(refuse_plugin=True))
    write_graph(tmp_path / "model.onnx")
    with pytest.raises(MaskrtError, match="refused the plugin library .*getCreators and setLoggerFinder"):
        engine.build_command(build_args(tmp_path, plugin=str(plugin_file)))
    assert not (tmp_path / "out" / "model.engine").exists()


def test_maskrt_graph_without_plugin_library_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT())
    monkeypatch.delenv("MASKRT_PLUGIN_LIB", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine, "find_plugin_library", lambda explicit: None)
    write_graph(tmp_path / "model.onnx")
    with pytest.raises(MaskrtError, match="has maskrt::MultilevelRoIAlign nodes but no plugin library"):
        engine.build_command(build_args(tmp_path))


def test_parser_failure_and_bad_dla_core_are_one_line(tmp_path, monkeypatch, plugin_file):
    write_graph(tmp_path / "model.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(parse_ok=False))
    with pytest.raises(MaskrtError, match="cannot parse .*No importer registered for op: MultilevelRoIAlign"):
        engine.build_command(build_args(tmp_path, plugin=str(plugin_file)))
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT(dla_cores=0))
    with pytest.raises(MaskrtError, match="--dla 0: this device has 0 DLA core"):
        engine.build_command(build_args(tmp_path, plugin=str(plugin_file), dla=0))


@pytest.mark.parametrize("flag, value, message", [("workspace", 0, "--workspace"), ("max_batch", 0, "--max-batch"),
                                                  ("dla", -1, "--dla")])
def test_bad_numbers_are_rejected_before_tensorrt(tmp_path, flag, value, message):
    write_graph(tmp_path / "model.onnx")
    with pytest.raises(MaskrtError, match=message):
        engine.build_command(build_args(tmp_path, **{flag: value}))


def test_write_sidecar_for_a_trtexec_engine(tmp_path):
    write_graph(tmp_path / "model.onnx")
    sidecar = engine.write_sidecar(tmp_path / "model.onnx", tmp_path / "model.plan")
    assert sidecar == tmp_path / "model.plan.json"
    assert json.loads(sidecar.read_text()) == METADATA
