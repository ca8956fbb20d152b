"""RoIAlign vs RoIPool (`maskrt ablate`, `bench/ablation.py`): the paper's Table 2c in kind.

The same model (edge preset) is trained twice with the same seed, data order and budget,
once with `--roi-op align` and once with `--roi-op pool`, then both are COCO-evaluated on
the validation split. The mask AP / AP50 / AP75 table goes to OUT/report.md (and the
numbers to OUT/report.json). RoIPool's quantisation should cost more at AP75 than at AP50.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from maskrt.train.coco import CocoDataset
from maskrt.train.evaluate import evaluate_dataset, torch_predict_fn, write_json
from maskrt.train.synthetic import write_dataset
from maskrt.train.trainer import TrainConfig, train

ROI_OPS = ("align", "pool")


def run_ablation(data: str | None, minutes: float, out: str | Path, seed: int = 0, preset: str = "edge",
                 epochs: float | None = None, progress: bool = True,
                 model_overrides: dict[str, Any] | None = None, device: str = "auto") -> Path:
    """Train and evaluate both RoI ops; return the path of the markdown report.

    `data` None generates a synthetic set in OUT/data. `epochs`, when given, replaces the
    time budget (used by tests for a step-exact comparison).
    """
    out = Path(out)
    if data is None:
        data_dir = out / "data"
        if not (data_dir / "annotations" / "instances_val.json").is_file():
            write_dataset(data_dir, train=400, val=60, size=256, seed=seed + 1000)
        data = str(data_dir)
    rows: dict[str, dict[str, Any]] = {}
    for roi_op in ROI_OPS:
        config = TrainConfig(data=data, out=str(out / roi_op), preset=preset, roi_op=roi_op, seed=seed,
                             minutes=None if epochs else minutes, epochs=epochs, progress=progress,
                             model_overrides=dict(model_overrides or {}), device=device)
        summary = train(config)
        from maskrt.model import load_model

        model = load_model(summary["weights"], device=summary["device"])
        metrics, _ = evaluate_dataset(CocoDataset(data, "val"), torch_predict_fn(model))
        rows[roi_op] = {"metrics": metrics, "steps": summary["step"], "minutes": summary["elapsed_s"] / 60}
    report = out / "report.md"
    lines = [
        "# RoIAlign vs RoIPool (maskrt ablate)", "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; preset `{preset}`, seed {seed}, "
        f"data `{data}` (val split), budget " + (f"{epochs:g} epochs" if epochs else f"{minutes:g} min") + " each.",
        "", "| RoI op | mask AP | mask AP50 | mask AP75 | box AP | steps | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for roi_op, row in rows.items():
        m = row["metrics"]
        lines.append(f"| {roi_op} | {100 * m['segm/AP']:.1f} | {100 * m['segm/AP50']:.1f} | {100 * m['segm/AP75']:.1f} "
                     f"| {100 * m['bbox/AP']:.1f} | {row['steps']} | {row['minutes']:.1f} |")
    align, pool = rows["align"]["metrics"], rows["pool"]["metrics"]
    lines += ["", f"align - pool: mask AP {100 * (align['segm/AP'] - pool['segm/AP']):+.1f}, "
                  f"AP50 {100 * (align['segm/AP50'] - pool['segm/AP50']):+.1f}, "
                  f"AP75 {100 * (align['segm/AP75'] - pool['segm/AP75']):+.1f} (points).", ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines))
    write_json(out / "report.json", {"preset": preset, "seed": seed, "data": data, "minutes": minutes,
                                     "epochs": epochs, "rows": rows})
    return report
