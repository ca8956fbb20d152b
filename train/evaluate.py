"""COCO bbox and segm AP through pycocotools' COCOeval.

Detections of any source (the PyTorch model's dicts of tensors, the runtime's numpy
Detections) become COCO results: `bbox` [x, y, w, h] and `segmentation` compressed RLE in
the ORIGINAL image's pixels, `category_id` through the dataset's `category_ids[label]`.
`evaluate_results` runs COCOeval for both IoU types and returns a flat dict of floats
(`bbox/AP`, `bbox/AP50`, `bbox/AP75`, `segm/AP`, ...); `format_table` prints them.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrt.train.coco import CocoDataset

# COCOeval.stats order (for bbox and segm alike).
STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")


def detections_to_results(image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                          masks: np.ndarray | None, category_ids: list[int], mask_threshold: float = 0.5) -> list[dict]:
    """COCO result entries of one image's detections.

    boxes [N,4] xyxy, scores [N], labels [N] in 1..K, masks [N,H,W] (bool, or probabilities
    thresholded: probability > `mask_threshold`, as torchvision and the runtime) or [N,1,H,W]
    or None, all in the image's own pixels.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if masks is not None:
        masks = np.asarray(masks)
        if masks.ndim == 4:
            masks = masks[:, 0]
        if masks.dtype != bool:
            masks = masks > mask_threshold if masks.dtype.kind == "f" else masks.astype(bool)
    results = []
    for i in range(boxes.shape[0]):
        x1, y1, x2, y2 = boxes[i]
        entry: dict[str, Any] = {
            "image_id": int(image_id), "category_id": int(category_ids[int(labels[i])]),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(scores[i]),
        }
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            entry["segmentation"] = rle
        results.append(entry)
    return results


def _results_for(iou_type: str, results: list[dict]) -> list[dict]:
    """Copies of the results holding only what COCOeval reads for `iou_type` (so loadRes
    takes a segm result's area from its mask, not from its box)."""
    if iou_type == "bbox":
        return [{k: r[k] for k in ("image_id", "category_id", "bbox", "score")} for r in results]
    return [{k: r[k] for k in ("image_id", "category_id", "segmentation", "score")} for r in results
            if "segmentation" in r]


def evaluate_results(coco_gt: COCO, results: list[dict], image_ids: Iterable[int] | None = None,
                     iou_types: Iterable[str] = IOU_TYPES) -> dict[str, float]:
    """COCOeval over `image_ids` (default: all of the GT's images) for each IoU type.

    Returns {"bbox/AP": ..., "segm/AP75": ..., ...} with COCOeval's numbers (0.0 where there
    are no results; -1 where the GT has no instance of that kind, as COCOeval reports).
    """
    image_ids = sorted(coco_gt.getImgIds() if image_ids is None else image_ids)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        typed = _results_for(iou_type, results)
        if not typed or not image_ids:
            metrics.update({f"{iou_type}/{name}": 0.0 for name in STAT_NAMES})
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco_dt = coco_gt.loadRes(typed)
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        metrics.update({f"{iou_type}/{name}": float(v) for name, v in zip(STAT_NAMES, evaluator.stats)})
    return metrics


def format_table(metrics: dict[str, float], columns: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")) -> str:
    """A small text table: one row per IoU type, AP columns in percent."""
    def cell(value: float) -> str:
        # COCOeval reports -1 where the ground truth has no object of that size.
        return f"{'-':>8s}" if value < 0 else f"{100 * value:8.1f}"

    rows = [f"{'':6s}" + "".join(f"{c:>8s}" for c in columns)]
    for iou_type in IOU_TYPES:
        if f"{iou_type}/AP" in metrics:
            rows.append(f"{iou_type:6s}" + "".join(cell(metrics[f"{iou_type}/{c}"]) for c in columns))
    return "\n".join(rows)


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


# A predictor takes a BGR uint8 [H,W,3] image and returns (boxes [N,4] xyxy, scores [N],
# labels [N], masks [N,H,W] bool or probabilities) as numpy, in that image's pixels.
PredictFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def torch_predict_fn(model: Any) -> PredictFn:
    """Wrap a maskrt MaskRCNN (eval mode, no grad) as a PredictFn."""
    import torch

    model.eval()

    device = next(model.parameters()).device

    def predict(image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # The one BGR uint8 -> RGB float [0,1] CHW conversion of the training side (on the
        # model's device: the uint8 frame is what crosses to a GPU).
        frame = torch.from_numpy(np.ascontiguousarray(image_bgr[:, :, ::-1])).to(device)
        tensor = frame.permute(2, 0, 1).float().div_(255)
        with torch.no_grad():
            out = model([tensor])[0]
        return tuple(out[key].cpu().numpy() for key in ("boxes", "scores", "labels", "masks"))

    return predict


def runtime_predict_fn(predictor: Any) -> PredictFn:
    """Wrap a `maskrt.runtime.Predictor` (torch-free) as a PredictFn.

    Its call returns Detections with numpy `boxes`, `scores`, `labels`, `masks` (bool [N,H,W]).
    """
    def predict(image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        dets = predictor(image_bgr)
        return (np.asarray(dets.boxes), np.asarray(dets.scores), np.asarray(dets.labels), np.asarray(dets.masks))

    return predict


def predict_dataset(dataset: CocoDataset, predict: PredictFn, category_ids: list[int] | None = None,
                    progress: bool = False) -> tuple[list[dict], list[int]]:
    """Run `predict` over every decodable image of `dataset`.

    Returns (COCO results, ids of the images evaluated). Undecodable images are skipped
    and reported once with their count.
    """
    category_ids = dataset.category_ids if category_ids is None else category_ids
    results: list[dict] = []
    evaluated: list[int] = []
    indices: Iterable[int] = range(len(dataset))
    if progress:
        from tqdm import tqdm

        from maskrt.progress import progress_options
        indices = tqdm(indices, desc="eval", unit="img", leave=False, **progress_options())
    for index in indices:
        image = dataset.load_image(index)
        if image is None:
            continue
        boxes, scores, labels, masks = predict(image)
        results.extend(detections_to_results(dataset.image_ids[index], boxes, scores, labels, masks, category_ids))
        evaluated.append(dataset.image_ids[index])
    dataset.warn_skipped()
    return results, evaluated


def evaluate_dataset(dataset: CocoDataset, predict: PredictFn, category_ids: list[int] | None = None,
                     progress: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Predict every image of `dataset` and COCO-evaluate: returns (metrics, results)."""
    results, evaluated = predict_dataset(dataset, predict, category_ids, progress)
    if not evaluated:
        print("maskrt: warning: no image could be evaluated", file=sys.stderr)
    return evaluate_results(dataset.coco, results, evaluated), results
