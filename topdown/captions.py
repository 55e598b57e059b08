"""Captions for the multi-task model of feedback-prop §4.4: the caption vocabulary and the COCO
caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D).

Vocabulary (the preprocessing of Karpathy & Fei-Fei [19], which §4.4 follows): the words seen at
least ``min_count`` times in the training captions, clipped to their first ``max_len`` tokens,
plus ``<pad> <start> <end> <unk>``. :func:`caption_vocabulary` saves it with a record of the
settings that built it and rebuilds it when a setting changes.

Metrics: :func:`caption_scores` tokenizes the raw sentences with pycocoevalcap's PTB tokenizer
(the Stanford CoreNLP jar it ships, with its flags and punctuation list) and calls its scorers
directly, so the figures equal what ``pycocoevalcap`` reports. Three things differ from its
``COCOEvalCap``, none of them in the numbers:

* the tokenizer reads the sentences from its standard input instead of a temporary file that
  pycocoevalcap writes into its own package folder, so scoring works with a read-only
  site-packages; references and candidates go through one JVM;
* METEOR runs in one Java process per Python process, started on first use (or ahead of time by
  :func:`start_meteor`) and reused by every later call: it loads its paraphrase tables for
  several seconds;
* SPICE is left out: it needs the Stanford models, a download, and this project runs offline.

CIDEr-D takes its document frequencies from the references of the evaluated set, so a split must
be scored in one call: an average of per-batch scores would be a different number.

Feedback-prop (§4.4, Table 6): :class:`CaptionEvidence` is the :class:`topdown.evidence.Evidence`
of the captioning model: the object labels are known, the caption decoded from the refined trunk
is the unknown target, and a split's captions are scored here in one call.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import re
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch

from topdown.evidence import Evidence, KnownDraw

# ---------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)


def tokenize(raw: str) -> list[str]:
    """Lower-case alphanumeric words: the ``tokens`` of Karpathy's split file, for sentences without them."""
    return re.findall(r"[a-z0-9]+", raw.lower())


@dataclass(frozen=True)
class CaptionVocab:
    """Caption words; ids 0-3 are ``<pad> <start> <end> <unk>``.

    ``settings`` records what built it (see :func:`caption_vocabulary`); ``counts`` the training
    count of each word (0 for the specials).
    """

    words: tuple[str, ...]
    settings: dict = field(default_factory=dict)
    counts: tuple[int, ...] = ()

    def __post_init__(self):
        if tuple(self.words[:4]) != SPECIALS:
            raise ValueError(f"a caption vocabulary starts with {SPECIALS}, got {tuple(self.words[:4])}")
        if len(set(self.words)) != len(self.words):
            dup = [w for w, c in Counter(self.words).items() if c > 1]
            raise ValueError(f"caption vocabulary repeats words: {dup[:5]}")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)

    def index(self, word: str) -> int:
        return self._index.get(word, UNK_ID)

    def encode(self, tokens: Sequence[str], max_len: int) -> np.ndarray:
        """``<start> w_1 .. w_n <end> <pad> ..``, int64 ``[max_len + 2]``, n = min(len(tokens), max_len)."""
        out = np.full(max_len + 2, PAD_ID, dtype=np.int64)
        ids = [self.index(t) for t in tokens[:max_len]]
        out[0] = START_ID
        out[1:1 + len(ids)] = ids
        out[1 + len(ids)] = END_ID
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first ``<end>``; ``<pad>`` and ``<start>`` are dropped, ``<unk>`` kept."""
        words = []
        for i in (ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else ids):
            if i == END_ID:
                break
            if i not in (PAD_ID, START_ID):
                words.append(self.words[i])
        return " ".join(words)

    def decode_batch(self, ids: torch.Tensor | np.ndarray) -> list[str]:
        return [self.decode(row) for row in ids]

    def to_json(self) -> dict:
        return {"settings": self.settings, "words": list(self.words), "counts": list(self.counts)}

    @classmethod
    def from_json(cls, data: dict) -> "CaptionVocab":
        return cls(tuple(data["words"]), dict(data.get("settings", {})), tuple(data.get("counts", ())))


def build_caption_vocab(captions: Iterable[Sequence[str]], min_count: int = 5, max_len: int = 16,
                        settings: dict | None = None) -> CaptionVocab:
    """Words seen at least ``min_count`` times among the first ``max_len`` tokens of the
    tokenized training ``captions``, by decreasing count (ties alphabetical), after the specials."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    counts = Counter()
    for tokens in captions:
        counts.update(tokens[:max_len])
    kept = sorted(((w, c) for w, c in counts.items() if c >= min_count and w not in SPECIALS),
                  key=lambda wc: (-wc[1], wc[0]))
    return CaptionVocab(SPECIALS + tuple(w for w, _ in kept), dict(settings or {}),
                        (0,) * 4 + tuple(c for _, c in kept))


