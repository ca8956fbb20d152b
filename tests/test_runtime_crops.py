"""Masks as crops: pasting each box's window, drawing from crops and COCO RLE from a crop give
exactly what the full-frame path gives (the full-frame paste and drawing shipped before,
kept below as ``paste_masks_full_frame`` and ``draw_detections_full_frame``, and pycocotools'
encoder)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from maskrt.errors import MaskrtError
from maskrt.runtime.draw import class_color, draw_detections, draw_label
from maskrt.runtime.masks import (MaskCrops, crop_rle_counts, crop_to_full_mask, crop_to_rle, crops_from_full_masks,
                                  mask_crops_to_rle_strings, rle_counts_to_string, rle_string_to_counts,
                                  rle_string_to_crop, rle_strings_to_mask_crops)
from maskrt.runtime.postprocess import MASK_THRESHOLD, expand_boxes, paste_mask_crops, paste_masks
from maskrt.runtime.predictor import Detections
from test_runtime_fakes import CLASS_NAMES


def paste_masks_full_frame(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int],
                           threshold: float | None = MASK_THRESHOLD, padding: int = 1) -> np.ndarray:
    """The full-frame paste ``maskrt`` shipped before crops (2026-11-26), verbatim: the reference.

    masks: float [N,M,M] probabilities for each box's class; boxes: [N,4] xyxy in the image's
    pixels. Returns bool [N,h,w] (probability > threshold) or, with threshold=None, the float32
    pasted probabilities [N,h,w] (zero outside each box).
    """
    h, w = image_size
    count = len(masks)
    pasted = np.zeros((count, h, w), dtype=np.float32 if threshold is None else bool)
    if count == 0:
        return pasted
    size = masks.shape[-1]
    padded = np.pad(masks.astype(np.float32), ((0, 0), (padding, padding), (padding, padding)))
    # torch's .to(int64) truncates toward zero; astype does the same.
    int_boxes = expand_boxes(boxes, (size + 2 * padding) / size).astype(np.int64)
    for i, (x1, y1, x2, y2) in enumerate(int_boxes.tolist()):
        box_w, box_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        x0_img, x1_img = max(x1, 0), min(x2 + 1, w)
        y0_img, y1_img = max(y1, 0), min(y2 + 1, h)
        if x0_img >= x1_img or y0_img >= y1_img:
            continue  # the box lies outside the image
        resized = cv2.resize(padded[i], (box_w, box_h), interpolation=cv2.INTER_LINEAR)
        if resized.ndim == 1:  # cv2 drops a unit dimension of a 1xK or Kx1 result
            resized = resized.reshape(box_h, box_w)
        window = resized[y0_img - y1:y1_img - y1, x0_img - x1:x1_img - x1]
        pasted[i, y0_img:y1_img, x0_img:x1_img] = window if threshold is None else window > threshold
    return pasted


def draw_detections_full_frame(bgr: np.ndarray, detections: Detections, alpha: float = 0.45,
                               show_boxes: bool = True) -> np.ndarray:
    """The drawing ``maskrt`` shipped before crops (2026-11-26), verbatim: per-detection boolean
    indexing of the whole frame, contours traced on whole frames. The reference."""
    canvas = bgr.copy()
    if len(detections) == 0:
        return canvas
    order = np.argsort(detections.scores, kind="stable")  # low scores first
    tint = canvas.copy()
    for i in order:
        tint[detections.masks[i]] = class_color(int(detections.labels[i]))
    any_mask = detections.masks.any(axis=0)
    blended = cv2.addWeighted(canvas, 1.0 - alpha, tint, alpha, 0.0)
    canvas[any_mask] = blended[any_mask]
    names = detections.names
    for i in order:
        color = class_color(int(detections.labels[i]))
        contours, _ = cv2.findContours(detections.masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, color, 2, cv2.LINE_AA)
        x1, y1, x2, y2 = (int(round(v)) for v in detections.boxes[i])
        if show_boxes:
            cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 1, cv2.LINE_AA)
        label_scale = max(0.4, min(1.0, canvas.shape[0] / 900))
        draw_label(canvas, f"{names[i]} {detections.scores[i]:.2f}", (x1, y1 - int(22 * label_scale)), color,
                   label_scale)
    return canvas


def random_detections(count: int, h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mask probabilities [N,28,28], boxes [N,4], scores [N], labels [N]) with real 0.5
    contours (several blobs per mask), boxes partly or wholly outside the image, smaller than a
    pixel, of zero width, and tied scores."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(count, 28, 28)).astype(np.float32)
    masks = 1.0 / (1.0 + np.exp(-8.0 * np.stack([cv2.GaussianBlur(m, (0, 0), 2.5) for m in raw])))
    x1, y1 = rng.uniform(-0.2 * w, w, count), rng.uniform(-0.2 * h, h, count)
    sizes = rng.uniform(1, 0.8 * min(h, w), (count, 2))
    boxes = np.stack([x1, y1, x1 + sizes[:, 0], y1 + sizes[:, 1]], 1).astype(np.float32)
    specials = [[3.2, 4.7, 3.9, 5.1],                          # smaller than a pixel
                [w - 10.5, h - 12.25, w + 30.0, h + 8.0],      # past the bottom-right corner
                [-40.0, -30.0, 25.0, 20.0],                    # past the top-left corner
                [w + 5.0, 10.0, w + 50.0, 40.0],               # wholly outside
                [10.0, 10.0, 10.0, 60.0],                      # zero width
                [-10.0, -10.0, w + 10.0, h + 10.0]]            # larger than the image
    boxes[:len(specials)] = np.array(specials, np.float32)[:count]
    scores = np.sort(rng.choice([0.9, 0.8, 0.55, 0.3], count).astype(np.float32))[::-1].copy()  # ties
    labels = rng.integers(1, len(CLASS_NAMES), count).astype(np.int64)
    return masks, boxes, scores, labels


@pytest.mark.parametrize("h, w, count, seed", [(97, 131, 24, 0), (240, 320, 60, 1), (64, 48, 7, 2), (180, 300, 100, 3)])
def test_crop_paste_equals_full_frame_paste(h, w, count, seed):
    masks, boxes, _, _ = random_detections(count, h, w, seed)
    crops = paste_mask_crops(masks, boxes, (h, w))
    reference = paste_masks_full_frame(masks, boxes, (h, w))
    assert len(crops) == count and crops.image_size == (h, w)
    assert np.array_equal(crops.full(), reference) and reference.sum() > 1000
    probabilities = paste_mask_crops(masks, boxes, (h, w), threshold=None)
    assert np.array_equal(probabilities.full(), paste_masks_full_frame(masks, boxes, (h, w), threshold=None))
    assert np.array_equal(paste_masks(masks, boxes, (h, w)), reference)
    assert crops.crops[3].shape == (0, 0)  # the box wholly outside the image
    for i in range(count):  # every crop lies inside the image
        x0, y0, x1, y1 = crops.window(i)
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
        assert np.array_equal(crop_to_full_mask(crops.crops[i], crops.origins[i], (h, w)), reference[i])
    # Far less memory than full frames: the crops hold at most the frames' bytes.
    assert sum(c.nbytes for c in crops.crops) < reference.nbytes
    empty = paste_mask_crops(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), (h, w))
    assert len(empty) == 0 and empty.full().shape == (0, h, w)


@pytest.mark.parametrize("h, w, count, seed, alpha, show_boxes", [
    (97, 131, 24, 0, 0.45, True), (240, 320, 60, 1, 0.45, False), (64, 48, 7, 2, 0.3, True),
    (360, 640, 100, 3, 0.45, True), (120, 200, 1, 4, 0.7, True), (720, 1280, 20, 5, 0.45, True)])
def test_drawing_from_crops_gives_the_full_frame_pixels(h, w, count, seed, alpha, show_boxes):
    masks, boxes, scores, labels = random_detections(count, h, w, seed)
    rng = np.random.default_rng(seed + 100)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[: h // 3] = 255  # saturated pixels blend too
    image[h // 3: h // 2] = 0
    before = image.copy()
    from_crops = Detections(boxes, scores, labels, class_names=CLASS_NAMES,
                            mask_crops=paste_mask_crops(masks, boxes, (h, w)))
    full = Detections(boxes, scores, labels, paste_masks_full_frame(masks, boxes, (h, w)), CLASS_NAMES)
    expected = draw_detections_full_frame(image, full, alpha=alpha, show_boxes=show_boxes)
    ours = draw_detections(image, from_crops, alpha=alpha, show_boxes=show_boxes)
    assert not np.array_equal(expected, image)
    assert np.array_equal(ours, expected), f"{int((ours != expected).any(axis=2).sum())} pixels differ"
    # Again: the labels are remembered now and pasted, with the same pixels.
    assert np.array_equal(draw_detections(image, from_crops, alpha=alpha, show_boxes=show_boxes), expected)
    # Detections made from full frames are cut to crops and draw the same.
    assert np.array_equal(draw_detections(image, full, alpha=alpha, show_boxes=show_boxes), expected)
    assert np.array_equal(image, before)  # the input is untouched


def test_every_pixel_value_blends_as_before():
    """Blending crop by crop gives the full-frame blend's pixel for every uint8 value and several
    alphas, and a crop larger than its mask leaves the pixels outside the mask untouched."""
    values = np.arange(256, dtype=np.uint8)
    image = np.stack([values, values[::-1], np.roll(values, 77)], 1)[None].repeat(8, 0)  # [8,256,3]
    mask = np.zeros((1, 8, 256), bool)
    mask[0, 3:5, 100:140] = True
    boxes = np.array([[0.0, 0.0, 256.0, 8.0]], np.float32)  # the box spans the frame; the mask does not
    for alpha in (0.1, 0.45, 0.5, 0.9):
        detections = Detections(boxes, np.array([0.9], np.float32), np.array([2]), mask, CLASS_NAMES)
        crops = MaskCrops((np.ones((8, 256), bool) & mask[0],), np.zeros((1, 2), np.int64), (8, 256))
        wide = Detections(boxes, np.array([0.9], np.float32), np.array([2]), class_names=CLASS_NAMES, mask_crops=crops)
        expected = draw_detections_full_frame(image, detections, alpha=alpha, show_boxes=False)
        assert np.array_equal(draw_detections(image, wide, alpha=alpha, show_boxes=False), expected)


def test_detections_masks_are_built_on_demand_and_kept():
    h, w = 90, 120
    masks, boxes, scores, labels = random_detections(12, h, w, 7)
    crops = paste_mask_crops(masks, boxes, (h, w))
    detections = Detections(boxes, scores, labels, class_names=CLASS_NAMES, mask_crops=crops)
    assert detections.image_size == (h, w) and detections._masks is None
    full = detections.masks
    assert full.dtype == bool and full.shape == (12, h, w) and detections.masks is full
    assert np.array_equal(full, paste_masks_full_frame(masks, boxes, (h, w)))
    back = crops_from_full_masks(full)
    assert np.array_equal(back.full(), full)
    assert all(c.shape[0] <= k.shape[0] and c.shape[1] <= k.shape[1] for c, k in zip(back.crops, crops.crops))
    with pytest.raises(MaskrtError, match="exactly one of masks"):
        Detections(boxes, scores, labels, class_names=CLASS_NAMES)


def test_rle_of_a_crop_is_pycocotools_rle_of_its_full_mask():
    mask_api = pytest.importorskip("pycocotools.mask")
    h, w = 97, 131
    masks, boxes, _, _ = random_detections(40, h, w, 11)
    crops = paste_mask_crops(masks, boxes, (h, w))
    full = crops.full()
    for i in range(len(crops)):
        expected = mask_api.encode(np.asfortranarray(full[i].astype(np.uint8)))
        ours = crop_to_rle(crops.crops[i], crops.origins[i], (h, w))
        assert ours["size"] == [h, w] and ours["counts"] == expected["counts"].decode("ascii")
        assert int(crop_rle_counts(crops.crops[i], crops.origins[i], (h, w)).sum()) == h * w
        assert np.array_equal(mask_api.decode({"size": [h, w], "counts": ours["counts"].encode()}), full[i])
    # Masks touching the first and last pixel (runs of zeros of length 0 at the start).
    rng = np.random.default_rng(12)
    for _ in range(200):
        mh, mw = (int(v) for v in rng.integers(1, 30, 2))
        x0, y0 = int(rng.integers(0, mw)), int(rng.integers(0, mh))
        crop = rng.random((int(rng.integers(0, mh - y0 + 1)), int(rng.integers(0, mw - x0 + 1)))) < rng.random()
        expected = mask_api.encode(np.asfortranarray(crop_to_full_mask(crop, (x0, y0), (mh, mw)).astype(np.uint8)))
        assert crop_to_rle(crop, (x0, y0), (mh, mw))["counts"] == expected["counts"].decode("ascii")
    ones = mask_api.encode(np.asfortranarray(np.ones((5, 4), np.uint8)))
    assert crop_to_rle(np.ones((5, 4), bool), (0, 0), (5, 4))["counts"] == ones["counts"].decode("ascii")


def test_rle_of_all_crops_at_once_is_pycocotools_rle_of_each_full_mask():
    mask_api = pytest.importorskip("pycocotools.mask")
    h, w = 97, 131
    masks, boxes, _, _ = random_detections(40, h, w, 11)
    crops = paste_mask_crops(masks, boxes, (h, w))
    full = crops.full()
    expected = [mask_api.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode("ascii") for m in full]
    assert mask_crops_to_rle_strings(crops) == expected
    assert mask_crops_to_rle_strings(MaskCrops((), np.zeros((0, 2), np.int64), (h, w))) == []
    # Random sets of crops: empty, all ones, whole-image, touching the first and last pixel,
    # whole columns (a run that goes on into the next column is one run), tiny images.
    rng = np.random.default_rng(13)
    for _ in range(400):
        mh, mw = (int(v) for v in rng.integers(1, 25, 2))
        crops_list, origins = [], []
        for _ in range(int(rng.integers(0, 6))):
            x0, y0 = int(rng.integers(0, mw)), int(rng.integers(0, mh))
            crop_h, crop_w = int(rng.integers(0, mh - y0 + 1)), int(rng.integers(0, mw - x0 + 1))
            if rng.random() < 0.2:
                x0, y0, crop_h, crop_w = 0, 0, mh, mw
            crop = rng.random((crop_h, crop_w)) < rng.random()
            if rng.random() < 0.15:
                crop[:] = True
            crops_list.append(crop)
            origins.append((x0, y0))
        batch = MaskCrops(tuple(crops_list), np.array(origins, np.int64).reshape(-1, 2), (mh, mw))
        expected = [mask_api.encode(np.asfortranarray(crop_to_full_mask(c, o, (mh, mw)).astype(np.uint8)))["counts"]
                    .decode("ascii") for c, o in zip(crops_list, origins)]
        assert mask_crops_to_rle_strings(batch) == expected


def test_rle_string_worked_example():
    # pycocotools' rleToString: counts [0, 3, 100, 2, 20]; the 4th and 5th are stored as
    # differences from two before (2 - 3 = -1, 20 - 100 = -80). 0 -> '0'; 3 -> '3';
    # 100 = 4 + 3*32 -> '4'|0x20 = 'T', then 3 -> '3'; -1 -> 0x1F = 'O'; -80 = 16 + (-3)*32 ->
    # 0x10|0x20 = 48 + 48 = '`', then -3 & 0x1F = 29 = 'M'. (pycocotools' frPyObjects gives
    # b'03T3O`M' for these counts.)
    assert rle_counts_to_string(np.array([0, 3, 100, 2, 20])) == "03T3O`M"


def test_rle_strings_decode_to_pycocotools_masks_as_tight_crops():
    """The Triton client's decoder: pycocotools' strings -> the crops of its decoded masks."""
    mask_api = pytest.importorskip("pycocotools.mask")
    # The worked example above, backwards: the differences undone.
    assert rle_string_to_counts("03T3O`M").tolist() == [0, 3, 100, 2, 20]
    assert rle_string_to_counts(b"").tolist() == []
    h, w = 97, 131
    masks, boxes, _, _ = random_detections(40, h, w, 11)
    full = paste_mask_crops(masks, boxes, (h, w)).full()
    strings = [mask_api.encode(np.asfortranarray(m.astype(np.uint8)))["counts"] for m in full]
    decoded = rle_strings_to_mask_crops(strings, (h, w))
    assert np.array_equal(decoded.full(), full)
    assert np.array_equal(decoded.full(), mask_api.decode([{"size": [h, w], "counts": c} for c in strings])
                          .transpose(2, 0, 1).astype(bool))
    tight = crops_from_full_masks(full)  # each crop is the mask's bounding rectangle
    assert all(a.shape == b.shape for a, b in zip(decoded.crops, tight.crops))
    assert np.array_equal(decoded.origins, tight.origins)
    # Random masks: empty, full, noise, blobs, columns, tiny images; long runs (many characters).
    rng = np.random.default_rng(14)
    for trial in range(300):
        mh, mw = (int(v) for v in rng.integers(1, 40, 2))
        mask = np.zeros((mh, mw), bool)
        kind = trial % 5
        if kind == 0:
            mask = rng.random((mh, mw)) < rng.random()
        elif kind == 1:
            mask[:] = True
        elif kind == 3:
            y0, x0 = int(rng.integers(0, mh)), int(rng.integers(0, mw))
            mask[y0:y0 + int(rng.integers(1, 20)), x0:x0 + int(rng.integers(1, 20))] = True
        elif kind == 4:
            mask[:, int(rng.integers(0, mw))] = True
        counts = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
        crop, (x0, y0) = rle_string_to_crop(counts.decode("ascii"), (mh, mw))
        assert np.array_equal(crop_to_full_mask(crop, (x0, y0), (mh, mw)), mask)
    big = np.zeros((1080, 1920), bool)
    big[100:900, 300:1500] = True
    big[500:510, 10:20] = True
    counts = mask_api.encode(np.asfortranarray(big.astype(np.uint8)))["counts"]
    crop, origin = rle_string_to_crop(counts, (1080, 1920))
    assert origin == (10, 100) and crop.shape == (800, 1490)
    assert np.array_equal(crop_to_full_mask(crop, origin, (1080, 1920)), big)
    with pytest.raises(ValueError, match="sum to"):
        rle_string_to_crop(counts, (1080, 1921))


def test_colour_planes_are_filled_grown_and_bounded():
    from maskrt.runtime import draw

    small = draw.color_plane((1, 2, 3), 4, 5)
    assert small.shape == (4, 5, 3) and (small == np.array([1, 2, 3], np.uint8)).all()
    grown = draw.color_plane((1, 2, 3), 9, 3)  # taller, narrower: the kept plane grows to 9x5
    assert grown.shape == (9, 3, 3) and (grown == np.array([1, 2, 3], np.uint8)).all()
    for value in range(draw.COLOR_PLANES_KEPT + 10):
        draw.color_plane((value, 0, 0), 2, 2)
    assert len(draw._color_planes) == draw.COLOR_PLANES_KEPT
    assert (draw.COLOR_PLANES_KEPT + 9, 0, 0) in draw._color_planes and (0, 0, 0) not in draw._color_planes


def test_remembered_labels_are_drawn_labels_on_any_background_and_at_the_edges():
    """A label's pixels are its opaque box and the text inside it: pasting a remembered label
    gives draw_label's pixels on other backgrounds and places; labels the image's edge clips
    are drawn, not remembered; the store is bounded."""
    from maskrt.runtime import draw

    rng = np.random.default_rng(21)
    draw._labels.clear()
    texts = ["circle 0.97", "square 0.50", "triangle 1.00", "Wg|jq_y 0.12"]
    pasted = 0
    for step in range(60):
        h, w = int(rng.integers(20, 200)), int(rng.integers(20, 400))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        text = texts[step % len(texts)]
        color = class_color(int(rng.integers(1, 3)))
        scale = float(rng.choice([0.4, 1.0]))
        origin = (int(rng.integers(-30, w + 30)), int(rng.integers(-30, h + 30)))
        expected = image.copy()
        draw_label(expected, text, origin, color, scale)
        ours = image.copy()
        remembered = (text, color, scale) in draw._labels
        draw.draw_label_remembered(ours, text, origin, color, scale)
        assert np.array_equal(ours, expected), (step, text, origin, scale)
        pasted += remembered
    assert pasted >= 10  # many of the 60 were pasted from the store
    for value in range(draw.LABELS_KEPT + 5):
        draw.draw_label_remembered(np.zeros((40, 300, 3), np.uint8), f"x {value}", (0, 0), (9, 9, 9), 0.5)
    assert len(draw._labels) == draw.LABELS_KEPT
    # A label wider than the image: drawn clipped, never remembered.
    draw._labels.clear()
    narrow = np.zeros((30, 20, 3), np.uint8)
    expected = narrow.copy()
    draw_label(expected, "a long label 0.99", (0, 0), (200, 10, 10), 0.5)
    draw.draw_label_remembered(narrow, "a long label 0.99", (0, 0), (200, 10, 10), 0.5)
    assert np.array_equal(narrow, expected) and len(draw._labels) == 0


def test_empty_and_single_pixel_masks_in_wide_windows_draw_as_before():
    """Blending covers each mask's own bounding rectangle, not its window: a window with no mask
    pixel, one with a single pixel on its edge and one with two far-apart pixels draw the full-frame
    path's pixels."""
    h, w = 60, 90
    image = np.random.default_rng(5).integers(0, 256, (h, w, 3), dtype=np.uint8)
    windows = [np.zeros((30, 40), bool), np.zeros((20, 50), bool), np.zeros((40, 60), bool)]
    windows[1][19, 0] = True
    windows[2][0, 59] = windows[2][39, 0] = True
    crops = MaskCrops(tuple(windows), np.array([[5, 5], [30, 38], [20, 10]], np.int64), (h, w))
    boxes = np.array([[5, 5, 45, 35], [30, 38, 80, 58], [20, 10, 80, 50]], np.float32)
    scores, labels = np.array([0.9, 0.8, 0.7], np.float32), np.array([1, 2, 3])
    ours = draw_detections(image, Detections(boxes, scores, labels, class_names=CLASS_NAMES, mask_crops=crops))
    expected = draw_detections_full_frame(image, Detections(boxes, scores, labels, crops.full(), CLASS_NAMES))
    assert np.array_equal(ours, expected)


