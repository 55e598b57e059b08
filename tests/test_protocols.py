"""The feedback-prop protocols (paper §4.1 Figure 4, §5 Tables 3-5) and their label splits."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from test_feedback_callback import eval_args, fp_checkpoint  # noqa: F401  (shared trained checkpoint)
from callbacks.feedback import FeedbackSetting
from topdown.evidence import (KnownDraw, complement, draw_unknown_labels, known_counts, known_label_draws,
                              load_label_split, mean_std, plan_passes, select_setting, unknown_labels)

VOCAB = [f"w{i}" for i in range(20)]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------- pure label splits

def test_unknown_file_is_saved_then_reused_whatever_the_seed(tmp_path):
    path = tmp_path / "unknown.txt"
    first, created = unknown_labels(path, VOCAB, seed=0)
    assert created and len(first) == 10 and path.is_file()
    assert path.read_text().splitlines()[0] == f"{int(first[0])}\t{VOCAB[int(first[0])]}"
    again, created = unknown_labels(path, VOCAB, seed=123)
    assert not created and torch.equal(first, again)
    assert not torch.equal(draw_unknown_labels(20, 10, seed=123), first)  # the seed would have mattered


def test_unknown_file_from_another_vocabulary_is_refused(tmp_path):
    path = tmp_path / "unknown.txt"
    unknown_labels(path, VOCAB)
    with pytest.raises(ValueError, match=f"{path}:1: label"):
        load_label_split(path, [w + "x" for w in VOCAB])


def test_known_draws_are_disjoint_from_unknown_and_differ():
    unknown = draw_unknown_labels(20, 10, seed=0)
    draws = known_label_draws(unknown, 20, known_counts(10, 5), draws=5, seed=0)
    assert known_counts(500, 10) == list(range(50, 501, 50))  # Figure 4's x axis on COCO
    for k in (2, 4, 6, 8):
        ks = [d for d in draws if d.num_known == k]
        assert len(ks) == 5 and len({tuple(d.labels.tolist()) for d in ks}) > 1
        assert all(len(d.labels) == k for d in ks)
    full = [d for d in draws if d.num_known == 10]
    assert len(full) == 1 and torch.equal(full[0].labels, complement(unknown, 20))
    for d in draws:
        assert not set(d.labels.tolist()) & set(unknown.tolist())
    # a count's draws do not depend on which other counts are asked for
    alone = known_label_draws(unknown, 20, [4], draws=5, seed=0)
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(alone, [d for d in draws if d.num_known == 4]))


def test_select_setting_takes_the_best_value_then_fewer_iterations_then_the_first_setting():
    curves = {1e-3: [0.30, 0.31, 0.33, 0.33], 1e-2: {0: 0.30, 1: 0.33, 2: float("nan"), 3: 0.32}}
    pick = select_setting(curves)
    assert (pick.key, pick.iteration, pick.value) == (1e-2, 1, 0.33)  # 0.33 at t=1 beats 0.33 at t=2
    assert select_setting({"a": [0.5, 0.4], "b": [0.9, 0.3]}).key == "a"  # t = 0 is not feedback-prop
    assert select_setting({"a": [0.5, 0.4]}, min_iteration=0).iteration == 0
    # tuples: the first figure decides, the second breaks its ties (Table 1: MC Acc, then mAP)
    assert select_setting({"x": [(50.0, 60.0), (52.0, 61.0)], "y": [(50.0, 60.0), (52.0, 63.0)]}).key == "y"
    with pytest.raises(ValueError, match="no validation value"):
        select_setting({"a": [0.5, float("nan")]})


def test_a_chosen_iteration_is_applied_as_the_same_computation():
    rf, lf1 = FeedbackSetting("rf", ("conv13",), 0.1, 10), FeedbackSetting("lf", ("conv13",), 0.1, 10)
    lf2 = FeedbackSetting("lf", ("conv9", "conv13"), 0.1, 10)
    assert (rf.at(4).steps, rf.at(4).stop, lf1.at(4).steps) == (4, None, 4)
    # LF over two pivots: iteration 12 is 10 updates of conv9 and 2 of conv13, not 6 + 6
    assert (lf2.at(12).steps, lf2.at(12).stop, lf2.at(12).last) == (10, 12, 12)
    assert lf2.at(20).stop is None and lf2.end == 20
    assert lf2.at(12).kept("last") == [12] and lf2.kept("all") == list(range(1, 21))


def test_mean_std_is_the_sample_std_and_counts_nan():
    m = mean_std([1.0, 2.0, float("nan"), 4.0])
    assert m.mean == pytest.approx(7 / 3) and m.std == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert (m.count, m.nan) == (3, 1) and mean_std([5.0]).std == 0.0
    mean, std = m  # unpacks as the pair it always was
    assert (mean, std) == (m.mean, m.std)


def test_passes_keep_the_metric_state_under_the_budget():
    draws = [KnownDraw(k, d, torch.arange(k)) for k in (50, 100, 500) for d in range(5 if k < 500 else 1)]
    size = lambda s, d: 1000 * (500 + draws[d].num_known)  # noqa: E731
    assert plan_passes(6, draws, size, 10_000, None) == [(list(range(6)), list(range(11)))]
    budget = 10_000 + 6 * 5 * 1000 * 600  # all settings fit with the five draws of 100, not more
    passes = plan_passes(6, draws, size, 10_000, budget)
    units = sorted((s, d) for ss, ds in passes for s in ss for d in ds)
    assert units == sorted((s, d) for s in range(6) for d in range(11))  # every unit exactly once
    for ss, ds in passes:
        assert 10_000 + sum(size(s, d) for s in ss for d in ds) <= budget
        assert len({draws[d].num_known for d in ds}) == 1  # one amount of known labels at a time
    with pytest.raises(ValueError, match="one setting x draw needs"):
        plan_passes(1, draws, size, 10_000, 10_000 + 500_000)


# --------------------------------------------------------------------- protocols via evaluate.py

@pytest.mark.slow
def test_sweep_reports_mean_and_std_over_five_draws(tiny_scenes, fp_checkpoint, tmp_path, capsys):
    cli = evaluate.main(eval_args(tiny_scenes, tmp_path, fp_checkpoint) + [
        "--feedback.protocol", "sweep", "--feedback.layers", "[conv17]", "--feedback.steps", "1",
        "--feedback.lr", "0.01", "--feedback.num_known", "[3,10]", "--feedback.draws", "5"])
    cb = cli.feedback["callback"]
    three = [r for r in cb.records if r["num_known"] == 3 and r["iteration"] == 1]
    assert len(three) == 5 and len({r["map_known"] for r in three}) > 1  # five different draws
    row = next(r for r in cb.summary if r["num_known"] == 3)
    values = [r["map_unknown"] for r in three]
    assert row["draws"] == 5
    assert row["map_unknown"] == pytest.approx(np.mean(values))
    assert row["map_unknown_std"] == pytest.approx(np.std(values, ddof=1))  # sample std, as every table
    assert next(r for r in cb.summary if r["num_known"] == 10)["draws"] == 1
    out = capsys.readouterr().out
    assert "known" in out and "RF-conv17" in out
    run = cli.run_dir
    assert (run / "fp_sweep_test_known.png").read_bytes()[:4] == b"\x89PNG"
    assert len(read_csv(run / "fp_sweep_test_summary.csv")) == 2


@pytest.mark.slow
def test_layers_chooses_each_cell_on_val_reports_test_and_writes_csv_png_wandb(tiny_scenes, fp_checkpoint, tmp_path,
                                                                              capsys):
    args = eval_args(tiny_scenes, tmp_path, fp_checkpoint)
    args = args[:-2] + ["--run.wandb", "true"]  # W&B offline: tables and images go there too
    cli = evaluate.main(args + ["--feedback.protocol", "layers", "--feedback.candidates", "[conv13,conv17]",
                                "--feedback.steps", "2", "--feedback.lr_grid", "[0.01,0.1]",
                                "--feedback.unknown_file", str(tmp_path / "u.txt")])
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer-wise analysis"))
    header, body = lines[start + 1].split(), [line.split()[0] for line in lines[start + 3:start + 6]]
    assert header == ["LF", "RF"] and body == ["no-fp", "fp-conv-13", "fp-conv-17"]
    run = cli.run_dir
    val = read_csv(run / "fp_layers_val_iterations.csv")
    test = read_csv(run / "fp_layers_test_summary.csv")
    assert {r["split"] for r in val} == {"val"} and {r["split"] for r in test} == {"test"}
    assert {(r["method"], r["layers"]) for r in test} == {(m, c) for m in ("lf", "rf") for c in ("conv13", "conv17")}
    for c in cli.feedback["selection"]:
        # each cell's (lr, t): the best val curve point (t >= 1; ties: fewer iterations, then the first lr)
        cell = [r for r in val if (r["method"], r["layers"]) == (c["method"], c["layers"]) and int(r["iteration"]) >= 1]
        best = max(cell, key=lambda r: (float(r["map_unknown"]), -int(r["iteration"]), -float(r["lr"])))
        assert (c["lr"], c["iteration"]) == (float(best["lr"]), int(best["iteration"]))
        # ... and the test pass ran that setting only
        row = next(r for r in test if (r["method"], r["layers"]) == (c["method"], c["layers"]))
        assert (float(row["lr"]), int(row["iteration"])) == (c["lr"], c["iteration"])
    assert cli.feedback["best"]["layer"] in ("conv13", "conv17")
    for png in ("fp_layers_test.png", "fp_layers_val_iterations.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    media = list((run / "wandb").glob("offline-run-*/files/media/table/**/*.json"))
    assert any("layers_test_summary" in p.name for p in media), media
    assert list((run / "wandb").glob("offline-run-*/files/media/images/**/*.png"))
    # the split was saved and the run folder keeps a copy
    assert (tmp_path / "u.txt").read_text() == (run / "unknown_labels.txt").read_text()
    with pytest.raises(ValueError, match="chooses λ and T on val"):
        evaluate.main(eval_args(tiny_scenes, tmp_path, fp_checkpoint) + [
            "--feedback.protocol", "layers", "--feedback.split", "val"])


@pytest.mark.slow
def test_select_picks_lr_and_T_on_val_and_applies_them_on_test(tiny_scenes, fp_checkpoint, tmp_path):
    cli = evaluate.main(eval_args(tiny_scenes, tmp_path, fp_checkpoint) + [
        "--feedback.protocol", "select", "--feedback.layers", "[conv17]", "--feedback.method", "rf",
        "--feedback.lr_grid", "[0.003,0.3]", "--feedback.steps", "3"])
    run = cli.run_dir
    chosen = json.loads((run / "fp_selection.json").read_text())
    assert len(chosen) == 1
    c = chosen[0]
    # the choice is the best (lr, t >= 1) of the validation curves
    val = [r for r in read_csv(run / "fp_select_val_iterations.csv") if int(r["iteration"]) >= 1]
    best = max(val, key=lambda r: (float(r["map_unknown"]), -int(r["iteration"]), -float(r["lr"])))
    assert (c["lr"], c["steps"]) == (float(best["lr"]), int(best["iteration"]))
    assert c["val_map_unknown"] == pytest.approx(float(best["map_unknown"]))
    # the test pass ran exactly that setting
    test = read_csv(run / "fp_select_test_summary.csv")
    assert len(test) == 1 and float(test[0]["lr"]) == c["lr"] and int(test[0]["steps"]) == c["steps"]
    assert {r["split"] for r in test} == {"test"}
    assert c["test_map_unknown"] == pytest.approx(float(test[0]["map_unknown"]))


@pytest.mark.slow
def test_select_applies_lf_with_two_pivots_as_the_same_computation(tiny_scenes, fp_checkpoint, tmp_path):
    """LF over two pivots is chosen at an iteration t of its schedule (T per pivot) and applied on test
    as that same computation: the schedule stopped at t, whatever t is."""
    common = eval_args(tiny_scenes, tmp_path, fp_checkpoint) + [
        "--feedback.layers", "[conv13,conv17]", "--feedback.method", "lf", "--feedback.steps", "2",
        "--feedback.unknown_file", str(tmp_path / "u.txt")]
    sel = evaluate.main(common + ["--feedback.protocol", "select", "--feedback.lr_grid", "[0.03,0.3]"])
    c = sel.feedback["selection"][0]
    assert 1 <= c["iteration"] <= 4 and c["steps"] == 2 and c["stop"] in (None, c["iteration"])
    # the whole schedule on test, every iteration kept: its iteration t is what select reported
    full = evaluate.main(common + ["--feedback.lr", str(c["lr"]), "--feedback.iterations", "all"])
    at_t = next(r for r in full.feedback["callback"].records if r["iteration"] == c["iteration"])
    assert c["test_map_unknown"] == pytest.approx(at_t["map_unknown"], abs=1e-6)
    assert c["test_map_known"] == pytest.approx(at_t["map_known"], abs=1e-6)


@pytest.mark.slow
def test_bad_pivot_layer_is_named(tiny_scenes, fp_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="conv99"):
        evaluate.main(eval_args(tiny_scenes, tmp_path, fp_checkpoint) + ["--feedback.layers", "[conv99]"])
