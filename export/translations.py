"""ONNX translations of the model's two graph ops (docs/design.md, "Graph ops").

`torch.onnx.export(..., dynamo=True, custom_translation_table=...)` calls these functions
instead of the ops' eager code. Each one is traced by the exporter: every `op.X(...)` call
records one ONNX node, so plain Python control flow here runs once, at export time, and the
graph that comes out has static shapes at its boundary while the dynamic sizes (how many boxes
NMS keeps, how many RoIs fall on each level) stay inside.

- `nms_padded_onnx`: `NonMaxSuppression` on per-group shifted boxes (torchvision's
  `batched_nms` trick), then the kept scores scattered into a dense `[B, N]` tensor of `-inf`
  and `TopK(max_output)`: a fixed `[B, max_output]` result padded with -1.
- `multilevel_roi_align_onnx`: the contract's FPN level rule in the graph, one standard
  `RoiAlign` per level over that level's RoIs only, results put back in RoI order.
- `multilevel_roi_align_tensorrt`: one `maskrt::MultilevelRoIAlign` node with the attributes of
  `plugins/multilevel_roi_align.json`, for the TensorRT plugin (and the ORT custom op).
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import onnx
import onnx_ir as ir
import onnxscript
from onnxscript import opset18 as op

from maskrt.errors import MaskrtError

CONTRACT_PATH = Path(__file__).resolve().parent.parent / "plugins" / "multilevel_roi_align.json"

_NEG_INF = float("-inf")
_LN2 = math.log(2.0)


# --- nms_padded -----------------------------------------------------------------------------

def nms_padded_onnx(boxes, scores, groups, iou_threshold: float, score_threshold: float, max_output: int):
    """Translation of `maskrt::nms_padded`.

    boxes float32 [B,N,4] xyxy, scores float32 [B,N] (-inf = absent), groups int64 [B,N]
    -> kept indices int64 [B,max_output] in decreasing score, padded with -1.
    """
    # batched_nms trick: shift each group's boxes by group * (image's max coordinate + 1) so
    # that boxes of different groups never overlap and one class-agnostic NMS does them all.
    max_coordinate = op.ReduceMax(boxes, op.Constant(value_ints=[1, 2]), keepdims=1)  # [B,1,1]
    group_offset = op.Mul(op.Cast(groups, to=onnx.TensorProto.FLOAT),
                          op.Add(op.Squeeze(max_coordinate, op.Constant(value_ints=[2])),
                                 op.Constant(value_float=1.0)))  # [B,N]
    shifted = op.Add(boxes, op.Unsqueeze(group_offset, op.Constant(value_ints=[2])))
    # One "class" per image; NonMaxSuppression drops scores <= score_threshold (strictly
    # greater survive, as the contract's `score > score_threshold`), so -inf entries vanish.
    selected = op.NonMaxSuppression(
        shifted,
        op.Unsqueeze(scores, op.Constant(value_ints=[1])),
        op.Constant(value_ints=[max_output]),
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
        center_point_box=0,
    )  # [K,3] = (batch, class, box)
    batch_and_box = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # [K,2]
    kept_scores = op.GatherND(scores, batch_and_box)  # [K]
    # Dense [B, N + max_output] of -inf with the kept scores in place; the extra -inf columns
    # make TopK(max_output) valid even when N < max_output.
    batch_size = op.Shape(scores, start=0, end=1)
    dense = op.Expand(op.Constant(value_float=_NEG_INF), op.Shape(scores))
    dense = op.ScatterND(dense, batch_and_box, kept_scores)
    padding = op.Expand(op.Constant(value_float=_NEG_INF),
                        op.Concat(batch_size, op.Constant(value_ints=[max_output]), axis=0))
    dense = op.Concat(dense, padding, axis=1)
    top_scores, top_indices = op.TopK(dense, op.Constant(value_ints=[max_output]), axis=1, largest=1, sorted=1)
    kept = op.Greater(top_scores, op.Constant(value_float=_NEG_INF))
    return op.Where(kept, top_indices, op.Constant(value_int=-1))


# --- multilevel_roi_align: the level rule shared by both targets ---------------------------

def fpn_level_range(spatial_scales: Sequence[float]) -> tuple[int, int]:
    """(k_min, k_max) of the contract: round(-log2(first scale)), round(-log2(last scale))."""
    return round(-math.log2(spatial_scales[0])), round(-math.log2(spatial_scales[-1]))


def check_spatial_scales(spatial_scales: Sequence[float]) -> None:
    """The contract's constraints: 1..5 powers of two, each exactly half the previous one."""
    if not 1 <= len(spatial_scales) <= 5:
        raise MaskrtError(f"multilevel_roi_align needs 1 to 5 feature levels, got {len(spatial_scales)}")
    for i, scale in enumerate(spatial_scales):
        if scale <= 0 or 2.0 ** round(math.log2(scale)) != scale:
            raise MaskrtError(f"spatial scale {scale} is not a power of two")
        if i and scale != spatial_scales[i - 1] / 2:
            raise MaskrtError(f"spatial scales {list(spatial_scales)} are not consecutive FPN levels")


