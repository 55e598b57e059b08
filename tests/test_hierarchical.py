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
    orphan = make_sun(tmp_path / "orphan", CLASSES, "category,a,b,c\n'/a/attic',1,0,1\n'/b/beach',0,0,1\n"
                      "'/b/bakery/shop',0,1,1\n")
    with pytest.raises(ValueError, match="1 categories belong to no coarse category.*beach"):
        read_hierarchy(orphan / "SUN397" / "hierarchy.csv", list(CLASSES), num_coarse=2)


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


def tiny_table1_args(root, out, *more: str) -> list[str]:
    return ["--root", str(root), "--num-images", str(TINY["num_images"]), "--size", str(TINY["size"]),
            "--epochs", "1", "--finetune-epochs", "1", "--fp-lr-grid", "1e-3", "1e-2", "--fp-steps", "1",
            "--fp-extend", "1", "--backbone", "mobilenet_v3_small", "--batch-size", "16", "--out", str(out), *more,
            "--", "--model.feedback_layers", json.dumps(MOBILENET_PIVOTS), "--trainer.limit_train_batches", "0.2",
            "--trainer.limit_val_batches", "0.5", "--trainer.limit_test_batches", "0.2"]


@pytest.mark.slow
def test_table1_script_runs_all_rows_and_records_the_choice(tiny_sun_scenes, tmp_path):
    """Equal budgets (a trunk, then every row's model fine-tuned from it), Bsln + cond from the
    Baseline's own test pass, the λ grid extended on val beyond the edge it picks (a two-value
    grid has no inside, so it always extends), and paired differences equal to the per-run rows."""
    import csv

    table1 = load_table1()
    out = tmp_path / "table1"
    table = table1.main(tiny_table1_args(tiny_sun_scenes, out, "--runs", "1"))
    assert [r[0] for r in table] == ["Baseline", "Bsln + PL", "SINN + PL", "Bsln + cond", "Ours (LF)", "Ours (RF)"]
    rows = {r["row"]: r for r in csv.DictReader(open(out / "table1_runs.csv"))}
    assert set(rows) == {"trunk", *(r[0] for r in table)}  # the trunk's stage is recorded, not a row
    ran = list(csv.DictReader(open(out / "fp_val_grid.csv")))
    for label, most in (("Ours (LF)", 2), ("Ours (RF)", 1)):
        grid = json.loads(rows[label]["fp_grid"])  # one λ beyond each edge that val picked (ties: both)
        assert grid == sorted(grid) and {1e-3, 1e-2} < set(grid) and set(grid) <= {1e-4, 1e-3, 1e-2, 0.1}
        assert float(rows[label]["fp_lr"]) in grid and 1 <= int(rows[label]["fp_T"]) <= most
        method = "lf" if "LF" in label else "rf"
        assert sorted({float(r["lr"]) for r in ran if r["method"] == method}) == grid  # the extension ran on val
        assert len([r for r in ran if r["method"] == method]) == most * len(grid)
    assert rows["Baseline"]["fp_lr"] == ""
    for col in ("mc_acc", "map", "iou_acc"):
        assert 0.0 <= float(rows["Bsln + cond"][col]) <= 100.0
    paired = {(r["pair"], r["metric"]): r for r in csv.DictReader(open(out / "table1_paired.csv"))}
    assert len(paired) == 4 * 3
    for (a, b) in table1.PAIRS:
        for name, col in table1.COLUMNS:
            want = float(rows[a][col]) - float(rows[b][col])
            assert float(paired[(f"{a} − {b}", name)]["run0"]) == pytest.approx(want, abs=1e-3)
    text = (out / "table1.txt").read_text()
    assert "equal budgets" in text and "paired differences" in text and "extended on val" in text
    assert not list(out.glob("*/version_*/checkpoints/*.ckpt"))  # deleted once the run is evaluated
    assert list((out / "wandb").glob("offline-run-*"))  # the tables went to W&B (offline)


