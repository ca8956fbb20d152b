"""`maskrt infer` and `maskrt bench`: the runtime's CLI verbs (arguments declared in maskrt/cli.py).

Neither imports torch, except ``bench --against-eager`` which loads the PyTorch model to time
it beside the runtime (only in that branch).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from maskrt.errors import MaskrtError
from maskrt.runtime.draw import draw_detections
from maskrt.runtime.predictor import Detections, Predictor
from maskrt.runtime.video import FrameSink, ImageSource, VideoFileSource, check_display, open_source, run_loop


def _predictor_from_args(args: argparse.Namespace, conf: float) -> Predictor:
    return Predictor(args.model, backend=args.backend, conf=conf, plugin=getattr(args, "plugin", None))


def describe(detections: Detections) -> str:
    """'3 detections: circle 0.97, square 0.88, ...' for a console line."""
    parts = [f"{name} {score:.2f}" for name, score in zip(detections.names, detections.scores.tolist())]
    return f"{len(parts)} detections" + (": " + ", ".join(parts[:8]) if parts else "") + (" ..." if len(parts) > 8 else "")


def infer_command(args: argparse.Namespace) -> int:
    """Run a model on a camera, stream, video, image or folder; overlay, show/save, summarise."""
    if args.max_frames is not None and args.max_frames <= 0:
        raise MaskrtError(f"--max-frames must be positive, got {args.max_frames}")
    if getattr(args, "server", None):
        if args.model:
            raise MaskrtError("give --model (run it here) or --server (a Triton server runs it), not both")
        from maskrt.runtime.backends.triton import TritonPredictor
        predictor = TritonPredictor(args.server, conf=args.conf)
    elif not args.model:
        raise MaskrtError("maskrt infer needs --model (or --server HOST:PORT of a Triton server)")
    else:
        predictor = _predictor_from_args(args, args.conf)
    if args.show:
        check_display()
    source = open_source(str(args.source))
    sink = None
    try:
        if args.save:
            # A saved video plays at the file's own rate; live sources at a nominal 30 FPS.
            fps = float(source.capture.get(cv2.CAP_PROP_FPS) or 30.0) if isinstance(source, VideoFileSource) else 30.0
            sink = FrameSink(args.save, fps=fps)
    except BaseException:
        source.close()
        raise

    def process(frame: np.ndarray) -> tuple[np.ndarray, str]:
        detections = predictor(frame)
        return draw_detections(frame, detections), describe(detections)

    def print_still(name: str, text: str) -> None:
        print(f"{name}: {text}")

    # Per-image lines for stills only; a video or camera prints just its summary.
    on_frame: Callable[[str, str], None] | None = print_still if isinstance(source, ImageSource) else None
    stats = run_loop(source, process, sink=sink, show=args.show, max_frames=args.max_frames, on_frame=on_frame)
    print(stats.summary())
    if args.save:
        print(f"saved {sink.written if sink else 0} frames to {args.save}")
    if stats.frames == 0 and stats.dropped > 0:
        raise MaskrtError(f"no frame of {args.source} could be decoded ({stats.dropped} failed)")
    return 0


def synthetic_shapes_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A BGR uint8 [height, width, 3] scene of filled circles, rectangles and triangles on a
    gradient, like the synthetic training data: a realistic input for timing."""
    rng = np.random.default_rng(seed)
    ramp_y = np.linspace(40, 200, height, dtype=np.float32)[:, None]
    ramp_x = np.linspace(60, 180, width, dtype=np.float32)[None, :]
    image = np.stack([ramp_y + 0 * ramp_x, 0.5 * (ramp_y + ramp_x), ramp_x + 0 * ramp_y], axis=2).astype(np.uint8)
    side = min(height, width)
    for _ in range(6):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(side // 16 + 2, side // 5 + 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            cv2.circle(image, (cx, cy), r, color, cv2.FILLED)
        elif kind == 1:
            cv2.rectangle(image, (cx - r, cy - r // 2), (cx + r, cy + r // 2), color, cv2.FILLED)
        else:
            points = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
            cv2.fillPoly(image, [points], color)
    return image


def _summary_ms(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99)),
            "mean": float(array.mean())}


def time_eager(weights: str, image: np.ndarray, iters: int, warmup: int) -> list[float]:
    """Milliseconds per call of the PyTorch eager model on ``image`` (BGR), end to end (its own
    resize, network, pasting). Imports torch: only ``bench --against-eager`` calls this."""
    try:
        import torch
        from maskrt.model import load_model
    except ImportError as err:
        raise MaskrtError(f"--against-eager needs PyTorch and maskrt.model ({err})") from None
    model = load_model(weights)
    model.eval()
    rgb = torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 255.0
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            begin = time.perf_counter()
            model([rgb])
            if i >= warmup:
                times.append((time.perf_counter() - begin) * 1000.0)
    return times


def bench_command(args: argparse.Namespace) -> int:
    """Latency p50/p99 and throughput, split into preprocess / inference / postprocess."""
    if args.iters <= 0 or args.warmup < 0:
        raise MaskrtError(f"--iters must be positive and --warmup not negative, got {args.iters} and {args.warmup}")
    predictor = _predictor_from_args(args, conf=0.0)
    height, width = predictor.input_size
    image = synthetic_shapes_image(height, width, seed=0)
    stages: dict[str, list[float]] = {"preprocess": [], "inference": [], "postprocess": [], "total": []}
    detections = 0
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        inputs, placements = predictor.preprocess([image])
        t1 = time.perf_counter()
        outputs = predictor.infer(inputs)
        t2 = time.perf_counter()
        results = predictor.postprocess(outputs, placements)
        t3 = time.perf_counter()
        if i >= args.warmup:
            for name, span in (("preprocess", t1 - t0), ("inference", t2 - t1), ("postprocess", t3 - t2),
                               ("total", t3 - t0)):
                stages[name].append(span * 1000.0)
            detections = len(results[0])
    report: dict[str, object] = {
        "model": str(args.model), "backend": predictor.backend.name,
        "providers": getattr(predictor.backend, "providers", None),
        "precision": predictor.info.precision, "input_size": [height, width], "batch": 1,
        "iters": args.iters, "warmup": args.warmup, "detections": detections,
    }
    for name, values in stages.items():
        report[f"{name}_ms"] = _summary_ms(values)
    report["throughput_fps"] = 1000.0 * args.iters / float(np.sum(stages["total"]))
    print(f"maskrt bench: {args.model} on {predictor.backend.name}, input {height}x{width}, batch 1, "
          f"{args.iters} iters after {args.warmup} warm-up")
    for name in stages:
        figures = report[f"{name}_ms"]
        print(f"  {name:<12} p50 {figures['p50']:8.2f} ms   p99 {figures['p99']:8.2f} ms   mean {figures['mean']:8.2f} ms")
    print(f"  throughput   {report['throughput_fps']:.1f} images/s ({detections} detections per image)")
    if args.against_eager:
        eager = time_eager(args.against_eager, image, args.iters, args.warmup)
        report["eager_ms"] = _summary_ms(eager)
        report["speedup_vs_eager"] = report["eager_ms"]["p50"] / report["total_ms"]["p50"]
        print(f"  eager torch  p50 {report['eager_ms']['p50']:8.2f} ms   p99 {report['eager_ms']['p99']:8.2f} ms   "
              f"-> runtime is {report['speedup_vs_eager']:.2f}x the eager speed (p50)")
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        except OSError as err:
            raise MaskrtError(f"cannot write {args.json}: {err.strerror}") from None
        print(f"  figures written to {args.json}")
    return 0
