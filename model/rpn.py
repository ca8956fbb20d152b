"""Region Proposal Network: head, fixed-shape proposal selection, and training losses.

Inference is static-shape and batched: per level the top `pre_nms_top_n` anchors by
objectness, decode, clip, mark small / low-score boxes absent (score -inf), then one
`ops.nms_padded` call with the FPN level as the group, keeping `post_nms_top_n` per image:
proposals [B, P, 4] + validity [B, P]. That is torchvision's order of operations
(`RegionProposalNetwork.filter_proposals`) with the data-dependent filtering replaced by -inf
scores, so the kept boxes are the same.

`rule="detectron2"` is detectron2's `find_top_rpn_proposals` (detectron2/modeling/
proposal_generator/proposal_utils.py at commit 02b5c4e, lines 67-135) at test time: the same
per-level top-k (line 79), NMS over levels (line 121) and per-image top-k after NMS
(line 129), but NMS ranks by the objectness *logits* (sigmoid probabilities saturate to 1.0
in float32 above a logit of ~17, and the ties reorder proposals), non-finite boxes or
scores are dropped (line 105), and a proposal is kept when both sides are > 0 after clipping
(`Boxes.nonempty`, structures/boxes.py lines 199-213, PROPOSAL_GENERATOR.MIN_SIZE 0) instead
of torchvision's >= 1e-3.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskrt.errors import MaskrtError
from maskrt.model import ops
from maskrt.model.fpn import conv_norm_act
from maskrt.model.matching import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, BalancedPositiveNegativeSampler, Matcher


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared over levels, then 1x1 objectness logits and 1x1 box deltas.

    Keys: `conv.0.0.weight` (torchvision's Sequential(Conv2dNormActivation)), `cls_logits`,
    `bbox_pred`. Shapes: list of [B, C, H_l, W_l] -> (list of [B, A, H_l, W_l],
    list of [B, 4A, H_l, W_l]).
    """

    def __init__(self, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv_norm_act(in_channels, in_channels, 3, norm=None, relu=True))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in features:
            hidden = self.conv(feature)
            logits.append(self.cls_logits(hidden))
            deltas.append(self.bbox_pred(hidden))
        return logits, deltas


def flatten_level(prediction: Tensor, values_per_anchor: int) -> Tensor:
    """[B, A*V, H, W] -> [B, H*W*A, V]: location-major, then anchor, the order of the anchors."""
    batch, channels, height, width = prediction.shape
    anchors_per_location = channels // values_per_anchor
    prediction = prediction.view(batch, anchors_per_location, values_per_anchor, height, width)
    return prediction.permute(0, 3, 4, 1, 2).reshape(batch, -1, values_per_anchor)


