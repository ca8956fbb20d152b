"""Training-time transforms on numpy samples: resize, horizontal flip, scale jitter, colour jitter,
repainting with procedural textures, camera blur and noise.

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


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise, float32 [height,width], about 0..1: a cells x cells grid, bicubic upsampled."""
    grid = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def natural_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like float32 BGR [height,width,3] picture in about 0..255, procedural only.

    Fractal (1/f-like) noise: octaves of smooth noise from 2 cells up, each `persistence`
    times the amplitude of the coarser one, mapped through a random palette of 2-4 colours
    (natural scenes have most of their energy at low frequencies and a few dominant colours).
    Half the time a few soft-edged blobs and straight edges of other colours are laid over it:
    the clutter and strong edges of photographs, which a shape detector must learn not to take
    for objects. Then a little per-pixel grain.
    """
    persistence = rng.uniform(0.35, 0.75)
    field = np.zeros((height, width), np.float32)
    amplitude = 1.0
    for octave in range(int(rng.integers(3, 8))):
        field += amplitude * _smooth_noise(rng, height, width, 2 << octave)
        amplitude *= persistence
    low, high = float(field.min()), float(field.max())
    levels = np.clip((field - low) * (255 / max(high - low, 1e-6)), 0, 255).astype(np.uint8)
    palette = rng.uniform(0, 255, (int(rng.integers(2, 5)), 3)).astype(np.float32)
    stops = np.linspace(0, 255, len(palette))
    lut = np.stack([np.interp(np.arange(256), stops, palette[:, c]) for c in range(3)], axis=-1).astype(np.float32)
    picture = lut[levels]  # [H,W,3]: the palette looked up per grey level
    if rng.uniform() < 0.5:
        # Drawn in their colours on one overlay with one soft alpha, then blended once.
        overlay = np.zeros((height, width, 3), np.float32)
        alpha = np.zeros((height, width), np.float32)
        for _ in range(int(rng.integers(1, 6))):
            colour = rng.uniform(0, 255, 3).tolist()
            if rng.uniform() < 0.5:
                centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
                axes = (int(rng.integers(2, max(3, width // 3))), int(rng.integers(2, max(3, height // 3))))
                angle = float(rng.uniform(0, 180))
                opacity = float(rng.uniform(0.3, 0.8))  # a see-through blob, not a disc to mistake for one
                cv2.ellipse(overlay, centre, axes, angle, 0, 360, [opacity * c for c in colour], -1)
                cv2.ellipse(alpha, centre, axes, angle, 0, 360, opacity, -1)
            else:
                p0 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
                p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
                thickness = int(rng.integers(1, max(2, width // 20)))
                cv2.line(overlay, p0, p1, colour, thickness)
                cv2.line(alpha, p0, p1, 1.0, thickness)
        sigma = float(rng.uniform(1.0, 4.0))
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)[..., None]
        overlay = cv2.GaussianBlur(overlay, (0, 0), sigma)
        picture = picture * (1 - alpha) + overlay  # the blurred overlay is already weighted by its alpha
    grain = rng.uniform(0, 10)
    if grain > 2:  # grey grain, as a sensor's luminance noise
        picture += grain * rng.standard_normal((height, width, 1), dtype=np.float32)
    return picture


def repaint(sample: Sample, rng: np.random.Generator, p_background: float = 0.5, p_instance: float = 0.3) -> Sample:
    """Paint new, photo-like textures (`natural_texture`) where the masks say, nothing else moves.

    With probability `p_background` every pixel outside all instance masks gets one new
    texture; independently, with probability `p_instance` each instance's (visible) mask gets
    its own texture, tinted and half the time shaded by a ramp. Masks, boxes and labels are
    unchanged: the silhouettes, occlusion included, stay those of the annotation, and the
    model sees the same shapes on the varied, cluttered surfaces of real pictures.
    """
    height, width = sample.image.shape[:2]
    image = sample.image.astype(np.float32)
    masks = sample.masks.astype(bool)
    if rng.uniform() < p_background:
        background = ~masks.any(axis=0) if masks.shape[0] else np.ones((height, width), bool)
        image[background] = natural_texture(rng, height, width)[background]
    for mask, box in zip(masks, sample.boxes):
        if rng.uniform() < p_instance:
            # The texture is made for the instance's box only (cheaper; the same look).
            x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
            x2, y2 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
            if x2 <= x1 or y2 <= y1:
                continue
            fill = natural_texture(rng, y2 - y1, x2 - x1) * rng.uniform(0.6, 1.3, 3).astype(np.float32)
            if rng.uniform() < 0.5:
                along_x = rng.uniform() < 0.5  # soft light from the left/right or from above/below
                ramp = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(1.0, 1.4), fill.shape[1 if along_x else 0],
                                   dtype=np.float32)
                fill *= ramp[None, :, None] if along_x else ramp[:, None, None]
            inside = mask[y1:y2, x1:x2]
            image[y1:y2, x1:x2][inside] = fill[inside]
    return Sample(image=np.clip(image, 0, 255).astype(np.uint8), boxes=sample.boxes, labels=sample.labels,
                  masks=sample.masks, image_id=sample.image_id)


def camera_noise(image: np.ndarray, rng: np.random.Generator, max_blur_sigma: float = 1.2,
                 max_noise_sigma: float = 10.0) -> np.ndarray:
    """A softer, noisier camera: Gaussian blur (sigma 0.3..max) and sensor noise on a BGR uint8 image."""
    out = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.3, max_blur_sigma))).astype(np.float32)
    out += rng.normal(0, rng.uniform(0, max_noise_sigma), out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def train_augment(sample: Sample, rng: np.random.Generator, scale_range: tuple[float, float] = (0.6, 1.5),
                  p_scale: float = 0.5, p_flip: float = 0.5, p_color: float = 0.8, p_repaint: float = 0.0,
                  p_camera: float = 0.0) -> Sample:
    """The training augmentation: scale jitter, horizontal flip, repainting (`repaint`: the
    background at `p_repaint`, each instance at 0.6 x that), colour jitter, camera blur and
    noise (each at random). With p_repaint = p_camera = 0 it draws the same random numbers as
    before they existed.

    A scale jitter that would leave no instance is not applied (keeps the image useful).
    """
    if p_scale > 0 and rng.uniform() < p_scale and sample.labels.size:
        jittered = scale_jitter(sample, rng, scale_range)
        if jittered.labels.size:
            sample = jittered
    if rng.uniform() < p_flip:
        sample = hflip(sample)
    if p_repaint > 0:
        sample = repaint(sample, rng, p_background=p_repaint, p_instance=0.6 * p_repaint)
    if rng.uniform() < p_color:
        sample = Sample(image=photometric_jitter(sample.image, rng), boxes=sample.boxes, labels=sample.labels,
                        masks=sample.masks, image_id=sample.image_id)
    if p_camera > 0 and rng.uniform() < p_camera:
        sample = Sample(image=camera_noise(sample.image, rng), boxes=sample.boxes, labels=sample.labels,
                        masks=sample.masks, image_id=sample.image_id)
    return sample
