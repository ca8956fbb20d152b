"""TensorRT backend: deserialise an engine, run it through cuda-python buffers.

Uses only the API TensorRT 10.3 (JetPack 6) and TensorRT 11 share: named I/O tensors,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``. Works with the full
``tensorrt`` package or the lean runtime ``tensorrt_lean``; the lean (and dispatch) runtime runs
only version-compatible engines (``maskrt build --version-compatible``), and says so. GPU memory goes through
cuda-python (``cuda.bindings.runtime``, or the older ``cuda.cudart``), imported lazily.

Our MultilevelRoIAlign plugin library must be loaded before deserialising: from the
``plugin`` argument (``--plugin``), else ``$MASKRT_PLUGIN_LIB``, else the default build
folder ``build/plugins/libmaskrt_plugins.so``. TensorRT's registry returns None *silently*
when a library cannot be loaded (e.g. it lacks ``getCreators``/``setLoggerFinder``); we
turn that into a loud error.

The engine's metadata lives beside it: ``X.engine.json`` / ``X.plan.json``.
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from maskrt.errors import MaskrtError
from maskrt.runtime.backends import OUTPUT_NAMES

PLUGIN_LIBRARY_NAME = "libmaskrt_plugins.so"
PLUGIN_ENV = "MASKRT_PLUGIN_LIB"


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, else ``tensorrt_lean``, else a one-line MaskrtError."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
        return trt
    except ImportError:
        pass
    try:
        import tensorrt_lean as trt  # type: ignore[import-not-found]
        return trt
    except ImportError:
        raise MaskrtError(
            "TensorRT is not installed, so a .engine/.plan cannot run here: install TensorRT "
            "(JetPack ships it; or pip install tensorrt) or run the .onnx with --backend onnxruntime") from None


def import_cudart() -> Any:
    """cuda-python's runtime module (new or old layout), else a one-line MaskrtError."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[import-not-found]
        return cudart
    except ImportError:
        raise MaskrtError("cuda-python is not installed (needed for TensorRT buffers): pip install cuda-python") from None


def find_plugin_library(plugin: str | None = None) -> Path | None:
    """The plugin library to load: explicit path, $MASKRT_PLUGIN_LIB, then the default build folders."""
    explicit = plugin or os.environ.get(PLUGIN_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise MaskrtError(f"plugin library not found: {path}")
        return path
    repo_root = Path(__file__).resolve().parents[2]
    for folder in (Path.cwd() / "build" / "plugins", repo_root / "build" / "plugins"):
        if (folder / PLUGIN_LIBRARY_NAME).is_file():
            return folder / PLUGIN_LIBRARY_NAME
    return None


PLUGIN_CREATOR = ("MultilevelRoIAlign", "1", "maskrt")  # name, version, namespace


def _plugin_registered(registry: Any) -> bool:
    """Whether the registry already holds our creator (TensorRT 10+: get_creator; older: get_plugin_creator)."""
    get_creator = getattr(registry, "get_creator", None) or getattr(registry, "get_plugin_creator", None)
    return get_creator is not None and get_creator(*PLUGIN_CREATOR) is not None


def load_plugin_library(trt: Any, path: Path, registry: Any = None) -> None:
    """Load our plugin library into TensorRT's registry (the process-wide one unless given); raise loudly
    when TensorRT refuses it.

    Loads once per process: TensorRT's ``load_library`` returns None, like a refusal, when the
    library's plugins are already registered (a second Predictor, a reopened engine), so the
    registry is asked for the creator first. A library built for another TensorRT major is refused
    before TensorRT sees it (it would register nothing, see plugins/README.md).
    """
    from maskrt.plugins.build import plugin_library_tensorrt_major
    registry = trt.get_plugin_registry() if registry is None else registry
    built_for = plugin_library_tensorrt_major(path)
    version = str(getattr(trt, "__version__", ""))
    if built_for is not None and version.split(".")[0].isdigit() and int(version.split(".")[0]) != built_for:
        raise MaskrtError(
            f"the plugin library {path} was built against TensorRT {built_for} headers but this is TensorRT "
            f"{version}: a build serves one TensorRT major; rebuild it with `maskrt plugin build --tensorrt-include "
            f"<TensorRT {version.split('.')[0]} include/>`")
    if _plugin_registered(registry):
        return
    handle = registry.load_library(str(path))
    if handle is None and not _plugin_registered(registry):
        raise MaskrtError(
            f"TensorRT refused the plugin library {path} (its registry returned None): the library must export "
            "extern \"C\" getCreators and setLoggerFinder and match this TensorRT; rebuild it with `maskrt plugin build`")


def is_lean_or_dispatch(trt: Any) -> bool:
    """Whether the module is TensorRT's lean or dispatch runtime (they run version-compatible engines only)."""
    return str(getattr(trt, "__name__", "")).split(".")[0] in ("tensorrt_lean", "tensorrt_dispatch")


def deserialise_failure(trt: Any, path: Path, library: Path | None, version_compatible: bool) -> str:
    """The one-line reason for a refused engine: the lean runtime's real cause first."""
    if is_lean_or_dispatch(trt) and not version_compatible:
        return (f"{trt.__name__} runs only version-compatible engines and {path} is not one (its sidecar has no "
                "engine_version_compatible=1): rebuild it with `maskrt build --version-compatible` "
                "(or trtexec --versionCompatible), or run it with the full `tensorrt` package")
    hint = (f"plugin library {library} loaded" if library is not None else
            f"no plugin library found (give --plugin or ${PLUGIN_ENV})")
    return (f"TensorRT could not deserialise {path} ({hint}); an engine runs only with the TensorRT version and "
            "GPU it was built for (a version-compatible one also with later versions of the same major)")


def read_sidecar_metadata(path: Path) -> dict[str, str]:
    """The JSON object in ``<engine>.json`` as a dict of strings."""
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        raise MaskrtError(f"{path} has no maskrt metadata: the sidecar {sidecar.name} is missing (`maskrt build` writes it)")
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as err:
        raise MaskrtError(f"cannot read engine metadata {sidecar}: {err}") from None
    if not isinstance(data, dict):
        raise MaskrtError(f"engine metadata {sidecar} must be a JSON object")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}


