"""Postprocess + drawing at camera resolution: the crop path next to the full-frame path it
replaced, side by side in one run (interleaved, repeated; min and median reported).

    .venv/bin/python bench/realtime.py --model M.onnx [--repeat 15] [--json out.json]

For 720p and 1080p frames and 10, 20 and 100 detections, the graph outputs are synthetic (the
postprocess input a trained model gives: boxes over the frame, sides 2-20 % of its, 28x28 mask probabilities of one
smooth blob each, scores, labels), so the count is exact; ``--model`` only supplies the
Predictor's metadata (input size, class names). Timed per frame:
- crops: ``Predictor.postprocess`` (undo letterbox, ``paste_mask_crops``) + ``draw_detections``;
- full frame (before 2026-11-27): the full-frame paste and drawing kept in
  tests/test_runtime_crops.py as the reference (``paste_masks_full_frame``,
  ``draw_detections_full_frame``).
The two overlays are asserted equal before timing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_runtime_crops import draw_detections_full_frame, paste_masks_full_frame  # noqa: E402

from maskrt.runtime import Predictor, draw_detections  # noqa: E402
from maskrt.runtime.commands import synthetic_shapes_image  # noqa: E402
from maskrt.runtime.predictor import Detections  # noqa: E402


def synthetic_outputs(count: int, content_size: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    """Graph outputs (batch 1) with ``count`` detections inside the letterboxed image's
    ``content_size`` (h, w): box sides log-uniform in 2-20 % of the image's, each mask an
    off-centre ellipse of probability (one contour, as a trained model's)."""
    rng = np.random.default_rng(seed)
    height, width = content_size
    side = np.exp(rng.uniform(np.log(0.02), np.log(0.2), (count, 2))) * np.array([width, height])
    x1 = rng.uniform(0, width - side[:, 0])
    y1 = rng.uniform(0, height - side[:, 1])
    boxes = np.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], 1).astype(np.float32)
    grid = (np.arange(28) + 0.5) / 28
    masks = np.empty((count, 28, 28), np.float32)
    for i in range(count):
        cx, cy, rx, ry = rng.uniform(0.4, 0.6, 2).tolist() + rng.uniform(0.3, 0.5, 2).tolist()
        distance = ((grid[None, :] - cx) / rx) ** 2 + ((grid[:, None] - cy) / ry) ** 2
        masks[i] = 1.0 / (1.0 + np.exp(8.0 * (distance - 1.0)))
    return {"num_dets": np.array([count], np.int32), "boxes": boxes[None],
            "scores": np.sort(rng.uniform(0.5, 1.0, count)).astype(np.float32)[::-1][None].copy(),
            "labels": rng.integers(1, 4, count).astype(np.int32)[None], "masks": masks[None]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported .onnx (its metadata is used)")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    predictor = Predictor(args.model, conf=0.0)
    rows = []
    for height, width in ((720, 1280), (1080, 1920)):
        frame = synthetic_shapes_image(height, width, seed=0)
        _, placements = predictor.preprocess([frame])
        for count in (10, 20, 100):
            outputs = synthetic_outputs(count, placements[0].resized_size, seed=count)
            detections = predictor.postprocess(outputs, placements)[0]
            full_masks = paste_masks_full_frame(outputs["masks"][0], detections.boxes, (height, width))
            full = Detections(detections.boxes, detections.scores, detections.labels, full_masks,
                              detections.class_names)
            assert np.array_equal(draw_detections(frame, detections), draw_detections_full_frame(frame, full))
            crops_ms, full_ms = [], []
            for _ in range(args.repeat):  # interleaved: the two paths see the same machine load
                begin = time.perf_counter()
                detections = predictor.postprocess(outputs, placements)[0]
                draw_detections(frame, detections)
                crops_ms.append((time.perf_counter() - begin) * 1000)
                begin = time.perf_counter()
                masks = paste_masks_full_frame(outputs["masks"][0], detections.boxes, (height, width))
                draw_detections_full_frame(frame, Detections(detections.boxes, detections.scores, detections.labels,
                                                             masks, detections.class_names))
                full_ms.append((time.perf_counter() - begin) * 1000)
            row = {"frame": f"{width}x{height}", "detections": count,
                   "crops_ms": {"min": min(crops_ms), "median": statistics.median(crops_ms)},
                   "full_frame_ms": {"min": min(full_ms), "median": statistics.median(full_ms)}}
            row["speedup_median"] = row["full_frame_ms"]["median"] / row["crops_ms"]["median"]
            rows.append(row)
            print(f"{width}x{height} {count:>3} detections: postprocess+draw crops {row['crops_ms']['median']:7.2f} ms "
                  f"(min {row['crops_ms']['min']:.2f}), full frame {row['full_frame_ms']['median']:8.2f} ms "
                  f"(min {row['full_frame_ms']['min']:.2f}) -> {row['speedup_median']:.0f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"opencv_threads": cv2.getNumThreads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
