"""Postprocess + drawing at camera resolution: the crop path next to the full-frame path it
replaced, side by side in one run (interleaved, repeated; min and median reported).

    .venv/bin/python bench/realtime.py --model M.onnx [--repeat 15] [--json out.json] [--opencv-threads 1]

For 720p and 1080p frames and 10, 20 and 100 detections, the graph outputs are synthetic (the
postprocess input a trained model gives: boxes over the frame, sides 2-20 % of its, 28x28 mask probabilities of one
smooth blob each, scores, labels), so the count is exact; ``--model`` only supplies the
Predictor's metadata (input size, class names). Timed per frame (wall clock, and the
thread's CPU time, which a loaded machine disturbs less):
- crops: ``Predictor.postprocess`` (undo letterbox, ``paste_mask_crops``) + ``draw_detections``,
  the same detections every frame, so every label is remembered (pasted);
- crops, new labels: the same with the remembered labels forgotten before each frame (every
  label drawn: a video whose scores all change every frame);
- crops, N threads (``--draw-threads``, default 2): the same with ``postprocess(threads=N)`` and
  ``draw_detections(threads=N)`` (masks pasted and bands of detections drawn at once; the same
  pixels, asserted), wall time and the process's CPU time (all its threads);
- their critical path: each thread's share of the paste, and each ``BandDrawing`` operation
  (and each thread's contour tracing), timed alone on this thread (CPU time), then the schedule
  the threads' waits allow replayed on those times: the wall time of the threaded postprocess +
  drawing with a free core per thread, which a machine without free cores cannot show by the
  clock;
- full frame (before 2026-11-27): the full-frame paste and drawing kept in
  tests/test_runtime_crops.py as the reference (``paste_masks_full_frame``,
  ``draw_detections_full_frame``).
The two overlays are asserted equal before timing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_runtime_crops import draw_detections_full_frame, paste_masks_full_frame  # noqa: E402

from maskrt.runtime import Predictor, draw, draw_detections  # noqa: E402
from maskrt.runtime.commands import synthetic_shapes_image  # noqa: E402
from maskrt.runtime.postprocess import paste_mask_crops  # noqa: E402
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


def critical_path_ms(frame: np.ndarray, detections: Detections, threads: int) -> tuple[float, float]:
    """(CPU ms of all the threaded drawing's work, ms of its critical path): the setup, each
    thread's tracing and each operation timed by the thread's CPU clock, then the threads'
    schedule replayed (an operation starts when its thread's previous one and the ones it waits
    for are done)."""
    begin = time.thread_time()
    drawing = draw.BandDrawing(frame, np.empty_like(frame), detections, 0.45, True, threads)
    setup = time.thread_time() - begin
    clock = np.zeros(threads)
    for thread in range(threads):
        begin = time.thread_time()
        drawing.trace(thread)
        clock[thread] = time.thread_time() - begin
    work = setup + clock.sum()
    finish = np.zeros(len(drawing.footprints))
    for k in range(len(drawing.footprints)):  # the sequence order respects every wait
        begin = time.thread_time()
        drawing.run(k)
        spent = time.thread_time() - begin
        thread = drawing.thread_of_op[k]
        finish[k] = max([clock[thread]] + [finish[j] for j in drawing.waits[k] if j >= 0]) + spent
        clock[thread] = finish[k]
        work += spent
    return work * 1000, (setup + clock.max()) * 1000


def postprocess_critical_path_ms(predictor: Predictor, outputs: dict[str, np.ndarray], placements: list,
                                 threads: int) -> float:
    """Postprocess with its paste in ``threads`` threads, with a free core per thread: the whole
    postprocess on this thread, less its paste, plus the slowest thread's share of the paste
    (each share pasted alone, thread CPU ms)."""
    begin = time.thread_time()
    detections = predictor.postprocess(outputs, placements)[0]
    whole = time.thread_time() - begin
    masks = np.asarray(outputs["masks"][0, :len(detections)], np.float32)
    shares = []
    for start in range(threads):
        share = np.arange(start, len(detections), threads)
        begin = time.thread_time()
        paste_mask_crops(masks[share], detections.boxes[share], detections.mask_crops.image_size)
        shares.append(time.thread_time() - begin)
    return (whole - sum(shares) + max(shares)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported .onnx (its metadata is used)")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--draw-threads", type=int, default=2, help="threads of the threaded drawing column")
    parser.add_argument("--opencv-threads", type=int, default=1,
                        help="cv2.setNumThreads for the run (default 1, as the video loop runs it; the thread CPU "
                             "times count only this thread's work)")
    args = parser.parse_args()
    cv2.setNumThreads(args.opencv_threads)
    predictor = Predictor(args.model, conf=0.0)
    load_at_start = os.getloadavg()[0]
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
            assert np.array_equal(draw_detections(frame, detections, threads=args.draw_threads),
                                  draw_detections(frame, detections))
            times: dict[str, list[float]] = {"crops": [], "crops_cpu": [], "crops_threads": [], "crops_threads_cpu": [],
                                             "crops_threads_critical_path": [], "crops_new_labels": [],
                                             "full_frame": []}
            for _ in range(args.repeat):  # interleaved: the paths see the same machine load
                begin, begin_cpu = time.perf_counter(), time.thread_time()
                detections = predictor.postprocess(outputs, placements)[0]
                draw_detections(frame, detections)
                times["crops"].append((time.perf_counter() - begin) * 1000)
                times["crops_cpu"].append((time.thread_time() - begin_cpu) * 1000)
                begin, begin_cpu = time.perf_counter(), time.process_time()
                detections = predictor.postprocess(outputs, placements, threads=args.draw_threads)[0]
                draw_detections(frame, detections, threads=args.draw_threads)
                times["crops_threads"].append((time.perf_counter() - begin) * 1000)
                times["crops_threads_cpu"].append((time.process_time() - begin_cpu) * 1000)
                times["crops_threads_critical_path"].append(
                    postprocess_critical_path_ms(predictor, outputs, placements, args.draw_threads)
                    + critical_path_ms(frame, predictor.postprocess(outputs, placements)[0], args.draw_threads)[1])
                draw._labels.clear()
                begin = time.perf_counter()
                detections = predictor.postprocess(outputs, placements)[0]
                draw_detections(frame, detections)
                times["crops_new_labels"].append((time.perf_counter() - begin) * 1000)
                begin = time.perf_counter()
                masks = paste_masks_full_frame(outputs["masks"][0], detections.boxes, (height, width))
                draw_detections_full_frame(frame, Detections(detections.boxes, detections.scores, detections.labels,
                                                             masks, detections.class_names))
                times["full_frame"].append((time.perf_counter() - begin) * 1000)
            row = {"frame": f"{width}x{height}", "detections": count}
            row.update({f"{name}_ms": {"min": min(values), "median": statistics.median(values)}
                        for name, values in times.items()})
            row["speedup_median"] = row["full_frame_ms"]["median"] / row["crops_ms"]["median"]
            rows.append(row)
            print(f"{width}x{height} {count:>3} detections: crops {row['crops_ms']['min']:6.2f} / "
                  f"{row['crops_ms']['median']:6.2f} ms (cpu {row['crops_cpu_ms']['min']:6.2f} / "
                  f"{row['crops_cpu_ms']['median']:6.2f}), {args.draw_threads} threads "
                  f"{row['crops_threads_ms']['min']:6.2f} / {row['crops_threads_ms']['median']:6.2f} (cpu "
                  f"{row['crops_threads_cpu_ms']['min']:6.2f} / {row['crops_threads_cpu_ms']['median']:6.2f}, critical "
                  f"path {row['crops_threads_critical_path_ms']['min']:6.2f} / "
                  f"{row['crops_threads_critical_path_ms']['median']:6.2f}), new labels {row['crops_new_labels_ms']['min']:6.2f} / "
                  f"{row['crops_new_labels_ms']['median']:6.2f}, full frame {row['full_frame_ms']['min']:7.1f} / "
                  f"{row['full_frame_ms']['median']:7.1f} (min / median)", flush=True)
    if args.json:
        figures = {"opencv_threads": cv2.getNumThreads(), "draw_threads": args.draw_threads,
                   "load_average": [load_at_start, os.getloadavg()[0]],
                   "rows": rows}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"load average {load_at_start:.1f} -> {os.getloadavg()[0]:.1f}, OpenCV threads {cv2.getNumThreads()}")


if __name__ == "__main__":
    main()
