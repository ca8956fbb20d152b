"""`export_onnx`: a MaskRCNN's `detect_batch` -> one ONNX graph, portable or TensorRT-target.

The graph (docs/design.md, "ONNX graph"):
- input  `images`   float32 [B,3,H,W] RGB in [0,1], letterboxed (B dynamic unless `batch`);
- outputs `num_dets` int32 [B], `boxes` float32 [B,D,4], `scores` float32 [B,D],
  `labels` int32 [B,D], `masks` float32 [B,D,28,28];
- `metadata_props`: everything the runtime needs (class names, input size, mean/std, ...).

The model is traced by `torch.onnx.export(dynamo=True)`; its two graph ops are translated by
`maskrt.export.translations` (`target="onnx"`: standard ops only; `"tensorrt"`: the
`maskrt::MultilevelRoIAlign` plugin node). Precision passes (`maskrt.export.precision`) run on
the fp32 graph afterwards.
"""
from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch

from maskrt import __version__
from maskrt.errors import MaskrtError
from maskrt.export import translations
from maskrt.export.precision import strip_node_metadata, to_fp16, to_int8

# ONNX Runtime 1.31 reads IR versions up to 13 and onnx 1.23 would write 14: pin it. IR 10 is
# what opset 18-21 graphs need and what TensorRT 10/11's parser reads.
IR_VERSION = 10
OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("num_dets", "boxes", "scores", "labels", "masks")
TARGETS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


class DetectBatchGraph(torch.nn.Module):
    """The exported forward: `images [B,3,H,W]` -> the five graph outputs with their ONNX dtypes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        num_dets, boxes, scores, labels, masks = self.model.detect_batch(images)
        # int32 for TensorRT (no int64 bindings needed) and the runtime; values are tiny.
        return (num_dets.to(torch.int32), boxes.to(torch.float32), scores.to(torch.float32),
                labels.to(torch.int32), masks.to(torch.float32))


def translation_table(target: str) -> dict[Any, Any]:
    """The custom_translation_table for the two `torch.ops.maskrt.*` graph ops of one target."""
    import maskrt.model.ops  # noqa: F401  (registers torch.ops.maskrt.*)

    roi_align = (translations.multilevel_roi_align_tensorrt if target == "tensorrt"
                 else translations.multilevel_roi_align_onnx)
    return {
        torch.ops.maskrt.nms_padded.default: translations.nms_padded_onnx,
        torch.ops.maskrt.multilevel_roi_align.default: roi_align,
    }


def model_metadata(model: torch.nn.Module, input_size: tuple[int, int], target: str, precision: str) -> dict[str, str]:
    """The `metadata_props` strings of docs/design.md (JSON for structured values)."""
    class_names = list(model.class_names)
    category_ids = list(getattr(model, "category_ids", None) or range(len(class_names)))
    if len(category_ids) != len(class_names):
        raise MaskrtError(f"model has {len(class_names)} class names but {len(category_ids)} category ids")
    return {
        "maskrt_version": __version__,
        "preset": str(getattr(model, "preset", "custom")),
        "target": target,
        "precision": precision,
        "class_names": json.dumps(class_names),
        "category_ids": json.dumps([int(c) for c in category_ids]),
        "num_classes": str(len(class_names)),
        "input_size": json.dumps([int(input_size[0]), int(input_size[1])]),
        "image_mean": json.dumps([float(v) for v in model.image_mean]),
        "image_std": json.dumps([float(v) for v in model.image_std]),
        "mask_size": str(int(model.mask_size)),
        "detections_per_img": str(int(model.detections_per_img)),
        "box_score_thresh": str(float(model.roi_heads.score_thresh)),
        # How the runtime pastes masks: "torchvision" or "detectron2" (models from from_detectron2).
        "paste_rule": str(getattr(model, "paste_rule", "torchvision")),
        # How the runtime resizes images into the input (models from from_detectron2: "detectron2",
        # ResizeShortestEdge to min_size / max_size); torchvision's rule fits the input.
        "resize_rule": str(getattr(model, "resize_rule", "torchvision")),
        "min_size": str(int(model.min_size[-1])),
        "max_size": str(int(model.max_size)),
        "opset": str(OPSET),
    }


def set_metadata(model_proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace the model's metadata_props entries of these keys (in place)."""
    kept = [p for p in model_proto.metadata_props if p.key not in metadata]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        model_proto.metadata_props.add(key=key, value=value)


def read_metadata(model_proto: onnx.ModelProto) -> dict[str, str]:
    """metadata_props as a dict."""
    return {p.key: p.value for p in model_proto.metadata_props}


def check_graph(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """Full checker + strict shape inference; every value must end with a known rank.

    Returns the shape-inferred model (value_info filled). Raises MaskrtError naming the first
    value without a shape, since TensorRT's parser and the fp16/int8 passes rely on them.
    """
    onnx.checker.check_model(model_proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model_proto, check_type=True, strict_mode=True, data_prop=True)
    typed = {v.name: v for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]}
    typed.update({init.name: None for init in inferred.graph.initializer})
    for node in inferred.graph.node:
        for name in node.output:
            if not name:
                continue
            value = typed.get(name, "missing")
            if value is None:
                continue
            if value == "missing" or not value.type.tensor_type.HasField("shape"):
                raise MaskrtError(f"exported graph: value {name!r} of node {node.op_type} has no inferred shape")
    return inferred


