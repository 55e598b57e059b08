"""News images with their article text as evidence (Wang et al., CVPR 2018, §4.3, Table 2, Figure 6).

The model is one trunk with two multi-label heads trained with the sum of two eq. 6 losses:
``caption``, the visual concepts of the caption (its most frequent nouns, the *unknown*
targets), and ``article``, the nouns of the article around the image (the *known* evidence
at test time). Feedback-prop then reads the caption concepts off a network whose pivot
activations were refined with the loss on the article nouns.

Text evidence (Table 2): the evidence of an image is the first 0, 25, 50, 75 or 100 % of its
article's words, and its known labels are the article-noun labels of that prefix. The
paper does not say what a noun of the vocabulary that is missing from the prefix means, so
both readings are offered (:data:`ABSENT`):

* ``"negative"`` (default): every article noun is known, as present (1) or absent (0) from
  the prefix. This is the article-label vector the ``article`` head was trained on, made
  from the text at hand, and at 100 % exactly the training target.
* ``"unknown"``: only the nouns found in the prefix are known (positives only); the others
  stay unknown.

Either way 0 % text is no evidence at all: no label is known and feedback-prop does not run
(the "no-text" row is the plain forward pass). The evidence differs per image, so it is a
per-sample mask for :func:`topdown.feedback.multilabel_known_loss`.
:class:`TextPrefixEvidence` is this evidence as the house's feedback-prop evaluation reads it
(:class:`topdown.evidence.Evidence`): one draw per text fraction, caption-noun mAP as the figure.

Pure PyTorch/numpy; matplotlib is imported by the figure helpers only.
"""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from topdown.evidence import Evidence, KnownDraw

HEADS = ("caption", "article")
TEXT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
ABSENT = ("negative", "unknown")


# ---------------------------------------------------------------------------------------
# One trunk, one head per task
# ---------------------------------------------------------------------------------------

class LinearHeads(nn.Module):
    """Several linear multi-label heads on the same features; returns ``{name: logits}``."""

    def __init__(self, in_features: int, sizes: dict[str, int]):
        super().__init__()
        if not sizes:
            raise ValueError("LinearHeads needs at least one head")
        bad = {k: v for k, v in sizes.items() if int(v) < 1}
        if bad:
            raise ValueError(f"every head needs at least one output, got {bad}")
        self.heads = nn.ModuleDict({k: nn.Linear(in_features, int(v)) for k, v in sizes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(x) for k, head in self.heads.items()}


def multi_head(net: nn.Module, sizes: dict[str, int]) -> nn.Module:
    """Replace the linear head of a :func:`topdown.backbones.build_backbone` model by :class:`LinearHeads`.

    The network then returns a dict of heads. Every module name before the head is
    unchanged, so pivot names (``layer3``, ``conv40``) still resolve. Torchvision
    classifiers end with their linear layer, so nothing runs after the new heads.
    """
    name = getattr(net, "topdown_head", None)
    head = net.get_submodule(name) if name else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"multi_head needs a network with a linear head (build_backbone(..., head='linear')); "
                         f"{type(net).__name__}.{name} is {type(head).__name__}")
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, LinearHeads(head.in_features, sizes))
    return net


# ---------------------------------------------------------------------------------------
# Article nouns by position, and the labels of a text prefix
# ---------------------------------------------------------------------------------------

def prefix_length(num_words: np.ndarray | int, fraction: float) -> np.ndarray:
    """Number of words in the first ``fraction`` of a text of ``num_words`` words (rounded half up)."""
    check_fraction(fraction)
    return np.floor(np.asarray(num_words, dtype=np.float64) * fraction + 0.5).astype(np.int64)


def check_fraction(fraction: float) -> float:
    if not 0.0 <= float(fraction) <= 1.0 or math.isnan(float(fraction)):
        raise ValueError(f"a text fraction must be within [0, 1], got {fraction!r}")
    return float(fraction)


