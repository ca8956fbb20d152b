"""Letterbox and its undo, and mask pasting, against float64 references written from the
design rule and torchvision's description (tests/test_runtime_fakes.py)."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from maskrt.runtime.postprocess import expand_boxes, paste_masks, undo_letterbox_boxes
from maskrt.runtime.preprocess import Letterbox, letterbox, letterbox_batch, letterbox_size
from test_runtime_fakes import bilinear_resize_reference, mask_iou, paste_reference

MEAN = (0.485, 0.456, 0.406)


@pytest.mark.parametrize("orig, big, expected", [
    ((480, 640), (512, 512), (384, 512)),   # scale 0.8: 384 x 512
    # 128/100 is 1.27999997 in float32, as torchvision computes it: 99.99999% of 128 rows -> 127.
    ((100, 50), (128, 128), (127, 63)),
    ((150, 100), (128, 128), (128, 85)),    # float32(128/150) rounds up: 150 * it = 128.000003
    ((37, 53), (64, 96), (64, 91)),         # scale 64/37: floor(53 * 64/37) = 91
    ((1, 500), (64, 64), (1, 64)),          # a thin image never collapses to 0 rows
])
def test_letterbox_size_is_floor_of_float32_scaled_size(orig, big, expected):
    assert letterbox_size(orig, big) == expected
    h, w = orig
    scale = float(np.float32(min(np.float32(big[0]) / np.float32(h), np.float32(big[1]) / np.float32(w))))
    assert expected == (max(1, math.floor(h * scale)), max(1, math.floor(w * scale)))


@pytest.mark.parametrize("orig", [(37, 53), (90, 40)])
def test_letterbox_pixels_match_bilinear_reference(orig):
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (*orig, 3), dtype=np.uint8)
    chw, placed = letterbox(bgr, (64, 64), MEAN)
    new_h, new_w = placed.resized_size
    assert chw.dtype == np.float32 and chw.shape == (3, 64, 64)
    for channel, bgr_channel in enumerate((2, 1, 0)):  # the input is RGB
        expected = bilinear_resize_reference(bgr[:, :, bgr_channel] / 255.0, new_h, new_w)
        np.testing.assert_allclose(chw[channel, :new_h, :new_w], expected, atol=2e-6)
        # The padding right and below is the mean, which the graph normalises to zero.
        assert np.all(chw[channel, new_h:, :] == np.float32(MEAN[channel]))
        assert np.all(chw[channel, :, new_w:] == np.float32(MEAN[channel]))


def test_letterbox_batch_stacks_and_rejects_bad_images():
    images = [np.full((20, 40, 3), 255, np.uint8), np.zeros((40, 20, 3), np.uint8)]
    batch, placements = letterbox_batch(images, (32, 32), MEAN)
    assert batch.shape == (2, 3, 32, 32)
    assert placements[0].resized_size == (16, 32) and placements[1].resized_size == (32, 16)
    assert np.all(batch[0, :, :16, :] == 1.0) and np.all(batch[1, :, :, :16] == 0.0)
    from maskrt.errors import MaskrtError
    with pytest.raises(MaskrtError, match="uint8"):
        letterbox(np.zeros((8, 8, 3), np.float32), (32, 32), MEAN)
    with pytest.raises(MaskrtError, match="shape"):
        letterbox(np.zeros((0, 8, 3), np.uint8), (32, 32), MEAN)


def test_boxes_round_trip_through_letterbox():
    rng = np.random.default_rng(1)
    h, w = 300, 517
    placed = Letterbox((h, w), letterbox_size((h, w), (256, 256)), (256, 256))
    new_h, new_w = placed.resized_size
    x1, y1 = rng.uniform(0, w - 50, 20), rng.uniform(0, h - 50, 20)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, 50, 20), y1 + rng.uniform(1, 50, 20)], 1)
    # Forward map as the model sees the boxes: input pixel = original pixel * new / original.
    in_input = boxes * np.array([new_w / w, new_h / h, new_w / w, new_h / h])
    back = undo_letterbox_boxes(in_input.astype(np.float32), placed)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, boxes, atol=1e-3)
    # Boxes reaching into the padding are clipped to the original image.
    clipped = undo_letterbox_boxes(np.array([[-5.0, -5.0, 256.0, 200.0]], np.float32), placed)
    np.testing.assert_allclose(clipped[0], [0.0, 0.0, w, h])


def _smooth_masks(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(count, 28, 28)).astype(np.float32)
    blurred = np.stack([cv2.GaussianBlur(m, (0, 0), 3.0) for m in raw])
    return 1.0 / (1.0 + np.exp(-blurred * 8.0))  # probabilities with real 0.5 contours


def _random_boxes(count: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x1, y1 = rng.uniform(-20, w, count), rng.uniform(-20, h, count)
    sizes = rng.uniform(1, 0.7 * min(h, w), (count, 2))
    boxes = np.stack([x1, y1, x1 + sizes[:, 0], y1 + sizes[:, 1]], 1)
    boxes[0] = [3.2, 4.7, 3.9, 5.1]  # smaller than a pixel
    boxes[1] = [w - 10.5, h - 12.25, w + 30.0, h + 8.0]  # past the bottom-right corner
    return boxes.astype(np.float32)


def test_expand_boxes_scales_about_centre():
    grown = expand_boxes(np.array([[10.0, 20.0, 38.0, 48.0]]), 30 / 28)
    np.testing.assert_allclose(grown[0], [9.0, 19.0, 39.0, 49.0], atol=1e-5)


def test_paste_masks_matches_float64_reference():
    h, w = 97, 131
    masks, boxes = _smooth_masks(24, 2), _random_boxes(24, h, w, 3)
    probabilities = paste_masks(masks, boxes, (h, w), threshold=None)
    binary = paste_masks(masks, boxes, (h, w))
    assert probabilities.shape == (24, h, w) and binary.dtype == bool
    worst_iou = 1.0
    for i in range(24):
        expected = paste_reference(masks[i].astype(np.float64), boxes[i].astype(np.float64), h, w)
        np.testing.assert_allclose(probabilities[i], expected, atol=2e-5)
        worst_iou = min(worst_iou, mask_iou(binary[i], expected > 0.5))
    assert worst_iou > 0.99
    assert binary.sum() > 1000  # the masks are not trivially empty
    assert paste_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), (h, w)).shape == (0, h, w)


def test_paste_masks_matches_the_pytorch_model():
    torch = pytest.importorskip("torch")
    transform = pytest.importorskip("maskrt.model.transform")
    h, w = 97, 131
    masks, boxes = _smooth_masks(24, 4), _random_boxes(24, h, w, 5)
    theirs = transform.paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (h, w))
    theirs = theirs[:, 0].numpy()
    ours = paste_masks(masks, boxes, (h, w), threshold=None)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    ours_binary, theirs_binary = ours > 0.5, theirs > 0.5
    assert min(mask_iou(a, b) for a, b in zip(ours_binary, theirs_binary)) > 0.99


@pytest.mark.parametrize("orig, big", [((90, 160), (64, 64)), ((160, 90), (64, 64)), ((64, 64), (64, 64)),
                                       ((37, 91), (48, 80))])
def test_letterbox_into_a_given_array_overwrites_all_of_it(orig, big):
    """``out=`` (what letterbox_batch passes: its own rows) gets every value written, the image
    and the mean around it on both sides, whatever it held before."""
    bgr = np.random.default_rng(3).integers(0, 256, (*orig, 3), dtype=np.uint8)
    expected, placed = letterbox(bgr, big, MEAN)
    out = np.full((3, *big), np.nan, np.float32)
    chw, again = letterbox(bgr, big, MEAN, out=out)
    assert chw is out and again == placed and np.array_equal(out, expected)
    new_h, new_w = placed.resized_size
    for channel in range(3):  # the image is RGB in [0, 1] at the top-left; the rest is the mean
        rgb = cv2.resize(bgr.astype(np.float32), (new_w, new_h), interpolation=cv2.INTER_LINEAR)[..., 2 - channel] / 255
        np.testing.assert_allclose(out[channel, :new_h, :new_w], rgb, atol=1e-6)
        assert np.all(out[channel, new_h:] == np.float32(MEAN[channel]))
        assert np.all(out[channel, :, new_w:] == np.float32(MEAN[channel]))
    batch, _ = letterbox_batch([bgr, bgr], big, MEAN)
    assert np.array_equal(batch[0], expected) and np.array_equal(batch[1], expected)
