"""ONNX Runtime support for graphs with ``maskrt::MultilevelRoIAlign`` nodes (the TensorRT target).

Two ways to give ONNX Runtime the op, both running the same C++ CPU code (plugins/cpu):

1. **Native** (preferred): ``libmaskrt_ort_ops.so``, an ONNX Runtime custom-op library built from
   ``plugins/cpu/MultilevelRoIAlignOrt.cpp`` where ONNX Runtime's C/C++ headers exist
   (``build_native_library``). It takes the node exactly as exported: variadic feature inputs,
   the ``spatial_scales`` float list, float32 and float16.
2. **Python** (fallback, a fresh CI machine): a Python op registered with
   ``onnxruntime-extensions`` that calls ``maskrt.plugins.cpu`` through ctypes. That package's
   Python ops have a fixed number of inputs, read only scalar int/float/string attributes and
   take no float16, so the exported node cannot run as it is. ``prepare_model`` therefore
   rewrites each node, in memory and only for ONNX Runtime, into the equivalent
   ``maskrt.python::MultilevelRoIAlign`` node: inputs cast to float32, the feature list padded to
   5 inputs by repeating the last map, all attributes in one JSON string attribute, the output
   cast back to the input's dtype (``CastLike``). The file on disk is unchanged, and TensorRT
   sees the original node.

Use, for either way::

    options = onnxruntime.SessionOptions()
    register_custom_ops(options)
    session = onnxruntime.InferenceSession(prepare_model(path), options, providers=[...])

or simply ``create_session(path)``. ``prepare_model`` returns the path untouched when the native
library is used, so calling it is always right.

Never imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from maskrt.errors import MaskrtError
from maskrt.plugins import cpu

DOMAIN = "maskrt"
OP_TYPE = "MultilevelRoIAlign"
PYTHON_DOMAIN = "maskrt.python"  # the rewritten node's domain: never confused with the real op
NATIVE_LIBRARY_NAME = "libmaskrt_ort_ops.so"
ORT_SOURCE = Path(__file__).resolve().parent / "cpu" / "MultilevelRoIAlignOrt.cpp"

# Attributes the op reads and their contract defaults; plugin_namespace / plugin_version are
# carried by the node for TensorRT and ignored here.
DEFAULT_ATTRIBUTES: dict[str, Any] = {
    "output_height": 7, "output_width": 7, "sampling_ratio": 2, "aligned": 0,
    "spatial_scales": list(cpu.DEFAULT_SPATIAL_SCALES), "canonical_scale": 224.0, "canonical_level": 4, "mode": 0,
}

_python_op_declared = False


def native_library_path() -> Path | None:
    """``$MASKRT_ORT_OPS_LIB`` if set (must exist), else the library ``build_native_library`` made from
    the current sources, else None."""
    override = os.environ.get("MASKRT_ORT_OPS_LIB")
    if override:
        if not Path(override).is_file():
            raise MaskrtError(f"MASKRT_ORT_OPS_LIB names {override}, which does not exist")
        return Path(override)
    built = _native_build_dir() / NATIVE_LIBRARY_NAME
    return built if built.is_file() else None


def _native_build_dir() -> Path:
    """build/ort-ops-<hash of the three sources>: an edited source is never served by a stale library."""
    digest = hashlib.sha256(ORT_SOURCE.read_bytes())
    for name in cpu.CPU_SOURCES:
        digest.update((cpu.CPU_SOURCE_DIR / name).read_bytes())
    return cpu.build_root() / f"ort-ops-{digest.hexdigest()[:16]}"


def custom_op_backend() -> str:
    """"native" when libmaskrt_ort_ops.so is available, else "python" (onnxruntime-extensions)."""
    return "native" if native_library_path() is not None else "python"


def register_custom_ops(session_options: Any) -> None:
    """Make ``maskrt`` domain ops runnable in sessions created with ``session_options``.

    Registers libmaskrt_ort_ops.so when available, else the onnxruntime-extensions Python op; in
    the second case the session must be given ``prepare_model(path)`` instead of the path.
    """
    native = native_library_path()
    if native is not None:
        try:
            session_options.register_custom_ops_library(str(native))
        except Exception as err:  # ORT raises its own pybind types
            raise MaskrtError(f"ONNX Runtime cannot load {native}: {str(err).strip().splitlines()[0]}") from None
        return
    extensions = _import_extensions()
    _declare_python_op(extensions)
    session_options.register_custom_ops_library(extensions.get_library_path())


def prepare_model(model: str | os.PathLike | bytes) -> str | bytes:
    """What to hand ``onnxruntime.InferenceSession``: the model itself with the native library, else
    the serialized model with every ``maskrt::MultilevelRoIAlign`` node rewritten for the Python op."""
    if custom_op_backend() == "native":
        return os.fspath(model) if not isinstance(model, bytes) else model
    try:
        import onnx
    except ImportError:
        raise MaskrtError("running maskrt::MultilevelRoIAlign without libmaskrt_ort_ops.so needs the onnx "
                          "package (pip install onnx onnxruntime-extensions)") from None
    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    else:
        if not Path(model).is_file():
            raise MaskrtError(f"ONNX model not found: {model}")
        proto = onnx.load(os.fspath(model))
    return rewrite_for_python_op(proto).SerializeToString()


def create_session(model: str | os.PathLike | bytes, session_options: Any = None,
                   providers: Sequence[Any] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for a graph that may contain maskrt ops."""
    import onnxruntime as ort
    options = session_options if session_options is not None else ort.SessionOptions()
    register_custom_ops(options)
    return ort.InferenceSession(prepare_model(model), sess_options=options,
                                providers=list(providers) if providers else ["CPUExecutionProvider"])


