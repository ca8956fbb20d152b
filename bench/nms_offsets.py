"""How often the coordinate-offset form of batched NMS keeps other detections than an exact
per-class NMS, on box-head-like data (docs/convert.md, "Remaining differences" 1).

    .venv/bin/python bench/nms_offsets.py [--trials 300] [--background-bias 9]

torchvision's `batched_nms` (which detectron2's calls) shifts each class's boxes by
`class * (max coordinate + 1)` and runs one NMS when there are at most 4000 box coordinates on
CPU; the float32 shifted coordinates round. Per trial: 1000 proposals around 30 objects of
12-660 px in a 1333x800 image, class-specific boxes jittered by 3 px, 81-way softmax of logits
N(0, 3) with the background's raised by --background-bias (fewer candidates), candidates
score > 0.05, IoU 0.5. Compares the top 100 kept by (a) an exact per-class NMS (maskrt's
`batched_nms`, the PyTorch model's), (b) torchvision's offsets (class j, max over the
candidates) and (c) the exported graph's (label j + 1, max over all of the image's boxes).
Greedy NMS with torchvision's IoU arithmetic (maskrt.model.ops.nms) throughout.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from maskrt.model.ops.nms import batched_nms, nms


def shifted_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, offset_max: torch.Tensor,
                iou: float) -> torch.Tensor:
    """One NMS on boxes shifted by group * (offset_max + 1) (torchvision's `_batched_nms_coordinate_trick`)."""
    offsets = groups.to(boxes) * (offset_max + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou)


def trial(seed: int, background_bias: float) -> tuple[int, bool, bool]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(30, 2, generator=g) * torch.tensor([1333.0, 800.0])
    sizes = torch.exp(torch.rand(30, 2, generator=g) * 4 + 2.5)
    owner = torch.randint(0, 30, (1000,), generator=g)
    jitter = 1 + 0.35 * torch.randn(1000, 2, generator=g)
    centre = centres[owner] + sizes[owner] * 0.25 * torch.randn(1000, 2, generator=g)
    side = sizes[owner] * jitter.abs()
    proposals = torch.cat([centre - side / 2, centre + side / 2], 1)
    logits = torch.randn(1000, 81, generator=g) * 3
    logits[:, 80] += background_bias
    probs = torch.softmax(logits, 1)[:, :80]
    boxes = (proposals[:, None, :] + 3 * torch.randn(1000, 80, 4, generator=g)).clamp(min=0)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(max=1333)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(max=800)
    candidate = probs > 0.05
    cand_boxes, cand_scores = boxes[candidate], probs[candidate]
    classes = candidate.nonzero()[:, 1]
    exact = batched_nms(cand_boxes, cand_scores, classes, 0.5)[:100]
    torchvision_offsets = shifted_nms(cand_boxes, cand_scores, classes, cand_boxes.max(), 0.5)[:100]
    graph_offsets = shifted_nms(cand_boxes, cand_scores, classes + 1, boxes.max(), 0.5)[:100]
    return cand_boxes.shape[0], not torch.equal(exact, torchvision_offsets), not torch.equal(exact, graph_offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300, help="images to draw")
    parser.add_argument("--background-bias", type=float, default=9.0, help="added to the background logit")
    args = parser.parse_args()
    results = [trial(seed, args.background_bias) for seed in range(args.trials)]
    counts = [r[0] for r in results]
    print(f"{args.trials} images, candidates per image median {int(np.median(counts))} "
          f"(min {min(counts)}, max {max(counts)}); top-100 differs from exact per-class NMS: "
          f"torchvision's offsets {sum(r[1] for r in results)}, the graph's offsets {sum(r[2] for r in results)}")


if __name__ == "__main__":
    main()
