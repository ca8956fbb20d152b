"""Anchor boxes for an FPN RPN: torchvision's ``AnchorGenerator`` or detectron2's
``DefaultAnchorGenerator`` (``rule``).

Each feature level gets its own sizes and aspect ratios. Cell anchors are centred at 0 and
shifted to every location of the level's grid, the first at (0, 0). Order: level by level,
within a level location-major (row by row, left to right), then cell anchor, so anchor
``(y*W + x)*A + a`` of a level sits at grid cell (y, x).

The two rules differ in three places:

| | torchvision | detectron2 |
|---|---|---|
| cell anchor half sizes | rounded (``torch.round``) | not rounded (computed in float64, stored float32) |
| cell anchor order | ratio-major, then size | size-major, then ratio |
| stride | ``image size // grid size`` per axis | the level's own stride ``2**level`` |

detectron2: ``detectron2/modeling/anchor_generator.py`` at commit 02b5c4e (2026-06-06),
``generate_cell_anchors`` lines 181-216, ``_create_grid_offsets`` lines 39-55 (offset
``MODEL.ANCHOR_GENERATOR.OFFSET`` = 0.0, ``config/defaults.py`` line 195), strides from the
backbone's output shapes (lines 128-134), one per level for both axes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrt.errors import MaskrtError

ANCHOR_RULES = ("torchvision", "detectron2")


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Zero-centred anchors of one level. -> [len(aspect_ratios)*len(sizes), 4] xyxy.

    An aspect ratio r is height/width: h = size*sqrt(r), w = size/sqrt(r) (area size^2).
    """
    scales = torch.as_tensor(sizes, dtype=dtype, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    base_anchors = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
    return base_anchors.round()


def detectron2_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """detectron2's zero-centred anchors of one level, not rounded. -> float32
    [len(sizes)*len(aspect_ratios), 4] xyxy, size-major.

    For size s and ratio a = h / w: w = sqrt(s*s / a), h = a*w, in Python floats (float64),
    then stored as float32 (``anchor_generator.py`` lines 203-216 and 138)."""
    rows = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in aspect_ratios:
            width = math.sqrt(area / float(ratio))
            height = float(ratio) * width
            rows.append([-width / 2.0, -height / 2.0, width / 2.0, height / 2.0])
    return torch.tensor(rows, dtype=torch.float64).float()


class AnchorGenerator(nn.Module):
    """Anchors for every location of every FPN level.

    ``forward(images [B,3,H,W], feature_maps [B,C,H_l,W_l] per level) -> anchors [A,4]``,
    the same for every image of a padded batch (static shapes), in the order described in
    the module docstring; A = sum_l H_l*W_l*num_anchors_per_location()[l].
    ``rule``: "torchvision" (default) or "detectron2", see the module docstring.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 5,
        rule: str = "torchvision",
    ) -> None:
        super().__init__()
        if rule not in ANCHOR_RULES:
            raise MaskrtError(f"unknown anchor rule {rule!r}: choose 'torchvision' or 'detectron2'")
        self.rule = rule
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (tuple(aspect_ratios),) * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise MaskrtError(f"AnchorGenerator needs one aspect-ratio tuple per level: {len(sizes)} size tuples, {len(aspect_ratios)} ratio tuples")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        make = cell_anchors if rule == "torchvision" else detectron2_cell_anchors
        self.cell_anchors = [make(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def num_anchors_per_location(self) -> list[int]:
        """Cell anchors per grid location, one entry per level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def strides(self, grid_sizes: Sequence[Sequence[int]], image_size: Sequence[int]) -> list[tuple[int, int]]:
        """(stride_h, stride_w) per level for an input of image_size (H, W).

        torchvision: ``(H // grid_h, W // grid_w)`` (P6 of an 800-row input, 13 rows: 61).
        detectron2: the level's own stride, ``2**round(log2(H / grid_h))`` on both axes (64)."""
        if self.rule == "torchvision":
            return [(int(image_size[0]) // int(g_h), int(image_size[1]) // int(g_w)) for g_h, g_w in grid_sizes]
        strides = []
        for g_h, _ in grid_sizes:
            stride = 2 ** round(math.log2(float(image_size[0]) / float(g_h)))
            strides.append((stride, stride))
        return strides

    def grid_anchors(self, grid_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> list[Tensor]:
        """Per level [H_l*W_l*A_l, 4] anchors. grid_sizes [(H_l, W_l)], strides [(stride_h, stride_w)]."""
        if not (len(grid_sizes) == len(strides) == len(self.cell_anchors)):
            raise MaskrtError(
                f"anchor generator has {len(self.cell_anchors)} levels but got {len(grid_sizes)} feature maps; "
                "pass one size tuple per feature map"
            )
        anchors = []
        for (grid_h, grid_w), (stride_h, stride_w), base in zip(grid_sizes, strides, self.cell_anchors):
            base = base.to(dtype=dtype, device=device)
            shifts_x = torch.arange(0, int(grid_w), dtype=torch.int32, device=device) * int(stride_w)
            shifts_y = torch.arange(0, int(grid_h), dtype=torch.int32, device=device) * int(stride_h)
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x = shift_x.reshape(-1)
            shift_y = shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return anchors

    def forward(self, images: Tensor, feature_maps: Sequence[Tensor]) -> Tensor:
        """images [B,3,H,W] (only H,W are read), feature_maps per level [B,C,H_l,W_l] -> [A,4]."""
        image_h, image_w = int(images.shape[-2]), int(images.shape[-1])
        grid_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feature_maps]
        strides = self.strides(grid_sizes, (image_h, image_w))
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        return torch.cat(self.grid_anchors(grid_sizes, strides, dtype, device), dim=0)