# ---- the Python fallback -----------------------------------------------------------------

def _import_extensions() -> Any:
    try:
        import onnxruntime_extensions
    except ImportError:
        raise MaskrtError(
            "the graph has maskrt::MultilevelRoIAlign nodes: install onnxruntime-extensions "
            f"(pip install onnxruntime-extensions) or build {NATIVE_LIBRARY_NAME} "
            "(python -c 'import maskrt.plugins.ort as o; o.build_native_library()' with ORT_INCLUDE_DIR set)") from None
    return onnxruntime_extensions


def node_attributes(node: Any) -> dict[str, Any]:
    """The contract's attributes of one MultilevelRoIAlign NodeProto, defaults filled in, validated."""
    from onnx import helper
    values = dict(DEFAULT_ATTRIBUTES)
    for attribute in node.attribute:
        if attribute.name in values:
            value = helper.get_attribute_value(attribute)
            values[attribute.name] = [float(v) for v in value] if attribute.name == "spatial_scales" else value
    feature_count = len(node.input) - 1
    if feature_count != len(values["spatial_scales"]):
        raise MaskrtError(f"node {node.name or node.output[0]!r}: {feature_count} feature inputs but "
                          f"{len(values['spatial_scales'])} spatial_scales")
    cpu._check_scales(values["spatial_scales"])
    return values


def rewrite_for_python_op(model: Any) -> Any:
    """A copy of ``model`` (ModelProto) whose maskrt::MultilevelRoIAlign nodes run as the Python op."""
    import onnx
    from onnx import TensorProto, helper
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    default_opset = next((o.version for o in rewritten.opset_import if o.domain in ("", "ai.onnx")), 0)
    if default_opset < 15:
        raise MaskrtError(f"the graph's ONNX opset is {default_opset}; the maskrt ops need opset >= 15 (CastLike)")
    graph = rewritten.graph
    if any(_is_maskrt_node(n) for n in _subgraph_nodes(graph)):
        raise MaskrtError("a maskrt::MultilevelRoIAlign node inside an If/Loop body cannot run on the Python "
                          f"fallback: build {NATIVE_LIBRARY_NAME} (ORT_INCLUDE_DIR + build_native_library())")
    new_nodes = []
    count = 0
    for node in graph.node:
        if not _is_maskrt_node(node):
            new_nodes.append(node)
            continue
        attributes = node_attributes(node)
        prefix = f"{node.name or 'MultilevelRoIAlign_' + str(count)}/python_op"
        count += 1
        as_float = []
        for index, name in enumerate(node.input):
            cast_name = f"{prefix}/input{index}_float32"
            new_nodes.append(helper.make_node("Cast", [name], [cast_name], name=f"{prefix}/cast{index}",
                                              to=TensorProto.FLOAT))
            as_float.append(cast_name)
        features = as_float[1:]
        features += [features[-1]] * (cpu.MAX_LEVELS - len(features))  # fixed arity; the kernel ignores the pad
        pooled = f"{prefix}/pooled_float32"
        new_nodes.append(helper.make_node(OP_TYPE, [as_float[0], *features], [pooled], name=f"{prefix}/op",
                                          domain=PYTHON_DOMAIN, config=json.dumps(attributes, sort_keys=True)))
        new_nodes.append(helper.make_node("CastLike", [pooled, node.input[0]], [node.output[0]],
                                          name=f"{prefix}/cast_back"))
    del graph.node[:]
    graph.node.extend(new_nodes)
    if count and not any(o.domain == PYTHON_DOMAIN for o in rewritten.opset_import):
        rewritten.opset_import.append(helper.make_operatorsetid(PYTHON_DOMAIN, 1))
    return rewritten


