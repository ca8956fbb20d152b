"""The CLI verbs of the training side: `maskrt data synth`, `train`, `eval`, `predict`, `ablate`.

Each function takes the argparse Namespace that `maskrt/cli.py` declares and returns the
exit status; user mistakes raise MaskrtError.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from maskrt.errors import MaskrtError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def data_synth_command(args: argparse.Namespace) -> int:
    """`maskrt data synth --out DIR --train N --val M --size S [--seed]`."""
    from maskrt.train.synthetic import write_dataset

    root = write_dataset(args.out, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} train + {args.val} val images ({args.size}x{args.size}) to {root}")
    return 0


def load_weights(path: str | Path, device: str = "cpu"):
    """A maskrt MaskRCNN from a .safetensors file on `device` (auto | cpu | cuda | cuda:N),
    with a one-line error if it is missing or the device is absent."""
    from maskrt.model import load_model, resolve_device

    resolved = resolve_device(device)  # a missing GPU is reported before any file is read
    if not Path(path).is_file():
        raise MaskrtError(f"weights file not found: {path}")
    return load_model(path, device=resolved)


def _category_ids_for(class_names: list[str], category_ids: list[int] | None, dataset) -> list[int]:
    """The dataset's COCO category id for each model label.

    Matched by class name when every model class is a dataset category (robust to datasets
    that number the same classes differently); otherwise the model's own category_ids, if
    the dataset has them all. Anything else is a one-line error.
    """
    by_name = dict(zip(dataset.class_names[1:], dataset.category_ids[1:]))
    if all(name in by_name for name in class_names[1:]):
        return [0, *(by_name[name] for name in class_names[1:])]
    if category_ids and len(category_ids) == len(class_names) and set(category_ids[1:]) <= set(by_name.values()):
        return list(category_ids)
    missing = [name for name in class_names[1:] if name not in by_name]
    raise MaskrtError(f"model classes {missing[:5]} are not categories of {dataset.annotation_file}")


def eval_command(args: argparse.Namespace) -> int:
    """`maskrt eval --weights W | --model FILE.onnx --data DIR [--split val] [--out JSON]`."""
    from maskrt.train.coco import CocoDataset
    from maskrt.train.evaluate import evaluate_dataset, format_table, runtime_predict_fn, torch_predict_fn, write_json

    dataset = CocoDataset(args.data, args.split)
    if args.weights:
        model = load_weights(args.weights, args.device)
        predict = torch_predict_fn(model)
        category_ids = _category_ids_for(list(model.class_names), getattr(model, "category_ids", None), dataset)
        source = Path(args.weights)
    else:
        if not Path(args.model).is_file():
            raise MaskrtError(f"model file not found: {args.model}")
        from maskrt.runtime import Predictor

        predictor = Predictor(args.model, conf=0.0)  # evaluation wants every kept detection
        predict = runtime_predict_fn(predictor)
        ids = predictor.metadata.get("category_ids")
        category_ids = _category_ids_for(list(predictor.class_names), json.loads(ids) if ids else None, dataset)
        source = Path(args.model)
    metrics, results = evaluate_dataset(dataset, predict, category_ids, progress=sys.stderr.isatty())
    print(format_table(metrics))
    out = Path(args.out) if args.out else source.with_name(source.stem + f"_eval_{args.split}.json")
    write_json(out, {"source": str(source), "data": str(args.data), "split": args.split,
                     "images": len(dataset) - len(dataset.skipped), "metrics": metrics})
    print(f"metrics written to {out}")
    return 0


def _image_files(inputs: list[str]) -> list[Path]:
    """Image paths from files and folders (folders: their images, sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise MaskrtError(f"image or folder not found: {item}")
    if not files:
        raise MaskrtError(f"no images found in {' '.join(inputs)}")
    return files


def predict_command(args: argparse.Namespace) -> int:
    """`maskrt predict --weights W IMAGES... --out DIR [--conf]`: overlay PNGs + COCO results JSON."""
    from maskrt.runtime.draw import draw_detections
    from maskrt.runtime.predictor import Detections
    from maskrt.train.evaluate import detections_to_results, torch_predict_fn, write_json

    model = load_weights(args.weights, args.device)
    predict = torch_predict_fn(model)
    class_names = tuple(model.class_names)
    category_ids = list(getattr(model, "category_ids", None) or range(len(class_names)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, skipped = [], 0
    for image_id, path in enumerate(_image_files(args.images), start=1):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            skipped += 1
            continue
        boxes, scores, labels, masks = predict(image)
        keep = scores >= args.conf
        dets = Detections(boxes=boxes[keep].astype(np.float32), scores=scores[keep].astype(np.float32),
                          labels=labels[keep].astype(np.int64), masks=masks[keep][:, 0] > 0.5,
                          class_names=class_names)
        cv2.imwrite(str(out / f"{path.stem}.png"), draw_detections(image, dets))
        for entry in detections_to_results(image_id, dets.boxes, dets.scores, dets.labels, dets.masks, category_ids):
            entry["file_name"] = path.name
            results.append(entry)
    if skipped:
        print(f"maskrt: warning: skipped {skipped} image(s) that could not be decoded", file=sys.stderr)
    write_json(out / "results.json", results)
    print(f"{len(results)} detections; overlays and results.json in {out}")
    return 0


def train_command(args: argparse.Namespace) -> int:
    """`maskrt train ...`: see maskrt.train.trainer.train."""
    from maskrt.train.trainer import TrainConfig, train

    config = TrainConfig.from_args(args)
    summary = train(config)
    if summary["rank"] == 0:  # under torchrun, rank 0 alone reports
        print(f"trained {summary['step']} steps in {summary['elapsed_s'] / 60:.1f} min; weights: {summary['weights']}")
    return 0


def ablate_command(args: argparse.Namespace) -> int:
    """`maskrt ablate [--data DIR] [--minutes M] [--out DIR] [--seed S]`: RoIAlign vs RoIPool."""
    from maskrt.train.ablation import run_ablation

    report = run_ablation(data=args.data, minutes=args.minutes, out=args.out, seed=args.seed, device=args.device)
    print(report.read_text())
    return 0
