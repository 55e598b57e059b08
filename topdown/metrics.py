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

import numpy as np
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


def average_precision(scores: torch.Tensor, labels: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Per-class average precision ``[K]`` of ``scores [N, K]`` against 0/1 ``labels [N, K]``.

    AP_k = mean over the positives p of class k of precision at p's score,
    #positives scoring >= s_p / #samples scoring >= s_p: the area under the precision-recall
    curve of feedback-prop §4.1 and §4.2, non-interpolated.  Tied scores are one threshold, so
    the result does not depend on the order of the samples (DDP ranks gather them in another
    order than one process reads them).  A class without positives gets NaN.  Scores must be
    finite; any monotone transform of them (logits or probabilities) gives the same AP.

    This is the one AP of the project: ``LabelMAP``, the feedback-prop evaluation and Table 1
    all call it.  It sorts ``block`` classes at a time on the CPU (numpy's vectorised sort) and
    never the positives' ranks of more than one class at once, so its temporaries stay at
    ``block x N`` values.
    """
    _check_batch(scores, labels, "average_precision")
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(f"average_precision: scores {tuple(scores.shape)} vs labels {tuple(labels.shape)}")
    x = scores.detach().float().cpu().numpy()
    y = labels.detach().cpu().numpy() != 0
    n, k = x.shape
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise ValueError(f"average_precision: {bad} of {x.size} scores are NaN or infinite")
    out = np.full(k, np.nan, dtype=np.float64)
    for start in range(0, k, block):
        xs = np.ascontiguousarray(x[:, start:start + block].T)  # one class per row
        ys = np.ascontiguousarray(y[:, start:start + block].T)
        ordered = np.sort(xs, axis=1)
        for j in range(xs.shape[0]):
            pos = xs[j][ys[j]]
            if pos.size:
                at_least = n - np.searchsorted(ordered[j], pos, side="left")
                pos_at_least = pos.size - np.searchsorted(np.sort(pos), pos, side="left")
                out[start + j] = np.mean(pos_at_least / at_least)
    return torch.from_numpy(out).float().to(scores.device)


def mean_average_precision(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mAP: mean of :func:`average_precision` over the classes that have a positive.

    ``target`` is class indices ``[N]`` (one-hot'd to ``scores``' width) or 0/1 labels ``[N, K]``.
    """
    labels = target if target.dim() == 2 else torch.nn.functional.one_hot(target.long(), scores.shape[1])
    return nan_mean(average_precision(scores, labels))


def nan_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of the non-NaN entries (the classes that have a positive), NaN when there is none."""
    values = values[~values.isnan()]
    return values.mean() if values.numel() else torch.tensor(float("nan"))


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
