"""`maskrt build`: a TensorRT engine from a TensorRT-target ONNX graph, with its metadata sidecar.

Written to the TensorRT Python builder API that TensorRT 10.3 (JetPack 6) and TensorRT 11 share:
``trt.Builder`` -> ``create_network`` (STRONGLY_TYPED: every layer's precision comes from the
ONNX graph, as exported with --precision) -> ``trt.OnnxParser`` -> builder config (workspace
pool, optimisation profile for a dynamic batch on ``images``, optional DLA core with GPU
fallback) -> ``build_serialized_network``. The MultilevelRoIAlign plugin library is loaded into
the builder's plugin registry before parsing, and a refusal (TensorRT returns None silently) is
a loud error.

Writes ``OUT`` and ``OUT.json``: the ONNX graph's ``metadata_props`` as a JSON object of strings
plus ``engine_*`` build facts; the runtime reads that sidecar. The metadata is read straight from
the protobuf bytes, so neither torch nor the onnx package is needed here (a Jetson has neither).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskrt.errors import MaskrtError

INPUT_NAME = "images"
DEFAULT_MAX_BATCH = 8
PLUGIN_DOMAIN = "maskrt"

# ModelProto field numbers (onnx.proto): what the sidecar and the plugin check need.
_MODEL_GRAPH = 7
_MODEL_OPSET_IMPORT = 8
_MODEL_METADATA_PROPS = 14
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_BYTES, _WIRE_FIXED32 = 0, 1, 2, 5


# ---- reading the ONNX file without the onnx package ---------------------------------------

def _read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buffer: memoryview):
    """(field number, wire type, value) of one protobuf message; bytes fields as memoryviews."""
    position = 0
    while position < len(buffer):
        key, position = _read_varint(buffer, position)
        number, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            value, position = _read_varint(buffer, position)
        elif wire == _WIRE_BYTES:
            length, position = _read_varint(buffer, position)
            if position + length > len(buffer):
                raise ValueError("truncated field")
            value, position = buffer[position:position + length], position + length
        elif wire == _WIRE_FIXED64:
            value, position = None, position + 8
        elif wire == _WIRE_FIXED32:
            value, position = None, position + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if position > len(buffer):
            raise ValueError("truncated message")
        yield number, wire, value


@dataclass(frozen=True)
class OnnxSummary:
    """What the build needs from the ONNX file: its metadata and the operator domains it imports."""

    metadata: dict[str, str]
    opset_domains: frozenset[str]


def read_onnx_summary(path: Path) -> OnnxSummary:
    """``metadata_props`` and opset-import domains of an ONNX file, without the onnx package."""
    metadata: dict[str, str] = {}
    domains: set[str] = set()
    has_graph = False
    try:
        view = memoryview(path.read_bytes())  # a few hundred MB at most; slices below copy nothing
        for number, wire, value in _fields(view):
            if wire != _WIRE_BYTES:
                continue
            has_graph = has_graph or number == _MODEL_GRAPH
            if number == _MODEL_METADATA_PROPS:  # StringStringEntryProto: 1 key, 2 value
                entry = {n: bytes(v).decode("utf-8") for n, w, v in _fields(value) if w == _WIRE_BYTES}
                metadata[entry.get(1, "")] = entry.get(2, "")
            elif number == _MODEL_OPSET_IMPORT:  # OperatorSetIdProto: 1 domain, 2 version
                domains.update(bytes(v).decode("utf-8") for n, w, v in _fields(value) if n == 1 and w == _WIRE_BYTES)
    except (ValueError, IndexError, UnicodeDecodeError):
        raise MaskrtError(f"{path} is not a readable ONNX model") from None
    except OSError as err:
        raise MaskrtError(f"cannot read {path}: {err.strerror}") from None
    if not has_graph:
        raise MaskrtError(f"{path} is not a readable ONNX model (it has no graph)")
    return OnnxSummary(metadata, frozenset(domains))


# ---- TensorRT ------------------------------------------------------------------------------

def import_tensorrt_builder() -> Any:
    """The full ``tensorrt`` module (the builder); a one-line MaskrtError when it is missing."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError:
        raise MaskrtError(
            "TensorRT's builder (Python module `tensorrt`) is not installed, so no engine can be built here: "
            "JetPack 6 ships it (apt install python3-libnvinfer), elsewhere pip install tensorrt (NVIDIA's wheels); "
            "the lean runtime cannot build; or use trtexec as in docs/build.md") from None
    if not hasattr(trt, "Builder"):
        raise MaskrtError("the installed `tensorrt` module has no Builder (a runtime-only install): "
                          "install the full TensorRT (JetPack 6, or pip install tensorrt) to build engines")
    return trt


