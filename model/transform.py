"""Image and target preparation (resize, pad, batch) and detection post-processing
(boxes back to the caller's pixels, masks pasted into the image).

The rules are torchvision's `GeneralizedRCNNTransform` and `paste_masks_in_image`, in the
order design.md fixes; the difference is where normalisation happens: here images stay in
[0, 1] and are padded with `image_mean` (the model normalises inside `detect_batch`, so the
padding becomes 0 exactly as torchvision's pad-after-normalise).

detectron2's rules, for models imported from it (`rule="detectron2"`; file and line numbers
are detectron2's at commit 02b5c4e):
- resize: `ResizeShortestEdge.get_output_shape` (data/transforms/augmentation_impl.py lines
  181-200) rounds the new size (`int(x + 0.5)`), and `ResizeTransform.apply_image`
  (data/transforms/transform.py lines 112-123) resizes uint8 images with PIL's bilinear, which
  antialiases when shrinking and rounds to uint8: here PIL itself, on the uint8 image
  `round(255 x)` (the image the [0, 1] floats came from), then back to [0, 1].
- pasting: `paste_masks_in_image` / `_do_paste_mask` (layers/mask_ops.py lines 17-147): each
  image pixel centre (x + 0.5, y + 0.5) inside the box is sampled from the M x M mask with
  `grid_sample` (bilinear, zeros outside, align_corners=False): mask coordinate
  `u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5`; no padding, no integer box. On CPU detectron2
  pastes box by box over `[floor(x1) - 1, ceil(x2) + 1)` (rows likewise) and leaves the rest 0.
- boxes back to the image: scaled, then clipped to the image, and empty ones dropped
  (`detector_postprocess`, modeling/postprocessing.py lines 41-58).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from maskrt.errors import MaskrtError

RESIZE_RULES = ("torchvision", "detectron2")
PASTE_RULES = ("torchvision", "detectron2")


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


def resize_image(image: Tensor, min_size: float, max_size: float, rule: str = "torchvision") -> Tensor:
    """Bilinear resize (align_corners=False, recomputed scale factor) of [C, h, w] -> [C, h', w'].

    rule "detectron2": to `maskrt.runtime.preprocess.detectron2_resized_size`, by PIL's bilinear on the uint8 image
    `round(255 x)`, as detectron2's `ResizeTransform` resizes the uint8 image it is given."""
    if image.dim() != 3:
        raise MaskrtError(f"an image must be a [C, H, W] tensor, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise MaskrtError(f"images must be float tensors in [0, 1], got dtype {image.dtype}")
    if rule not in RESIZE_RULES:
        raise MaskrtError(f"unknown resize rule {rule!r}: choose 'torchvision' or 'detectron2'")
    if rule == "detectron2":
        # The size rule is the runtime's (torch-free), so that the model and the runtime share one.
        from maskrt.runtime.preprocess import detectron2_resized_size

        size = detectron2_resized_size((int(image.shape[-2]), int(image.shape[-1])), min_size, max_size)
        if size == (int(image.shape[-2]), int(image.shape[-1])):
            return image  # PIL's resize to the same size is the identity
        return pil_bilinear_resize(image, size)
    scale = resize_scale(image.shape[-2], image.shape[-1], min_size, max_size)
    return F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                         align_corners=False)[0]


def pil_bilinear_resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """[C, h, w] floats in [0, 1] -> [C, H, W]: PIL's bilinear resize (Pillow's `Image.resize`,
    the filter detectron2's `ResizeTransform` uses) of the uint8 image `round(255 x)`, / 255.
    Exact for images that came from uint8 (x = v / 255)."""
    import numpy as np
    from PIL import Image

    pixels = (image.detach() * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if pixels.shape[-1] == 3:  # an "RGB" image, as detectron2's (and the runtime's) BGR array
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((size[1], size[0]), Image.BILINEAR))
    else:  # one "L" image per channel: PIL's filter works per channel
        resized = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize(
            (size[1], size[0]), Image.BILINEAR)) for c in range(pixels.shape[-1])], axis=-1)
    chw = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).to(device=image.device, dtype=image.dtype)
    # x * float(1/255) as the runtime's letterbox scales its uint8 pixels.
    return chw * torch.tensor(1.0 / 255.0, dtype=torch.float32).to(image.dtype)


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