def _check(result: Any, what: str) -> Any:
    """cuda-python calls return (err, *values): raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        hint = " (no NVIDIA GPU or driver on this machine?)" if "Driver" in name or "NoDevice" in name else ""
        raise MaskrtError(f"CUDA call {what} failed: {name}{hint}")
    return values[0] if len(values) == 1 else values


def _cuda_version(number: int) -> str:
    """CUDA's version integer (12060) as text (12.6)."""
    return f"{number // 1000}.{number % 1000 // 10}"


def select_device(cudart: Any, device: int) -> None:
    """cudaSetDevice, with a failure named for what it is: no driver, or a driver older than the CUDA
    runtime cuda-python was built for (cuda-python 13 needs a CUDA 13 driver; JetPack 6 has CUDA 12.6)."""
    err = cudart.cudaSetDevice(device)[0]
    if int(err) == 0:
        return
    name = getattr(err, "name", str(err))
    driver_err, driver = cudart.cudaDriverGetVersion()
    runtime_err, runtime = cudart.cudaRuntimeGetVersion()
    if int(driver_err) == 0 and int(runtime_err) == 0 and 0 < int(driver) < int(runtime):
        major = int(runtime) // 1000
        raise MaskrtError(
            f"CUDA call cudaSetDevice({device}) failed: {name}: version mismatch: the installed cuda-python is built for "
            f"CUDA {_cuda_version(int(runtime))}, but this NVIDIA driver supports CUDA {_cuda_version(int(driver))} at "
            f"most; install the cuda-python of the driver's CUDA (pip install 'cuda-python>={_cuda_version(int(driver))},"
            f"<{int(driver) // 1000 + 1}'; JetPack 6: 'cuda-python>=12.6,<13') or a driver for CUDA {major}")
    _check((err,), f"cudaSetDevice({device})")


