"""Hand-built ONNX models that honour the export contract (docs/design.md "ONNX graph"),
for runtime tests that must not wait for (or depend on) the exporter, plus float64
references written from torchvision's description. Imported by the other test_runtime files.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASS_NAMES = ["__background__", "circle", "square", "triangle"]
MASK_SIZE = 28


def fake_metadata(input_size: tuple[int, int], image_mean=(0.485, 0.456, 0.406)) -> dict[str, str]:
    return {
        "maskrt_version": "0.1.0", "preset": "edge", "target": "onnx", "precision": "fp32",
        "class_names": json.dumps(CLASS_NAMES), "category_ids": json.dumps([0, 1, 2, 3]),
        "input_size": json.dumps(list(input_size)), "image_mean": json.dumps(list(image_mean)),
        "image_std": json.dumps([0.229, 0.224, 0.225]), "mask_size": str(MASK_SIZE),
        "detections_per_img": "5", "num_classes": str(len(CLASS_NAMES)),
    }


def build_fake_model(path: Path, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray,
                     num_dets: int, input_size: tuple[int, int] = (128, 128), batch: int | None = None,
                     box_shift_per_mean: float = 0.0, metadata: dict[str, str] | None = None,
                     masks_by_roi_align: str | None = None) -> Path:
    """An ONNX model whose outputs are the given constants repeated over the batch.

    boxes [D,4], scores [D], labels [D], masks [D,28,28]. With box_shift_per_mean != 0 every
    image's boxes move by that factor times the mean of its input pixels, so tests can tell
    the images of a batch apart. masks_by_roi_align computes the masks from the input instead:
    the channel mean of a 28x28 RoIAlign of the image at each box (spatial scale 1, sampling 2,
    aligned=False), by the custom node maskrt::MultilevelRoIAlign ("maskrt") or by ONNX's
    standard RoiAlign ("onnx", batch 1 only): twins whose masks must agree.
    """
    count = boxes.shape[0]
    height, width = input_size
    nodes = [
        helper.make_node("Shape", ["images"], ["batch_dim"], start=0, end=1),
        helper.make_node("Concat", ["batch_dim", "shape_d4"], ["shape_b_d4"], axis=0),
        helper.make_node("Concat", ["batch_dim", "shape_d"], ["shape_b_d"], axis=0),
        helper.make_node("Concat", ["batch_dim", "shape_dmm"], ["shape_b_dmm"], axis=0),
        helper.make_node("Expand", ["const_num_dets", "batch_dim"], ["num_dets"]),
        helper.make_node("ReduceMean", ["images", "axes_chw"], ["image_mean_b111"], keepdims=1),
        helper.make_node("Reshape", ["image_mean_b111", "shape_b11"], ["image_mean_b11"]),
        helper.make_node("Mul", ["image_mean_b11", "const_shift"], ["shift_b11"]),
        helper.make_node("Expand", ["const_boxes", "shape_b_d4"], ["boxes_plain"]),
        helper.make_node("Add", ["boxes_plain", "shift_b11"], ["boxes"]),
        helper.make_node("Expand", ["const_scores", "shape_b_d"], ["scores"]),
        helper.make_node("Expand", ["const_labels", "shape_b_d"], ["labels"]),
    ]
    if masks_by_roi_align == "maskrt":
        nodes += [
            helper.make_node("MultilevelRoIAlign", ["boxes", "images"], ["pooled"], domain="maskrt",
                             output_height=MASK_SIZE, output_width=MASK_SIZE, sampling_ratio=2, aligned=0,
                             spatial_scales=[1.0], canonical_scale=224.0, canonical_level=4, mode=0,
                             plugin_version="1", plugin_namespace="maskrt"),
            helper.make_node("ReduceMean", ["pooled", "axis_2"], ["masks"], keepdims=0),
        ]
    elif masks_by_roi_align == "onnx":
        nodes += [
            helper.make_node("Reshape", ["boxes", "shape_d4"], ["rois"]),
            helper.make_node("RoiAlign", ["images", "rois", "batch_indices"], ["pooled"], mode="avg",
                             output_height=MASK_SIZE, output_width=MASK_SIZE, sampling_ratio=2, spatial_scale=1.0,
                             coordinate_transformation_mode="output_half_pixel"),  # = aligned=False
            helper.make_node("ReduceMean", ["pooled", "axis_1"], ["masks_dmm"], keepdims=0),
            helper.make_node("Unsqueeze", ["masks_dmm", "axis_0"], ["masks"]),
        ]
    else:
        nodes.append(helper.make_node("Expand", ["const_masks", "shape_b_dmm"], ["masks"]))
    initializers = [
        numpy_helper.from_array(np.array([count, 4], np.int64), "shape_d4"),
        numpy_helper.from_array(np.array([count], np.int64), "shape_d"),
        numpy_helper.from_array(np.array([count, MASK_SIZE, MASK_SIZE], np.int64), "shape_dmm"),
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape_b11"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes_chw"),
        numpy_helper.from_array(np.array([num_dets], np.int32), "const_num_dets"),
        numpy_helper.from_array(np.array(box_shift_per_mean, np.float32), "const_shift"),
        numpy_helper.from_array(boxes.astype(np.float32)[None], "const_boxes"),
        numpy_helper.from_array(scores.astype(np.float32)[None], "const_scores"),
        numpy_helper.from_array(labels.astype(np.int32)[None], "const_labels"),
        numpy_helper.from_array(masks.astype(np.float32)[None], "const_masks"),
        numpy_helper.from_array(np.zeros(count, np.int64), "batch_indices"),
        numpy_helper.from_array(np.array([0], np.int64), "axis_0"),
        numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
        numpy_helper.from_array(np.array([2], np.int64), "axis_2"),
    ]
    batch_dim = batch if batch is not None else "batch"
    outputs = [
        helper.make_tensor_value_info("num_dets", TensorProto.INT32, [batch_dim]),
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch_dim, count, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch_dim, count]),
        helper.make_tensor_value_info("labels", TensorProto.INT32, [batch_dim, count]),
        helper.make_tensor_value_info("masks", TensorProto.FLOAT, [batch_dim, count, MASK_SIZE, MASK_SIZE]),
    ]
    graph = helper.make_graph(nodes, "fake_maskrcnn",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch_dim, 3, height, width])],
                              outputs, initializers)
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid("maskrt", 1)] if masks_by_roi_align == "maskrt" else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10  # ONNX Runtime 1.31 reads at most IR 13; onnx 1.23 writes 14
    helper.set_model_props(model, fake_metadata(input_size) if metadata is None else metadata)
    if masks_by_roi_align != "maskrt":  # the checker knows no schema for our custom domain
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def standard_fake(path: Path, **kwargs) -> Path:
    """Five detections, three kept by the graph (num_dets = 3): scores 0.9, 0.6, 0.3."""
    boxes = np.array([[10, 20, 60, 100], [70, 5, 120, 40], [30, 30, 50, 50], [0, 0, 1, 1], [0, 0, 1, 1]], np.float32)
    scores = np.array([0.9, 0.6, 0.3, 0.0, 0.0], np.float32)
    labels = np.array([1, 3, 2, 0, 0], np.int32)
    grid = (np.arange(MASK_SIZE) + 0.5) / MASK_SIZE
    disc = (((grid[:, None] - 0.5) ** 2 + (grid[None, :] - 0.5) ** 2) < 0.16).astype(np.float32)
    ramp = np.broadcast_to(grid[None, :], (MASK_SIZE, MASK_SIZE)).astype(np.float32)  # 0 left -> 1 right
    masks = np.stack([disc, ramp, np.ones((MASK_SIZE, MASK_SIZE), np.float32), np.zeros_like(disc),
                      np.zeros_like(disc)])
    return build_fake_model(path, boxes, scores, labels, masks, num_dets=3, **kwargs)


# --- float64 references written from torchvision's description ---------------------------

def bilinear_resize_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch F.interpolate(mode='bilinear', align_corners=False) of a 2-D array, in float64:
    source coordinate (dst + 0.5) * in/out - 0.5, clamped at 0; neighbours clamped at the edge."""
    in_h, in_w = image.shape
    image = image.astype(np.float64)

    def weights(out_n: int, in_n: int):
        src = np.maximum((np.arange(out_n) + 0.5) * (in_n / out_n) - 0.5, 0.0)
        lo = np.floor(src).astype(np.int64)
        lo = np.minimum(lo, in_n - 1)
        hi = np.minimum(lo + 1, in_n - 1)
        return lo, hi, src - lo

    y0, y1, wy = weights(out_h, in_h)
    x0, x1, wx = weights(out_w, in_w)
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def paste_reference(mask: np.ndarray, box: np.ndarray, im_h: int, im_w: int) -> np.ndarray:
    """torchvision's paste of one MxM probability mask, float64, returns probabilities [im_h, im_w]."""
    size = mask.shape[0]
    padded = np.zeros((size + 2, size + 2))
    padded[1:-1, 1:-1] = mask
    scale = (size + 2) / size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) / 2 * scale, (box[3] - box[1]) / 2 * scale
    x1, y1, x2, y2 = (int(v) for v in (cx - hw, cy - hh, cx + hw, cy + hh))  # int() truncates toward 0
    w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    resized = bilinear_resize_reference(padded, h, w)
    out = np.zeros((im_h, im_w))
    xa, xb, ya, yb = max(x1, 0), min(x2 + 1, im_w), max(y1, 0), min(y2 + 1, im_h)
    if xa < xb and ya < yb:
        out[ya:yb, xa:xb] = resized[ya - y1:yb - y1, xa - x1:xb - x1]
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_bilinear_reference_matches_worked_values():
    # A 2x2 ramp upsampled 2x: torch's align_corners=False gives 0, .25, .75, 1 along a row.
    row = bilinear_resize_reference(np.array([[0.0, 1.0], [0.0, 1.0]]), 2, 4)[0]
    np.testing.assert_allclose(row, [0.0, 0.25, 0.75, 1.0])
    assert math.isclose(bilinear_resize_reference(np.array([[0.0, 4.0]]), 1, 1)[0, 0], 2.0)
