"""The torch-free runtime against the PyTorch model it was exported from (one seeded, untrained
"edge" model at 128x128: its ~0.3 scores still fill all 30 detection slots with real masks).

- An image whose letterbox fills the input (64x64 -> 128x128) gives the same detections as the
  eager model `model([image])`.
- Any image: the same as `detect_batch` on the model's own resize + pad, then torchvision's
  box undo, clipping and mask pasting (maskrt.model.transform), which is what eager does
  except that eager also clips boxes to the unpadded size *before* NMS, a step the graph
  (which sees only the padded input) cannot take.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("maskrt.export.onnx_export")

import cv2  # noqa: E402

from maskrt.runtime import Predictor  # noqa: E402
from maskrt.runtime.commands import synthetic_shapes_image  # noqa: E402
from test_runtime_fakes import CLASS_NAMES, mask_iou  # noqa: E402

pytestmark = pytest.mark.slow  # one ONNX export, about 35 s on this machine
SIZE = 128


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from maskrt.export.onnx_export import export_onnx
    from maskrt.model import build_model

    torch.manual_seed(0)
    model = build_model("edge", num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES, min_size=SIZE, max_size=SIZE,
                        box_detections_per_img=30)
    model.eval()
    folder = tmp_path_factory.mktemp("parity")
    path = export_onnx(model, folder / "edge.onnx", input_size=(SIZE, SIZE))
    return model, Predictor(path, backend="onnxruntime", conf=0.0)


@pytest.fixture(scope="module")
def saved_weights(exported, tmp_path_factory):
    from maskrt.model import save_model

    path = tmp_path_factory.mktemp("weights") / "edge.safetensors"
    save_model(exported[0], path)
    return path


def _rgb_tensor(bgr: np.ndarray):
    return torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float() / 255.0


def test_metadata_reaches_the_runtime(exported):
    _, predictor = exported
    assert predictor.input_size == (SIZE, SIZE)
    assert predictor.class_names == tuple(CLASS_NAMES)


@pytest.mark.parametrize("side", [64, SIZE])
def test_runtime_equals_eager_model_when_the_image_fills_the_input(exported, side):
    model, predictor = exported
    image = synthetic_shapes_image(side, side, seed=side)
    ours = predictor(image)
    with torch.no_grad():
        theirs = model([_rgb_tensor(image)])[0]
    assert len(ours) == len(theirs["scores"]) > 10
    assert np.abs(ours.boxes - theirs["boxes"].numpy()).max() < 1e-2
    np.testing.assert_allclose(ours.scores, theirs["scores"].numpy(), atol=1e-4)
    assert np.array_equal(ours.labels, theirs["labels"].numpy())
    eager_masks = theirs["masks"][:, 0].numpy() > 0.5
    ious = [mask_iou(a, b) for a, b in zip(ours.masks, eager_masks)]
    assert min(ious) > 0.99 and ours.masks.sum() > 100


def test_runtime_batch_equals_model_forward_on_letterboxed_images(exported):
    from maskrt.model.transform import batch_images, postprocess, resize_image

    model, predictor = exported
    images = [synthetic_shapes_image(100, 150, seed=1), synthetic_shapes_image(300, 200, seed=2)]
    resized = [resize_image(_rgb_tensor(image), SIZE, SIZE) for image in images]
    batch = batch_images(resized, model.image_mean, SIZE)
    inputs, placements = predictor.preprocess(images)
    # Our cv2 letterbox is the model's own resize + pad.
    np.testing.assert_allclose(inputs, batch.numpy(), atol=1e-5)
    assert [p.resized_size for p in placements] == [tuple(r.shape[1:]) for r in resized]
    with torch.no_grad():
        num_dets, boxes, scores, labels, masks = model.detect_batch(batch)
    for index, (ours, image, small) in enumerate(zip(predictor.batch(images), images, resized)):
        count = int(num_dets[index])
        height, width = small.shape[1:]
        # Clip to the unpadded content before going back, as torchvision's postprocess does.
        clipped = boxes[index, :count].clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
        expected_boxes, expected_masks = postprocess(clipped, masks[index, :count], (height, width), image.shape[:2])
        assert len(ours) == count > 10
        assert np.abs(ours.boxes - expected_boxes.numpy()).max() < 1e-2
        np.testing.assert_allclose(ours.scores, scores[index, :count].numpy(), atol=1e-4)
        assert np.array_equal(ours.labels, labels[index, :count].numpy())
        ious = [mask_iou(a, b) for a, b in zip(ours.masks, expected_masks[:, 0].numpy() > 0.5)]
        assert min(ious) > 0.99


def test_bench_against_eager_times_both_in_one_run(exported, saved_weights, tmp_path, capsys):
    import json

    from maskrt.cli import main
    _, predictor = exported
    out = tmp_path / "bench.json"
    model_path = predictor.backend.path
    assert main(["bench", "--model", str(model_path), "--iters", "2", "--warmup", "0", "--json", str(out),
                 "--against-eager", str(saved_weights)]) == 0
    report = json.loads(out.read_text())
    assert report["eager_ms"]["p50"] > 0 and report["detections"] > 10
    assert report["speedup_vs_eager"] == pytest.approx(report["eager_ms"]["p50"] / report["total_ms"]["p50"])
    assert "eager torch" in capsys.readouterr().out


def test_runtime_equals_eager_model_when_the_image_does_not_fill_the_input(exported):
    """110x120 -> 117x128 in the 128x128 input: eager pads it to 128x128 too, and clips boxes
    to 117x128 (torchvision's transform keeps the sizes before padding); the graph now reads
    that size from the padding and clips the same (it clipped to 128x128 before)."""
    model, predictor = exported
    image = synthetic_shapes_image(110, 120, seed=2)
    ours = predictor(image)
    with torch.no_grad():
        theirs = model([_rgb_tensor(image)])[0]
    assert predictor.preprocess([image])[1][0].resized_size == (117, 128)
    assert len(ours) == len(theirs["scores"]) > 10
    assert (theirs["boxes"][:, 3] == 110).sum() >= 3  # boxes reaching the bottom edge: clipped there
    assert np.abs(ours.boxes - theirs["boxes"].numpy()).max() < 1e-2
    np.testing.assert_allclose(ours.scores, theirs["scores"].numpy(), atol=1e-4)
    assert np.array_equal(ours.labels, theirs["labels"].numpy())
    eager_masks = theirs["masks"][:, 0].numpy() > 0.5
    ious = [mask_iou(a, b) for a, b in zip(ours.masks, eager_masks)]
    assert min(ious) > 0.99 and ours.masks.sum() > 100
