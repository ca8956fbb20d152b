"""fp16 and int8 versions of an exported fp32 graph (TensorRT 11 is strongly typed: precision
lives in the graph, so these passes decide it, not the engine builder).

Which nodes change is decided by the PyTorch module each node came from: the dynamo exporter
records it in every node's `pkg.torch.onnx.name_scopes` metadata (e.g. `['', 'model',
'backbone', 'body', 'layer1', ...]`). The convolutional bulk — backbone + FPN, the RPN head,
the box head's MLP and the mask head's convs — changes precision; everything that decides
*which* boxes come out (anchor/box decode, softmax, top-k, NMS, RoIAlign's level rule, the
final class/box/mask predictors) stays float32. Inputs and outputs stay float32.

- `to_fp16`: ONNX Runtime's `convert_float_to_float16(keep_io_types=True, node_block_list=...)`,
  which puts Cast nodes at the fp16/fp32 borders.
- `to_int8`: `onnxruntime.quantization.quantize_static` in QDQ format, int8 symmetric,
  per-channel weights, MinMax ranges calibrated on letterboxed images; only the nodes of the
  modules above are quantized.
"""
from __future__ import annotations

import ast
import tempfile
from pathlib import Path
from typing import Sequence

import onnx

from maskrt.errors import MaskrtError

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# Module paths (below the export wrapper's `model`) whose nodes run in reduced precision.
REDUCED_PRECISION_MODULES: tuple[tuple[str, ...], ...] = (
    ("backbone",),
    ("rpn", "head"),
    ("roi_heads", "box_head"),
    ("roi_heads", "mask_head"),
)
# Ops that never change precision even inside those modules (none of them are compute-heavy).
FLOAT32_OPS = frozenset({"NonMaxSuppression", "RoiAlign", "TopK", "Softmax", "Exp", "Log",
                         "MultilevelRoIAlign", "Range", "NonZero", "Shape", "ConstantOfShape"})


def module_path(node: onnx.NodeProto) -> tuple[str, ...]:
    """The PyTorch module path a node was traced from, without the export wrapper's prefix."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ()
            # ['', 'model', 'backbone', 'body', ...] -> ('backbone', 'body', ...)
            scopes = [s for s in scopes if s]
            if scopes and scopes[0] == "model":
                scopes = scopes[1:]
            return tuple(scopes)
    return ()


def in_reduced_precision(node: onnx.NodeProto) -> bool:
    """True for the nodes the fp16/int8 passes may change (see REDUCED_PRECISION_MODULES)."""
    if node.domain not in ("", "ai.onnx") or node.op_type in FLOAT32_OPS:
        return False
    path = module_path(node)
    return any(path[:len(prefix)] == prefix for prefix in REDUCED_PRECISION_MODULES)


def to_fp16(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and activations in the convolutional bulk, float32 elsewhere and at the I/O."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    names = [n.name for n in model_proto.graph.node]
    if len(set(names)) != len(names) or not all(names):
        raise MaskrtError("fp16 conversion needs unique node names; re-export the fp32 graph")
    kept_float32 = [n.name for n in model_proto.graph.node if not in_reduced_precision(n)]
    if len(kept_float32) == len(names):
        raise MaskrtError("fp16 conversion found no backbone/head nodes (no module metadata in the graph?)")
    return convert_float_to_float16(model_proto, keep_io_types=True, node_block_list=kept_float32,
                                    op_block_list=sorted(FLOAT32_OPS | {"MultilevelRoIAlign"}))


def _calibrator_class():
    """MinMaxCalibrater whose session also knows the maskrt custom op (TensorRT-target graphs)."""
    import onnxruntime
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    class MaskrtMinMaxCalibrater(MinMaxCalibrater):
        def create_inference_session(self) -> None:
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
            if _has_custom_nodes(onnx.load(self.augmented_model_path, load_external_data=False)):
                from maskrt.plugins.ort import register_custom_ops

                register_custom_ops(options)
            self.infer_session = onnxruntime.InferenceSession(
                self.augmented_model_path, sess_options=options, providers=self.execution_providers)

    return MaskrtMinMaxCalibrater


def _has_custom_nodes(model_proto: onnx.ModelProto) -> bool:
    return any(n.domain not in ("", "ai.onnx") for n in model_proto.graph.node)


def to_int8(model_proto: onnx.ModelProto, calib_dir: str | Path | None, input_size: tuple[int, int],
            image_mean: Sequence[float], target: str = "onnx") -> onnx.ModelProto:
    """QDQ int8 (symmetric, per-channel weights) of the convolutional bulk, calibrated on images."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from maskrt.export.calibration import CalibrationImages

    reader = CalibrationImages(calib_dir, input_size, image_mean)
    to_quantize = [n.name for n in model_proto.graph.node if in_reduced_precision(n)]
    if not to_quantize:
        raise MaskrtError("int8 quantization found no backbone/head nodes (no module metadata in the graph?)")
    with tempfile.TemporaryDirectory(prefix="maskrt-int8-") as tmp:
        tmp_dir = Path(tmp)
        fp32_path = tmp_dir / "fp32.onnx"
        onnx.save(model_proto, fp32_path)
        calibrator = _calibrator_class()(
            str(fp32_path), op_types_to_calibrate=None,
            augmented_model_path=str(tmp_dir / "augmented.onnx"), symmetric=True)
        calibrator.augment_graph()
        calibrator.create_inference_session()
        calibrator.collect_data(reader)
        cache = tmp_dir / "ranges.json"
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
        int8_path = tmp_dir / "int8.onnx"
        quantize_static(
            str(fp32_path), str(int8_path), calibration_data_reader=None,
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            nodes_to_quantize=to_quantize, calibrate_method=CalibrationMethod.MinMax,
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
