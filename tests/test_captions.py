"""Caption metrics against pycocoevalcap called the standard way; read-only package folder; tokenizations cached."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import pytest

import topdown.captions as captions
from topdown.captions import METRICS, _METEOR, _package_dir, caption_scores, score_caption_sets


@pytest.fixture(scope="module")
def refs_and_candidates(tiny_scenes):
    refs = {}
    for a in json.loads((tiny_scenes / "annotations" / "captions_val2014.json").read_text())["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    # candidates with case, punctuation and words the references lack
    cands = {k: v[k % len(v)].replace("A ", "The ").rstrip(".") + (" , quite nice!" if k % 3 else "")
             for k, v in refs.items()}
    return refs, cands


def standard_scores(refs, cands) -> dict:
    """pycocoevalcap as its COCOEvalCap runs it (tokenizer, then each scorer), without SPICE."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": cands[k]}] for k in refs})
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
    meteor = _METEOR.get()  # pycocoevalcap's Meteor; one JVM for the whole test session
    return {**{f"BLEU-{n + 1}": bleu[n] for n in range(4)}, "METEOR": meteor.compute_score(gts, res)[0],
            "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]}


@contextlib.contextmanager
def read_only(folder: str):
    """Any attempt of this process to create or write a file under ``folder`` fails, as on a
    read-only site-packages (root ignores file permissions, so an audit hook stands in)."""
    state = {"on": True}

    def hook(event, args):
        if not state["on"]:
            return
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = os.fsdecode(args[0]), args[1] or "", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writes and os.path.abspath(path).startswith(folder):
                raise PermissionError(f"read-only: {path}")

    sys.addaudithook(hook)  # cannot be removed: switched off on exit
    try:
        yield
    finally:
        state["on"] = False


def test_caption_scores_equal_pycocoevalcap_and_never_write_to_site_packages(refs_and_candidates):
    refs, cands = refs_and_candidates
    with read_only(str(_package_dir(""))):
        ours = caption_scores(refs, cands)
        with pytest.raises(PermissionError):  # the check is live: the standard tokenizer would fail here
            standard_scores(refs, cands)
    expected = standard_scores(refs, cands)
    assert list(ours) == list(METRICS)
    for k in METRICS:
        assert ours[k] == pytest.approx(float(expected[k]), abs=1e-12), k
    assert 0 < ours["CIDEr"] < 10 and all(0 < ours[k] < 1 for k in METRICS if k != "CIDEr")


def test_whole_split_in_one_call(refs_and_candidates):
    refs, cands = refs_and_candidates
    half = dict(list(cands.items())[: len(cands) // 2])
    with pytest.raises(ValueError, match="score the whole split in one call"):
        caption_scores(refs, half)
    with pytest.raises(ValueError, match="have no references"):
        caption_scores({k: refs[k] for k in half}, cands)
    # several candidate sets share one tokenizer pass and give the one-set figures
    both = score_caption_sets(refs, [cands, {k: v[0] for k, v in refs.items()}], metrics=("BLEU-4", "CIDEr"))
    assert both[0] == {k: v for k, v in caption_scores(refs, cands).items() if k in ("BLEU-4", "CIDEr")}
    assert both[1]["BLEU-4"] > 0.99  # a reference scored against a set that contains it


def test_cached_tokenizations_give_the_same_figures(refs_and_candidates, monkeypatch):
    refs, cands = refs_and_candidates
    cache: dict[str, str] = {}
    first = score_caption_sets(refs, [cands], ("BLEU-4", "CIDEr"), tokenized=cache)
    assert first == score_caption_sets(refs, [cands], ("BLEU-4", "CIDEr"))  # the cache changes nothing
    assert set(cache) == {c for v in refs.values() for c in v} | set(cands.values())

    def no_java(sentences):
        assert not sentences, f"tokenized again: {sentences[:3]}"
        return []

    monkeypatch.setattr(captions, "ptb_tokenize", no_java)  # a second evaluation of the split reuses them
    assert score_caption_sets(refs, [cands], ("BLEU-4", "CIDEr"), tokenized=cache) == first
