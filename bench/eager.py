"""Eager CPU inference speed of the model, `model([image])`, with each speed lever on and off,
measured side by side in one run (the variants interleaved round by round).

    .venv/bin/python bench/eager.py [--preset r50_fpn] [--size 512] [--rounds 3] [--threads 2] [--clock wall|cpu]

Variants:
- before: frozen BN as a separate scale-and-shift after each conv, RoIAlign forward on the
  pure-PyTorch path (the code before the native kernel);
- fold_bn: frozen BN folded into the convs (model/backbone.py ``conv_norm``);
- native: the native CPU RoIAlign forward (model/ops/native_cpu.py);
- both: fold_bn + native, NCHW activations;
- default: both, with channels-last activations (``MaskRCNN.forward_eval`` on the CPU), the
  model's default now.
Random weights (``build_model``), one random image, the preset's own detection count (r50_fpn:
100 detections, masks computed for all of them). Prints min / median seconds per variant and
the ratio of medians to ``before``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import time

import torch

from maskrt.model import backbone, mask_rcnn
from maskrt.model.ops import native_cpu
from maskrt.model.presets import build_model

_roi_align_module = importlib.import_module("maskrt.model.ops.roi_align")


@contextlib.contextmanager
def _levers(fold_bn: bool, native: bool, channels_last: bool):
    saved = backbone.FOLD_FROZEN_BN, _roi_align_module._NATIVE_CPU, mask_rcnn.CHANNELS_LAST_CPU
    backbone.FOLD_FROZEN_BN, _roi_align_module._NATIVE_CPU, mask_rcnn.CHANNELS_LAST_CPU = fold_bn, native, channels_last
    try:
        yield
    finally:
        backbone.FOLD_FROZEN_BN, _roi_align_module._NATIVE_CPU, mask_rcnn.CHANNELS_LAST_CPU = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="r50_fpn", help="model preset (r50_fpn or edge)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (min_size = max_size = this)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (min and median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--classes", type=int, default=91, help="classes incl. background")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed seconds; cpu: this process's CPU seconds (all threads), less "
                             "sensitive to other jobs on a shared machine (use with --threads 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.preset, args.classes, min_size=args.size, max_size=args.size).eval()
    image = torch.rand(3, args.size, args.size)

    variants = {  # name: (fold_bn, native, channels_last)
        "before": (False, False, False),
        "fold_bn": (True, False, False),
        "native": (False, True, False),
        "both": (True, True, False),
        "default": (True, True, True),
    }
    print(f"torch {torch.__version__}, threads {args.threads}, preset {args.preset}, {args.size} px, "
          f"{args.rounds} interleaved rounds, {args.clock} clock, native RoIAlign {'available' if native_cpu.enabled() else 'UNAVAILABLE'}")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    times: dict[str, list[float]] = {name: [] for name in variants}
    reference = None
    with torch.no_grad():
        for name, levers in variants.items():  # warm-up, and the outputs agree
            with _levers(*levers):
                result = model([image])[0]
            if reference is None:
                reference = result
            else:
                worst = max(float((result[key].float() - reference[key].float()).abs().max()) for key in ("boxes", "scores", "masks"))
                print(f"  {name}: {len(result['boxes'])} detections, largest difference to before {worst:.2e}")
        for _ in range(args.rounds):
            for name, levers in variants.items():
                with _levers(*levers):
                    start = clock()
                    model([image])
                    times[name].append(clock() - start)
    before = statistics.median(times["before"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:20s} min {min(values):6.3f} s  median {median:6.3f} s  median/before {median / before:5.2f}")


if __name__ == "__main__":
    main()
