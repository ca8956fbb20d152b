"""The TensorRT backend without a GPU: plugin-library lookup and its loud load check (with the
lean runtime when installed), and the run path (shapes, addresses, copies, dtypes) against a
fake TensorRT + cuda-python whose "GPU memory" is host memory."""
from __future__ import annotations

import ctypes
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from maskrt.errors import MaskrtError
from maskrt.runtime import Predictor
from maskrt.runtime.backends import tensorrt as trt_backend
from test_runtime_fakes import fake_metadata, standard_fake

# --- plugin library --------------------------------------------------------------------------


def test_plugin_library_lookup(tmp_path, monkeypatch):
    monkeypatch.delenv(trt_backend.PLUGIN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trt_backend, "__file__", str(tmp_path / "a" / "b" / "c.py"))  # no repo build/ folder
    assert trt_backend.find_plugin_library() is None
    with pytest.raises(MaskrtError, match="plugin library not found"):
        trt_backend.find_plugin_library(str(tmp_path / "nope.so"))
    built = tmp_path / "build" / "plugins" / trt_backend.PLUGIN_LIBRARY_NAME
    built.parent.mkdir(parents=True)
    built.write_bytes(b"\x7fELF")
    assert trt_backend.find_plugin_library().resolve() == built.resolve()  # the default build folder
    other = tmp_path / "other.so"
    other.write_bytes(b"\x7fELF")
    monkeypatch.setenv(trt_backend.PLUGIN_ENV, str(other))
    assert trt_backend.find_plugin_library() == other  # the environment wins over the build folder
    assert trt_backend.find_plugin_library(str(built)) == built  # and --plugin over both


def test_registry_refusing_a_library_is_a_loud_error():
    trt = pytest.importorskip("tensorrt_lean")
    import ctypes.util
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to offer TensorRT")
    # libm exports neither getCreators nor setLoggerFinder: TensorRT returns None, silently.
    with pytest.raises(MaskrtError, match="registry returned None"):
        trt_backend.load_plugin_library(trt, Path(libm))


def test_a_library_built_for_another_tensorrt_major_is_named(tmp_path):
    """The build records its TensorRT major in the file; a mismatch is named before TensorRT sees it."""
    library = tmp_path / "libmaskrt_plugins.so"
    library.write_bytes(b"\x7fELF..." + b"maskrt_plugin_tensorrt_major=10\0" + b"...")
    registry = types.SimpleNamespace(load_library=lambda path: pytest.fail("must not reach TensorRT"))
    trt11 = types.SimpleNamespace(__version__="11.4.0.106", get_plugin_registry=lambda: registry)
    with pytest.raises(MaskrtError, match=r"built against TensorRT 10 headers but this is TensorRT 11\.4\.0\.106.*"
                                          r"--tensorrt-include <TensorRT 11 include/>"):
        trt_backend.load_plugin_library(trt11, library)


def test_engine_without_sidecar_or_cuda_python(tmp_path, monkeypatch):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace())
    with pytest.raises(MaskrtError, match="sidecar m.engine.json is missing"):
        Predictor(engine)
    (tmp_path / "m.engine.json").write_text("[1, 2]")
    with pytest.raises(MaskrtError, match="must be a JSON object"):
        Predictor(engine)
    (tmp_path / "m.engine.json").write_text(json.dumps(fake_metadata((128, 128))))
    for module in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, module, None)  # a machine without cuda-python
    with pytest.raises(MaskrtError, match="cuda-python is not installed"):
        Predictor(engine)


def test_a_driver_older_than_cuda_python_is_named_a_version_mismatch(tmp_path, monkeypatch):
    """cuda-python 13 on JetPack 6 (CUDA 12.6 driver): cudaErrorInsufficientDriver, named as the
    version mismatch it is, with the pin to install."""
    class Err(int):
        name = "cudaErrorInsufficientDriver"

    class OldDriverCudart(FakeCudart):
        def cudaSetDevice(self, device):
            return (Err(35),)

        def cudaDriverGetVersion(self):
            return 0, 12060

        def cudaRuntimeGetVersion(self):
            return 0, 13040

    engine = tmp_path / "m.engine"
    engine.write_bytes(b"good engine")
    (tmp_path / "m.engine.json").write_text(json.dumps(fake_metadata((128, 128))))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: make_fake_trt(None))
    monkeypatch.setattr(trt_backend, "import_cudart", OldDriverCudart)
    with pytest.raises(MaskrtError, match=r"cudaErrorInsufficientDriver: version mismatch: the installed cuda-python is "
                                          r"built for CUDA 13\.4, but this NVIDIA driver supports CUDA 12\.6 at most; "
                                          r"install .*'cuda-python>=12\.6,<13'"):
        Predictor(engine)


