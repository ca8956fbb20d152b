"""Box math on xyxy boxes: areas, IoU, clipping, small-box removal and the R-CNN box coder.

Semantics follow torchvision (``torchvision/ops/boxes.py`` and
``torchvision/models/detection/_utils.py``): areas are ``(x2-x1)*(y2-y1)`` with no +1, and
IoU of two empty boxes is NaN (0/0), which compares False against any threshold.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from maskrt.errors import MaskrtError


def _upcast(t: Tensor) -> Tensor:
    """Half-precision areas overflow at 65504: compute products in float32 (int32 for ints)."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def _check_boxes(boxes: Tensor, name: str = "boxes") -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() < 1 or boxes.shape[-1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise MaskrtError(f"{name} must be a Tensor[..., 4] of xyxy boxes, got {shape}")


def box_area(boxes: Tensor) -> Tensor:
    """Areas of xyxy boxes. boxes [..., 4] -> [...]. Inverted boxes give negative areas."""
    _check_boxes(boxes)
    boxes = _upcast(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise intersection and union areas. boxes1 [N,4], boxes2 [M,4] -> ([N,M], [N,M])."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = _upcast(bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter, union


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU. boxes1 [N,4], boxes2 [M,4] -> [N,M]; 0/0 (two empty boxes) is NaN."""
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    inter, union = box_inter_union(boxes1, boxes2)
    return inter / union


def clip_boxes_to_image(boxes: Tensor, size: Sequence[int]) -> Tensor:
    """Clamp x to [0, width] and y to [0, height]. boxes [..., 4], size (height, width)."""
    _check_boxes(boxes)
    if len(size) != 2:
        raise MaskrtError(f"image size must be (height, width), got {tuple(size)}")
    height, width = size
    boxes_x = boxes[..., 0::2].clamp(min=0, max=width)
    boxes_y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((boxes_x, boxes_y), dim=-1).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (int64, increasing) of boxes whose width and height are both >= min_size. boxes [N,4] -> [K]."""
    _check_boxes(boxes)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    keep = (widths >= min_size) & (heights >= min_size)
    return torch.where(keep)[0]


class BoxCoder:
    """The R-CNN box parametrisation (dx, dy, dw, dh), as torchvision's ``BoxCoder``.

    ``encode`` turns (ground-truth, proposal) pairs into regression targets; ``decode``
    applies predicted deltas to boxes. ``weights`` (wx, wy, ww, wh) scale the deltas;
    ``dw``/``dh`` are clamped at ``bbox_xform_clip`` before ``exp`` so huge deltas stay finite.
    """

    def __init__(self, weights: Sequence[float], bbox_xform_clip: float = math.log(1000.0 / 16)) -> None:
        if len(weights) != 4:
            raise MaskrtError(f"BoxCoder weights must be 4 numbers (wx, wy, ww, wh), got {tuple(weights)}")
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: Tensor | Sequence[Tensor], proposals: Tensor | Sequence[Tensor]) -> Tensor | tuple[Tensor, ...]:
        """Regression targets of ``reference_boxes`` (ground truth) relative to ``proposals``.

        Tensors [N,4], [N,4] -> [N,4]; lists of per-image tensors -> a tuple of per-image [N_i,4].
        """
        if isinstance(reference_boxes, Tensor) and isinstance(proposals, Tensor):
            return self.encode_single(reference_boxes, proposals)
        boxes_per_image = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(list(reference_boxes), dim=0), torch.cat(list(proposals), dim=0))
        return targets.split(boxes_per_image, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """reference_boxes [..., 4] (targets), proposals [..., 4] (anchors/proposals) -> deltas [..., 4]."""
        _check_boxes(reference_boxes, "reference_boxes")
        _check_boxes(proposals, "proposals")
        wx, wy, ww, wh = self.weights
        ex_widths = proposals[..., 2] - proposals[..., 0]
        ex_heights = proposals[..., 3] - proposals[..., 1]
        ex_ctr_x = proposals[..., 0] + 0.5 * ex_widths
        ex_ctr_y = proposals[..., 1] + 0.5 * ex_heights
        gt_widths = reference_boxes[..., 2] - reference_boxes[..., 0]
        gt_heights = reference_boxes[..., 3] - reference_boxes[..., 1]
        gt_ctr_x = reference_boxes[..., 0] + 0.5 * gt_widths
        gt_ctr_y = reference_boxes[..., 1] + 0.5 * gt_heights
        targets_dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
        targets_dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
        targets_dw = ww * torch.log(gt_widths / ex_widths)
        targets_dh = wh * torch.log(gt_heights / ex_heights)
        return torch.stack((targets_dx, targets_dy, targets_dw, targets_dh), dim=-1)

    def decode(self, rel_codes: Tensor, boxes: Tensor | Sequence[Tensor]) -> Tensor:
        """Apply deltas to boxes, torchvision's layout.

        rel_codes [K, 4*C] (or anything reshapeable to it), boxes: list of per-image [N_i,4]
        with sum N_i = K, or one Tensor[K,4] -> [K, C, 4].
        """
        concat_boxes = boxes if isinstance(boxes, Tensor) else torch.cat(list(boxes), dim=0)
        _check_boxes(concat_boxes)
        box_sum = concat_boxes.shape[0]
        if box_sum > 0:
            rel_codes = rel_codes.reshape(box_sum, -1)
        pred_boxes = self.decode_single(rel_codes, concat_boxes)
        if box_sum > 0:
            pred_boxes = pred_boxes.reshape(box_sum, -1, 4)
        return pred_boxes

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """rel_codes [..., 4*C], boxes [..., 4] (same leading dims) -> boxes [..., 4*C].

        Works for any leading dims, so the batched inference path ([B,N,4*C] with [B,N,4])
        uses it without flattening.
        """
        _check_boxes(boxes)
        if rel_codes.shape[-1] % 4 != 0:
            raise MaskrtError(f"box deltas must have 4*C values in the last dim, got {tuple(rel_codes.shape)}")
        boxes = boxes.to(rel_codes.dtype)
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        ctr_x = boxes[..., 0] + 0.5 * widths
        ctr_y = boxes[..., 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = rel_codes[..., 0::4] / wx
        dy = rel_codes[..., 1::4] / wy
        dw = rel_codes[..., 2::4] / ww
        dh = rel_codes[..., 3::4] / wh
        dw = torch.clamp(dw, max=self.bbox_xform_clip)
        dh = torch.clamp(dh, max=self.bbox_xform_clip)
        pred_ctr_x = dx * widths[..., None] + ctr_x[..., None]
        pred_ctr_y = dy * heights[..., None] + ctr_y[..., None]
        pred_w = torch.exp(dw) * widths[..., None]
        pred_h = torch.exp(dh) * heights[..., None]
        half_w = 0.5 * pred_w
        half_h = 0.5 * pred_h
        pred = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=-1)
        return pred.flatten(-2)
