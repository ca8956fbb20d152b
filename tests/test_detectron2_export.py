"""A synthesised detectron2 checkpoint, converted by `from_detectron2`, exported to ONNX and run
by the torch-free runtime (ONNX Runtime) gives the PyTorch model's detections: every detection,
boxes to 1e-2 px, scores to 1e-4, labels equal, and pasted masks (detectron2's paste rule,
carried in the graph's metadata) identical but for pixels whose probability is within 1e-3 of
0.5. Both graph targets: "onnx" (standard ops) and "tensorrt" (the MultilevelRoIAlign node, run
by ONNX Runtime through the CPU twin).

The checkpoint's weights are random at detectron2's key names and shapes (test_convert.py
writes them from detectron2's source), with spread class logits (no class dominates) and
confident mask logits, as a trained model's are.
"""
from __future__ import annotations

import pickle
from collections import OrderedDict

import cv2
import numpy as np
import pytest
import torch

from maskrt.model.convert import from_detectron2
from maskrt.runtime import Predictor
from maskrt.runtime.commands import synthetic_shapes_image
from test_convert import DOG, detectron2_arrays

pytestmark = pytest.mark.slow  # one R50-FPN export per target, ~1 min each on 2 shared cores
SIZE = 256


@pytest.fixture(scope="module")
def d2_model(tmp_path_factory):
    arrays = detectron2_arrays(seed=5)
    rng = np.random.default_rng(5)
    # Spread class logits instead of test_convert's dominant "dog" bias.
    arrays["roi_heads.box_predictor.cls_score.bias"] = rng.normal(0, 3, arrays["roi_heads.box_predictor.cls_score.bias"].shape).astype(np.float32)
    arrays["roi_heads.box_predictor.cls_score.bias"][80] = 0.0  # background
    assert arrays["roi_heads.box_predictor.cls_score.bias"][DOG] < 25
    arrays["roi_heads.box_predictor.cls_score.weight"] *= np.float32(3.0)
    # Confident masks: mask logits of tens, few pixels near probability 0.5.
    arrays["roi_heads.mask_head.predictor.weight"] *= np.float32(20.0)
    path = tmp_path_factory.mktemp("d2export") / "model_final.pkl"
    with path.open("wb") as file:
        pickle.dump({"model": OrderedDict(arrays), "__author__": "Detectron2 Model Zoo"}, file, protocol=4)
    # A SIZE x SIZE image is not resized (min = max = SIZE); fewer proposals keep it quick.
    model = from_detectron2(path, min_size=SIZE, max_size=SIZE, rpn_pre_nms_top_n_test=300,
                            rpn_post_nms_top_n_test=200, box_detections_per_img=40, box_score_thresh=0.02)
    return model


def assert_same_detections(ours, expected: dict) -> None:
    """The runtime's detections are the PyTorch model's: labels equal, boxes < 1e-2 px, scores
    < 1e-4, masks equal but for pixels whose probability is within 1e-3 of 0.5."""
    assert np.array_equal(ours.labels, expected["labels"].numpy())
    assert np.abs(ours.boxes - expected["boxes"].numpy()).max() < 1e-2
    np.testing.assert_allclose(ours.scores, expected["scores"].numpy(), rtol=0, atol=1e-4)
    probabilities = expected["masks"][:, 0].numpy()
    differ = ours.masks != (probabilities >= 0.5)
    assert np.all(np.abs(probabilities[differ] - 0.5) < 1e-3), f"{differ.sum()} pixels differ"
    assert ours.masks.sum() > 1000


