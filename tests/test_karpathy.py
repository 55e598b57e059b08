"""The Karpathy-split reader joined with COCO instances, the caption vocabulary, and the scenes view."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.karpathy import KarpathyCaptionsDataModule, read_karpathy
from datamodules.scenes import KARPATHY_FILE, ensure_scenes, write_karpathy_split
from topdown.captions import END_ID, PAD_ID, START_ID, UNK_ID, build_caption_vocab, caption_vocabulary

# COCO ids have gaps and the file's order is not the id order: labels follow the file.
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
# (cocoid, folder, split, captions, category ids)
IMAGES = [
    (11, "train", "train", ["A person with a car.", "A person on the road."], [1, 3]),
    (12, "train", "train", ["A toothbrush.", "A red toothbrush on a sink"], [90]),
    (13, "train", "train", ["A car.", "A car on the road"], [3]),
    (21, "val", "restval", ["A person.", "A person and a car", "A person with a toothbrush"], [1, 1]),
    (22, "val", "val", ["A car on the road."], [3]),
    (23, "val", "val", ["Nothing here."], []),
    (24, "val", "test", ["A person and a toothbrush."], [1, 90]),
    (25, "val", "test", ["A car and a person."], [3, 1]),
    (26, "val", "test", ["Not in the instances file."], None),
]


def file_name(folder: str, cocoid: int) -> str:
    return f"COCO_{folder}2014_{cocoid:012d}.jpg"


@pytest.fixture
def tiny_coco(tmp_path) -> Path:
    """A Karpathy split file, two instances files and 8x8 JPEGs (one missing, one corrupt)."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    images, inst = [], {"train": {"images": [], "annotations": [], "categories": CATEGORIES},
                        "val": {"images": [], "annotations": [], "categories": CATEGORIES}}
    for n, (cid, folder, split, caps, cats) in enumerate(IMAGES):
        images.append({"filepath": f"{folder}2014", "filename": file_name(folder, cid), "cocoid": cid, "split": split,
                       "imgid": n, "sentences": [{"raw": c, "tokens": c.lower().strip(".").split()} for c in caps]})
        if cats is not None:
            inst[folder]["images"].append({"id": cid, "file_name": file_name(folder, cid)})
            inst[folder]["annotations"] += [{"id": cid * 10 + k, "image_id": cid, "category_id": c}
                                            for k, c in enumerate(cats)]
        (root / f"{folder}2014").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (cid, 0, 0)).save(root / f"{folder}2014" / file_name(folder, cid))
    (root / "annotations" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for folder, data in inst.items():
        (root / "annotations" / f"instances_{folder}2014.json").write_text(json.dumps(data))
    (root / "train2014" / file_name("train", 12)).unlink()                    # missing
    (root / "val2014" / file_name("val", 24)).write_bytes(b"not a jpeg")      # corrupt
    return root


def datamodule(root, **kw) -> KarpathyCaptionsDataModule:
    args = dict(min_count=1, max_len=6, image_size=8, batch_size=4, num_workers=0, captions_per_image=2)
    return KarpathyCaptionsDataModule(str(root), **{**args, **kw})


def test_reader_joins_instances_maps_categories_and_skips(tiny_coco):
    dm = datamodule(tiny_coco)
    with pytest.warns(UserWarning, match=r"1 images of .*dataset_coco.json have no entry in the instances files.*"
                                         r"COCO_val2014_000000000026.jpg"):
        dm.prepare_data()
    assert dm.object_names == ["toothbrush", "person", "car"] and dm.num_objects == 3
    assert dm.skipped_no_instances == {"train": 0, "val": 0, "test": 1}
    assert dm.split_image_ids("train").tolist() == [11, 12, 13, 21]  # restval trains
    assert dm.split_image_ids("val").tolist() == [22, 23]
    assert dm.split_image_ids("test").tolist() == [24, 25]
    labels = dict(zip(dm.split_image_ids("train").tolist(), dm.split_labels("train").tolist()))
    assert labels == {11: [0, 1, 1], 12: [1, 0, 0], 13: [0, 0, 1], 21: [0, 1, 0]}
    assert dm.split_labels("val").tolist() == [[0, 0, 1], [0, 0, 0]]  # no instance: all zeros, kept
    assert dm.split_references("test") == {24: ["A person and a toothbrush."], 25: ["A car and a person."]}
    assert dm.label_weights.tolist() == [3.0, 1.0, 1.0]  # eq. 6: negatives / positives

    dm.setup("fit")
    item = dm.dataset("train")[0]
    assert item["valid"] and item["image_id"] == 11 and item["labels"].tolist() == [0, 1, 1]
    assert item["captions"].shape == (2, 8) and item["captions"][:, 0].eq(START_ID).all()
    assert sorted(dm.vocab.decode(c) for c in item["captions"]) == ["a person on the road", "a person with a car"]
    with pytest.warns(UserWarning, match="image file missing, sample skipped: .*COCO_train2014_000000000012.jpg"):
        assert not dm.dataset("train")[1]["valid"]
    dm.setup("test")
    with pytest.warns(UserWarning, match="image file unreadable, sample skipped: .*COCO_val2014_000000000024.jpg"):
        assert not dm.dataset("test")[0]["valid"]


def test_missing_split_or_instances_file_is_named(tiny_coco):
    (tiny_coco / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances_val2014.json"):
        datamodule(tiny_coco).prepare_data()
    with pytest.raises(FileNotFoundError, match="nowhere/dataset_coco.json"):
        datamodule(tiny_coco, split_file=str(tiny_coco / "nowhere" / "dataset_coco.json")).prepare_data()
    bad = tiny_coco / "annotations" / "bad.json"
    bad.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "train"}]}))
    with pytest.raises(KeyError, match="bad.json: image #0 \\(x.jpg\\) lacks"):
        read_karpathy(bad)


