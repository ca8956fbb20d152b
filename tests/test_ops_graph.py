"""The two graph ops: eager results, registration (opcheck), and single-node tracing under torch.export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from maskrt.errors import MaskrtError
from maskrt.model.ops import batched_nms, multilevel_roi_align, nms_padded, roi_align

SCALES = [0.25, 0.125, 0.0625, 0.03125]


def _features(batch: int, channels: int = 4, size: int = 128, requires_grad: bool = False) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, channels, size // s, size // s, requires_grad=requires_grad) for s in (4, 8, 16, 32)]


def _rois(batch: int, count: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, size=(batch, count, 2))
    side = np.exp(rng.uniform(np.log(8), np.log(400), size=(batch, count, 2)))
    return torch.tensor(np.concatenate([xy, xy + side], axis=-1), dtype=torch.float32)


def _detections(batch: int, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, size=(batch, count, 2))
    boxes = torch.tensor(np.concatenate([xy, xy + rng.uniform(5, 40, size=(batch, count, 2))], axis=-1), dtype=torch.float32)
    scores = torch.tensor(rng.permutation(batch * count).reshape(batch, count) / (batch * count), dtype=torch.float32)
    groups = torch.tensor(rng.integers(1, 4, size=(batch, count)), dtype=torch.int64)
    return boxes, scores, groups


def test_nms_padded_equals_batched_nms_per_image():
    boxes, scores, groups = _detections(3, 60)
    scores[1, 10:20] = -float("inf")  # absent entries
    scores[2] = -float("inf")          # an image with no candidates
    max_output = 25
    kept = nms_padded(boxes, scores, groups, 0.5, 0.1, max_output)
    assert kept.shape == (3, max_output) and kept.dtype == torch.int64
    for image in range(3):
        candidates = torch.where(scores[image] > 0.1)[0]
        expected = candidates[batched_nms(boxes[image, candidates], scores[image, candidates], groups[image, candidates], 0.5)]
        expected = expected[:max_output].tolist()
        assert kept[image, : len(expected)].tolist() == expected
        assert (kept[image, len(expected):] == -1).all()
    assert (kept[2] == -1).all() and (kept[0] >= 0).sum() > 5
    assert not set(range(10, 20)) & set(kept[1].tolist())


def test_multilevel_roi_align_float16_io():
    features = [f.half() for f in _features(1)]
    rois = _rois(1, 6)
    out = multilevel_roi_align(rois.half(), features, SCALES, 7, 7, 2, False)
    assert out.dtype == torch.float16
    full = multilevel_roi_align(rois.half().float(), [f.float() for f in features], SCALES, 7, 7, 2, False)
    torch.testing.assert_close(out.float(), full, rtol=1e-3, atol=1e-3)


def test_ops_pass_torch_library_opcheck():
    features = _features(2, channels=2, size=64, requires_grad=True)
    rois = _rois(2, 5) * 0.5
    torch.library.opcheck(torch.ops.maskrt.multilevel_roi_align.default, (rois, features, SCALES, 3, 3, 2, False, 224.0, 4, "avg"))
    # The backward op (native for float32 avg on the CPU): its outputs' strides match its fake's.
    grad = torch.randn(2, 5, 2, 3, 3)
    for mode in ("avg", "max"):
        torch.library.opcheck(torch.ops.maskrt.multilevel_roi_align_backward.default,
                              (grad, rois, [f.detach() for f in features], SCALES, 3, 3, 2, False, 224.0, 4, mode))
    boxes, scores, groups = _detections(2, 20)
    torch.library.opcheck(torch.ops.maskrt.nms_padded.default, (boxes, scores, groups, 0.5, 0.05, 8))


class _TinyHead(torch.nn.Module):
    """The shape of the model's inference use: pool proposals, then NMS with a static output."""

    def forward(self, images: torch.Tensor, rois: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor):
        features = [torch.nn.functional.avg_pool2d(images, s) for s in (4, 8, 16, 32)]
        pooled = multilevel_roi_align(rois, features, SCALES, 7, 7, 2, False)
        keep = nms_padded(rois, scores, groups, 0.5, 0.05, 10)
        return pooled.mean(dim=(2, 3, 4)), keep


def test_graph_ops_export_as_single_nodes_with_dynamic_batch():
    images = torch.randn(2, 3, 128, 128)
    rois = _rois(2, 12)
    _, scores, groups = _detections(2, 12)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(
        _TinyHead(), (images, rois, scores, groups), strict=False,
        dynamic_shapes={"images": {0: batch}, "rois": {0: batch}, "scores": {0: batch}, "groups": {0: batch}},
    )
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.maskrt.multilevel_roi_align.default) == 1
    assert targets.count(torch.ops.maskrt.nms_padded.default) == 1
    # Nothing of the op's inside leaked into the graph.
    assert torch.ops.aten.index_select.default not in targets
    # The exported program runs and agrees with eager, at another batch size too.
    images3, rois3 = torch.randn(3, 3, 128, 128), _rois(3, 12, seed=1)
    _, scores3, groups3 = _detections(3, 12, seed=1)
    for args in [(images, rois, scores, groups), (images3, rois3, scores3, groups3)]:
        exported, eager = program.module()(*args), _TinyHead()(*args)
        torch.testing.assert_close(exported[0], eager[0])
        assert torch.equal(exported[1], eager[1])


def test_multilevel_op_gradient_matches_per_level_roi_align():
    features = _features(1, channels=2, size=128, requires_grad=True)
    rois = _rois(1, 1)
    rois[0, 0] = torch.tensor([10.0, 12.0, 60.0, 50.0])  # sqrt(area) ~ 44 -> P2
    out = multilevel_roi_align(rois, features, SCALES, 7, 7, 2, False)
    out.sum().backward()
    leaf = features[0].detach().clone().requires_grad_()
    roi_align(leaf, torch.tensor([[0.0, 10.0, 12.0, 60.0, 50.0]]), 7, 0.25, 2).sum().backward()
    torch.testing.assert_close(features[0].grad, leaf.grad)
    assert all(float(f.grad.abs().sum()) == 0.0 for f in features[1:])


def test_nms_padded_rejects_bad_shapes():
    boxes, scores, groups = _detections(2, 5)
    with pytest.raises(MaskrtError, match="nms_padded"):
        nms_padded(boxes[0], scores, groups, 0.5, 0.0, 3)


def test_multilevel_roi_align_computes_in_float32_under_bf16_autocast():
    # bf16 training (the trainer's CPU autocast) hands the op bf16 feature maps; the op must
    # still sample and accumulate in float32 (its contract), forward and backward, including
    # the window form's bmm, which autocast would otherwise run in bf16.
    torch.manual_seed(0)
    features = [torch.randn(2, 8, 64 // s, 64 // s).bfloat16().requires_grad_() for s in (1, 2, 4, 8)]
    rois = _rois(2, 12, seed=3) / 4  # small RoIs: 14x14 bins take the window form
    reference = [f.detach().float().requires_grad_() for f in features]
    expected = multilevel_roi_align(rois, reference, SCALES, 14, 14, 2, False, 56.0)
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multilevel_roi_align(rois, features, SCALES, 14, 14, 2, False, 56.0)
        (out * weights).sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, want in zip(features, reference):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad, want.grad.bfloat16(), rtol=0, atol=0)
    assert sum(float(f.grad.abs().sum()) > 0 for f in features) >= 2  # RoIs on several levels
