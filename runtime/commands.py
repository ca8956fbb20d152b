"""`maskrt infer` and `maskrt bench`: the runtime's CLI verbs (arguments declared in maskrt/cli.py).

Neither imports torch, except ``bench --against-eager`` which loads the PyTorch model to time
it beside the runtime (only in that branch).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from maskrt.errors import MaskrtError
from maskrt.runtime.draw import draw_detections
from maskrt.runtime.predictor import Detections, Predictor
from maskrt.runtime.video import (VIDEO_SAVE_SUFFIXES, FrameSink, FrameStages, ImageSource, LoopStats,
                                  VideoFileSource, check_display, open_source, run_loop)


def _predictor_from_args(args: argparse.Namespace, conf: float) -> Predictor:
    return Predictor(args.model, backend=args.backend, conf=conf, plugin=getattr(args, "plugin", None),
                     threads=getattr(args, "threads", None))


def describe(detections: Detections) -> str:
    """'3 detections: circle 0.97, square 0.88, ...' for a console line."""
    parts = [f"{name} {score:.2f}" for name, score in zip(detections.names, detections.scores.tolist())]
    return f"{len(parts)} detections" + (": " + ", ".join(parts[:8]) if parts else "") + (" ..." if len(parts) > 8 else "")


def predictor_stages(predictor: Predictor, conf: float | None = None, draw_threads: int = 1) -> FrameStages:
    """The Predictor's stages for the pipelined loop: letterbox, graph, postprocess (boxes undone,
    masks pasted as crops), drawing (overlay and a console line). ``draw_threads``: threads that
    paste each frame's masks and draw its overlay (``paste_mask_crops``, ``draw_detections``)."""
    _check_draw_threads(draw_threads)

    def draw(frame: np.ndarray, detections: Detections) -> tuple[np.ndarray, str]:
        return draw_detections(frame, detections, threads=draw_threads), describe(detections)

    return FrameStages(
        preprocess=lambda frame: predictor.preprocess([frame]),
        infer=lambda prepared: predictor.infer(prepared[0]),
        postprocess=lambda frame, prepared, outputs: predictor.postprocess(outputs, prepared[1], conf=conf,
                                                                           threads=draw_threads)[0],
        draw=draw)


def remote_stages(remote, draw_threads: int = 1) -> FrameStages:
    """``maskrt infer --server``'s stages: the frame goes to Triton as it is (infer), the
    answer becomes Detections (postprocess); drawing as for a local model."""
    _check_draw_threads(draw_threads)

    def draw(frame: np.ndarray, detections: Detections) -> tuple[np.ndarray, str]:
        return draw_detections(frame, detections, threads=draw_threads), describe(detections)

    return FrameStages(preprocess=lambda frame: frame, infer=remote.request,
                       postprocess=lambda frame, prepared, outputs: remote.unpack(outputs, frame.shape[:2]), draw=draw)


def _check_draw_threads(draw_threads: int) -> None:
    if draw_threads < 1:
        raise MaskrtError(f"--draw-threads must be at least 1, got {draw_threads}")


def infer_command(args: argparse.Namespace) -> int:
    """Run a model on a camera, stream, video, image or folder; overlay, show/save, summarise."""
    if args.max_frames is not None and args.max_frames <= 0:
        raise MaskrtError(f"--max-frames must be positive, got {args.max_frames}")
    if getattr(args, "server", None):
        if args.model:
            raise MaskrtError("give --model (run it here) or --server (a Triton server runs it), not both")
        if getattr(args, "threads", None) is not None:
            raise MaskrtError("--threads sets the engine's threads here; with --server the server runs the engine "
                              "(`maskrt serve --threads`)")
        from maskrt.runtime.backends.triton import TritonPredictor
        stages = remote_stages(TritonPredictor(args.server, conf=args.conf, shm=getattr(args, "shm", False)),
                               draw_threads=args.draw_threads)
    elif getattr(args, "shm", False):
        raise MaskrtError("--shm goes with --server (a Triton server on this machine)")
    elif not args.model:
        raise MaskrtError("maskrt infer needs --model (or --server HOST:PORT of a Triton server)")
    else:
        _check_draw_threads(args.draw_threads)
        stages = predictor_stages(_predictor_from_args(args, args.conf), draw_threads=args.draw_threads)
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

    def print_still(name: str, text: str) -> None:
        print(f"{name}: {text}")

    # Per-image lines for stills only; a video or camera prints just its summary.
    on_frame: Callable[[str, str], None] | None = print_still if isinstance(source, ImageSource) else None
    stats = run_loop(source, stages, sink=sink, show=args.show, max_frames=args.max_frames,
                     on_frame=on_frame)
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


