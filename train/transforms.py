"""Training-time transforms on numpy samples: resize, horizontal flip, scale jitter, colour jitter.

Every geometric transform moves the image, the boxes and the masks together, so that the
tight box of a transformed mask is the transformed box. Randomness comes only from the
`np.random.Generator` passed in: the same seed gives the same augmented sample.
Images are BGR uint8 [H,W,3], boxes float32 [N,4] xyxy continuous pixels, masks uint8 [N,H,W].
"""
from __future__ import annotations

import cv2
import numpy as np

from maskrt.train.coco import Sample


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes of [N,H,W] masks in continuous coordinates (a mask over columns
    0..9 gives x1 = 0, x2 = 10); an empty mask gives a zero box. -> float32 [N,4]."""
    boxes = np.zeros((masks.shape[0], 4), np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size:
            boxes[i] = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
    return boxes


def hflip(sample: Sample) -> Sample:
    """Mirror left-right: column c goes to W-1-c, so a box [x1, x2) goes to [W-x2, W-x1)."""
    width = sample.image.shape[1]
    boxes = sample.boxes.copy()
    boxes[:, 0], boxes[:, 2] = width - sample.boxes[:, 2], width - sample.boxes[:, 0]
    return Sample(image=np.ascontiguousarray(sample.image[:, ::-1]), boxes=boxes, labels=sample.labels,
                  masks=np.ascontiguousarray(sample.masks[:, :, ::-1]), image_id=sample.image_id)


def resize(sample: Sample, height: int, width: int) -> Sample:
    """Resize to height x width: image bilinear, masks nearest, boxes scaled per axis."""
    in_h, in_w = sample.image.shape[:2]
    image = cv2.resize(sample.image, (width, height), interpolation=cv2.INTER_LINEAR)
    if sample.masks.shape[0]:
        masks = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST) for m in sample.masks])
    else:
        masks = np.zeros((0, height, width), np.uint8)
    boxes = sample.boxes * np.array([width / in_w, height / in_h, width / in_w, height / in_h], np.float32)
    return Sample(image=image, boxes=boxes.astype(np.float32), labels=sample.labels, masks=masks,
                  image_id=sample.image_id)


def keep_instances(sample: Sample, keep: np.ndarray) -> Sample:
    """The sample with only the instances where bool [N] `keep` is True."""
    return Sample(image=sample.image, boxes=sample.boxes[keep], labels=sample.labels[keep],
                  masks=sample.masks[keep], image_id=sample.image_id)


def scale_jitter(sample: Sample, rng: np.random.Generator, scale_range: tuple[float, float] = (0.6, 1.5),
                 min_visible: float = 0.3) -> Sample:
    """Zoom by a random factor while keeping the canvas size, so objects change size even
    though the model later resizes every image to the same side.

    Zoom-in (>1) crops a random window; zoom-out (<1) places the shrunk image at a random
    spot on a canvas of its mean colour. Boxes are recomputed from the moved masks;
    instances that keep less than `min_visible` of their (scaled) area, or fewer than 4
    pixels, are dropped.
    """
    height, width = sample.image.shape[:2]
    scale = float(np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]))))
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    scaled = resize(sample, new_h, new_w)
    area_before = scaled.masks.reshape(scaled.masks.shape[0], -1).sum(axis=1)
    if scale >= 1:
        top, left = int(rng.integers(0, new_h - height + 1)), int(rng.integers(0, new_w - width + 1))
        image = scaled.image[top:top + height, left:left + width]
        masks = scaled.masks[:, top:top + height, left:left + width]
    else:
        top, left = int(rng.integers(0, height - new_h + 1)), int(rng.integers(0, width - new_w + 1))
        image = np.empty_like(sample.image)
        image[:] = sample.image.reshape(-1, 3).mean(axis=0).astype(np.uint8)
        image[top:top + new_h, left:left + new_w] = scaled.image
        masks = np.zeros((scaled.masks.shape[0], height, width), np.uint8)
        masks[:, top:top + new_h, left:left + new_w] = scaled.masks
    area_after = masks.reshape(masks.shape[0], -1).sum(axis=1)
    keep = (area_after >= 4) & (area_after >= min_visible * np.maximum(area_before, 1))
    moved = Sample(image=np.ascontiguousarray(image), boxes=masks_to_boxes(masks), labels=scaled.labels,
                   masks=np.ascontiguousarray(masks), image_id=sample.image_id)
    return keep_instances(moved, keep)


def photometric_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.25,
                       contrast: float = 0.25, saturation: float = 0.3, hue_degrees: float = 12.0) -> np.ndarray:
    """Random brightness, contrast, saturation and hue shift of a BGR uint8 image."""
    out = image.astype(np.float32)
    out *= 1 + rng.uniform(-brightness, brightness)
    mean = out.mean()
    out = (out - mean) * (1 + rng.uniform(-contrast, contrast)) + mean
    hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue_degrees, hue_degrees) / 2) % 180  # OpenCV hue is 0..179
    hsv[..., 1] = np.clip(hsv[..., 1] * (1 + rng.uniform(-saturation, saturation)), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)


def train_augment(sample: Sample, rng: np.random.Generator, scale_range: tuple[float, float] = (0.6, 1.5),
                  p_scale: float = 0.5, p_flip: float = 0.5, p_color: float = 0.8) -> Sample:
    """The training augmentation: scale jitter, horizontal flip, colour jitter (each at random).

    A scale jitter that would leave no instance is not applied (keeps the image useful).
    """
    if p_scale > 0 and rng.uniform() < p_scale and sample.labels.size:
        jittered = scale_jitter(sample, rng, scale_range)
        if jittered.labels.size:
            sample = jittered
    if rng.uniform() < p_flip:
        sample = hflip(sample)
    if rng.uniform() < p_color:
        sample = Sample(image=photometric_jitter(sample.image, rng), boxes=sample.boxes, labels=sample.labels,
                        masks=sample.masks, image_id=sample.image_id)
    return sample
