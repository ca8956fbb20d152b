"""Graph outputs -> detections in the caller's image: undo the letterbox, paste the masks.

Mask pasting follows torchvision's ``paste_masks_in_image`` (roi_heads.py) so the runtime's
masks equal the PyTorch model's: pad the MxM mask by one zero pixel on each side, grow the
box about its centre by (M+2)/M, truncate the box to integers, resize the padded mask to the
integer box's (x2-x1+1, y2-y1+1) with bilinear sampling (cv2 INTER_LINEAR on float32 equals
torch's bilinear, align_corners=False), place it, clip it to the image. The masks are pasted
in the *original* image after the boxes are mapped back (pasting in the letterboxed image
and resizing loses accuracy: mmdeploy lost 1 mask AP that way).

``paste_mask_crops`` applies that rule to each box's window only and returns ``MaskCrops``
(runtime/masks.py): the work and memory grow with the boxes' areas, not N x the image. It is
what the Predictor uses; ``paste_masks`` gives the same masks as N full frames.

Models imported from detectron2 carry ``paste_rule = "detectron2"`` in their metadata and are
pasted by detectron2's rule instead (``rule="detectron2"``; ``paste_masks_in_image`` /
``_do_paste_mask``, detectron2/layers/mask_ops.py at commit 02b5c4e, lines 17-147): every
pixel centre within one pixel of the box samples the MxM mask bilinearly at
``u = (x + 0.5 - x1) / (x2 - x1) * M - 0.5`` (``grid_sample``, zeros outside the mask,
align_corners=False), no padding, no integer box; a pixel is in the mask at probability
``>= 0.5``. Its sampling grid is separable, so each box's window is two small matrix products.
"""
from __future__ import annotations

import cv2
import numpy as np

from maskrt.errors import MaskrtError
from maskrt.runtime.masks import MaskCrops
from maskrt.runtime.preprocess import Letterbox
from maskrt.runtime.workers import worker_pool

MASK_THRESHOLD = 0.5  # conventions: runtime masks are bool at probability > 0.5
PASTE_RULES = ("torchvision", "detectron2")


def undo_letterbox_boxes(boxes: np.ndarray, placed: Letterbox) -> np.ndarray:
    """Boxes [N,4] xyxy in model-input pixels -> float32 [N,4] in the original image, clipped to it."""
    sx, sy = placed.box_scale
    h, w = placed.orig_size
    out = boxes.astype(np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)
    np.clip(out[:, 0::2], 0.0, w, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0.0, h, out=out[:, 1::2])
    return out


def expand_boxes(boxes: np.ndarray, scale: float) -> np.ndarray:
    """Grow boxes [N,4] about their centres by ``scale`` (torchvision's expand_boxes), float32."""
    boxes = boxes.astype(np.float32)
    half_w = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * np.float32(scale)
    half_h = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * np.float32(scale)
    centre_x = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    centre_y = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    return np.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], axis=1)


def _detectron2_axis_weights(start: int, stop: int, low: np.float32, high: np.float32, size: int) -> np.ndarray:
    """Bilinear weights [stop - start, size] with which pixels start..stop-1 of one axis sample
    a mask of ``size`` cells spanning [low, high] (``grid_sample``, zeros outside, float32 as
    detectron2 computes the grid: mask_ops.py lines 51-54)."""
    centre = np.arange(start, stop, dtype=np.float32) + np.float32(0.5)
    normalised = (centre - low) / (high - low) * np.float32(2) - np.float32(1)
    # grid_sample's unnormalisation for align_corners=False: ((g + 1) * size - 1) / 2.
    coord = ((normalised + np.float32(1)) * np.float32(size) - np.float32(1)) / np.float32(2)
    lower = np.floor(coord)
    upper_weight = coord - lower
    lower = lower.astype(np.int64)
    weights = np.zeros((stop - start, size), dtype=np.float32)
    rows = np.arange(stop - start)
    for cell, weight in ((lower, np.float32(1) - upper_weight), (lower + 1, upper_weight)):
        inside = (cell >= 0) & (cell < size)  # taps outside the mask read zero
        weights[rows[inside], cell[inside]] += weight[inside]
    return weights


