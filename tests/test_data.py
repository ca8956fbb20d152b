"""Data: the synthetic generator, the COCO reader (layouts, category mapping, crowd, bad
input) and the training transforms. Small images, a few seconds in all."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskrt.cli import main
from maskrt.errors import MaskrtError
from maskrt.train.coco import CocoDataset, Sample
from maskrt.train.synthetic import SHAPE_NAMES, generate_image, split_rng, write_dataset
from maskrt.train.transforms import hflip, masks_to_boxes, photometric_jitter, resize, scale_jitter, train_augment


def tight_box(mask: np.ndarray) -> list[int]:
    """Reference: tight xyxy box of a 2-D mask, continuous coordinates, by plain loops."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, train=6, val=3, size=96, seed=3)
    return root


def test_synthetic_round_trip_gives_back_the_same_masks(synth_root):
    dataset = CocoDataset(synth_root, "train")
    assert dataset.class_names == ["__background__", *SHAPE_NAMES]
    assert dataset.category_ids == [0, 1, 2, 3, 4, 5, 6]
    rng = split_rng(3, "train")  # the generator's own stream: regenerate the same pictures
    total = 0
    for index in range(len(dataset)):
        expected = generate_image(rng, 96)
        sample = dataset[index]
        assert sample.image.shape == (96, 96, 3)
        # JPEG is lossy, the masks are not: they must come back bit-exact.
        np.testing.assert_array_equal(sample.masks.astype(bool), expected.masks)
        np.testing.assert_array_equal(sample.labels, expected.labels)
        # The JPEG only loses fine detail (mostly the sensor noise): compare smoothed pictures.
        smooth_read, smooth_made = (cv2.blur(im, (5, 5)).astype(int) for im in (sample.image, expected.image))
        assert np.abs(smooth_read - smooth_made).mean() < 4
        for box, mask in zip(sample.boxes, sample.masks):
            assert box.tolist() == tight_box(mask)
        total += len(sample.labels)
    assert total >= 6  # several instances across 6 images
    anns = json.loads((synth_root / "annotations" / "instances_train.json").read_text())["annotations"]
    for ann in anns:
        assert ann["iscrowd"] == 0
        assert ann["area"] == mask_utils.decode(ann["segmentation"]).sum() > 0


def test_occlusion_keeps_only_visible_parts():
    rng = np.random.default_rng(11)
    overlaps_seen = 0
    for _ in range(30):
        sample = generate_image(rng, 64)
        masks = sample.masks.astype(np.int32)
        # Visible parts never overlap: each pixel belongs to at most one instance.
        assert masks.sum(axis=0).max() <= 1 if len(masks) else True
        overlaps_seen += len(masks) >= 2
    assert overlaps_seen > 0


def test_synthetic_is_seeded_and_splits_differ(tmp_path):
    a = generate_image(split_rng(5, "train"), 64)
    b = generate_image(split_rng(5, "train"), 64)
    c = generate_image(split_rng(5, "val"), 64)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)


