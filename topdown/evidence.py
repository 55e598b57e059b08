"""Partial evidence for feedback-prop evaluation (Wang et al., CVPR 2018, §4.1 and §5).

The multi-label protocol of §4.1 splits the label vocabulary once into a fixed set of
*unknown* labels (500 of COCO's 1000; by default half of the vocabulary) and its complement,
from which the *known* labels of each evaluation are drawn: the sweep over "the amount of
known labels, from 50 to the total complement set of 500" with "5 rounds with randomly
sampled labels" when not all of the complement is known (Figure 4). §5 (Tables 3-5) uses
the whole complement as evidence and compares pivot layers.

This module is pure (torch, numpy; matplotlib is imported only by the plot helpers): the
label splits and their file, the draws of known labels, what a model's evaluation keeps and
computes (:class:`Evidence`: multi-label known/unknown labels, §4.1; coarse scene labels,
§4.2), the choice of λ and T on validation curves (:func:`select_setting`), the summary over
draws, how much metric state fits in memory, and the result tables, CSV files and figures
that the protocols of ``evaluate.py`` write; :func:`extend_grid` (a λ grid that brackets the validation
optimum) and :func:`paired_differences` (differences of rows that share each run's split).
"""
from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch

# Pivots of Figure 4 (§4.1: "Conv5, 10, 13"), in the paper's names
FIGURE4_LAYERS = {
    "resnet18": ("conv5", "conv10", "conv13"),
    "vgg16": ("conv5", "conv10", "conv13"),
}

# Candidate pivots of the layer-wise analysis (§5, Tables 3-5), in the paper's names
# (resolved by topdown.layers); "input" is the image itself (eq. 1).
PAPER_LAYERS = {
    "resnet18": ("input", "conv1", "conv5", "conv9", "conv13", "conv17"),
    "resnet50": ("input", "conv1", "conv10", "conv22", "conv40", "conv49"),
    "vgg16": ("input", "conv1", "conv4", "conv7", "conv10", "conv13"),
}


# ---------------------------------------------------------------------------------------
# The fixed unknown labels (§4.1) and their file
# ---------------------------------------------------------------------------------------

def draw_unknown_labels(num_labels: int, num_unknown: int | None = None, seed: int = 0) -> torch.Tensor:
    """A random set of ``num_unknown`` label indices (default: half of ``num_labels``), sorted.

    §4.1 puts aside "a fixed set of 500 targets as unknown" out of 1000.
    """
    if num_labels < 2:
        raise ValueError(f"a known/unknown split needs at least 2 labels, got num_labels={num_labels}")
    if num_unknown is None:
        num_unknown = num_labels // 2
    if not 0 < num_unknown < num_labels:
        raise ValueError(f"num_unknown must be in [1, {num_labels - 1}] for {num_labels} labels, got {num_unknown}")
    rng = np.random.default_rng([seed, num_labels, num_unknown])
    return torch.from_numpy(np.sort(rng.choice(num_labels, num_unknown, replace=False))).long()


def save_label_split(path: str | Path, unknown: torch.Tensor, vocabulary: Sequence[str]) -> Path:
    """Write the unknown labels, one ``index<TAB>word`` line each (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{int(i)}\t{vocabulary[int(i)]}" for i in unknown.tolist()]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # DDP ranks may write at once
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def load_label_split(path: str | Path, vocabulary: Sequence[str]) -> torch.Tensor:
    """Read an unknown-label file: ``index<TAB>word`` lines, or bare words (one a line).

    Each line is checked against ``vocabulary``: a word that is not in it, or an index
    whose word differs (the file was made for another vocabulary), is an error naming the
    file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"unknown-label file not found: {path}")
    word_index = {w: i for i, w in enumerate(vocabulary)}
    out: list[int] = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) == 2 and parts[0].lstrip("-").isdigit():
            idx, word = int(parts[0]), parts[1]
            if not 0 <= idx < len(vocabulary) or vocabulary[idx] != word:
                have = vocabulary[idx] if 0 <= idx < len(vocabulary) else "out of range"
                raise ValueError(f"{path}:{n}: label {idx} is {word!r} in the file but {have!r} in the "
                                 f"vocabulary of {len(vocabulary)} words; the file belongs to another vocabulary")
        elif len(parts) == 1:
            word = parts[0]
            if word not in word_index:
                raise ValueError(f"{path}:{n}: word {word!r} is not in the vocabulary of {len(vocabulary)} words")
            idx = word_index[word]
        else:
            raise ValueError(f"{path}:{n}: expected 'index<TAB>word' or a single word, got {raw!r}")
        out.append(idx)
    if not out:
        raise ValueError(f"unknown-label file {path} lists no labels")
    if len(set(out)) != len(out):
        raise ValueError(f"unknown-label file {path} lists a label twice")
    if len(out) >= len(vocabulary):
        raise ValueError(f"unknown-label file {path} lists all {len(vocabulary)} labels; none is left as known")
    return torch.tensor(sorted(out), dtype=torch.long)


