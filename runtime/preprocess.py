"""Letterbox: the runtime's one BGR uint8 -> model-input conversion (docs/design.md, "Runtime letterbox").

Rule shared with the PyTorch model: ``scale = min(H/h, W/w)``; the resized size is
``(floor(h*scale), floor(w*scale))``; the float32 RGB [0, 1] image is resized with
``cv2.resize(..., INTER_LINEAR)`` (the same sampling as torch's bilinear with
``align_corners=False``), placed top-left, and the rest is filled with ``image_mean`` so that
it normalises to zero inside the graph, as torchvision pads after normalising.

Models imported from detectron2 carry ``resize_rule = "detectron2"`` (with their ``min_size`` /
``max_size``) in the graph metadata and are resized as detectron2's ``DefaultPredictor`` does
(file and line numbers are detectron2's at commit 02b5c4e):
- the size is ``ResizeShortestEdge.get_output_shape`` (data/transforms/augmentation_impl.py
  lines 180-200): short side to ``min_size``, long side capped at ``max_size``, each rounded
  ``int(x + 0.5)``; it is not fitted to the input (an input larger than it is padded, and the
  graph clips boxes to the content). Only when it does not fit the input is the image fitted
  to it instead, ``scale = min(H/h, W/w)`` rounded the same way (detectron2 has no such case).
- the pixels are ``ResizeTransform.apply_image`` (data/transforms/transform.py lines 112-123):
  PIL's bilinear resize of the uint8 image (antialiased when shrinking, fixed-point weights,
  rounded to uint8), done here with PIL itself on the BGR uint8 image (PIL's filter is per
  channel). cv2's bilinear is within 1 level of it when enlarging but has no antialiasing:
  shrinking 427x640 to 320x480 it differs by up to 88 levels (docs/convert.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from maskrt.errors import MaskrtError


@dataclass(frozen=True)
class Letterbox:
    """Where one image went inside the model input, to undo it afterwards.

    orig_size: (h, w) of the caller's image; resized_size: (new_h, new_w) of its copy placed
    top-left in the model input of input_size (H, W).
    """

    orig_size: tuple[int, int]
    resized_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def box_scale(self) -> tuple[float, float]:
        """(sx, sy): multiply input-pixel x by sx and y by sy to get original-image pixels."""
        (h, w), (new_h, new_w) = self.orig_size, self.resized_size
        return w / new_w, h / new_h


def letterbox_size(orig_size: tuple[int, int], input_size: tuple[int, int]) -> tuple[int, int]:
    """(new_h, new_w) = (floor(h*scale), floor(w*scale)) with scale = min(H/h, W/w), at least 1 and
    at most (H, W)."""
    h, w = orig_size
    big_h, big_w = input_size
    # The scale in float32, as torchvision's transform (and maskrt.model) computes it: at exact
    # boundaries its rounding decides the floor below (e.g. 150 * (128/150) -> 128, not 127).
    scale = float(min(np.float32(big_h) / np.float32(h), np.float32(big_w) / np.float32(w)))
    # floor as torch's interpolate(recompute_scale_factor=True) does; never 0 for a thin image.
    return max(1, min(big_h, math.floor(h * scale))), max(1, min(big_w, math.floor(w * scale)))


RESIZE_RULES = ("torchvision", "detectron2")


def detectron2_resized_size(orig_size: tuple[int, int], min_size: int, max_size: int) -> tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape`` (augmentation_impl.py lines
    180-200), in Python floats as there: (new_h, new_w)."""
    h, w = orig_size
    size = float(min_size)
    scale = size / min(h, w)
    if h < w:
        new_h, new_w = size, scale * w
    else:
        new_h, new_w = scale * h, size
    if max(new_h, new_w) > max_size:
        scale = float(max_size) / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resized_size(orig_size: tuple[int, int], input_size: tuple[int, int], resize_rule: str = "torchvision",
                 min_size: int = 0, max_size: int = 0) -> tuple[int, int]:
    """(new_h, new_w) of an image inside the model input under a model's resize rule:
    "torchvision" ``letterbox_size``; "detectron2" ``detectron2_resized_size`` with the model's
    min_size / max_size, fitted to the input (rounded half up) only where it does not fit."""
    if resize_rule == "torchvision":
        return letterbox_size(orig_size, input_size)
    if resize_rule not in RESIZE_RULES:
        raise MaskrtError(f"unknown resize rule {resize_rule!r}: choose 'torchvision' or 'detectron2'")
    if min_size <= 0 or max_size <= 0:
        raise MaskrtError(f"the detectron2 resize rule needs the model's min_size and max_size, got {min_size}, {max_size}")
    new_h, new_w = detectron2_resized_size(orig_size, min_size, max_size)
    big_h, big_w = input_size
    if new_h <= big_h and new_w <= big_w:
        return new_h, new_w
    h, w = orig_size
    scale = min(big_h / h, big_w / w)
    return max(1, min(big_h, int(h * scale + 0.5))), max(1, min(big_w, int(w * scale + 0.5)))


