"""The ILSVRC CLS-LOC reader on tiny trees written here, its ten views, and the scenes classification view."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import scenes
from datamodules.ilsvrc import ILSVRCDataModule, ScenesILSVRCDataModule, eval_transform
from datamodules.scenes import CLS_LOC_MARKER, OBJECT_SYNSETS, build_scenes, image_class
from topdown.warp import CENTER_VIEW

from conftest import TINY_SCENES

WNIDS = ("n01440764", "n01443537", "n02084071")  # sorted: class indices 0, 1, 2


def _jpeg(path: Path, seed: int, size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format="JPEG")


def write_cls_loc(root: Path, labels: str = "csv", train_per_class: int = 5, val: int = 7) -> dict:
    """A tiny CLS-LOC release: 3 classes, ``val`` labelled val images (one corrupt), one unlabelled val
    image, a label whose image is missing and a label of a wnid without a train folder."""
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    for k, w in enumerate(reversed(WNIDS)):  # written out of order: the index must come from sorting
        for i in range(train_per_class):
            _jpeg(data / "train" / w / f"{w}_{i}.JPEG", 100 * k + i)
    truth = {}
    for i in range(1, val + 1):
        stem = f"ILSVRC2012_val_{i:08d}"
        _jpeg(data / "val" / f"{stem}.JPEG", 1000 + i)
        truth[stem] = WNIDS[i % 3]
    (data / "val" / "ILSVRC2012_val_00000003.JPEG").write_bytes(b"\xff\xd8 not a jpeg")  # corrupt, labelled
    _jpeg(data / "val" / "ILSVRC2012_val_00000900.JPEG", 7)  # on disk, no label
    rows = dict(truth)
    rows["ILSVRC2012_val_00000901"] = WNIDS[0]  # labelled, not on disk
    _jpeg(data / "val" / "ILSVRC2012_val_00000902.JPEG", 8)
    rows["ILSVRC2012_val_00000902"] = "n09999999"  # a class with no train folder
    if labels == "csv":
        lines = ["ImageId,PredictionString"] + [f"{s},{w} 1 2 30 20 {w} 5 5 9 9" for s, w in sorted(rows.items())]
        (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    else:
        ann = root / "ILSVRC" / "Annotations" / "CLS-LOC" / "val"
        ann.mkdir(parents=True)
        for s, w in rows.items():
            (ann / f"{s}.xml").write_text(f"<annotation><filename>{s}</filename><size><width>48</width>"
                                          f"<height>40</height></size><object><name>{w}</name><bndbox><xmin>1</xmin>"
                                          f"<ymin>2</ymin><xmax>30</xmax><ymax>20</ymax></bndbox></object></annotation>")
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
                                                 "n02084071 dog, domestic dog, Canis familiaris\n")
    return truth


def _read(dm: ILSVRCDataModule) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit"), dm.setup("test")
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("labels", ["csv", "xml"])
def test_reader_labels_classes_and_skips(tmp_path, labels):
    truth = write_cls_loc(tmp_path, labels)
    dm = ILSVRCDataModule(root=str(tmp_path / "ILSVRC") if labels == "xml" else str(tmp_path), crop_size=32,
                          resize=40, holdout=0.2, num_workers=0, batch_size=4)
    messages = _read(dm)
    assert dm.wnids == list(WNIDS) and dm.num_classes == 3
    assert dm.class_names == ["tench, Tinca tinca", "goldfish, Carassius auratus", "dog, domestic dog, Canis familiaris"]
    train, val, test = (dm.dataset(s) for s in ("train", "val", "test"))
    assert len(train) == 12 and len(val) == 3  # 1 of 5 per class held out
    assert set(map(str, train.paths)).isdisjoint(map(str, val.paths))
    for ds in (train, val):
        assert all(Path(p).parent.name == WNIDS[t] for p, t in zip(ds.paths, ds.targets))
    assert [Path(p).stem for p in test.paths] == sorted(truth)  # the labelled images, the corrupt one included
    assert [WNIDS[t] for t in test.targets] == [truth[Path(p).stem] for p in test.paths]
    skipped = dm.skipped
    assert [Path(p).name for p in skipped["unlabelled"]] == ["ILSVRC2012_val_00000900.JPEG"]
    assert [Path(p).name for p in skipped["missing"]] == ["ILSVRC2012_val_00000901.JPEG"]
    assert len(skipped["unknown_class"]) == 1 and "n09999999" in skipped["unknown_class"][0]
    assert dm.skipped_count("test") == 3 and dm.skipped_count("val") == 0
    for name in ("00000900", "00000901", "n09999999"):
        assert sum(name in m for m in messages) == 1, messages  # each named once, in a warning with its count
    with pytest.warns(UserWarning, match="ILSVRC2012_val_00000003.JPEG"):
        bad = test[2]  # corrupt file: skipped at load time, not fatal
    assert not bad["valid"] and bad["views"].shape == (10, 3, 32, 32) and bad["image"].shape == (3, 32, 32)
    assert test[0]["valid"]


def test_reader_errors_name_the_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        ILSVRCDataModule(root=str(tmp_path / "nowhere")).num_classes
    write_cls_loc(tmp_path)
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv.*Annotations/CLS-LOC/val"):
        ILSVRCDataModule(root=str(tmp_path)).num_classes
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        ILSVRCDataModule(root=str(tmp_path), val_labels=str(tmp_path / "labels.csv")).num_classes
    (tmp_path / "bad.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: image 'ILSVRC2012_val_00000001' has no wnid"):
        ILSVRCDataModule(root=str(tmp_path), val_labels=str(tmp_path / "bad.csv")).num_classes


def test_ten_views_hold_the_centre_crop_and_mirrors():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    views = eval_transform(32, 40, views=10)(img)
    assert views.shape == (10, 3, 32, 32)
    assert torch.equal(views[CENTER_VIEW], eval_transform(32, 40, views=1)(img))
    assert torch.equal(views[CENTER_VIEW + 5], views[CENTER_VIEW].flip(-1))  # the mirrored centre crop
    assert not torch.equal(views[0], views[1])  # corners differ


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (".lock", "scenes.json")}


def test_scenes_classification_view_is_additive_and_read_by_the_same_reader(tiny_scenes, tmp_path, monkeypatch):
    monkeypatch.setattr(scenes, "write_classification_view", lambda root: None)
    plain = build_scenes(tmp_path / "plain", workers=1, **TINY_SCENES)  # same seed, without the view
    monkeypatch.undo()
    before, after = _files(plain), _files(tiny_scenes)
    assert before and all(after.get(name) == data for name, data in before.items())  # byte-identical
    counts = {k: v for k, v in json.loads((plain / "scenes.json").read_text()).items() if k != "build_seconds"}
    assert counts == {k: v for k, v in json.loads((tiny_scenes / "scenes.json").read_text()).items()
                      if k != "build_seconds"}
    added = sorted(set(after) - set(before))
    assert {"LOC_val_solution.csv", "LOC_synset_mapping.txt", CLS_LOC_MARKER} <= set(added)

    # An existing build that predates the view gets it from the datamodule, identical to a fresh build's.
    dm = ScenesILSVRCDataModule(root=str(plain), crop_size=64, resize=64, num_workers=0, **{
        k: v for k, v in TINY_SCENES.items() if k != "seed"})
    dm.setup("fit"), dm.setup("test")
    view = {name: data for name, data in after.items() if name.startswith(("ILSVRC/", "LOC_"))}
    assert {name: data for name, data in _files(plain).items() if name.startswith(("ILSVRC/", "LOC_"))} == view
    inst = json.loads((tiny_scenes / "annotations" / "instances_train2014.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    anns: dict[int, list] = {}
    for a in inst["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    largest = {i: OBJECT_SYNSETS[names[image_class(a)["category_id"]]][0] for i, a in anns.items()}
    train = dm.dataset("train")
    ids = [int(Path(p).stem.split("_")[1]) for p in train.paths] + [int(Path(p).stem.split("_")[1]) for p in dm.dataset("val").paths]
    assert len(ids) == len(largest) and set(ids) == set(largest)
    assert all(Path(p).parent.name == largest[int(Path(p).stem.split("_")[1])] for p in train.paths)
    meta = json.loads((tiny_scenes / CLS_LOC_MARKER).read_text())
    assert dm.num_classes == len(meta["classes"]["train"])
    # val images of a class that has no train image are left out by the reader, and counted
    unseen = sum(n for w, n in meta["classes"]["val"].items() if w not in meta["classes"]["train"])
    assert len(dm.dataset("test")) == meta["counts"]["val"] - unseen and dm.skipped_count("test") == unseen