def write_synthetic_video(path: str | Path, height: int, width: int, frames: int, fps: float = 30.0,
                          seed: int = 0) -> Path:
    """Write a video of ``frames`` synthetic-shapes frames (``synthetic_shapes_image``, the scene
    sliding a few pixels per frame, the frame number printed) with OpenCV: mp4v for .mp4, MJPG
    for .avi. A camera-sized input for ``maskrt bench --source`` and the tests."""
    path = Path(path)
    codec = VIDEO_SAVE_SUFFIXES.get(path.suffix.lower())
    if codec is None:
        raise MaskrtError(f"cannot write a video to {path}: use one of {', '.join(sorted(VIDEO_SAVE_SUFFIXES))}")
    scene = synthetic_shapes_image(height, width + 4 * frames, seed=seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
    if not writer.isOpened():
        raise MaskrtError(f"cannot write video {path} with codec {codec}")
    try:
        for index in range(frames):
            frame = np.ascontiguousarray(scene[:, 4 * index:4 * index + width])
            cv2.putText(frame, str(index), (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 2.0, (255, 255, 255), 3)
            writer.write(frame)
    finally:
        writer.release()
    return path


def _summary_ms(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99)),
            "mean": float(array.mean())}


def time_eager(weights: str, image: np.ndarray, iters: int, warmup: int, device: str = "cpu") -> list[float]:
    """Milliseconds per call of the PyTorch eager model on ``image`` (BGR), end to end (its own
    resize, network, pasting). Imports torch: only ``bench --against-eager`` calls this."""
    try:
        import torch
        from maskrt.model import load_model
    except ImportError as err:
        raise MaskrtError(f"--against-eager needs PyTorch and maskrt.model ({err})") from None
    from maskrt.model import resolve_device

    resolved = resolve_device(device)
    model = load_model(weights, device=resolved)
    model.eval()
    rgb = torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 255.0
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            begin = time.perf_counter()
            # The frame's upload and the results' download are part of a call on a GPU.
            [{k: v.cpu() for k, v in out.items()} for out in model([rgb.to(resolved)])]
            if i >= warmup:
                times.append((time.perf_counter() - begin) * 1000.0)
    return times


class RepeatedImageSource:
    """One image given ``count`` times: ``bench --source image.jpg`` runs the loop on it."""

    live = False

    def __init__(self, image: np.ndarray, count: int, name: str) -> None:
        self.image, self.count, self.name = image, count, name
        self.dropped = 0
        self.skipped = 0

    def frames(self):
        for i in range(self.count):
            yield f"frame_{i + 1:06d}", self.image

    def close(self) -> None:
        pass


def _engine_fps(predictor: Predictor, inputs: np.ndarray, iters: int) -> float:
    """Images per second of the graph alone (inference on an already letterboxed input)."""
    begin = time.perf_counter()
    for _ in range(iters):
        predictor.infer(inputs)
    return iters / (time.perf_counter() - begin)