def detectron2_mask_crops(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int],
                          threshold: float | None = MASK_THRESHOLD) -> MaskCrops:
    """detectron2's paste (module docstring) as crops: bool (probability >= threshold) or, with
    threshold=None, float32 probabilities. Crop i is detectron2's CPU window
    ``[floor(x1) - 1, ceil(x2) + 1)`` x ``[floor(y1) - 1, ceil(y2) + 1)`` clipped to the image
    (mask_ops.py lines 39-43; detectron2 leaves the rest 0); a box with a side <= 0 (detectron2
    drops those first) or a window outside the image gets a 0x0 crop."""
    h, w = image_size
    count = len(masks)
    dtype = np.float32 if threshold is None else bool
    origins = np.zeros((count, 2), np.int64)
    boxes = np.asarray(boxes, dtype=np.float32)
    crops = []
    for i in range(count):
        x1, y1, x2, y2 = boxes[i]
        col_start, row_start = max(int(np.floor(x1)) - 1, 0), max(int(np.floor(y1)) - 1, 0)
        col_stop, row_stop = min(int(np.ceil(x2)) + 1, w), min(int(np.ceil(y2)) + 1, h)
        if not (x2 > x1 and y2 > y1) or col_start >= col_stop or row_start >= row_stop:
            crops.append(np.zeros((0, 0), dtype))
            continue
        mask = np.asarray(masks[i], dtype=np.float32)
        rows = _detectron2_axis_weights(row_start, row_stop, y1, y2, mask.shape[0])
        cols = _detectron2_axis_weights(col_start, col_stop, x1, x2, mask.shape[1])
        window = rows @ mask @ cols.T
        crops.append(window if threshold is None else window >= threshold)
        origins[i] = col_start, row_start
    return MaskCrops(tuple(crops), origins, (int(h), int(w)))


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int],
                threshold: float | None = MASK_THRESHOLD, padding: int = 1, rule: str = "torchvision") -> np.ndarray:
    """Paste MxM mask probabilities into an image of ``image_size`` (h, w), full frames.

    masks: float [N,M,M] probabilities for each box's class; boxes: [N,4] xyxy in the image's
    pixels. Returns bool [N,h,w] (probability > threshold; >= for rule "detectron2") or, with
    threshold=None, the float32 pasted probabilities [N,h,w] (zero outside each box):
    ``paste_mask_crops(...).full()``.
    """
    return paste_mask_crops(masks, boxes, image_size, threshold=threshold, padding=padding, rule=rule).full()


def paste_mask_crops(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int],
                     threshold: float | None = MASK_THRESHOLD, padding: int = 1, rule: str = "torchvision",
                     threads: int = 1) -> MaskCrops:
    """A paste rule into each box's window only. rule "torchvision" (as ``paste_masks``, the
    module docstring's first rule) or "detectron2" (``detectron2_mask_crops``; ``padding`` unused).
    ``threads`` > 1: detections i, i + threads, ... pasted in thread i (each mask alone, so the
    same crops; cv2.resize and NumPy release the GIL).

    masks: float [N,M,M] probabilities for each box's class; boxes: [N,4] xyxy in the image's
    pixels; image_size: (h, w). Crop i is the expanded integer box clipped to the image, bool
    (probability > threshold) or, with threshold=None, float32 probabilities; a box whose
    window lies outside the image gets a 0x0 crop. ``paste_mask_crops(...).full()`` equals the
    full-frame paste it replaced exactly (tests/test_runtime_crops.py keeps that as reference).
    """
    if threads < 1:
        raise MaskrtError(f"threads must be at least 1, got {threads}")
    if threads > 1 and len(masks) > 1:
        return _paste_mask_crops_in_threads(masks, boxes, image_size, threshold, padding, rule,
                                            min(threads, len(masks)))
    if rule == "detectron2":
        return detectron2_mask_crops(masks, boxes, image_size, threshold)
    if rule != "torchvision":
        raise MaskrtError(f"unknown paste rule {rule!r}: choose 'torchvision' or 'detectron2'")
    h, w = image_size
    count = len(masks)
    dtype = np.float32 if threshold is None else bool
    origins = np.zeros((count, 2), np.int64)
    if count == 0:
        return MaskCrops((), origins, (int(h), int(w)))
    size = masks.shape[-1]
    padded = np.pad(masks.astype(np.float32), ((0, 0), (padding, padding), (padding, padding)))
    # torch's .to(int64) truncates toward zero; astype does the same.
    int_boxes = expand_boxes(boxes, (size + 2 * padding) / size).astype(np.int64)
    crops = []
    for i, (x1, y1, x2, y2) in enumerate(int_boxes.tolist()):
        box_w, box_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        x0_img, x1_img = max(x1, 0), min(x2 + 1, w)
        y0_img, y1_img = max(y1, 0), min(y2 + 1, h)
        if x0_img >= x1_img or y0_img >= y1_img:
            crops.append(np.zeros((0, 0), dtype))  # the box lies outside the image
            continue
        resized = cv2.resize(padded[i], (box_w, box_h), interpolation=cv2.INTER_LINEAR)
        if resized.ndim == 1:  # cv2 drops a unit dimension of a 1xK or Kx1 result
            resized = resized.reshape(box_h, box_w)
        window = resized[y0_img - y1:y1_img - y1, x0_img - x1:x1_img - x1]
        crops.append(np.ascontiguousarray(window) if threshold is None else window > threshold)
        origins[i] = x0_img, y0_img
    return MaskCrops(tuple(crops), origins, (int(h), int(w)))


def _paste_mask_crops_in_threads(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int],
                                 threshold: float | None, padding: int, rule: str, threads: int) -> MaskCrops:
    """``paste_mask_crops`` with detections i, i + threads, ... pasted by thread i (the caller is
    thread 0), put back in their order."""
    count = len(masks)
    shares = [np.arange(start, count, threads) for start in range(threads)]

    def paste(share: np.ndarray) -> MaskCrops:
        return paste_mask_crops(masks[share], boxes[share], image_size, threshold, padding, rule)

    futures = [worker_pool(threads - 1).submit(paste, share) for share in shares[1:]]
    pasted = [paste(shares[0])] + [future.result() for future in futures]
    crops: list[np.ndarray] = [np.zeros((0, 0), bool)] * count
    origins = np.zeros((count, 2), np.int64)
    for share, part in zip(shares, pasted):
        for index, crop in zip(share.tolist(), part.crops):
            crops[index] = crop
        origins[share] = part.origins
    return MaskCrops(tuple(crops), origins, part.image_size)
