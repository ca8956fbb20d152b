"""A third evaluation set: shapes on real photographs (scikit-image's sample photographs).

The stand-in for "data nobody tuned to" next to `maskrt data synth` and `bench/other_shapes.py`:
the six shape classes of `maskrt data synth` (their silhouettes, `train.synthetic.shape_mask`),
but every background is a crop of a real photograph (random position, scale and flip), every
shape is filled with a patch cut from another photograph (tinted, sometimes shaded) or a flat
colour, and later shapes occlude earlier ones (an instance under 35 % visible is dropped, as in
`maskrt data synth`). The train and val splits crop DIFFERENT photographs: a model evaluated on
val has seen neither its backgrounds nor its fills.

    .venv/bin/python -m pip install scikit-image      # the `bench` extra
    .venv/bin/python bench/photo_shapes.py OUT [--size 256] [--train 600] [--val 100] [--seed 5]
    # held out: train on the built-in generator, evaluate on the photographs (never trained on)
    maskrt data synth --out runs/data-synth --train 600 --val 100 --size 256 --seed 3
    maskrt train --data runs/data-synth --config edge --steps 3950 --out runs/edge
    maskrt eval --weights runs/edge/model.safetensors --data OUT

The classes are those of `maskrt data synth`, so a model trained on the generator is evaluated
here as it is (docs/training.md, "Shapes on real photographs"). The train split exists for
within-set runs (`maskrt train --data OUT`); the edge recipe was neither trained nor tuned on it.

Output: the COCO short layout `maskrt train` reads (OUT/annotations/instances_{split}.json,
OUT/{split}/000000.jpg ...). Photographs are read from scikit-image's own data folder (shipped
in its wheel; nothing is downloaded).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from maskrt.train.synthetic import (
    MIN_VISIBLE_FRACTION,
    MIN_VISIBLE_PIXELS,
    SHAPE_NAMES,
    categories,
    encode_mask,
    shape_mask,
    split_rng,
)

# Photographs (not drawings, not microscopy) in scikit-image's data folder, two disjoint pools.
TRAIN_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "grass.png", "gravel.png",
                "motorcycle_left.png", "hubble_deep_field.jpg")
VAL_PHOTOS = ("rocket.jpg", "coins.png", "moon.png", "brick.png", "motorcycle_right.png", "clock_motion.png")


def load_photos(names: tuple[str, ...]) -> list[np.ndarray]:
    """BGR uint8 photographs from scikit-image's data folder (grey ones as 3 channels)."""
    import skimage

    folder = Path(skimage.data.data_dir)
    photos = []
    for name in names:
        image = cv2.imread(str(folder / name), cv2.IMREAD_COLOR)
        if image is None:
            raise SystemExit(f"cannot read {folder / name}: is scikit-image installed with its data?")
        photos.append(image)
    return photos


def random_crop(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    """A square crop of 30-100 % of the photo's shorter side, resized to size, maybe flipped: float32 BGR."""
    height, width = photo.shape[:2]
    side = int(min(height, width) * rng.uniform(0.3, 1.0))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = cv2.resize(photo[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_AREA)
    if rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    return crop.astype(np.float32)


def shape_fill(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    """What a shape is made of: a tinted photo patch (70 %) or a flat colour, maybe shaded."""
    if rng.uniform() < 0.7:
        fill = random_crop(rng, photos[int(rng.integers(len(photos)))], size)
        fill = fill * rng.uniform(0.5, 1.3, 3) + rng.uniform(-40, 40, 3)
    else:
        fill = np.broadcast_to(rng.uniform(0, 255, 3), (size, size, 3)).astype(np.float32).copy()
    if rng.uniform() < 0.5:  # soft light from one side
        ramp = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(1.0, 1.4), size, dtype=np.float32)
        fill = fill * (ramp[:, None, None] if rng.uniform() < 0.5 else ramp[None, :, None])
    return fill


def generate_image(rng: np.random.Generator, photos: list[np.ndarray], size: int, max_instances: int = 6
                   ) -> tuple[np.ndarray, list[int], list[np.ndarray]]:
    """One image: (BGR uint8 [size,size,3], labels 1..6, visible bool masks)."""
    canvas = random_crop(rng, photos[int(rng.integers(len(photos)))], size)
    drawn: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, max_instances + 1))):
        label = int(rng.integers(1, len(SHAPE_NAMES) + 1))
        radius = size * rng.uniform(0.06, 0.25)
        center = (rng.uniform(0.05, 0.95) * size, rng.uniform(0.05, 0.95) * size)
        silhouette = shape_mask(SHAPE_NAMES[label - 1], size, center, radius, rng.uniform(0, 2 * np.pi),
                                rng.uniform(0.65, 1.4), rng)
        if silhouette.sum() < MIN_VISIBLE_PIXELS:
            continue
        canvas[silhouette] = shape_fill(rng, photos, size)[silhouette]
        drawn.append((label, silhouette))
    labels, masks = [], []
    covered = np.zeros((size, size), bool)
    for label, silhouette in reversed(drawn):  # later shapes hide what they cover of earlier ones
        visible = silhouette & ~covered
        covered |= silhouette
        if visible.sum() >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * silhouette.sum()):
            labels.append(label)
            masks.append(visible)
    canvas += rng.normal(0, rng.uniform(0, 8), canvas.shape).astype(np.float32)  # sensor noise
    return np.clip(canvas, 0, 255).astype(np.uint8), labels[::-1], masks[::-1]


def write_split(out: Path, split: str, count: int, size: int, seed: int) -> Path:
    photos = load_photos(TRAIN_PHOTOS if split == "train" else VAL_PHOTOS)
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    rng = split_rng(seed, split)
    images, annotations = [], []
    for index in range(count):
        image, labels, masks = generate_image(rng, photos, size)
        file_name = f"{index:06d}.jpg"
        if not cv2.imwrite(str(out / split / file_name), image, [cv2.IMWRITE_JPEG_QUALITY, 93]):
            raise SystemExit(f"could not write {out / split / file_name}")
        images.append({"id": index + 1, "file_name": file_name, "width": size, "height": size})
        for label, mask in zip(labels, masks):
            rle = encode_mask(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label,
                                "segmentation": rle, "area": float(mask.sum()),
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    path = out / "annotations" / f"instances_{split}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"info": {"description": f"maskrt shapes on photographs, seed {seed}"},
                                     "images": images, "annotations": annotations, "categories": categories()}))
    os.replace(temporary, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output folder (COCO short layout)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--train", type=int, default=600, help="training images")
    parser.add_argument("--val", type=int, default=100, help="validation images")
    parser.add_argument("--seed", type=int, default=5, help="random seed")
    args = parser.parse_args()
    for split, count in (("train", args.train), ("val", args.val)):
        print(write_split(Path(args.out), split, count, args.size, args.seed))


if __name__ == "__main__":
    main()
