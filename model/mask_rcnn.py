"""MaskRCNN: the detector that ties backbone, RPN and RoI heads together.

- `model(images, targets)` in train mode -> the five losses (torchvision's names).
- `model(images)` in eval mode -> per image dict of boxes / labels / scores / masks, in the
  caller's pixels (torchvision's output format).
- `model.detect_batch(images)` -> fixed-shape tensors: the one inference forward, shared by
  eval mode and the ONNX export (normalisation inside, dynamic work only in graph ops).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from maskrt.errors import MaskrtError
from maskrt.model import ops
from maskrt.model.fpn import BackboneWithFPN
from maskrt.model.roi_heads import (ConvFCHead, FastRCNNPredictor, MaskRCNNHeads, MaskRCNNPredictor,
                                    MultiLevelRoIPooler, RoIHeads, TwoMLPHead)
from maskrt.model.rpn import RegionProposalNetwork, RPNHead
from maskrt.model.transform import (PASTE_RULES, RESIZE_RULES, batch_images, content_sizes, postprocess,
                                    resize_image, resize_target)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eager CPU inference (`model(images)` in eval mode) runs on channels-last activations;
# bench/eager.py switches it off to measure the gain.
CHANNELS_LAST_CPU = True
LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


def default_class_names(num_classes: int) -> list[str]:
    """`__background__` then `class_1 .. class_{K-1}` when the caller names no classes."""
    return ["__background__"] + [f"class_{index}" for index in range(1, num_classes)]


class MaskRCNN(nn.Module):
    """Mask R-CNN with torchvision's constructor argument names, defaults and parameter names.

    Args (beyond torchvision's): `anchor_sizes` / `aspect_ratios` (the anchor generator),
    `representation_size` (TwoMLPHead width, 1024), `mask_layers` (mask FCN widths,
    (256,)*4), `mask_dim_reduced` (deconvolution width, 256), `roi_op` ("align" | "pool"),
    `roi_aligned` (half-pixel RoIAlign, detectron2's), `box_sampling_ratio`,
    `mask_sampling_ratio` (RoIAlign points per bin axis; <= 0 adaptive),
    `roi_canonical_scale` (an RoI of this side pools from P4; the FPN paper's 224),
    `box_head_convs` (widths of 3x3 convs before a single fc in the box head; empty: the
    two-fc head), `mask_positives_per_image` (training only: at most this many positive RoIs
    per image, a random subset, train the mask head; None: all, as torchvision), `class_names`.

    Whose inference rules the model follows, each "torchvision" (the default, today's) or
    "detectron2" (what `from_detectron2` sets; docs/convert.md cites detectron2's source):
    `anchor_rule` (cell anchors rounded or not, strides; `ops.AnchorGenerator`),
    `selection_rule` (which proposals and detections survive, NMS ranking by probability or
    logit; `RegionProposalNetwork`, `RoIHeads`), `level_rule` (the RoI -> FPN level epsilon;
    `MultiLevelRoIPooler`), `resize_rule` (size rounding and pixels of the eval resize:
    detectron2's is PIL's bilinear on uint8; also written into the exported graph's metadata
    with min_size / max_size, where the runtime reads it) and `paste_rule` (how masks are pasted into the image; also written into the
    exported graph's metadata, where the runtime reads it).
    """

    def __init__(self, backbone: BackboneWithFPN, num_classes: int, class_names: Sequence[str] | None = None, *,
                 min_size: int | Sequence[int] = 800, max_size: int = 1333,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 anchor_sizes: Sequence[Sequence[int]] = ((32,), (64,), (128,), (256,), (512,)),
                 aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 5,
                 rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
                 rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int = 1000,
                 rpn_nms_thresh: float = 0.7, rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 rpn_score_thresh: float = 0.0,
                 box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5, box_detections_per_img: int = 100,
                 box_fg_iou_thresh: float = 0.5, box_bg_iou_thresh: float = 0.5,
                 box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25,
                 bbox_reg_weights: Sequence[float] | None = None,
                 representation_size: int = 1024, mask_layers: Sequence[int] = (256, 256, 256, 256),
                 mask_dim_reduced: int = 256, roi_op: str = "align", roi_aligned: bool = False,
                 box_sampling_ratio: int = 2, mask_sampling_ratio: int = 2,
                 roi_canonical_scale: float = 224.0, box_head_convs: Sequence[int] = (),
                 mask_positives_per_image: int | None = None, anchor_rule: str = "torchvision",
                 selection_rule: str = "torchvision", level_rule: str = "torchvision",
                 resize_rule: str = "torchvision", paste_rule: str = "torchvision") -> None:
        super().__init__()
        for name, value, choices in (("resize_rule", resize_rule, RESIZE_RULES), ("paste_rule", paste_rule, PASTE_RULES)):
            if value not in choices:
                raise MaskrtError(f"unknown {name} {value!r}: choose {' or '.join(map(repr, choices))}")
        self.resize_rule = resize_rule
        self.paste_rule = paste_rule
        if num_classes < 2:
            raise MaskrtError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
        if mask_positives_per_image is not None and mask_positives_per_image < 1:
            raise MaskrtError(f"mask_positives_per_image must be >= 1 or None (all), got {mask_positives_per_image}")
        names = list(class_names) if class_names is not None else default_class_names(num_classes)
        if len(names) != num_classes:
            raise MaskrtError(f"{len(names)} class names for {num_classes} classes (include '__background__' first)")
        self.num_classes = num_classes
        self.class_names = names
        self.category_ids = list(range(num_classes))
        self.preset = "custom"
        self.config: dict[str, Any] = {}
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (int(min_size),)
        self.max_size = int(max_size)
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_STD)
        # Not persistent: the state dict holds exactly torchvision's keys.
        self.register_buffer("pixel_mean", torch.tensor(self.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.image_std).view(1, 3, 1, 1), persistent=False)

        self.backbone = backbone
        channels = backbone.out_channels
        anchor_generator = ops.AnchorGenerator(anchor_sizes, aspect_ratios, anchor_rule)
        self.rpn = RegionProposalNetwork(
            anchor_generator, RPNHead(channels, anchor_generator.num_anchors_per_location()[0]),
            rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_batch_size_per_image, rpn_positive_fraction,
            {"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            {"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            rpn_nms_thresh, rpn_score_thresh, selection_rule)
        box_pool = MultiLevelRoIPooler(7, box_sampling_ratio, roi_aligned, roi_op, roi_canonical_scale,
                                       level_rule=level_rule)
        mask_pool = MultiLevelRoIPooler(14, mask_sampling_ratio, roi_aligned, roi_op, roi_canonical_scale,
                                        level_rule=level_rule)
        self.roi_heads = RoIHeads(
            box_pool, (ConvFCHead(channels, box_head_convs, representation_size) if box_head_convs
                       else TwoMLPHead(channels * 7 * 7, representation_size)),
            FastRCNNPredictor(representation_size, num_classes),
            box_fg_iou_thresh, box_bg_iou_thresh, box_batch_size_per_image, box_positive_fraction,
            bbox_reg_weights, box_score_thresh, box_nms_thresh, box_detections_per_img,
            mask_pool, MaskRCNNHeads(channels, mask_layers),
            MaskRCNNPredictor(mask_layers[-1], mask_dim_reduced, num_classes), mask_positives_per_image,
            selection_rule)

    @property
    def mask_size(self) -> int:
        """Side of the predicted masks (2x the mask pooler's output, 28 by default)."""
        return 2 * self.roi_heads.mask_roi_pool.output_size

    @property
    def detections_per_img(self) -> int:
        return self.roi_heads.detections_per_img

    # --- entry points ---------------------------------------------------------------------

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Train mode: images + targets -> dict of the five losses. Eval mode: images ->
        list of {boxes [N,4], labels [N], scores [N], masks [N,1,H,W]} in the images' pixels."""
        if self.training:
            if targets is None:
                raise MaskrtError("training needs targets: call model(images, targets) or model.eval() first")
            return self.forward_train(images, targets)
        return self.forward_eval(images)

    def detect_batch(self, images: Tensor, image_sizes: Tensor | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The inference forward with static shapes.

        images: float [B, 3, H, W] RGB in [0, 1], H and W multiples of 32, each image top-left,
        padding filled with exactly `image_mean`. image_sizes: optional int64 [B, 2] (h, w) of
        the unpadded content, to which boxes are clipped as torchvision and detectron2 clip
        them; default (and in the exported graph) `content_sizes`, read from the padding.

        Returns num_dets int32 [B], boxes [B, D, 4] (input pixels), scores [B, D],
        labels int64 [B, D], masks [B, D, M, M] probabilities; entries past num_dets are 0.
        """
        padded_size = (int(images.shape[-2]), int(images.shape[-1]))
        if image_sizes is None:
            image_sizes = content_sizes(images, self.pixel_mean.to(images.dtype))
        features = self.backbone(self.normalize(images))
        proposals, valid, _, _, _ = self.rpn(features, padded_size, image_sizes)
        return self.roi_heads.detect(features[:-1], proposals, valid, padded_size, image_sizes)

    def normalize(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> (x - mean) / std per channel."""
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    # --- eval -----------------------------------------------------------------------------

    def forward_eval(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Resize + pad (torchvision's transform), `detect_batch`, then boxes and masks back to
        each image's own pixels."""
        self._check_images(images)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        resized = [resize_image(img, self.min_size[-1], self.max_size, self.resize_rule) for img in images]
        resized_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in resized]
        batch = batch_images(resized, self.image_mean)
        if batch.device.type == "cpu" and CHANNELS_LAST_CPU:
            # Channels-last activations on the CPU: oneDNN's convolutions run faster on them than on
            # NCHW (every conv, the 1x1s at one thread and the mask deconvolution most), and the
            # native RoIAlign reads the FPN maps in place (docs/performance.md). Same numbers to
            # float32 rounding; the weights keep their layout, and detect_batch (the exported
            # forward) is unchanged.
            batch = batch.contiguous(memory_format=torch.channels_last)
        sizes = torch.tensor(resized_sizes, dtype=torch.int64, device=batch.device)
        with torch.no_grad():
            num_dets, boxes, scores, labels, masks = self.detect_batch(batch, sizes)
        results = []
        for index, (resized_size, original_size) in enumerate(zip(resized_sizes, original_sizes)):
            count = int(num_dets[index])
            out_boxes, out_masks = postprocess(boxes[index, :count], masks[index, :count], resized_size, original_size,
                                               self.paste_rule)
            out_labels, out_scores = labels[index, :count], scores[index, :count]
            if self.paste_rule == "detectron2":
                # detector_postprocess (postprocessing.py line 58): boxes empty after scaling go.
                nonempty = (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
                out_boxes, out_masks = out_boxes[nonempty], out_masks[nonempty]
                out_labels, out_scores = out_labels[nonempty], out_scores[nonempty]
            results.append({"boxes": out_boxes, "labels": out_labels, "scores": out_scores, "masks": out_masks})
        return results

    # --- training -------------------------------------------------------------------------

    def forward_train(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """torchvision's training forward: resize images and targets (random min_size choice
        when several are given), pad, RPN losses on the anchors, RoI-head losses on sampled
        proposals with the gt boxes appended."""
        self._check_images(images)
        self._check_targets(images, targets)
        resized_images, resized_targets = [], []
        for image, target in zip(images, targets):
            # A host-side draw (CPU generator on every device: the same choice on CPU and CUDA).
            size = self.min_size[int(torch.empty(1, device="cpu").uniform_(0.0, float(len(self.min_size))).item())]
            resized = resize_image(image, size, self.max_size)
            original_hw = (int(image.shape[-2]), int(image.shape[-1]))
            new_hw = (int(resized.shape[-2]), int(resized.shape[-1]))
            resized_images.append(resized)
            resized_targets.append(resize_target(target, original_hw, new_hw, size, self.max_size))
        batch = batch_images(resized_images, self.image_mean)
        padded_size = (int(batch.shape[-2]), int(batch.shape[-1]))
        image_sizes = torch.tensor([tuple(img.shape[-2:]) for img in resized_images], dtype=torch.int64,
                                   device=batch.device)
        features = self.backbone(self.normalize(batch))
        proposals, valid, objectness, deltas, anchors = self.rpn(features, padded_size, image_sizes)
        losses = self.rpn.compute_loss(objectness, deltas, anchors, resized_targets)
        proposal_lists = [proposals[index][valid[index]] for index in range(proposals.shape[0])]
        losses.update(self.roi_heads.losses(features[:-1], proposal_lists, padded_size, resized_targets))
        return {name: losses[name] for name in LOSS_NAMES}

    # --- input checks ---------------------------------------------------------------------

    @staticmethod
    def _check_images(images: Sequence[Tensor]) -> None:
        if isinstance(images, Tensor) and images.dim() == 3:
            raise MaskrtError("pass a list of images ([3, H, W] tensors), not a single image tensor")
        if len(images) == 0:
            raise MaskrtError("no images given")
        for image in images:
            if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
                shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise MaskrtError(f"each image must be an RGB float tensor [3, H, W], got {shape}")
            if not image.is_floating_point():
                raise MaskrtError(f"images must be float tensors in [0, 1], got dtype {image.dtype}")

    def _check_targets(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]) -> None:
        if len(targets) != len(images):
            raise MaskrtError(f"{len(images)} images but {len(targets)} targets")
        for index, (image, target) in enumerate(zip(images, targets)):
            for key in ("boxes", "labels", "masks"):
                if key not in target:
                    raise MaskrtError(f"target {index} has no {key!r}")
            boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
                raise MaskrtError(f"target {index}: boxes must be float [N, 4], got {tuple(boxes.shape)} {boxes.dtype}")
            if labels.shape != boxes.shape[:1] or labels.dtype != torch.int64:
                raise MaskrtError(f"target {index}: labels must be int64 [N] matching boxes, got {tuple(labels.shape)} {labels.dtype}")
            if masks.shape != (boxes.shape[0], *image.shape[-2:]):
                raise MaskrtError(f"target {index}: masks must be [N, H, W] = {(boxes.shape[0], *image.shape[-2:])}, "
                                  f"got {tuple(masks.shape)}")
            if boxes.numel() and bool(((boxes[:, 2:] <= boxes[:, :2]).any())):
                raise MaskrtError(f"target {index}: degenerate box (x2 <= x1 or y2 <= y1)")
            if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) >= self.num_classes):
                raise MaskrtError(f"target {index}: labels must be in 1..{self.num_classes - 1}")

    def describe(self) -> dict[str, Any]:
        """The metadata `save_model` writes (preset, classes, constructor kwargs)."""
        return {"preset": self.preset, "num_classes": self.num_classes, "class_names": list(self.class_names),
                "category_ids": list(self.category_ids), "config": copy.deepcopy(self.config)}