def caption_vocabulary(path: str | Path, captions, settings: dict) -> tuple[CaptionVocab, bool]:
    """The vocabulary saved at ``path`` when it was built with ``settings``, else a new one saved there.

    ``captions`` is an iterable of token lists, or a callable returning one (only called when the
    vocabulary must be built). ``settings`` must hold ``min_count`` and ``max_len`` and whatever else
    decides the training captions (split, seed, a fingerprint of the source file): any difference
    from the saved record rebuilds the file. Returns ``(vocab, built)``.
    """
    path = Path(path)
    settings = json.loads(json.dumps(settings))  # the record compares as it is stored
    if path.is_file():
        try:
            old = CaptionVocab.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"caption vocabulary file {path} is unreadable ({err}); delete it to rebuild") from None
        if old.settings == settings:
            return old, False
    source = captions() if callable(captions) else captions
    vocab = build_caption_vocab(source, settings["min_count"], settings["max_len"], settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(vocab.to_json()))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return vocab, True


# ---------------------------------------------------------------------------------------
# COCO caption metrics
# ---------------------------------------------------------------------------------------

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
_JAVA = os.environ.get("TOPDOWN_JAVA", "java")


def _package_dir(sub: str) -> Path:
    import pycocoevalcap

    return Path(list(pycocoevalcap.__path__)[0]) / sub


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTB tokenization of each sentence (lower case, punctuation removed).

    The same CoreNLP class, flags (``-preserveLines -lowerCase``) and punctuation list as
    ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer``; the sentences go through stdin.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    if not sentences:
        return []
    # one sentence per line: a line break inside a sentence would shift every later one
    text = "\n".join(s.replace("\r", " ").replace("\n", " ") for s in sentences)
    folder = _package_dir("tokenizer")
    cmd = [_JAVA, "-cp", str(folder / ptb.STANFORD_CORENLP_3_4_1_JAR), "edu.stanford.nlp.process.PTBTokenizer",
           "-preserveLines", "-lowerCase"]
    try:
        proc = subprocess.run(cmd, input=text.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    except FileNotFoundError:
        raise RuntimeError(f"the PTB tokenizer of the caption metrics needs Java: {cmd[0]!r} was not found") from None
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed (exit {proc.returncode}): {proc.stderr.decode()[-500:]}")
    lines = proc.stdout.decode().split("\n")
    if len(lines) < len(sentences):  # trailing empty sentences give no line
        lines += [""] * (len(sentences) - len(lines))
    punct = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in lines[:len(sentences)]]


class _MeteorServer:
    """One METEOR JVM per process (pycocoevalcap's ``Meteor``), started once and reused."""

    def __init__(self):
        self.lock = threading.Lock()
        self.meteor = None

    def get(self):
        with self.lock:
            if self.meteor is None or self.meteor.meteor_p.poll() is not None:
                from pycocoevalcap.meteor.meteor import Meteor

                try:
                    self.meteor = Meteor()  # Popen only: the JVM loads while the caller goes on
                except FileNotFoundError:
                    raise RuntimeError("METEOR needs Java: 'java' was not found") from None
            return self.meteor

    def close(self):
        with self.lock:
            m, self.meteor = self.meteor, None
        if m is not None and m.meteor_p.poll() is None:
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait()


_METEOR = _MeteorServer()
atexit.register(_METEOR.close)


def start_meteor() -> None:
    """Start the METEOR JVM now, so its few seconds of loading overlap other work."""
    _METEOR.get()