def unknown_labels(path: str | Path, vocabulary: Sequence[str], num_unknown: int | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, bool]:
    """The fixed unknown labels of §4.1: read from ``path`` when it exists, else drawn and saved.

    Once the file exists it wins over ``num_unknown`` and ``seed``, so every later
    evaluation uses the same split. Returns ``(indices, created)``.
    """
    path = Path(path)
    if path.is_file():
        unknown = load_label_split(path, vocabulary)
        if num_unknown is not None and len(unknown) != num_unknown:
            raise ValueError(f"unknown-label file {path} holds {len(unknown)} labels but num_unknown={num_unknown}; "
                             "remove the file or pass another unknown_file")
        return unknown, False
    unknown = draw_unknown_labels(len(vocabulary), num_unknown, seed)
    save_label_split(path, unknown, vocabulary)
    return unknown, True


def complement(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """The label indices of ``range(num_labels)`` not in ``labels``, sorted."""
    keep = torch.ones(num_labels, dtype=torch.bool)
    keep[labels.long()] = False
    return keep.nonzero().flatten()


# ---------------------------------------------------------------------------------------
# Known labels: counts and random draws (Figure 4)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class KnownDraw:
    """One set of known labels: the ``draw``-th random sample of ``num_known`` labels."""

    num_known: int
    draw: int
    labels: torch.Tensor  # sorted label indices


def known_counts(num_candidates: int, steps: int = 10) -> list[int]:
    """``steps`` evenly spaced amounts of known labels up to the whole complement.

    For COCO's complement of 500 and 10 steps: 50, 100, ..., 500 (Figure 4).
    """
    if num_candidates < 1:
        raise ValueError(f"no label is left to be known (complement of size {num_candidates})")
    steps = max(1, min(steps, num_candidates))
    counts = sorted({max(1, round(num_candidates * i / steps)) for i in range(1, steps + 1)})
    return counts


def known_label_draws(unknown: torch.Tensor, num_labels: int, counts: Iterable[int] | int | None = None,
                      draws: int = 5, seed: int = 0) -> list[KnownDraw]:
    """Known-label sets for each count: all of the complement of ``unknown`` as one draw when
    the count is the complement's size, else ``draws`` random samples of it (§4.1: "5 rounds").

    A count's draws depend only on ``(seed, count, draw)``, not on the other counts asked for.
    ``counts=None`` means the whole complement.
    """
    pool = complement(unknown, num_labels)
    if counts is None:
        counts = [len(pool)]
    elif isinstance(counts, int):
        counts = [counts]
    counts = list(counts)
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    out: list[KnownDraw] = []
    for k in counts:
        if not 0 < k <= len(pool):
            raise ValueError(f"num_known={k} is out of range: {len(pool)} labels are not unknown")
        if k == len(pool):
            out.append(KnownDraw(k, 0, pool.clone()))
            continue
        for d in range(draws):
            rng = np.random.default_rng([seed, k, d])
            pick = np.sort(rng.choice(len(pool), k, replace=False))
            out.append(KnownDraw(k, d, pool[torch.from_numpy(pick)]))
    return out


# ---------------------------------------------------------------------------------------
# Evidence: what a feedback-prop evaluation reads, runs, keeps and computes for one model
# ---------------------------------------------------------------------------------------

class Evidence:
    """How a model's feedback-prop evaluation uses its batches (the protocols and
    ``callbacks.feedback.FeedbackPropCallback`` are written against this).

    Per batch the callback takes the valid rows (:meth:`batch`), runs feedback-prop on the inputs
    repeated once per known-evidence draw with :meth:`known_loss`, and keeps
    :meth:`scores` of the outputs: all of them once from the plain forward pass (t = 0, the
    same for every setting and draw), and :meth:`part` for each draw at the reported
    iterations.  :meth:`evaluate` turns kept scores and :meth:`target` into the figures
    :attr:`metrics` (the first is the primary one; :attr:`criterion` picks λ and T on val).

    Subclasses: :class:`MultiLabelEvidence` (§4.1, §5), :class:`CoarseLabelEvidence` (§4.2).
    """

    metrics: tuple[str, ...] = ()
    criterion: tuple[str, ...] = ()
    headers: dict[str, str] = {}  # column titles of the printed tables
    scale: float = 1.0  # printed value = scale x figure (100 for fractions shown in percent)
    amount: str = "num_known"  # the record column of how much is known: summaries have a row per value
    draws: list[KnownDraw]

    def setup(self, model: Any, datamodule: Any = None) -> None:
        """Read what depends on the model or the data (called when an evaluation starts)."""

    def describe(self, d: int) -> dict:
        """The record columns that name draw ``d``: :attr:`amount` and the draw's number."""
        return {"num_known": self.draws[d].num_known, "draw": self.draws[d].draw}

    def batch(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The inputs and the context (known values, targets) of the valid rows."""
        valid = batch["valid"]
        return batch["image"][valid], {k: v[valid] for k, v in batch.items()
                                       if isinstance(v, torch.Tensor) and v.shape[:1] == valid.shape and k != "image"}

    def known_loss(self, context: dict, draws: Sequence[int], rows: slice) -> Callable:
        """L(Y_k, Ŷ_k) per sample for ``rows`` of the batch repeated once per draw (draw-major)."""
        raise NotImplementedError

    def no_evidence(self, context: dict, draws: Sequence[int], rows: slice) -> torch.Tensor | None:
        """bool ``[len(draws) * B]`` (draw-major, as :meth:`known_loss`): the samples that know
        nothing.  They keep the plain forward's scores at every iteration (with nothing known the
        update rule's weight decay alone would move their pivots).  None: every sample knows something."""
        return None

    def scores(self, outputs: Any) -> torch.Tensor:
        """``[B, K]``: what the figures are computed from, for all draws."""
        raise NotImplementedError

    def part(self, scores: torch.Tensor, d: int) -> torch.Tensor:
        """``[B, C_d]``: the part of :meth:`scores` draw ``d``'s figures need."""
        return scores

    def width(self, d: int | None = None) -> int:
        """C_d (K for ``None``): columns kept per sample, for sizing the metric state."""
        raise NotImplementedError

    def target(self, context: dict) -> torch.Tensor:
        """Per-sample targets, kept once."""
        raise NotImplementedError

    def target_bytes(self) -> int:
        """Bytes of one sample's :meth:`target`."""
        raise NotImplementedError

    def empty_target(self) -> torch.Tensor:
        """:meth:`target` of no sample (a DDP rank without a valid image still takes part)."""
        raise NotImplementedError

    def with_draws(self, indices: Sequence[int]) -> "Evidence":
        """The same evidence restricted to some draws (one pass of a protocol run in parts)."""
        if list(indices) == list(range(len(self.draws))):
            return self
        raise NotImplementedError

    def evaluate(self, scores: torch.Tensor, target: torch.Tensor, d: int) -> dict[str, float]:
        """The figures of draw ``d`` from its kept scores ``[N, C_d]``."""
        raise NotImplementedError

    def evaluate_plain(self, scores: torch.Tensor, target: torch.Tensor) -> list[dict[str, float]]:
        """The figures at t = 0 for every draw, from the plain forward's scores ``[N, K]``."""
        return [self.evaluate(self.part(scores, d), target, d) for d in range(len(self.draws))]


class MultiLabelEvidence(Evidence):
    """§4.1: a fixed set of unknown labels; each draw knows the true values of some others.

    Figures: ``map_unknown`` (the paper's) and ``map_known`` (what feedback-prop fits), exact
    mAP over the labels with a positive in the split.  ``draws`` default to the whole
    complement of ``unknown``, one draw; ``key`` names the head of a dict-output model.
    """

    metrics = ("map_unknown", "map_known")
    criterion = ("map_unknown",)
    headers = {"map_unknown": "mAP unknown", "map_known": "mAP known"}
    scale = 100.0

    def __init__(self, unknown: torch.Tensor, draws: Sequence[KnownDraw] | None = None, num_labels: int | None = None,
                 key: str | None = None):
        self.unknown = torch.as_tensor(unknown).long()
        self.draws = None if draws is None else list(draws)
        self.num_labels, self.key = num_labels, key
        if num_labels is not None:
            self._check()

    def setup(self, model: Any, datamodule: Any = None) -> None:
        if self.num_labels is None:
            hparams = getattr(model, "hparams", {})
            n = hparams.get("num_labels") if hasattr(hparams, "get") else None
            n = n if n is not None else getattr(datamodule, "num_labels", None)
            if n is None:
                raise ValueError("feedback-prop evaluation: cannot tell the number of labels (no hparams.num_labels "
                                 "on the module and no num_labels on the datamodule)")
            self.num_labels = int(n)
            self._check()

    def _check(self) -> None:
        if self.unknown.numel() and int(self.unknown.max()) >= self.num_labels:
            raise ValueError(f"unknown label {int(self.unknown.max())} is out of range for {self.num_labels} labels")
        if self.draws is None:
            self.draws = known_label_draws(self.unknown, self.num_labels)
        unknown = set(self.unknown.tolist())
        for d in self.draws:
            if set(d.labels.tolist()) & unknown:
                raise ValueError(f"known draw (num_known={d.num_known}, draw={d.draw}) overlaps the unknown labels")
        self.columns = [torch.cat([self.unknown, d.labels.long()]) for d in self.draws]

    def known_loss(self, context: dict, draws: Sequence[int], rows: slice) -> Callable:
        from topdown.feedback import multilabel_known_loss

        labels = context["labels"][rows]
        b = labels.shape[0]
        y = labels.repeat(len(draws), 1)
        mask = torch.zeros_like(y, dtype=torch.bool)
        for j, d in enumerate(draws):
            mask[j * b:(j + 1) * b, self.draws[d].labels.to(mask.device)] = True
        return multilabel_known_loss(mask, y, key=self.key)

    def scores(self, outputs: Any) -> torch.Tensor:
        out = outputs[self.key] if self.key is not None else outputs
        return out.flatten(1)

    def part(self, scores: torch.Tensor, d: int) -> torch.Tensor:
        return scores[:, self.columns[d].to(scores.device)]

    def width(self, d: int | None = None) -> int:
        return self.num_labels if d is None else len(self.columns[d])

    def target(self, context: dict) -> torch.Tensor:
        return context["labels"].to(torch.uint8)

    def target_bytes(self) -> int:
        return self.num_labels

    def empty_target(self) -> torch.Tensor:
        return torch.zeros(0, self.num_labels, dtype=torch.uint8)

    def with_draws(self, indices: Sequence[int]) -> "MultiLabelEvidence":
        return MultiLabelEvidence(self.unknown, [self.draws[i] for i in indices], self.num_labels, self.key)

    def evaluate(self, scores: torch.Tensor, target: torch.Tensor, d: int) -> dict[str, float]:
        from topdown.metrics import average_precision, nan_mean

        ap = average_precision(scores, target[:, self.columns[d]])
        u = len(self.unknown)
        return {"map_unknown": float(nan_mean(ap[:u])), "map_known": float(nan_mean(ap[u:]))}

    def evaluate_plain(self, scores: torch.Tensor, target: torch.Tensor) -> list[dict[str, float]]:
        from topdown.metrics import average_precision, nan_mean

        ap = average_precision(scores, target)  # every label once: each draw's t = 0 is a subset
        unknown = float(nan_mean(ap[self.unknown]))
        return [{"map_unknown": unknown, "map_known": float(nan_mean(ap[d.labels.long()]))} for d in self.draws]


class CoarseLabelEvidence(Evidence):
    """§4.2 (Table 1): the true coarse scene categories are known, the fine category is predicted.

    The model predicts fine categories only; its known loss is the binary cross-entropy of the
    coarse probabilities derived from the fine softmax (:func:`topdown.sinn.coarse_known_loss`).
    Figures (percent, :func:`topdown.metrics.table1_metrics`): ``mc_acc``, ``map``,
    ``iou_acc``; λ and T are chosen by MC Acc, mAP breaking ties.  One draw: all coarse labels.
    """

    metrics = ("mc_acc", "map", "iou_acc")
    criterion = ("mc_acc", "map")
    headers = {"mc_acc": "MC Acc", "map": "mAP", "iou_acc": "IoU Acc"}

    def __init__(self, num_classes: int, num_coarse: int):
        self.num_classes, self.num_coarse = int(num_classes), int(num_coarse)
        self.draws = [KnownDraw(self.num_coarse, 0, torch.arange(self.num_coarse))]
        self.fine_to_coarse: torch.Tensor | None = None

    def setup(self, model: Any, datamodule: Any = None) -> None:
        f2c = getattr(model, "fine_to_coarse", None)
        if f2c is None or tuple(f2c.shape) != (self.num_classes, self.num_coarse):
            raise ValueError(f"coarse-label evidence needs the model's fine_to_coarse [{self.num_classes}, "
                             f"{self.num_coarse}] hierarchy; got {None if f2c is None else tuple(f2c.shape)}")
        self.fine_to_coarse = f2c

    def known_loss(self, context: dict, draws: Sequence[int], rows: slice) -> Callable:
        from topdown.sinn import coarse_known_loss

        return coarse_known_loss(context["coarse"][rows].repeat(len(draws), 1), self.fine_to_coarse)

    def scores(self, outputs: Any) -> torch.Tensor:
        return outputs["fine"] if isinstance(outputs, dict) else outputs

    def width(self, d: int | None = None) -> int:
        return self.num_classes

    def target(self, context: dict) -> torch.Tensor:
        return context["target"].long()

    def target_bytes(self) -> int:
        return 8

    def empty_target(self) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)

    def evaluate(self, scores: torch.Tensor, target: torch.Tensor, d: int) -> dict[str, float]:
        from topdown.metrics import table1_metrics

        return table1_metrics(scores.float().softmax(-1), target)


# ---------------------------------------------------------------------------------------
# Summaries, tables, CSV, figures
# ---------------------------------------------------------------------------------------

class MeanStd(tuple):
    """``(mean, std)`` of the finite values (unpacks as a pair); ``count`` of them and ``nan``, the
    number of values left out, as attributes."""

    def __new__(cls, mean: float, std: float, count: int = 0, nan: int = 0):
        out = super().__new__(cls, (mean, std))
        out.count, out.nan = count, nan
        return out

    @property
    def mean(self) -> float:
        return self[0]

    @property
    def std(self) -> float:
        return self[1]

    def __repr__(self) -> str:
        return f"MeanStd(mean={self[0]!r}, std={self[1]!r}, count={self.count}, nan={self.nan})"


def mean_std(values: Iterable[float]) -> MeanStd:
    """Mean ± *sample* standard deviation (n - 1 in the denominator; 0 for a single value) over
    draws or runs, the convention of every "mean ± std" the project prints.

    NaN values (e.g. the known-label mAP of a draw whose known labels have no positive in the
    split) are left out of both and counted in ``nan``, for the caller to report.
    """
    values = [float(v) for v in values]
    a = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    nan = len(values) - a.size
    if a.size == 0:
        return MeanStd(float("nan"), float("nan"), 0, nan)
    return MeanStd(float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size), nan)


