"""Overlay detections on a BGR image: translucent masks, mask contours, boxes, labels.

Used by ``maskrt infer``, ``maskrt predict`` and the demo report. Cost grows with the masks'
areas, not with N x the frame (see ``draw_detections``). Colours are fixed per
class (a golden-ratio walk round the hue circle) so a class keeps its colour across frames.
"""
from __future__ import annotations

import collections
import functools
import threading
from typing import Sequence

import cv2
import numpy as np

from maskrt.runtime.predictor import Detections
from maskrt.runtime.workers import worker_pool

FONT = cv2.FONT_HERSHEY_SIMPLEX


@functools.lru_cache(maxsize=1024)
def class_color(label: int) -> tuple[int, int, int]:
    """A bright, distinct BGR colour for a class label."""
    hue = int((label * 0.618033988749895 % 1.0) * 180)
    hsv = np.array([[[hue, 220, 255]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


@functools.lru_cache(maxsize=4096)
def text_size(text: str, scale: float, thickness: int) -> tuple[tuple[int, int], int]:
    """cv2.getTextSize, remembered: labels repeat from frame to frame and the call is not free
    (~50 us, as much as drawing the text)."""
    return cv2.getTextSize(text, FONT, scale, thickness)


def draw_label(image: np.ndarray, text: str, origin: tuple[int, int], color: tuple[int, int, int],
               scale: float = 0.5) -> None:
    """Text on a filled box of ``color`` at ``origin`` (its top-left), kept inside the image; in place."""
    thickness = max(1, int(round(scale * 2)))
    (text_w, text_h), baseline = text_size(text, scale, thickness)
    h, w = image.shape[:2]
    x = int(min(max(origin[0], 0), max(w - text_w - 2, 0)))
    y = int(min(max(origin[1], 0), max(h - text_h - baseline - 2, 0)))
    cv2.rectangle(image, (x, y), (x + text_w + 2, y + text_h + baseline + 2), color, cv2.FILLED)
    # Black on a bright fill, white on a dark one: readable on any class colour.
    luminance = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    cv2.putText(image, text, (x + 1, y + text_h + 1), FONT, scale, ink, thickness, cv2.LINE_AA)


LABELS_KEPT = 512  # label images kept (text, colour, scale); ~15 KB each at 1080p
_labels: collections.OrderedDict[tuple[str, tuple[int, int, int], float], np.ndarray] = collections.OrderedDict()
_labels_lock = threading.Lock()


def label_box(text: str, origin: tuple[int, int], scale: float,
              image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1/y1 exclusive: the filled box ``draw_label`` draws for ``text`` at
    ``origin`` in an image of ``image_size`` (h, w); the text stays inside it. It may pass the
    image's right or bottom edge when the label is larger than the image."""
    thickness = max(1, int(round(scale * 2)))
    (text_w, text_h), baseline = text_size(text, scale, thickness)
    h, w = image_size
    x = int(min(max(origin[0], 0), max(w - text_w - 2, 0)))  # where draw_label puts it
    y = int(min(max(origin[1], 0), max(h - text_h - baseline - 2, 0)))
    return x, y, x + text_w + 3, y + text_h + baseline + 3


def draw_label_remembered(image: np.ndarray, text: str, origin: tuple[int, int], color: tuple[int, int, int],
                          scale: float = 0.5) -> None:
    """``draw_label``, with the label's pixels remembered: its box is filled opaque and the text
    stays inside it (tests/test_runtime_crops.py checks), so a label's pixels do not depend on
    the image beneath or on where it lands, and the next frame's same label ("person 0.87") is
    one copy instead of a filled rectangle and anti-aliased text (~30 us). A label clipped by
    the image's edge is drawn, not remembered. In place."""
    h, w = image.shape[:2]
    x, y, right, bottom = label_box(text, origin, scale, (h, w))
    if right > w or bottom > h:
        draw_label(image, text, origin, color, scale)
        return
    key = (text, color, scale)
    with _labels_lock:
        pixels = _labels.get(key)
        if pixels is not None:
            _labels.move_to_end(key)
    if pixels is not None:
        image[y:bottom, x:right] = pixels
        return
    draw_label(image, text, origin, color, scale)
    with _labels_lock:
        _labels[key] = image[y:bottom, x:right].copy()
        while len(_labels) > LABELS_KEPT:
            _labels.popitem(last=False)


COLOR_PLANES_KEPT = 32  # class colours whose planes are kept (at most that many x the largest crop)
_color_planes: dict[tuple[int, int, int], np.ndarray] = {}
_color_planes_lock = threading.Lock()  # draw_detections may run in several threads at once


def color_plane(color: tuple[int, int, int], height: int, width: int) -> np.ndarray:
    """A [height,width,3] uint8 array filled with ``color`` (read-only use). Planes are kept per
    colour and grown on demand: filling one costs as much as blending with it."""
    with _color_planes_lock:
        plane = _color_planes.pop(color, None)
        if plane is None or plane.shape[0] < height or plane.shape[1] < width:
            old_h, old_w = plane.shape[:2] if plane is not None else (0, 0)
            plane = np.empty((max(height, old_h), max(width, old_w), 3), np.uint8)
            cv2.rectangle(plane, (0, 0), (plane.shape[1] - 1, plane.shape[0] - 1), color, cv2.FILLED)
        _color_planes[color] = plane  # most recently used last
        while len(_color_planes) > COLOR_PLANES_KEPT:
            _color_planes.pop(next(iter(_color_planes)))
    return plane[:height, :width]


def draw_detections(bgr: np.ndarray, detections: Detections, alpha: float = 0.45,
                    show_boxes: bool = True, threads: int = 1) -> np.ndarray:
    """A copy of ``bgr`` [h,w,3] uint8 with each detection's mask (translucent), contour, box and
    "name score" label drawn; highest score drawn last so it stays on top.

    Works on each mask's crop (``detections.mask_crops``), never on full-frame masks. Contours
    are traced on each crop with its offset, first: their bounding rectangle is the mask's, and
    only that rectangle is blended (``bgr`` with the class colour, cv2.addWeighted with a kept
    colour plane) and copied through the mask (cv2.copyTo). Masks are laid low score first, each
    blended from the original pixels, so where they overlap the highest score's colour is the one
    blended, once. Labels are pasted when remembered (``draw_label_remembered``). The pixels are
    those of blending and tracing full-frame masks (tests/test_runtime_crops.py compares).
    Per-detection values (windows, colours, rounded boxes, texts) are computed once, as Python
    numbers, before any drawing.

    ``threads`` > 1 draws in that many threads at once (``draw_detections_in_bands``), with the
    same pixels: less wall time where a core is free, the same CPU time or a little more.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    count = len(detections)
    if threads > 1 and count > 1:  # the canvas is copied in strips by the threads
        return draw_detections_in_bands(bgr, np.empty(bgr.shape, bgr.dtype), detections, alpha, show_boxes,
                                        min(threads, count))
    canvas = bgr.copy()
    if count == 0:
        return canvas
    crops = detections.mask_crops
    order = np.argsort(detections.scores, kind="stable").tolist()  # low scores first
    labels = detections.labels.tolist()
    colors = [class_color(int(label)) for label in labels]
    windows = [(x0, y0, x0 + crop.shape[1], y0 + crop.shape[0])
               for (x0, y0), crop in zip(crops.origins.tolist(), crops.crops)]
    masks_u8 = [np.ascontiguousarray(crop, dtype=bool).view(np.uint8) for crop in crops.crops]
    contours = [cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=window[:2])[0]
                if mask.size else () for mask, window in zip(masks_u8, windows)]
    # Blend over each mask's own bounding rectangle (that of its outer contours, in image pixels),
    # not its whole window: the window is the grown box, where the mask is often half the area.
    painted = []
    for i in order:
        if contours[i]:
            x, y, w, h = cv2.boundingRect(np.concatenate(contours[i]))
            painted.append((i, x, y, x + w, y + h))
    # One colour plane per colour, as large as that colour's largest rectangle.
    plane_sizes: dict[tuple[int, int, int], tuple[int, int]] = {}
    for i, x0, y0, x1, y1 in painted:
        h, w = plane_sizes.get(colors[i], (0, 0))
        plane_sizes[colors[i]] = (max(h, y1 - y0), max(w, x1 - x0))
    planes = {color: color_plane(color, h, w) for color, (h, w) in plane_sizes.items()}
    for i, x0, y0, x1, y1 in painted:
        left, top = windows[i][:2]
        blended = cv2.addWeighted(bgr[y0:y1, x0:x1], 1.0 - alpha, planes[colors[i]][:y1 - y0, :x1 - x0], alpha, 0.0)
        cv2.copyTo(blended, masks_u8[i][y0 - top:y1 - top, x0 - left:x1 - left], canvas[y0:y1, x0:x1])
    # int(round(v)) of each float32 coordinate: np.rint rounds half to even as round() does.
    boxes = np.rint(detections.boxes).astype(np.int64).tolist()
    names = detections.names
    scores = detections.scores.tolist()
    label_scale = max(0.4, min(1.0, canvas.shape[0] / 900))
    label_lift = int(22 * label_scale)
    for i in order:
        color = colors[i]
        if contours[i]:
            cv2.drawContours(canvas, contours[i], -1, color, 2, cv2.LINE_AA)
        x1, y1, x2, y2 = boxes[i]
        if show_boxes:
            cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 1, cv2.LINE_AA)
        draw_label_remembered(canvas, f"{names[i]} {scores[i]:.2f}", (x1, y1 - label_lift), color, label_scale)
    return canvas


# How far beyond its geometry an OpenCV call may write pixels: a 2 px anti-aliased contour (half
# width 1, round caps of radius 1, an anti-aliased fringe of about 1.5 px), a 1 px anti-aliased
# box line (a fringe of about 1.5 px), putText inside its label box (a test checks). Generous: a
# wider footprint only adds waits between the threads, never other pixels.
CONTOUR_REACH = 4
BOX_REACH = 3
LABEL_REACH = 2

class BandDrawing:
    """``draw_detections``' operations, dealt to ``threads`` threads so that they may run at once
    with the one-thread pixels (``draw_detections_in_bands`` runs them).

    The drawing is a sequence of operations: copying ``bgr`` to the canvas in T horizontal
    strips, one per thread (0 to T-1), each detection's blend, lowest score first (T to T+N-1),
    then each detection's contours, box and label, lowest score first (T+N to T+2N-1). Each
    operation has a footprint (x0, y0, x1, y1) holding every pixel it may write: a strip, its
    rows; a blend, the mask's window; the rest, the window and box grown by how far anti-aliased
    lines reach (``CONTOUR_REACH``, ``BOX_REACH``), and the label's box. Detections are dealt to
    the threads by the height of their footprints' centres (horizontal bands, equal counts); a
    thread runs its operations in sequence order, and operation k must wait until operation
    ``waits[k][t]`` of each other thread t is done: the last earlier one whose footprint overlaps
    k's. Operations whose footprints do not overlap touch different pixels, so their order does
    not matter; those that do keep the one-thread order."""

    def __init__(self, bgr: np.ndarray, canvas: np.ndarray, detections: Detections, alpha: float,
                 show_boxes: bool, threads: int) -> None:
        self.bgr, self.canvas, self.alpha, self.show_boxes, self.threads = bgr, canvas, alpha, show_boxes, threads
        crops = detections.mask_crops
        self.crops = crops.crops
        count = self.count = len(detections)
        height, width = canvas.shape[:2]
        self.order = np.argsort(detections.scores, kind="stable").tolist()  # low scores first
        self.colors = [class_color(int(label)) for label in detections.labels.tolist()]
        self.windows = [(x0, y0, x0 + crop.shape[1], y0 + crop.shape[0])
                        for (x0, y0), crop in zip(crops.origins.tolist(), crops.crops)]
        self.boxes = np.rint(detections.boxes).astype(np.int64).tolist()
        names, scores = detections.names, detections.scores.tolist()
        self.texts = [f"{names[i]} {scores[i]:.2f}" for i in range(count)]
        self.label_scale = max(0.4, min(1.0, height / 900))
        self.label_lift = int(22 * self.label_scale)
        self.first_blend, self.first_drawing = threads, threads + count
        operations = threads + 2 * count
        footprints = np.empty((operations, 4), np.int64)
        self.strips = [(t * height // threads, (t + 1) * height // threads) for t in range(threads)]
        for t, (top, bottom) in enumerate(self.strips):
            footprints[t] = (0, top, width, bottom)
        for slot, i in enumerate(self.order):
            footprints[self.first_blend + slot] = self.windows[i]
            footprints[self.first_drawing + slot] = self.drawing_footprint(i, (height, width))
        self.footprints = footprints
        # Bands: detections by the height of their drawing footprint's centre, equal counts.
        centres = footprints[self.first_drawing:, 1] + footprints[self.first_drawing:, 3]
        band_of_slot = np.empty(count, np.int64)
        band_of_slot[np.argsort(centres, kind="stable")] = np.arange(count) * threads // count
        self.thread_of_op = np.concatenate([np.arange(threads), band_of_slot, band_of_slot])
        left, top, right, bottom = footprints.T
        overlap = ((left[:, None] < right[None, :]) & (left[None, :] < right[:, None])
                   & (top[:, None] < bottom[None, :]) & (top[None, :] < bottom[:, None]))
        overlap &= np.tri(operations, k=-1, dtype=bool)  # [k, j]: j < k
        earlier = np.where(overlap, np.arange(operations)[None, :], -1)
        waits = np.stack([np.where(self.thread_of_op[None, :] == t, earlier, -1).max(axis=1)
                          for t in range(threads)], 1)
        waits[np.arange(operations), self.thread_of_op] = -1  # a thread's own earlier operations are done
        self.awaited = set(waits[waits >= 0].tolist())
        self.waits = waits.tolist()
        # One colour plane per colour, as large as that colour's largest window (a blend's
        # rectangle lies inside its window).
        plane_sizes: dict[tuple[int, int, int], tuple[int, int]] = {}
        for i in range(count):
            x0, y0, x1, y1 = self.windows[i]
            h, w = plane_sizes.get(self.colors[i], (0, 0))
            plane_sizes[self.colors[i]] = (max(h, y1 - y0), max(w, x1 - x0))
        self.planes = {color: color_plane(color, h, w) for color, (h, w) in plane_sizes.items()}
        self.masks_u8: dict[int, np.ndarray] = {}
        self.contours: dict[int, Sequence[np.ndarray]] = {}

    def drawing_footprint(self, i: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """Where detection i's contours, box and label may write: (x0, y0, x1, y1), exclusive ends."""
        x0, y0, x1, y1 = self.windows[i]
        reach = [x0 - CONTOUR_REACH, y0 - CONTOUR_REACH, x1 + CONTOUR_REACH, y1 + CONTOUR_REACH]
        bx1, by1, bx2, by2 = self.boxes[i]
        if self.show_boxes:
            reach = [min(reach[0], bx1 - BOX_REACH), min(reach[1], by1 - BOX_REACH),
                     max(reach[2], bx2 + 1 + BOX_REACH), max(reach[3], by2 + 1 + BOX_REACH)]
        lx0, ly0, lx1, ly1 = label_box(self.texts[i], (bx1, by1 - self.label_lift), self.label_scale, image_size)
        return (min(reach[0], lx0 - LABEL_REACH), min(reach[1], ly0 - LABEL_REACH),
                max(reach[2], lx1 + LABEL_REACH), max(reach[3], ly1 + LABEL_REACH))

    def operations(self, thread: int) -> list[int]:
        """Thread ``thread``'s operations, in the order it runs them."""
        return np.flatnonzero(self.thread_of_op == thread).tolist()

    def trace(self, thread: int) -> None:
        """Trace the contours of ``thread``'s detections (each on its crop, with its offset)."""
        for k in self.operations(thread):
            if self.first_blend <= k < self.first_drawing:
                i = self.order[k - self.first_blend]
                mask = np.ascontiguousarray(self.crops[i], dtype=bool).view(np.uint8)
                self.masks_u8[i] = mask
                self.contours[i] = (cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                                     offset=self.windows[i][:2])[0] if mask.size else ())

    def run(self, k: int) -> None:
        """Operation k on the canvas (its thread has traced its contours)."""
        canvas = self.canvas
        if k < self.first_blend:
            top, bottom = self.strips[k]
            canvas[top:bottom] = self.bgr[top:bottom]
            return
        i = self.order[(k - self.first_blend) % self.count]
        contours, color = self.contours[i], self.colors[i]
        if k < self.first_drawing:
            if contours:
                x0, y0, w, h = cv2.boundingRect(np.concatenate(contours))
                x1, y1 = x0 + w, y0 + h
                left, top = self.windows[i][:2]
                blended = cv2.addWeighted(self.bgr[y0:y1, x0:x1], 1.0 - self.alpha, self.planes[color][:h, :w],
                                          self.alpha, 0.0)
                cv2.copyTo(blended, self.masks_u8[i][y0 - top:y1 - top, x0 - left:x1 - left], canvas[y0:y1, x0:x1])
            return
        if contours:
            cv2.drawContours(canvas, contours, -1, color, 2, cv2.LINE_AA)
        x1, y1, x2, y2 = self.boxes[i]
        if self.show_boxes:
            cv2.rectangle(canvas, (x1, y1), (x2, y2), color, 1, cv2.LINE_AA)
        draw_label_remembered(canvas, self.texts[i], (x1, y1 - self.label_lift), color, self.label_scale)


def draw_detections_in_bands(bgr: np.ndarray, canvas: np.ndarray, detections: Detections, alpha: float,
                             show_boxes: bool, threads: int) -> np.ndarray:
    """``draw_detections`` in ``threads`` threads (``BandDrawing``), pixel for pixel
    (tests/test_runtime_crops.py compares, on random detections many of which cross from one
    band into another, in the threads and in adversarial orders); copies ``bgr`` into ``canvas``
    (same shape and type), draws on it and returns it. OpenCV releases the GIL while it draws,
    so the threads run at once."""
    drawing = BandDrawing(bgr, canvas, detections, alpha, show_boxes, threads)
    done = [-1] * threads  # the last operation each thread finished
    progress = threading.Condition()
    failures: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            drawing.trace(thread)
            for k in drawing.operations(thread):
                for other, last in enumerate(drawing.waits[k]):
                    if last >= 0 and done[other] < last:
                        with progress:
                            while done[other] < last and not failures:
                                progress.wait()
                        if failures:
                            return
                drawing.run(k)
                if k in drawing.awaited:
                    with progress:
                        done[thread] = k
                        progress.notify_all()
                else:
                    done[thread] = k
        except BaseException as err:  # wake the other threads; raised in the caller
            with progress:
                failures.append(err)
                progress.notify_all()

    futures = [worker_pool(threads - 1).submit(work, thread) for thread in range(1, threads)]
    work(0)
    for future in futures:
        future.result()
    if failures:
        raise failures[0]
    return canvas


def draw_status(bgr: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Draw status lines (FPS, latency) in the top-left corner, in place; returns ``bgr``."""
    y = 4
    for line in lines:
        draw_label(bgr, line, (4, y), (32, 32, 32), 0.55)
        y += 22
    return bgr
