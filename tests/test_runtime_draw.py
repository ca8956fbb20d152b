"""Drawing: masks tint their pixels and only those, contours and labels are drawn, colours are stable."""
from __future__ import annotations

import numpy as np

from maskrt.runtime.draw import class_color, draw_detections, draw_status
from maskrt.runtime.predictor import Detections
from test_runtime_fakes import CLASS_NAMES


def _detections(h: int, w: int) -> Detections:
    masks = np.zeros((2, h, w), bool)
    masks[0, 60:100, 30:90] = True
    masks[1, 20:50, 120:180] = True
    return Detections(boxes=np.array([[30, 60, 90, 100], [120, 20, 180, 50]], np.float32),
                      scores=np.array([0.93, 0.71], np.float32), labels=np.array([1, 2], np.int64),
                      masks=masks, class_names=tuple(CLASS_NAMES))


def test_masks_labels_and_contours_are_drawn():
    h, w = 120, 200
    image = np.full((h, w, 3), 100, np.uint8)
    detections = _detections(h, w)
    canvas = draw_detections(image, detections, show_boxes=False)
    assert canvas.shape == image.shape and canvas.dtype == np.uint8
    assert np.array_equal(image, np.full((h, w, 3), 100, np.uint8))  # the input is untouched
    # Inside each mask (away from its contour) the pixels are tinted towards the class colour.
    inner = canvas[70:95, 40:80].reshape(-1, 3).astype(int)
    expected = 0.55 * 100 + 0.45 * np.array(class_color(1))
    assert np.abs(inner - expected).max() <= 1
    # Far from every detection and label nothing changes.
    assert np.array_equal(canvas[105:, :20], image[105:, :20])
    # The contour of the first mask has the class colour on the mask's border.
    assert tuple(canvas[80, 30]) == class_color(1)
    # The label "circle 0.93" sits above the first box: its fill colour and dark/light ink.
    label = canvas[40:60, 30:110].reshape(-1, 3)
    colours = {tuple(int(c) for c in p) for p in label}
    assert class_color(1) in colours
    assert (0, 0, 0) in colours or (255, 255, 255) in colours
    assert len(colours) > 5  # anti-aliased text, not a flat rectangle


def test_no_detections_gives_an_unchanged_copy_and_status_text():
    image = np.full((50, 60, 3), 30, np.uint8)
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                       np.zeros((0, 50, 60), bool), tuple(CLASS_NAMES))
    canvas = draw_detections(image, empty)
    assert np.array_equal(canvas, image) and canvas is not image
    draw_status(canvas, ["12.3 FPS"])
    assert not np.array_equal(canvas[:24, :], image[:24, :])


def test_class_colours_are_distinct_and_stable():
    colours = [class_color(label) for label in range(1, 11)]
    assert len(set(colours)) == 10
    assert class_color(3) == colours[2]
