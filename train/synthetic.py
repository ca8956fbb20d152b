"""A synthetic instance-segmentation dataset written as real COCO (`maskrt data synth`).

Each image holds a few filled shapes (disc, triangle, rectangle, L-shape, ring, star) with
random size, rotation, aspect, colour and fill texture, on a textured, cluttered, noisy
background. Shapes are painted in order, so later shapes occlude earlier ones: every
instance's mask is its VISIBLE part, and an instance that is mostly hidden is dropped.
The output is the COCO "short" layout that `maskrt.train.coco.CocoDataset` reads:

    OUT/annotations/instances_train.json   OUT/train/000000.jpg ...
    OUT/annotations/instances_val.json     OUT/val/000000.jpg ...

Masks are stored as compressed RLE (`pycocotools.mask.encode`), boxes are the visible
mask's tight box, `area` its pixel count. Everything is a function of the seed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from maskrt.errors import MaskrtError

SHAPE_NAMES: tuple[str, ...] = ("disc", "triangle", "rectangle", "l_shape", "ring", "star")

# An instance whose visible part is below this fraction of its drawn area, or below
# MIN_VISIBLE_PIXELS, is "mostly hidden": it is not annotated (its pixels stay painted).
MIN_VISIBLE_FRACTION = 0.35
MIN_VISIBLE_PIXELS = 30


@dataclass
class SyntheticImage:
    """One generated picture: `image` BGR uint8 [H,W,3]; `labels[i]` in 1..len(SHAPE_NAMES)
    (index into ["__background__", *SHAPE_NAMES]); `masks` bool [N,H,W], visible parts."""

    image: np.ndarray
    labels: np.ndarray
    masks: np.ndarray


# --- shapes: binary silhouettes ------------------------------------------------------------

def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate [P,2] points (x, y) about the origin by `angle` radians."""
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _fill_polygon(size: int, points: np.ndarray) -> np.ndarray:
    """Rasterise a polygon given in float pixels into a bool [size,size] mask.

    cv2 takes fixed-point vertices (shift=4: 1/16 pixel) so small shapes keep their outline.
    """
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _ellipse_points(radius_x: float, radius_y: float, count: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, count, endpoint=False)
    return np.stack([radius_x * np.cos(t), radius_y * np.sin(t)], axis=1)


def shape_mask(name: str, size: int, center: tuple[float, float], radius: float, angle: float,
               aspect: float, rng: np.random.Generator) -> np.ndarray:
    """The silhouette of shape `name` as a bool [size,size] mask.

    `radius` is about half the shape's extent in pixels, `aspect` (~0.6..1.5) stretches it
    along its own x axis before rotating by `angle`.
    """
    cx, cy = center
    if name == "disc":
        pts = _ellipse_points(radius * aspect, radius)
    elif name == "triangle":
        # A random (not only equilateral) triangle: three angles jittered around 120 degrees apart.
        t = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * radius
        pts[:, 0] *= aspect
    elif name == "rectangle":
        half_w, half_h = radius * aspect, radius * rng.uniform(0.45, 1.0)
        pts = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    elif name == "l_shape":
        # An L: a square of side 2r with its top-right block cut away; arms of width 2r*arm.
        arm = rng.uniform(0.35, 0.6)  # arm thickness as a fraction of the side
        a = -radius + 2 * radius * arm
        pts = np.array([[-radius, -radius], [a, -radius], [a, a], [radius, a], [radius, radius],
                        [-radius, radius]], dtype=float)
        pts[:, 0] *= aspect
    elif name == "star":
        spikes = int(rng.integers(5, 7))
        t = np.linspace(0, 2 * np.pi, 2 * spikes, endpoint=False)
        r = np.where(np.arange(2 * spikes) % 2 == 0, radius, radius * rng.uniform(0.4, 0.55))
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    elif name == "ring":
        outer = _rotate(_ellipse_points(radius * aspect, radius), angle) + [cx, cy]
        inner_ratio = rng.uniform(0.4, 0.65)
        inner = _rotate(_ellipse_points(radius * aspect * inner_ratio, radius * inner_ratio), angle) + [cx, cy]
        return _fill_polygon(size, outer) & ~_fill_polygon(size, inner)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return _fill_polygon(size, _rotate(pts, angle) + [cx, cy])


# --- paint: textures for backgrounds and shapes -------------------------------------------

def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0,1], [size,size]: a random cells x cells grid, bicubic upsampled."""
    grid = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 [size,size,3] BGR picture in 0..255: flat, gradient, stripes, blotches or checks."""
    kind = rng.choice(["flat", "gradient", "stripes", "blotches", "checks"], p=[0.3, 0.25, 0.15, 0.2, 0.1])
    c0, c1 = _random_colour(rng), _random_colour(rng)
    if kind == "flat":
        return np.broadcast_to(c0, (size, size, 3)).astype(np.float32).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == "gradient":
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    elif kind == "stripes":
        period = rng.uniform(0.03, 0.15)
        t = (np.sin(2 * np.pi * along / period) > 0).astype(np.float32) * rng.uniform(0.3, 1.0)
    elif kind == "blotches":
        t = _smooth_noise(rng, size, int(rng.integers(3, 9)))
    else:
        cells = int(rng.integers(4, 16))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32) * rng.uniform(0.2, 0.6)
    return (c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.float32)


