"""`maskrt demo`: the main job end to end on built-in synthetic data.

synthetic COCO data -> train the `edge` model -> COCO eval in PyTorch -> export to ONNX
(portable and TensorRT targets) -> eval and benchmark with the torch-free runtime -> overlay
pictures -> `OUT/report.md`.

Each step is the same CLI verb a user would run (so the demo also proves the CLI); a step that
fails stops the demo, and the report says where and why.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from maskrt import __version__
from maskrt.errors import MaskrtError


@dataclass
class StepLog:
    """What each step did and how long it took, for the report."""

    rows: list[tuple[str, str, float]] = field(default_factory=list)
    stopped: str | None = None

    def run(self, name: str, argv: list[str]) -> bool:
        from maskrt.cli import main

        print(f"\n=== demo: {name}: maskrt {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        try:
            code = main(argv)
        except Exception as err:  # the report must say what broke, whatever it was
            code = 1
            self.stopped = f"{name}: {type(err).__name__}: {err}"
        seconds = time.perf_counter() - start
        self.rows.append((name, "ok" if code == 0 else f"failed (exit {code})", seconds))
        if code != 0 and self.stopped is None:
            self.stopped = f"{name}: exit status {code} (see the console output above)"
        return code == 0


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _ap_row(name: str, evaluation: dict) -> str:
    """One table row from `maskrt eval --out` JSON ({"metrics": {"bbox/AP": ..., "segm/AP": ...}})."""
    metrics = evaluation.get("metrics", {})

    def cell(key: str) -> str:
        value = metrics.get(key)
        return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"

    keys = ["bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75"]
    return f"| {name} | " + " | ".join(cell(key) for key in keys) + " |"


def _timing_rows(bench: dict) -> list[str]:
    """Per-image latency table from `maskrt bench --json` (runtime stages and eager, one run)."""
    def ms(entry: object) -> str:
        return f"{entry['p50']:.1f} / {entry['p99']:.1f}" if isinstance(entry, dict) and "p50" in entry else "n/a"

    rows = ["| path | p50 / p99 ms per image |", "|---|---|"]
    for label, key in [("runtime: preprocess (letterbox)", "preprocess_ms"),
                       ("runtime: inference (ONNX Runtime, CPU)", "inference_ms"),
                       ("runtime: postprocess (undo letterbox, paste masks)", "postprocess_ms"),
                       ("runtime: total", "total_ms"),
                       ("PyTorch eager `model([image])`", "eager_ms")]:
        rows.append(f"| {label} | {ms(bench.get(key))} |")
    speedup = bench.get("speedup_vs_eager")
    if isinstance(speedup, (int, float)):
        rows += ["", f"The torch-free runtime is **{speedup:.2f}x** the speed of PyTorch eager "
                     f"(p50 totals, measured side by side in one run, {bench.get('iters', '?')} iterations)."]
    return rows


def _write_report(out: Path, log: StepLog, minutes: float) -> Path:
    lines = [
        "# maskrt demo report",
        "",
        f"maskrt {__version__}, {platform.machine()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Synthetic data (`maskrt data synth`), `edge` preset, "
        f"training budget {minutes:g} min on this machine's CPU.",
        "",
    ]
    if log.stopped:
        lines += [f"**The demo stopped early** at {log.stopped}.", ""]

    lines += ["## Accuracy (COCO AP@[.5:.95], pycocotools, synthetic val set)", "",
              "| model | bbox AP | AP50 | AP75 | segm AP | AP50 | AP75 |", "|---|---|---|---|---|---|---|"]
    for name, file in [("PyTorch eager (fp32)", "eval_torch.json"),
                       ("ONNX Runtime, portable graph (fp32)", "eval_onnx.json"),
                       ("ONNX Runtime, TensorRT-target graph + CPU RoIAlign op (fp32)", "eval_onnx_trt.json")]:
        metrics = _read_json(out / file)
        if metrics:
            lines.append(_ap_row(name, metrics))
    lines.append("")

    state = _read_json(out / "train" / "train_state.json")
    if state:
        lines += ["## Training", "",
                  f"- `edge` preset, {state.get('step', 'n/a')} steps of batch "
                  f"{state.get('config', {}).get('batch_size', '?')} "
                  f"({state.get('config', {}).get('precision', 'fp32')} forward), "
                  f"{float(state.get('elapsed_s', 0.0)) / 60:.1f} min wall on this machine",
                  "- losses per step: `train/metrics.jsonl`; weights: `train/model.safetensors`", ""]

    bench = _read_json(out / "bench.json")
    if bench:
        lines += ["## Inference time per image (this CPU, batch 1)", ""] + _timing_rows(bench) + [""]

    pictures = sorted((out / "overlays").glob("*.png"))[:8] if (out / "overlays").is_dir() else []
    if pictures:
        lines += ["## What the model sees (torch-free runtime on val images)", ""]
        lines += [f"![{p.name}](overlays/{p.name})" for p in pictures]
        lines.append("")

    lines += ["## Steps", "", "| step | result | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {result} | {seconds:.1f} |" for name, result, seconds in log.rows]
    lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def demo_command(args: argparse.Namespace) -> int:
    from maskrt.model import resolve_device

    resolve_device(args.device)  # a missing GPU is one line before any step runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, train_dir = out / "data", out / "train"
    weights = train_dir / "model.safetensors"
    size = 256
    log = StepLog()

    steps: list[tuple[str, list[str]]] = [
        ("synthetic data", ["data", "synth", "--out", str(data), "--train", "400", "--val", "60",
                            "--size", str(size), "--seed", str(args.seed)]),
        ("train", ["train", "--data", str(data), "--config", "edge", "--minutes", str(args.minutes),
                   "--out", str(train_dir), "--seed", str(args.seed), "--no-progress", "--device", args.device]),
        ("eval (PyTorch)", ["eval", "--weights", str(weights), "--data", str(data), "--device", args.device,
                            "--out", str(out / "eval_torch.json")]),
        ("export (portable ONNX)", ["export", "--weights", str(weights), "--target", "onnx",
                                    "--precision", "fp32", "--input-size", f"{size}x{size}",
                                    "--out", str(out / "model.onnx")]),
        ("eval (runtime, ONNX)", ["eval", "--model", str(out / "model.onnx"), "--data", str(data),
                                  "--out", str(out / "eval_onnx.json")]),
        ("export (TensorRT target)", ["export", "--weights", str(weights), "--target", "tensorrt",
                                      "--precision", "fp32", "--input-size", f"{size}x{size}",
                                      "--out", str(out / "model_trt.onnx")]),
        ("eval (runtime, TensorRT-target graph on ORT)",
         ["eval", "--model", str(out / "model_trt.onnx"), "--data", str(data),
          "--out", str(out / "eval_onnx_trt.json")]),
        ("bench (runtime vs eager)", ["bench", "--model", str(out / "model.onnx"), "--iters", "20",
                                      "--against-eager", str(weights), "--device", args.device,
                                      "--json", str(out / "bench.json")]),
        ("overlays (maskrt infer)", ["infer", "--model", str(out / "model.onnx"),
                                     "--source", str(data / "val"), "--save", str(out / "overlays"),
                                     "--max-frames", "8"]),
    ]
    for name, argv in steps:
        if not log.run(name, argv):
            break
    report = _write_report(out, log, args.minutes)
    print(f"\nmaskrt demo: report written to {report}")
    if log.stopped:
        raise MaskrtError(f"demo stopped at {log.stopped}; partial report in {report}")
    return 0