def test_engine_on_a_machine_without_gpu_is_one_clear_error(tmp_path):
    """The real lean TensorRT and cuda-python, no GPU: the first CUDA call fails, one line."""
    pytest.importorskip("tensorrt_lean")
    cudart = pytest.importorskip("cuda.bindings.runtime")
    if int(cudart.cudaSetDevice(0)[0]) == 0:
        pytest.skip("this machine has a GPU")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine")
    (tmp_path / "m.engine.json").write_text(json.dumps(fake_metadata((128, 128))))
    with pytest.raises(MaskrtError, match=r"CUDA call cudaSetDevice\(0\) failed: cudaError\w+ \(no NVIDIA GPU"):
        Predictor(engine)


# --- a fake TensorRT + cuda-python ------------------------------------------------------------

MAX_BATCH = 2  # the fake engine's optimisation profile: batches of 1 to 2

class FakeCudart:
    """cuda-python's calling convention ((err, value) tuples) over host memory."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self) -> None:
        self.blocks: dict[int, ctypes.Array] = {}
        self.pinned: dict[int, ctypes.Array] = {}
        self.copies: list[int] = []
        self.streams: set[int] = set()

    def cudaSetDevice(self, device):
        return (0,)

    def cudaMalloc(self, nbytes):
        block = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(block)] = block
        return 0, ctypes.addressof(block)

    def cudaFree(self, pointer):
        self.blocks.pop(pointer, None)
        return (0,)

    def cudaMallocHost(self, nbytes):
        block = ctypes.create_string_buffer(nbytes)
        self.pinned[ctypes.addressof(block)] = block
        return 0, ctypes.addressof(block)

    def cudaFreeHost(self, pointer):
        self.pinned.pop(pointer, None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        device, host = (dst, src) if kind == 1 else (src, dst)
        assert device in self.blocks and nbytes <= len(self.blocks[device]), "copy outside an allocation"
        assert host in self.pinned and nbytes <= len(self.pinned[host]), "copy from pageable host memory"
        assert stream in self.streams, "copy on a stream that is not alive"
        ctypes.memmove(dst, src, nbytes)
        self.copies.append(kind)
        return (0,)

    def cudaStreamCreate(self):
        stream = 1234 + len(self.streams)
        self.streams.add(stream)
        return 0, stream

    def cudaStreamDestroy(self, stream):
        self.streams.discard(stream)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)


def make_fake_trt(reference_outputs, expected_input_dtype=np.float32, module_name="tensorrt",
                  profile_batches=(1, 1, MAX_BATCH), context_ok=True, refuse_address=None):
    """A fake `tensorrt` module whose engine returns `reference_outputs(images)`; its optimisation
    profile accepts batches profile_batches[0] to profile_batches[2] (min, opt, max)."""
    runtimes: list = []
    DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT32="INT32", INT8="INT8", BOOL="BOOL",
                                     INT64="INT64")
    dtypes = {"images": "FLOAT", "num_dets": "INT32", "boxes": "FLOAT", "scores": "FLOAT", "labels": "INT32",
              "masks": "FLOAT"}
    numpy_of = {"FLOAT": np.float32, "INT32": np.int32}

    class Context:
        def __init__(self):
            self.shapes, self.addresses = {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return shape[1:] == (3, 128, 128) and profile_batches[0] <= shape[0] <= profile_batches[2]

        def get_tensor_shape(self, name):
            batch = self.shapes["images"][0]
            return {"num_dets": (batch,), "boxes": (batch, 5, 4), "scores": (batch, 5), "labels": (batch, 5),
                    "masks": (batch, 5, 28, 28)}[name]

        def set_tensor_address(self, name, pointer):
            self.addresses[name] = pointer
            return name != refuse_address

        def execute_async_v3(self, stream):
            shape = self.shapes["images"]
            count = int(np.prod(shape))
            images = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["images"]))
            outputs = reference_outputs(images.reshape(shape).copy())
            for name, value in outputs.items():
                value = np.ascontiguousarray(value, dtype=numpy_of[dtypes[name]])
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            return True

    class Engine:
        num_io_tensors = 6

        def get_tensor_name(self, index):
            return list(dtypes)[index]

        def get_tensor_dtype(self, name):
            return dtypes[name]

        def get_tensor_shape(self, name):
            return (-1, 3, 128, 128) if name == "images" else (-1,)

        def get_tensor_profile_shape(self, name, profile):
            return [(batch, 3, 128, 128) for batch in profile_batches]

        def create_execution_context(self):
            return Context() if context_ok else None

    class Registry:
        """TensorRT's behaviour: load_library returns None when the plugins are already registered."""
        loaded: list[str] = []
        creators: set[tuple[str, str, str]] = set()

        def load_library(self, path):
            Registry.loaded.append(path)
            if trt_backend.PLUGIN_CREATOR in Registry.creators:
                return None
            Registry.creators.add(trt_backend.PLUGIN_CREATOR)
            return object()

        def get_creator(self, name, version, namespace):
            return object() if (name, version, namespace) in Registry.creators else None

    class Runtime:
        engine_host_code_allowed = False
        DLA_core = -1

        def __init__(self, logger):
            runtimes.append(self)

        def deserialize_cuda_engine(self, data):
            self.dla_core_at_deserialisation = self.DLA_core
            return Engine() if data == b"good engine" else None

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    registry = Registry()
    return types.SimpleNamespace(DataType=DataType, Runtime=Runtime, Logger=Logger, __version__="10.3.0",
                                 __name__=module_name, get_plugin_registry=lambda: registry, registry=registry,
                                 runtimes=runtimes)


