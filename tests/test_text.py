"""Caption vocabulary (feedback-prop §4.1): tokenization, lemmatization, stop words, labels."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from conftest import REPO

from topdown.text import (STOP_WORDS, build_vocabulary, caption_words, labels_from_captions, lemmatize,
                          load_vocabulary, save_vocabulary, tokenize)


def test_tokenize_lowercases_and_keeps_alphabetic_tokens():
    assert tokenize("Two DOGS, 3 cats; a dog's ball!") == ["two", "dogs", "cats", "a", "dog", "ball"]


def test_lemmatize_turns_plurals_into_nouns():
    assert [lemmatize(w) for w in ("dogs", "children", "buses", "couches", "women", "sheep")] == [
        "dog", "child", "bus", "couch", "woman", "sheep"]


def test_stop_words_are_removed_before_and_after_lemmatization():
    assert {"the", "is", "on", "was", "has"} <= STOP_WORDS
    # WordNet lemmatizes "was" to "wa" and "has" to "ha": neither may become a concept
    assert caption_words("The dog was on the table and has two bowls.") == {"dog", "table", "two", "bowl"}


def test_vocabulary_ranks_by_frequency_and_breaks_ties_alphabetically():
    captions = ["A zebra and an apple.", "Mangoes with a zebra.", "The apples, the zebras.", "A kiwi."]
    assert build_vocabulary(captions, 3) == ["zebra", "apple", "kiwi"]  # kiwi ties mango, comes first
    assert build_vocabulary(list(reversed(captions)), 3) == ["zebra", "apple", "kiwi"]
    assert build_vocabulary(captions, 10) == ["zebra", "apple", "kiwi", "mango"]


def test_vocabulary_file_round_trip(tmp_path):
    words = ["dog", "café", "tree"]
    save_vocabulary(words, tmp_path / "v.txt")
    assert (tmp_path / "v.txt").read_text(encoding="utf-8") == "dog\ncafé\ntree\n"
    assert load_vocabulary(tmp_path / "v.txt") == words


def test_a_label_comes_from_any_of_the_five_captions():
    vocab = ["dog", "frisbee", "tree"]
    caps = [["A park.", "Grass.", "A sunny day.", "People.", "Two dogs play with a frisbee."],
            ["A tree.", "Trees.", "A forest.", "Woods.", "Green."]]
    y = labels_from_captions(caps, vocab)
    assert y.dtype == np.uint8 and y.tolist() == [[1, 1, 0], [0, 0, 1]]


def test_the_projects_nltk_data_is_found_without_nltk_data_exported(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NLTK_DATA"} | {"HOME": str(tmp_path)}
    code = "import nltk, topdown.text; nltk.data.find('corpora/wordnet/data.noun'); print(nltk.data.path[-1])"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]  # found: lemmatizing would work
    assert proc.stdout.strip() == str(REPO / ".nltk_data")


def test_missing_wordnet_is_a_clear_error(tmp_path):
    env = dict(os.environ, NLTK_DATA=str(tmp_path), HOME=str(tmp_path), TOPDOWN_NLTK_DATA=str(tmp_path / "none"))
    code = "from topdown.text import lemmatize; lemmatize('dogs')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "make setup" in proc.stderr and "setup_nltk.sh" in proc.stderr and str(tmp_path) in proc.stderr
