"""Caption vocabulary for multi-label annotation (feedback-prop §4.1).

The concepts to predict are "the most frequent 1000 words in captions from the
training set after tokenization, lemmatization, and stop-word removal", and an
image carries concept ``j`` when any of its captions contains word ``j``.

* tokenization: lower case, NLTK's Treebank tokenizer, alphabetic tokens only
  (punkt is not needed, so this works offline);
* lemmatization: WordNet's noun lemmatizer (``dogs`` -> ``dog``, ``children`` ->
  ``child``); nouns are the concepts, and verbs are left as written;
* stop words: the project's own list in ``topdown/stopwords.txt``, checked on
  the token and on its lemma (WordNet turns ``was`` into ``wa``).
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import nltk
import numpy as np
from nltk.tokenize import TreebankWordTokenizer

STOP_WORDS_FILE = Path(__file__).with_name("stopwords.txt")
# `make setup` puts WordNet here (scripts/setup_nltk.sh); TOPDOWN_NLTK_DATA names another folder
PROJECT_NLTK_DATA = Path(os.environ.get("TOPDOWN_NLTK_DATA", Path(__file__).resolve().parent.parent / ".nltk_data"))
# The caption pipeline below; a change to it must give another vocabulary cache key.
PIPELINE = "treebank-lower-alpha|stop-token-and-lemma|wordnet-noun-lemma|min-len-2"


def _use_project_nltk_data() -> None:
    """Let NLTK find the project's own data without NLTK_DATA exported (after NLTK_DATA's folders)."""
    path = str(PROJECT_NLTK_DATA)
    if PROJECT_NLTK_DATA.is_dir() and path not in nltk.data.path:
        nltk.data.path.append(path)


_use_project_nltk_data()


def _load_stop_words(path: Path = STOP_WORDS_FILE) -> frozenset[str]:
    words = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip().lower()
        if line and not line.startswith("#"):
            words.add(line)
    return frozenset(words)


STOP_WORDS: frozenset[str] = _load_stop_words()
_TOKENIZER = TreebankWordTokenizer()


def tokenize(caption: str) -> list[str]:
    """Lower-cased Treebank tokens of ``caption``, keeping alphabetic ones only."""
    return [t for t in _TOKENIZER.tokenize(caption.lower()) if t.isalpha()]


@functools.lru_cache(maxsize=1)
def _lemmatizer():
    from nltk.corpus import wordnet
    from nltk.stem import WordNetLemmatizer

    try:
        wordnet.ensure_loaded()
    except LookupError as err:
        searched = [line.strip() for line in str(err).splitlines() if line.strip().startswith("- '")]
        raise LookupError(
            "NLTK's WordNet corpus is missing (needed to lemmatize captions, feedback-prop §4.1). "
            f"Run `make setup` (or `bash scripts/setup_nltk.sh .nltk_data`), which puts it in {PROJECT_NLTK_DATA}, "
            f"or set NLTK_DATA to a folder holding it. Searched: {' '.join(searched) or 'the NLTK data path'}"
        ) from None
    return WordNetLemmatizer()


@functools.lru_cache(maxsize=200_000)
def lemmatize(word: str) -> str:
    """WordNet noun lemma of a lower-case word (``dogs`` -> ``dog``, ``buses`` -> ``bus``)."""
    return _lemmatizer().lemmatize(word)


def pipeline_key() -> str:
    """Identifies what turns captions into concepts: the stop words, the steps, NLTK's version.

    Vocabulary and label caches are keyed on it, so changing the stop-word list or the
    lemmatizer builds them again instead of reusing stale ones.
    """
    h = hashlib.sha1()
    h.update(PIPELINE.encode())
    h.update(nltk.__version__.encode())
    h.update("\n".join(sorted(STOP_WORDS)).encode())
    return h.hexdigest()[:16]


def caption_words(caption: str) -> set[str]:
    """The set of concept words a caption mentions: tokens, lemmatized, without stop words."""
    return set(_caption_lemmas(caption))


def _caption_lemmas(caption: str) -> list[str]:
    out = []
    for tok in tokenize(caption):
        if tok in STOP_WORDS:
            continue
        lemma = lemmatize(tok)
        if lemma in STOP_WORDS or len(lemma) < 2:
            continue
        out.append(lemma)
    return out


def build_vocabulary(captions: Iterable[str], k: int) -> list[str]:
    """The ``k`` most frequent caption words (§4.1), ties broken alphabetically.

    Frequencies count every occurrence over all captions. Fewer than ``k`` words
    come back when the captions hold fewer distinct words.
    """
    if k < 1:
        raise ValueError(f"build_vocabulary: k must be positive, got {k}")
    counts = Counter()
    for caption in captions:
        counts.update(_caption_lemmas(caption))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[:k]]


KEY_PREFIX = "# topdown vocabulary key="


def save_vocabulary(words: Sequence[str], path, key: str | None = None) -> None:
    """Write one word per line (UTF-8); ``key`` (how it was built) goes on a first comment line."""
    bad = [w for w in words if not w or "\n" in w or w != w.strip() or w.startswith("#")]
    if bad:
        raise ValueError(f"save_vocabulary: words must be non-empty single tokens, got {bad[:5]}")
    header = f"{KEY_PREFIX}{key}\n" if key else ""
    Path(path).write_text(header + "".join(f"{w}\n" for w in words), encoding="utf-8")


def load_vocabulary(path) -> list[str]:
    """Read a vocabulary written by :func:`save_vocabulary` (or any one-word-a-line file; ``#`` lines are comments)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    words = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    if len(set(words)) != len(words):
        dup = [w for w, c in Counter(words).items() if c > 1]
        raise ValueError(f"vocabulary file {path} repeats words: {dup[:5]}")
    return words


def vocabulary_key(path) -> str | None:
    """The build key a vocabulary file was saved with (None for a file without one)."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    return first[len(KEY_PREFIX):] if first.startswith(KEY_PREFIX) else None


def labels_from_captions(captions_per_image: Sequence[Sequence[str]], vocab: Sequence[str]) -> np.ndarray:
    """Multi-label targets [N, K] uint8: image i has label j when any of its captions has word j (§4.1)."""
    index = {w: j for j, w in enumerate(vocab)}
    labels = np.zeros((len(captions_per_image), len(vocab)), np.uint8)
    for i, caps in enumerate(captions_per_image):
        if isinstance(caps, str):
            raise TypeError(f"labels_from_captions: image {i} has a single string; pass a list of captions per image")
        for cap in caps:
            for w in _caption_lemmas(cap):
                j = index.get(w)
                if j is not None:
                    labels[i, j] = 1
    return labels