def _check(references: Mapping, candidates: Mapping, what: str) -> None:
    if not candidates:
        raise ValueError(f"{what}: no candidate captions to score")
    missing = [k for k in candidates if k not in references]
    if missing:
        raise ValueError(f"{what}: {len(missing)} candidate ids have no references, e.g. {missing[:5]}")
    extra = [k for k in references if k not in candidates]
    if extra:
        raise ValueError(f"{what}: {len(extra)} reference ids have no candidate, e.g. {extra[:5]}; "
                         "score the whole split in one call (CIDEr-D's document frequencies come from it)")
    for k, v in candidates.items():
        if not isinstance(v, str):
            raise TypeError(f"{what}: the candidate of id {k!r} must be one string, got {type(v).__name__}")
    for k, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"{what}: the references of id {k!r} must be a non-empty list of strings")


def score_caption_sets(references: Mapping[Hashable, Sequence[str]],
                       candidate_sets: Sequence[Mapping[Hashable, str]],
                       metrics: Sequence[str] = METRICS,
                       tokenized: dict[str, str] | None = None) -> list[dict[str, float]]:
    """:func:`caption_scores` of several candidate sets against the same references.

    One tokenizer call for everything; each set is scored on its own (every set must cover the
    same ids as ``references``). ``metrics`` picks a subset of :data:`METRICS` (without METEOR no
    JVM is started for it). ``tokenized``: a cache of PTB tokenizations (raw sentence -> tokens)
    kept by the caller across calls; only sentences not in it go to the tokenizer, which
    tokenizes each line on its own (``-preserveLines``), so the figures do not change.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; choose from {METRICS}")
    for i, cands in enumerate(candidate_sets):
        _check(references, cands, f"caption_scores (set {i})" if len(candidate_sets) > 1 else "caption_scores")
    meteor = _METEOR.get() if "METEOR" in metrics else None

    ids = list(references)
    flat = [r for k in ids for r in references[k]]
    for cands in candidate_sets:
        flat += [cands[k] for k in ids]
    if tokenized is None:
        tokens = iter(ptb_tokenize(flat))
    else:
        new = list(dict.fromkeys(x for x in flat if x not in tokenized))
        tokenized.update(zip(new, ptb_tokenize(new)))
        tokens = iter([tokenized[x] for x in flat])
    gts = {k: [next(tokens) for _ in references[k]] for k in ids}
    results = []
    for _ in candidate_sets:
        res = {k: [next(tokens)] for k in ids}
        out: dict[str, float] = {}
        if any(m.startswith("BLEU") for m in metrics):
            with contextlib.redirect_stdout(io.StringIO()):  # BleuScorer prints its n-gram counts
                bleu, _ = Bleu(4).compute_score(gts, res)
            out.update({f"BLEU-{n + 1}": float(bleu[n]) for n in range(4) if f"BLEU-{n + 1}" in metrics})
        if meteor is not None:
            out["METEOR"] = float(meteor.compute_score(gts, res)[0])
        if "ROUGE-L" in metrics:
            out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        if "CIDEr" in metrics:
            out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        results.append({m: out[m] for m in METRICS if m in out})
    return results


def caption_scores(references: dict, candidates: dict) -> dict[str, float]:
    """COCO caption metrics of ``candidates`` (id -> one raw sentence) against ``references``
    (id -> list of raw sentences), as pycocoevalcap computes them.

    Keys ``BLEU-1`` … ``BLEU-4``, ``METEOR``, ``ROUGE-L``, ``CIDEr`` (CIDEr-D, pycocoevalcap's
    ``Cider``), on pycocoevalcap's scale (0-1; CIDEr up to 10). Both dicts must hold the same ids:
    score a whole split in one call. SPICE is not computed (it needs a download).
    """
    return score_caption_sets(references, [candidates])[0]


def write_coco_results(path: str | Path, candidates: Mapping[int, str]) -> Path:
    """Write captions as a COCO results file, ``[{"image_id": id, "caption": text}, ...]``, sorted by id."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"image_id": int(k), "caption": candidates[k]} for k in sorted(candidates)]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows, indent=0) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------
# Object mentions: which known objects a caption names (a diagnostic of §4.4's evidence)
# ---------------------------------------------------------------------------------------

