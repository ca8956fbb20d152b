"""Training step cost with the native CPU RoIAlign on and off, side by side in one run.

    .venv/bin/python bench/train_steps.py [--steps 40] [--rounds 2] [--preset edge] [--threads 2]
                                          [--init WEIGHTS] [--data DIR] [--skip 10]

Runs `maskrt.train.trainer.train` for --steps steps on --data (default: a 32-image `maskrt data
synth` set) in three variants, alternating, for --rounds rounds:
- "pytorch": RoIAlign forward and backward on the pure-PyTorch path (the fallback);
- "native fwd": the native forward, the PyTorch backward (the code before the native backward);
- "native": the native forward and the native backward of average pooling (the default).
`--init` starts every run from trained weights (late-run steps: a trained RPN's proposals,
masks on real objects); without it, from a fresh model. Steps 1..--skip are set-up and warm-up
and are not counted. Reports per variant the CPU seconds per step (this process, all threads:
the machine is shared, and CPU time is less sensitive to other jobs than wall time), the wall
seconds per step, the steps per minute they imply against "native fwd", and the largest
difference of the loss per step between the variants (the same seed gives the same batches and
samples).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import tempfile
from pathlib import Path

import torch

from maskrt.train.synthetic import write_dataset
from maskrt.train.trainer import METRICS, TrainConfig, train

_roi_align_module = importlib.import_module("maskrt.model.ops.roi_align")

# variant -> (native forward, native backward)
VARIANTS = {"pytorch": (False, False), "native fwd": (True, False), "native": (True, True)}


@contextlib.contextmanager
def _native(forward: bool, backward: bool):
    saved = _roi_align_module._NATIVE_CPU, _roi_align_module._NATIVE_BACKWARD
    _roi_align_module._NATIVE_CPU, _roi_align_module._NATIVE_BACKWARD = forward, backward
    try:
        yield
    finally:
        _roi_align_module._NATIVE_CPU, _roi_align_module._NATIVE_BACKWARD = saved


def _run(data: Path, out: Path, args: argparse.Namespace) -> tuple[float, float, list[float]]:
    config = TrainConfig(data=str(data), out=str(out), preset=args.preset, epochs=1000.0, progress=False, log_every=1,
                         checkpoint_every=10**6, precision=args.precision, weights=args.init)
    train(config, stop_after_steps=args.steps)
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    first, last = rows[args.skip - 1], rows[-1]
    steps = last["step"] - first["step"]
    return ((last["cpu_s"] - first["cpu_s"]) / steps, (last["elapsed_s"] - first["elapsed_s"]) / steps,
            [row["loss"] for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--skip", type=int, default=10, help="first steps not timed (set-up, warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the three variants")
    parser.add_argument("--preset", default="edge", help="model preset")
    parser.add_argument("--precision", default="auto", help="auto | bf16 | fp32, as maskrt train")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--init", default=None, help="weights to start each run from (a trained model of the preset)")
    parser.add_argument("--data", default=None, help="COCO training set (default: a generated 32-image set)")
    args = parser.parse_args()
    if not 1 <= args.skip < args.steps:
        parser.error("--skip must be at least 1 and below --steps")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = Path(args.data) if args.data else write_dataset(root / "data", train=32, val=0, size=256, seed=3)
        results: dict[str, list[tuple[float, float, list[float]]]] = {name: [] for name in VARIANTS}
        for round_index in range(args.rounds):
            for name, switches in VARIANTS.items():
                with _native(*switches):
                    results[name].append(_run(data, root / f"{name.replace(' ', '-')}{round_index}", args))
    print(f"torch {torch.__version__}, threads {args.threads}, preset {args.preset}, data {args.data or 'generated'}, steps {args.skip + 1}-{args.steps} "
          f"timed x {args.rounds} rounds, {'from ' + args.init if args.init else 'fresh model'}")
    medians = {}
    for name, runs in results.items():
        cpu = [r[0] for r in runs]
        wall = [r[1] for r in runs]
        medians[name] = (statistics.median(cpu), statistics.median(wall))
        print(f"{name:10s} CPU s/step min {min(cpu):.3f} median {medians[name][0]:.3f} | wall s/step min "
              f"{min(wall):.3f} median {medians[name][1]:.3f}")
    for name in ("pytorch", "native"):
        gain_cpu = medians["native fwd"][0] / medians[name][0] - 1
        gain_wall = medians["native fwd"][1] / medians[name][1] - 1
        print(f"steps per minute, {name} vs native fwd: {gain_cpu * 100:+.1f} % (CPU time), {gain_wall * 100:+.1f} % (wall)")

    def largest_difference(a: list[float], b: list[float]) -> str:
        return f"{max(abs(x - y) for x, y in zip(a, b)):.2e}"

    first = {name: runs[0][2] for name, runs in results.items()}
    print(f"loss per step, largest difference over {args.steps} steps: native vs native fwd "
          f"{largest_difference(first['native'], first['native fwd'])}, native vs pytorch "
          f"{largest_difference(first['native'], first['pytorch'])}"
          + (f"; native vs itself (round 1 vs 2) {largest_difference(first['native'], results['native'][1][2])}"
             if args.rounds > 1 else ""))


if __name__ == "__main__":
    main()