def multilevel_roi_align_onnx(rois, features: Sequence[Any], spatial_scales: Sequence[float],
                              output_height: int, output_width: int, sampling_ratio: int,
                              aligned: bool, canonical_scale: float = 224.0,
                              canonical_level: int = 4, mode: str = "avg"):
    """Portable translation of `maskrt::multilevel_roi_align` (standard ONNX ops only).

    rois float [B,R,4] xyxy input pixels, features L x [B,C,Hl,Wl] finest first
    -> pooled [B,R,C,output_height,output_width].
    """
    if mode != "avg":
        # ONNX RoiAlign's "max" takes the max of weighted corner values, not torchvision's
        # max of interpolated samples: the portable graph would silently differ.
        raise MaskrtError(f"the portable ONNX graph supports RoIAlign mode 'avg' only, got {mode!r}; "
                          "export with --target tensorrt")
    check_spatial_scales(spatial_scales)
    k_min, k_max = fpn_level_range(spatial_scales)
    flat_rois = op.Reshape(rois, op.Constant(value_ints=[-1, 4]))  # [B*R,4]
    num_rois = op.Shape(flat_rois, start=0, end=1)
    # RoI r of image b pools from image b: batch index b for each flattened RoI.
    image_index = op.Range(op.Constant(value_int=0), op.Squeeze(op.Shape(rois, start=0, end=1)),
                           op.Constant(value_int=1))
    batch_indices = op.Reshape(op.Expand(op.Unsqueeze(image_index, op.Constant(value_ints=[1])),
                                         op.Shape(rois, start=0, end=2)),
                               op.Constant(value_ints=[-1]))  # int64 [B*R]
    levels = _fpn_levels(flat_rois, k_min, k_max, canonical_scale, canonical_level)  # int64 [B*R]

    # Each level pools only its own RoIs (one RoiAlign per level, not L times all RoIs);
    # the pieces are concatenated and put back in RoI order by the inverse permutation.
    order_parts, pooled_parts = [], []
    for level_offset, (feature, scale) in enumerate(zip(features, spatial_scales)):
        on_level = op.Reshape(op.NonZero(op.Equal(levels, op.Constant(value_int=k_min + level_offset))),
                              op.Constant(value_ints=[-1]))  # [K_l] int64
        pooled_parts.append(op.RoiAlign(
            feature,
            op.Gather(flat_rois, on_level, axis=0),
            op.Gather(batch_indices, on_level, axis=0),
            coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
            mode="avg",
            output_height=output_height,
            output_width=output_width,
            sampling_ratio=max(int(sampling_ratio), 0),  # ONNX: 0 = adaptive, as torch's <= 0
            spatial_scale=float(scale),
        ))
        order_parts.append(on_level)
    if len(features) == 1:
        pooled = pooled_parts[0]
    else:
        order = op.Concat(*order_parts, axis=0)  # RoI index of each concatenated row
        positions = op.Range(op.Constant(value_int=0), op.Squeeze(num_rois), op.Constant(value_int=1))
        inverse = op.ScatterElements(positions, order, positions, axis=0)  # row of each RoI
        pooled = op.Gather(op.Concat(*pooled_parts, axis=0), inverse, axis=0)
    out_shape = op.Concat(op.Shape(rois, start=0, end=2), op.Shape(features[0], start=1, end=2),
                          op.Constant(value_ints=[output_height, output_width]), axis=0)
    return op.Reshape(pooled, out_shape)


def _fpn_levels(flat_rois, k_min: int, k_max: int, canonical_scale: float, canonical_level: int):
    """int64 [K] FPN level of each RoI [K,4]: floor(k0 + log2(sqrt(area)/s0) + 1e-6), clamped."""
    x1 = op.Gather(flat_rois, op.Constant(value_int=0), axis=1)
    y1 = op.Gather(flat_rois, op.Constant(value_int=1), axis=1)
    x2 = op.Gather(flat_rois, op.Constant(value_int=2), axis=1)
    y2 = op.Gather(flat_rois, op.Constant(value_int=3), axis=1)
    zero = op.Constant(value_float=0.0)
    # torchvision's area (x2-x1)*(y2-y1): inverted on both axes is positive; <= 0 is taken as 0.
    area = op.Max(op.Mul(op.Sub(x2, x1), op.Sub(y2, y1)), zero)
    # log2(x) = ln(x) / ln(2); area 0 gives -inf, which the clamp sends to k_min.
    log2_size = op.Div(op.Log(op.Div(op.Sqrt(area), op.Constant(value_float=float(canonical_scale)))),
                       op.Constant(value_float=_LN2))
    level = op.Floor(op.Add(op.Add(log2_size, op.Constant(value_float=float(canonical_level))),
                            op.Constant(value_float=1e-6)))
    level = op.Clip(level, op.Constant(value_float=float(k_min)), op.Constant(value_float=float(k_max)))
    return op.Cast(level, to=onnx.TensorProto.INT64)


