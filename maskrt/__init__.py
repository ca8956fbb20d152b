"""maskrt: Mask R-CNN from PyTorch training to TensorRT deployment.

Subpackages (each lives in its own top-level folder, see pyproject.toml):
  maskrt.model    ops, backbone, FPN, RPN, heads, MaskRCNN, weight converters (torch)
  maskrt.train    datasets, transforms, trainer, COCO evaluation (torch)
  maskrt.export   ONNX export, precision, TensorRT engine build
  maskrt.plugins  the MultilevelRoIAlign plugin sources, contract and build helper (no torch)
  maskrt.runtime  torch-free inference: backends, pre/post-processing, camera loop (never torch)

This module must stay importable without torch: the runtime imports it.
"""
from maskrt.errors import MaskrtError

__version__ = "0.1.0"
__all__ = ["MaskrtError", "__version__"]
