"""Training-time assignment of ground truth to anchors / proposals, and minibatch sampling.

`Matcher` and `BalancedPositiveNegativeSampler` reproduce torchvision's
(`models/detection/_utils.py`) rules, including the low-quality-match ties and the use of
`torch.randperm` (so a seeded run samples the same anchors as torchvision would).
"""
from __future__ import annotations

import torch
from torch import Tensor

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matcher:
    """Assign each prediction (anchor or proposal) the index of its best ground-truth box.

    Returns int64 [N]: a gt index for quality >= high_threshold, BELOW_LOW_THRESHOLD (-1) for
    quality < low_threshold, BETWEEN_THRESHOLDS (-2) in between. With
    `allow_low_quality_matches`, every prediction tied for the best quality with some gt gets
    its best gt even if below the threshold (so each gt gets at least one anchor).
    """

    def __init__(self, high_threshold: float, low_threshold: float,
                 allow_low_quality_matches: bool = False) -> None:
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        """match_quality_matrix: [G, N] (gt x predictions) -> matches int64 [N]."""
        if match_quality_matrix.numel() == 0:
            raise ValueError("Matcher needs at least one ground-truth box and one prediction")
        matched_vals, matches = match_quality_matrix.max(dim=0)
        best_matches = matches.clone() if self.allow_low_quality_matches else None
        below = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[below] = BELOW_LOW_THRESHOLD
        matches[between] = BETWEEN_THRESHOLDS
        if best_matches is not None:
            highest_per_gt = match_quality_matrix.max(dim=1).values
            # All (gt, prediction) pairs achieving that gt's best quality, ties included.
            _, pred_indices = torch.where(match_quality_matrix == highest_per_gt[:, None])
            matches[pred_indices] = best_matches[pred_indices]
        return matches


class BalancedPositiveNegativeSampler:
    """Sample up to `batch_size_per_image` entries per image, at most `positive_fraction` of
    them positive (label >= 1), the rest negative (label == 0); label -1 is ignored."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """labels: per image int/float [N_i] -> (positive masks, negative masks), bool [N_i] each."""
        positive_masks, negative_masks = [], []
        for labels_per_image in labels:
            positive = torch.where(labels_per_image >= 1)[0]
            negative = torch.where(labels_per_image == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            chosen_pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            chosen_neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            pos_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            neg_mask = torch.zeros_like(labels_per_image, dtype=torch.bool)
            pos_mask[chosen_pos] = True
            neg_mask[chosen_neg] = True
            positive_masks.append(pos_mask)
            negative_masks.append(neg_mask)
        return positive_masks, negative_masks
