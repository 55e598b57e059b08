"""Hierarchical scene categorization (feedback-prop §4.2, Table 1): metrics, SUN397 data, CLI rows."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.sun397 import ScenesSUNDataModule, SUN397DataModule, read_hierarchy
from topdown.metrics import (
    average_precision,
    iou_accuracy,
    label_set_iou,
    mean_average_precision,
    multiclass_accuracy,
    table1_metrics,
)

# ------------------------------------------------------------------ metrics on hand-made examples


def test_iou_accuracy_is_mean_per_class_jaccard():
    pred = torch.tensor([0, 0, 1, 2])
    target = torch.tensor([0, 1, 1, 2])
    # class 0: TP 1, FP 1 -> 1/2; class 1: TP 1, FN 1 -> 1/2; class 2: 1; class 3 never seen: left out
    assert iou_accuracy(pred, target, num_classes=4).item() == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    scores = torch.nn.functional.one_hot(pred, 4).float()
    assert iou_accuracy(scores, target).item() == pytest.approx(2 / 3)


def test_iou_accuracy_equals_acc_over_two_minus_acc_for_balanced_errors():
    # each class: one right, one wrong -> IoU 1/3 = 0.5 / (2 - 0.5), the relation Table 1's figures obey
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 2, 0])
    acc = multiclass_accuracy(pred, target).item()
    assert acc == 0.5
    assert iou_accuracy(pred, target, 3).item() == pytest.approx(acc / (2 - acc))


def test_average_precision_and_map_by_hand():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.6]])
    labels = torch.tensor([[1, 0], [0, 1], [1, 0]])
    ap = average_precision(scores, labels)
    assert ap[0].item() == pytest.approx((1 / 1 + 2 / 3) / 2)  # positives ranked 1st and 3rd
    assert ap[1].item() == pytest.approx(1.0)
    assert mean_average_precision(scores, torch.tensor([0, 1, 0])).item() == pytest.approx((ap[0].item() + 1) / 2)
    # a class without positives has no AP and does not drag the mean down
    three = torch.cat([scores, torch.rand(3, 1)], 1)
    assert math.isnan(average_precision(three, torch.cat([labels, torch.zeros(3, 1, dtype=torch.long)], 1))[2].item())
    assert mean_average_precision(three, torch.tensor([0, 1, 0])).item() == pytest.approx((ap[0].item() + 1) / 2)


def test_average_precision_takes_ties_as_one_threshold_whatever_the_order():
    from torchmetrics.functional.classification import multilabel_average_precision

    scores = torch.tensor([[0.9], [0.5], [0.5], [0.1]])
    labels = torch.tensor([[1], [0], [1], [0]])
    # positives at 0.9 (1 of 1) and in the tie at 0.5 (2 of 3): the tie is one threshold
    assert average_precision(scores, labels).item() == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(scores[[2, 1, 0, 3]], labels[[2, 1, 0, 3]]).item() == pytest.approx((1 + 2 / 3) / 2)
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(200, 30, generator=g) * 8).round()  # many ties
    labels = (torch.rand(200, 30, generator=g) < 0.2).long()
    ours = average_precision(scores, labels)
    ref = multilabel_average_precision(scores / 8, labels, num_labels=30, average="none", thresholds=None)
    torch.testing.assert_close(ours, ref.float(), atol=1e-6, rtol=0)  # an independent implementation
    perm = torch.randperm(200, generator=g)
    torch.testing.assert_close(average_precision(scores[perm], labels[perm]), ours, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="1 of 4 scores are NaN"):
        average_precision(torch.tensor([[0.1, float("nan")], [0.2, 0.3]]), torch.tensor([[1, 0], [0, 1]]))


def test_label_set_iou_and_table1_metrics():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    true = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert label_set_iou(pred, true).item() == pytest.approx((1 / 3 + 1 + 1) / 3)
    m = table1_metrics(torch.eye(3), torch.tensor([0, 1, 2]))
    assert m == {"mc_acc": 100.0, "map": 100.0, "iou_acc": 100.0}


# ------------------------------------------------------------------ SUN397 layout and splits


def make_sun(root: Path, per_class: dict[str, int], hierarchy: str | None = None) -> Path:
    """A SUN397-style tree with tiny JPEGs and a hierarchy sheet that has a title row."""
    sun = root / "SUN397"
    for k, (name, n) in enumerate(per_class.items()):
        folder = sun / name.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (20 * k, 5 * i % 255, 90)).save(folder / f"sun_{k:02d}{i:04d}.jpg")
    (sun / "ClassName.txt").write_text("".join(f"{n}\n" for n in per_class))
    if hierarchy is None:
        hierarchy = (
            "Three levels of the SUN hierarchy,,,,\n"
            "category,indoor,outdoor,home,nature\n"
            "'/a/attic',1,0,1,\n"
            "'/b/beach',0,1,0,1\n"
            "'/b/bakery/shop',1,1,1,1\n"
            "'/z/zoo',0,1,0,1\n"  # not in ClassName.txt: ignored
        )
    (sun / "hierarchy.csv").write_text(hierarchy)
    return root


CLASSES = {"/a/attic": 12, "/b/beach": 12, "/b/bakery/shop": 12}


def test_hierarchy_csv_columns_and_multi_membership(tmp_path):
    root = make_sun(tmp_path, CLASSES)
    h = read_hierarchy(root / "SUN397" / "hierarchy.csv", list(CLASSES), num_coarse=2)
    assert h["coarse_names"] == ["indoor", "outdoor"] and h["general_names"] == ["home", "nature"]
    assert h["fine_to_coarse"].tolist() == [[1, 0], [0, 1], [1, 1]]
    assert h["fine_to_general"].tolist() == [[1, 0], [0, 1], [1, 1]]
    bad = make_sun(tmp_path / "bad", CLASSES, "category,a,b,c\n'/a/attic',1,0,1\n")
    with pytest.raises(ValueError, match="no hierarchy row.*beach"):
        read_hierarchy(bad / "SUN397" / "hierarchy.csv", list(CLASSES), num_coarse=2)


def test_split_is_per_category_disjoint_and_seeded_by_run(tmp_path):
    root = make_sun(tmp_path, CLASSES)
    kw = dict(root=str(root), image_size=16, num_workers=0, train_per_class=6, val_per_class=2, test_per_class=3, num_coarse=2)
    dm = SUN397DataModule(**kw)
    assert (dm.num_classes, dm.num_general, dm.num_coarse) == (3, 2, 2)
    dm.setup("fit")
    sets = {s: set(dm.datasets[s].paths) for s in ("train", "val", "test")}
    assert [len(sets[s]) for s in ("train", "val", "test")] == [18, 6, 9]
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert torch.bincount(dm.train_targets).tolist() == [6, 6, 6]
    item = dm.datasets["test"][0]
    assert item["coarse"].tolist() == dm.hierarchy["fine_to_coarse"][item["target"]].tolist()
    assert item["general"].shape == (2,) and item["valid"]
    again = SUN397DataModule(**kw)
    again.setup("fit")
    other = SUN397DataModule(**{**kw, "run": 1})
    other.setup("fit")
    assert list(again.datasets["train"].paths) == list(dm.datasets["train"].paths)
    assert set(other.datasets["train"].paths) != sets["train"]


def test_missing_files_and_small_categories_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SUN397DataModule(root=str(tmp_path / "nowhere")).num_classes
    root = make_sun(tmp_path, CLASSES)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        SUN397DataModule(root=str(root), hierarchy_file=str(tmp_path / "missing.csv"), num_coarse=2).num_classes
    few = SUN397DataModule(root=str(root), num_coarse=2)  # 50/10/40 asked, 12 present
    with pytest.raises(ValueError, match="attic has 12 images"):
        few.setup("fit")
    scaled = SUN397DataModule(root=str(root), num_coarse=2, scale_split=True, num_workers=0)
    scaled.setup("fit")
    assert [len(scaled.datasets[s]) for s in ("train", "val", "test")] == [18, 3, 15]


# ------------------------------------------------------------------ the Table 1 rows through the CLI

TINY = dict(num_images=200, size=64, seed=0)


@pytest.fixture(scope="module")
def tiny_sun_scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sun_scenes")
    ScenesSUNDataModule(root=str(root), **TINY).num_classes  # builds the data
    return root


def cli_flags(root: Path, runs: Path, name: str) -> list[str]:
    """Seconds-long runs: MobileNet-V3-small instead of the paper's AlexNet (any torchvision model works;
    AlexNet's conv2-conv5 pivots are checked in test_sinn.py), one batch per stage."""
    return [
        "--model", "hierarchical", "--data.root", str(root),
        "--data.num_images", str(TINY["num_images"]), "--data.size", str(TINY["size"]),
        "--data.image_size", "64", "--data.batch_size", "16", "--data.num_workers", "0",
        "--model.backbone", "mobilenet_v3_small", "--model.feedback_layers", '["trunk.features.3", "trunk.features.6"]',
        "--run.root", str(runs), "--run.name", name, "--run.wandb", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.limit_train_batches", "0.2", "--trainer.limit_val_batches", "0.5", "--trainer.limit_test_batches", "0.2",
    ]