def pack_positions(per_text: Sequence[tuple[int, Sequence[tuple[int, str]]]], vocab: Sequence[str]) -> dict:
    """Flat arrays of the vocabulary nouns of N texts, from :func:`topdown.text.noun_positions` results.

    Returns ``num_words [N]``, ``offsets [N+1]`` and, for every occurrence of a vocabulary
    noun, its word ``positions`` and label index ``labels`` (text i owns ``offsets[i]:offsets[i+1]``).
    """
    index = {w: j for j, w in enumerate(vocab)}
    num_words = np.zeros(len(per_text), np.int64)
    offsets = np.zeros(len(per_text) + 1, np.int64)
    positions: list[int] = []
    labels: list[int] = []
    for i, (n, nouns) in enumerate(per_text):
        num_words[i] = n
        for pos, lemma in nouns:
            j = index.get(lemma)
            if j is not None:
                positions.append(pos)
                labels.append(j)
        offsets[i + 1] = len(positions)
    return {"num_words": num_words, "offsets": offsets, "positions": np.asarray(positions, np.int64),
            "labels": np.asarray(labels, np.int64)}


def prefix_labels(packed: dict, fraction: float, num_labels: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Article-noun labels ``[N, K]`` uint8 of the first ``fraction`` of each text's words.

    ``fraction=1`` gives the labels of the whole article, ``0`` none. ``rows`` picks texts.
    """
    n_words, offsets = packed["num_words"], packed["offsets"]
    rows = np.arange(len(n_words)) if rows is None else np.asarray(rows, np.int64)
    out = np.zeros((len(rows), num_labels), np.uint8)
    cut = prefix_length(n_words[rows], fraction)
    for r, (i, c) in enumerate(zip(rows, cut)):
        a, b = offsets[i], offsets[i + 1]
        keep = packed["positions"][a:b] < c
        out[r, packed["labels"][a:b][keep]] = 1
    return out


def known_evidence(labels: torch.Tensor, fraction: float, absent: str = "negative") -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample known mask and values ``[B, K]`` of text-prefix evidence (see module docstring).

    ``labels`` are the prefix's article-noun labels. At ``fraction=0`` nothing is known.
    """
    check_fraction(fraction)
    if absent not in ABSENT:
        raise ValueError(f"unknown convention for absent nouns {absent!r}; choose from {ABSENT}")
    values = labels.float()
    if fraction == 0.0:
        mask = torch.zeros_like(values, dtype=torch.bool)
    elif absent == "negative":
        mask = torch.ones_like(values, dtype=torch.bool)
    else:
        mask = values > 0
    return mask, values


@dataclass(frozen=True, eq=False)
class TextDraw(KnownDraw):
    """The evidence of one text fraction: per image, the article nouns of the first ``fraction``
    of its article's words.  ``num_known`` and ``labels`` name the candidates (the whole article
    vocabulary); which of them are known differs per image."""

    fraction: float = 1.0


class TextPrefixEvidence(Evidence):
    """§4.3, Table 2: the first part of each image's article is read; its article nouns are known
    (:func:`known_evidence`, either convention for absent nouns), the caption nouns are predicted.

    One draw per text fraction: feedback-prop runs the fractions of a batch together, each copy
    of an image with its own per-sample mask on the ``article`` head.  The figure is the exact
    caption-noun mAP (``map_caption``, :func:`topdown.metrics.average_precision`), which also
    chooses λ and T on val.  A sample that knows nothing (``absent="unknown"`` and no vocabulary
    noun in its prefix) keeps its plain scores (:meth:`no_evidence`).

    Args:
        prefix: ``{fraction: uint8 [N, K_article]}``, the article-noun labels of each text prefix
            of the split's images, rows in the order of the batches' ``index`` (fractions > 0:
            the no-text row is the plain forward pass, t = 0 of every draw).
        absent: ``"negative"`` or ``"unknown"`` (module docstring).
        num_caption_labels: K_caption (default: the model's ``hparams.num_caption_labels``).
    """

    metrics = ("map_caption",)
    criterion = ("map_caption",)
    headers = {"map_caption": "caption-noun mAP"}
    scale = 100.0
    amount = "text_fraction"
    known_head, target_head = "article", "caption"

    def __init__(self, prefix: Mapping[float, np.ndarray | torch.Tensor], absent: str = "negative",
                 num_caption_labels: int | None = None):
        if absent not in ABSENT:
            raise ValueError(f"unknown convention for absent nouns {absent!r}; choose from {ABSENT}")
        fractions = sorted({check_fraction(f) for f in prefix})
        if not fractions or fractions[0] == 0.0:
            raise ValueError(f"text-prefix evidence takes fractions > 0 (no text is the plain forward pass), "
                             f"got {sorted(prefix)}")
        self.prefix = {f: torch.as_tensor(np.asarray(prefix[f])) for f in fractions}
        shapes = {tuple(v.shape) for v in self.prefix.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"the prefix labels of every fraction must be one [N, K_article] shape, got {shapes}")
        self.num_rows, k = next(iter(shapes))
        self.draws = [TextDraw(k, 0, torch.arange(k), fraction=f) for f in fractions]
        self.absent, self.num_caption_labels = absent, num_caption_labels

    def setup(self, model: Any, datamodule: Any = None) -> None:
        if self.num_caption_labels is None:
            hparams = getattr(model, "hparams", {})
            n = hparams.get("num_caption_labels") if hasattr(hparams, "get") else None
            if n is None:
                raise ValueError("text-prefix evidence: the model has no hparams.num_caption_labels; pass "
                                 "num_caption_labels")
            self.num_caption_labels = int(n)

    def describe(self, d: int) -> dict:
        return {"text_fraction": self.draws[d].fraction}

    def _known(self, context: dict, draws: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = context["index"].long().cpu()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows):
            raise IndexError(f"sample index {int(rows.max())} is outside the {self.num_rows} images of the text "
                             "evidence: the evidence was built for another split")
        parts = [known_evidence(self.prefix[self.draws[d].fraction][rows], self.draws[d].fraction, self.absent)
                 for d in draws]
        device = context["index"].device
        return torch.cat([m for m, _ in parts]).to(device), torch.cat([v for _, v in parts]).to(device)

    def known_loss(self, context: dict, draws: Sequence[int], rows: slice) -> Callable:
        from topdown.feedback import multilabel_known_loss

        mask, values = self._known({"index": context["index"][rows]}, draws)
        return multilabel_known_loss(mask, values, key=self.known_head)

    def no_evidence(self, context: dict, draws: Sequence[int], rows: slice) -> torch.Tensor | None:
        if self.absent == "negative":  # every article noun is known at any fraction > 0
            return None
        mask, _ = self._known({"index": context["index"][rows]}, draws)
        return ~mask.any(1)

    def scores(self, outputs: Any) -> torch.Tensor:
        return outputs[self.target_head].flatten(1)

    def width(self, d: int | None = None) -> int:
        return self.num_caption_labels

    def target(self, context: dict) -> torch.Tensor:
        return context["caption_labels"].to(torch.uint8)

    def target_bytes(self) -> int:
        return self.num_caption_labels

    def empty_target(self) -> torch.Tensor:
        return torch.zeros(0, self.num_caption_labels, dtype=torch.uint8)

    def with_draws(self, indices: Sequence[int]) -> "TextPrefixEvidence":
        if list(indices) == list(range(len(self.draws))):
            return self
        picked = [self.draws[i].fraction for i in indices]
        return TextPrefixEvidence({f: self.prefix[f] for f in picked}, self.absent, self.num_caption_labels)

    def evaluate(self, scores: torch.Tensor, target: torch.Tensor, d: int) -> dict[str, float]:
        from topdown.metrics import average_precision, nan_mean

        return {"map_caption": float(nan_mean(average_precision(scores, target)))}

    def evaluate_plain(self, scores: torch.Tensor, target: torch.Tensor) -> list[dict[str, float]]:
        plain = self.evaluate(scores, target, 0)  # the same for every fraction: computed once
        return [dict(plain) for _ in self.draws]


def row_name(fraction: float) -> str:
    """Table 2's row names: ``no-text``, ``25% text``, ..., ``100% text``."""
    return "no-text" if fraction == 0 else f"{100 * fraction:g}% text"


# ---------------------------------------------------------------------------------------
# Figures: mAP against text fraction (Table 2), predictions with and without text (Figure 6)
# ---------------------------------------------------------------------------------------

def plot_text_fraction(path: str | Path, series: dict[str, list[tuple[float, float]]], title: str = "") -> Path:
    """Caption-noun mAP against the fraction of article text used as evidence, one line per column."""
    from topdown.evidence import _finish, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts = sorted(pts)
        ax.plot([100 * f for f, _ in pts], [100 * v for _, v in pts], marker="o", label=name)
    ax.set_xlabel("article text used as evidence (% of its words)")
    ax.set_xticks([100 * f for f in sorted({f for pts in series.values() for f, _ in pts})])
    return _finish(fig, ax, path, title, ylabel="caption-noun mAP (%)")


def _words(pairs: Sequence[tuple[str, float]], truth: set[str]) -> str:
    return ", ".join(f"{w.upper() if w in truth else w} {s:.2f}" for w, s in pairs)


def figure6_png(path: str | Path, examples: Sequence[dict], title: str = "") -> Path:
    """Figure 6: each row an image, its top caption nouns without and with feedback-prop, its true
    caption nouns and the article nouns used. Predictions that are true labels are in CAPITALS
    (and bold in the HTML version). ``examples``: dicts with ``image`` (HxWx3 uint8), ``key``,
    ``before`` and ``after`` (``[(noun, score)]``), ``truth`` and ``evidence`` (lists of nouns).
    """
    import textwrap

    from topdown.evidence import _pyplot

    plt = _pyplot()
    n = len(examples)
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.3 * n), gridspec_kw={"width_ratios": [1, 4]}, squeeze=False)
    for row, ex in zip(axes, examples):
        row[0].imshow(ex["image"])
        row[0].set_title(str(ex["key"]), fontsize=7)
        truth = set(ex["truth"])
        lines = [("no feedback-prop: " + _words(ex["before"], truth)),
                 ("feedback-prop:    " + _words(ex["after"], truth)),
                 ("true labels:      " + ", ".join(sorted(truth))),
                 ("article nouns:    " + ", ".join(ex["evidence"][:25]) + (" ..." if len(ex["evidence"]) > 25 else ""))]
        text = "\n".join(textwrap.fill(s, 120, subsequent_indent=" " * 18) for s in lines)
        row[1].text(0, 0.5, text, fontsize=7, family="monospace", va="center")
        for ax in row:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def figure6_html(path: str | Path, examples: Sequence[dict], title: str = "") -> Path:
    """The same as :func:`figure6_png` as one self-contained HTML page (images inlined as JPEG data)."""
    import io

    from PIL import Image

    def words(pairs, truth):
        return ", ".join(f"<b>{html.escape(w)}</b>&nbsp;{s:.2f}" if w in truth else f"{html.escape(w)}&nbsp;{s:.2f}"
                         for w, s in pairs)

    rows = []
    for ex in examples:
        buf = io.BytesIO()
        Image.fromarray(ex["image"]).save(buf, format="JPEG", quality=90)
        src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        truth = set(ex["truth"])
        rows.append(
            f"<tr><td><img src='{src}' width='160'><br><small>{html.escape(str(ex['key']))}</small></td>"
            f"<td>{words(ex['before'], truth)}</td><td>{words(ex['after'], truth)}</td>"
            f"<td>{html.escape(', '.join(sorted(truth)))}</td>"
            f"<td style='color:#1f4fbf'>{html.escape(', '.join(ex['evidence']))}</td></tr>")
    page = ("<!doctype html><meta charset='utf-8'><title>Figure 6</title>"
            "<style>body{font-family:sans-serif;font-size:13px}td{vertical-align:top;padding:6px;"
            "border-bottom:1px solid #ccc}th{text-align:left}</style>"
            f"<h3>{html.escape(title)}</h3><p>Top caption nouns with their scores; true labels in bold; "
            "article nouns used as evidence in blue.</p><table><tr><th>image</th><th>no feedback-prop</th>"
            "<th>feedback-prop</th><th>true caption nouns</th><th>article nouns used</th></tr>"
            + "".join(rows) + "</table>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