def _is_maskrt_node(node: Any) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def _subgraph_nodes(graph: Any) -> Iterator[Any]:
    """Every node of every graph nested in ``graph``'s nodes (If/Loop/Scan bodies), recursively."""
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from body.node
                yield from _subgraph_nodes(body)


@lru_cache(maxsize=64)
def _parse_config(config: str) -> dict[str, Any]:
    return json.loads(config)


def python_kernel(rois: np.ndarray, *inputs: Any, config: str) -> np.ndarray:
    """The Python op's body: rois [B,R,4] float32, 5 feature slots, config JSON -> [B,R,C,oh,ow] float32."""
    attributes = _parse_config(config)
    levels = len(attributes["spatial_scales"])
    return cpu.multilevel_roi_align(
        rois, list(inputs[:levels]), attributes["spatial_scales"], attributes["output_height"],
        attributes["output_width"], attributes["sampling_ratio"], attributes["aligned"],
        attributes["canonical_scale"], attributes["canonical_level"], attributes["mode"])


def _declare_python_op(extensions: Any) -> None:
    """Declare the Python op to onnxruntime-extensions once per process."""
    global _python_op_declared
    if _python_op_declared:
        return
    float32 = extensions.PyCustomOpDef.dt_float
    extensions.onnx_op(op_type=f"{PYTHON_DOMAIN}::{OP_TYPE}", inputs=[float32] * (1 + cpu.MAX_LEVELS),
                       outputs=[float32], attrs={"config": extensions.PyCustomOpDef.dt_string})(python_kernel)
    _python_op_declared = True


# ---- the native library -------------------------------------------------------------------

def build_native_library(ort_include_dir: str | os.PathLike | None = None) -> Path:
    """Compile libmaskrt_ort_ops.so from MultilevelRoIAlignOrt.cpp + the CPU op.

    ``ort_include_dir`` (or ``$ORT_INCLUDE_DIR``) is the folder holding ``onnxruntime_cxx_api.h``
    (in the microsoft/onnxruntime repository: include/onnxruntime/core/session). No library of
    ONNX Runtime is linked: the op library gets ORT's API table at registration.
    """
    include = ort_include_dir or os.environ.get("ORT_INCLUDE_DIR")
    if not include or not (Path(include) / "onnxruntime_cxx_api.h").is_file():
        raise MaskrtError("building libmaskrt_ort_ops.so needs ONNX Runtime's C/C++ headers: set ORT_INCLUDE_DIR "
                          "to the folder with onnxruntime_cxx_api.h (include/onnxruntime/core/session in the "
                          "microsoft/onnxruntime repository, matching the installed onnxruntime's version)")
    compiler = cpu.find_compiler()
    target_dir = _native_build_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / NATIVE_LIBRARY_NAME
    temporary = target_dir / f".{NATIVE_LIBRARY_NAME}.{os.getpid()}"
    command = [compiler, *cpu.COMPILE_FLAGS, "-fvisibility=hidden", f"-I{include}", f"-I{ORT_SOURCE.parent}",
               "-o", str(temporary), str(ORT_SOURCE), str(cpu.CPU_SOURCE_DIR / cpu.CPU_SOURCES[0])]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        temporary.unlink(missing_ok=True)
        first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
        raise MaskrtError(f"building {NATIVE_LIBRARY_NAME} failed: {first_error[:300]}")
    os.replace(temporary, target)
    return target