def _draw_in_order(image: np.ndarray, detections: Detections, threads: int, rng: np.random.Generator | None,
                   alpha: float = 0.45, show_boxes: bool = True) -> np.ndarray:
    """``BandDrawing``'s operations run one at a time in an order the threads could take: at each
    step, a thread whose next operation's waits are all done; the last such thread (each band runs
    as far ahead of the bands above it as it may) or, with ``rng``, a random one."""
    from maskrt.runtime.draw import BandDrawing

    canvas = np.zeros_like(image)  # the strips' copies fill it
    drawing = BandDrawing(image, canvas, detections, alpha, show_boxes, threads)
    queues = [drawing.operations(thread) for thread in range(threads)]
    for thread in range(threads):
        drawing.trace(thread)
    position, done = [0] * threads, [-1] * threads
    while any(position[t] < len(queues[t]) for t in range(threads)):
        ready = [t for t in range(threads) if position[t] < len(queues[t]) and
                 all(last < 0 or done[other] >= last for other, last in enumerate(drawing.waits[queues[t][position[t]]]))]
        assert ready, "the waits deadlock"
        thread = ready[-1] if rng is None else ready[int(rng.integers(len(ready)))]
        operation = queues[thread][position[thread]]
        drawing.run(operation)
        done[thread], position[thread] = operation, position[thread] + 1
    return canvas


