"""maskrt.model: RoI ops, ResNet-FPN backbone, RPN, RoI heads, MaskRCNN, weight converters (torch).

Public entry points: `build_model` (presets), `MaskRCNN`, `save_model` / `load_model`.
"""
from maskrt.model.io import load_model, read_metadata, resolve_device, save_model
from maskrt.model.mask_rcnn import MaskRCNN
from maskrt.model.presets import PRESETS, build_model

__all__ = ["MaskRCNN", "PRESETS", "build_model", "load_model", "read_metadata", "resolve_device", "save_model"]
