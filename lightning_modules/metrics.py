"""Torchmetrics used by the LightningModules."""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from topdown.metrics import average_precision, nan_mean


class LabelMAP(Metric):
    """Macro mAP over labels (area under each label's precision-recall curve, then the mean).

    Labels without a single positive in the evaluated split have no defined AP; they are
    left out of the mean instead of counting as 0. ``labels`` restricts the mean to a
    subset (e.g. the unknown labels of feedback-prop, paper §4.1). The AP is
    :func:`topdown.metrics.average_precision` (exact, ties as one threshold), so the figure
    is the same however the samples are split across DDP ranks. Rank scores (probabilities
    or logits give the same AP).
    """

    full_state_update = False

    def __init__(self, num_labels: int, labels: torch.Tensor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_labels = num_labels
        self.subset = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        if scores.shape[-1] != self.num_labels or scores.shape != target.shape:
            raise ValueError(f"LabelMAP: scores {tuple(scores.shape)} and targets {tuple(target.shape)} for "
                             f"{self.num_labels} labels")
        self.scores.append(scores.detach().float())
        self.target.append(target.detach().to(torch.uint8))

    def compute(self) -> torch.Tensor:
        if isinstance(self.scores, list) and not self.scores:  # a list until DDP synced it into a tensor
            return torch.tensor(float("nan"), device=self.device)
        ap = average_precision(dim_zero_cat(self.scores), dim_zero_cat(self.target))
        if self.subset is not None:
            ap = ap[self.subset.to(ap.device)]
        return nan_mean(ap).to(self.device)