def clip_boxes_batched(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip xyxy boxes [B, N, 4] to per-image sizes int/float [B, 2] (h, w) as
    `clamp(0, w)`/`clamp(0, h)` (torchvision's `clip_boxes_to_image`, one size per image)."""
    heights = image_sizes[:, 0].to(boxes.dtype).view(-1, 1)
    widths = image_sizes[:, 1].to(boxes.dtype).view(-1, 1)
    x1 = torch.minimum(boxes[..., 0].clamp(min=0), widths)
    y1 = torch.minimum(boxes[..., 1].clamp(min=0), heights)
    x2 = torch.minimum(boxes[..., 2].clamp(min=0), widths)
    y2 = torch.minimum(boxes[..., 3].clamp(min=0), heights)
    return torch.stack((x1, y1, x2, y2), dim=-1)


PROPOSAL_RULES = ("torchvision", "detectron2")


class RegionProposalNetwork(nn.Module):
    """Anchors + RPN head -> proposals; in training also the objectness and box losses.

    Args follow torchvision: `pre_nms_top_n` / `post_nms_top_n` dicts with keys "training" and
    "testing", IoU thresholds for the anchor matcher (0.7 / 0.3 with low-quality matches), the
    256 / 0.5 sampler, `nms_thresh` and `score_thresh` (on sigmoid probabilities, kept if >=);
    `rule` ("torchvision" | "detectron2") as the module docstring says.
    """

    min_box_size = 1e-3  # torchvision's RPN drops proposals thinner than this

    def __init__(self, anchor_generator: ops.AnchorGenerator, head: RPNHead, fg_iou_thresh: float,
                 bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float,
                 pre_nms_top_n: dict[str, int], post_nms_top_n: dict[str, int], nms_thresh: float,
                 score_thresh: float = 0.0, rule: str = "torchvision") -> None:
        super().__init__()
        if rule not in PROPOSAL_RULES:
            raise MaskrtError(f"unknown proposal rule {rule!r}: choose 'torchvision' or 'detectron2'")
        self.rule = rule
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = ops.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self._pre_nms_top_n = dict(pre_nms_top_n)
        self._post_nms_top_n = dict(post_nms_top_n)
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n["training" if self.training else "testing"]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n["training" if self.training else "testing"]

    def anchors(self, features: list[Tensor], padded_size: tuple[int, int]) -> list[Tensor]:
        """Per-level anchors [H_l*W_l*A, 4] for the padded batch size (H, W).

        Strides are the anchor generator's rule: torchvision's `padded_size // grid_size` per
        axis (so P6 of an 800-row input, 13 rows, gets stride 61), detectron2's 2**level (64)."""
        grid_sizes = [tuple(feature.shape[-2:]) for feature in features]
        strides = self.anchor_generator.strides(grid_sizes, padded_size)
        return self.anchor_generator.grid_anchors(grid_sizes, strides, device=features[0].device)

    def forward(self, features: list[Tensor], padded_size: tuple[int, int],
                image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
        """features: 5 maps [B, C, H_l, W_l]; image_sizes int64 [B, 2] (h, w) for clipping.

        Returns proposals [B, P, 4], validity bool [B, P], and for the losses the raw
        objectness [B, N] and deltas [B, N, 4] over all N anchors, with the anchors per level.
        """
        logits_per_level, deltas_per_level = self.head(features)
        anchors_per_level = self.anchors(features, padded_size)
        objectness = torch.cat([flatten_level(level, 1)[..., 0] for level in logits_per_level], dim=1)
        deltas = torch.cat([flatten_level(level, 4) for level in deltas_per_level], dim=1)
        num_per_level = [anchors.shape[0] for anchors in anchors_per_level]
        proposals, valid = self.select_proposals(objectness.detach(), deltas.detach(), anchors_per_level,
                                                 num_per_level, image_sizes)
        return proposals, valid, objectness, deltas, anchors_per_level

    def select_proposals(self, objectness: Tensor, deltas: Tensor, anchors_per_level: list[Tensor],
                         num_per_level: list[int], image_sizes: Tensor) -> tuple[Tensor, Tensor]:
        """objectness [B, N], deltas [B, N, 4] -> proposals [B, P, 4], validity bool [B, P].

        P = post_nms_top_n; entries past an image's kept count are zero boxes, invalid."""
        batch = objectness.shape[0]
        top_scores, top_logits, top_boxes, top_levels = [], [], [], []
        offset = 0
        for level, (anchors, count) in enumerate(zip(anchors_per_level, num_per_level)):
            level_logits = objectness[:, offset:offset + count]
            k = min(self.pre_nms_top_n(), count)
            logits, index = level_logits.topk(k, dim=1)
            level_deltas = torch.gather(deltas[:, offset:offset + count], 1, index[..., None].expand(-1, -1, 4))
            level_anchors = anchors[index]  # [B, k, 4]
            boxes = self.box_coder.decode_single(level_deltas.reshape(-1, 4), level_anchors.reshape(-1, 4))
            top_boxes.append(boxes.reshape(batch, k, 4))
            top_scores.append(torch.sigmoid(logits))
            top_logits.append(logits)
            top_levels.append(torch.full((batch, k), level, dtype=torch.int64, device=objectness.device))
            offset += count
        decoded = torch.cat(top_boxes, dim=1)
        boxes = clip_boxes_batched(decoded, image_sizes)
        scores = torch.cat(top_scores, dim=1)
        levels = torch.cat(top_levels, dim=1)
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        if self.rule == "detectron2":
            # proposal_utils.py lines 105 (finite), 117 (nonempty: sides > 0), 121 (NMS by logit).
            logits = torch.cat(top_logits, dim=1)
            present = (widths > 0) & (heights > 0) & (scores >= self.score_thresh)
            present = present & torch.isfinite(decoded).all(dim=-1) & torch.isfinite(logits)
            ranking = logits
        else:
            present = (widths >= self.min_box_size) & (heights >= self.min_box_size) & (scores >= self.score_thresh)
            ranking = scores
        ranking = torch.where(present, ranking, torch.full_like(ranking, float("-inf")))
        keep = ops.nms_padded(boxes, ranking, levels, self.nms_thresh, float("-inf"), self.post_nms_top_n())
        valid = keep >= 0
        proposals = torch.gather(boxes, 1, keep.clamp(min=0)[..., None].expand(-1, -1, 4))
        proposals = proposals * valid[..., None].to(proposals.dtype)
        return proposals, valid

    def compute_loss(self, objectness: Tensor, deltas: Tensor, anchors_per_level: list[Tensor],
                     targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """objectness [B, N] logits, deltas [B, N, 4]; targets' `boxes` [G_i, 4] in the padded
        input pixels -> `loss_objectness` (BCE over sampled anchors) and `loss_rpn_box_reg`
        (smooth-L1 beta 1/9 summed over positives / number sampled), as torchvision."""
        anchors = torch.cat(anchors_per_level, dim=0)
        labels, regression_targets = [], []
        for target in targets:
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:
                labels.append(torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device))
                regression_targets.append(torch.zeros_like(anchors))
                continue
            matches = self.proposal_matcher(ops.box_iou(gt_boxes, anchors))
            matched_gt = gt_boxes[matches.clamp(min=0)]
            labels_per_image = (matches >= 0).to(torch.float32)
            labels_per_image[matches == BELOW_LOW_THRESHOLD] = 0.0
            labels_per_image[matches == BETWEEN_THRESHOLDS] = -1.0
            labels.append(labels_per_image)
            regression_targets.append(self.box_coder.encode_single(matched_gt, anchors))
        positive_masks, negative_masks = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(positive_masks))[0]
        negative = torch.where(torch.cat(negative_masks))[0]
        sampled = torch.cat([positive, negative])
        flat_deltas = deltas.reshape(-1, 4)
        flat_targets = torch.cat(regression_targets)
        box_loss = F.smooth_l1_loss(flat_deltas[positive], flat_targets[positive], beta=1 / 9,
                                    reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled],
                                                             torch.cat(labels)[sampled])
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}
