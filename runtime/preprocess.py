"""Letterbox: the runtime's one BGR uint8 -> model-input conversion (docs/design.md, "Runtime letterbox").

Rule shared with the PyTorch model: ``scale = min(H/h, W/w)``; the resized size is
``(floor(h*scale), floor(w*scale))``; the float32 RGB [0, 1] image is resized with
``cv2.resize(..., INTER_LINEAR)`` (the same sampling as torch's bilinear with
``align_corners=False``), placed top-left, and the rest is filled with ``image_mean`` so that
it normalises to zero inside the graph, as torchvision pads after normalising.
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
              out: np.ndarray | None = None) -> tuple[np.ndarray, Letterbox]:
    """One BGR uint8 image [h,w,3] -> (model input float32 [3,H,W] RGB in [0,1], its Letterbox).
    ``out``: a float32 [3,H,W] array to write the input into (e.g. one image of a batch)."""
    bgr = check_bgr_image(bgr)
    h, w = bgr.shape[:2]
    big_h, big_w = input_size
    new_h, new_w = letterbox_size((h, w), input_size)
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
                    image_mean: Sequence[float]) -> tuple[np.ndarray, list[Letterbox]]:
    """Several BGR images -> (float32 [B,3,H,W], one Letterbox per image)."""
    if len(images) == 0:
        raise MaskrtError("no images given")
    batch = np.empty((len(images), 3, *input_size), dtype=np.float32)
    boxes = []
    for i, image in enumerate(images):
        _, placed = letterbox(image, input_size, image_mean, out=batch[i])
        boxes.append(placed)
    return batch, boxes