@pytest.mark.slow
def test_table1_runs_side_by_side_give_the_digits_of_one_process(tiny_sun_scenes, tmp_path):
    """--jobs 2: runs 1 and 2 in two processes at once, combined; each run's rows equal the same
    run computed alone in this process, and a failing run is an error naming its log."""
    import csv

    table1 = load_table1()
    table1.main(tiny_table1_args(tiny_sun_scenes, tmp_path / "alone", "--first-run", "2", "--runs", "1",
                                 "--no-wandb"))
    both = tmp_path / "both"
    table = table1.main(tiny_table1_args(tiny_sun_scenes, both, "--first-run", "1", "--runs", "2", "--jobs", "2",
                                         "--no-wandb"))

    def rows(out, run):
        return {r["row"]: {k: r[k] for k in ("mc_acc", "map", "iou_acc", "fp_lr", "fp_T", "fp_grid")}
                for r in csv.DictReader(open(out / "table1_runs.csv")) if r["run"] == str(run)}

    assert rows(both, 2) == rows(tmp_path / "alone", 2) and set(rows(both, 1)) == set(rows(both, 2))
    assert len(table) == 6 and "2 at a time" in (both / "table1.txt").read_text()
    assert (both / "run1.log").is_file() and (both / "run2" / "table1_runs.csv").is_file()
    with pytest.raises(RuntimeError, match=r"run [12] failed .*run[12]\.log"):
        table1.main(tiny_table1_args(tmp_path / "missing", tmp_path / "bad", "--runs", "2", "--first-run", "1",
                                     "--jobs", "2", "--no-wandb", "--sun397", str(tmp_path / "missing")))


def test_diagnosis_calibration_and_information_by_hand():
    """scripts/table1_diagnose.py: ECE over confidence bins, and what the coarse label tells (the coarse
    set is a function of the fine class, so I(fine; coarse) = H(coarse), a two-coarse scene its own set)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "table1_diagnose.py"
    spec = importlib.util.spec_from_file_location("table1_diagnose", path)
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.3, 0.7]])
    # bin 0.9: accuracy 1/2 vs confidence 0.9; bin 0.7: accuracy 1 vs 0.7; each half of the images
    assert diag.expected_calibration_error(probs, torch.tensor([0, 1, 1, 1])) == pytest.approx(100 * (0.5 * 0.4 + 0.5 * 0.3))
    f2c = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1]])
    h_coarse, h_fine = diag.mutual_information(torch.tensor([0, 1, 2, 3]), f2c)
    assert (h_coarse, h_fine) == pytest.approx((1.5, 2.0))  # sets (0,) twice, (1,) and (0, 1) once each


def test_table1_combines_runs_and_pairs_them_run_by_run(tmp_path):
    """--combine: the runs of two outputs (a sweep split over processes) make one table; each paired
    difference is the mean of the per-run differences of the table's own rows."""
    import csv

    table1 = load_table1()
    values = {  # run -> row -> MC Acc (mAP and IoU Acc: MC Acc + 10, + 20)
        0: {"Baseline": 50.0, "Bsln + PL": 60.0, "SINN + PL": 55.0, "Bsln + cond": 62.0, "Ours (LF)": 61.0, "Ours (RF)": 64.0},
        3: {"Baseline": 40.0, "Bsln + PL": 45.0, "SINN + PL": 41.0, "Bsln + cond": 47.0, "Ours (LF)": 49.0, "Ours (RF)": 46.0},
    }
    for run, rows in values.items():
        d = tmp_path / f"part{run}"
        d.mkdir()
        with open(d / "table1_runs.csv", "w", newline="") as f:
            w = csv.DictWriter(f, table1.RUN_FIELDS)
            w.writeheader()
            for row, v in rows.items():
                fp = {"fp_lr": 0.01, "fp_T": 7, "fp_grid": "[0.003, 0.01, 0.03]", "val_mc_acc": 1.0, "val_map": 2.0} \
                    if row.startswith("Ours") else {}
                w.writerow({"run": run, "row": row, "mc_acc": v, "map": v + 10, "iou_acc": v + 20, "seconds": 1.0, **fp})
    out = tmp_path / "all"
    table = table1.main(["--combine", str(tmp_path / "part0"), str(tmp_path / "part3"), "--out", str(out), "--no-wandb"])
    assert [r[0] for r in table] == ["Baseline", "Bsln + PL", "SINN + PL", "Bsln + cond", "Ours (LF)", "Ours (RF)"]
    assert table[0][1] == "45.00±7.07"  # mean ± sample std of 50 and 40
    paired = {(r["pair"], r["metric"]): r for r in csv.DictReader(open(out / "table1_paired.csv"))}
    for a, b in table1.PAIRS:
        d = [values[r][a] - values[r][b] for r in (0, 3)]
        for metric in ("MC Acc", "mAP", "IoU Acc"):
            got = paired[(f"{a} − {b}", metric)]
            assert [float(got["run0"]), float(got["run3"])] == pytest.approx(d)
            assert float(got["mean"]) == pytest.approx(sum(d) / 2)
            assert float(got["std"]) == pytest.approx(abs(d[0] - d[1]) / math.sqrt(2), abs=1e-4)  # CSV: 4 decimals
    assert "Ours (LF) − Bsln + cond" in (out / "table1.txt").read_text()
    with pytest.raises(ValueError, match="run 0 is in both"):
        table1.main(["--combine", str(tmp_path / "part0"), str(tmp_path / "part0"), "--out", str(out), "--no-wandb"])