def find_plugin_library(explicit: str | None) -> Path | None:
    """--plugin, else $MASKRT_PLUGIN_LIB, else build/plugins/libmaskrt_plugins.so (the runtime's rule)."""
    from maskrt.runtime.backends.tensorrt import find_plugin_library as runtime_rule
    return runtime_rule(explicit)


def load_plugin(trt: Any, builder: Any, library: Path) -> None:
    """Load the plugin library into the builder's registry, once per process (the runtime's rule:
    a library already registered is not loaded again, TensorRT's silent None becomes an error)."""
    from maskrt.runtime.backends.tensorrt import load_plugin_library
    load_plugin_library(trt, library, builder.get_plugin_registry())


def profile_shapes(input_shape: tuple[int, ...], max_batch: int | None,
                   dla: bool = False) -> tuple[tuple[int, ...], ...] | None:
    """(min, opt, max) shapes of ``images`` for a dynamic batch; None when the graph fixes the batch.

    opt is batch 1 (a camera stream runs one frame at a time); max is --max-batch (default 8).
    On the DLA (dla=True) min = opt = max = --max-batch (default 1): the DLA runs only fixed shapes,
    and with GPU fallback a dynamic profile silently puts every layer on the GPU.
    """
    if len(input_shape) != 4 or any(d < 0 for d in input_shape[1:]):
        raise MaskrtError(f"input {INPUT_NAME!r} must be [B,3,H,W] with fixed C, H, W; the graph has {list(input_shape)}")
    fixed_batch = input_shape[0]
    if fixed_batch >= 0:
        if max_batch is not None and max_batch != fixed_batch:
            raise MaskrtError(f"the graph was exported with a fixed batch of {fixed_batch}: --max-batch {max_batch} "
                              "needs a dynamic-batch export (maskrt export without --batch)")
        return None
    rest = tuple(input_shape[1:])
    if dla:
        fixed = 1 if max_batch is None else max_batch
        return (fixed, *rest), (fixed, *rest), (fixed, *rest)
    largest = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    return (1, *rest), (1, *rest), (largest, *rest)


def _parser_errors(parser: Any) -> str:
    messages = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        messages.append(error.desc() if hasattr(error, "desc") else str(error))
    return "; ".join(" ".join(m.split()) for m in messages)[:500] or "no details"


