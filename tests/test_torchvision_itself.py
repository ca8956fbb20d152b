"""maskrt against torchvision itself, where an environment with torchvision exists.

torchvision does not load beside torch 2.13; `make torchvision-env` builds one (.tvenv, torch
2.14.1 + torchvision 0.29.1) and bench/torchvision_worker.py runs in it. These tests drive that
worker (or the interpreter named by MASKRT_TORCHVISION_PYTHON) and hold maskrt's RoIAlign,
its gradient and the converted Mask R-CNN to torchvision's own numbers. Without such an
environment (CI) they skip and say why; the NumPy references in test_ops_roi_align.py hold the
same semantics everywhere.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrt.model.ops import multilevel_roi_align, roi_align

ROOT = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("MASKRT_TORCHVISION_PYTHON") or str(ROOT / ".tvenv" / "bin" / "python")
if not Path(PYTHON).is_file():
    pytest.skip(f"no torchvision environment ({PYTHON}; `make torchvision-env` builds one)", allow_module_level=True)

spec = importlib.util.spec_from_file_location("torchvision_client", ROOT / "bench" / "torchvision_client.py")
torchvision_client = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torchvision_client)


@pytest.fixture(scope="module")
def worker():
    running = torchvision_client.TorchvisionWorker(PYTHON, threads=1)
    yield running
    running.close()


def _case(worker, tmp_path: Path, arrays: dict, backward: bool = True) -> dict:
    """torchvision's forward output and (with backward) map gradients for one RoIAlign case."""
    np.savez(tmp_path / "case.npz", **arrays)
    worker.ask({"op": "roi_setup", "inputs": str(tmp_path / "case.npz"), "out": str(tmp_path / "out.npz")})
    result = dict(np.load(tmp_path / "out.npz"))
    if backward:
        worker.ask({"op": "roi_run", "backward": True, "clock": "wall", "out": str(tmp_path / "grad.npz")})
        result.update(np.load(tmp_path / "grad.npz"))
    return result


@pytest.mark.parametrize("sampling", [2, 0])
def test_roi_align_and_its_gradient_equal_torchvisions(worker, tmp_path, sampling):
    """Single map: float32 forward and gradient (native kernels here) equal torchvision.ops.roi_align's."""
    rng = np.random.default_rng(3)
    feature = rng.standard_normal((2, 16, 40, 56)).astype(np.float32)
    side = np.exp(rng.uniform(np.log(2), np.log(200), size=(60, 2)))
    xy = rng.uniform(-20, 220, size=(60, 2))
    rois = np.concatenate([rng.integers(0, 2, size=(60, 1)), xy, xy + side], axis=1).astype(np.float32)
    rois[0, 1:] = [150.0, 120.0, 30.0, 20.0]  # inverted
    grad = rng.standard_normal((60, 16, 7, 7)).astype(np.float32)
    theirs = _case(worker, tmp_path, {"kind": "single", "levels": 1, "feature0": feature, "rois": rois, "scale": 0.25,
                                      "grad": grad, "size": 7, "sampling": sampling})
    leaf = torch.tensor(feature, requires_grad=True)
    ours = roi_align(leaf, torch.tensor(rois), 7, 0.25, sampling, False)
    ours.backward(torch.tensor(grad))
    np.testing.assert_allclose(ours.detach().numpy(), theirs["output"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(leaf.grad.numpy(), theirs["grad0"], rtol=1e-5, atol=1e-5)
    assert np.abs(theirs["grad0"]).sum() > 0


def test_fpn_pooler_and_its_gradient_equal_multiscale_roi_align(worker, tmp_path):
    """The multilevel op (one native call each way) equals torchvision's MultiScaleRoIAlign, the
    level rule included, forward and gradient at every level."""
    rng = np.random.default_rng(4)
    image_hw = (256, 320)
    features = [rng.standard_normal((1, 8, image_hw[0] // s, image_hw[1] // s)).astype(np.float32) for s in (4, 8, 16, 32)]
    side = np.exp(rng.uniform(np.log(8), np.log(700), size=(80, 2)))  # sqrt(area) past 448: P5 too
    xy = rng.uniform(0, 200, size=(80, 2))
    boxes = np.concatenate([xy, xy + side], axis=1).astype(np.float32)
    grad = rng.standard_normal((80, 8, 7, 7)).astype(np.float32)
    theirs = _case(worker, tmp_path, {"kind": "multi", "levels": 4, **{f"feature{i}": f for i, f in enumerate(features)},
                                      "boxes": boxes, "image_hw": np.array(image_hw), "grad": grad, "size": 7,
                                      "sampling": 2})
    leaves = [torch.tensor(f, requires_grad=True) for f in features]
    ours = multilevel_roi_align(torch.tensor(boxes)[None], leaves, [0.25, 0.125, 0.0625, 0.03125], 7, 7, 2, False)
    ours.backward(torch.tensor(grad)[None])
    np.testing.assert_allclose(ours[0].detach().numpy(), theirs["output"], rtol=1e-5, atol=1e-5)
    for level, leaf in enumerate(leaves):
        assert np.abs(theirs[f"grad{level}"]).sum() > 0  # every level pooled some RoI
        np.testing.assert_allclose(leaf.grad.numpy(), theirs[f"grad{level}"], rtol=1e-5, atol=1e-5)


def test_converted_mask_rcnn_detects_as_torchvision(worker, tmp_path):
    """torchvision's maskrcnn_resnet50_fpn (random weights, score threshold 0: 100 detections)
    converted by from_torchvision gives torchvision's detections: all but at most 2 of ours (the
    cut at 100 among near-tied random scores may keep a different last one) have a torchvision
    detection of the same label within 0.05 px and score 1e-4, with the same binarised mask."""
    from maskrt.model.convert import from_torchvision

    size = 320
    weights = tmp_path / "weights.pt"
    worker.ask({"op": "build_maskrcnn", "size": size, "seed": 0, "weights_out": str(weights)})
    image = torch.rand(3, 240, 320, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "image.npy", image.numpy())
    worker.ask({"op": "run_maskrcnn", "image": str(tmp_path / "image.npy"), "clock": "wall",
                "out": str(tmp_path / "theirs.npz")})
    theirs = np.load(tmp_path / "theirs.npz")
    model = from_torchvision(torch.load(weights, weights_only=True), min_size=size, max_size=size,
                             box_score_thresh=0.0).eval()
    with torch.no_grad():
        ours = model([image])[0]
    assert len(ours["boxes"]) == len(theirs["boxes"]) == 100
    distance = np.abs(ours["boxes"].numpy()[:, None] - theirs["boxes"][None]).max(axis=2)
    distance[ours["labels"].numpy()[:, None] != theirs["labels"][None]] = np.inf
    nearest = distance.argmin(axis=1)
    paired = distance[np.arange(100), nearest] < 0.05
    assert paired.sum() >= 98 and len(set(nearest[paired].tolist())) == paired.sum()  # one to one
    np.testing.assert_allclose(ours["scores"].numpy()[paired], theirs["scores"][nearest[paired]], rtol=0, atol=1e-4)
    ours_masks = ours["masks"].numpy()[paired, 0] > 0.5
    their_masks = theirs["masks"][nearest[paired], 0] > 0.5
    assert ours_masks.any() and (ours_masks != their_masks).sum() <= 1e-4 * ours_masks.size
