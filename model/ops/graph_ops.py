"""The two graph ops of the export boundary: ``maskrt::multilevel_roi_align`` and ``maskrt::nms_padded``.

The model's inference path calls exactly these two for its dynamic work. Each is a
``torch.library.custom_op`` with
- an eager implementation (the pure PyTorch functions of this package),
- a fake implementation giving the static output shape, so ``torch.export`` records the op
  as one node without running it (``maskrt.export`` translates that node to ONNX),
- autograd for ``multilevel_roi_align`` (gradients reach the features): backward is a third
  op, ``maskrt::multilevel_roi_align_backward``, computing the gradient directly from the
  same sample plan as the forward (``roi_align_backward``). Autograd cannot run inside a
  custom op's kernel, and a separate op keeps traced backward graphs (AOT autograd,
  torch.compile) free of the data-dependent per-level gather.
- an autocast rule for the RoIAlign pair: under CPU autocast (the trainer's bf16 mode) they
  take float32 inputs and run with autocast off, so sampling and accumulation stay float32.

The contract both honour is in ``docs/design.md`` and ``plugins/README.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from maskrt.errors import MaskrtError
from maskrt.model.ops.nms import batched_nms
from maskrt.model.ops.roi_align import multilevel_roi_align_backward_eager, multilevel_roi_align_eager


@torch.library.custom_op("maskrt::multilevel_roi_align", mutates_args=())
def multilevel_roi_align(
    rois: Tensor,
    features: list[Tensor],
    spatial_scales: list[float],
    output_height: int,
    output_width: int,
    sampling_ratio: int,
    aligned: bool,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    mode: str = "avg",
) -> Tensor:
    """FPN multilevel RoIAlign. rois [B,R,4] xyxy (input pixels), features L x [B,C,H_l,W_l]
    -> [B,R,C,output_height,output_width]. ``sampling_ratio <= 0`` = adaptive; mode "avg"|"max".
    """
    return multilevel_roi_align_eager(
        rois, features, spatial_scales, output_height, output_width, sampling_ratio, aligned,
        canonical_scale, canonical_level, mode,
    )


@multilevel_roi_align.register_fake
def _multilevel_roi_align_fake(
    rois: Tensor, features: list[Tensor], spatial_scales: list[float], output_height: int, output_width: int,
    sampling_ratio: int, aligned: bool, canonical_scale: float = 224.0, canonical_level: int = 4, mode: str = "avg",
) -> Tensor:
    return features[0].new_empty((rois.shape[0], rois.shape[1], features[0].shape[1], output_height, output_width))


@torch.library.custom_op("maskrt::multilevel_roi_align_backward", mutates_args=())
def multilevel_roi_align_backward(
    grad_output: Tensor, rois: Tensor, features: list[Tensor], spatial_scales: list[float], output_height: int,
    output_width: int, sampling_ratio: int, aligned: bool, canonical_scale: float, canonical_level: int, mode: str,
) -> list[Tensor]:
    """Gradient of ``multilevel_roi_align`` w.r.t. each feature map: grad_output [B,R,C,oh,ow] -> L x [B,C,H_l,W_l].

    Its own op so that traced backward graphs (AOT autograd, torch.compile) see one node
    instead of the data-dependent per-level gather.
    """
    return multilevel_roi_align_backward_eager(
        grad_output, rois, features, spatial_scales, output_height, output_width, sampling_ratio, aligned,
        canonical_scale, canonical_level, mode,
    )


@multilevel_roi_align_backward.register_fake
def _multilevel_roi_align_backward_fake(
    grad_output: Tensor, rois: Tensor, features: list[Tensor], spatial_scales: list[float], output_height: int,
    output_width: int, sampling_ratio: int, aligned: bool, canonical_scale: float, canonical_level: int, mode: str,
) -> list[Tensor]:
    return [torch.empty_like(f) for f in features]


def _multilevel_roi_align_setup(ctx, inputs: tuple, output: Tensor) -> None:
    # inputs holds every argument, defaults filled in.
    rois, features, *params = inputs
    ctx.save_for_backward(rois, *features)
    ctx.params = params


def _multilevel_roi_align_backward(ctx, grad_output: Tensor) -> tuple:
    rois, *features = ctx.saved_tensors
    grad_features = multilevel_roi_align_backward(grad_output.contiguous(), rois, features, *ctx.params)
    # One entry per argument the caller passed (defaults left out are not inputs of the node).
    return (None, list(grad_features)) + (None,) * (len(ctx.needs_input_grad) - 2)


multilevel_roi_align.register_autograd(_multilevel_roi_align_backward, setup_context=_multilevel_roi_align_setup)

# Under CPU or CUDA autocast (mixed-precision training) RoIAlign and its gradient take float32 inputs and run with
# autocast off: the contract accumulates in float32, and a bf16 bmm inside would round the
# bilinear weights (8 mantissa bits) and hand float32 accumulators bf16 rows.
for _device_type in ("cpu", "cuda"):  # the same rule under CPU (bf16) and CUDA (bf16 / fp16) autocast
    torch.library.register_autocast(multilevel_roi_align, _device_type, torch.float32)
    torch.library.register_autocast(multilevel_roi_align_backward, _device_type, torch.float32)


@torch.library.custom_op("maskrt::nms_padded", mutates_args=())
def nms_padded(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, score_threshold: float, max_output: int) -> Tensor:
    """Per-image batched NMS with a static output. boxes [B,N,4], scores [B,N], groups [B,N] int64
    -> kept indices into N, int64 [B,max_output], by decreasing score, padded with -1.

    Only entries with ``score > score_threshold`` take part (``-inf`` marks an absent entry).
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2] or groups.shape != boxes.shape[:2]:
        raise MaskrtError(
            f"nms_padded needs boxes [B,N,4], scores [B,N], groups [B,N]; got {tuple(boxes.shape)}, "
            f"{tuple(scores.shape)}, {tuple(groups.shape)}"
        )
    batch = boxes.shape[0]
    kept_all = torch.full((batch, max_output), -1, dtype=torch.int64, device=boxes.device)
    for image in range(batch):
        candidates = torch.where(scores[image] > score_threshold)[0]
        keep = batched_nms(boxes[image, candidates], scores[image, candidates], groups[image, candidates], iou_threshold,
                           max_output)
        kept = candidates[keep]
        kept_all[image, : kept.shape[0]] = kept
    return kept_all


@nms_padded.register_fake
def _nms_padded_fake(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, score_threshold: float, max_output: int) -> Tensor:
    return boxes.new_empty((boxes.shape[0], max_output), dtype=torch.int64)
