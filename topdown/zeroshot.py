"""Zero-shot categorisation of a transformation's amount (generators paper §3.2).

Two steps, as the paper splits them: (1) a pair of images gives per-layer
feature flows (AlexNet features, SIFT Flow: :func:`topdown.generators.feature_flows`);
(2) the learned generators map the flows to an amount,
:meth:`topdown.generators.GeneratorBank.estimate` (the Δ whose generator ``G[Δ]``
is nearest to the flow). The task: "categorize the rotation angle used in the
image pair as greater than 60° or less than 60°"; no pair of the task is seen when
the generators are learned, and amounts beyond the fitted range are extrapolated.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import torch

from topdown.generators import GeneratorBank, feature_flows

SUMMARY_COLUMNS = ("range", "pairs", "accuracy", "abs_error_mean", "abs_error_median")


def estimate_pairs(bank: GeneratorBank, extractor: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
                   batches: Iterable[Mapping], kind: str = "rotation", flow_fn: Callable | None = None
                   ) -> list[dict]:
    """Estimated amount of every valid pair of ``batches`` (dicts with ``image``, ``transformed``, ``amount``,
    ``valid`` and optionally ``index``, ``original``, ``state``).

    The flows use the bank's own settings (``meta["flow_kwargs"]``, ``meta["quantile"]``). Returns one row per
    pair: ``index``, ``original``, ``state``, ``amount`` (truth), ``estimate``.
    """
    flow_kwargs = bank.meta.get("flow_kwargs") or {}
    quantile = float(bank.meta.get("quantile", 0.99))
    rows: list[dict] = []
    for batch in batches:
        valid = batch["valid"].bool()
        if not valid.any():
            continue
        n = int(valid.sum())
        with torch.no_grad():
            feats = extractor(torch.cat((batch["image"][valid], batch["transformed"][valid])))
            feats = {k: v for k, v in feats.items() if k in bank.layout.names}
            flows = feature_flows({k: v[:n] for k, v in feats.items()}, {k: v[n:] for k, v in feats.items()},
                                  flow_fn=flow_fn, flow_kwargs=flow_kwargs, quantile=quantile)
        est = bank.estimate(kind, flows)
        extra = {k: batch[k][valid].tolist() for k in ("index", "original", "state") if k in batch}
        truth = batch["amount"][valid].tolist()
        for i in range(n):
            rows.append({**{k: v[i] for k, v in extra.items()}, "amount": truth[i], "estimate": float(est[i])})
    return rows


def angle_error(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Absolute difference of two angles in degrees, on the circle (at most 180)."""
    d = torch.remainder(estimate.double() - truth.double(), 360.0)
    return torch.minimum(d, 360.0 - d)


def categorize(truth: torch.Tensor, estimate: torch.Tensor, threshold: float = 60.0, circular: bool = True
               ) -> list[dict]:
    """The §3.2 scores: is the amount greater than ``threshold``? One row for all pairs, one per range of the
    true amount (``< threshold``, ``> threshold``): pairs, accuracy, mean and median absolute error of the
    estimated amount (on the circle when ``circular``, for angles).
    """
    truth, estimate = torch.as_tensor(truth, dtype=torch.float64), torch.as_tensor(estimate, dtype=torch.float64)
    if truth.shape != estimate.shape or truth.dim() != 1:
        raise ValueError(f"categorize: truth {tuple(truth.shape)} and estimate {tuple(estimate.shape)} must be [N]")
    correct = (estimate > threshold) == (truth > threshold)
    err = angle_error(estimate, truth) if circular else (estimate - truth).abs()
    rows = []
    for name, mask in (("all", torch.ones_like(correct)), (f"< {threshold:g}", truth <= threshold),
                       (f"> {threshold:g}", truth > threshold)):
        n = int(mask.sum())
        rows.append({"range": name, "pairs": n,
                     "accuracy": float(correct[mask].double().mean()) if n else math.nan,
                     "abs_error_mean": float(err[mask].mean()) if n else math.nan,
                     "abs_error_median": float(err[mask].median()) if n else math.nan})
    return rows