def build_engine(onnx_path: Path, plugin: Path | None, workspace_mib: int, dla_core: int | None,
                 max_batch: int | None, version_compatible: bool = False,
                 exclude_lean_runtime: bool = False) -> tuple[bytes, dict[str, str]]:
    """Build a serialized engine; returns (engine bytes, engine_* facts for the sidecar).

    version_compatible: BuilderFlag.VERSION_COMPATIBLE, required by the lean and dispatch runtimes
    (they refuse any other engine); exclude_lean_runtime adds EXCLUDE_LEAN_RUNTIME (the engine then
    runs only where a lean runtime of the same major is installed: tensorrt_lean itself).
    """
    trt = import_tensorrt_builder()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if plugin is not None:
        load_plugin(trt, builder, plugin)  # before parsing: the parser looks plugins up by name, version, namespace
    # STRONGLY_TYPED: required on TensorRT 10.x for graph-decided precision; 11.x is always strongly
    # typed (the flag is accepted there, and if a later release drops it, 0 means the same)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise MaskrtError(f"TensorRT cannot parse {onnx_path}: {_parser_errors(parser)}")

    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if INPUT_NAME not in inputs:
        raise MaskrtError(f"{onnx_path} has no input named {INPUT_NAME!r} (inputs: {sorted(inputs)})")
    shapes = profile_shapes(tuple(inputs[INPUT_NAME].shape), max_batch, dla=dla_core is not None)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if shapes is not None:
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, *shapes)
        config.add_optimization_profile(profile)
    if dla_core is not None:
        available = builder.num_DLA_cores
        if dla_core >= available:
            raise MaskrtError(f"--dla {dla_core}: this device has {available} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run (the plugin, fp32) go to the GPU

    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if exclude_lean_runtime:
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MaskrtError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    facts = {
        "engine_tensorrt_version": str(getattr(trt, "__version__", "unknown")),
        "engine_min_batch": str(shapes[0][0] if shapes else inputs[INPUT_NAME].shape[0]),
        "engine_max_batch": str(shapes[2][0] if shapes else inputs[INPUT_NAME].shape[0]),
        "engine_workspace_mib": str(workspace_mib),
        "engine_dla_core": "" if dla_core is None else str(dla_core),
        "engine_version_compatible": "1" if version_compatible else "0",
        "engine_lean_runtime_excluded": "1" if version_compatible and exclude_lean_runtime else "0",
    }
    return bytes(memoryview(serialized)), facts


def write_sidecar(onnx_path: str | Path, engine_path: str | Path, facts: dict[str, str] | None = None,
                  summary: OnnxSummary | None = None) -> Path:
    """Write ``<engine>.json`` (the ONNX metadata_props + ``facts``) beside an engine; returns its path.

    ``maskrt build`` calls it; after a ``trtexec`` build, call it yourself (docs/build.md).
    """
    summary = summary or read_onnx_summary(Path(onnx_path))
    engine_path = Path(engine_path)
    sidecar = engine_path.with_name(engine_path.name + ".json")
    sidecar.write_text(json.dumps({**summary.metadata, **(facts or {})}, indent=2, sort_keys=True) + "\n")
    return sidecar


def build_command(args: argparse.Namespace) -> int:
    """`maskrt build --onnx FILE --out FILE.engine [--plugin LIB] [--workspace MB] [--dla N] [--max-batch N]
    [--version-compatible [--exclude-lean-runtime]]`."""
    onnx_path = Path(args.onnx)
    if not onnx_path.is_file():
        raise MaskrtError(f"ONNX file not found: {onnx_path}")
    if args.workspace is not None and args.workspace < 1:
        raise MaskrtError(f"--workspace must be >= 1 MiB, got {args.workspace}")
    if args.max_batch is not None and args.max_batch < 1:
        raise MaskrtError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.dla is not None and args.dla < 0:
        raise MaskrtError(f"--dla must be a DLA core index >= 0, got {args.dla}")
    version_compatible = bool(getattr(args, "version_compatible", False))
    exclude_lean_runtime = bool(getattr(args, "exclude_lean_runtime", False))
    if exclude_lean_runtime and not version_compatible:
        raise MaskrtError("--exclude-lean-runtime applies to version-compatible engines: add --version-compatible")
    summary = read_onnx_summary(onnx_path)
    import_tensorrt_builder()  # before any work: the missing builder is the message to give
    plugin = find_plugin_library(args.plugin)
    if plugin is None and PLUGIN_DOMAIN in summary.opset_domains:
        raise MaskrtError(f"{onnx_path} has maskrt::MultilevelRoIAlign nodes but no plugin library was found: "
                          "run `maskrt plugin build`, or pass --plugin / set MASKRT_PLUGIN_LIB")
    if summary.metadata.get("target", "tensorrt") != "tensorrt":
        print(f"maskrt: note: {onnx_path} was exported with --target {summary.metadata['target']}; "
              "--target tensorrt is the graph made for TensorRT", file=sys.stderr)

    engine, facts = build_engine(onnx_path, plugin, args.workspace or 2048, args.dla, args.max_batch,
                                 version_compatible, exclude_lean_runtime)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(engine)
    sidecar = write_sidecar(onnx_path, out, facts, summary)
    print(f"wrote {out} ({len(engine) / 2**20:.1f} MiB, batch {facts['engine_min_batch']}..{facts['engine_max_batch']}"
          f"{', plugin ' + str(plugin) if plugin else ''}) and its metadata {sidecar}")
    return 0
