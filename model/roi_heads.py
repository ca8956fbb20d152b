"""RoI heads: pooling, the box branch (TwoMLPHead + FastRCNNPredictor) and the mask branch
(MaskRCNNHeads + MaskRCNNPredictor), fixed-shape inference and torchvision's training losses.

Key names are torchvision's (`box_head.fc6`, `box_predictor.cls_score`, `mask_head.0.0`,
`mask_predictor.conv5_mask`, `mask_predictor.mask_fcn_logits`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrt.errors import MaskrtError
from maskrt.model import ops
from maskrt.model.backbone import _observed
from maskrt.model.fpn import conv_norm_act
from maskrt.model.matching import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, BalancedPositiveNegativeSampler, Matcher
from maskrt.model.rpn import clip_boxes_batched

ROI_OPS = ("align", "pool")
LEVEL_RULES = ("torchvision", "detectron2")
# The contract's level rule adds 1e-6 to log2(sqrt(area) / canonical_scale); scaling the
# canonical side by 2**1e-6 cancels it (detectron2's rule, see MultiLevelRoIPooler).
_CONTRACT_LEVEL_EPSILON = 1e-6


class MultiLevelRoIPooler(nn.Module):
    """Pool RoIs from the FPN level their size selects (torchvision's `MultiScaleRoIAlign`).

    One graph op per call: `ops.multilevel_roi_align` (roi_op="align", average of bilinear
    samples) or `ops.multilevel_roi_pool` (roi_op="pool", the quantised max of Fast R-CNN, for
    the RoIAlign-vs-RoIPool ablation). Spatial scales are `2**round(log2(feature/image))` of the
    padded batch size.

    Shapes: features P2..P5 [B, C, H_l, W_l], rois [B, R, 4] xyxy in padded-input pixels ->
    [B, R, C, output_size, output_size].

    `level_rule` "torchvision": the op contract's `floor(k0 + log2(sqrt(area) / s0) + 1e-6)`
    (torchvision's LevelMapper). "detectron2": `floor(k0 + log2(sqrt(area) / s0 + 1e-8))`
    (detectron2/modeling/poolers.py at commit 02b5c4e, `assign_boxes_to_levels` lines 51-59).
    In float32 detectron2's 1e-8 vanishes next to any box side above ~0.001 px, so its rule is
    `floor(k0 + log2(sqrt(area) / s0))`; the op is given `s0 * 2**1e-6`, since
    `log2(sqrt(area) / (s0 * 2**1e-6)) + 1e-6 = log2(sqrt(area) / s0)`. The contract and every
    implementation of it stay as they are; the two rules then agree but for float32 rounding
    within ~3 ulps of a level boundary, where torchvision's rule differed up to ~12 ulps
    (sides in [112 - 8e-5, 112), [224 - 1.6e-4, 224), [448 - 3.1e-4, 448) px).
    """

    def __init__(self, output_size: int, sampling_ratio: int, aligned: bool = False, roi_op: str = "align",
                 canonical_scale: float = 224.0, canonical_level: int = 4, level_rule: str = "torchvision") -> None:
        super().__init__()
        if roi_op not in ROI_OPS:
            raise MaskrtError(f"unknown roi_op {roi_op!r}: choose 'align' or 'pool'")
        if level_rule not in LEVEL_RULES:
            raise MaskrtError(f"unknown level rule {level_rule!r}: choose 'torchvision' or 'detectron2'")
        self.level_rule = level_rule
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.roi_op = roi_op
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    @property
    def op_canonical_scale(self) -> float:
        """The canonical_scale handed to the op: the model's, or for detectron2's level rule
        the model's times 2**1e-6 (see the class docstring)."""
        if self.level_rule == "detectron2":
            return float(self.canonical_scale) * 2.0 ** _CONTRACT_LEVEL_EPSILON
        return float(self.canonical_scale)

    def forward(self, features: list[Tensor], rois: Tensor, padded_size: tuple[int, int]) -> Tensor:
        scales = ops.infer_spatial_scales([tuple(f.shape[-2:]) for f in features], padded_size)
        if self.roi_op == "pool":
            return ops.multilevel_roi_pool(rois, features, scales, (self.output_size, self.output_size),
                                           self.op_canonical_scale, self.canonical_level)
        return ops.multilevel_roi_align(rois, features, scales, self.output_size, self.output_size,
                                        self.sampling_ratio, self.aligned, self.op_canonical_scale,
                                        self.canonical_level, "avg")

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
                f"aligned={self.aligned}, roi_op={self.roi_op!r}")


class TwoMLPHead(nn.Module):
    """fc6 + ReLU, fc7 + ReLU on flattened RoI features. Shapes: [R, C, 7, 7] -> [R, representation_size]."""

    def __init__(self, in_channels: int, representation_size: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        return F.relu(self.fc7(F.relu(self.fc6(x))))


class ConvFCHead(nn.Sequential):
    """3x3 conv + GroupNorm + ReLU per entry of `convs`, then one fc + ReLU (the layout of
    torchvision's `FastRCNNConvFCHead`, GN for BN: keys `0.0.weight`, ..., `<n+1>.weight`).

    Why convs before the fc: the weights of a conv are shared over the 7x7 grid, so a local
    cue (a corner, a concavity) is learned once wherever it falls; an fc on the flattened grid
    must learn it per position and per rotation, which shapes at random angles make slow.
    Shapes: [R, in_channels, 7, 7] -> [R, representation_size]."""

    def __init__(self, in_channels: int, convs: Sequence[int], representation_size: int, roi_size: int = 7) -> None:
        blocks: list[nn.Module] = []
        channels = in_channels
        for width in convs:
            blocks.append(conv_norm_act(channels, width, 3, norm="group", relu=True))
            channels = width
        super().__init__(*blocks, nn.Flatten(), nn.Linear(channels * roi_size * roi_size, representation_size),
                         nn.ReLU(inplace=True))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class FastRCNNPredictor(nn.Module):
    """Class logits [R, K] and class-specific box deltas [R, 4K] from [R, in_channels]."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskRCNNHeads(nn.Sequential):
    """The mask FCN: a 3x3 conv + ReLU per entry of `layers` (keys `0.0.weight`, `1.0.weight`, ...).
    Shapes: [R, in_channels, 14, 14] -> [R, layers[-1], 14, 14]."""

    def __init__(self, in_channels: int, layers: Sequence[int], dilation: int = 1) -> None:
        blocks = []
        channels = in_channels
        for width in layers:
            block = conv_norm_act(channels, width, 3, norm=None, relu=True)
            block[0].padding = (dilation, dilation)
            block[0].dilation = (dilation, dilation)
            blocks.append(block)
            channels = width
        super().__init__(*blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)


class MaskRCNNPredictor(nn.Sequential):
    """2x deconvolution + ReLU, then a 1x1 conv to one mask logit map per class.
    Shapes: [R, in_channels, 14, 14] -> [R, num_classes, 28, 28]."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int) -> None:
        super().__init__(OrderedDict([
            ("conv5_mask", nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)),
            ("relu", nn.ReLU(inplace=True)),
            ("mask_fcn_logits", nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)),
        ]))
        for name, parameter in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(parameter, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.zeros_(parameter)


def pad_lists(per_image: list[Tensor], fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """Stack variable-length [L_i, ...] tensors into [B, max L, ...] + validity bool [B, max L]."""
    longest = max(1, max(t.shape[0] for t in per_image))
    padded = per_image[0].new_full((len(per_image), longest, *per_image[0].shape[1:]), fill)
    valid = torch.zeros(len(per_image), longest, dtype=torch.bool, device=per_image[0].device)
    for index, tensor in enumerate(per_image):
        padded[index, :tensor.shape[0]] = tensor
        valid[index, :tensor.shape[0]] = True
    return padded, valid


SELECTION_RULES = ("torchvision", "detectron2")


class RoIHeads(nn.Module):
    """Box and mask branches on RPN proposals.

    Inference (`detect`): static shapes [B, P] proposals -> D detections per image.
    Training (`losses`): torchvision's sampling and the three losses of the heads.
    `selection_rule` picks which candidates may become detections: "torchvision" drops boxes
    with a side < 1e-2 before NMS (`postprocess_detections`); "detectron2" keeps every box
    through NMS and the top-D (detectron2/modeling/roi_heads/fast_rcnn.py at commit 02b5c4e,
    `fast_rcnn_inference_single_image` lines 137-171: finite rows, score > threshold, class-wise
    NMS, top-k), then drops the kept ones with a side <= 0 (`detector_postprocess`,
    modeling/postprocessing.py line 58), so an empty box still takes one of the D places.
    """

    def __init__(self, box_roi_pool: MultiLevelRoIPooler, box_head: TwoMLPHead, box_predictor: FastRCNNPredictor,
                 fg_iou_thresh: float, bg_iou_thresh: float, batch_size_per_image: int,
                 positive_fraction: float, bbox_reg_weights: Sequence[float] | None, score_thresh: float,
                 nms_thresh: float, detections_per_img: int, mask_roi_pool: MultiLevelRoIPooler,
                 mask_head: MaskRCNNHeads, mask_predictor: MaskRCNNPredictor,
                 mask_positives_per_image: int | None = None, selection_rule: str = "torchvision") -> None:
        super().__init__()
        if selection_rule not in SELECTION_RULES:
            raise MaskrtError(f"unknown selection rule {selection_rule!r}: choose 'torchvision' or 'detectron2'")
        self.selection_rule = selection_rule
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        weights = tuple(bbox_reg_weights) if bbox_reg_weights is not None else (10.0, 10.0, 5.0, 5.0)
        self.box_coder = ops.BoxCoder(weights)
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.mask_positives_per_image = mask_positives_per_image

    # --- inference ------------------------------------------------------------------------

    def detect(self, features: list[Tensor], proposals: Tensor, proposal_valid: Tensor,
               padded_size: tuple[int, int], image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """features P2..P5; proposals [B, P, 4] with validity [B, P]; image_sizes [B, 2] (h, w).

        Returns num_dets int32 [B], boxes [B, D, 4], scores [B, D], labels int64 [B, D],
        masks [B, D, M, M] (the predicted class's probabilities); entries past num_dets are 0.
        """
        batch, num_proposals = proposals.shape[:2]
        box_features = self.box_roi_pool(features, proposals, padded_size)
        class_logits, box_deltas = self.box_predictor(self.box_head(box_features.flatten(0, 1)))
        num_classes = class_logits.shape[-1]
        # Class-specific decode: [B*P, K, 4], then clip each image's boxes to its own size.
        decoded = self.box_coder.decode_single(box_deltas, proposals.reshape(-1, 4)).reshape(batch, -1, 4)
        boxes = clip_boxes_batched(decoded, image_sizes).reshape(batch, num_proposals, num_classes, 4)
        scores = F.softmax(class_logits, -1).reshape(batch, num_proposals, num_classes)
        if self.selection_rule == "detectron2":
            # fast_rcnn.py line 137: a proposal whose decoded boxes (before clipping) or scores
            # are not all finite goes, all its classes with it.
            finite = torch.isfinite(decoded).reshape(batch, num_proposals, -1).all(-1) & torch.isfinite(scores).all(-1)
        labels = torch.arange(num_classes, device=scores.device).expand(batch, num_proposals, num_classes)
        # Drop the background column, then every (proposal, class) pair is a candidate.
        boxes = boxes[:, :, 1:].reshape(batch, -1, 4)
        scores = scores[:, :, 1:].reshape(batch, -1)
        labels = labels[:, :, 1:].reshape(batch, -1)
        present = proposal_valid[:, :, None].expand(-1, -1, num_classes - 1).reshape(batch, -1)
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        if self.selection_rule == "detectron2":
            present = present & finite[:, :, None].expand(-1, -1, num_classes - 1).reshape(batch, -1)
        else:
            present = present & (widths >= 1e-2) & (heights >= 1e-2)
        scores = torch.where(present, scores, torch.full_like(scores, float("-inf")))
        keep = ops.nms_padded(boxes, scores, labels, self.nms_thresh, self.score_thresh, self.detections_per_img)
        kept = keep >= 0
        if self.selection_rule == "detectron2":
            keep, kept = self._drop_empty_detections(boxes, keep, kept)
        index = keep.clamp(min=0)
        kept_float = kept.to(boxes.dtype)
        det_boxes = torch.gather(boxes, 1, index[..., None].expand(-1, -1, 4)) * kept_float[..., None]
        det_scores = torch.gather(scores, 1, index) * kept_float
        det_labels = torch.gather(labels, 1, index) * kept.to(torch.int64)
        num_dets = kept.sum(dim=1).to(torch.int32)
        if torch.compiler.is_compiling() or det_boxes.shape[1] == 0:
            # The graph (export, torch.compile): static shapes, masks for every detection slot.
            masks = self.mask_probabilities(features, det_boxes, det_labels, padded_size) * kept_float[..., None, None]
        else:
            # Eager: the mask head only on the slots some image fills (kept detections come first),
            # as torchvision runs it on its kept detections; the empty slots' masks are 0 either way.
            filled = max(int(num_dets.max()), 1)
            size = self._mask_size()
            masks = det_boxes.new_zeros((batch, det_boxes.shape[1], size, size))
            masks[:, :filled] = self.mask_probabilities(features, det_boxes[:, :filled], det_labels[:, :filled],
                                                        padded_size, label_only=True) * kept_float[:, :filled, None, None]
        return num_dets, det_boxes, det_scores, det_labels, masks

    @staticmethod
    def _drop_empty_detections(boxes: Tensor, keep: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        """detectron2's `results[output_boxes.nonempty()]` after the top-D: kept detections
        with a side <= 0 go, the rest move up in order. keep int64 [B, D] indices into boxes
        [B, N, 4], kept bool [B, D] -> both compacted."""
        chosen = torch.gather(boxes, 1, keep.clamp(min=0)[..., None].expand(-1, -1, 4))
        kept = kept & (chosen[..., 2] > chosen[..., 0]) & (chosen[..., 3] > chosen[..., 1])
        slots = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        # Distinct sort keys (kept slots first, each group in its own order): no tie to break.
        order = torch.argsort(torch.where(kept, slots, slots + keep.shape[1]), dim=1)
        return torch.gather(keep, 1, order), torch.gather(kept, 1, order)

    def mask_probabilities(self, features: list[Tensor], boxes: Tensor, labels: Tensor,
                           padded_size: tuple[int, int], label_only: bool = False) -> Tensor:
        """boxes [B, D, 4], labels int64 [B, D] -> sigmoid of the label's mask logits [B, D, M, M].

        label_only (eager inference): the final 1x1 conv computes only the label's logit map (one
        dot product over the channels per pixel) instead of all K and a gather: 1/K of its work."""
        batch, count = boxes.shape[:2]
        mask_features = self.mask_roi_pool(features, boxes, padded_size).flatten(0, 1)
        if features[0].dim() == 4 and not features[0].is_contiguous() and \
                features[0].is_contiguous(memory_format=torch.channels_last):
            # Eager CPU inference runs channels-last (MaskRCNN.forward_eval): the mask FCN and its
            # deconvolution are ~1.3x and ~2x faster on channels-last input (docs/performance.md).
            mask_features = mask_features.contiguous(memory_format=torch.channels_last)
        logits_conv = self.mask_predictor.mask_fcn_logits
        if label_only and isinstance(logits_conv, nn.Conv2d) and logits_conv.kernel_size == (1, 1) \
                and logits_conv.groups == 1 and not _observed(self.mask_predictor, logits_conv):
            hidden = self.mask_predictor.relu(self.mask_predictor.conv5_mask(self.mask_head(mask_features)))
            flat_labels = labels.reshape(-1)
            weight = logits_conv.weight[flat_labels, :, 0, 0]  # [B*D, C]
            # [B*D, H*W, C] @ [B*D, C, 1]: the label's logit at every pixel (a view for channels-last).
            chosen = torch.bmm(hidden.permute(0, 2, 3, 1).reshape(hidden.shape[0], -1, hidden.shape[1]),
                               weight[:, :, None]).reshape(hidden.shape[0], *hidden.shape[-2:])
            if logits_conv.bias is not None:
                chosen = chosen + logits_conv.bias[flat_labels, None, None]
            return chosen.sigmoid().reshape(batch, count, *hidden.shape[-2:])
        logits = self.mask_predictor(self.mask_head(mask_features))  # [B*D, K, M, M]
        chosen = torch.gather(logits, 1, labels.reshape(-1, 1, 1, 1).expand(-1, 1, *logits.shape[-2:]))
        return chosen.sigmoid().reshape(batch, count, *logits.shape[-2:])

    # --- training -------------------------------------------------------------------------

    def losses(self, features: list[Tensor], proposals: list[Tensor], padded_size: tuple[int, int],
               targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """proposals: per image [P_i, 4]; targets: `boxes` [G, 4], `labels` [G] int64,
        `masks` [G, H, W] in padded-input pixels -> loss_classifier, loss_box_reg, loss_mask."""
        sampled_proposals, matched_idxs, labels, regression_targets = self._sample(proposals, targets)
        rois, roi_valid = pad_lists(sampled_proposals)
        box_features = self.box_roi_pool(features, rois, padded_size)[roi_valid]
        class_logits, box_deltas = self.box_predictor(self.box_head(box_features))
        labels_all = torch.cat(labels)
        loss_classifier = F.cross_entropy(class_logits, labels_all)
        positive = torch.where(labels_all > 0)[0]
        deltas_of_gt_class = box_deltas.reshape(box_deltas.shape[0], -1, 4)[positive, labels_all[positive]]
        loss_box_reg = F.smooth_l1_loss(deltas_of_gt_class, torch.cat(regression_targets)[positive],
                                        beta=1 / 9, reduction="sum") / labels_all.numel()
        loss_mask = self._mask_loss(features, sampled_proposals, matched_idxs, labels, padded_size, targets)
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}

    def _sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
                ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """Append gt boxes to the proposals, match (0.5/0.5), sample 512 at 25 % positives."""
        all_proposals, all_matched, all_labels = [], [], []
        for proposals_in_image, target in zip(proposals, targets):
            gt_boxes = target["boxes"].to(proposals_in_image.dtype)
            candidates = torch.cat([proposals_in_image, gt_boxes])
            if gt_boxes.numel() == 0:
                matched = torch.zeros(candidates.shape[0], dtype=torch.int64, device=candidates.device)
                labels = torch.zeros(candidates.shape[0], dtype=torch.int64, device=candidates.device)
            else:
                matches = self.proposal_matcher(ops.box_iou(gt_boxes, candidates))
                matched = matches.clamp(min=0)
                labels = target["labels"][matched].to(torch.int64)
                labels[matches == BELOW_LOW_THRESHOLD] = 0
                labels[matches == BETWEEN_THRESHOLDS] = -1
            all_proposals.append(candidates)
            all_matched.append(matched)
            all_labels.append(labels)
        positive_masks, negative_masks = self.fg_bg_sampler(all_labels)
        sampled_proposals, sampled_matched, sampled_labels, regression_targets = [], [], [], []
        for image, (pos, neg) in enumerate(zip(positive_masks, negative_masks)):
            chosen = torch.where(pos | neg)[0]
            boxes = all_proposals[image][chosen]
            matched = all_matched[image][chosen]
            gt_boxes = targets[image]["boxes"].to(boxes.dtype)
            if gt_boxes.numel() == 0:
                gt_boxes = boxes.new_zeros((1, 4))
            sampled_proposals.append(boxes)
            sampled_matched.append(matched)
            sampled_labels.append(all_labels[image][chosen])
            regression_targets.append(self.box_coder.encode_single(gt_boxes[matched], boxes))
        return sampled_proposals, sampled_matched, sampled_labels, regression_targets

    def _mask_loss(self, features: list[Tensor], proposals: list[Tensor], matched_idxs: list[Tensor],
                   labels: list[Tensor], padded_size: tuple[int, int],
                   targets: list[dict[str, Tensor]]) -> Tensor:
        """BCE-with-logits of the gt class's 28x28 mask on positive RoIs (at most
        `mask_positives_per_image` per image, a random subset); targets are the gt
        masks roi_align'ed into each RoI (torchvision's `project_masks_on_boxes`)."""
        positive_boxes, positive_classes, mask_targets = [], [], []
        cap = self.mask_positives_per_image
        for image, (boxes, matched, image_labels) in enumerate(zip(proposals, matched_idxs, labels)):
            positive = torch.where(image_labels > 0)[0]
            if cap is not None and positive.numel() > cap:
                # A random subset: an object has many overlapping positive RoIs, so fewer of
                # them lose little mask signal and bound the mask branch's cost.
                positive = positive[torch.randperm(positive.numel(), device=positive.device)[:cap]]
            positive_boxes.append(boxes[positive])
            positive_classes.append(image_labels[positive])
            gt_masks = targets[image]["masks"]
            if positive.numel() == 0 or gt_masks.shape[0] == 0:
                continue
            rois = torch.cat([matched[positive, None].to(boxes.dtype), boxes[positive]], dim=1)
            size = self._mask_size()
            projected = ops.roi_align(gt_masks[:, None].to(rois.dtype), rois, (size, size), 1.0)
            mask_targets.append(projected[:, 0])
        rois, roi_valid = pad_lists(positive_boxes)
        if not mask_targets:
            # No positive RoI in the batch: a zero loss that still touches the graph.
            return sum(p.sum() for p in self.mask_predictor.parameters()) * 0.0
        mask_features = self.mask_roi_pool(features, rois, padded_size)[roi_valid]
        logits = self.mask_predictor(self.mask_head(mask_features))
        classes = torch.cat(positive_classes)
        chosen = logits[torch.arange(classes.shape[0], device=classes.device), classes]
        return F.binary_cross_entropy_with_logits(chosen, torch.cat(mask_targets))

    def _mask_size(self) -> int:
        # The predictor doubles the pooled size (2x deconvolution).
        return 2 * self.mask_roi_pool.output_size
