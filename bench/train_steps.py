"""Training step cost with the native CPU RoIAlign forward on and off, side by side in one run.

    .venv/bin/python bench/train_steps.py [--steps 20] [--rounds 2] [--preset edge] [--threads 2]

Runs `maskrt.train.trainer.train` for --steps steps on a small `maskrt data synth` set, once with
the RoIAlign forward on the pure-PyTorch path and once on the native kernel, alternating, for
--rounds rounds. Reports per variant the CPU seconds per step (this process, all threads: the
machine is shared, and CPU time is less sensitive to other jobs than wall time), the wall
seconds per step, the steps per minute they imply, and the largest difference of the loss per
step between the variants (the same seed gives the same batches and samples).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from maskrt.train.synthetic import write_dataset
from maskrt.train.trainer import METRICS, TrainConfig, train

_roi_align_module = importlib.import_module("maskrt.model.ops.roi_align")


@contextlib.contextmanager
def _native(enabled: bool):
    saved = _roi_align_module._NATIVE_CPU
    _roi_align_module._NATIVE_CPU = enabled
    try:
        yield
    finally:
        _roi_align_module._NATIVE_CPU = saved


def _run(data: Path, out: Path, preset: str, steps: int, precision: str) -> tuple[float, float, list[float]]:
    config = TrainConfig(data=str(data), out=str(out), preset=preset, epochs=1000.0, progress=False, log_every=1,
                         checkpoint_every=10**6, precision=precision)
    cpu, wall = time.process_time(), time.perf_counter()
    train(config, stop_after_steps=steps)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    losses = [json.loads(line)["loss"] for line in (out / METRICS).read_text().splitlines()]
    return cpu / steps, wall / steps, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of (PyTorch, native)")
    parser.add_argument("--preset", default="edge", help="model preset")
    parser.add_argument("--precision", default="auto", help="auto | bf16 | fp32, as maskrt train")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = write_dataset(root / "data", train=32, val=0, size=256, seed=3)
        results: dict[str, list[tuple[float, float, list[float]]]] = {"pytorch": [], "native": []}
        for round_index in range(args.rounds):
            for name in results:
                with _native(name == "native"):
                    results[name].append(_run(data, root / f"{name}{round_index}", args.preset, args.steps,
                                              args.precision))
    print(f"torch {torch.__version__}, threads {args.threads}, preset {args.preset}, {args.steps} steps x "
          f"{args.rounds} rounds (setup included: model build, data loading)")
    medians = {}
    for name, runs in results.items():
        cpu = [r[0] for r in runs]
        wall = [r[1] for r in runs]
        medians[name] = (statistics.median(cpu), statistics.median(wall))
        print(f"{name:8s} CPU s/step min {min(cpu):.3f} median {medians[name][0]:.3f} | wall s/step min "
              f"{min(wall):.3f} median {medians[name][1]:.3f}")
    gain_cpu = medians["pytorch"][0] / medians["native"][0] - 1
    gain_wall = medians["pytorch"][1] / medians["native"][1] - 1
    print(f"steps per minute, native vs PyTorch: {gain_cpu * 100:+.1f} % (CPU time), {gain_wall * 100:+.1f} % (wall)")

    def largest_difference(a: list[float], b: list[float]) -> str:
        return f"{max(abs(x - y) for x, y in zip(a, b)):.2e}"

    print(f"loss per step, largest difference over {args.steps} steps: native vs PyTorch "
          f"{largest_difference(results['pytorch'][0][2], results['native'][0][2])}"
          + (f"; PyTorch vs itself (round 1 vs 2) {largest_difference(results['pytorch'][0][2], results['pytorch'][1][2])}"
             if args.rounds > 1 else ""))
    for name, runs in results.items():
        print(f"  {name} losses, round 1: {' '.join(f'{v:.5f}' for v in runs[0][2])}")


if __name__ == "__main__":
    main()