def test_tensorrt_backend_runs_like_onnxruntime(tmp_path, monkeypatch):
    onnx_model = standard_fake(tmp_path / "m.onnx", box_shift_per_mean=10.0)
    reference = Predictor(onnx_model, conf=0.0)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"good engine")
    (tmp_path / "m.engine.json").write_text(json.dumps(fake_metadata((128, 128))))
    plugin = tmp_path / "libmaskrt_plugins.so"
    plugin.write_bytes(b"\x7fELF")
    fake_trt, fake_cudart = make_fake_trt(reference.backend.run), FakeCudart()
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: fake_cudart)

    predictor = Predictor(engine, conf=0.0, plugin=str(plugin))
    assert predictor.backend.name == "tensorrt" and fake_trt.registry.loaded == [str(plugin)]
    assert predictor.backend.max_batch == MAX_BATCH
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (90, 70, 3), dtype=np.uint8), np.zeros((40, 100, 3), np.uint8)]
    for ours, theirs in zip(predictor.batch(images), reference.batch(images)):
        np.testing.assert_allclose(ours.boxes, theirs.boxes, atol=1e-5)
        assert np.array_equal(ours.labels, theirs.labels) and np.array_equal(ours.masks, theirs.masks)
    assert fake_cudart.copies.count(1) == 1 and fake_cudart.copies.count(2) == 5  # one in, five out
    predictor.batch(images[:1])  # a smaller batch reuses the buffers
    assert len(fake_cudart.blocks) == 6
    # Five images with a profile of at most 2: fed as 2 + 2 + 1, results in order.
    five = [rng.integers(0, 256, (50 + 7 * i, 60, 3), dtype=np.uint8) for i in range(5)]
    for ours, theirs in zip(predictor.batch(five), reference.batch(five)):
        np.testing.assert_allclose(ours.boxes, theirs.boxes, atol=1e-5)

    # A second Predictor on the same engine in the same process: the library is not loaded again
    # (TensorRT's load_library would return None for plugins already registered).
    second = Predictor(engine, conf=0.0, plugin=str(plugin))
    assert fake_trt.registry.loaded == [str(plugin)]
    assert len(second.batch(images[:1])) == 1

    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"engine for another TensorRT")
    (tmp_path / "bad.engine.json").write_text(json.dumps(fake_metadata((128, 128))))
    with pytest.raises(MaskrtError, match="could not deserialise"):
        Predictor(bad, plugin=str(plugin))


def test_lean_runtime_names_a_missing_version_compatible_build(tmp_path, monkeypatch):
    """tensorrt_lean runs only version-compatible engines: a refused engine says so, not 'wrong version'."""
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"engine for another TensorRT")
    (tmp_path / "m.engine.json").write_text(json.dumps(fake_metadata((128, 128))))
    fake_lean = make_fake_trt(None, module_name="tensorrt_lean")
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake_lean)
    monkeypatch.setattr(trt_backend, "import_cudart", FakeCudart)
    plugin = tmp_path / "libmaskrt_plugins.so"
    plugin.write_bytes(b"\x7fELF")
    with pytest.raises(MaskrtError, match=r"tensorrt_lean runs only version-compatible engines .* "
                                          r"`maskrt build --version-compatible`"):
        Predictor(engine, plugin=str(plugin))
    assert fake_lean.runtimes[-1].engine_host_code_allowed is False
    # A version-compatible engine carrying the lean runtime is host code: allowed for it only.
    (tmp_path / "m.engine.json").write_text(json.dumps({**fake_metadata((128, 128)), "engine_version_compatible": "1",
                                                        "engine_lean_runtime_excluded": "0"}))
    with pytest.raises(MaskrtError, match="could not deserialise"):
        Predictor(engine, plugin=str(plugin))
    assert fake_lean.runtimes[-1].engine_host_code_allowed is True


