"""Overlay detections on a BGR image: translucent masks, mask contours, boxes, labels.

Used by ``maskrt infer``, ``maskrt predict`` and the demo report. Cost grows with the masks'
areas, not with N x the frame (see ``draw_detections``). Colours are fixed per
class (a golden-ratio walk round the hue circle) so a class keeps its colour across frames.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from maskrt.runtime.predictor import Detections

FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_color(label: int) -> tuple[int, int, int]:
    """A bright, distinct BGR colour for a class label."""
    hue = int((label * 0.618033988749895 % 1.0) * 180)
    hsv = np.array([[[hue, 220, 255]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw_label(image: np.ndarray, text: str, origin: tuple[int, int], color: tuple[int, int, int],
               scale: float = 0.5) -> None:
    """Text on a filled box of ``color`` at ``origin`` (its top-left), kept inside the image; in place."""
    thickness = max(1, int(round(scale * 2)))
    (text_w, text_h), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    h, w = image.shape[:2]
    x = int(min(max(origin[0], 0), max(w - text_w - 2, 0)))
    y = int(min(max(origin[1], 0), max(h - text_h - baseline - 2, 0)))
    cv2.rectangle(image, (x, y), (x + text_w + 2, y + text_h + baseline + 2), color, cv2.FILLED)
    # Black on a bright fill, white on a dark one: readable on any class colour.
    luminance = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    cv2.putText(image, text, (x + 1, y + text_h + 1), FONT, scale, ink, thickness, cv2.LINE_AA)


def draw_detections(bgr: np.ndarray, detections: Detections, alpha: float = 0.45,
                    show_boxes: bool = True, in_place: bool = False) -> np.ndarray:
    """``bgr`` [h,w,3] uint8 with each detection's mask (translucent), contour, box and
    "name score" label drawn; highest score drawn last so it stays on top. Draws on a copy, or
    on ``bgr`` itself with ``in_place=True`` (the video loop: saves a frame copy).

    Works on each mask's crop (``detections.mask_crops``), never on full-frame masks: the tint is
    painted crop by crop into one buffer covering the crops' union, blended once
    (cv2.addWeighted), and contours are found on each crop with its offset. The pixels are those
    of blending and tracing full-frame masks.
    """
    canvas = bgr if in_place else bgr.copy()
    if len(detections) == 0:
        return canvas
    crops = detections.mask_crops
    order = np.argsort(detections.scores, kind="stable")  # low scores first
    colors = [class_color(int(label)) for label in detections.labels]
    windows = [crops.window(i) for i in range(len(crops))]
    painted = [i for i in order if crops.crops[i].size > 0]
    if painted:
        # One blend over the rectangle holding every crop. A pixel no mask covers is blended with
        # itself, which addWeighted returns unchanged (c*(1-a) + c*a rounds back to c).
        left = min(windows[i][0] for i in painted)
        top = min(windows[i][1] for i in painted)
        right = max(windows[i][2] for i in painted)
        bottom = max(windows[i][3] for i in painted)
        region = canvas[top:bottom, left:right]
        tint = region.copy()
        for i in painted:  # later (higher score) masks paint over earlier ones
            x0, y0, x1, y1 = windows[i]
            tint[y0 - top:y1 - top, x0 - left:x1 - left][crops.crops[i]] = colors[i]
        cv2.addWeighted(region, 1.0 - alpha, tint, alpha, 0.0, dst=region)
    names = detections.names
    label_scale = max(0.4, min(1.0, canvas.shape[0] / 900))
    for i in order:
        color = colors[i]
        crop = crops.crops[i]
        if crop.size > 0:
            contours, _ = cv2.findContours(np.ascontiguousarray(crop).view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                           offset=windows[i][:2])
            cv2.drawContours(canvas, contours, -1, color, 2, cv2.LINE_AA)
        x1, y1, x2, y2 = (int(round(v)) for v in detections.boxes[i])
        if show_boxes:
            cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 1, cv2.LINE_AA)
        draw_label(canvas, f"{names[i]} {detections.scores[i]:.2f}", (x1, y1 - int(22 * label_scale)), color,
                   label_scale)
    return canvas


def draw_status(bgr: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Draw status lines (FPS, latency) in the top-left corner, in place; returns ``bgr``."""
    y = 4
    for line in lines:
        draw_label(bgr, line, (4, y), (32, 32, 32), 0.55)
        y += 22
    return bgr
