"""Losses of the feedback-prop paper."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F


def label_weights(labels: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
    """lambda_j = #negatives / #positives of label j over the training split (feedback-prop eq. 6), float32 [K].

    ``labels`` is the 0/1 matrix [N, K] (any dtype; counted without a float copy). A label with no
    positive would get an infinite weight; it gets the largest finite weight instead, with a
    warning naming the labels (``names[j]`` when given).
    """
    labels = torch.as_tensor(labels)
    pos = labels.sum(0, dtype=torch.float64)
    w = (labels.shape[0] - pos) / pos.clamp_min(1)
    missing = pos == 0
    if missing.any():
        finite = w[~missing]
        fill = float(finite.max()) if finite.numel() else 1.0
        idx = missing.nonzero().flatten().tolist()
        words = [names[j] if names is not None else str(j) for j in idx]
        warnings.warn(f"{len(words)} labels have no positive training image ({', '.join(words[:10])}"
                      f"{', ...' if len(words) > 10 else ''}); their weight is the largest finite one, {fill:.1f}",
                      stacklevel=2)
        w = torch.where(missing, torch.full_like(w, fill), w)
    return w.float()


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
