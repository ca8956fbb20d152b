"""COCO evaluation through pycocotools: the ground truth scores AP 1.0, a shifted copy scores
what the IoU thresholds say, category ids go through category_ids, and `maskrt eval` runs
on an ONNX model through the runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskrt.train.coco import CocoDataset
from maskrt.train.evaluate import (detections_to_results, evaluate_dataset, evaluate_results, format_table)
from maskrt.train.synthetic import write_dataset


@pytest.fixture(scope="module")
def val_set(tmp_path_factory) -> CocoDataset:
    root = tmp_path_factory.mktemp("evalset")
    write_dataset(root, train=0, val=5, size=96, seed=7)
    return CocoDataset(root, "val")


def ground_truth_as_detections(dataset: CocoDataset, shift: int = 0):
    """A PredictFn answering each image with its own ground truth, moved `shift` px right."""
    by_id = {}
    for index in range(len(dataset)):
        sample = dataset[index]
        masks = np.roll(sample.masks.astype(bool), shift, axis=2)
        if shift:
            masks[:, :, :shift] = False
        boxes = sample.boxes + np.array([shift, 0, shift, 0], np.float32)
        by_id[sample.image.tobytes()] = (boxes, np.linspace(0.9, 0.5, len(boxes)), sample.labels, masks)
    return lambda image: by_id[image.tobytes()]


def test_ground_truth_scores_ap_one(val_set):
    metrics, results = evaluate_dataset(val_set, ground_truth_as_detections(val_set))
    assert len(results) == sum(len(val_set.coco.imgToAnns[i]) for i in val_set.image_ids)
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}/AP"] == pytest.approx(1.0)
        assert metrics[f"{iou_type}/AP50"] == pytest.approx(1.0)
        assert metrics[f"{iou_type}/AP75"] == pytest.approx(1.0)
    assert "segm" in format_table(metrics)


def test_shifted_predictions_score_less(val_set):
    metrics, _ = evaluate_dataset(val_set, ground_truth_as_detections(val_set, shift=3))
    for iou_type in ("bbox", "segm"):
        assert 0.05 < metrics[f"{iou_type}/AP"] < 0.95
        assert metrics[f"{iou_type}/AP50"] >= metrics[f"{iou_type}/AP75"]
        assert metrics[f"{iou_type}/AP"] <= metrics[f"{iou_type}/AP50"]


def _one_square_gt(category_id: int = 42):
    from pycocotools.coco import COCO

    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 1  # 100 px, box [10,10,10,10]
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": 64, "height": 64, "file_name": "x.png"}],
                    "categories": [{"id": category_id, "name": "square"}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": category_id, "segmentation": rle,
                                     "area": 100.0, "bbox": [10, 10, 10, 10], "iscrowd": 0}]}
    coco.createIndex()
    return coco, mask


def test_ap_of_a_known_iou_is_the_fraction_of_thresholds_it_passes():
    # One object, one detection shifted 2 px: IoU = 80 / 120 = 0.667. COCO's thresholds are
    # 0.50, 0.55, ..., 0.95; it passes 0.50..0.65 (4 of 10), each with precision 1: AP = 0.4.
    coco, mask = _one_square_gt()
    shifted = np.roll(mask, 2, axis=1).astype(bool)
    results = detections_to_results(1, np.array([[12, 10, 22, 20]]), np.array([0.9]), np.array([1]),
                                    shifted[None], category_ids=[0, 42])
    assert results[0]["category_id"] == 42 and results[0]["bbox"] == [12.0, 10.0, 10.0, 10.0]
    metrics = evaluate_results(coco, results)
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}/AP"] == pytest.approx(0.4)
        assert metrics[f"{iou_type}/AP50"] == pytest.approx(1.0)
        assert metrics[f"{iou_type}/AP75"] == pytest.approx(0.0)


def test_probability_masks_are_thresholded_and_wrong_category_scores_zero():
    coco, mask = _one_square_gt()
    probabilities = mask[None, None].astype(np.float32) * 0.8 + 0.1  # [1,1,H,W], 0.9 inside, 0.1 out
    right = detections_to_results(1, np.array([[10, 10, 20, 20]]), np.array([0.9]), np.array([1]), probabilities,
                                  category_ids=[0, 42])
    assert evaluate_results(coco, right)["segm/AP"] == pytest.approx(1.0)
    wrong = detections_to_results(1, np.array([[10, 10, 20, 20]]), np.array([0.9]), np.array([1]), probabilities,
                                  category_ids=[0, 7])
    coco.dataset["categories"].append({"id": 7, "name": "other"})
    coco.createIndex()
    assert evaluate_results(coco, wrong)["segm/AP"] <= 0.0
    assert evaluate_results(coco, [])["bbox/AP"] == 0.0


def test_eval_cli_errors_are_one_line(tmp_path, capsys):
    from maskrt.cli import main

    write_dataset(tmp_path / "d", train=0, val=1, size=64, seed=0)
    assert main(["eval", "--weights", str(tmp_path / "missing.safetensors"), "--data", str(tmp_path / "d")]) == 2
    assert main(["eval", "--model", str(tmp_path / "missing.onnx"), "--data", str(tmp_path / "d")]) == 2
    assert main(["eval", "--model", str(tmp_path / "missing.onnx"), "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("maskrt: error: ") for line in err)
    assert "not found" in err[0] and "not found" in err[2]


def test_runtime_detections_path_scores_ap_one(val_set):
    """The torch-free path: a Predictor-like object returning runtime Detections (bool masks)."""
    from maskrt.runtime.predictor import Detections
    from maskrt.train.evaluate import runtime_predict_fn

    truth = ground_truth_as_detections(val_set)

    class GroundTruthPredictor:
        def __call__(self, image):
            boxes, scores, labels, masks = truth(image)
            return Detections(boxes=boxes, scores=scores.astype(np.float32), labels=labels, masks=masks,
                              class_names=tuple(val_set.class_names))

    metrics, _ = evaluate_dataset(val_set, runtime_predict_fn(GroundTruthPredictor()))
    assert metrics["segm/AP"] == pytest.approx(1.0) and metrics["bbox/AP"] == pytest.approx(1.0)


def test_model_labels_map_to_dataset_category_ids_by_name(val_set):
    from maskrt.errors import MaskrtError
    from maskrt.train.commands import _category_ids_for

    names = list(val_set.class_names)  # ids 1..6 in the synthetic set
    # Same classes in another order and with other ids in the model: mapped by name.
    model_names = ["__background__", names[3], names[1]]
    assert _category_ids_for(model_names, [0, 50, 60], val_set) == [0, 3, 1]
    # Unknown names but ids the dataset has: the model's ids.
    assert _category_ids_for(["__background__", "x", "y"], [0, 2, 5], val_set) == [0, 2, 5]
    with pytest.raises(MaskrtError, match="not categories"):
        _category_ids_for(["__background__", "zebra"], [0, 99], val_set)
