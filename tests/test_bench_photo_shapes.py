"""bench/photo_shapes.py: the shapes-on-photographs evaluation set is valid COCO whose masks are
the visible parts of the painted shapes, on photographs disjoint between train and val."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

pytest.importorskip("skimage")
ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("photo_shapes", ROOT / "bench" / "photo_shapes.py")
photo_shapes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(photo_shapes)


def test_photo_pools_are_disjoint_photographs():
    assert not set(photo_shapes.TRAIN_PHOTOS) & set(photo_shapes.VAL_PHOTOS)
    for photo in photo_shapes.load_photos(photo_shapes.TRAIN_PHOTOS + photo_shapes.VAL_PHOTOS):
        assert photo.ndim == 3 and min(photo.shape[:2]) >= 256


def test_split_is_coco_with_visible_disjoint_masks(tmp_path):
    path = photo_shapes.write_split(tmp_path, "val", 4, 128, seed=1)
    coco = json.loads(path.read_text())
    assert [c["name"] for c in coco["categories"]] == list(photo_shapes.SHAPE_NAMES)
    assert len(coco["images"]) == 4 and coco["annotations"]
    for image in coco["images"]:
        picture = cv2.imread(str(tmp_path / "val" / image["file_name"]))
        assert picture.shape == (128, 128, 3) and picture.std() > 5  # a photograph, not a flat canvas
        masks = [mask_utils.decode(a["segmentation"]).astype(bool)
                 for a in coco["annotations"] if a["image_id"] == image["id"]]
        if len(masks) > 1:  # occlusion resolved: no pixel belongs to two instances
            assert np.stack(masks).sum(0).max() == 1
    for annotation in coco["annotations"]:
        mask = mask_utils.decode(annotation["segmentation"])
        assert annotation["area"] == mask.sum() >= photo_shapes.MIN_VISIBLE_PIXELS
        assert 1 <= annotation["category_id"] <= len(photo_shapes.SHAPE_NAMES)
