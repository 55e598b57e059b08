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


# (stride, offset) of AlexNet's conv grids in input pixels: feature (i, j) sits at pixel
# (stride·j + offset, stride·i + offset) (conv1 11x11/4 pad 2; pools 3x3/2 before conv2 and conv3).
ALEXNET_GRID = {"conv1": (4, 3), "conv2": (8, 7), "conv3": (16, 15), "conv4": (16, 15), "conv5": (16, 15)}


def rotation_field(layout, image_size: int, degrees: float, grid: Mapping[str, tuple[int, int]] = ALEXNET_GRID
                   ) -> torch.Tensor:
    """The flow ``[D]`` (layout order, layer pixels) of a rotation by ``degrees`` about the image centre.

    Counter-clockwise on screen (y down), as :mod:`topdown.transforms` renders it: the displacement of
    grid point ``p`` is ``(R(p - c) + c - p) / stride``. The ideal a perfect matcher would return.
    """
    t = math.radians(degrees)
    c = image_size / 2
    parts = []
    for name, (h, w) in zip(layout.names, layout.shapes):
        stride, offset = grid[name]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        dx, dy = stride * xs + offset + 0.5 - c, stride * ys + offset + 0.5 - c
        u = (math.cos(t) * dx + math.sin(t) * dy - dx) / stride
        v = (-math.sin(t) * dx + math.cos(t) * dy - dy) / stride
        parts.append(torch.cat((u.reshape(-1), v.reshape(-1))))
    return torch.cat(parts)


def estimate_pairs(bank: GeneratorBank, extractor: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
                   batches: Iterable[Mapping], kind: str = "rotation", flow_fn: Callable | None = None,
                   reference: Callable[[float], torch.Tensor] | None = None) -> list[dict]:
    """Estimated amount of every valid pair of ``batches`` (dicts with ``image``, ``transformed``, ``amount``,
    ``valid`` and optionally ``index``, ``original``, ``state``).

    The flows use the bank's own settings (``meta["flow_kwargs"]``, ``meta["quantile"]``). Returns one row per
    pair: ``index``, ``original``, ``state``, ``amount`` (truth), ``estimate``; with ``reference`` (the ideal
    flow ``[D]`` of an amount, e.g. :func:`rotation_field`) also ``flow_cosine`` and ``flow_gain``, the
    cosine and the projection ``<V, T>/|T|²`` of the measured flow ``V`` on the ideal ``T``.
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
        vec = bank.layout.flatten(flows).double() if reference is not None else None
        for i in range(n):
            row = {**{k: v[i] for k, v in extra.items()}, "amount": truth[i], "estimate": float(est[i])}
            if vec is not None:
                ideal = reference(truth[i])
                row["flow_cosine"] = float(vec[i] @ ideal / (vec[i].norm() * ideal.norm()).clamp_min(1e-12))
                row["flow_gain"] = float(vec[i] @ ideal / (ideal @ ideal).clamp_min(1e-12))
            rows.append(row)
    return rows


def generator_rows(bank: GeneratorBank, kind: str, amounts: Iterable[float],
                   reference: Callable[[float], torch.Tensor] | None = None) -> list[dict]:
    """The generator of each amount on its own: the amount :meth:`GeneratorBank.estimate` gives back for
    ``G[Δ]`` (Δ itself when the estimator is sound) and, with ``reference``, the cosine and gain of ``G[Δ]``
    against the ideal flow (as :func:`estimate_pairs` measures the pairs' flows)."""
    model = bank.models[kind]
    amounts = [float(a) for a in amounts]
    flows = torch.stack([model.flow_vector(a) for a in amounts])
    own = bank.estimate(kind, flows)
    rows = []
    for a, g, e in zip(amounts, flows, own.tolist()):
        row = {"amount": a, "own_estimate": e}
        if reference is not None:
            ideal = reference(a)
            row["cosine"] = float(g @ ideal / (g.norm() * ideal.norm()).clamp_min(1e-12))
            row["gain"] = float(g @ ideal / (ideal @ ideal).clamp_min(1e-12))
        rows.append(row)
    return rows


def by_amount(rows: list[dict], width: float = 15.0) -> list[dict]:
    """Rows of :func:`estimate_pairs` summarised per bin of the true amount: pairs, mean estimate, mean
    absolute error (on the circle), and the mean flow cosine / gain when present."""
    bins: dict[int, list[dict]] = {}
    for r in rows:
        bins.setdefault(int(r["amount"] // width), []).append(r)
    out = []
    for b in sorted(bins):
        rs = bins[b]
        truth = torch.tensor([r["amount"] for r in rs], dtype=torch.float64)
        est = torch.tensor([r["estimate"] for r in rs], dtype=torch.float64)
        row = {"amount_from": b * width, "amount_to": (b + 1) * width, "pairs": len(rs),
               "estimate_mean": float(est.mean()), "abs_error_mean": float(angle_error(est, truth).mean())}
        for key in ("flow_cosine", "flow_gain"):
            if key in rs[0]:
                row[key] = sum(r[key] for r in rs) / len(rs)
        out.append(row)
    return out


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