def _validate(model: torch.nn.Module, input_size: Sequence[int], target: str, precision: str,
              batch: int | None) -> tuple[int, int]:
    if target not in TARGETS:
        raise MaskrtError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if precision not in PRECISIONS:
        raise MaskrtError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not hasattr(model, "detect_batch"):
        raise MaskrtError(f"{type(model).__name__} has no detect_batch(): export needs a maskrt MaskRCNN")
    roi_ops = {getattr(getattr(model.roi_heads, name, None), "roi_op", "align")
               for name in ("box_roi_pool", "mask_roi_pool")}
    if roi_ops != {"align"}:
        raise MaskrtError("only RoIAlign models export (this one uses roi_op='pool', the ablation's RoIPool)")
    if len(input_size) != 2 or min(input_size) <= 0 or any(int(s) % 32 for s in input_size):
        raise MaskrtError(f"input size must be (H, W) with both multiples of 32, got {tuple(input_size)}")
    if batch is not None and batch < 1:
        raise MaskrtError(f"batch must be a positive integer, got {batch}")
    return int(input_size[0]), int(input_size[1])


def export_fp32(model: torch.nn.Module, input_size: tuple[int, int], target: str = "onnx",
                batch: int | None = None) -> onnx.ModelProto:
    """Trace `model.detect_batch` into an fp32 ONNX ModelProto (checked, shapes inferred, no metadata)."""
    height, width = input_size
    was_training = model.training
    graph_module = DetectBatchGraph(model).eval()
    # Trace with 2 images so the batch dimension cannot be specialised to 1 by accident.
    example = torch.rand(batch or 2, 3, height, width, generator=torch.Generator().manual_seed(0))
    dynamic_shapes = None if batch else ({0: torch.export.Dim("batch", min=1, max=64)},)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _quiet_exporter_logs()
        try:
            program = torch.onnx.export(
                graph_module, (example,), dynamo=True, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table(target),
                optimize=True, verbose=False, report=False,
            )
        except MaskrtError:
            raise
        except Exception as err:  # the exporter's errors are pages long: keep the first line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MaskrtError(f"ONNX export failed: {first}") from err
        finally:
            model.train(was_training)
    model_proto = program.model_proto
    model_proto.ir_version = IR_VERSION
    model_proto.producer_name = "maskrt"
    model_proto.producer_version = __version__
    _name_batch_dim(model_proto, batch)
    return check_graph(model_proto)


def _custom_value_info(model_proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """value_info of the outputs of non-ONNX-domain nodes (the plugin node)."""
    outputs = {out for n in model_proto.graph.node if n.domain not in ("", "ai.onnx") for out in n.output}
    return [v for v in model_proto.graph.value_info if v.name in outputs]


def _restore_custom_value_info(model_proto: onnx.ModelProto, saved: list[onnx.ValueInfoProto]) -> None:
    present = {v.name for v in model_proto.graph.value_info}
    produced = {out for n in model_proto.graph.node for out in n.output}
    model_proto.graph.value_info.extend(v for v in saved if v.name not in present and v.name in produced)


def _quiet_exporter_logs() -> None:
    """The exporter logs torchvision-missing warnings and progress lines: not the user's concern."""
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _name_batch_dim(model_proto: onnx.ModelProto, batch: int | None) -> None:
    """Give the dynamic batch dimension one readable name, `batch`, on every graph input/output."""
    if batch:
        return
    for value in [*model_proto.graph.input, *model_proto.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_value"):
            dim.dim_param = "batch"


def export_onnx(model: torch.nn.Module, out_path: str | Path, input_size: Sequence[int] = (512, 512),
                target: str = "onnx", precision: str = "fp32", batch: int | None = None,
                calib_dir: str | Path | None = None) -> Path:
    """Export `model` (a maskrt MaskRCNN) to `out_path` and return the path.

    input_size (H, W), multiples of 32; target "onnx" (standard ops, runs anywhere) or
    "tensorrt" (MultilevelRoIAlign plugin nodes); precision "fp32", "fp16" or "int8" (int8
    calibrates on `calib_dir`, default calib_data/); batch fixes B, None keeps it dynamic.
    """
    height, width = _validate(model, input_size, target, precision, batch)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise MaskrtError(f"output file must end in .onnx, got {out_path}")
    if precision == "int8":
        from maskrt.export.calibration import calibration_files

        calibration_files(calib_dir)  # a missing folder fails now, not after the trace
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model_proto = export_fp32(model, (height, width), target, batch)
    metadata = model_metadata(model, (height, width), target, precision)
    # The plugin node's output type/shape cannot be inferred: keep it across the passes.
    custom_value_info = _custom_value_info(model_proto)
    if precision != "fp32":
        if precision == "fp16":
            model_proto = to_fp16(model_proto)
        else:
            model_proto = to_int8(model_proto, calib_dir, (height, width), json.loads(metadata["image_mean"]))
        model_proto.ir_version = IR_VERSION
        _restore_custom_value_info(model_proto, custom_value_info)
        model_proto = check_graph(model_proto)
    strip_node_metadata(model_proto)
    set_metadata(model_proto, metadata)
    # Save to a temporary name first: a half-written graph never replaces a good one.
    with tempfile.NamedTemporaryFile(dir=out_path.parent, suffix=".onnx.tmp", delete=False) as tmp:
        tmp.write(model_proto.SerializeToString())
    Path(tmp.name).replace(out_path)
    return out_path