@pytest.mark.parametrize("h, w, count, seed, alpha, show_boxes", [
    (97, 131, 24, 0, 0.45, True), (240, 320, 60, 1, 0.45, False), (64, 48, 7, 2, 0.3, True),
    (360, 640, 100, 3, 0.45, True), (120, 200, 2, 4, 0.7, True), (720, 1280, 20, 5, 0.45, True),
    (1080, 1920, 100, 6, 0.45, True)])
def test_drawing_in_threads_gives_the_one_thread_pixels(h, w, count, seed, alpha, show_boxes):
    """threads > 1 (bands of detections drawn at once, waiting where footprints overlap) gives
    the one-thread pixels, and the full-frame path's: in real threads, and in the orders that run
    each band as far ahead as its waits allow or pick bands at random (deterministic stand-ins for
    the threads' timing). The random detections' boxes are up to 0.8 of the frame, so many cross
    from one band into the next."""
    masks, boxes, scores, labels = random_detections(count, h, w, seed)
    image = np.random.default_rng(seed + 200).integers(0, 256, (h, w, 3), dtype=np.uint8)
    crops = paste_mask_crops(masks, boxes, (h, w))
    detections = Detections(boxes, scores, labels, class_names=CLASS_NAMES, mask_crops=crops)
    expected = draw_detections(image, detections, alpha=alpha, show_boxes=show_boxes)
    if count <= 60:
        full = Detections(boxes, scores, labels, crops.full(), CLASS_NAMES)
        assert np.array_equal(expected, draw_detections_full_frame(image, full, alpha=alpha, show_boxes=show_boxes))
    for threads in (2, 3, 4):
        for _ in range(2):
            ours = draw_detections(image, detections, alpha=alpha, show_boxes=show_boxes, threads=threads)
            assert np.array_equal(ours, expected), f"{threads} threads: {int((ours != expected).any(2).sum())} px"
        for rng in (None, np.random.default_rng(seed), np.random.default_rng(seed + 1)):
            ours = _draw_in_order(image, detections, threads, rng, alpha, show_boxes)
            assert np.array_equal(ours, expected), f"{threads} threads in order: {int((ours != expected).any(2).sum())} px"


