"""News images with article text as evidence (feedback-prop §4.3): nouns, GoodNews reader, scenes
news view, text-prefix evidence, the two-head model, the CLI and the Table 2 command."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import REPO, TINY_SCENES
from datamodules.goodnews import GoodNewsDataModule, read_goodnews
from topdown.news import known_evidence, multi_head, pack_positions, prefix_labels
from topdown.text import find_nouns, noun_finder_scores, noun_positions, read_marked_sentences, tokenize

MARKED = REPO / "tests" / "data" / "marked_nouns.txt"


def tiny_news_args(root: Path, runs: Path) -> list[str]:
    """CLI flags for a seconds-long news run on the tiny scenes data (21 test images: odd) at 32 px."""
    return ["--model", "news", "--data.root", str(root), "--data.num_images", str(TINY_SCENES["num_images"]),
            "--data.size", str(TINY_SCENES["size"]), "--data.caption_vocab_size", "20",
            "--data.article_vocab_size", "40", "--data.image_size", "32", "--data.batch_size", "16",
            "--data.num_workers", "0",
            "--model.backbone", "resnet18", "--run.root", str(runs), "--run.wandb", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# ------------------------------------------------------------------ nouns

def test_noun_finder_precision_and_recall_on_marked_sentences():
    marked = read_marked_sentences(MARKED)
    assert len(marked) >= 50
    s = noun_finder_scores(marked)
    assert s["tp"] + s["fn"] >= 250
    # measured 0.983 / 0.986 (docs/NEWS.md); the floor leaves room for nothing but regressions
    assert s["precision"] >= 0.95 and s["recall"] >= 0.95, s


def test_nouns_are_lemmatized_and_positioned_by_word():
    n, nouns = noun_positions("Two dogs chased the children. Mr. Smith's cats were asleep.")
    assert n == 11  # punctuation is not a word; 's is
    assert nouns == [(1, "dog"), (4, "child"), (6, "smith"), (8, "cat")]
    assert find_nouns("The cat sat.", proper=False) == ["cat"]
    assert find_nouns("Paris is lovely in spring.", proper=False) == ["spring"]


# ------------------------------------------------------------------ text-prefix evidence

def test_text_prefix_evidence_zero_all_and_both_conventions():
    vocab = ["dog", "child", "cat", "bridge"]
    packed = pack_positions([noun_positions("A dog and a child saw a cat near the river."), (0, [])], vocab)
    whole = prefix_labels(packed, 1.0, 4)
    assert whole.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]]  # 100 %: the labels of the whole article
    assert not prefix_labels(packed, 0.0, 4).any()
    half = prefix_labels(packed, 0.5, 4)  # 10 words: the first 5 hold dog and child
    assert half.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0]]
    assert (prefix_labels(packed, 0.75, 4) >= half).all()

    labels = torch.from_numpy(half)
    for absent in ("negative", "unknown"):
        mask, _ = known_evidence(labels, 0.0, absent)
        assert not mask.any()  # 0 %: no known labels either way
    mask, values = known_evidence(labels, 0.5, "negative")
    assert mask.all() and values.tolist() == half.tolist()
    mask, values = known_evidence(labels, 0.5, "unknown")
    assert mask.tolist() == [[True, True, False, False], [False] * 4] and values[mask].eq(1).all()
    with pytest.raises(ValueError, match="absent"):
        known_evidence(labels, 0.5, "maybe")


def test_text_evidence_runs_per_fraction_and_leaves_samples_without_evidence_alone():
    """TextPrefixEvidence through the house's feedback-prop path: one draw per fraction, each copy of
    an image with its own mask; a sample that knows nothing keeps its plain scores although the
    update rule has weight decay; the others get exactly the engine's LF with their mask."""
    from callbacks.feedback import FeedbackPropCallback, FeedbackSetting
    from topdown.feedback import feedback_prop, multilabel_known_loss
    from topdown.news import LinearHeads, TextPrefixEvidence

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), LinearHeads(8, {"caption": 5, "article": 4})).eval()
    half = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], np.uint8)  # image 1: no noun in its first half
    whole = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0]], np.uint8)
    ev = TextPrefixEvidence({0.5: half, 1.0: whole}, absent="unknown", num_caption_labels=5)
    assert [d.fraction for d in ev.draws] == [0.5, 1.0] and ev.describe(1) == {"text_fraction": 1.0}
    batch = {"image": torch.randn(3, 3, 12, 12), "valid": torch.ones(3, dtype=torch.bool),
             "index": torch.tensor([2, 1, 0]), "caption_labels": torch.randint(0, 2, (3, 5))}
    _, context = ev.batch(batch)
    assert ev.no_evidence(context, [0, 1], slice(0, 3)).tolist() == [False, True, False, False, False, False]

    setting = FeedbackSetting("lf", ("0",), lr=0.5, steps=3)
    cb = FeedbackPropCallback(setting, evidence=ev, weight_decay=0.1, max_samples=8, max_state_gb=None, log=False)
    plain, fed = cb.batch_scores(net, batch)
    assert torch.equal(fed[(0, 0)][1], plain[1])  # 50 %: image 1 knows nothing and stays as it was
    for d, labels in ((0, half), (1, whole)):
        mask, values = known_evidence(torch.from_numpy(labels[[2, 1, 0]]), ev.draws[d].fraction, "unknown")
        own = feedback_prop(net, batch["image"], multilabel_known_loss(mask, values, key="article"), ["0"],
                            method="lf", steps=3, lr=0.5, optimizer="adam", weight_decay=0.1)["caption"]
        moved = mask.any(1)
        assert torch.allclose(fed[(0, d)][moved], own[moved], atol=1e-5)
        assert not torch.allclose(fed[(0, d)][moved], plain[moved])
    assert not torch.equal(fed[(0, 1)][1], plain[1])  # at 100 % image 1 knows a noun
    with pytest.raises(ValueError, match="fractions > 0"):
        TextPrefixEvidence({0.0: half, 1.0: whole})
    with pytest.raises(IndexError, match="another split"):
        ev.known_loss({"index": torch.tensor([3])}, [0], slice(0, 1))