def test_scenes_datamodule_builds_an_empty_root_and_links_sizes(tiny_sun_scenes):
    dm = ScenesSUNDataModule(root=str(tiny_sun_scenes), **TINY)
    assert (dm.num_classes, dm.num_general, dm.num_coarse) == (23, 8, 3)
    assert (tiny_sun_scenes / "SUN397" / "hierarchy.csv").is_file()
    # a scene in two general categories (dining_room: home and shopping_dining)
    assert int(dm.hierarchy["fine_to_general"].sum(1).max()) == 2


@pytest.mark.slow
def test_baseline_trains_and_lf_rf_rows_choose_on_val_and_apply_on_test(tiny_sun_scenes, tmp_path):
    """The one LF/RF path of Table 1: evaluate.py's select protocol with the coarse labels known;
    LF over two pivots is applied on test as iteration t of the same schedule."""
    import evaluate
    import train

    cb = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"save_top_k": 1, "save_weights_only": True, "monitor": "val/mc_acc", "mode": "max"}}])
    base = train.main(cli_flags(tiny_sun_scenes, tmp_path, "baseline") + ["--trainer.max_epochs", "1", f"--trainer.callbacks={cb}"])
    ckpt = base.trainer.checkpoint_callback.best_model_path
    assert Path(ckpt).is_file() and "test/iou_acc" in base.trainer.callback_metrics
    common = cli_flags(tiny_sun_scenes, tmp_path, "fp") + ["--ckpt_path", ckpt, "--feedback.steps", "2",
                                                           "--feedback.weight_decay", "0"]
    sel = evaluate.main(common + ["--feedback.protocol", "select", "--feedback.method", "both",
                                  "--feedback.lr_grid", "[0.01,0.3]"])
    chosen = {c["method"]: c for c in sel.feedback["selection"]}
    val = sel.feedback["val_callback"].records
    for method, c in chosen.items():
        rows = [r for r in val if r["method"] == method and r["iteration"] >= 1]
        best = max(rows, key=lambda r: (r["mc_acc"], r["map"], -r["iteration"], -r["lr"]))
        assert (c["lr"], c["iteration"]) == (best["lr"], best["iteration"])
        assert all(0.0 <= c[f"test_{k}"] <= 100.0 for k in ("mc_acc", "map", "iou_acc"))
    lf = chosen["lf"]
    full = evaluate.main(common + ["--feedback.layers", json.dumps(MOBILENET_PIVOTS), "--feedback.method", "lf",
                                   "--feedback.lr", str(lf["lr"]), "--feedback.iterations", "all"])
    at_t = next(r for r in full.feedback["callback"].records if r["iteration"] == lf["iteration"])
    assert {k: lf[f"test_{k}"] for k in ("mc_acc", "map", "iou_acc")} == pytest.approx(
        {k: at_t[k] for k in ("mc_acc", "map", "iou_acc")}, abs=1e-6)
    t0 = next(r for r in full.feedback["callback"].records if r["iteration"] == 0)
    assert t0["mc_acc"] == pytest.approx(float(base.trainer.callback_metrics["test/mc_acc"]), abs=1e-4)


