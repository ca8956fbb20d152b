"""COCO instance-segmentation datasets on pycocotools.

Two folder layouts are read:

- COCO 2017: `ROOT/annotations/instances_{split}2017.json` with images in `ROOT/{split}2017/`;
- short (what `maskrt data synth` writes): `ROOT/annotations/instances_{split}.json`, `ROOT/{split}/`.

Category ids (any integers, e.g. COCO's 1..90 with gaps) map to contiguous labels 1..K in
increasing id order: `class_names[label]`, `category_ids[label]`, index 0 the background.
Segmentations may be polygons, RLE or uncompressed RLE. As in COCO, `iscrowd=1` regions
are not training targets (COCOeval ignores detections on them instead). Images that
fail to decode are skipped and counted; the caller warns once with the count.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools.coco import COCO

from maskrt.errors import MaskrtError


@dataclass
class Sample:
    """One decoded image and its training targets (numpy, the caller's pixels).

    image: BGR uint8 [H,W,3]; boxes: float32 [N,4] xyxy continuous pixels; labels: int64 [N]
    in 1..K; masks: uint8 [N,H,W] in {0,1}; image_id: the COCO image id.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    image_id: int


def resolve_layout(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of `split` under `root`, in either layout.

    Raises MaskrtError naming what is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise MaskrtError(f"dataset folder not found: {root}")
    candidates = [
        (root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"),
        (root / "annotations" / f"instances_{split}.json", root / split),
    ]
    for annotation_file, image_dir in candidates:
        if annotation_file.is_file():
            if not image_dir.is_dir():
                raise MaskrtError(f"image folder not found: {image_dir} (annotations: {annotation_file})")
            return annotation_file, image_dir
    raise MaskrtError(
        f"no annotation file for split {split!r} in {root}: expected {candidates[0][0]} or {candidates[1][0]}")


def load_coco_json(path: Path) -> COCO:
    """Read and check an instances JSON; return a pycocotools COCO index on it (quietly)."""
    if path.stat().st_size == 0:
        raise MaskrtError(f"annotation file is empty: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MaskrtError(f"annotation file is not valid JSON: {path} ({err.msg if hasattr(err, 'msg') else err})")
    if not isinstance(data, dict):
        raise MaskrtError(f"annotation file is not a COCO object: {path}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise MaskrtError(f"annotation file has no {key!r} list: {path}")
    if not data["categories"]:
        raise MaskrtError(f"annotation file lists no categories: {path}")
    try:
        for image in data["images"]:
            int(image["id"]), str(image["file_name"])
        for category in data["categories"]:
            int(category["id"]), str(category["name"])
        for ann in data["annotations"]:
            int(ann["image_id"]), int(ann["category_id"]), ann["segmentation"], ann["bbox"]
    except (KeyError, TypeError, ValueError) as err:
        raise MaskrtError(f"annotation file has a malformed entry ({type(err).__name__}: {err}): {path}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


class CocoDataset:
    """The images and instance targets of one split.

    `len(ds)`, `ds[i] -> Sample | None` (None when the image does not decode; counted in
    `ds.skipped`). `ds.image_ids[i]` is the COCO id of item i. With `drop_empty`, images
    without any non-crowd instance are left out (training); evaluation keeps them all.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", drop_empty: bool = False) -> None:
        self.annotation_file, self.image_dir = resolve_layout(root, split)
        self.coco = load_coco_json(self.annotation_file)
        category_ids = sorted(self.coco.cats)
        self.category_ids: list[int] = [0, *category_ids]
        self.class_names: list[str] = ["__background__", *(str(self.coco.cats[c]["name"]) for c in category_ids)]
        self.label_of_category: dict[int, int] = {c: i + 1 for i, c in enumerate(category_ids)}
        image_ids = sorted(self.coco.imgs)
        if drop_empty:
            image_ids = [i for i in image_ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns[i])]
        self.image_ids: list[int] = image_ids
        self.skipped: set[int] = set()  # COCO ids of images that did not decode

    @property
    def num_classes(self) -> int:
        """K + 1: the real classes and the background."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def load_image(self, index: int) -> np.ndarray | None:
        """BGR uint8 [H,W,3], or None (counted in `skipped`) when the file does not decode."""
        path = self.image_path(index)
        image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        if image is None:
            self.skipped.add(self.image_ids[index])
        return image

    def targets(self, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes [N,4] float32 xyxy, labels [N] int64, masks [N,H,W] uint8) of the non-crowd
        instances of item `index`; empty boxes and empty masks are dropped."""
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns[self.image_ids[index]]:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w < 1 or h < 1:
                continue
            mask = self._ann_to_mask(ann, height, width)
            if not mask.any():
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of_category[int(ann["category_id"])])
            masks.append(mask)
        if not boxes:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros((0, height, width), np.uint8)
        return np.array(boxes, np.float32), np.array(labels, np.int64), np.stack(masks)

    def _ann_to_mask(self, ann: dict, height: int, width: int) -> np.ndarray:
        """uint8 [H,W] mask of a polygon / RLE annotation, at the decoded image's size."""
        info = self.coco.imgs[ann["image_id"]]
        if (info.get("height"), info.get("width")) != (height, width):
            # The JSON's stated size is wrong; rasterise at the real one.
            info = dict(info, height=height, width=width)
            self.coco.imgs[ann["image_id"]] = info
        return self.coco.annToMask(ann).astype(np.uint8)

    def __getitem__(self, index: int) -> Sample | None:
        image = self.load_image(index)
        if image is None:
            return None
        boxes, labels, masks = self.targets(index, image.shape[0], image.shape[1])
        return Sample(image=image, boxes=boxes, labels=labels, masks=masks, image_id=self.image_ids[index])

    def warn_skipped(self) -> None:
        """Print one warning line with the count of images that failed to decode, if any."""
        if self.skipped:
            first = self.coco.imgs[min(self.skipped)]["file_name"]
            print(f"maskrt: warning: skipped {len(self.skipped)} image(s) in {self.image_dir} that could not be "
                  f"decoded (e.g. {first})", file=sys.stderr)
