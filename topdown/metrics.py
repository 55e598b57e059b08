"""Metrics of hierarchical scene categorization (feedback-prop §4.2, Table 1), pure torch.

* MC Acc: multi-class (top-1) accuracy on the fine categories.
* mAP: average precision of each fine category (one-vs-rest ranking of its score over the test
  images), averaged over the categories that have a positive.
* IoU Acc: the intersection-over-union accuracy that feedback-prop takes from Hu et al.
  (CVPR 2016, SUN397 experiments), read as: for each fine category c,
  IoU_c = TP_c / (TP_c + FP_c + FN_c) of the top-1 predictions, averaged over the categories
  (the Jaccard index of segmentation benchmarks). With balanced test classes it is close to
  acc / (2 - acc), and every row of feedback-prop Table 1 obeys that to within 0.01
  (52.83 -> 35.90, 54.30 -> 37.27 vs 37.28, 55.01 -> 37.95), which pins the definition down.

:func:`label_set_iou` is the per-image variant (predicted label set across the hierarchy vs the
true label set) for anyone who wants a hierarchy-aware score; Table 1 does not use it.
"""
from __future__ import annotations

import torch


def _as_class_index(preds: torch.Tensor) -> torch.Tensor:
    return preds.argmax(-1) if preds.dim() == 2 else preds.long()


def _check_batch(scores: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if scores.shape[0] != target.shape[0]:
        raise ValueError(f"{what}: {scores.shape[0]} predictions for {target.shape[0]} targets")


def multiclass_accuracy(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MC Acc: fraction of images whose top-1 fine category is right.

    Args:
        preds: scores ``[N, K]`` or predicted class indices ``[N]``.
        target: true class indices ``[N]``.
    """
    _check_batch(preds, target, "multiclass_accuracy")
    if target.numel() == 0:
        return torch.tensor(float("nan"))
    return (_as_class_index(preds) == target.long()).float().mean()


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-class average precision ``[K]`` of ``scores [N, K]`` against 0/1 ``labels [N, K]``.

    AP_k = mean over the positives of the precision at their rank (non-interpolated, as in
    feedback-prop §4.1 and §4.2). A class without positives gets NaN.
    """
    _check_batch(scores, labels, "average_precision")
    if scores.shape != labels.shape:
        raise ValueError(f"average_precision: scores {tuple(scores.shape)} vs labels {tuple(labels.shape)}")
    order = scores.float().argsort(dim=0, descending=True, stable=True)
    hits = labels.float().gather(0, order)
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float32, device=scores.device).unsqueeze(1)
    precision_at_hit = hits.cumsum(0) / ranks * hits
    positives = hits.sum(0)
    ap = precision_at_hit.sum(0) / positives.clamp_min(1)
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def mean_average_precision(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mAP over the fine categories: mean of :func:`average_precision`, skipping classes with no positive.

    ``target`` is class indices ``[N]`` (one-hot'd to ``scores``' width) or 0/1 labels ``[N, K]``.
    """
    labels = target if target.dim() == 2 else torch.nn.functional.one_hot(target.long(), scores.shape[1])
    ap = average_precision(scores, labels)
    ap = ap[~ap.isnan()]
    return ap.mean() if ap.numel() else torch.tensor(float("nan"))


def confusion_counts(preds: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """Per-class true positives, false positives and false negatives ``[K]`` of top-1 predictions."""
    _check_batch(preds, target, "confusion_counts")
    pred = _as_class_index(preds)
    target = target.long()
    if pred.numel() and (int(pred.max()) >= num_classes or int(target.max()) >= num_classes):
        raise ValueError(f"confusion_counts: class index out of range for num_classes={num_classes}")
    tp = torch.bincount(target[pred == target], minlength=num_classes).float()
    pred_count = torch.bincount(pred, minlength=num_classes).float()
    true_count = torch.bincount(target, minlength=num_classes).float()
    return tp, pred_count - tp, true_count - tp


def iou_accuracy(preds: torch.Tensor, target: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """IoU Acc of Hu et al. (2016): mean over fine categories of TP / (TP + FP + FN).

    Categories that neither occur nor are predicted (0/0) are left out of the mean.

    Args:
        preds: scores ``[N, K]`` or predicted class indices ``[N]``.
        target: true class indices ``[N]``.
        num_classes: K; taken from ``preds`` when it holds scores.
    """
    if num_classes is None:
        if preds.dim() != 2:
            raise ValueError("iou_accuracy: give num_classes when preds are class indices")
        num_classes = preds.shape[1]
    tp, fp, fn = confusion_counts(preds, target, num_classes)
    union = tp + fp + fn
    seen = union > 0
    if not seen.any():
        return torch.tensor(float("nan"))
    return (tp[seen] / union[seen]).mean()


def label_set_iou(pred_labels: torch.Tensor, true_labels: torch.Tensor) -> torch.Tensor:
    """Mean over images of |P ∩ T| / |P ∪ T| for 0/1 label sets ``[N, L]`` (e.g. all hierarchy levels).

    An image with both sets empty counts as a perfect match.
    """
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"label_set_iou: {tuple(pred_labels.shape)} vs {tuple(true_labels.shape)}")
    p, t = pred_labels.bool(), true_labels.bool()
    inter = (p & t).sum(-1).float()
    union = (p | t).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).mean()


def table1_metrics(scores: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The three columns of Table 1, in percent: ``mc_acc``, ``map``, ``iou_acc``."""
    return {
        "mc_acc": 100.0 * float(multiclass_accuracy(scores, target)),
        "map": 100.0 * float(mean_average_precision(scores, target)),
        "iou_acc": 100.0 * float(iou_accuracy(scores, target)),
    }