@pytest.mark.slow
def test_partial_label_models_train_and_test_through_the_cli(tiny_sun_scenes, tmp_path):
    import train

    for variant in ("baseline_pl", "sinn_pl"):
        cli = train.main(cli_flags(tiny_sun_scenes, tmp_path, variant) + ["--model.variant", variant, "--trainer.fast_dev_run", "true"])
        assert "test/iou_acc" in cli.trainer.callback_metrics
        if variant == "sinn_pl":
            # the relation graphs were installed from the training split: memberships are positive relations
            assert cli.model.net.up["fine_to_general"].mask_pos.sum() > 0


@pytest.mark.slow
def test_partial_labels_reach_the_lightning_classifiers(tiny_sun_scenes):
    from lightning_modules.hierarchical import HierarchicalModule

    dm = ScenesSUNDataModule(root=str(tiny_sun_scenes), **TINY)
    image = torch.randn(2, 3, 64, 64)
    a, b = torch.tensor([[1.0, 0, 0]] * 2), torch.tensor([[0, 0, 1.0]] * 2)
    for variant in ("baseline_pl", "sinn_pl"):
        torch.manual_seed(0)
        m = HierarchicalModule(variant=variant, backbone="mobilenet_v3_small", num_classes=dm.num_classes,
                               num_general=dm.num_general, num_coarse=dm.num_coarse)
        m.set_hierarchy(dm.hierarchy["fine_to_general"], dm.hierarchy["fine_to_coarse"], torch.arange(dm.num_classes).repeat(3))
        m.eval()
        with torch.no_grad():
            fa, fb = m.fine_logits(m(image, a)), m.fine_logits(m(image, b))
        assert not torch.allclose(fa, fb), variant


