"""Partial evidence for feedback-prop evaluation (Wang et al., CVPR 2018, §4.1 and §5).

The multi-label protocol of §4.1 splits the label vocabulary once into a fixed set of
*unknown* labels (500 of COCO's 1000; by default half of the vocabulary) and its complement,
from which the *known* labels of each evaluation are drawn: the sweep over "the amount of
known labels, from 50 to the total complement set of 500" with "5 rounds with randomly
sampled labels" when not all of the complement is known (Figure 4). §5 (Tables 3-5) uses
the whole complement as evidence and compares pivot layers.

This module is pure (torch, numpy; matplotlib is imported only by the plot helpers): the
label splits and their file, the draws of known labels, and the result tables, CSV files
and figures that the protocols of ``evaluate.py`` write.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

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
# Summaries, tables, CSV, figures
# ---------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation over draws; std is 0 for a single draw."""
    a = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std())


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


def layer_table(nofp: tuple[float, float], cells: dict[tuple[str, str], tuple[float, float]],
                layers: Sequence[str], methods: Sequence[str] = ("lf", "rf"), title: str | None = None) -> str:
    """The layer-wise analysis laid out as Tables 3-5: rows ``no-fp``, ``fp-input``, ``fp-conv-1``, ...,
    columns LF and RF; ``cells[(layer, method)] = (mean, std)`` of the unknown-label mAP.
    """
    rows = [["no-fp"] + [fmt(*nofp) for _ in methods]]
    for layer in layers:
        rows.append([paper_row_name(layer)] + [fmt(*cells.get((layer, m), (float("nan"), None))) for m in methods])
    return text_table([""] + [m.upper() for m in methods], rows, title)


def paper_row_name(layer: str) -> str:
    """``conv13`` -> ``fp-conv-13``; ``input`` -> ``fp-input``; other names as ``fp-<name>``."""
    if layer.startswith("conv") and layer[4:].isdigit():
        return f"fp-conv-{layer[4:]}"
    return f"fp-{layer}"


def write_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write dict rows (the union of their keys, in first-seen order) as CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def best_iteration(curve: Sequence[float], every: int = 1) -> tuple[int, float]:
    """The iteration with the highest value (the earliest among equals), among multiples of ``every``.

    §4.1: "We determine the update rate parameter and number of iterations using the
    validation split"; with per-iteration records T comes from one run.
    """
    best_t, best = 0, -math.inf
    for t, v in enumerate(curve):
        if t % every or math.isnan(v):
            continue
        if v > best + 1e-12:
            best_t, best = t, v
    return best_t, best


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