def test_cli_data_synth_writes_short_layout(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--train", "2", "--val", "1", "--size", "64"]) == 0
    assert (tmp_path / "d" / "annotations" / "instances_train.json").is_file()
    assert len(list((tmp_path / "d" / "val").iterdir())) == 1
    assert main(["data", "synth", "--out", str(tmp_path / "e"), "--size", "8"]) == 2


def _write_coco(root, annotations, categories, images, layout="2017", split="val"):
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    image_dir = root / (f"{split}2017" if layout == "2017" else split)
    image_dir.mkdir(exist_ok=True)
    name = f"instances_{split}2017.json" if layout == "2017" else f"instances_{split}.json"
    (ann_dir / name).write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return image_dir


def test_2017_layout_polygons_rle_crowd_and_category_mapping(tmp_path):
    square = np.zeros((40, 50), np.uint8)
    square[5:15, 20:32] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    rle["counts"] = rle["counts"].decode()
    uncompressed = {"size": [40, 50], "counts": [0, 40 * 50]}  # whole image, uncompressed RLE
    image_dir = _write_coco(
        tmp_path,
        annotations=[
            {"id": 1, "image_id": 7, "category_id": 90, "iscrowd": 0, "area": 120.0, "bbox": [20, 5, 12, 10],
             "segmentation": rle},
            {"id": 2, "image_id": 7, "category_id": 3, "iscrowd": 0, "area": 100.0, "bbox": [2, 20, 10, 10],
             "segmentation": [[2, 20, 12, 20, 12, 30, 2, 30]]},
            {"id": 3, "image_id": 7, "category_id": 3, "iscrowd": 1, "area": 2000.0, "bbox": [0, 0, 50, 40],
             "segmentation": uncompressed},
        ],
        categories=[{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}],
        images=[{"id": 7, "file_name": "a.png", "width": 50, "height": 40}])
    cv2.imwrite(str(image_dir / "a.png"), np.full((40, 50, 3), 100, np.uint8))
    dataset = CocoDataset(tmp_path, "val")
    # Ids sorted: 3 -> label 1, 90 -> label 2; names follow.
    assert dataset.class_names == ["__background__", "car", "toothbrush"]
    assert dataset.category_ids == [0, 3, 90]
    sample = dataset[0]
    assert sample.labels.tolist() == [2, 1]  # the crowd region is not a target
    np.testing.assert_array_equal(sample.masks[0], square)
    assert sample.boxes[0].tolist() == [20, 5, 32, 15]
    polygon = sample.masks[1]
    assert tight_box(polygon)[:2] == [2, 20] and abs(int(polygon.sum()) - 100) <= 25
    assert sample.boxes[1].tolist() == [2, 20, 12, 30]


def test_drop_empty_leaves_out_images_without_targets(tmp_path):
    image_dir = _write_coco(
        tmp_path, layout="short", split="train",
        annotations=[{"id": 1, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 4.0, "bbox": [0, 0, 2, 2],
                      "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}],
        categories=[{"id": 1, "name": "thing"}],
        images=[{"id": 1, "file_name": "1.png", "width": 8, "height": 8},
                {"id": 2, "file_name": "2.png", "width": 8, "height": 8}])
    for name in ("1.png", "2.png"):
        cv2.imwrite(str(image_dir / name), np.zeros((8, 8, 3), np.uint8))
    assert len(CocoDataset(tmp_path, "train")) == 2
    assert CocoDataset(tmp_path, "train", drop_empty=True).image_ids == [2]


def test_bad_inputs_give_one_line_errors(tmp_path, synth_root):
    def message(root, split="train"):
        with pytest.raises(MaskrtError) as info:
            CocoDataset(root, split)
        text = str(info.value)
        assert "\n" not in text
        return text

    assert "dataset folder not found" in message(tmp_path / "nope")
    assert "no annotation file" in message(tmp_path)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("")
    (tmp_path / "train").mkdir()
    assert "empty" in message(tmp_path)
    (tmp_path / "annotations" / "instances_train.json").write_text("{\"images\": [")
    assert "not valid JSON" in message(tmp_path)
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps({"images": []}))
    assert "'annotations'" in message(tmp_path)
    (tmp_path / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": [{"file_name": "x.png"}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    assert "malformed" in message(tmp_path)
    shutil.rmtree(tmp_path / "train")
    (tmp_path / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    assert "image folder not found" in message(tmp_path)


def test_corrupt_image_is_skipped_counted_and_warned_once(tmp_path, capsys):
    root = tmp_path / "d"
    write_dataset(root, train=4, val=0, size=64, seed=1)
    (root / "train" / "000001.jpg").write_bytes(b"not a jpeg")
    (root / "train" / "000002.jpg").unlink()
    dataset = CocoDataset(root, "train")
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s is None for s in samples] == [False, True, True, False]
    dataset.warn_skipped()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 2 image(s)" in err[0]


# --- transforms ---------------------------------------------------------------------------

def _sample(seed: int = 4, size: int = 80) -> Sample:
    rng = np.random.default_rng(seed)
    for _ in range(50):
        synthetic = generate_image(rng, size)
        if len(synthetic.labels) >= 2:
            break
    masks = synthetic.masks.astype(np.uint8)
    return Sample(image=synthetic.image, boxes=masks_to_boxes(masks), labels=synthetic.labels, masks=masks, image_id=1)


def test_masks_to_boxes_matches_reference():
    sample = _sample()
    for box, mask in zip(masks_to_boxes(sample.masks), sample.masks):
        assert box.tolist() == tight_box(mask)


def test_flip_keeps_boxes_and_masks_consistent():
    sample = _sample()
    flipped = hflip(sample)
    width = sample.image.shape[1]
    for box, flipped_box, flipped_mask, mask in zip(sample.boxes, flipped.boxes, flipped.masks, sample.masks):
        # box of the flipped mask == flipped box
        assert tight_box(flipped_mask) == flipped_box.tolist()
        assert flipped_box.tolist() == [width - box[2], box[1], width - box[0], box[3]]
        np.testing.assert_array_equal(flipped_mask[:, ::-1], mask)
    np.testing.assert_array_equal(hflip(flipped).image, sample.image)


def test_resize_scales_boxes_with_masks():
    sample = _sample()
    small = resize(sample, 40, 60)
    assert small.image.shape == (40, 60, 3) and small.masks.shape[1:] == (40, 60)
    for box, mask in zip(small.boxes, small.masks):
        # Nearest-neighbour sampling of a 2x-shrunk mask can miss an edge row: 1.5 px slack.
        np.testing.assert_allclose(box, tight_box(mask), atol=1.5)


def test_scale_jitter_boxes_are_tight_and_seeded():
    sample = _sample()
    for seed in range(6):
        out = scale_jitter(sample, np.random.default_rng(seed), (0.5, 2.0))
        assert out.image.shape == sample.image.shape
        assert out.masks.shape[1:] == sample.image.shape[:2]
        for box, mask in zip(out.boxes, out.masks):
            assert box.tolist() == tight_box(mask)
    a = train_augment(sample, np.random.default_rng(9))
    b = train_augment(sample, np.random.default_rng(9))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)


def test_photometric_jitter_changes_colours_not_shape():
    sample = _sample()
    out = photometric_jitter(sample.image, np.random.default_rng(2))
    assert out.shape == sample.image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, sample.image)


# --- repainting and camera noise: the photo-like augmentations of the edge preset ----------

def test_repaint_changes_pixels_only_where_the_masks_say_and_keeps_the_targets():
    from maskrt.train.transforms import repaint

    sample = _sample()
    union = sample.masks.astype(bool).any(axis=0)
    background_only = repaint(sample, np.random.default_rng(0), p_background=1.0, p_instance=0.0)
    np.testing.assert_array_equal(background_only.image[union], sample.image[union])  # shapes untouched
    assert (background_only.image[~union] != sample.image[~union]).any(axis=-1).mean() > 0.9
    shapes_only = repaint(sample, np.random.default_rng(0), p_background=0.0, p_instance=1.0)
    np.testing.assert_array_equal(shapes_only.image[~union], sample.image[~union])  # background untouched
    for mask in sample.masks.astype(bool):
        assert (shapes_only.image[mask] != sample.image[mask]).any(axis=-1).mean() > 0.8
    for out in (background_only, shapes_only):
        assert out.masks is sample.masks and out.boxes is sample.boxes and out.labels is sample.labels
        assert out.image.dtype == np.uint8 and out.image.shape == sample.image.shape


def test_augmentation_with_repaint_and_camera_noise_keeps_boxes_tight_and_is_seeded():
    sample = _sample()
    for seed in range(8):
        out = train_augment(sample, np.random.default_rng(seed), (0.5, 2.0), p_repaint=1.0, p_camera=1.0)
        assert out.image.shape == sample.image.shape and len(out.labels) == len(out.masks) == len(out.boxes)
        for box, mask in zip(out.boxes, out.masks):
            assert mask.any() and box.tolist() == tight_box(mask)
    a = train_augment(sample, np.random.default_rng(5), p_repaint=1.0, p_camera=1.0)
    b = train_augment(sample, np.random.default_rng(5), p_repaint=1.0, p_camera=1.0)
    np.testing.assert_array_equal(a.image, b.image)
    # Off (the defaults of train_augment), the same seed gives the augmentation it gave before.
    plain = train_augment(sample, np.random.default_rng(5))
    off = train_augment(sample, np.random.default_rng(5), p_repaint=0.0, p_camera=0.0)
    np.testing.assert_array_equal(plain.image, off.image)


def test_natural_texture_is_low_frequency_heavy_like_a_photograph():
    from maskrt.train.transforms import natural_texture

    for seed in range(4):
        picture = natural_texture(np.random.default_rng(seed), 128, 96)
        assert picture.shape == (128, 96, 3) and picture.dtype == np.float32
        grey = picture.mean(axis=-1) - picture.mean()
        assert grey.std() > 5  # not flat
        power = np.abs(np.fft.fft2(grey)) ** 2
        fy, fx = np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(96), indexing="ij")
        radius = np.hypot(fy, fx)
        # Natural images: power falls with frequency. The lowest eighth of the band holds
        # more power than the whole upper half (white noise: about 1/60 of it).
        assert power[radius < 0.0625].sum() > power[radius > 0.25].sum()


def test_camera_noise_blurs_edges_and_keeps_brightness():
    from maskrt.train.transforms import camera_noise

    checks = np.kron((np.indices((8, 8)).sum(0) % 2) * 255, np.ones((8, 8))).astype(np.uint8)
    image = np.repeat(checks[..., None], 3, axis=-1)
    out = camera_noise(image, np.random.default_rng(1), max_noise_sigma=0.0)
    edge_energy = lambda im: np.abs(np.diff(im[..., 0].astype(np.float64), axis=1)).sum()
    assert edge_energy(out) < 0.9 * edge_energy(image)
    assert abs(out.mean() - image.mean()) < 1.0
