"""The eager CPU inference fast paths (docs/performance.md): channels-last activations in
`MaskRCNN.forward_eval` and the fused oneDNN convolutions of the ResNet (`backbone.fused_conv`)
give the numbers of the plain module path, and run only where they apply."""
from __future__ import annotations

import importlib

import pytest
import torch

from maskrt.model import backbone, build_model, mask_rcnn
from maskrt.model.backbone import FrozenBatchNorm2d, ResNet

pytestmark = pytest.mark.skipif(backbone._POINTWISE is None or not torch.backends.mkldnn.is_available(),
                                reason="this torch has no oneDNN pointwise convolution")


def _random_frozen_bn(module: torch.nn.Module, seed: int) -> None:
    """Statistics and affine values away from the identity, so that a wrong fold shows."""
    generator = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, FrozenBatchNorm2d):
            count = layer.weight.shape[0]
            layer.weight.copy_(0.5 + torch.rand(count, generator=generator))
            layer.bias.copy_(torch.randn(count, generator=generator) * 0.1)
            layer.running_mean.copy_(torch.randn(count, generator=generator) * 0.1)
            layer.running_var.copy_(0.5 + torch.rand(count, generator=generator))


class _CountingPointwise:
    """Stands in for torch.ops.mkldnn._convolution_pointwise and counts the fused calls."""

    def __init__(self, op) -> None:
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)

    def binary(self, *args):
        self.calls += 1
        return self.op.binary(*args)


@pytest.mark.parametrize("depth", [18, 50])
def test_fused_resnet_equals_the_module_path(monkeypatch, depth):
    torch.manual_seed(depth)
    body = ResNet(depth=depth, norm="frozen_bn", base_width=8).eval()
    with torch.no_grad():
        _random_frozen_bn(body, depth)
    image = torch.randn(2, 3, 64, 96)
    counter = _CountingPointwise(backbone._POINTWISE)
    monkeypatch.setattr(backbone, "_POINTWISE", counter)
    with torch.no_grad():
        monkeypatch.setattr(backbone, "FUSED_CPU_INFERENCE", False)
        expected = body(image.contiguous(memory_format=torch.channels_last))
        assert counter.calls == 0
        monkeypatch.setattr(backbone, "FUSED_CPU_INFERENCE", True)
        fused = body(image.contiguous(memory_format=torch.channels_last))
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in body.modules())
    assert counter.calls == convs  # every conv of the trunk ran fused
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_fused_path_runs_only_for_channels_last_inference_without_autograd_or_hooks(monkeypatch):
    torch.manual_seed(0)
    body = ResNet(depth=18, norm="frozen_bn", base_width=8).eval()
    counter = _CountingPointwise(backbone._POINTWISE)
    monkeypatch.setattr(backbone, "_POINTWISE", counter)
    channels_last = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    body(channels_last)  # autograd on: the module path (training keeps its gradients)
    with torch.no_grad():
        body(channels_last.contiguous())  # NCHW: the module path
        handle = body.layer1[0].conv1.register_forward_hook(lambda *args: None)
        body(channels_last)  # a hook watches a conv: its block runs as modules, the rest fused
        handle.remove()
    assert counter.calls == sum(isinstance(m, torch.nn.Conv2d) for m in body.modules()) - 2
    group_norm = ResNet(depth=18, norm="group", base_width=8).eval()
    counter.calls = 0
    with torch.no_grad():
        group_norm(channels_last)
    assert counter.calls == 0  # GroupNorm does not fold into a conv


def test_eager_inference_is_the_same_with_and_without_the_fast_paths(monkeypatch):
    """r50_fpn-shaped (frozen BN, Bottlenecks) at a small width: model([image]) with channels-last
    activations and fused convs gives the detections of the NCHW module path."""
    torch.manual_seed(3)
    model = build_model("r50_fpn", 4, min_size=128, max_size=128, backbone_width=8, fpn_channels=16,
                        representation_size=32, mask_layers=[16, 16], mask_dim_reduced=16,
                        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_detections_per_img=20,
                        box_score_thresh=0.0).eval()
    with torch.no_grad():
        _random_frozen_bn(model, 3)
    image = torch.rand(3, 120, 128)
    counter = _CountingPointwise(backbone._POINTWISE)
    monkeypatch.setattr(backbone, "_POINTWISE", counter)
    monkeypatch.setattr(mask_rcnn, "CHANNELS_LAST_CPU", False)
    expected = model([image])[0]
    assert counter.calls == 0
    monkeypatch.setattr(mask_rcnn, "CHANNELS_LAST_CPU", True)
    fast = model([image])[0]
    assert counter.calls > 0
    assert len(expected["boxes"]) == 20
    assert torch.equal(fast["labels"], expected["labels"])
    for key in ("boxes", "scores"):
        torch.testing.assert_close(fast[key], expected[key], rtol=1e-4, atol=1e-4)
    # Pasted mask probabilities: a box edge moved by float32 rounding shifts the resampling of a
    # few pixels on steep mask edges by up to ~2e-4.
    torch.testing.assert_close(fast["masks"], expected["masks"], rtol=0, atol=1e-3)
    assert float((fast["masks"] - expected["masks"]).abs().mean()) < 1e-6


def test_eager_detect_runs_the_mask_head_on_the_filled_slots_only(monkeypatch):
    """Eager `detect_batch` computes masks for the slots some image fills; the static-shape graph
    path (what export traces) computes all; the outputs are identical."""
    torch.manual_seed(5)
    model = build_model("r50_fpn", 4, min_size=96, max_size=96, backbone_width=8, fpn_channels=16,
                        representation_size=32, mask_layers=[16], mask_dim_reduced=16, rpn_pre_nms_top_n_test=100,
                        rpn_post_nms_top_n_test=60, box_detections_per_img=200, box_score_thresh=0.3).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0.0, 0.5)
    images = torch.rand(2, 3, 96, 96)
    rows = []
    original = model.roi_heads.mask_probabilities

    def recording(features, boxes, labels, padded_size, **options):
        rows.append(boxes.shape[1])
        return original(features, boxes, labels, padded_size, **options)

    monkeypatch.setattr(model.roi_heads, "mask_probabilities", recording)
    # The RoIAlign forward on its PyTorch path in both runs (the patched is_compiling below takes it).
    monkeypatch.setattr(importlib.import_module("maskrt.model.ops.roi_align"), "_NATIVE_CPU", False)
    with torch.no_grad():
        eager = model.detect_batch(images)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        graph = model.detect_batch(images)
    filled = int(eager[0].max())
    assert 0 < filled < 200 and rows == [filled, 200]
    for got, want in zip(eager[:4], graph[:4]):
        assert torch.equal(got, want)
    # The mask FCN on fewer rows may pick another oneDNN kernel, and eager computes only the
    # label's logit map (a dot product, not the 1x1 conv of all classes): float32 rounding.
    torch.testing.assert_close(eager[4], graph[4], rtol=1e-5, atol=1e-5)
    assert graph[4][:, filled:].abs().sum() == 0
