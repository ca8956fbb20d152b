"""calib_data/ is what its README says, and the int8 calibration reader letterboxes like the runtime."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from maskrt.errors import MaskrtError
from maskrt.export.calibration import DEFAULT_CALIB_DIR, CalibrationImages, calibration_files, make_calibration_images


def test_shipped_calibration_images_are_reproducible(tmp_path):
    shipped = calibration_files(DEFAULT_CALIB_DIR)
    assert len(shipped) == 16
    assert sum(p.stat().st_size for p in shipped) < 1_000_000
    made = make_calibration_images(tmp_path)
    assert [p.name for p in made] == [p.name for p in shipped]
    for ours, theirs in zip(made, shipped):
        np.testing.assert_array_equal(cv2.imread(str(ours)), cv2.imread(str(theirs)))


def test_calibration_reader_letterboxes_every_image_and_rewinds():
    mean = [0.485, 0.456, 0.406]
    reader = CalibrationImages(None, (128, 96), mean)
    batches = []
    while (feed := reader.get_next()) is not None:
        batches.append(feed["images"])
    assert len(batches) == 16
    first = batches[0]
    assert first.shape == (1, 3, 128, 96) and first.dtype == np.float32
    # 160x160 -> scale min(128/160, 96/160) = 0.6 -> 96x96 top-left; rows below are image_mean.
    np.testing.assert_allclose(first[0, :, 96:, :], np.broadcast_to(np.float32(mean)[:, None, None], (3, 32, 96)))
    bgr = cv2.imread(str(calibration_files(None)[0]))
    expected = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0, (96, 96),
                          interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(first[0, :, :96, :96], expected.transpose(2, 0, 1), rtol=0, atol=1e-6)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["images"], first)


def test_calibration_folder_errors(tmp_path):
    with pytest.raises(MaskrtError, match="does not exist"):
        calibration_files(tmp_path / "missing")
    with pytest.raises(MaskrtError, match="no images"):
        calibration_files(tmp_path)