# --- multilevel_roi_align: the TensorRT plugin node ----------------------------------------

@lru_cache(maxsize=1)
def plugin_contract() -> dict:
    """plugins/multilevel_roi_align.json: the plugin's op name, domain, attributes, defaults."""
    if not CONTRACT_PATH.is_file():
        raise MaskrtError(f"plugin contract {CONTRACT_PATH} is missing: cannot export --target tensorrt")
    return json.loads(CONTRACT_PATH.read_text())


def _register_plugin_schema() -> None:
    """Register an OpSchema for maskrt::MultilevelRoIAlign so the exporter can record the node.

    The schema only lives in this process (the exporter needs one to build the node); the
    saved model carries the node, its attributes and its output's type and shape, so readers
    without the schema (checker, shape inference, TensorRT's parser) need nothing more.
    """
    contract = plugin_contract()
    name, domain = contract["op"], contract["onnx_domain"]
    try:
        onnx.defs.get_schema(name, 1, domain)
        return
    except onnx.defs.SchemaError:
        pass
    schema_types = {"int": onnx.defs.OpSchema.AttrType.INT, "float": onnx.defs.OpSchema.AttrType.FLOAT,
                    "float_list": onnx.defs.OpSchema.AttrType.FLOATS, "int_list": onnx.defs.OpSchema.AttrType.INTS,
                    "string": onnx.defs.OpSchema.AttrType.STRING}
    attributes = [onnx.defs.OpSchema.Attribute(a["name"], schema_types[a["type"]], a.get("description", ""))
                  for a in contract["attributes"]]
    attributes += [onnx.defs.OpSchema.Attribute(k, onnx.defs.OpSchema.AttrType.STRING, "")
                   for k in contract.get("onnx_node_extra_attributes", {})]
    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        name, domain, 1,
        # One variadic input (rois, then the L feature maps): the exporter's node builder
        # repeats the first input when a single input precedes a variadic one.
        inputs=[param("rois_and_features", "T", param_option=onnx.defs.OpSchema.FormalParameterOption.Variadic)],
        outputs=[param("pooled", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32 or float16")],
        attributes=attributes,
    )
    onnx.defs.register_schema(schema)


def plugin_attributes(spatial_scales: Sequence[float], output_height: int, output_width: int,
                      sampling_ratio: int, aligned: bool, canonical_scale: float,
                      canonical_level: int, mode: str) -> dict[str, Any]:
    """The node's attributes, named and typed as the contract says, plus plugin_namespace/version."""
    contract = plugin_contract()
    values = {
        "output_height": int(output_height),
        "output_width": int(output_width),
        "sampling_ratio": max(int(sampling_ratio), 0),  # contract: 0 = adaptive
        "aligned": int(bool(aligned)),
        "spatial_scales": [float(s) for s in spatial_scales],
        "canonical_scale": float(canonical_scale),
        "canonical_level": int(canonical_level),
        "mode": {"avg": 0, "max": 1}[mode],
    }
    names = [a["name"] for a in contract["attributes"]]
    if set(names) != set(values):
        raise MaskrtError(f"plugin contract attributes {names} do not match the exporter's {sorted(values)}")
    attributes = {name: values[name] for name in names}
    attributes.update(contract.get("onnx_node_extra_attributes", {}))
    return attributes


def multilevel_roi_align_tensorrt(rois, features: Sequence[Any], spatial_scales: Sequence[float],
                                  output_height: int, output_width: int, sampling_ratio: int,
                                  aligned: bool, canonical_scale: float = 224.0,
                                  canonical_level: int = 4, mode: str = "avg"):
    """TensorRT-target translation: one `maskrt::MultilevelRoIAlign` node.

    Inputs (rois [B,R,4], features L x [B,C,Hl,Wl]) -> pooled [B,R,C,oh,ow]; the output's
    type and shape are set here because no shape-inference function exists for the node.
    """
    if mode not in ("avg", "max"):
        raise MaskrtError(f"RoIAlign mode must be 'avg' or 'max', got {mode!r}")
    check_spatial_scales(spatial_scales)
    _register_plugin_schema()
    contract = plugin_contract()
    plugin_opset = onnxscript.values.Opset(contract["onnx_domain"], 1)
    attributes = plugin_attributes(spatial_scales, output_height, output_width, sampling_ratio,
                                   aligned, canonical_scale, canonical_level, mode)
    pooled = getattr(plugin_opset, contract["op"])(rois, *features, **attributes)
    pooled.dtype = rois.dtype
    pooled.shape = ir.Shape([rois.shape[0], rois.shape[1], features[0].shape[1], output_height, output_width])
    return pooled
