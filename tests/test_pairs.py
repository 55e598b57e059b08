"""Central-object selection, transforms that keep the object in frame, readers and the pairs datamodule."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.pairs import (PaddedPairs, PairsDataModule, ShardSampler, coco_originals, ilsvrc_originals,
                               read_voc_annotation)
from topdown.transforms import canvas_side, is_central_object, render, transformed_box

torch.set_num_threads(1)


def test_central_object_criteria():
    W, H = 200, 200
    side = math.sqrt(0.5) * W
    c = W / 2
    good = (c - side / 2, c - side / 2, c + side / 2, c + side / 2)
    assert is_central_object(good, W, H)
    assert not is_central_object((good[0] + 30, good[1], good[2] + 30, good[3]), W, H)  # off centre by 15%
    assert not is_central_object((c - 90, c - 50, c + 90, c + 50), W, H)  # 45% but 1.8:1
    small = math.sqrt(0.3) * W
    assert not is_central_object((c - small / 2, c - small / 2, c + small / 2, c + small / 2), W, H)  # 30%
    big = math.sqrt(0.7) * W
    assert not is_central_object((c - big / 2, c - big / 2, c + big / 2, c + big / 2), W, H)  # 70%


def test_central_object_criteria_rejects_small_box():
    assert not is_central_object((80, 70, 120, 110), 200, 180)


def test_rotation_is_counter_clockwise_on_screen():
    img = torch.zeros(1, 101, 101)
    img[0, 48:53, 78:83] = 1.0  # a dot right of the centre
    box = (25, 25, 76, 76)  # centre (50.5, 50.5)
    out = render(img, box, "rotation", [90.0], size=101, side=101)[0, 0]
    ys, xs = torch.nonzero(out > 0.5, as_tuple=True)
    assert ys.float().mean() < 35 and abs(xs.float().mean() - 50) < 3  # moved up, not down


@pytest.mark.parametrize("kind,states", [
    ("rotation", [float(t) for t in range(0, 420, 5)]),
    ("scale", [0.6, 0.75, 1.0, 1.3, 1.43]),
    ("translation_x", [-40.0, -30.0, 0.0, 30.0, 40.0]),
    ("translation_y", [-40.0, 0.0, 40.0]),
])
def test_object_stays_in_frame(kind, states):
    rng = random.Random(0)
    size = 96
    for _ in range(20):
        W, H = rng.randint(150, 260), rng.randint(150, 260)
        frac, aspect = rng.uniform(0.4, 0.6), rng.uniform(0.75, 1.33)
        bw = math.sqrt(frac * W * H * aspect)
        bh = bw / aspect
        cx, cy = W / 2 + rng.uniform(-0.08, 0.08) * W, H / 2 + rng.uniform(-0.08, 0.08) * H
        box = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
        side = canvas_side(box, W, H, kind, states, size)
        for s in states:
            x0, y0, x1, y1 = transformed_box(box, kind, s, side, size)
            assert x0 >= -1e-6 and y0 >= -1e-6 and x1 <= size + 1e-6 and y1 <= size + 1e-6, (kind, s, box)
    # Rendering agrees with that geometry: a white box on black lands where transformed_box says.
    W = H = 200
    box = (45.0, 50.0, 155.0, 150.0)
    img = torch.zeros(1, H, W)
    img[0, 50:150, 45:155] = 1.0
    side = canvas_side(box, W, H, kind, states, size)
    outs = render(img, box, kind, states[::4], size=size, side=side, fill="mean")
    for s, out in zip(states[::4], outs):
        ys, xs = torch.nonzero(out[0] > 0.6, as_tuple=True)
        found = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
        expected = transformed_box(box, kind, s, side, size)
        assert all(abs(f - e) <= 1.5 for f, e in zip(found, expected)), (kind, s, found, expected)


def test_mean_fill():
    img = torch.zeros(3, 50, 50)
    img[:, 10:40, 10:40] = 1.0
    out = render(img, (10, 10, 40, 40), "scale", [0.5], size=50, side=50, fill="mean")[0]
    assert torch.allclose(out[:, 0, :], torch.full((3, 50), 0.36))  # 900 / 2500 of the pixels are 1
    assert out[:, 25, 25].min() > 0.99


def _write_voc(path, width, height, boxes, name="n01"):
    objs = "".join(f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
                    f"{objs}</annotation>")


def _write_jpeg(path, width, height, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)


def test_ilsvrc_reader(tmp_path):
    base = tmp_path / "ILSVRC"
    ann, data = base / "Annotations" / "CLS-LOC", base / "Data" / "CLS-LOC"
    central = (43, 28, 257, 222)  # 214x194 of 300x250: 55%, centred, 1.10:1
    _write_voc(ann / "train/n01/n01_1.xml", 300, 250, [central])
    _write_voc(ann / "train/n01/n01_2.xml", 300, 250, [(0, 0, 150, 125)])  # corner box
    _write_voc(ann / "train/n02/n02_1.xml", 300, 250, [central, (10, 10, 40, 40)], name="n02")  # two objects
    _write_voc(ann / "val/ILSVRC2012_val_00000001.xml", 300, 250, [central])
    for rel in ("train/n01/n01_1", "train/n01/n01_2", "train/n02/n02_1", "val/ILSVRC2012_val_00000001"):
        _write_jpeg(data / f"{rel}.JPEG", 300, 250)

    w, h, objs = read_voc_annotation(ann / "train/n02/n02_1.xml")
    assert (w, h) == (300, 250) and [o[1] for o in objs] == [tuple(map(float, central)), (10.0, 10.0, 40.0, 40.0)]
    single = ilsvrc_originals(tmp_path, "train")
    assert [o.path for o in single] == [str(data / "train/n01/n01_1.JPEG")]
    assert single[0].box == tuple(map(float, central)) and single[0].label == "n01"
    largest = ilsvrc_originals(base, "train", rule="largest")  # the ILSVRC folder itself works as root
    assert {o.path for o in largest} == {str(data / "train/n01/n01_1.JPEG"), str(data / "train/n02/n02_1.JPEG")}
    val = ilsvrc_originals(tmp_path, "val")
    assert len(val) == 1 and val[0].path.endswith("val/ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(FileNotFoundError, match="CLS-LOC"):
        ilsvrc_originals(tmp_path / "nowhere")
    _write_voc(ann / "train/n03/bad.xml", 300, 250, [])
    (ann / "train/n03/bad.xml").write_text("<annotation><size><width>3</width></size></annotation>")
    with pytest.raises(ValueError, match="bad.xml.*height"):
        ilsvrc_originals(tmp_path, "train")


def _write_coco(root, split, images, size=120):
    """images: list of bbox lists ([x, y, w, h]); writes JPEGs and instances_<split>2014.json."""
    anns, imgs = [], []
    for i, boxes in enumerate(images):
        name = f"COCO_{split}2014_{i:012d}.jpg"
        _write_jpeg(root / f"{split}2014" / name, size, size, seed=i)
        imgs.append({"id": i, "file_name": name, "width": size, "height": size})
        for b in boxes:
            anns.append({"id": len(anns), "image_id": i, "bbox": b, "area": b[2] * b[3], "category_id": 1})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps({"images": imgs, "annotations": anns}))


CENTRAL = [18, 18, 84, 84]  # 84x84 of 120x120: 49%


def test_coco_originals_dominant_object(tmp_path):
    _write_coco(tmp_path, "train", [
        [CENTRAL, [0, 0, 10, 10]],  # qualifies: central box is the largest
        [CENTRAL, [0, 0, 100, 110]],  # a larger box dominates: rejected
        [[0, 0, 60, 60]],  # off centre
        [CENTRAL],
    ])
    found = coco_originals(tmp_path, "train")
    assert [o.path.rsplit("_", 1)[1] for o in found] == ["000000000000.jpg", "000000000003.jpg"]
    assert found[0].box == (18.0, 18.0, 102.0, 102.0)
    assert len(coco_originals(tmp_path, "train", max_images=1)) == 1


def test_pairs_datamodule_phases(tmp_path):
    _write_coco(tmp_path, "train", [[CENTRAL], [CENTRAL], [[0, 0, 5, 5]]])
    _write_coco(tmp_path, "val", [[CENTRAL]])
    dm = PairsDataModule(root=str(tmp_path), transform=["rotation", "translation"], rotation_step=90,
                         rotation_amounts=[10, 30], translation_inits=[0], translation_amounts=[-10, 20],
                         image_size=64, batch_size=4)
    dm.setup("fit")
    assert dm.kinds == ["rotation", "translation_x", "translation_y"]
    assert dm.schedule[:2] == [("rotation", "pca"), ("rotation", "regression")] and dm.num_phases == 6
    pca = dm.pairs(*dm.phase(0))
    assert len(pca) == 2 * 4 and {pca[i]["amount"].item() for i in range(len(pca))} == {10.0}
    reg = dm.pairs(*dm.phase(1))
    assert len(reg) == 2 * 4 * 2 * 2  # and every pair reversed
    item = reg[3]
    assert item["image"].shape == (3, 64, 64) and item["transformed"].shape == (3, 64, 64)
    assert item["kind"] == "rotation" and item["valid"].item()
    assert item["state"].item() == 90.0 and item["amount"].item() == 30.0 and item["delta"].item() == 3.0
    assert not torch.allclose(item["image"], item["transformed"])
    batch = next(iter(dm.train_dataloader()))  # no trainer: phase_index 0 = rotation PCA
    assert batch["image"].shape == (4, 3, 64, 64) and batch["kind"] == ["rotation"] * 4
    tx = dm.pairs("translation_x", "regression")
    assert [tx[i]["delta"].item() for i in (0, 1, 4, 5)] == [-1.0, 2.0, 1.0, -2.0]  # 4 forward, then reversed
    dm.setup("test")
    test = dm.test_pairs()
    assert sorted(test[i]["case"] for i in range(len(test))) == ["left 30", "rotate -30", "rotate 30", "up 30"]


def test_missing_image_is_skipped_not_fatal(tmp_path):
    _write_coco(tmp_path, "train", [[CENTRAL]])
    (tmp_path / "train2014" / "COCO_train2014_000000000000.jpg").write_bytes(b"not a jpeg")
    dm = PairsDataModule(root=str(tmp_path), rotation_step=180, image_size=32)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="COCO_train2014_000000000000.jpg"):
        item = dm.pairs("rotation", "pca")[0]
    assert not item["valid"].item() and item["image"].abs().sum() == 0


def test_ddp_shards_are_equal_and_count_every_pair_once():
    items = [{"index": torch.tensor(i), "valid": torch.tensor(True)} for i in range(11)]
    padded = PaddedPairs(items, 3)
    assert len(padded) == 12
    shards = [list(ShardSampler(len(padded), r, 3)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # equal steps on every rank
    seen = [padded[i]["index"].item() for s in shards for i in s if padded[i]["valid"]]
    assert sorted(seen) == list(range(11))  # the padding item is invalid, so no pair counts twice
    assert padded[11]["pad"].item() and not padded[11]["valid"].item() and not padded[3]["pad"].item()


def test_reversed_pairs_negate_the_amount(tmp_path):
    """A reversed pair is the forward pair read backwards: same renderings swapped, amount -Δ, 1/s or -t."""
    from topdown.generators import normalized_amount

    _write_coco(tmp_path, "train", [[CENTRAL]])
    dm = PairsDataModule(root=str(tmp_path), transform=["rotation", "scale", "translation"], rotation_step=180,
                         rotation_amounts=[10, 30], scale_inits=[1.0], scale_amounts=[1.3],
                         translation_inits=[0], translation_amounts=[10], image_size=64)
    dm.setup("fit")
    for kind, amount, back in (("rotation", 30.0, -30.0), ("scale", 1.3, 1 / 1.3), ("translation_x", 10.0, -10.0)):
        pairs = dm.pairs(kind, "regression")
        n = pairs.num_forward
        assert len(pairs) == 2 * n and not any(p["reversed"] for p in dm.pairs(kind, "pca"))  # PCA: forward
        i = [k for k in range(n) if pairs[k]["amount"].item() == pytest.approx(amount)][-1]
        fwd, rev = pairs[i], pairs[n + i]
        assert torch.equal(rev["image"], fwd["transformed"]) and torch.equal(rev["transformed"], fwd["image"])
        assert rev["amount"].item() == pytest.approx(back) and rev["reversed"].item() and not fwd["reversed"].item()
        assert rev["delta"].item() == pytest.approx(-fwd["delta"].item())
        assert rev["delta"].item() == pytest.approx(normalized_amount(kind, back))
        end = fwd["state"].item() * amount if kind == "scale" else fwd["state"].item() + amount
        assert rev["state"].item() == pytest.approx(end)  # the reversed pair starts where the forward one ends
    # The defaults fit both signs over a range holding every amount of the paper.
    dm = PairsDataModule(root=str(tmp_path), transform=["rotation", "scale", "translation"])
    paper = {"rotation": (30.0, -30.0), "scale": (1.3, 0.75), "translation_x": (-30.0,), "translation_y": (-30.0,)}
    for kind, amounts in paper.items():
        lo, hi = dm.amount_range(kind)
        assert all(lo <= a <= hi for a in amounts), (kind, lo, hi)
