"""Greedy non-maximum suppression with torchvision's semantics.

Boxes are visited by decreasing score; a visited, unsuppressed box is kept and suppresses
every later box whose IoU with it is strictly greater than ``iou_threshold``. The IoU
matrix is computed once (vectorised, in row blocks so only a bool [N,N] is kept); the
sequential greedy pass then does one row-OR per kept box. That is the fallback: float32 CPU
boxes go to the native NMS of ``native_cpu.py`` (``native/nms_cpu.cpp``), which tests only the
pairs a kept box meets, with the same float32 IoU, and keeps the same boxes.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from maskrt.errors import MaskrtError
from maskrt.model.ops import native_cpu

# float32 CPU boxes run the native NMS (native_cpu.py) where it loads; tests switch it off to hold
# the PyTorch path, the fallback, to the same references.
_NATIVE_CPU = True

# Rows of the float IoU matrix computed at once: bounds the float temporary to
# _IOU_BLOCK_ROWS * N values while the kept result is a bool matrix (1 byte per pair).
_IOU_BLOCK_ROWS = 1024


def _check_nms_inputs(boxes: Tensor, scores: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise MaskrtError(f"nms boxes must be Tensor[N,4] xyxy, got {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise MaskrtError(f"nms scores must be Tensor[N] matching boxes [N,4], got {tuple(scores.shape)} for {tuple(boxes.shape)}")


def _overlap_matrix(boxes: Tensor, iou_threshold: float) -> Tensor:
    """Bool [N,N]: True where IoU > threshold."""
    n = boxes.shape[0]
    boxes = boxes.float() if boxes.dtype not in (torch.float32, torch.float64) else boxes
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    overlap = torch.empty((n, n), dtype=torch.bool, device=boxes.device)
    for start in range(0, n, _IOU_BLOCK_ROWS):
        stop = min(start + _IOU_BLOCK_ROWS, n)
        # Per-coordinate [rows, N] temporaries: the same arithmetic as box_iou, fewer passes.
        inter_w = (torch.minimum(x2[start:stop, None], x2[None, :]) - torch.maximum(x1[start:stop, None], x1[None, :])).clamp_(min=0)
        inter_h = (torch.minimum(y2[start:stop, None], y2[None, :]) - torch.maximum(y1[start:stop, None], y1[None, :])).clamp_(min=0)
        inter = inter_w.mul_(inter_h)
        union = (areas[start:stop, None] + areas[None, :]).sub_(inter)
        # NaN (0/0 for two empty boxes) compares False: they never suppress each other.
        overlap[start:stop] = inter.div_(union) > iou_threshold
    return overlap


def _greedy_keep(sorted_boxes: Tensor, iou_threshold: float) -> Tensor:
    """Positions (into the sorted order) of the boxes greedy NMS keeps, increasing."""
    n = sorted_boxes.shape[0]
    # Only a higher-scored box (earlier position) can suppress a later one.
    overlap = _overlap_matrix(sorted_boxes, iou_threshold).triu_(diagonal=1)
    # The greedy pass is inherently sequential; it runs on a host copy of the bool matrix
    # (a NumPy view, no copy on CPU) because per-element torch calls cost ~50x more.
    # Work is one row-OR per kept box: O(N * kept).
    overlap_host = overlap.cpu().numpy()
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for position in range(n):
        if suppressed[position]:
            continue
        keep.append(position)
        np.logical_or(suppressed, overlap_host[position], out=suppressed)
    return torch.tensor(keep, dtype=torch.int64, device=sorted_boxes.device)


def _native_applies(boxes: Tensor) -> bool:
    return _NATIVE_CPU and boxes.dtype == torch.float32 and boxes.device.type == "cpu" and native_cpu.nms_enabled()


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS. boxes [N,4] xyxy, scores [N] -> kept indices int64 [K], by decreasing score.

    A box is suppressed when its IoU with a kept, higher-scored box is > iou_threshold.
    Ties in score keep the input order (stable sort).
    """
    _check_nms_inputs(boxes, scores)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    sorted_boxes = boxes.detach()[order]
    if _native_applies(sorted_boxes):
        return order[native_cpu.nms_sorted(sorted_boxes, None, float(iou_threshold))]
    keep_sorted = _greedy_keep(sorted_boxes, float(iou_threshold))
    return order[keep_sorted]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, max_keep: int = -1) -> Tensor:
    """NMS within each group of ``idxs``. boxes [N,4], scores [N], idxs [N] int -> kept indices [K].

    Same result as torchvision's ``batched_nms``: boxes of different groups never suppress
    each other; the kept indices come by decreasing score. torchvision gets the grouping with
    its coordinate-offset trick (shift each group's boxes apart by ``idx * (max_coord + 1)``),
    which rounds the shifted coordinates in float32 for large offsets; here the group test
    is applied exactly, by running each group on its own. ``max_keep`` >= 0 returns only the first
    ``max_keep`` kept indices (the same as slicing the full result; the native NMS stops there).
    """
    _check_nms_inputs(boxes, scores)
    if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        raise MaskrtError(f"batched_nms idxs must be Tensor[N] matching boxes, got {tuple(idxs.shape)} for {tuple(boxes.shape)}")
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    sorted_boxes, sorted_groups = boxes.detach()[order], idxs[order]
    if _native_applies(sorted_boxes):
        return order[native_cpu.nms_sorted(sorted_boxes, sorted_groups, float(iou_threshold), max_keep)]
    # Groups never interact, so each group's NMS runs on its own: G small overlap matrices
    # instead of one [N, N] (the RPN's 5 levels: 1/5 of the pairs).
    kept = []
    for group in torch.unique(sorted_groups):
        members = torch.where(sorted_groups == group)[0]  # increasing = by decreasing score
        kept.append(members[_greedy_keep(sorted_boxes[members], float(iou_threshold))])
    keep_sorted = torch.sort(torch.cat(kept)).values
    if max_keep >= 0:
        keep_sorted = keep_sorted[:max_keep]
    return order[keep_sorted]