def check_bgr_image(image: object, what: str = "image") -> np.ndarray:
    """Return ``image`` as an HxWx3 uint8 array or raise a one-line MaskrtError naming the problem."""
    if not isinstance(image, np.ndarray):
        raise MaskrtError(f"{what} must be a numpy BGR uint8 HxWx3 array, got {type(image).__name__}")
    if image.ndim == 2:  # grayscale: the model wants three channels
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise MaskrtError(f"{what} must be a BGR HxWx3 array, got shape {tuple(image.shape)}")
    if image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.dtype != np.uint8:
        raise MaskrtError(f"{what} must be uint8 (as cv2.imread gives), got {image.dtype}")
    return image


def letterbox(bgr: np.ndarray, input_size: tuple[int, int], image_mean: Sequence[float],
              resize_rule: str = "torchvision", min_size: int = 0, max_size: int = 0,
              out: np.ndarray | None = None) -> tuple[np.ndarray, Letterbox]:
    """One BGR uint8 image [h,w,3] -> (model input float32 [3,H,W] RGB in [0,1], its Letterbox).

    resize_rule / min_size / max_size: the model's (graph metadata); see ``resized_size``.
    ``out``: a float32 [3,H,W] array to write the input into (e.g. one image of a batch)."""
    bgr = check_bgr_image(bgr)
    h, w = bgr.shape[:2]
    big_h, big_w = input_size
    new_h, new_w = resized_size((h, w), input_size, resize_rule, min_size, max_size)
    if resize_rule == "detectron2":
        # PIL on the uint8 image, as detectron2's ResizeTransform (PIL returns a copy at the same size).
        from PIL import Image

        if (new_h, new_w) != (h, w):
            bgr = np.asarray(Image.fromarray(np.ascontiguousarray(bgr)).resize((new_w, new_h), Image.BILINEAR))
        resized = bgr.astype(np.float32)
    else:
        # Resize a float copy (not the uint8 image: cv2's fixed-point uint8 path differs from torch's
        # bilinear), then swap channels and scale to [0, 1] at the small size: for a 1080p frame that
        # halves the time (~30 -> ~15 ms here) and differs from scaling first by < 1e-7.
        resized = bgr.astype(np.float32)
        if (new_h, new_w) != (h, w):
            resized = cv2.resize(resized, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    chw = np.empty((3, big_h, big_w), dtype=np.float32) if out is None else out
    mean = np.asarray(image_mean, dtype=np.float32)
    # Each BGR plane (cv2.split: contiguous) scaled straight into its RGB channel, and the mean
    # written only where the image is not: one pass over the input instead of three.
    for channel, plane in zip((2, 1, 0), cv2.split(resized)):
        np.multiply(plane, np.float32(1.0 / 255.0), out=chw[channel, :new_h, :new_w])
        chw[channel, new_h:, :] = mean[channel]
        chw[channel, :new_h, new_w:] = mean[channel]
    return chw, Letterbox((h, w), (new_h, new_w), (big_h, big_w))


def letterbox_batch(images: Sequence[np.ndarray], input_size: tuple[int, int],
                    image_mean: Sequence[float], resize_rule: str = "torchvision", min_size: int = 0,
                    max_size: int = 0) -> tuple[np.ndarray, list[Letterbox]]:
    """Several BGR images -> (float32 [B,3,H,W], one Letterbox per image)."""
    if len(images) == 0:
        raise MaskrtError("no images given")
    batch = np.empty((len(images), 3, *input_size), dtype=np.float32)
    boxes = []
    for i, image in enumerate(images):
        _, placed = letterbox(image, input_size, image_mean, resize_rule, min_size, max_size, out=batch[i])
        boxes.append(placed)
    return batch, boxes
