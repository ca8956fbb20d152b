"""int8 calibration images: where they come from and how they reach the graph.

`make_calibration_images` writes the shipped `calib_data/` set: synthetic scenes from the same
generator as `maskrt data synth` (`maskrt.train.synthetic.generate_image`), with a seed of its
own so that no calibration image is a validation image. `CalibrationImages` feeds any folder of
images to ONNX Runtime's calibrator through the runtime's own letterbox, so the activations
seen during calibration are those of deployment.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from maskrt.errors import MaskrtError

DEFAULT_CALIB_DIR = Path(__file__).resolve().parent.parent / "calib_data"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
CALIB_SEED = 20261121  # distinct from the dataset seeds (0 and up) used for train/val


def make_calibration_images(out_dir: str | Path, count: int = 16, size: int = 160, seed: int = CALIB_SEED) -> list[Path]:
    """Write `count` synthetic scenes (size x size, BGR PNG) into out_dir; return their paths."""
    from maskrt.train.synthetic import generate_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        scene = generate_image(rng, size)
        path = out_dir / f"calib_{index:03d}.png"
        cv2.imwrite(str(path), scene.image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        paths.append(path)
    return paths


def calibration_files(calib_dir: str | Path | None) -> list[Path]:
    """The image files of a calibration folder (default: the shipped calib_data/), sorted."""
    folder = Path(calib_dir) if calib_dir is not None else DEFAULT_CALIB_DIR
    if not folder.is_dir():
        raise MaskrtError(f"calibration folder {folder} does not exist (int8 export needs images: --calib DIR)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MaskrtError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def letterboxed_batches(files: Sequence[Path], input_size: tuple[int, int],
                        image_mean: Sequence[float]) -> Iterator[np.ndarray]:
    """Each file as a float32 [1,3,H,W] model input, letterboxed exactly as the runtime does."""
    from maskrt.runtime.preprocess import letterbox

    for path in files:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise MaskrtError(f"cannot read calibration image {path}")
        chw, _ = letterbox(bgr, input_size, image_mean)
        yield chw[None]


class CalibrationImages:
    """onnxruntime.quantization.CalibrationDataReader over a folder of images (input `images`)."""

    def __init__(self, calib_dir: str | Path | None, input_size: tuple[int, int], image_mean: Sequence[float],
                 input_name: str = "images") -> None:
        self.files = calibration_files(calib_dir)
        self.input_size = input_size
        self.image_mean = image_mean
        self.input_name = input_name
        self._batches: Iterator[np.ndarray] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            self._batches = letterboxed_batches(self.files, self.input_size, self.image_mean)
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._batches = None