def object_mentions(caption: str, names: Sequence[str]) -> set[int]:
    """Indices of the categories ``names`` that ``caption`` names, singular or plural.

    A category is mentioned when its name's words appear consecutively, the last one compared
    by its WordNet noun lemma (``women`` -> ``woman``, ``dining tables`` -> ``dining table``).
    Synonyms (``lady``, ``kid``) do not count: the figures are a lower bound of the mentions.
    """
    from topdown.text import lemmatize

    words = tokenize(caption)
    lemmas = [lemmatize(w) for w in words]
    found = set()
    for j, name in enumerate(names):
        parts = tokenize(name)
        n = len(parts)
        for i in range(len(words) - n + 1):
            if words[i:i + n - 1] == parts[:-1] and parts[-1] in (words[i + n - 1], lemmas[i + n - 1]):
                found.add(j)
                break
    return found


def mention_scores(captions: Sequence[str], labels: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Micro precision of the object mentions of ``captions`` against the true labels ``[N, K]``
    (the share of named objects that are in the image; 1 - CHAIR_i of Rohrbach et al. 2018), and
    their recall (the share of present objects that are named)."""
    hit = named = present = 0
    for caption, row in zip(captions, labels):
        mentioned = object_mentions(caption, names)
        true = set(np.flatnonzero(row).tolist())
        hit += len(mentioned & true)
        named += len(mentioned)
        present += len(true)
    return {"mention_precision": hit / named if named else float("nan"),
            "mention_recall": hit / present if present else float("nan")}


# ---------------------------------------------------------------------------------------
# Feedback-prop on captions (§4.4, Table 6): the object labels are the known evidence
# ---------------------------------------------------------------------------------------

class CaptionEvidence(Evidence):
    """§4.4 (Table 6): the true object labels are known, the caption is the unknown target.

    Known: all K object labels, binary cross-entropy on the ``objects`` head (one draw).
    Unknown: the caption, decoded with beam search (``beam_size``, ``max_len``; 1 = greedy)
    from the trunk ``features`` at every reported iteration; t = 0 is the plain forward, the
    no-fp row.  Kept per sample (float32, :meth:`scores`): the decoded word ids ``[max_len]`` and
    the object logits ``[K]``; the target is the COCO image id and the K labels.

    :meth:`evaluate` scores the captions of the whole split in one call (CIDEr-D's document
    frequencies come from it; one METEOR process for all calls, PTB tokenizations cached
    across calls).  Figures: ``CIDEr`` (first: λ and T are chosen by it), ``metrics``
    (default all of :data:`METRICS`), the object head's ``map`` and ``object_loss`` (the mean
    BCE that feedback-prop lowers), and with ``mentions`` ``mention_precision`` /
    ``mention_recall`` (:func:`mention_scores`: which known objects the captions name; the object
    names come from ``object_names`` or ``datamodule.object_names``).  With ``results_dir`` each evaluation also
    writes its captions as a COCO results file there, ``captions_<digest>.json`` (the same
    captions give the same file), named in the record's ``captions`` column.

    :meth:`setup` takes the network (``model.net`` or ``model``, which must have
    ``decode(features, beam_size, max_len)``, :class:`topdown.decoder.CaptionNet`), the
    vocabulary (``model.vocab`` unless given) and the references of the val and test splits
    (``datamodule.split_references(split)``, unless given).
    """

    criterion = ("CIDEr",)
    scale = 100.0
    known_text = "object labels known"  # what the shared protocols' titles say is known

    def __init__(self, num_objects: int, max_len: int, beam_size: int = 3, vocab: CaptionVocab | None = None,
                 references: Mapping[int, Sequence[str]] | None = None, object_names: Sequence[str] | None = None,
                 metrics: Sequence[str] = METRICS, results_dir: str | Path | None = None, mentions: bool = True):
        bad = [m for m in metrics if m not in METRICS]
        if bad:
            raise ValueError(f"unknown caption metrics {bad}; choose from {METRICS}")
        if beam_size < 1 or max_len < 1:
            raise ValueError(f"beam_size and max_len must be at least 1, got {beam_size} and {max_len}")
        self.num_objects, self.max_len, self.beam_size = int(num_objects), int(max_len), int(beam_size)
        self.vocab, self.object_names = vocab, None if object_names is None else list(object_names)
        if self.object_names is not None and len(self.object_names) != self.num_objects:
            raise ValueError(f"{len(self.object_names)} object names for {self.num_objects} objects")
        self.references = None if references is None else dict(references)
        self.caption_metrics = ("CIDEr",) + tuple(m for m in METRICS if m in metrics and m != "CIDEr")
        self.mentions = bool(mentions)
        self.metrics = self.caption_metrics + ("map", "object_loss") + \
            (("mention_precision", "mention_recall") if self.mentions else ())
        self.headers = {"map": "object mAP", "object_loss": "object BCE", "mention_precision": "mention prec.",
                        "mention_recall": "mention rec."}
        self.results_dir = None if results_dir is None else Path(results_dir)
        self.draws = [KnownDraw(self.num_objects, 0, torch.arange(self.num_objects))]
        self.net = None
        self._source = None
        self._tokenized: dict[str, str] = {}

    def setup(self, model, datamodule=None) -> None:
        net = getattr(model, "net", model)
        if not callable(getattr(net, "decode", None)):
            raise ValueError(f"caption evidence needs a network with decode(features, beam_size, max_len) "
                             f"(topdown.decoder.CaptionNet); {type(net).__name__} has none")
        self.net = net
        if self.vocab is None:
            self.vocab = getattr(model, "vocab", None)
            if self.vocab is None:
                raise ValueError("caption evidence needs the caption vocabulary (model.vocab or vocab=)")
        if datamodule is not None and self._source is not datamodule and hasattr(datamodule, "split_references"):
            refs = {}
            for split in ("val", "test"):
                refs.update(datamodule.split_references(split))
            self.references, self._source = refs, datamodule
        if self.references is None:
            raise ValueError("caption evidence needs the reference captions (datamodule.split_references or "
                             "references=)")
        if self.mentions and self.object_names is None:
            names = getattr(datamodule, "object_names", None)
            if names is None or len(names) != self.num_objects:
                raise ValueError("caption evidence with mentions=True needs the object names (datamodule.object_names "
                                 "or object_names=)")
            self.object_names = list(names)

    def known_loss(self, context: dict, draws: Sequence[int], rows: slice):
        from topdown.feedback import multilabel_known_loss

        labels = context["labels"][rows].repeat(len(draws), 1)
        return multilabel_known_loss(torch.ones_like(labels, dtype=torch.bool), labels, key="objects")

    def scores(self, outputs) -> torch.Tensor:
        tokens = self.net.decode(outputs["features"].detach(), self.beam_size, self.max_len)
        return torch.cat([tokens.to(torch.float32), outputs["objects"].detach().float()], 1)

    def width(self, d: int | None = None) -> int:
        return self.max_len + self.num_objects

    def target(self, context: dict) -> torch.Tensor:
        return torch.cat([context["image_id"].long()[:, None], context["labels"].long()], 1)

    def target_bytes(self) -> int:
        return 8 * (1 + self.num_objects)

    def empty_target(self) -> torch.Tensor:
        return torch.zeros(0, 1 + self.num_objects, dtype=torch.long)

    def captions(self, scores: torch.Tensor, target: torch.Tensor) -> dict[int, str]:
        """``{image id: caption}`` of kept scores."""
        return {int(i): self.vocab.decode(t) for i, t in zip(target[:, 0].tolist(), scores[:, :self.max_len].long())}

    def evaluate(self, scores: torch.Tensor, target: torch.Tensor, d: int) -> dict:
        import hashlib

        import torch.nn.functional as F

        from topdown.metrics import average_precision, nan_mean

        candidates = self.captions(scores, target)
        missing = [i for i in candidates if i not in self.references]
        if missing:
            raise ValueError(f"caption evidence: {len(missing)} images have no reference captions, e.g. {missing[:5]}")
        refs = {i: self.references[i] for i in candidates}
        out: dict = score_caption_sets(refs, [candidates], self.caption_metrics, tokenized=self._tokenized)[0]
        logits, labels = scores[:, self.max_len:], target[:, 1:]
        out["map"] = float(nan_mean(average_precision(logits, labels.to(torch.uint8))))
        out["object_loss"] = float(F.binary_cross_entropy_with_logits(logits, labels.float()))
        if self.mentions:
            out.update(mention_scores(list(candidates.values()), labels.numpy(), self.object_names))
        out = {m: out[m] for m in self.metrics}
        if self.results_dir is not None:
            digest = hashlib.sha1(json.dumps(sorted(candidates.items())).encode()).hexdigest()[:12]
            out["captions"] = write_coco_results(self.results_dir / f"captions_{digest}.json", candidates).name
        return out