def test_two_heads_return_a_dict_and_keep_pivot_names():
    from topdown.backbones import build_backbone
    from topdown.layers import resolve_layer

    net = multi_head(build_backbone("resnet50", 5), {"caption": 5, "article": 7}).eval()
    out = net(torch.zeros(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"caption": (2, 5), "article": (2, 7)}
    assert resolve_layer(net, "conv40") == "layer3" and resolve_layer(net, "conv22") == "layer2"


# ------------------------------------------------------------------ GoodNews reader

def _goodnews_tree(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    articles = {
        "a1": {"article": "The mayor opened a bridge. A dog watched the crowd.", "headline": {"main": "Bridge"},
               "images": {"0": "A dog on a bridge.", "1": "The mayor and a crowd."}},
        "a2": {"article": "Farmers fear drought. The harvest is poor.", "images": {"0": "A farmer in a field.",
                                                                                   "1": ""}},
        "a3": {"article": "   ", "images": {"0": "A cat."}},
        "a4": {"article": "A storm hit the town. Residents fled.", "images": {"0": "A storm over the town."}},
        "a5": {"article": "Police found a car.", "images": {"0": "A police car."}},
    }
    splits = {"a1_0": "train", "a1_1": "train", "a2_0": "train", "a2_1": "train", "a3_0": "train",
              "a4_0": "val", "a5_0": "test", "gone_0": "test"}
    (root / "article_caption.json").write_text(json.dumps(articles))
    (root / "img_splits.json").write_text(json.dumps(splits))
    rng = np.random.default_rng(0)
    for key in ("a1_0", "a1_1", "a2_0", "a4_0"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{key}.jpg")
    (root / "images" / "a5_0.jpg").write_bytes(b"not a jpeg")  # corrupt: found when read
    return root


def test_goodnews_reader_skips_names_and_counts_bad_entries(tmp_path):
    root = _goodnews_tree(tmp_path / "gn")
    images, skipped, _ = read_goodnews(root)
    assert [im["key"] for im in images] == ["a1_0", "a1_1", "a2_0", "a4_0", "a5_0"]
    assert skipped == {"article missing": ["gone_0"], "article without text": ["a3_0"],
                       "image without caption": ["a2_1"], "image file missing": []}

    dm = GoodNewsDataModule(str(root), caption_vocab_size=3, article_vocab_size=4, image_size=32, num_workers=0)
    with pytest.warns(UserWarning, match=r"skipped 3 images.*a3_0.*a2_1"):
        dm.prepare_data()
    assert dm.skipped == {"article missing": ["gone_0"], "article without text": ["a3_0"],
                          "image without caption": ["a2_1"]}
    assert json.loads((dm.cache_dir() / "skipped_images.json").read_text())["article missing"] == ["gone_0"]
    # vocabularies from the training captions / articles, counted per image
    assert dm.caption_vocabulary == ["bridge", "crowd", "dog"]  # ties alphabetically; "mayor" is 4th
    assert dm.article_vocabulary == ["bridge", "crowd", "dog", "mayor"]  # a1's two images count twice
    assert dm.split_labels("train", "caption").tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert (dm.prefix_labels("train", 1.0) == dm.split_labels("train", "article")).all()
    assert dm.caption_label_weights.shape == (3,)
    bad = dm.dataset("test")[0]
    assert not bool(bad["valid"]) and bad["caption_labels"].shape == (3,) and bad["article_labels"].shape == (4,)

    # the cache is keyed by the settings record: another size builds and keeps its own
    dm2 = GoodNewsDataModule(str(root), caption_vocab_size=2, article_vocab_size=4, num_workers=0)
    with pytest.warns(UserWarning):
        assert dm2.caption_vocabulary == ["bridge", "crowd"]
    assert len(list(dm.cache_dir().glob("news_*.npz"))) == 2
    assert dm.settings_record()["noun_finder"] == dm2.settings_record()["noun_finder"]


def test_goodnews_preset_runs_end_to_end(tmp_path):
    root = _goodnews_tree(tmp_path / "gn")
    cli = train.main(["--model", "news", "--config", str(REPO / "configs" / "goodnews.yaml"), "--data.root", str(root),
                      "--model.weights", "null", "--model.backbone", "resnet18", "--data.image_size", "32",
                      "--data.num_workers", "0", "--data.batch_size", "4", "--run.root", str(tmp_path / "runs"),
                      "--run.wandb", "false", "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.state.finished and cli.model.hparams.num_caption_labels == 6  # every training caption noun
    assert cli.trainer.logged_metrics["test/skipped"] == 1  # the corrupt a5_0.jpg, counted


def test_goodnews_missing_root_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        GoodNewsDataModule(str(tmp_path / "nothing")).prepare_data()
    root = _goodnews_tree(tmp_path / "gn")
    (root / "img_splits.json").unlink()
    with pytest.raises(FileNotFoundError, match="img_splits.json"):
        GoodNewsDataModule(str(root)).prepare_data()
    with pytest.raises(FileNotFoundError, match="resized"):
        read_goodnews(_goodnews_tree(tmp_path / "gn2"), image_dir="resized")


# ------------------------------------------------------------------ scenes news view

def test_scenes_news_view_is_additive_and_speaks_other_words(tiny_scenes, tmp_path, monkeypatch):
    from datamodules import scenes_news
    from datamodules.scenes import build_scenes
    from datamodules.scenes_news import OBJECT_WORDS, SCENE_WORDS

    monkeypatch.setattr(scenes_news, "build_news_view", lambda root, seed=0: None)
    plain = build_scenes(tmp_path / "plain", workers=1, **TINY_SCENES)

    def digests(root):
        return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
                if p.is_file() and p.relative_to(root).parts[0] != "news" and p.name not in ("scenes.json", ".lock")}

    before, after = digests(plain), digests(tiny_scenes)  # the shared root may also hold other tests' caches
    assert len(before) > 200 and {k: after.get(k) for k in before} == before
    meta = [json.loads((r / "scenes.json").read_text()) for r in (plain, tiny_scenes)]
    for m in meta:
        m.pop("build_seconds")
    assert meta[0] == meta[1]

    news = tiny_scenes / "news"
    articles = json.loads((news / "article_caption.json").read_text())
    splits = json.loads((news / "img_splits.json").read_text())
    assert len(splits) == TINY_SCENES["num_images"] and set(splits.values()) == {"train", "val", "test"}
    clue_words = {w for ws in (*OBJECT_WORDS.values(), *SCENE_WORDS.values()) for w in ws}
    said = set()
    for split in ("train", "val"):
        for ann in json.loads((tiny_scenes / "annotations" / f"captions_{split}2014.json").read_text())["annotations"]:
            said |= set(tokenize(ann["caption"]))
    assert not clue_words & said, "the articles must name what is pictured in words the captions never use"
    for aid, art in articles.items():
        assert len(art["article"].split(". ")) >= 4 and (news / "images" / f"{aid}_0.jpg").is_file()


# ------------------------------------------------------------------ CLI and Table 2

@pytest.fixture(scope="module")
def news_root(tiny_scenes, tmp_path_factory) -> Path:
    """The tiny scenes data with one corrupt test image: links to the shared build (its news cache
    included, so nothing is tagged again), the corrupt file a real one of its own."""
    from datamodules.scenes_news import NEWS_DIR

    root = tmp_path_factory.mktemp("news_root")
    for entry in tiny_scenes.iterdir():
        if entry.name not in (NEWS_DIR, ".lock"):
            (root / entry.name).symlink_to(entry)
    news, shared = root / NEWS_DIR, tiny_scenes / NEWS_DIR
    (shared / "topdown_cache").mkdir(exist_ok=True)
    (news / "images").mkdir(parents=True)
    for entry in shared.iterdir():
        if entry.name != "images":
            (news / entry.name).symlink_to(entry)
    splits = json.loads((shared / "img_splits.json").read_text())
    bad = min(k for k, v in splits.items() if v == "test")
    for image in (shared / "images").iterdir():
        if image.stem == bad:
            (news / "images" / image.name).write_bytes(b"not a jpeg")
        else:
            (news / "images" / image.name).symlink_to(image)
    return root


@pytest.fixture(scope="module")
def news_run(news_root, tmp_path_factory):
    """One real one-epoch news training run on the tiny scenes data, shared by the CLI and Table 2 tests."""
    runs = tmp_path_factory.mktemp("news_runs")
    cli = train.main(tiny_news_args(news_root, runs) + ["--trainer.max_epochs", "1", "--model.lr", "0.002"])
    return cli, cli.trainer.checkpoint_callback.best_model_path


def test_cli_trains_the_news_model_with_linked_sizes(news_run):
    cli, ckpt = news_run
    assert cli.trainer.state.finished and Path(ckpt).is_file()
    assert cli.model.hparams.num_caption_labels == cli.datamodule.num_caption_labels == 20
    assert cli.model.hparams.num_article_labels == cli.datamodule.num_article_labels == 40
    assert cli.model.caption_weights.shape == (20,) and not torch.equal(cli.model.caption_weights, torch.ones(20))
    assert {"test/map_caption", "test/map_article", "test/skipped"} <= set(cli.trainer.logged_metrics)


TABLE_FLAGS = ["--table2.columns", "[lf:conv9, rf:layer3]", "--table2.lr_grid", "[0.3]", "--table2.steps", "2",
               "--table2.fractions", "[0, 0.5, 1]", "--table2.figure6_images", "2"]


@pytest.fixture(scope="module")
def table2_single(news_root, news_run, tmp_path_factory):
    import scripts.table2 as table2

    runs = tmp_path_factory.mktemp("table2_runs")
    return runs, table2.main(tiny_news_args(news_root, runs) + TABLE_FLAGS + ["--ckpt_path", news_run[1]])


def test_table2_command_prints_the_layout_and_writes_files(table2_single):
    result = table2_single[1]
    lines = result["table"].splitlines()
    assert lines[1].split() == ["LF-conv9", "RF-layer3"]
    assert [ln.split("  ")[0].strip() for ln in lines[3:]] == ["no-text", "50% text", "100% text"]
    assert (Path(result["cli"].run_dir) / "fp_table2_table.txt").read_text().strip() == result["table"]
    rows = {(r["row"], r["column"]): r["test_map"] for r in result["rows"]}
    assert rows[("no-text", "LF-conv9")] == rows[("no-text", "RF-layer3")] == result["nofp"]
    assert any(v != result["nofp"] for (row, _), v in rows.items() if row != "no-text")  # feedback-prop acted
    run_dir = Path(result["cli"].run_dir)
    from test_cli import last_value, read_metrics

    # the no-text row is the plain model: the module's own test mAP of the caption head
    assert abs(result["nofp"] - last_value(read_metrics(run_dir), "test/map_caption")) <= 1e-6
    # the corrupt test image: counted by the model and by feedback-prop, reported with the table
    assert result["skipped"] == {"val": 0, "test": 1} and last_value(read_metrics(run_dir), "fp/skipped") == 1
    val = {(r["setting"], r["text_fraction"], r["iteration"]): r["map_caption"] for r in result["val_callback"].records}
    for c in result["chosen"]:  # each cell's best t >= 1 on val, run on test as that computation
        column = f"{c['method'].upper()}-{c['layers']}"
        best = max(val[(column, c["text_fraction"], t)] for t in (1, 2))
        assert c["lr"] == 0.3 and c["val_map_caption"] == best == val[(column, c["text_fraction"], c["iteration"])]
        assert (c["steps"], c["stop"]) == (c["iteration"], None)
    for name in ("fp_table2_table.csv", "fp_table2_selection.csv", "fp_table2_val_iterations.csv",
                 "fp_table2_test_iterations.csv", "fp_table2_test.png", "figure6.png", "figure6.html"):
        assert (run_dir / name).is_file(), name
    assert "<img src='data:image/jpeg;base64," in (run_dir / "figure6.html").read_text()


@pytest.mark.slow
def test_table2_under_two_process_ddp_equals_single_process(news_root, news_run, table2_single, tmp_path):
    from test_distributed import finish, newest_run, run_entry

    single = table2_single[1]
    assert len(news_run[0].datamodule.dataset("test")) % 2 == 1, "the test split must not divide by 2 ranks"
    ddp = tiny_news_args(news_root, tmp_path / "runs") + TABLE_FLAGS + [
        "--table2.figure6_images", "0", "--run.name", "ddp", "--ckpt_path", news_run[1],
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    (tmp_path / "scripts").mkdir()  # run_entry logs to tmp_path/<script>-<time>.log
    out = finish(run_entry("scripts/table2.py", ddp, tmp_path), timeout=400)
    assert "All distributed processes registered" in out
    import csv

    with open(newest_run(tmp_path / "runs", "ddp") / "fp_table2_table.csv") as f:
        ddp_rows = {(r["row"], r["column"]): float(r["test_map"]) for r in csv.DictReader(f)}
    for r in single["rows"]:
        assert abs(ddp_rows[(r["row"], r["column"])] - r["test_map"]) <= 1e-6, (r, ddp_rows)
    from test_cli import last_value, read_metrics

    for key in ("test/map_caption", "test/map_article", "fp/skipped", "test/skipped"):
        a = last_value(read_metrics(Path(single["cli"].run_dir)), key)
        b = last_value(read_metrics(newest_run(tmp_path / "runs", "ddp")), key)
        assert abs(a - b) <= 1e-6, (key, a, b)