@pytest.mark.parametrize("target", ["onnx", "tensorrt"])
def test_runtime_gives_the_pytorch_models_detections(d2_model, target: str, tmp_path) -> None:
    from maskrt.export.onnx_export import export_onnx

    try:
        path = export_onnx(d2_model, tmp_path / f"d2_{target}.onnx", input_size=(SIZE, SIZE), target=target)
        predictor = Predictor(path, backend="onnxruntime", conf=0.0)
    except Exception as error:  # the tensorrt target needs the CPU twin, built with a C++ compiler
        if target == "tensorrt" and "MultilevelRoIAlign" in str(error):
            pytest.skip(f"ONNX Runtime cannot run the plugin node here: {error}")
        raise
    assert predictor.info.paste_rule == "detectron2"
    if target == "tensorrt":
        # detectron2's level rule reaches the plugin through the contract's own canonical_scale.
        import onnx

        nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MultilevelRoIAlign"]
        scales = [a.f for n in nodes for a in n.attribute if a.name == "canonical_scale"]
        assert len(nodes) == 2 and scales == [pytest.approx(224.0 * 2 ** 1e-6, rel=1e-7)] * 2
        assert scales[0] != 224.0

    image = synthetic_shapes_image(SIZE, SIZE, seed=7)
    rgb = torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
        expected = d2_model([rgb])[0]
    ours = predictor(image)

    count = len(expected["scores"])
    assert count >= 10 and len(ours) == count
    assert len(set(expected["labels"].tolist())) >= 2  # not one dominant label
    assert_same_detections(ours, expected)


# --- an image that does not fill the model input, through the runtime's own preprocessing ----
# detectron2's DefaultPredictor on a 427x640 photo with ResizeShortestEdge(240, 400): 240x360
# (int(359.7 + 0.5)), padded to 256x384 in its ImageList; the graph's input is that padded size,
# so the runtime's input is the batch the PyTorch model builds, and the 16 rows and 24 columns
# of padding are where the clipping to the image (not the input) shows.
SHORT, LONG, INPUT = 240, 400, (256, 384)


@pytest.fixture(scope="module")
def d2_model_240(d2_model):
    import copy

    model = copy.deepcopy(d2_model)
    model.min_size, model.max_size = (SHORT,), LONG
    return model


@pytest.mark.parametrize("target", ["onnx", "tensorrt"])
def test_runtime_gives_the_pytorch_models_detections_on_an_image_that_does_not_fill_the_input(
        d2_model_240, target: str, tmp_path) -> None:
    from maskrt.export.onnx_export import export_onnx
    from maskrt.model.transform import resize_image

    try:
        path = export_onnx(d2_model_240, tmp_path / f"d2_{target}.onnx", input_size=INPUT, target=target)
        predictor = Predictor(path, backend="onnxruntime", conf=0.0)
    except Exception as error:  # the tensorrt target needs the CPU twin, built with a C++ compiler
        if target == "tensorrt" and "MultilevelRoIAlign" in str(error):
            pytest.skip(f"ONNX Runtime cannot run the plugin node here: {error}")
        raise
    assert (predictor.info.resize_rule, predictor.info.min_size, predictor.info.max_size) == ("detectron2", SHORT, LONG)

    image = synthetic_shapes_image(427, 640, seed=11)
    rgb = torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 255.0
    inputs, placements = predictor.preprocess([image])
    assert placements[0].resized_size == (240, 360)
    # The runtime's input is the model's own resized image (PIL's pixels both), padded with the mean.
    resized = resize_image(rgb, SHORT, LONG, "detectron2")
    np.testing.assert_array_equal(inputs[0, :, :240, :360], resized.numpy())
    np.testing.assert_array_equal(inputs[0, :, 240:, :], np.broadcast_to(
        np.float32(d2_model_240.image_mean).reshape(3, 1, 1), (3, 16, 384)))
    with torch.no_grad():
        expected = d2_model_240([rgb])[0]
    ours = predictor(image)

    count = len(expected["scores"])
    assert count >= 10 and len(ours) == count
    # Boxes reach the image's edge (x = 640 or y = 427): clipped where the padding starts.
    assert (expected["boxes"][:, 2] == 640).any() or (expected["boxes"][:, 3] == 427).any()
    assert_same_detections(ours, expected)
