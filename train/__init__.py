"""maskrt.train: synthetic and COCO datasets, transforms, trainer, COCO evaluation (torch)."""