def test_band_footprints_hold_every_pixel_an_operation_writes():
    """Each operation alone, on flat backgrounds, changes pixels only inside its footprint (the
    threads' waits rest on that), with 2 px to spare for contours, boxes and labels: masks filling
    their windows (contours on the windows' edges), random blobs, boxes and labels at the edges."""
    from maskrt.runtime.draw import BandDrawing

    smallest_margin = {"blend": 10**9, "drawing": 10**9}
    for seed in range(10):
        h, w = [(97, 131), (240, 320), (360, 640), (720, 1280), (64, 48)][seed % 5]
        count = [2, 7, 24, 60, 100][seed % 5]
        masks, boxes, scores, labels = random_detections(count, h, w, seed)
        if seed % 2:
            masks = np.ones_like(masks)
        detections = Detections(boxes, scores, labels, class_names=CLASS_NAMES,
                                mask_crops=paste_mask_crops(masks, boxes, (h, w)))
        for background in (0, 255, 77):
            image = np.full((h, w, 3), background, np.uint8)
            drawing = BandDrawing(image, image.copy(), detections, 0.45, True, 1)
            drawing.trace(0)
            for operation in range(1, 1 + 2 * count):  # 0: copying the image (one thread, one strip)
                drawing.canvas = image.copy()
                drawing.run(operation)
                ys, xs = np.nonzero((drawing.canvas != image).any(axis=2))
                if len(ys):
                    x0, y0, x1, y1 = drawing.footprints[operation].tolist()
                    margin = min(xs.min() - x0, ys.min() - y0, x1 - 1 - xs.max(), y1 - 1 - ys.max())
                    kind = "blend" if operation <= count else "drawing"
                    smallest_margin[kind] = min(smallest_margin[kind], int(margin))
    assert smallest_margin["blend"] == 0  # a blend fills its window when the mask does
    assert smallest_margin["drawing"] >= 2