def fmt(mean: float, std: float | None = None, scale: float = 100.0) -> str:
    """``27.09`` or ``27.09±0.12`` (mAP in percent, as the paper prints it)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    s = f"{mean * scale:.2f}"
    if std is not None and not math.isnan(std) and std > 0:
        s += f"±{std * scale:.2f}"
    return s


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> str:
    """A plain aligned text table (first column left-aligned, the others right-aligned)."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip()

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def layer_table(nofp: tuple[float, float | None], cells: dict[tuple[str, str], tuple[float, float]],
                layers: Sequence[str], methods: Sequence[str] = ("lf", "rf"), title: str | None = None,
                scale: float = 100.0) -> str:
    """The layer-wise analysis laid out as Tables 3-5: rows ``no-fp``, ``fp-input``, ``fp-conv-1``, ...,
    columns LF and RF; ``cells[(layer, method)] = (mean, std)`` of the figure (``scale`` x it printed).
    """
    rows = [["no-fp"] + [fmt(*nofp, scale=scale) for _ in methods]]
    for layer in layers:
        rows.append([paper_row_name(layer)] + [fmt(*cells.get((layer, m), (float("nan"), None)), scale=scale)
                                               for m in methods])
    return text_table([""] + [m.upper() for m in methods], rows, title)


