"""A float64 NumPy reference of maskrt::MultilevelRoIAlign, written from the contract text.

Loops, no vectorised tricks, no shared code with plugins/cpu: it is what the C++ op, the ONNX
Runtime op and (on a GPU machine) the CUDA plugin are compared with. The tests here check the
reference itself against the seed-notes worked examples, so that it cannot be wrong in the
same way as the code under test.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pytest


ADAPTIVE_GRID_MAX = 64  # plugins/README.md: adaptive sampling takes at most 64 samples per bin side


def reference_level(box: Sequence[float], spatial_scales: Sequence[float], canonical_scale: float = 224.0,
                    canonical_level: int = 4) -> int:
    """0-based feature input of one RoI: floor(k0 + log2(sqrt(area)/s0) + 1e-6) clamped, with
    area = (x2-x1)*(y2-y1) (torchvision's; inverted on both axes is positive), <= 0 -> finest."""
    x1, y1, x2, y2 = (float(v) for v in box)
    area = (x2 - x1) * (y2 - y1)
    k = -math.inf if not area > 0 else math.floor(canonical_level + math.log2(math.sqrt(area) / canonical_scale) + 1e-6)
    k_min = round(-math.log2(spatial_scales[0]))
    k_max = round(-math.log2(spatial_scales[-1]))
    return int(min(max(k, k_min), k_max)) - k_min


def bilinear_sample(feature_map: np.ndarray, y: float, x: float) -> np.ndarray:
    """[C,H,W] sampled at (y, x) with torchvision's border rule -> [C]."""
    height, width = feature_map.shape[1:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature_map.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(math.floor(y)), int(math.floor(x))
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    return ((1 - ly) * (1 - lx) * feature_map[:, y_low, x_low] + (1 - ly) * lx * feature_map[:, y_low, x_high]
            + ly * (1 - lx) * feature_map[:, y_high, x_low] + ly * lx * feature_map[:, y_high, x_high])


def reference_multilevel_roi_align(rois: np.ndarray, features: Sequence[np.ndarray], spatial_scales: Sequence[float],
                                   output_height: int = 7, output_width: int = 7, sampling_ratio: int = 2,
                                   aligned: bool = False, canonical_scale: float = 224.0, canonical_level: int = 4,
                                   mode: str = "avg") -> np.ndarray:
    """rois [B,R,4], features L x [B,C,H_l,W_l] -> float64 [B,R,C,output_height,output_width]."""
    rois = np.asarray(rois, dtype=np.float64)
    features = [np.asarray(f, dtype=np.float64) for f in features]
    batch, num_rois = rois.shape[:2]
    channels = features[0].shape[1]
    out = np.zeros((batch, num_rois, channels, output_height, output_width))
    offset = 0.5 if aligned else 0.0
    for b in range(batch):
        for r in range(num_rois):
            level = reference_level(rois[b, r], spatial_scales, canonical_scale, canonical_level)
            scale = spatial_scales[level]
            feature_map = features[level][b]
            x1, y1, x2, y2 = rois[b, r]
            x0, y0 = x1 * scale - offset, y1 * scale - offset
            roi_w, roi_h = (x2 - x1) * scale, (y2 - y1) * scale
            if not aligned:
                roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
            bin_w, bin_h = roi_w / output_width, roi_h / output_height
            # adaptive: ceil(bin size), at most ADAPTIVE_GRID_MAX per side (the contract's cap)
            grid_h = sampling_ratio if sampling_ratio > 0 else min(max(math.ceil(roi_h / output_height), 0),
                                                                   ADAPTIVE_GRID_MAX)
            grid_w = sampling_ratio if sampling_ratio > 0 else min(max(math.ceil(roi_w / output_width), 0),
                                                                   ADAPTIVE_GRID_MAX)
            for ph in range(output_height):
                for pw in range(output_width):
                    values = [bilinear_sample(feature_map, y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h,
                                        x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w)
                              for iy in range(grid_h) for ix in range(grid_w)]
                    if not values:
                        continue  # a bin with no samples is 0 in both modes
                    if mode == "avg":
                        out[b, r, :, ph, pw] = np.sum(values, axis=0) / max(grid_h * grid_w, 1)
                    else:
                        out[b, r, :, ph, pw] = np.max(values, axis=0)
    return out


SEED_MAP = np.arange(1, 17, dtype=np.float64).reshape(1, 1, 4, 4)  # seed-notes example 1: rows 1..4, 5..8, ...
SEED_ROI = np.array([[[1.2, 0.8, 2.8, 2.2]]])
SEED_EXPECTED = np.array([[7.2, 8.0], [10.0, 10.8]])


def test_reference_reproduces_seed_example_1():
    # Single level of scale 1 (canonical_level 0 makes k_min = k_max = 0), 2x2 bins, the bin centre.
    out = reference_multilevel_roi_align(SEED_ROI, [SEED_MAP], [1.0], 2, 2, sampling_ratio=1, aligned=False,
                                         canonical_level=0)
    np.testing.assert_allclose(out[0, 0, 0], SEED_EXPECTED, atol=1e-12)


@pytest.mark.parametrize("side, expected_level", [(111.9, 2), (112.0, 3), (223.9, 3), (224.0, 4), (447.9, 4),
                                                  (448.0, 5), (5000.0, 5), (1.0, 2)])
def test_reference_level_rule_matches_seed_example_4(side, expected_level):
    # seed-notes 4 / anchors: sqrt(area) < 112 -> P2, < 224 -> P3, < 448 -> P4, else P5
    scales = [0.25, 0.125, 0.0625, 0.03125]
    assert reference_level([0, 0, side, side], scales) + 2 == expected_level


def test_reference_level_rule_for_inverted_rois_is_torchvisions():
    """torchvision's LevelMapper takes area = (x2-x1)*(y2-y1): a RoI inverted on both axes has a positive
    area and the level of its size; inverted on one axis the area is negative (torchvision: NaN),
    which the contract sends to the finest level like area 0."""
    scales = [0.25, 0.125, 0.0625, 0.03125]
    assert reference_level([400, 400, 100, 100], scales) == 2  # 300 x 300 -> P4
    assert reference_level([100, 100, 400, 400], scales) == 2
    assert reference_level([400, 100, 100, 400], scales) == 0  # one axis inverted -> P2
    assert reference_level([100, 400, 400, 100], scales) == 0


def test_reference_max_mode_and_out_of_map_samples():
    # One 2x2 map; a RoI wholly left of x = -1 samples nothing inside: avg and max are both 0.
    feature_map = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    far_left = np.array([[[-20.0, 0.0, -12.0, 2.0]]])
    for mode in ("avg", "max"):
        out = reference_multilevel_roi_align(far_left, [feature_map], [1.0], 1, 1, 2, canonical_level=0, mode=mode)
        assert out.item() == 0.0
    # The whole map as one bin with 2x2 samples at (0.5|1.5, 0.5|1.5): the corner samples clamp
    # to the last row/column. Max is the bottom-right sample 4, avg their mean.
    whole = np.array([[[0.0, 0.0, 2.0, 2.0]]])
    out_max = reference_multilevel_roi_align(whole, [feature_map], [1.0], 1, 1, 2, canonical_level=0, mode="max")
    out_avg = reference_multilevel_roi_align(whole, [feature_map], [1.0], 1, 1, 2, canonical_level=0, mode="avg")
    samples = [2.5, 3.0, 3.5, 4.0]  # (0.5,0.5) -> 2.5, (0.5,1.5) -> 3.0, (1.5,0.5) -> 3.5, (1.5,1.5) -> 4
    assert out_max.item() == pytest.approx(max(samples))
    assert out_avg.item() == pytest.approx(sum(samples) / 4)


def big_adaptive_roi_case():
    """One RoI whose adaptive grid would be 100 x 90 samples per bin (1x1 output, scale 1): above the cap."""
    rng = np.random.default_rng(7)
    features = [rng.normal(size=(1, 2, 128, 128)).astype(np.float32)]
    rois = np.array([[[3.3, 5.1, 103.3, 95.1]]], np.float32)
    return rois, features


def test_reference_caps_the_adaptive_grid():
    """Contract: sampling_ratio 0 takes min(ceil(bin), 64) samples per side; here that changes the value."""
    import json
    from pathlib import Path
    contract = json.loads((Path(__file__).resolve().parent.parent / "plugins" / "multilevel_roi_align.json").read_text())
    assert contract["adaptive_grid_max"] == ADAPTIVE_GRID_MAX == 64
    rois, features = big_adaptive_roi_case()
    capped = reference_multilevel_roi_align(rois, features, [1.0], 1, 1, 0, canonical_level=0)
    by_hand = reference_multilevel_roi_align(rois, features, [1.0], 1, 1, 64, canonical_level=0)
    uncapped_h = reference_multilevel_roi_align(rois, features, [1.0], 1, 1, 100, canonical_level=0)
    np.testing.assert_array_equal(capped, by_hand)
    assert np.abs(capped - uncapped_h).max() > 1e-4  # the cap is visible in this case
