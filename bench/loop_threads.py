"""The video loop against the engine alone at each ONNX Runtime thread count, interleaved.

    .venv/bin/python bench/loop_threads.py --model M.onnx --source clip.mp4 [--threads 1 2]
        [--draw-threads 1] [--iters 12] [--rounds 5] [--draw] [--json out.json]

On a CPU engine the loop's other stages (decode, letterbox, postprocess, drawing, encoding)
share the cores with the engine's intra-op threads. This runs ``maskrt bench --source``'s round
(``maskrt.runtime.commands.bench_round``: the engine alone on the source's letterboxed frame,
then the loop on the source, ``--iters`` frames each) for one Predictor per thread count, the
thread counts in rotating order within each round so all see the same machine load, and reports
per thread count the medians of: loop FPS, engine-alone images/s, their ratio (at that thread
count) and the process CPU time per frame; and the loop's FPS at each thread count against the
first's (which thread count gives users the most frames per second). With several
``--draw-threads`` each (engine threads, drawing threads) pair is one configuration
("2x1": 2 engine threads, 1 drawing thread).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from maskrt.runtime import Predictor
from maskrt.runtime.commands import (FrameStages, bench_round, describe, machine_description, predictor_stages)
from maskrt.runtime.video import open_source


def main() -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported .onnx")
    parser.add_argument("--source", required=True, help="a video file (read from the start each round)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ONNX Runtime intra-op thread counts")
    parser.add_argument("--draw-threads", type=int, nargs="+", default=[1],
                        help="threads drawing each overlay (draw_detections(threads=N))")
    parser.add_argument("--iters", type=int, default=12, help="frames per round, engine alone and loop each")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--draw", action="store_true", help="draw overlays and encode them, as `infer --save`")
    parser.add_argument("--conf", type=float, default=0.0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    probe = open_source(args.source)
    try:
        _, frame = next(iter(probe.frames()))
    finally:
        probe.close()
    predictors = {threads: Predictor(args.model, conf=args.conf, threads=threads) for threads in args.threads}
    configs = [f"{threads}x{drawing}" for threads in args.threads for drawing in args.draw_threads]
    inputs, stages, engines = {}, {}, {}
    for threads, predictor in predictors.items():
        prepared = predictor.preprocess([frame])[0]
        predictor.infer(prepared)  # warm-up: first runs allocate
        for drawing in args.draw_threads:
            config = f"{threads}x{drawing}"
            inputs[config], engines[config] = prepared, predictor
            full = predictor_stages(predictor, conf=args.conf, draw_threads=drawing)
            stages[config] = full if args.draw else FrameStages(full.preprocess, full.infer, full.postprocess,
                                                                lambda f, d: (f, describe(d)))
    rounds: dict[str, list[dict[str, float]]] = {config: [] for config in configs}
    with tempfile.TemporaryDirectory(prefix="maskrt-threads-") as folder:
        for round_index in range(args.rounds):
            shift = round_index % len(configs)
            for config in configs[shift:] + configs[:shift]:
                sink = Path(folder) / f"r{round_index}_{config}.mp4" if args.draw else None
                figures, _ = bench_round(engines[config], inputs[config], stages[config],
                                         open_source(args.source), args.iters, sink)
                rounds[config].append(figures)
                print(f"round {round_index + 1}, {config} (engine x drawing threads): engine alone "
                      f"{figures['engine_fps']:.2f} images/s, loop {figures['loop_fps']:.2f} FPS -> "
                      f"{figures['ratio']:.2f}x; CPU per frame engine {figures['engine_cpu_ms_per_image']:.0f} ms, "
                      f"loop {figures['loop_cpu_ms_per_frame']:.0f}", flush=True)
    summary = {}
    first = configs[0]
    for config, values in rounds.items():
        summary[config] = {key: statistics.median(r[key] for r in values)
                           for key in ("loop_fps", "engine_fps", "ratio", "engine_cpu_ms_per_image",
                                       "loop_cpu_ms_per_frame")}
        summary[config]["loop_fps_vs_first"] = statistics.median(
            r["loop_fps"] / f["loop_fps"] for r, f in zip(values, rounds[first]))
    height, width = frame.shape[:2]
    print(f"{args.model} on {args.source} ({width}x{height}), draw {'on' if args.draw else 'off'}, "
          f"medians of {args.rounds} rounds:")
    for config, figures in summary.items():
        print(f"  {config} (engine x drawing threads): loop {figures['loop_fps']:.2f} FPS, engine alone "
              f"{figures['engine_fps']:.2f} images/s, loop / engine {figures['ratio']:.2f}x, loop FPS vs {first} "
              f"{figures['loop_fps_vs_first']:.2f}x; CPU per frame: engine "
              f"{figures['engine_cpu_ms_per_image']:.0f} ms, loop {figures['loop_cpu_ms_per_frame']:.0f} ms")
    machine = machine_description(load_at_start)
    print(f"  machine: {machine['cpu']}, {machine['cores']} cores, load average "
          f"{machine['load_average_start']:.1f} -> {machine['load_average_end']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "source": args.source, "resolution": [height, width],
                                               "draw": args.draw, "frames_per_round": args.iters, "machine": machine,
                                               "rounds": rounds, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