def paper_row_name(layer: str) -> str:
    """``conv13`` -> ``fp-conv-13``; ``input`` -> ``fp-input``; other names as ``fp-<name>``."""
    if layer.startswith("conv") and layer[4:].isdigit():
        return f"fp-conv-{layer[4:]}"
    return f"fp-{layer}"


def write_csv(path: str | Path, rows: Sequence[dict], fields: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV: columns ``fields``, or the union of the rows' keys in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fields is None:
        fields = []
        for r in rows:
            fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------
# Choosing λ and T on validation (§4.1)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """The chosen setting (a key of the curves), its iteration t and the validation value there."""

    key: Hashable
    iteration: int
    value: Any


def select_setting(curves: Mapping[Hashable, Mapping[int, Any] | Sequence[Any]], min_iteration: int = 1) -> Selection:
    """Choose a setting and a number of iterations on validation curves (§4.1: "We determine the
    update rate parameter and number of iterations using the validation split").

    Args:
        curves: one curve per setting (e.g. per update rate λ, or per (method, λ)): the value of
            the validation figure after each iteration t, as a list indexed by t or a
            ``{t: value}`` mapping.  A value is a number or a tuple compared in order
            (``(mc_acc, map)``: MC Acc first, mAP breaks its ties).  NaN values are skipped.
        min_iteration: the smallest t that may be chosen; 1 means at least one feedback-prop
            update (t = 0 is the plain forward pass).

    Returns:
        The highest value; among equals the fewest iterations, then the setting listed first.

    Pure, so every protocol uses the same rule: multi-label mAP, hierarchical MC Acc, a
    captioning CIDEr curve.
    """
    best, best_rank = None, None
    for order, (key, curve) in enumerate(curves.items()):
        items = curve.items() if isinstance(curve, Mapping) else enumerate(curve)
        for t, value in items:
            v = tuple(value) if isinstance(value, (tuple, list)) else (value,)
            if t < min_iteration or any(isinstance(x, float) and math.isnan(x) for x in v):
                continue
            rank = (v, -t, -order)
            if best_rank is None or rank > best_rank:
                best, best_rank = Selection(key, int(t), value), rank
    if best is None:
        raise ValueError(f"no validation value at an iteration t >= {min_iteration} to choose from "
                         f"(settings: {list(curves)})")
    return best


def _comparable(value: Any) -> tuple | None:
    v = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return None if any(isinstance(x, float) and math.isnan(x) for x in v) else v


def extend_grid(best: Mapping[float, Any], factor: float | None = None) -> list[float]:
    """The update rates to add so that the grid brackets the validation optimum.

    Args:
        best: for each λ of the grid, the best validation value it reached (a number or a tuple
            compared in order, as in :func:`select_setting`; NaN: left out).
        factor: the step beyond an edge; default the grid's own ratio at that edge (3 for
            ``[1e-4, 3e-4, 1e-3]``'s lower edge), 3 for a one-value grid.

    Returns:
        ``[]`` when a λ strictly inside the grid reaches the best value (the optimum is
        bracketed); else one λ beyond each edge that reaches it, rounded to 3 significant
        digits (both sides for a one-value grid).  A caller runs them on val, adds them to
        the grid and asks again, until ``[]`` or its limit.
    """
    lrs = sorted(float(lr) for lr in best)
    if any(not lr > 0 for lr in lrs):
        raise ValueError(f"extend_grid: update rates must be > 0, got {lrs}")
    ranks = {lr: _comparable(best[lr]) for lr in lrs}
    valid = [lr for lr in lrs if ranks[lr] is not None]
    if not valid:
        return []
    top = max(ranks[lr] for lr in valid)
    winners = [lr for lr in valid if ranks[lr] == top]
    lo, hi = lrs[0], lrs[-1]
    if any(lo < lr < hi for lr in winners):
        return []
    out = set()
    if lo in winners:
        out.add(float(f"{lo / (factor or (lrs[1] / lrs[0] if len(lrs) > 1 else 3.0)):.3g}"))
    if hi in winners:
        out.add(float(f"{hi * (factor or (lrs[-1] / lrs[-2] if len(lrs) > 1 else 3.0)):.3g}"))
    return sorted(out)


# ---------------------------------------------------------------------------------------
# Paired differences over runs (rows that share each run's split)
# ---------------------------------------------------------------------------------------

def paired_differences(per_run: Mapping[str, Mapping[Hashable, Mapping[str, float]]],
                       pairs: Sequence[tuple[str, str]], metrics: Sequence[str]) -> list[dict]:
    """Per pair of rows ``(a, b)`` and figure m: the differences ``a[m] − b[m]`` run by run, and their
    mean ± sample std (:func:`mean_std`).

    ``per_run[row][run] = {m: value}``.  Only the runs both rows have are paired.  Returns one dict
    per pair: ``pair`` ("a − b"), ``a``, ``b``, ``runs``, and for each m ``m`` (mean), ``m_std``
    and ``m_runs`` (the per-run differences, in the order of ``runs``).
    """
    out = []
    for a, b in pairs:
        ra, rb = per_run.get(a, {}), per_run.get(b, {})
        runs = [r for r in ra if r in rb]
        row: dict[str, Any] = {"pair": f"{a} − {b}", "a": a, "b": b, "runs": runs}
        for m in metrics:
            d = [float(ra[r][m]) - float(rb[r][m]) for r in runs]
            ms = mean_std(d)
            row[m], row[f"{m}_std"], row[f"{m}_runs"] = ms.mean, ms.std, d
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------
# Per-iteration records -> summary over draws
# ---------------------------------------------------------------------------------------

SETTING_KEYS = ("split", "setting", "method", "layers", "lr", "steps", "stop")


def summarize(records: Sequence[dict], metrics: Sequence[str], amount: str = "num_known") -> list[dict]:
    """One row per setting and amount of evidence (the ``amount`` column of the records,
    :attr:`Evidence.amount`: the number of known labels, or the text fraction of the news
    task): mean ± std over the draws of each figure at
    the setting's last recorded iteration (``<m>``, ``<m>_std``), at t = 0 (``<m>_nofp``, no
    feedback-prop), the number of draws, and the mean curve over the recorded iterations
    (``curve_t``, ``curves[m]``).  Draws whose figure is NaN are left out and counted in
    ``<m>_nan`` with a warning.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in SETTING_KEYS) + (r[amount],), []).append(r)
    out = []
    for key, rows in groups.items():
        ts = sorted({r["iteration"] for r in rows})
        last = ts[-1]
        row = {k: v for k, v in zip(SETTING_KEYS, key) if v is not None}
        row.update({amount: key[-1]}, draws=len({r.get("draw") for r in rows}), iteration=last)
        row["curve_t"] = ts
        row["curves"] = {}
        for m in metrics:
            end = mean_std(r[m] for r in rows if r["iteration"] == last)
            zero = mean_std(r[m] for r in rows if r["iteration"] == 0)
            row[m], row[f"{m}_std"] = end.mean, end.std
            row[f"{m}_nofp"], row[f"{m}_nofp_std"] = zero.mean, zero.std
            if end.nan:
                row[f"{m}_nan"] = end.nan
                warnings.warn(f"{m} is NaN for {end.nan} of {end.nan + end.count} draws of {row.get('setting')} "
                              f"with {amount}={key[-1]} (no positive in the split): left out of the mean",
                              stacklevel=2)
            row["curves"][m] = [mean_std(r[m] for r in rows if r["iteration"] == t).mean for t in ts]
        out.append(row)
    return out


def plain_rows(rows: Sequence[dict]) -> list[dict]:
    """Summary rows without their curves (for CSV files and W&B tables)."""
    return [{k: v for k, v in r.items() if k not in ("curves", "curve_t")} for r in rows]


# ---------------------------------------------------------------------------------------
# How much metric state fits (the evaluation of COCO's Figure 4 must stay in host memory)
# ---------------------------------------------------------------------------------------

def plan_passes(num_settings: int, draws: Sequence["KnownDraw"], unit_bytes: Callable[[int, int], int],
                shared_bytes: int, budget_bytes: int | None) -> list[tuple[list[int], list[int]]]:
    """Group (setting, draw) units into passes over the data whose metric state fits ``budget_bytes``.

    Everything in one pass when it fits; else one amount of known labels after another, as many
    settings per pass as fit (one setting and part of the draws when even that does not fit).
    ``unit_bytes(s, d)``: the state one setting x draw keeps; ``shared_bytes``: what a pass keeps
    once (the plain forward's scores and the targets).  Returns ``(settings, draws)`` index lists.

    Raises ValueError when a single unit does not fit, before any work.
    """
    settings = list(range(num_settings))
    every = list(range(len(draws)))
    total = shared_bytes + sum(unit_bytes(s, d) for s in settings for d in every)
    if budget_bytes is None or total <= budget_bytes:
        return [(settings, every)]
    free = budget_bytes - shared_bytes
    worst = max(unit_bytes(s, d) for s in settings for d in every)
    if worst > free:
        raise ValueError(f"one setting x draw needs {worst / 2**30:.2f} GB of metric state (plus "
                         f"{shared_bytes / 2**30:.2f} GB shared), over the budget of {budget_bytes / 2**30:.2f} GB; "
                         "keep fewer iterations or raise the budget")
    groups: list[list[int]] = []
    for d in every:
        if groups and draws[groups[-1][0]].num_known == draws[d].num_known:
            groups[-1].append(d)
        else:
            groups.append([d])
    passes: list[tuple[list[int], list[int]]] = []
    for group in groups:
        per_setting = [sum(unit_bytes(s, d) for d in group) for s in settings]
        if max(per_setting) <= free:
            chunk, used = [], 0
            for s in settings:
                if chunk and used + per_setting[s] > free:
                    passes.append((chunk, group))
                    chunk, used = [], 0
                chunk.append(s)
                used += per_setting[s]
            passes.append((chunk, group))
            continue
        for s in settings:
            part, used = [], 0
            for d in group:
                if part and used + unit_bytes(s, d) > free:
                    passes.append(([s], part))
                    part, used = [], 0
                part.append(d)
                used += unit_bytes(s, d)
            passes.append(([s], part))
    return passes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: str | Path, title: str, ylabel: str = "mAP on unknown labels (%)",
            legend_size: int = 8) -> Path:
    """Label, save as PNG and close a figure of this module."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_known_sweep(path: str | Path, series: dict[str, list[tuple[int, float, float]]],
                     nofp: float | None = None, title: str = "") -> Path:
    """Figure 4: unknown-label mAP against the number of known labels, one line per
    (method, layer); ``series[name] = [(num_known, mean, std), ...]``, error bars over draws.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts],
                    marker="o", capsize=3, label=name)
    if nofp is not None and not math.isnan(nofp):
        ax.axhline(100 * nofp, color="gray", linestyle="--", label="no-fp")
    ax.set_xlabel("number of known labels")
    return _finish(fig, ax, path, title)


def plot_iterations(path: str | Path, series: dict[str, list[float]], ylabel: str = "mAP on unknown labels (%)",
                    title: str = "") -> Path:
    """mAP against feedback-prop iteration t (t = 0 is no-fp), one line per configuration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in series.items():
        ax.plot(range(len(curve)), [100 * v for v in curve], marker=".", label=name)
    ax.set_xlabel("feedback-prop iteration t")
    return _finish(fig, ax, path, title, ylabel=ylabel, legend_size=7)


def plot_layers(path: str | Path, layers: Sequence[str], series: dict[str, list[float]], nofp: float | None = None,
                title: str = "") -> Path:
    """The layer-wise analysis (§5) as a figure: unknown-label mAP per pivot layer, one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = list(range(len(layers)))
    for name, values in series.items():
        ax.plot(x, [100 * v for v in values], marker="o", label=name)
    if nofp is not None and not math.isnan(nofp):
        ax.axhline(100 * nofp, color="gray", linestyle="--", label="no-fp")
    ax.set_xticks(x, [paper_row_name(layer) for layer in layers], rotation=30)
    return _finish(fig, ax, path, title)
