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
import re
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


def _most_frequent(counts: Counter, k: int) -> list[str]:
    """The ``k`` most counted words, ties broken alphabetically (so a vocabulary is reproducible)."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[:k]]


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
    return _most_frequent(counts, k)


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


# ---------------------------------------------------------------------------------------
# Nouns (feedback-prop §4.3): "the 500 most frequent nouns" of the captions and "the top
# 1,000 most frequent nouns" of the articles, found offline
# ---------------------------------------------------------------------------------------
#
# NLTK's tagger models cannot be downloaded on a fresh machine, so nouns come from the Brill
# tagger (lexicon of ~100k words, lexical rules for unknown words, contextual rules) whose
# rule files ship inside the ``textblob`` wheel. Sentences are split by NLTK's Punkt
# algorithm run without trained data (only the abbreviations below), and words by the same
# Treebank tokenizer as §4.1, on the text as written (case helps the tagger). A tagged noun
# then goes through §4.1's normalisation: lower case, alphabetic, stop words out, WordNet
# lemma. Precision and recall on tests/data/marked_nouns.txt are in docs/NEWS.md
# (``python -m topdown.text tests/data/marked_nouns.txt``).

NOUN_TAGS = frozenset({"NN", "NNS"})
PROPER_NOUN_TAGS = frozenset({"NNP", "NNPS"})
NOUN_FINDER = "punkt-treebank-brill(textblob-0.20.1)+wordnet-lemma"  # recorded with every noun vocabulary

# Abbreviations whose period does not end a sentence (lower case, without the final period).
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft gen gov sen rep col lt sgt capt cmdr adm rev hon pres supt insp "
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri sat sun "
    "u.s u.k u.n e.u u.s.a a.m p.m inc ltd co corp bros dept univ assn ave blvd rd no vs etc approx est "
    "i.e e.g cf al fig".split())


@functools.lru_cache(maxsize=1)
def _sentence_splitter():
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


@functools.lru_cache(maxsize=1)
def _brill_tagger():
    # textblob.en.parser tags from the lexicon alone; the module-level find_tags also applies
    # the lexical (unknown words) and contextual rules that come with the lexicon.
    from textblob._text import find_tags
    from textblob.en import lexicon

    lexicon.load()
    return lexicon, find_tags


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (Punkt without trained data, with :data:`ABBREVIATIONS`)."""
    return [s for s in _sentence_splitter().tokenize(text) if s.strip()]


def pos_tag(tokens: Sequence[str]) -> list[tuple[str, str]]:
    """Penn Treebank tags of one sentence's tokens (Brill tagger shipped with ``textblob``)."""
    if not tokens:
        return []
    lexicon, find_tags = _brill_tagger()
    tagged = find_tags(list(tokens), lexicon=lexicon, morphology=lexicon.morphology, context=lexicon.context,
                       entities=lexicon.entities, default=("NN", "NNP", "CD"), language="en")
    # the entity rules add a class to proper nouns (NNP-LOC, NNP-PERS, ...): keep the Penn tag
    return [(w, t.split("-")[0] if t.startswith("NNP-") else t) for w, t in tagged]


def tag_text(text: str) -> list[list[tuple[str, str]]]:
    """``[[(token, tag), ...] per sentence]``: Punkt sentences, Treebank tokens, Brill tags."""
    return [pos_tag(_TOKENIZER.tokenize(s)) for s in split_sentences(text)]


def _noun_lemma(token: str) -> str | None:
    """§4.1's normalisation of a tagged noun: lower case, alphabetic, no stop word, WordNet lemma."""
    word = token.lower()
    if not word.isalpha() or word in STOP_WORDS:
        return None
    lemma = lemmatize(word)
    if lemma in STOP_WORDS or len(lemma) < 2:
        return None
    return lemma


def _is_word(token: str) -> bool:
    return any(c.isalnum() for c in token)


def noun_positions(text: str, proper: bool = True) -> tuple[int, list[tuple[int, str]]]:
    """``(number of words, [(word index, noun lemma), ...])`` of ``text``, in reading order.

    Words are the tokens that hold a letter or a digit (punctuation is not a word), counted
    from 0; this is the unit of the text fractions of Table 2 (:mod:`topdown.news`).
    ``proper`` keeps proper nouns (NNP, NNPS) besides common ones (NN, NNS).
    """
    tags = NOUN_TAGS | PROPER_NOUN_TAGS if proper else NOUN_TAGS
    n, out = 0, []
    for sentence in tag_text(text):
        for token, tag in sentence:
            if not _is_word(token):
                continue
            if tag in tags:
                lemma = _noun_lemma(token)
                if lemma is not None:
                    out.append((n, lemma))
            n += 1
    return n, out