class _DeviceBuffer:
    """One GPU allocation, grown on demand."""

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart
        self.pointer = 0
        self.capacity = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.capacity:
            self.free()
            self.pointer = int(_check(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self.capacity = nbytes
        return self.pointer

    def free(self) -> None:
        if self.pointer:
            self.cudart.cudaFree(self.pointer)
            self.pointer, self.capacity = 0, 0


class _PinnedHostBuffer:
    """Page-locked host memory (cudaMallocHost), grown on demand: the copies to and from the GPU run
    asynchronously from it, at full bus speed, instead of through a pageable staging copy."""

    def __init__(self, cudart: Any) -> None:
        self.cudart = cudart
        self.pointer = 0
        self.capacity = 0

    def view(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A numpy array of this shape and dtype on the buffer (valid until the next view or free)."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes > self.capacity:
            self.free()
            self.pointer = int(_check(self.cudart.cudaMallocHost(max(nbytes, 1)), "cudaMallocHost"))
            self.capacity = nbytes
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(self.pointer)
        return np.frombuffer(raw, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize).reshape(shape)

    def free(self) -> None:
        if self.pointer:
            self.cudart.cudaFreeHost(self.pointer)
            self.pointer, self.capacity = 0, 0


class TensorRTBackend:
    """Runs a serialised TensorRT engine (``.engine``/``.plan``) on one GPU. ``close()`` releases the
    stream, the GPU and pinned host buffers and the engine (also on garbage collection)."""

    name = "tensorrt"

    def __init__(self, path: Path, device: int = 0, plugin: str | None = None) -> None:
        self.path = Path(path)
        # TensorRT first: without it nothing else matters, and that is the message to give.
        trt = import_tensorrt()
        self.metadata = read_sidecar_metadata(self.path)
        cudart = import_cudart()
        self.trt, self.cudart = trt, cudart
        select_device(cudart, device)
        library = find_plugin_library(plugin)
        if library is not None:
            load_plugin_library(trt, library)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        dla_core = self.metadata.get("engine_dla_core", "")
        if dla_core.isdigit():
            self.runtime.DLA_core = int(dla_core)  # the core the engine was built for, before deserialising
        version_compatible = self.metadata.get("engine_version_compatible") == "1"
        if version_compatible and self.metadata.get("engine_lean_runtime_excluded") != "1":
            # The engine carries the lean runtime (host code): allowed for engines maskrt built so.
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise MaskrtError(deserialise_failure(trt, self.path, library, version_compatible))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise MaskrtError(f"TensorRT could not create an execution context for {self.path} "
                              "(out of GPU memory? its log above says why)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = "images"
        missing = [n for n in (self.input_name, *OUTPUT_NAMES) if n not in names]
        if missing:
            raise MaskrtError(f"{self.path} lacks the tensors {', '.join(missing)}: not a maskrt Mask R-CNN engine")
        self.dtypes = {name: self._numpy_dtype(self.engine.get_tensor_dtype(name)) for name in names}
        batch_dim = int(self.engine.get_tensor_shape(self.input_name)[0])
        self.fixed_batch: int | None = batch_dim if batch_dim > 0 else None
        # A dynamic-batch engine accepts its optimisation profile's batches: at most max, at least
        # min (smaller batches are padded in run); min == max (a DLA engine) is a fixed batch.
        self.max_batch: int | None = None
        self.min_batch = 1
        if self.fixed_batch is None:
            profile = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.min_batch, self.max_batch = int(profile[0][0]), int(profile[2][0])
            if self.min_batch == self.max_batch:
                self.fixed_batch, self.max_batch = self.min_batch, None
        self.buffers = {name: _DeviceBuffer(cudart) for name in names}
        self.host_buffers = {name: _PinnedHostBuffer(cudart) for name in names}
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _numpy_dtype(self, trt_dtype: Any) -> np.dtype:
        table = {self.trt.DataType.FLOAT: np.float32, self.trt.DataType.HALF: np.float16,
                 self.trt.DataType.INT32: np.int32, self.trt.DataType.INT8: np.int8,
                 self.trt.DataType.BOOL: np.bool_}
        for name, numpy_type in (("INT64", np.int64), ("UINT8", np.uint8)):  # not in every version
            if hasattr(self.trt.DataType, name):
                table[getattr(self.trt.DataType, name)] = numpy_type
        if trt_dtype not in table:
            raise MaskrtError(f"{self.path}: unsupported tensor type {trt_dtype}")
        return np.dtype(table[trt_dtype])

    def _bind(self, name: str, pointer: int) -> None:
        if not self.context.set_tensor_address(name, pointer):
            raise MaskrtError(f"TensorRT refused the address of tensor {name!r} of {self.path}")

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float32 [B,3,H,W] -> the five outputs, copied back to host numpy arrays."""
        if getattr(self, "context", None) is None:
            raise MaskrtError(f"the TensorRT backend of {self.path} is closed")
        cudart = self.cudart
        count = images.shape[0]
        if count < self.min_batch:  # below the profile's minimum: pad with copies of the last image
            images = np.concatenate([images, np.repeat(images[-1:], self.min_batch - count, axis=0)])
        shape = tuple(images.shape)
        if not self.context.set_input_shape(self.input_name, shape):
            raise MaskrtError(f"{self.path} does not accept input shape {shape} (see its profile)")
        to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host_input = self.host_buffers[self.input_name].view(shape, self.dtypes[self.input_name])
        host_input[...] = images
        pointer = self.buffers[self.input_name].ensure(host_input.nbytes)
        _check(cudart.cudaMemcpyAsync(pointer, host_input.ctypes.data, host_input.nbytes, to_device, self.stream),
               "cudaMemcpyAsync")
        self._bind(self.input_name, pointer)
        outputs: dict[str, np.ndarray] = {}
        for name in OUTPUT_NAMES:
            outputs[name] = self.host_buffers[name].view(tuple(self.context.get_tensor_shape(name)), self.dtypes[name])
            self._bind(name, self.buffers[name].ensure(outputs[name].nbytes))
        if not self.context.execute_async_v3(int(self.stream)):  # TensorRT takes the raw handle
            raise MaskrtError(f"TensorRT failed to run {self.path}")
        for name, host in outputs.items():
            _check(cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name].pointer, host.nbytes, to_host,
                                          self.stream), "cudaMemcpyAsync")
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        # Copies: the pinned buffers are reused by the next run.
        return {name: value[:count].copy() for name, value in outputs.items()}

    def close(self) -> None:
        """Release the execution context, engine, stream and buffers; idempotent."""
        stream = getattr(self, "stream", None)
        if stream is not None:
            self.cudart.cudaStreamSynchronize(stream)
        self.context = None
        self.engine = None
        for buffer in [*getattr(self, "buffers", {}).values(), *getattr(self, "host_buffers", {}).values()]:
            buffer.free()
        if stream is not None:
            self.cudart.cudaStreamDestroy(stream)
            self.stream = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: cuda-python may be gone already
            pass
