"""Image and target preparation (resize, pad, batch) and detection post-processing
(boxes back to the caller's pixels, masks pasted into the image).

The rules are torchvision's `GeneralizedRCNNTransform` and `paste_masks_in_image`, in the
order design.md fixes; the difference is where normalisation happens: here images stay in
[0, 1] and are padded with `image_mean` (the model normalises inside `detect_batch`, so the
padding becomes 0 exactly as torchvision's pad-after-normalise).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from maskrt.errors import MaskrtError


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """torchvision's scale `min(min_size / min(h, w), max_size / max(h, w))`, computed in
    float32 as torchvision does (the float32 rounding decides floor() at exact boundaries)."""
    shape = torch.tensor([height, width], dtype=torch.float32, device="cpu")  # host arithmetic
    scale = torch.min(min_size / shape.min(), max_size / shape.max())
    return float(scale.item())


def resized_size(height: int, width: int, min_size: float, max_size: float) -> tuple[int, int]:
    """Size after `resize_image`: `(floor(h * scale), floor(w * scale))`."""
    scale = resize_scale(height, width, min_size, max_size)
    return int(math.floor(height * scale)), int(math.floor(width * scale))


def resize_image(image: Tensor, min_size: float, max_size: float) -> Tensor:
    """Bilinear resize (align_corners=False, recomputed scale factor) of [C, h, w] -> [C, h', w']."""
    if image.dim() != 3:
        raise MaskrtError(f"an image must be a [C, H, W] tensor, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise MaskrtError(f"images must be float tensors in [0, 1], got dtype {image.dtype}")
    scale = resize_scale(image.shape[-2], image.shape[-1], min_size, max_size)
    return F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                         align_corners=False)[0]


def resize_target(target: dict[str, Tensor], original_size: tuple[int, int], new_size: tuple[int, int],
                  min_size: float, max_size: float) -> dict[str, Tensor]:
    """Scale a training target with its image: boxes by new/original per axis (float32 ratios
    as torchvision), masks [N, h, w] by nearest interpolation with the image's scale factor."""
    resized = dict(target)
    resized["boxes"] = resize_boxes(target["boxes"], original_size, new_size)
    if "masks" in target:
        masks = target["masks"]
        scale = resize_scale(original_size[0], original_size[1], min_size, max_size)
        if masks.shape[0] == 0:
            resized["masks"] = masks.new_zeros((0, *new_size))
        else:
            resized["masks"] = F.interpolate(masks[:, None].float(), scale_factor=scale,
                                             recompute_scale_factor=True)[:, 0].byte()
    return resized


def resize_boxes(boxes: Tensor, original_size: Sequence[int], new_size: Sequence[int]) -> Tensor:
    """xyxy boxes [N, 4] from an image of `original_size` (h, w) to one of `new_size`."""
    ratio_h, ratio_w = (torch.tensor(float(new), dtype=torch.float32, device=boxes.device)
                        / torch.tensor(float(old), dtype=torch.float32, device=boxes.device)
                        for new, old in zip(new_size, original_size))
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=-1)


def batch_images(images: Sequence[Tensor], fill: Sequence[float], size_divisible: int = 32) -> Tensor:
    """Pad [C, h_i, w_i] images top-left into one [B, C, H, W] batch, H and W the largest
    sizes rounded up to multiples of `size_divisible`; the padding is `fill` per channel."""
    channels = images[0].shape[0]
    height = int(math.ceil(max(img.shape[-2] for img in images) / size_divisible) * size_divisible)
    width = int(math.ceil(max(img.shape[-1] for img in images) / size_divisible) * size_divisible)
    fill_values = torch.as_tensor(fill, dtype=images[0].dtype, device=images[0].device).view(1, channels, 1, 1)
    batch = fill_values.expand(len(images), channels, height, width).clone()
    for index, image in enumerate(images):
        batch[index, :, :image.shape[-2], :image.shape[-1]] = image
    return batch


def _bilinear_matrix(starts: Tensor, stops: Tensor, source_size: int, image_size: int) -> Tensor:
    """Rows = image pixels, columns = source-mask pixels: the weights with which
    `F.interpolate(bilinear, align_corners=False)` resizes a `source_size` mask to the
    integer box [start, stop] (length stop - start + 1, at least 1), zero outside the box.

    starts, stops: int64 [N] -> [N, image_size, source_size] float32.
    """
    length = (stops - starts + 1).clamp(min=1)  # torchvision: max(int(x2 - x1 + 1), 1)
    pixel = torch.arange(image_size, device=starts.device)
    local = pixel[None, :] - starts[:, None]  # [N, image_size] index inside the resized mask
    inside = (local >= 0) & (local <= (stops - starts)[:, None])
    # PyTorch's source index for align_corners=False, in float32: scale*(d+0.5)-0.5, floored at 0.
    scale = torch.tensor(float(source_size), dtype=torch.float32, device=starts.device) / length.to(torch.float32)
    source = (scale[:, None] * (local.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    lower = source.floor().to(torch.int64).clamp(max=source_size - 1)
    upper = (lower + 1).clamp(max=source_size - 1)
    upper_weight = source - lower.to(torch.float32)
    lower_weight = 1.0 - upper_weight
    weights = torch.zeros(*local.shape, source_size, dtype=torch.float32, device=starts.device)
    inside_f = inside.to(torch.float32)
    weights.scatter_add_(2, lower[..., None], (lower_weight * inside_f)[..., None])
    weights.scatter_add_(2, upper[..., None], (upper_weight * inside_f)[..., None])
    return weights


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1) -> Tensor:
    """Paste M x M mask probabilities into a full image at their boxes (torchvision's algorithm).

    Each mask is padded by `padding` zeros, its box scaled by (M + 2p) / M about the centre
    and truncated to integers, the padded mask bilinearly resized to the integer box
    (width x2 - x1 + 1) and placed there, clipped to the image. Done for all masks at once as
    two small matrix products (rows x mask x columns) instead of a loop.

    masks [N, 1, M, M] or [N, M, M], boxes [N, 4] xyxy in the image's pixels,
    image_size (H, W) -> [N, 1, H, W].
    """
    if masks.dim() == 4:
        masks = masks[:, 0]
    height, width = image_size
    if masks.shape[0] == 0:
        return masks.new_zeros((0, 1, height, width))
    size = masks.shape[-1]
    padded = F.pad(masks, (padding,) * 4).to(torch.float32)
    scale = float(size + 2 * padding) / size
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    center_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    center_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    # .to(int64) truncates toward zero, as torchvision's `expand_boxes(...).to(torch.int64)`.
    x1 = (center_x - half_w).to(torch.int64)
    x2 = (center_x + half_w).to(torch.int64)
    y1 = (center_y - half_h).to(torch.int64)
    y2 = (center_y + half_h).to(torch.int64)
    rows = _bilinear_matrix(y1, y2, padded.shape[-2], height)  # [N, H, M+2]
    cols = _bilinear_matrix(x1, x2, padded.shape[-1], width)  # [N, W, M+2]
    pasted = torch.bmm(torch.bmm(rows, padded), cols.transpose(1, 2))
    return pasted.to(masks.dtype)[:, None]


def postprocess(boxes: Tensor, masks: Tensor, resized: tuple[int, int], original: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Detections of one image from the resized input back to the caller's pixels.

    boxes [N, 4] in resized pixels, masks [N, M, M] -> boxes [N, 4], masks [N, 1, H, W]."""
    boxes = resize_boxes(boxes, resized, original)
    return boxes, paste_masks_in_image(masks, boxes, original)