def test_paper_split_is_seeded(tiny_coco):
    def ids(seed):
        dm = datamodule(tiny_coco, split="paper", split_seed=seed, val_size=2, test_size=3)
        with pytest.warns(UserWarning, match="no entry in the instances files"):
            dm.prepare_data()
        return {s: dm.split_image_ids(s).tolist() for s in ("train", "val", "test")}

    a, b = ids(0), ids(0)
    assert a == b
    assert sorted(a["train"] + a["val"] + a["test"]) == [11, 12, 13, 21, 22, 23, 24, 25]  # 26 skipped
    assert len(a["val"]) + len(a["test"]) >= 4  # 2 + 3 drawn from all 9, one may be the skipped image
    assert any(ids(s) != a for s in (1, 2, 3))


def test_vocabulary_threshold_clipping_and_rebuild(tmp_path):
    caps = [["a", "dog", "runs", "far", "away"], ["a", "dog", "sits"], ["a", "cat", "runs", "far", "away"]]
    v = build_caption_vocab(caps, min_count=2, max_len=3)
    # 'far'/'away' only occur after the 3rd token; 'cat', 'sits' once
    assert v.words == ("<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs")
    assert v.counts[4:] == (3, 2, 2)
    assert v.encode(["a", "cat", "runs", "far"], 3).tolist() == [START_ID, 4, UNK_ID, 6, END_ID]
    assert v.encode(["a"], 3).tolist() == [START_ID, 4, END_ID, PAD_ID, PAD_ID]
    assert v.decode([START_ID, 4, 5, END_ID, 6]) == "a dog"

    path = tmp_path / "captions_vocab.json"
    settings = {"min_count": 2, "max_len": 3, "split": "karpathy"}
    v1, built = caption_vocabulary(path, caps, settings)
    assert built and v1.words == v.words and json.loads(path.read_text())["settings"] == settings
    _, built = caption_vocabulary(path, lambda: pytest.fail("a current vocabulary must be reused"), settings)
    assert not built
    v2, built = caption_vocabulary(path, caps, {**settings, "min_count": 1})
    assert built and "cat" in v2.words and json.loads(path.read_text())["settings"]["min_count"] == 1
    v3, built = caption_vocabulary(path, caps, {**settings, "min_count": 1, "max_len": 5})
    assert built and "far" in v3.words


def test_datamodule_rebuilds_vocabulary_when_a_setting_changes(tiny_coco):
    path = tiny_coco / "captions_vocab.json"
    with pytest.warns(UserWarning):
        datamodule(tiny_coco, min_count=1).prepare_data()
    assert "toothbrush" in json.loads(path.read_text())["words"]
    with pytest.warns(UserWarning):
        dm = datamodule(tiny_coco, min_count=4)
        dm.prepare_data()
    saved = json.loads(path.read_text())
    assert saved["settings"]["min_count"] == 4 and "toothbrush" not in saved["words"] and "person" in saved["words"]
    assert dm.caption_vocabulary == saved["words"]


def test_scenes_karpathy_view_is_complete_and_additive(tiny_scenes, tmp_path):
    data = json.loads((tiny_scenes / KARPATHY_FILE).read_text())
    splits = [im["split"] for im in data["images"]]
    assert {s: splits.count(s) for s in set(splits)} == {"train": 72, "restval": 28, "val": 10, "test": 10}
    caps = {}
    for folder in ("train", "val"):
        for a in json.loads((tiny_scenes / "annotations" / f"captions_{folder}2014.json").read_text())["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
    assert {im["cocoid"]: [s["raw"] for s in im["sentences"]] for im in data["images"]} == caps
    assert all((tiny_scenes / im["filepath"] / im["filename"]).is_file() for im in data["images"])

    # A build from before the captioning view gets the file added, identical, and nothing else changes.
    copy = tmp_path / "scenes"
    shutil.copytree(tiny_scenes, copy)
    (copy / KARPATHY_FILE).unlink()
    before = {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in copy.rglob("*") if p.is_file() and p.name != ".lock"}
    ensure_scenes(copy, num_images=120, size=64, seed=0)
    after = {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in copy.rglob("*") if p.is_file() and p.name != ".lock"}
    assert (copy / KARPATHY_FILE).read_bytes() == (tiny_scenes / KARPATHY_FILE).read_bytes()
    assert {p: h for p, h in after.items() if p != copy / KARPATHY_FILE} == before
    assert write_karpathy_split(copy, seed=1).read_bytes() != (tiny_scenes / KARPATHY_FILE).read_bytes()
