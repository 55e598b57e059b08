"""Torchmetrics used by the LightningModules and callbacks."""
from __future__ import annotations

import torch
from torchmetrics.classification import MultilabelAveragePrecision
from torchmetrics.utilities.data import dim_zero_cat


class LabelMAP(MultilabelAveragePrecision):
    """Macro mAP over labels (area under each label's precision-recall curve, then the mean).

    Labels without a single positive in the evaluated split have no defined AP; they are
    left out of the mean instead of counting as 0. ``labels`` restricts the mean to a
    subset (e.g. the unknown labels of feedback-prop, paper §4.1).
    Exact (thresholds=None), so it is identical however the samples are split across
    DDP ranks.
    """

    def __init__(self, num_labels: int, labels: torch.Tensor | None = None, **kwargs):
        super().__init__(num_labels=num_labels, average="none", thresholds=None, **kwargs)
        self.subset = None if labels is None else torch.as_tensor(labels, dtype=torch.long)

    def compute(self) -> torch.Tensor:
        ap = super().compute()
        positives = dim_zero_cat(self.target).sum(0) > 0
        if self.subset is not None:
            ap, positives = ap[self.subset.to(ap.device)], positives[self.subset.to(ap.device)]
        if not positives.any():
            return torch.tensor(float("nan"), device=ap.device)
        return ap[positives].mean()
