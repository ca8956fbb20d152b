"""fp16 and int8 versions of an exported fp32 graph (TensorRT 11 is strongly typed: precision
lives in the graph, so these passes decide it, not the engine builder).

Which nodes change is decided by the PyTorch module each node came from: the dynamo exporter
records it in every node's `pkg.torch.onnx.name_scopes` metadata (e.g. `['', 'model.backbone',
'model.backbone.body', ..., 'conv2d_3']`). The convolutional bulk — backbone + FPN, the RPN head,
the box head's MLP and the mask head's convs — changes precision; everything that decides
*which* boxes come out (anchor/box decode, softmax, top-k, NMS, RoIAlign's level rule, the
final class/box/mask predictors) stays float32. Inputs and outputs stay float32.

- `to_fp16`: a small pass of our own (ONNX Runtime's `convert_float_to_float16` with a node
  block list casts around every blocked node: >1000 Casts here): fp16 initializers and one Cast
  per value crossing the region's border.
- `to_int8`: `onnxruntime.quantization.quantize_static` in QDQ format, int8 symmetric,
  per-channel weights, MinMax ranges calibrated on letterboxed images; only the nodes of the
  modules above are quantized.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import onnx

from maskrt.errors import MaskrtError

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# Modules (qualified names as the exporter records them) whose nodes run in reduced precision.
REDUCED_PRECISION_MODULES: tuple[str, ...] = (
    "model.backbone",
    "model.rpn.head",
    "model.roi_heads.box_head",
    "model.roi_heads.mask_head",
)
# Ops that never change precision even inside those modules (none of them are compute-heavy).
# InstanceNormalization is GroupNorm's export: its mean/variance over a whole group lose too
# much in fp16 (TensorRT's advice too: normalisation layers in fp32).
FLOAT32_OPS = frozenset({"NonMaxSuppression", "RoiAlign", "TopK", "Softmax", "Exp", "Log",
                         "MultilevelRoIAlign", "Range", "NonZero", "Shape", "ConstantOfShape",
                         "InstanceNormalization", "LayerNormalization", "GroupNormalization"})
# The op types int8 quantizes: the weighted ones (per-channel weights). Element-wise ops between
# them stay float; TensorRT fuses Q/DQ + Conv (+ bias, ReLU) itself.
INT8_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def module_path(node: onnx.NodeProto) -> tuple[str, ...]:
    """The qualified names of the PyTorch modules a node was traced inside, outermost first.

    The exporter's `name_scopes` is e.g. `['', 'model.backbone', 'model.backbone.body', ...,
    'conv2d_3']`: each module's full name, then the op's own name (dropped here).
    """
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ()
            return tuple(s for s in scopes[:-1] if s)
    return ()


def in_reduced_precision(node: onnx.NodeProto) -> bool:
    """True for the nodes the fp16/int8 passes may change (see REDUCED_PRECISION_MODULES)."""
    if node.domain not in ("", "ai.onnx") or node.op_type in FLOAT32_OPS:
        return False
    return any(module in REDUCED_PRECISION_MODULES for module in module_path(node))


# Float inputs that stay float32 whatever the data type (ONNX types them tensor(float)).
_FLOAT32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}


def to_fp16(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations in the convolutional bulk, float32 elsewhere and at the I/O.

    A Cast is put on each float32 value entering the fp16 region (once per value) and on each
    fp16 value leaving it, so the graph is strongly typed: what TensorRT 11 builds as written.
    """
    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    elem_type = {v.name: v.type.tensor_type.elem_type
                 for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]}
    initializers = {t.name: t for t in graph.initializer}
    elem_type.update({name: t.data_type for name, t in initializers.items()})
    region = [n for n in graph.node if in_reduced_precision(n)]
    if not region:
        raise MaskrtError("fp16 conversion found no backbone/head nodes (no module metadata in the graph?)")
    in_region = {id(n) for n in region}
    produced_in_region = {out for n in region for out in n.output}
    float32 = onnx.TensorProto.FLOAT
    float16 = onnx.TensorProto.FLOAT16

    to_half: dict[str, str] = {}  # float32 value from outside -> its fp16 twin
    new_initializers: list[onnx.TensorProto] = []
    casts_in: list[onnx.NodeProto] = []
    for node in region:
        keep32 = _FLOAT32_INPUTS.get(node.op_type, ())
        for index, name in enumerate(node.input):
            if not name or index in keep32 or name in produced_in_region or elem_type.get(name) != float32:
                continue
            if name not in to_half:
                to_half[name] = f"{name}__fp16"
                if name in initializers:
                    half = onnx.numpy_helper.from_array(
                        onnx.numpy_helper.to_array(initializers[name]).astype("float16"), to_half[name])
                    new_initializers.append(half)
                else:
                    casts_in.append(onnx.helper.make_node("Cast", [name], [to_half[name]], to=float16,
                                                          name=f"{name}__cast_fp16"))
            node.input[index] = to_half[name]
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type == float32:
                    attribute.t.CopyFrom(onnx.numpy_helper.from_array(
                        onnx.numpy_helper.to_array(attribute.t).astype("float16"), attribute.t.name))
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == float32:
                attribute.i = float16
            if node.op_type == "ConstantOfShape" and attribute.name == "value" and attribute.t.data_type == float32:
                attribute.t.CopyFrom(onnx.numpy_helper.from_array(
                    onnx.numpy_helper.to_array(attribute.t).astype("float16"), attribute.t.name))

    # fp16 values leaving the region: one Cast back to float32, consumers outside rewired.
    graph_outputs = {o.name for o in graph.output}
    to_float: dict[str, str] = {}
    casts_out: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in in_region:
            continue
        for index, name in enumerate(node.input):
            if name in produced_in_region and elem_type.get(name) == float32:
                if name not in to_float:
                    to_float[name] = f"{name}__fp32"
                    casts_out.append(onnx.helper.make_node("Cast", [name], [to_float[name]], to=float32,
                                                           name=f"{name}__cast_fp32"))
                node.input[index] = to_float[name]
    if graph_outputs & produced_in_region:
        raise MaskrtError("fp16 conversion: a graph output comes straight from the fp16 region")

    # Topological order: each Cast right after the node producing its input (graph inputs'
    # casts first).
    cast_after: dict[str, list[onnx.NodeProto]] = {}
    for cast in [*casts_in, *casts_out]:
        cast_after.setdefault(cast.input[0], []).append(cast)
    produced = {out for n in graph.node for out in n.output}
    nodes = [c for name, casts in cast_after.items() if name not in produced for c in casts]
    for node in graph.node:
        nodes.append(node)
        for out in node.output:
            nodes.extend(cast_after.get(out, ()))
    del graph.node[:]
    graph.node.extend(nodes)
    # Initializers now only read through their fp16 twin are dropped.
    still_read = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers)
    del graph.value_info[:]  # stale types; check_graph re-infers
    return model


def _calibrator_class():
    """MinMaxCalibrater whose session also knows the maskrt custom op (TensorRT-target graphs)."""
    import onnxruntime
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    class MaskrtMinMaxCalibrater(MinMaxCalibrater):
        def create_inference_session(self) -> None:
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
            model: str | bytes = self.augmented_model_path
            if _has_custom_nodes(onnx.load(self.augmented_model_path, load_external_data=False)):
                # TensorRT-target graph: ONNX Runtime runs its plugin node through the CPU op.
                from maskrt.plugins.ort import prepare_model, register_custom_ops

                register_custom_ops(options)
                model = prepare_model(self.augmented_model_path)
            self.infer_session = onnxruntime.InferenceSession(
                model, sess_options=options, providers=self.execution_providers)

    return MaskrtMinMaxCalibrater


# ONNX Runtime's quantize_static logs this advice on the root logger for every graph that did not
# go through its pre-processing script. The user cannot act on it here: our passes choose the
# nodes themselves and the graph's shapes are already inferred.
QUANT_PREPROCESS_ADVICE = "pre-processing before quantization"


class _DropQuantPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return QUANT_PREPROCESS_ADVICE not in record.getMessage()


@contextlib.contextmanager
def without_quant_preprocess_advice() -> Iterator[None]:
    """Drop ONNX Runtime's pre-processing advice from the root logger; every other record passes.

    `logging.warning` configures the root logger (a stderr handler, for good) when it has no
    handler; a temporary stderr handler stands in for that, so records other than the advice
    still reach stderr and nothing is left configured afterwards."""
    root = logging.getLogger()
    advice_filter = _DropQuantPreprocessAdvice()
    stand_in = None
    if not root.handlers:
        stand_in = logging.StreamHandler(sys.stderr)
        stand_in.setLevel(logging.WARNING)
        root.addHandler(stand_in)
    root.addFilter(advice_filter)
    try:
        yield
    finally:
        root.removeFilter(advice_filter)
        if stand_in is not None:
            root.removeHandler(stand_in)


def _has_custom_nodes(model_proto: onnx.ModelProto) -> bool:
    return any(n.domain not in ("", "ai.onnx") for n in model_proto.graph.node)


def to_int8(model_proto: onnx.ModelProto, calib_dir: str | Path | None, input_size: tuple[int, int],
            image_mean: Sequence[float]) -> onnx.ModelProto:
    """QDQ int8 (symmetric, per-channel weights) of the convolutional bulk, calibrated on images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from maskrt.export.calibration import CalibrationImages

    reader = CalibrationImages(calib_dir, input_size, image_mean)
    to_quantize = [n.name for n in model_proto.graph.node if in_reduced_precision(n) and n.op_type in INT8_OP_TYPES]
    if not to_quantize:
        raise MaskrtError("int8 quantization found no backbone/head nodes (no module metadata in the graph?)")
    with tempfile.TemporaryDirectory(prefix="maskrt-int8-") as tmp:
        tmp_dir = Path(tmp)
        fp32_path = tmp_dir / "fp32.onnx"
        onnx.save(model_proto, fp32_path)
        calibrator = _calibrator_class()(
            str(fp32_path), op_types_to_calibrate=list(INT8_OP_TYPES),
            augmented_model_path=str(tmp_dir / "augmented.onnx"), symmetric=True)
        calibrator.augment_graph()
        calibrator.create_inference_session()
        calibrator.collect_data(reader)
        cache = tmp_dir / "ranges.json"
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
        int8_path = tmp_dir / "int8.onnx"
        with without_quant_preprocess_advice():
            quantize_static(
                str(fp32_path), str(int8_path), calibration_data_reader=None,
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=to_quantize, op_types_to_quantize=list(INT8_OP_TYPES), calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=str(cache),
                # Symmetric activations (zero point 0) are what TensorRT's explicit quantization takes.
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
        quantized = onnx.load(int8_path)
    return quantized


def strip_node_metadata(model_proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node metadata but the module path (`pkg.torch.onnx.name_scopes`):
    stack traces hold local paths and triple the graph's text; the module path is what these
    passes read, so a saved fp32 graph can still be converted later."""
    for node in model_proto.graph.node:
        kept = [(p.key, p.value) for p in node.metadata_props if p.key == NAME_SCOPES_KEY]
        del node.metadata_props[:]
        for key, value in kept:
            node.metadata_props.add(key=key, value=value)
