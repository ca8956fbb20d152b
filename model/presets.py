"""Model presets and `build_model`.

A preset is an explicit dict of keyword arguments: the backbone's (`backbone_*`,
`trainable_backbone_layers`, `stride_in_1x1`, `fpn_*`) and `MaskRCNN`'s own. `build_model`
applies overrides by the same names, builds the backbone, then `MaskRCNN`; the resulting
dict is `model.config` and is what `save_model` stores, so `load_model` rebuilds the same
architecture.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

from maskrt.errors import MaskrtError
from maskrt.model.backbone import ResNet
from maskrt.model.fpn import BackboneWithFPN
from maskrt.model.mask_rcnn import MaskRCNN

# torchvision's maskrcnn_resnet50_fpn: ResNet-50 with frozen BN, layers 2-4 trainable, FPN 256,
# and every MaskRCNN default.
R50_FPN: dict[str, Any] = {
    "backbone_depth": 50,
    "backbone_norm": "frozen_bn",
    "backbone_width": 64,
    "trainable_backbone_layers": 3,
    "stride_in_1x1": False,
    "fpn_channels": 256,
    "fpn_norm": None,
    "min_size": 800,
    "max_size": 1333,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "anchor_sizes": [[32], [64], [128], [256], [512]],
    "aspect_ratios": [[0.5, 1.0, 2.0]] * 5,
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_test": 1000,
    "rpn_nms_thresh": 0.7,
    "rpn_fg_iou_thresh": 0.7,
    "rpn_bg_iou_thresh": 0.3,
    "rpn_batch_size_per_image": 256,
    "rpn_positive_fraction": 0.5,
    "rpn_score_thresh": 0.0,
    "box_score_thresh": 0.05,
    "box_nms_thresh": 0.5,
    "box_detections_per_img": 100,
    "box_fg_iou_thresh": 0.5,
    "box_bg_iou_thresh": 0.5,
    "box_batch_size_per_image": 512,
    "box_positive_fraction": 0.25,
    "bbox_reg_weights": None,
    "representation_size": 1024,
    "mask_layers": [256, 256, 256, 256],
    "mask_dim_reduced": 256,
    "roi_op": "align",
    "roi_aligned": False,
    "box_sampling_ratio": 2,
    "mask_sampling_ratio": 2,
    "roi_canonical_scale": 224.0,
    "box_head_convs": [],
    "mask_positives_per_image": None,
}

# A small detector trained from scratch on 2 CPU cores at 256 px: the ResNet-18 layout at half
# the width (stages of 32/64/128/256 channels), GroupNorm in backbone and FPN (batches of a
# few images make BN statistics useless), FPN 64, anchors 16..256 for small objects in small
# images, fewer proposals and RoIs and slimmer heads (the heads dominate CPU time).
# Measured choices (docs/training.md, one 10-minute run each; run-to-run spread ~3.5 AP): the
# RoI -> FPN level rule is halved with the anchors (canonical side 112: a 70 px object pools
# from P3, not P2), +2.2 segm AP; two 3x3 convs before the box head's fc, +3.6 segm AP (the
# fc-only head could not tell triangles from stars at random rotations).
EDGE: dict[str, Any] = {
    **R50_FPN,
    "backbone_depth": 18,
    "backbone_norm": "group",
    "backbone_width": 32,
    "trainable_backbone_layers": 5,
    "fpn_channels": 64,
    "fpn_norm": "group",
    "min_size": 256,
    "max_size": 256,
    "anchor_sizes": [[16], [32], [64], [128], [256]],
    # Per-level top-k before the RPN's NMS: the NMS cost grows with the square of the
    # candidates (~2000 per image at 600/level took a quarter of a training step).
    "rpn_pre_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_train": 300,
    "rpn_post_nms_top_n_test": 150,
    "box_batch_size_per_image": 128,
    "roi_canonical_scale": 112.0,
    "box_head_convs": [64, 64],
    # Masks are computed for every detection slot (static shapes): 50 slots halve the mask
    # head's cost against 100 and still exceed the objects of a synthetic or edge scene.
    "box_detections_per_img": 50,
    "representation_size": 256,
    "mask_layers": [64, 64, 64, 64],
    "mask_dim_reduced": 64,
    # Training only: at most 16 positive RoIs per image train the mask head (up to 32 are
    # sampled, several per object); late in a run this cut a step from 205 to 181 ms.
    "mask_positives_per_image": 16,
}

PRESETS: dict[str, dict[str, Any]] = {"r50_fpn": R50_FPN, "edge": EDGE}

BACKBONE_KEYS = ("backbone_depth", "backbone_norm", "backbone_width", "trainable_backbone_layers",
                 "stride_in_1x1", "fpn_channels", "fpn_norm")


def _model_keys() -> set[str]:
    parameters = inspect.signature(MaskRCNN.__init__).parameters
    return {name for name in parameters if name not in ("self", "backbone", "num_classes", "class_names")}


def build_model(preset: str, num_classes: int, class_names: Sequence[str] | None = None,
                **overrides: Any) -> MaskRCNN:
    """A fresh (randomly initialised) MaskRCNN of `preset` ("edge" | "r50_fpn") with
    `overrides` applied by constructor / backbone argument name."""
    if preset not in PRESETS:
        raise MaskrtError(f"unknown preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    allowed = set(BACKBONE_KEYS) | _model_keys()
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise MaskrtError(f"unknown model option(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")
    config = {**PRESETS[preset], **overrides}
    body = ResNet(depth=config["backbone_depth"], norm=config["backbone_norm"], base_width=config["backbone_width"],
                  stride_in_1x1=config["stride_in_1x1"], trainable_layers=config["trainable_backbone_layers"])
    backbone = BackboneWithFPN(body, config["fpn_channels"], config["fpn_norm"])
    model_kwargs = {key: value for key, value in config.items() if key not in BACKBONE_KEYS}
    model = MaskRCNN(backbone, num_classes, class_names, **model_kwargs)
    model.preset = preset
    model.config = config
    return model