def bench_round(predictor: Predictor, inputs: np.ndarray, stages: FrameStages, source, frames: int,
                sink_path: Path | None) -> tuple[dict[str, float], LoopStats]:
    """One round of ``maskrt bench --source``: the engine alone on ``inputs`` (the source's
    letterboxed frame) for ``frames`` images, then the loop on ``source`` for ``frames`` frames
    (overlays encoded to ``sink_path`` when given). Returns the round's figures and the loop's
    stats. Process CPU time is taken beside wall time: what the loop's other stages cost beside
    the engine, which a machine shared with other work disturbs far less than the clock."""
    cpu_begin = time.process_time()
    engine = _engine_fps(predictor, inputs, frames)
    engine_cpu_ms = (time.process_time() - cpu_begin) * 1000.0 / frames
    sink = FrameSink(str(sink_path), fps=30.0) if sink_path is not None else None
    cpu_begin = time.process_time()
    stats = run_loop(source, stages, sink=sink, max_frames=frames)
    loop_cpu_ms = (time.process_time() - cpu_begin) * 1000.0 / max(stats.frames, 1)
    if stats.interrupted:
        raise MaskrtError("bench stopped by Ctrl-C")
    return ({"engine_fps": engine, "loop_fps": stats.fps, "frames": stats.frames, "dropped": stats.dropped,
             "ratio": stats.fps / engine, "engine_cpu_ms_per_image": engine_cpu_ms,
             "loop_cpu_ms_per_frame": loop_cpu_ms}, stats)


def engine_threads(predictor: Predictor) -> int | None:
    """ONNX Runtime's intra-op threads as set (``--threads``), None for its default (one per
    physical core) or a backend without the setting."""
    session = getattr(predictor.backend, "session", None)
    if session is None or not hasattr(session, "get_session_options"):
        return None
    return int(session.get_session_options().intra_op_num_threads) or None


def bench_source_command(args: argparse.Namespace, predictor: Predictor) -> int:
    """``maskrt bench --source``: the pipelined loop at the source's own resolution, per stage,
    next to the engine's own throughput, in rounds that alternate the two (same machine load)."""
    import statistics
    import tempfile

    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    spec = str(args.source)
    probe = open_source(spec)
    try:
        first = next(iter(probe.frames()), None)
    finally:
        probe.close()
    if first is None:
        raise MaskrtError(f"no frame of {spec} could be decoded")
    frame = first[1]
    height, width = frame.shape[:2]
    inputs, _ = predictor.preprocess([frame])
    _engine_fps(predictor, inputs, max(args.warmup, 1))  # warm-up: first runs allocate
    frames_per_round = args.iters
    rounds = []
    merged = {name: [] for name in ("decode", "preprocess", "inference", "postprocess", "draw", "encode")}
    detections_seen: list[int] = []
    stages = predictor_stages(predictor, conf=args.conf, draw_threads=args.draw_threads)
    if not args.draw:  # no overlay, no encoding: the loop's own stages only
        stages = FrameStages(stages.preprocess, stages.infer, stages.postprocess,
                             lambda frame, detections: (frame, describe(detections)))
    counting = FrameStages(stages.preprocess, stages.infer,
                           lambda frame, prepared, outputs: _counted(stages.postprocess(frame, prepared, outputs),
                                                                     detections_seen),
                           stages.draw)
    with tempfile.TemporaryDirectory(prefix="maskrt-bench-") as folder:
        for round_index in range(args.rounds):
            source = (RepeatedImageSource(frame, frames_per_round, spec) if isinstance(probe, ImageSource)
                      else open_source(spec))
            sink_path = Path(folder) / f"round{round_index}.mp4" if args.draw else None
            figures, stats = bench_round(predictor, inputs, counting, source, frames_per_round, sink_path)
            rounds.append(figures)
            for name, values in stats.stage_ms.items():
                merged[name].extend(values)
            engine = figures["engine_fps"]
            print(f"  round {round_index + 1}: engine alone {engine:6.2f} images/s, loop {stats.fps:6.2f} FPS "
                  f"({stats.frames} frames) -> {stats.fps / engine:.2f}x", flush=True)
    report: dict[str, object] = {
        "model": str(args.model), "backend": predictor.backend.name, "precision": predictor.info.precision,
        "input_size": list(predictor.input_size), "source": spec, "resolution": [height, width],
        "draw": bool(args.draw),
        "frames_per_round": frames_per_round, "rounds": rounds, "conf": args.conf,
        "detections_per_frame": float(np.mean(detections_seen)) if detections_seen else 0.0,
        "opencv_threads_in_loop": 1, "machine": machine_description(load_at_start),
        # null: ONNX Runtime's default (one per physical core); the engine alone and the loop use the same
        "engine_threads": engine_threads(predictor), "draw_threads": args.draw_threads,
        "providers": getattr(predictor.backend, "providers", None),
        "stages_ms": {name: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}
                      for name, v in merged.items() if v},
        "loop_fps": statistics.median(r["loop_fps"] for r in rounds),
        "engine_fps": statistics.median(r["engine_fps"] for r in rounds),
    }
    report["loop_vs_engine"] = statistics.median(r["ratio"] for r in rounds)
    report["engine_cpu_ms_per_image"] = statistics.median(r["engine_cpu_ms_per_image"] for r in rounds)
    report["loop_cpu_ms_per_frame"] = statistics.median(r["loop_cpu_ms_per_frame"] for r in rounds)
    print(f"maskrt bench: {args.model} on {predictor.backend.name}, source {spec} at {width}x{height}, "
          f"{report['detections_per_frame']:.0f} detections per frame, draw {'on' if args.draw else 'off'}, "
          f"engine threads {report['engine_threads'] or 'default (one per core)'}")
    for name, figures in report["stages_ms"].items():
        print(f"  {name:<12} p50 {figures['p50']:8.2f} ms   p99 {figures['p99']:8.2f} ms")
    machine = report["machine"]
    print(f"  machine: {machine['cpu']}, {machine['cores']} cores, load average "
          f"{_fmt(machine['load_average_start'])} -> {_fmt(machine['load_average_end'])}")
    print(f"  loop {report['loop_fps']:.2f} FPS, engine alone {report['engine_fps']:.2f} images/s "
          f"-> {report['loop_vs_engine']:.2f}x (median of {args.rounds} interleaved rounds)")
    print(f"  CPU time: engine alone {report['engine_cpu_ms_per_image']:.1f} ms per image, loop "
          f"{report['loop_cpu_ms_per_frame']:.1f} ms per frame (all its stages, all threads)")
    _write_json(args.json, report)
    return 0


