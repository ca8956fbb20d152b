"""The camera loop beside an engine that holds no CPU while it runs, as a GPU engine does.

    .venv/bin/python bench/loop_paced.py --model M.onnx --source clip1080.mp4 [--paces 0 20 25 33 50]
        [--frames 60] [--rounds 3] [--conf 0.5] [--json out.json]

`maskrt bench --source` measures the loop beside a CPU engine, which takes the same cores as the
loop's other stages (decode, letterbox, postprocess, drawing, encoding): there the loop's pace is
bounded by the sum of all CPU work over the cores, whatever the pipeline does. A GPU engine
(TensorRT, ONNX Runtime's CUDA provider) leaves the CPU to those stages while it runs, and the
pipelined loop should then run at the pace of its slowest stage. That is what this measures
on a machine without a GPU:

- the model's outputs for each of the source's first ``--frames`` frames are computed first, with
  the real model (ONNX Runtime, the Predictor);
- the loop then runs with everything of its own (``run_loop``, ``predictor_stages``: letterbox,
  postprocess with mask crops, ``draw_detections``, mp4v encoding through ``FrameSink``) except the
  inference stage, which waits ``pace`` ms (``time.sleep``: no CPU) and hands back that frame's
  recorded outputs. Pace 0 hands them back at once: the most frames per second the loop's CPU
  stages can carry, i.e. the fastest engine this machine's loop keeps up with.

For each pace, in rotating order within each round: loop FPS against the engine's 1000 / pace
images/s (the ratio the issue's >= 0.9x goal is about), the stages' p50 (wall ms), the loop's
process CPU time per frame, and the serial sum of the stage p50s (what a loop without overlap
would take per frame). Medians over rounds, per-round ratios kept in the JSON. The sleep is not a
model of any particular GPU: it only takes the engine's CPU out of the picture.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from maskrt.runtime import Predictor
from maskrt.runtime.commands import machine_description, predictor_stages
from maskrt.runtime.video import FrameSink, FrameStages, open_source, run_loop

STAGES = ("decode", "preprocess", "inference", "postprocess", "draw", "encode")


def record_outputs(predictor: Predictor, spec: str, frames: int) -> list[dict[str, np.ndarray]]:
    """The graph's outputs for each of the first ``frames`` good frames of ``spec``, in order."""
    source = open_source(spec)
    outputs = []
    try:
        for _, frame in source.frames():
            inputs, _ = predictor.preprocess([frame])
            outputs.append(predictor.infer(inputs))
            if len(outputs) == frames:
                break
    finally:
        source.close()
    if len(outputs) < frames:
        raise SystemExit(f"{spec} has {len(outputs)} good frames, fewer than --frames {frames}")
    return outputs


def paced_stages(stages: FrameStages, outputs: list[dict[str, np.ndarray]], pace_ms: float) -> FrameStages:
    """``stages`` with inference replaced: wait ``pace_ms``, then the next frame's recorded outputs.
    The inference stage runs in one thread, in frame order, so a counter finds each frame's."""
    served = iter(range(len(outputs)))

    def infer(prepared: object) -> dict[str, np.ndarray]:
        if pace_ms > 0:
            time.sleep(pace_ms / 1000.0)
        return outputs[next(served)]

    return FrameStages(stages.preprocess, infer, stages.postprocess, stages.draw)