def test_the_real_lean_module_is_recognised():
    trt = pytest.importorskip("tensorrt_lean")
    assert trt_backend.is_lean_or_dispatch(trt)
    message = trt_backend.deserialise_failure(trt, Path("m.engine"), None, version_compatible=False)
    assert "runs only version-compatible engines" in message


@pytest.mark.parametrize("profile_batches", [(2, 2, 2), (2, 2, 3)])
def test_engine_whose_profile_minimum_is_above_one(tmp_path, monkeypatch, profile_batches):
    """A DLA engine (min = opt = max) is a fixed batch; any engine gets batches below its profile's
    minimum padded (copies of the last image) and only the real rows back. Its DLA core is applied
    before deserialising."""
    onnx_model = standard_fake(tmp_path / "m.onnx", box_shift_per_mean=10.0)
    reference = Predictor(onnx_model, conf=0.0)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"good engine")
    (tmp_path / "m.engine.json").write_text(json.dumps({**fake_metadata((128, 128)), "engine_dla_core": "1"}))
    plugin = tmp_path / "libmaskrt_plugins.so"
    plugin.write_bytes(b"\x7fELF")
    fake_trt = make_fake_trt(reference.backend.run, profile_batches=profile_batches)
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(trt_backend, "import_cudart", FakeCudart)
    predictor = Predictor(engine, conf=0.0, plugin=str(plugin))
    assert fake_trt.runtimes[-1].dla_core_at_deserialisation == 1
    fixed = profile_batches[0] == profile_batches[2]
    assert predictor.backend.fixed_batch == (2 if fixed else None)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (60 + 9 * i, 80, 3), dtype=np.uint8) for i in range(3)]
    for count in (1, 3):
        for ours, theirs in zip(predictor.batch(images[:count]), reference.batch(images[:count]), strict=True):
            np.testing.assert_allclose(ours.boxes, theirs.boxes, atol=1e-5)
            assert np.array_equal(ours.masks, theirs.masks)


def test_close_releases_stream_and_buffers_and_copies_use_pinned_memory(tmp_path, monkeypatch):
    onnx_model = standard_fake(tmp_path / "m.onnx", box_shift_per_mean=10.0)
    reference = Predictor(onnx_model, conf=0.0)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"good engine")
    (tmp_path / "m.engine.json").write_text(json.dumps(fake_metadata((128, 128))))
    plugin = tmp_path / "libmaskrt_plugins.so"
    plugin.write_bytes(b"\x7fELF")
    fake_cudart = FakeCudart()
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: make_fake_trt(reference.backend.run))
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: fake_cudart)
    image = np.random.default_rng(2).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    with Predictor(engine, conf=0.0, plugin=str(plugin)) as predictor:
        first = predictor(image)
        second = predictor(image)  # results are copies: the next run does not overwrite the first
        np.testing.assert_array_equal(first.boxes, second.boxes)
        np.testing.assert_allclose(first.boxes, reference(image).boxes, atol=1e-5)
        assert fake_cudart.streams and fake_cudart.blocks and fake_cudart.pinned
    assert not fake_cudart.streams and not fake_cudart.blocks and not fake_cudart.pinned
    predictor.close()  # idempotent
    with pytest.raises(MaskrtError, match="is closed"):
        predictor(image)


@pytest.mark.parametrize("problem, message", [
    (dict(context_ok=False), "could not create an execution context"),
    (dict(refuse_address="masks"), "refused the address of tensor 'masks'"),
])
def test_tensorrt_calls_that_fail_are_one_line_errors(tmp_path, monkeypatch, problem, message):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"good engine")
    (tmp_path / "m.engine.json").write_text(json.dumps(fake_metadata((128, 128))))
    plugin = tmp_path / "libmaskrt_plugins.so"
    plugin.write_bytes(b"\x7fELF")
    fake_cudart = FakeCudart()
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: make_fake_trt(lambda images: {}, **problem))
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: fake_cudart)
    with pytest.raises(MaskrtError, match=message):
        predictor = Predictor(engine, plugin=str(plugin))
        predictor.infer(np.zeros((1, 3, 128, 128), np.float32))