def test_threads_below_one_are_refused():
    masks, boxes, scores, labels = random_detections(3, 40, 50, 0)
    detections = Detections(boxes, scores, labels, class_names=CLASS_NAMES,
                            mask_crops=paste_mask_crops(masks, boxes, (40, 50)))
    with pytest.raises(ValueError, match="at least 1"):
        draw_detections(np.zeros((40, 50, 3), np.uint8), detections, threads=0)


def test_an_error_in_a_drawing_thread_is_raised_in_the_caller(monkeypatch):
    """An operation that fails in any thread stops the others (none waits forever) and the error
    reaches the caller."""
    import threading

    from maskrt.runtime.draw import BandDrawing

    masks, boxes, scores, labels = random_detections(40, 240, 320, 7)
    detections = Detections(boxes, scores, labels, class_names=CLASS_NAMES,
                            mask_crops=paste_mask_crops(masks, boxes, (240, 320)))
    run = BandDrawing.run
    for failing_thread in (0, 1):
        def failing_run(self, k, failing_thread=failing_thread):
            if self.thread_of_op[k] == failing_thread and k >= self.first_drawing:
                raise RuntimeError(f"operation {k} failed")
            run(self, k)

        monkeypatch.setattr(BandDrawing, "run", failing_run)
        result = {}
        caller = threading.Thread(target=lambda: result.update(error=pytest.raises(
            RuntimeError, draw_detections, np.zeros((240, 320, 3), np.uint8), detections, threads=2)))
        caller.start()
        caller.join(timeout=30)
        assert not caller.is_alive() and "failed" in str(result["error"].value)


@pytest.mark.parametrize("rule", ["torchvision", "detectron2"])
def test_pasting_in_threads_gives_the_one_thread_crops(rule):
    masks, boxes, _, _ = random_detections(60, 240, 320, 8)
    expected = paste_mask_crops(masks, boxes, (240, 320), rule=rule)
    for threads in (2, 3, 7, 100):
        for threshold in (MASK_THRESHOLD, None):
            ours = paste_mask_crops(masks, boxes, (240, 320), threshold=threshold, rule=rule, threads=threads)
            reference = expected if threshold is not None else paste_mask_crops(masks, boxes, (240, 320),
                                                                                threshold=None, rule=rule)
            assert ours.image_size == reference.image_size and np.array_equal(ours.origins, reference.origins)
            assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(ours.crops, reference.crops))
            assert len(ours.crops) == 60
    with pytest.raises(MaskrtError, match="at least 1"):
        paste_mask_crops(masks, boxes, (240, 320), threads=0)