def one_loop(spec: str, stages: FrameStages, frames: int, folder: Path) -> dict[str, object]:
    """The loop over the first ``frames`` frames of ``spec``, overlays encoded to an mp4 in ``folder``."""
    sink = FrameSink(str(folder / "overlay.mp4"), fps=30.0)
    cpu_begin = time.process_time()
    stats = run_loop(open_source(spec), stages, sink=sink, max_frames=frames)
    cpu_ms = (time.process_time() - cpu_begin) * 1000.0 / max(stats.frames, 1)
    if stats.frames != frames:
        raise SystemExit(f"the loop ended after {stats.frames} of {frames} frames ({stats.dropped} dropped)")
    p50 = {name: float(np.percentile(values, 50)) for name, values in stats.stage_ms.items() if values}
    return {"fps": stats.fps, "cpu_ms_per_frame": cpu_ms, "stage_p50_ms": p50}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=".onnx model (its outputs are recorded once)")
    parser.add_argument("--source", required=True, help="a video file (e.g. a 1920x1080 clip)")
    parser.add_argument("--paces", type=float, nargs="+", default=[0, 20, 25, 33, 50],
                        help="engine times in ms per frame (0: outputs at once)")
    parser.add_argument("--frames", type=int, default=60, help="frames per loop run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conf", type=float, default=0.5, help="score threshold, as `maskrt infer --conf`")
    parser.add_argument("--draw-threads", type=int, default=1)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]
    predictor = Predictor(args.model, conf=args.conf)
    outputs = record_outputs(predictor, args.source, args.frames)
    stages = predictor_stages(predictor, conf=args.conf, draw_threads=args.draw_threads)
    runs: dict[float, list[dict[str, object]]] = {pace: [] for pace in args.paces}
    with tempfile.TemporaryDirectory(prefix="maskrt-loop-paced-") as folder:
        one_loop(args.source, paced_stages(stages, outputs, 0.0), min(args.frames, 10), Path(folder))  # warm-up
        for round_index in range(args.rounds):
            shift = round_index % len(args.paces)
            for pace in args.paces[shift:] + args.paces[:shift]:
                run = one_loop(args.source, paced_stages(stages, outputs, pace), args.frames, Path(folder))
                run["ratio"] = run["fps"] * pace / 1000.0 if pace > 0 else None
                runs[pace].append(run)
                ratio = f" -> {run['ratio']:.2f}x of a {1000.0 / pace:.1f} images/s engine" if pace > 0 else ""
                print(f"  round {round_index + 1}, pace {pace:g} ms: loop {run['fps']:.2f} FPS{ratio}", flush=True)

    report: dict[str, object] = {"model": args.model, "source": args.source, "frames": args.frames,
                                 "conf": args.conf, "draw_threads": args.draw_threads,
                                 "machine": machine_description(load_at_start), "paces": []}
    print(f"loop_paced: {args.model}, {args.source}, {args.frames} frames x {args.rounds} rounds, conf {args.conf}")
    print("| engine pace | engine images/s | loop FPS | loop / engine | stage p50 ms: " + " / ".join(STAGES)
          + " | serial sum of stages | loop CPU per frame |")
    print("|---|---|---|---|---|---|---|")
    for pace in args.paces:
        pace_runs = runs[pace]
        fps = statistics.median(r["fps"] for r in pace_runs)
        p50 = {name: statistics.median(r["stage_p50_ms"].get(name, 0.0) for r in pace_runs) for name in STAGES}
        serial = sum(p50.values())
        cpu = statistics.median(r["cpu_ms_per_frame"] for r in pace_runs)
        ratio = statistics.median(r["ratio"] for r in pace_runs) if pace > 0 else None
        report["paces"].append({"pace_ms": pace, "loop_fps": fps, "loop_vs_engine": ratio, "stage_p50_ms": p50,
                                "serial_sum_ms": serial, "cpu_ms_per_frame": cpu, "runs": pace_runs})
        engine = f"{1000.0 / pace:.1f}" if pace > 0 else "-"
        ratio_text = (f"{ratio:.2f}x (" + " / ".join(f"{r['ratio']:.2f}" for r in pace_runs) + ")") if ratio else "-"
        print(f"| {pace:g} ms | {engine} | {fps:.1f} | {ratio_text} | "
              + " / ".join(f"{p50[name]:.1f}" for name in STAGES) + f" | {serial:.1f} ms | {cpu:.1f} ms |")
    machine = report["machine"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load average "
          f"{machine['load_average_start']} -> {machine['load_average_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