def content_sizes(images: Tensor, fill: Tensor) -> Tensor:
    """(h, w) of each image's content inside a padded batch: the last row and column holding a
    pixel (any channel) that differs from `fill`, plus one.

    `batch_images` and the runtime's letterbox place each image top-left and fill the rest
    with exactly `image_mean`, so this recovers the resized size that torchvision clips boxes
    to (`GeneralizedRCNNTransform` -> `ImageList.image_sizes`, the sizes before padding;
    `RegionProposalNetwork.filter_proposals` and `RoIHeads.postprocess_detections` clip to
    them) and detectron2 too (`ImageList.from_tensors` keeps `image_sizes`,
    `find_top_rpn_proposals` and `fast_rcnn_inference` clip to them), from the one input the
    exported graph has. An image whose last rows (or columns) equal `fill` in every pixel and
    channel counts as that much smaller; an image that equals `fill` everywhere counts as the
    whole input. Float reductions only (ReduceMax on float tensors, which every backend has).

    images float [B, C, H, W], fill [1, C, 1, 1] (same dtype) -> int64 [B, 2].
    """
    height, width = int(images.shape[-2]), int(images.shape[-1])
    differs = (images - fill).abs().amax(dim=1)  # [B, H, W]: > 0 where the content is
    rows = (differs.amax(dim=2) > 0).to(images.dtype)  # [B, H]
    cols = (differs.amax(dim=1) > 0).to(images.dtype)  # [B, W]
    row_numbers = torch.arange(1, height + 1, dtype=images.dtype, device=images.device)
    col_numbers = torch.arange(1, width + 1, dtype=images.dtype, device=images.device)
    content_h = (rows * row_numbers).amax(dim=1)
    content_w = (cols * col_numbers).amax(dim=1)
    content_h = torch.where(content_h > 0, content_h, torch.full_like(content_h, height))
    content_w = torch.where(content_w > 0, content_w, torch.full_like(content_w, width))
    return torch.stack((content_h, content_w), dim=1).to(torch.int64)


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
    (width x2 - x1 + 1) and placed there, clipped to the image. Each resize is two small matrix
    products (rows x mask x columns) over the box's part of the image.

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
    # The weights are 0 outside each integer box, so only the box's part of the image is
    # multiplied out (a full-image product per mask cost ~4x more on a CPU at 100 masks).
    pasted = padded.new_zeros((padded.shape[0], height, width))
    row_starts, row_stops = y1.clamp(0, height).tolist(), (y2 + 1).clamp(0, height).tolist()
    col_starts, col_stops = x1.clamp(0, width).tolist(), (x2 + 1).clamp(0, width).tolist()
    for index, (top, bottom, left, right) in enumerate(zip(row_starts, row_stops, col_starts, col_stops)):
        if bottom > top and right > left:
            pasted[index, top:bottom, left:right] = (rows[index, top:bottom] @ padded[index]) @ cols[index, left:right].T
    return pasted.to(masks.dtype)[:, None]


def detectron2_paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Paste M x M mask probabilities at their boxes as detectron2 does on CPU
    (`_do_paste_mask` with skip_empty, layers/mask_ops.py lines 17-69): per box, over the
    pixels `[floor(x1) - 1, ceil(x2) + 1) x [floor(y1) - 1, ceil(y2) + 1)` clipped to the
    image, `grid_sample` at the pixel centres; 0 elsewhere. Boxes with a side <= 0 (detectron2
    drops them before pasting) paste nothing.

    masks [N, 1, M, M] or [N, M, M], boxes [N, 4] xyxy in the image's pixels, image_size (H, W)
    -> float probabilities [N, 1, H, W] (detectron2 thresholds them with >= 0.5)."""
    if masks.dim() == 4:
        masks = masks[:, 0]
    height, width = image_size
    pasted = masks.new_zeros((masks.shape[0], 1, height, width), dtype=torch.float32)
    for index in range(masks.shape[0]):
        box = boxes[index:index + 1].to(torch.float32)
        x0, y0, x1, y1 = (float(v) for v in box[0])
        if not (x1 > x0 and y1 > y0):
            continue
        # mask_ops.py lines 39-43: the region, as int32 after clamping.
        col_start = max(int(math.floor(x0)) - 1, 0)
        row_start = max(int(math.floor(y0)) - 1, 0)
        col_stop = min(int(math.ceil(x1)) + 1, width)
        row_stop = min(int(math.ceil(y1)) + 1, height)
        if col_start >= col_stop or row_start >= row_stop:
            continue
        # Lines 51-59, in float32 as there: normalised grid coordinates of the pixel centres.
        img_y = torch.arange(row_start, row_stop, dtype=torch.float32, device=masks.device) + 0.5
        img_x = torch.arange(col_start, col_stop, dtype=torch.float32, device=masks.device) + 0.5
        img_y = (img_y - box[:, 1:2]) / (box[:, 3:4] - box[:, 1:2]) * 2 - 1
        img_x = (img_x - box[:, 0:1]) / (box[:, 2:3] - box[:, 0:1]) * 2 - 1
        grid = torch.stack([img_x[:, None, :].expand(1, img_y.shape[1], img_x.shape[1]),
                            img_y[:, :, None].expand(1, img_y.shape[1], img_x.shape[1])], dim=3)
        sampled = F.grid_sample(masks[index:index + 1, None].to(torch.float32), grid, align_corners=False)
        pasted[index, 0, row_start:row_stop, col_start:col_stop] = sampled[0, 0]
    return pasted.to(masks.dtype)


def postprocess(boxes: Tensor, masks: Tensor, resized: tuple[int, int], original: tuple[int, int],
                paste_rule: str = "torchvision") -> tuple[Tensor, Tensor]:
    """Detections of one image from the resized input back to the caller's pixels.

    boxes [N, 4] in resized pixels, masks [N, M, M] -> boxes [N, 4], masks [N, 1, H, W].
    paste_rule "detectron2": boxes are also clipped to the image (`detector_postprocess`)
    and the masks pasted by `detectron2_paste_masks_in_image`."""
    boxes = resize_boxes(boxes, resized, original)
    if paste_rule == "detectron2":
        boxes = torch.stack((boxes[:, 0].clamp(0, original[1]), boxes[:, 1].clamp(0, original[0]),
                             boxes[:, 2].clamp(0, original[1]), boxes[:, 3].clamp(0, original[0])), dim=1)
        return boxes, detectron2_paste_masks_in_image(masks, boxes, original)
    if paste_rule != "torchvision":
        raise MaskrtError(f"unknown paste rule {paste_rule!r}: choose 'torchvision' or 'detectron2'")
    return boxes, paste_masks_in_image(masks, boxes, original)
