"""maskrt.model: RoI ops, ResNet-FPN backbone, RPN, RoI heads, MaskRCNN, weight converters (torch)."""
