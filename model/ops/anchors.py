"""Anchor boxes for an FPN RPN, as torchvision's ``AnchorGenerator``.

Each feature level gets its own sizes and aspect ratios. Cell anchors are centred at 0
with half sizes rounded by ``torch.round`` (torchvision's rounding), then shifted to every
location of the level's grid (stride = image size // grid size). Order: level by level,
within a level location-major (row by row, left to right), then cell anchor
(ratio-major, then size), so anchor ``(y*W + x)*A + a`` of a level sits at grid cell (y, x).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrt.errors import MaskrtError


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


class AnchorGenerator(nn.Module):
    """Anchors for every location of every FPN level.

    ``forward(images [B,3,H,W], feature_maps [B,C,H_l,W_l] per level) -> anchors [A,4]``,
    the same for every image of a padded batch (static shapes), in the order described in
    the module docstring; A = sum_l H_l*W_l*num_anchors_per_location()[l].
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 5,
    ) -> None:
        super().__init__()
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (tuple(aspect_ratios),) * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise MaskrtError(f"AnchorGenerator needs one aspect-ratio tuple per level: {len(sizes)} size tuples, {len(aspect_ratios)} ratio tuples")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        self.cell_anchors = [cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def num_anchors_per_location(self) -> list[int]:
        """Cell anchors per grid location, one entry per level."""
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

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
        strides = [(image_h // g_h, image_w // g_w) for g_h, g_w in grid_sizes]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        return torch.cat(self.grid_anchors(grid_sizes, strides, dtype, device), dim=0)