def machine_description(load_at_start: float | None) -> dict[str, object]:
    """What the figures ran on: CPU model and count, and the 1-minute load average at the start and
    end (a shared machine shows in it)."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    load_at_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_start": load_at_start, "load_average_end": load_at_end}


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f}"


def _counted(detections: Detections, counts: list[int]) -> Detections:
    counts.append(len(detections))
    return detections


def _write_json(path: str | None, report: dict) -> None:
    if not path:
        return
    try:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
    except OSError as err:
        raise MaskrtError(f"cannot write {path}: {err.strerror}") from None
    print(f"  figures written to {path}")


def bench_command(args: argparse.Namespace) -> int:
    """Latency p50/p99 and throughput, split into preprocess / inference / postprocess; with
    --source, the pipelined loop on that source (``bench_source_command``)."""
    if args.iters <= 0 or args.warmup < 0:
        raise MaskrtError(f"--iters must be positive and --warmup not negative, got {args.iters} and {args.warmup}")
    if getattr(args, "source", None) is not None:
        if args.rounds <= 0:
            raise MaskrtError(f"--rounds must be positive, got {args.rounds}")
        _check_draw_threads(args.draw_threads)
        return bench_source_command(args, _predictor_from_args(args, conf=args.conf))
    if getattr(args, "draw", False):
        raise MaskrtError("--draw needs --source (the overlay is drawn on the source's frames)")
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
        "engine_threads": engine_threads(predictor),
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
        eager = time_eager(args.against_eager, image, args.iters, args.warmup, getattr(args, "device", "cpu"))
        report["eager_ms"] = _summary_ms(eager)
        report["speedup_vs_eager"] = report["eager_ms"]["p50"] / report["total_ms"]["p50"]
        print(f"  eager torch  p50 {report['eager_ms']['p50']:8.2f} ms   p99 {report['eager_ms']['p99']:8.2f} ms   "
              f"-> runtime is {report['speedup_vs_eager']:.2f}x the eager speed (p50)")
    _write_json(args.json, report)
    return 0