def find_nouns(text: str, proper: bool = True) -> list[str]:
    """The noun lemmas of ``text`` in reading order, repeats kept (§4.3 vocabularies)."""
    return [lemma for _, lemma in noun_positions(text, proper)[1]]


def build_noun_vocabulary(noun_lists: Iterable[Iterable[str]], k: int) -> list[str]:
    """The ``k`` nouns found in the most texts (document frequency), ties broken alphabetically.

    A text counts once per noun, so one long article that repeats a name does not outweigh
    many images; the labels are per image (present or not), and so is this count.
    """
    if k < 1:
        raise ValueError(f"build_noun_vocabulary: k must be positive, got {k}")
    counts = Counter()
    for nouns in noun_lists:
        counts.update(set(nouns))
    return _most_frequent(counts, k)


def labels_from_nouns(noun_lists: Sequence[Iterable[str]], vocab: Sequence[str]) -> np.ndarray:
    """Multi-label targets ``[N, K]`` uint8: text i has label j when noun ``vocab[j]`` occurs in it."""
    index = {w: j for j, w in enumerate(vocab)}
    labels = np.zeros((len(noun_lists), len(vocab)), np.uint8)
    for i, nouns in enumerate(noun_lists):
        for w in nouns:
            j = index.get(w)
            if j is not None:
                labels[i, j] = 1
    return labels


# ---------------------------------------------------------------------------------------
# Measuring the noun finder on sentences with their nouns marked
# ---------------------------------------------------------------------------------------

def read_marked_sentences(path) -> list[tuple[str, list[str]]]:
    """``(sentence, marked nouns)`` pairs of a file with one sentence a line and its nouns in
    square brackets: ``The [mayor] of [New York] met [residents].`` Every alphabetic word
    inside brackets is a noun; ``#`` starts a comment line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"marked-noun file not found: {path}")
    out = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("[") != line.count("]"):
            raise ValueError(f"{path}:{n}: unbalanced brackets in {line!r}")
        nouns = [w.lower() for span in re.findall(r"\[([^\]]+)\]", line)
                 for w in _TOKENIZER.tokenize(span) if w.isalpha()]
        out.append((line.replace("[", "").replace("]", ""), nouns))
    return out


def noun_finder_scores(marked: Sequence[tuple[str, Sequence[str]]], proper: bool = True) -> dict:
    """Token-level precision and recall of the tagging step on alphabetic words.

    Predicted and marked nouns of a sentence are compared as multisets of lower-cased words
    (no alignment needed); stop-word removal and lemmatization come after and are not scored.
    """
    tags = NOUN_TAGS | PROPER_NOUN_TAGS if proper else NOUN_TAGS
    tp = fp = fn = 0
    errors = []
    for sentence, gold in marked:
        pred = Counter(t.lower() for s in tag_text(sentence) for t, tag in s if tag in tags and t.isalpha())
        want = Counter(gold)
        hit = pred & want
        tp += sum(hit.values())
        fp += sum((pred - want).values())
        fn += sum((want - pred).values())
        if pred != want:
            errors.append({"sentence": sentence, "extra": sorted((pred - want).elements()),
                           "missed": sorted((want - pred).elements())})
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return {"sentences": len(marked), "tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall,
            "errors": errors}


if __name__ == "__main__":  # python -m topdown.text FILE: the noun finder's precision and recall
    import sys

    for file in sys.argv[1:] or ["tests/data/marked_nouns.txt"]:
        s = noun_finder_scores(read_marked_sentences(file))
        for e in s["errors"]:
            print(f"  extra {e['extra']} missed {e['missed']}: {e['sentence']}")
        print(f"{file}: {s['sentences']} sentences, {s['tp'] + s['fn']} marked nouns; "
              f"precision {s['precision']:.3f}, recall {s['recall']:.3f} (tp {s['tp']}, fp {s['fp']}, fn {s['fn']})")
