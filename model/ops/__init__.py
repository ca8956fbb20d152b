"""maskrt.model.ops: RoIAlign, RoIPool, NMS, box math, anchors (pure PyTorch, vectorised)."""