# ------------------------------------------------------------------ scripts/table1.py: (λ, T) chosen on val


def load_table1():
    import importlib.util

    spec = importlib.util.spec_from_file_location("table1_script", Path(__file__).resolve().parent.parent / "scripts" / "table1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MOBILENET_PIVOTS = ["trunk.features.3", "trunk.features.6"]


@pytest.mark.slow
def test_table1_script_runs_all_rows_and_records_the_choice(tiny_sun_scenes, tmp_path):
    import csv

    table1 = load_table1()
    out = tmp_path / "table1"
    table = table1.main([
        "--root", str(tiny_sun_scenes), "--num-images", str(TINY["num_images"]), "--size", str(TINY["size"]),
        "--runs", "1", "--epochs", "1", "--pl-epochs", "1", "--fp-lr-grid", "1e-3", "1e-2", "--fp-steps", "1",
        "--backbone", "mobilenet_v3_small", "--batch-size", "16", "--out", str(out), "--",
        "--model.feedback_layers", json.dumps(MOBILENET_PIVOTS), "--trainer.limit_train_batches", "0.2",
        "--trainer.limit_val_batches", "0.5", "--trainer.limit_test_batches", "0.2",
    ])
    assert [r[0] for r in table] == ["Baseline", "Bsln + PL", "SINN + PL", "Ours (LF)", "Ours (RF)"]
    rows = {r["row"]: r for r in csv.DictReader(open(out / "table1_runs.csv"))}
    for label, most in (("Ours (LF)", 2), ("Ours (RF)", 1)):
        assert float(rows[label]["fp_lr"]) in (1e-3, 1e-2) and 1 <= int(rows[label]["fp_T"]) <= most
    assert rows["Baseline"]["fp_lr"] == ""
    assert len(list(csv.DictReader(open(out / "fp_val_grid.csv")))) == 2 * 2 + 2 * 1
    assert not list(out.glob("*/version_*/checkpoints/*.ckpt"))  # deleted once the run is evaluated
    assert list((out / "wandb").glob("offline-run-*"))  # the tables went to W&B (offline)
