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
"""
from __future__ import annotations

import cv2
import numpy as np

from maskrt.runtime.masks import MaskCrops
from maskrt.runtime.preprocess import Letterbox

MASK_THRESHOLD = 0.5  # conventions: runtime masks are bool at probability > 0.5


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


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int],
                threshold: float | None = MASK_THRESHOLD, padding: int = 1) -> np.ndarray:
    """Paste MxM mask probabilities into an image of ``image_size`` (h, w), full frames.

    masks: float [N,M,M] probabilities for each box's class; boxes: [N,4] xyxy in the image's
    pixels. Returns bool [N,h,w] (probability > threshold) or, with threshold=None, the float32
    pasted probabilities [N,h,w] (zero outside each box): ``paste_mask_crops(...).full()``.
    """
    return paste_mask_crops(masks, boxes, image_size, threshold=threshold, padding=padding).full()


def paste_mask_crops(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int],
                     threshold: float | None = MASK_THRESHOLD, padding: int = 1) -> MaskCrops:
    """torchvision's paste rule (as ``paste_masks``) into each box's window only.

    masks: float [N,M,M] probabilities for each box's class; boxes: [N,4] xyxy in the image's
    pixels; image_size: (h, w). Crop i is the expanded integer box clipped to the image, bool
    (probability > threshold) or, with threshold=None, float32 probabilities; a box whose
    window lies outside the image gets a 0x0 crop. ``paste_mask_crops(...).full()`` equals the
    full-frame paste it replaced exactly (tests/test_runtime_crops.py keeps that as reference).
    """
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
