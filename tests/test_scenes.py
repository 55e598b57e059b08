"""The embedded scenes dataset: formats, determinism, central objects, captions, co-occurrence."""
from __future__ import annotations

import csv
import json
import math
import threading

import numpy as np
import pytest
from pycocotools.coco import COCO

from datamodules import scenes
from datamodules.scenes import OBJECTS, SCENES, build_scenes, ensure_scenes
from topdown.text import caption_words, lemmatize

SIZE = 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenes")
    scenes.main(["--root", str(path), "--num-images", "160", "--size", str(SIZE), "--workers", "1"])
    return path


def _load(root, kind, split):
    return json.loads((root / "annotations" / f"{kind}_{split}2014.json").read_text())


def test_same_seed_gives_same_bytes_whatever_the_workers(tmp_path):
    a = build_scenes(tmp_path / "a", num_images=24, size=48, seed=3, workers=1)
    b = build_scenes(tmp_path / "b", num_images=24, size=48, seed=3, workers=2)
    c = build_scenes(tmp_path / "c", num_images=24, size=48, seed=4, workers=1)
    for name in ("captions_train2014.json", "instances_val2014.json"):
        assert (a / "annotations" / name).read_bytes() == (b / "annotations" / name).read_bytes()
        assert (a / "annotations" / name).read_bytes() != (c / "annotations" / name).read_bytes()
    files = sorted(p.relative_to(a) for p in a.glob("*2014/*.jpg"))
    assert len(files) == 24
    for rel in files[::5]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_pycocotools_reads_both_annotation_files(root):
    meta = json.loads((root / "scenes.json").read_text())
    total = 0
    for split in ("train", "val"):
        inst = COCO(str(root / "annotations" / f"instances_{split}2014.json"))
        caps = COCO(str(root / "annotations" / f"captions_{split}2014.json"))
        img_ids = inst.getImgIds()
        total += len(img_ids)
        assert sorted(inst.getCatIds()) == list(range(1, len(OBJECTS) + 1))
        for img in inst.loadImgs(img_ids):
            assert (root / f"{split}2014" / img["file_name"]).is_file()
            assert img["file_name"] == f"COCO_{split}2014_{img['id']:012d}.jpg"
            assert len(caps.getAnnIds(imgIds=img["id"])) == 5
        for ann in inst.loadAnns(inst.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE and w > 0 and h > 0
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
    assert total == meta["num_images"] == 160
    assert meta["counts"]["val"] == 64  # val_fraction 0.4


def test_sun_layout_and_hierarchy(root):
    names = (root / "SUN397" / "ClassName.txt").read_text().split()
    assert names == [f"/{s.name[0]}/{s.name}" for s in SCENES]
    sun_images = list((root / "SUN397").glob("*/*/sun_*.jpg"))
    assert len(sun_images) == 160
    one = sun_images[0]
    image_id = int(one.stem.split("_")[1])
    coco = [p for p in root.glob(f"*2014/COCO_*_{image_id:012d}.jpg")]
    assert len(coco) == 1 and coco[0].read_bytes() == one.read_bytes()

    with open(root / "SUN397" / "hierarchy.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    assert header[0] == "category" and header[1:4] == list(scenes.COARSE)
    assert [r[0] for r in body] == [f"'{n}'" for n in names]
    member = np.array([[int(v) for v in r[1:]] for r in body])
    coarse, general = member[:, :3], member[:, 3:]
    assert (coarse.sum(1) >= 1).all() and (general.sum(1) >= 1).all()
    assert (general.sum(1) > 1).any() and (coarse.sum(1) > 1).any()
    # a fine category's coarse memberships are exactly those of its general ones
    gen_to_coarse = np.array([[scenes.GENERAL[g] == c for c in scenes.COARSE] for g in header[4:]])
    assert ((general @ gen_to_coarse) > 0).astype(int).tolist() == coarse.tolist()


def test_central_objects_meet_the_generators_selection_rule(root):
    meta = json.loads((root / "scenes.json").read_text())
    central = meta["central_objects"]
    assert 0.05 * 160 <= len(central) <= 0.25 * 160
    anns = {}
    for split in ("train", "val"):
        anns.update({a["id"]: a for a in _load(root, "instances", split)["annotations"]})
    for c in central:
        x, y, w, h = anns[c["annotation_id"]]["bbox"]
        assert abs(x + w / 2 - SIZE / 2) <= 0.05 * SIZE and abs(y + h / 2 - SIZE / 2) <= 0.05 * SIZE
        assert max(w, h) / min(w, h) <= 1.25
        assert 0.40 <= w * h / SIZE**2 <= 0.60
        # every box corner, rotated by up to 60 degrees about the centre, stays in frame
        for deg in (15, 30, 45, 60):
            t = math.radians(deg)
            for px, py in ((x, y), (x + w, y), (x, y + h), (x + w, y + h)):
                dx, dy = px - SIZE / 2, py - SIZE / 2
                rx, ry = SIZE / 2 + dx * math.cos(t) - dy * math.sin(t), SIZE / 2 + dx * math.sin(t) + dy * math.cos(t)
                assert -0.5 <= rx <= SIZE + 0.5 and -0.5 <= ry <= SIZE + 0.5


def _presence(root):
    """[N images, 30 categories] 0/1 from the instance annotations, and per-image caption words."""
    rows, words = [], []
    for split in ("train", "val"):
        inst, caps = _load(root, "instances", split), _load(root, "captions", split)
        index = {im["id"]: i for i, im in enumerate(inst["images"])}
        y = np.zeros((len(index), len(OBJECTS)), np.uint8)
        for a in inst["annotations"]:
            y[index[a["image_id"]], a["category_id"] - 1] = 1
        w = [set() for _ in index]
        for c in caps["annotations"]:
            w[index[c["image_id"]]] |= caption_words(c["caption"])
        rows.append(y)
        words += w
    return np.concatenate(rows), words


def test_captions_mention_most_but_not_all_objects(root):
    y, words = _presence(root)
    names = [lemmatize(o.name) for o in OBJECTS]
    mentioned = np.array([[names[j] in words[i] for j in range(len(names))] for i in range(len(words))])
    present = y.astype(bool)
    recall = (mentioned & present).sum() / present.sum()
    assert 0.5 < recall < 0.97, recall
    assert (present & ~mentioned).any(axis=1).mean() > 0.2  # many images have an unmentioned object
    # plurals go through lemmatization: "women" in a caption gives the label "woman"
    assert any("woman" in w for w in words)


def test_object_cooccurrence_is_strong_and_structured(root):
    y, _ = _presence(root)
    y = y.astype(float)
    marginal = y.mean(0)
    best = 0.0
    for a in range(y.shape[1]):
        has_a = y[:, a] == 1
        if has_a.sum() < 10:
            continue
        conditional = y[has_a].mean(0)
        diff = np.abs(conditional - marginal)
        diff[a] = 0
        best = max(best, diff.max())
    assert best > 0.35, best


def test_ensure_scenes_builds_once_under_concurrent_callers(tmp_path, monkeypatch):
    calls = []
    real = scenes.build_scenes

    def counting(root, **kw):
        calls.append(root)
        return real(root, **kw)

    monkeypatch.setattr(scenes, "build_scenes", counting)
    target = tmp_path / "shared"
    threads = [threading.Thread(target=ensure_scenes, args=(target,),
                                kwargs=dict(num_images=12, size=32, workers=1)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and (target / "scenes.json").is_file()
    stamp = (target / "scenes.json").stat().st_mtime_ns
    with pytest.warns(UserWarning, match="num_images: built 12, asked 13"):
        ensure_scenes(target, num_images=13, size=32)
    assert (target / "scenes.json").stat().st_mtime_ns == stamp and len(calls) == 1