def _add_clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Distractors that are NOT instances: lines and small specks painted on the background."""
    size = canvas.shape[0]
    for _ in range(int(rng.integers(0, 6))):
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.line(canvas, p0, p1, _random_colour(rng).tolist(), int(rng.integers(1, 4)), lineType=cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 6))):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(canvas, centre, int(rng.integers(1, max(2, size // 60) + 1)), _random_colour(rng).tolist(), -1)


# --- one image ----------------------------------------------------------------------------

def generate_image(rng: np.random.Generator, size: int, max_instances: int = 6) -> SyntheticImage:
    """Paint one `size` x `size` image with 1..max_instances shapes; return it with its
    visible masks (occlusion resolved, mostly hidden instances dropped)."""
    canvas = texture(rng, size)
    _add_clutter(rng, canvas)
    drawn: list[tuple[int, np.ndarray]] = []  # (label, full silhouette), in paint order
    for _ in range(int(rng.integers(1, max_instances + 1))):
        label = int(rng.integers(1, len(SHAPE_NAMES) + 1))
        radius = size * rng.uniform(0.05, 0.25)
        center = (rng.uniform(0.05, 0.95) * size, rng.uniform(0.05, 0.95) * size)
        silhouette = shape_mask(SHAPE_NAMES[label - 1], size, center, radius, rng.uniform(0, 2 * np.pi),
                                rng.uniform(0.65, 1.4), rng)
        if silhouette.sum() < MIN_VISIBLE_PIXELS:
            continue
        fill = texture(rng, size)
        if rng.uniform() < 0.5:  # shading: a soft light/dark gradient over the shape
            fill *= 0.6 + 0.8 * _smooth_noise(rng, size, 2)[..., None]
        canvas[silhouette] = fill[silhouette]
        drawn.append((label, silhouette))

    # Occlusion: what a later shape covers is no longer visible in an earlier one.
    labels, masks = [], []
    covered = np.zeros((size, size), bool)
    for label, silhouette in reversed(drawn):
        visible = silhouette & ~covered
        covered |= silhouette
        if visible.sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * silhouette.sum()):
            labels.append(label)
            masks.append(visible)
    labels.reverse()
    masks.reverse()

    # Camera: a little blur and sensor noise so edges are not perfectly crisp.
    if rng.uniform() < 0.5:
        canvas = cv2.GaussianBlur(canvas, (3, 3), rng.uniform(0.3, 1.0))
    canvas += rng.normal(0, rng.uniform(0, 12), canvas.shape).astype(np.float32)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    mask_array = np.stack(masks) if masks else np.zeros((0, size, size), bool)
    return SyntheticImage(image=image, labels=np.array(labels, np.int64), masks=mask_array)


# --- COCO writer --------------------------------------------------------------------------

def encode_mask(mask: np.ndarray) -> dict:
    """bool [H,W] -> COCO compressed RLE with `counts` as str (JSON-able)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def categories() -> list[dict]:
    """The COCO categories of the synthetic set: ids 1..K in SHAPE_NAMES order."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_NAMES)]


def split_rng(seed: int, split: str) -> np.random.Generator:
    """The random stream of one split: independent per split (SeedSequence spawn keys), so
    train and val never share images and adding val images does not change train."""
    key = {"train": 0, "val": 1}.get(split, 2 + sum(map(ord, split)))
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))


def write_split(out: Path, split: str, count: int, size: int, seed: int) -> Path:
    """Generate `count` images into OUT/split/ and OUT/annotations/instances_{split}.json."""
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    rng = split_rng(seed, split)
    images, annotations = [], []
    for index in range(count):
        sample = generate_image(rng, size)
        file_name = f"{index:06d}.jpg"
        if not cv2.imwrite(str(image_dir / file_name), sample.image, [cv2.IMWRITE_JPEG_QUALITY, 93]):
            raise MaskrtError(f"could not write {image_dir / file_name}")
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for label, mask in zip(sample.labels, sample.masks):
            rle = encode_mask(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                "segmentation": rle, "area": float(mask.sum()),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            })
    path = out / "annotations" / f"instances_{split}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({
        "info": {"description": f"maskrt synthetic shapes, seed {seed}"},
        "images": images, "annotations": annotations, "categories": categories(),
    }))
    os.replace(tmp, path)
    return path


def write_dataset(out: str | os.PathLike, train: int, val: int, size: int, seed: int = 0) -> Path:
    """Write the whole synthetic COCO dataset (both splits) under `out`; return its path."""
    if size < 32:
        raise MaskrtError(f"--size must be at least 32 pixels, got {size}")
    if train < 0 or val < 0:
        raise MaskrtError(f"--train and --val must be >= 0, got {train} and {val}")
    root = Path(out)
    write_split(root, "train", train, size, seed)
    write_split(root, "val", val, size, seed)
    return root
