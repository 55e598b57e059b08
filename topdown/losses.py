"""Losses of the feedback-prop paper."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def label_weights(labels: torch.Tensor) -> torch.Tensor:
    """lambda_j = #negatives / #positives of label j over the training split (feedback-prop eq. 6).

    A label with no positive gets the largest finite weight so it cannot blow up the loss.
    """
    labels = labels.float()
    pos = labels.sum(0)
    neg = labels.shape[0] - pos
    w = neg / pos.clamp_min(1)
    finite = w[pos > 0]
    if finite.numel():
        w = torch.where(pos > 0, w, finite.max())
    return w


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted binary cross-entropy of feedback-prop eq. 6.

    L = - sum_j (1/N) sum_i lambda_j [y_ij log s(f_j) + (1 - y_ij) log(1 - s(f_j))]

    lambda_j weighs both terms of label j (as written in eq. 6), so rare labels count more;
    the sum runs over labels and the mean over the N samples of the batch.
    """
    per_entry = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    if weights is not None:
        per_entry = per_entry * weights.to(per_entry)
    return per_entry.sum(1).mean()
