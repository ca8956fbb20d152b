"""A second shapes dataset, written independently of `maskrt.train.synthetic`: the stand-in for
"data we have not tuned to" when checking the 10-minute training target.

Everything differs from `maskrt data synth` on purpose: the classes (circle, square, triangle,
cross, hexagon, crescent, arrow), the drawing code, the backgrounds (gradients, colour clouds,
confetti of small discs that look like tiny circles), the fills (flat or checkered), the image
size (320 px by default), the PNG format, and the occlusion rule (later shapes cut earlier ones;
instances under 30 visible pixels are dropped). Output: the COCO short layout `maskrt train`
reads.

    python bench/other_shapes.py OUT [--size 320] [--train 800] [--val 150] [--seed 101]
    maskrt train --data OUT --config edge --minutes 10 --out runs/other
    maskrt eval --weights runs/other/model.safetensors --data OUT
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CLASSES = ("circle", "square", "triangle", "cross", "hexagon", "crescent", "arrow")


def outline(kind: str, radius: float, angle: float) -> np.ndarray:
    """Polygon [P, 2] of a polygonal class, centred at 0, rotated by `angle`."""
    if kind == "square":
        points = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.8
    elif kind == "triangle":
        t = np.deg2rad([90, 210, 330])
        points = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "hexagon":
        t = np.deg2rad(np.arange(6) * 60)
        points = np.stack([np.cos(t), np.sin(t)], 1)
    elif kind == "cross":
        w = 0.33
        points = np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w],
                           [-1, w], [-1, -w], [-w, -w]])
    elif kind == "arrow":
        points = np.array([[-1, -0.3], [0.2, -0.3], [0.2, -0.7], [1, 0], [0.2, 0.7], [0.2, 0.3], [-1, 0.3]])
    else:
        raise ValueError(kind)
    c, s = np.cos(angle), np.sin(angle)
    return points * radius @ np.array([[c, s], [-s, c]])


def silhouette(kind: str, size: int, cx: float, cy: float, radius: float, rng: np.random.Generator) -> np.ndarray:
    """bool [size, size] mask of one shape."""
    mask = np.zeros((size, size), np.uint8)
    if kind == "circle":
        axes = (int(radius), int(radius * rng.uniform(0.8, 1.0)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    elif kind == "crescent":
        cv2.circle(mask, (int(cx), int(cy)), int(radius), 1, -1)
        t = rng.uniform(0, 2 * np.pi)
        cv2.circle(mask, (int(cx + 0.5 * radius * np.cos(t)), int(cy + 0.5 * radius * np.sin(t))),
                   int(radius * 0.85), 0, -1)
    else:
        points = outline(kind, radius, rng.uniform(0, 2 * np.pi)) + [cx, cy]
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask.astype(bool)


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """float [size, size, 3]: a two-colour gradient, a cloud of colours, or confetti on flat."""
    kind = rng.integers(3)
    if kind == 0:
        ramp = np.linspace(0, 1, size)
        return ramp[None, :, None] * rng.uniform(0, 255, 3) + (1 - ramp)[:, None, None] * rng.uniform(0, 255, 3)
    if kind == 1:
        return cv2.resize(rng.uniform(0, 255, (6, 6, 3)), (size, size), interpolation=cv2.INTER_CUBIC)
    image = np.ones((size, size, 3)) * rng.uniform(0, 255, 3)
    for _ in range(rng.integers(5, 30)):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(image, centre, int(rng.integers(2, 12)), rng.uniform(0, 255, 3).tolist(), -1)
    return image


def write_split(out: Path, split: str, count: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    yy, xx = np.mgrid[:size, :size]
    checker = ((xx // 6 + yy // 6) % 2)[..., None].astype(bool)
    for index in range(count):
        image = background(size, rng) + rng.normal(0, 6, (size, size, 3))
        masks: list[np.ndarray] = []
        labels: list[int] = []
        for _ in range(rng.integers(1, 6)):
            label = int(rng.integers(len(CLASSES)))
            radius = rng.uniform(0.06, 0.25) * size
            cx, cy = rng.uniform(radius * 0.5, size - radius * 0.5, 2)
            mask = silhouette(CLASSES[label], size, cx, cy, radius, rng)
            if mask.sum() < 40:
                continue
            colour = rng.uniform(0, 255, 3)
            fill = np.where(checker, colour, rng.uniform(0, 255, 3)) if rng.uniform() < 0.4 else colour
            image[mask] = np.broadcast_to(fill, image.shape)[mask]
            masks = [m & ~mask for m in masks]  # the new shape hides what it covers
            masks.append(mask)
            labels.append(label + 1)
        image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
        name = f"{index:06d}.png"
        cv2.imwrite(str(out / split / name), image)
        images.append({"id": index + 1, "file_name": name, "height": size, "width": size})
        for mask, label in zip(masks, labels):
            if mask.sum() < 30:
                continue
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label,
                                "segmentation": rle, "area": float(mask.sum()),
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)]
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--val", type=int, default=150)
    parser.add_argument("--seed", type=int, default=101)
    args = parser.parse_args()
    write_split(args.out, "train", args.train, args.size, args.seed)
    write_split(args.out, "val", args.val, args.size, args.seed + 101)
    print(f"wrote {args.train} train + {args.val} val images ({args.size} px) to {args.out}")


if __name__ == "__main__":
    main()
