"""FeedbackPropCallback (feedback-prop §4.1): per-iteration mAP on unknown/known labels through the real CLI."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

import evaluate
import train
from callbacks.feedback import FeedbackPropCallback, FeedbackSetting
from conftest import tiny_multilabel_args
from lightning_modules.metrics import LabelMAP
from topdown.evidence import known_label_draws

_TRAINED: dict = {}


@pytest.fixture(scope="module")
def fp_checkpoint(tiny_scenes, tmp_path_factory) -> str:
    """One 1-epoch multi-label run on the tiny scenes data; trained once per test session."""
    if "ckpt" not in _TRAINED:
        runs = tmp_path_factory.mktemp("fp-train")
        cli = train.main(tiny_multilabel_args(tiny_scenes, runs) + [
            "--trainer.max_epochs", "1", "--run.wandb", "false", "--run.test_after_fit", "false"])
        _TRAINED["ckpt"] = cli.trainer.checkpoint_callback.best_model_path
    return _TRAINED["ckpt"]


def eval_args(root: Path, runs: Path, ckpt: str) -> list[str]:
    return tiny_multilabel_args(root, runs) + ["--ckpt_path", ckpt, "--run.wandb", "false"]


@pytest.fixture(scope="module")
def single_run(tiny_scenes, fp_checkpoint, tmp_path_factory):
    """RF at conv17, T=3, all complement labels known, through ``evaluate.py``."""
    runs = tmp_path_factory.mktemp("fp-single")
    return evaluate.main(eval_args(tiny_scenes, runs, fp_checkpoint) + [
        "--feedback.method", "rf", "--feedback.layers", "[conv17]", "--feedback.steps", "3",
        "--feedback.lr", "0.01", "--feedback.iterations", "all", "--feedback.unknown_file", str(runs / "unknown.txt")])


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_iteration_zero_is_the_plain_test_map_on_unknown_labels(single_run):
    cb = single_run.feedback["callback"]
    unknown = single_run.feedback["unknown"]
    dm, model = single_run.datamodule, single_run.model
    plain = LabelMAP(dm.num_labels, labels=unknown)
    model.eval()
    with torch.no_grad():
        for batch in dm.test_dataloader():
            plain.update(torch.sigmoid(model(batch["image"])), batch["labels"].long())
    t0 = [r for r in cb.records if r["iteration"] == 0]
    assert t0 and all(r["map_unknown"] == pytest.approx(float(plain.compute()), abs=1e-5) for r in t0)
    logged = [r for r in read_csv(single_run.run_dir / "metrics.csv") if r.get("fp/map_unknown_nofp")]
    assert float(logged[-1]["fp/map_unknown_nofp"]) == pytest.approx(float(plain.compute()), abs=1e-5)


@pytest.mark.slow
def test_feedback_raises_known_label_map_and_records_T_plus_one_iterations(single_run):
    cb = single_run.feedback["callback"]
    assert [r["iteration"] for r in cb.records] == [0, 1, 2, 3]
    rows = read_csv(single_run.run_dir / "fp_single_test_iterations.csv")
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3]
    # the known labels are what feedback-prop fits (eq. 3): their mAP must go up
    assert cb.records[-1]["map_known"] > cb.records[0]["map_known"] + 0.01
    s = cb.summary[0]
    assert s["map_known"] == pytest.approx(cb.records[-1]["map_known"])
    assert (single_run.run_dir / "fp_single_table.txt").read_text().splitlines()[3].startswith("no-fp")
    assert (single_run.run_dir / "fp_single_test_iterations.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_callback_runs_under_default_inference_mode(single_run, tmp_path):
    """A Trainer with inference_mode=True (Lightning's default) must not break the callback."""
    dm, model = single_run.datamodule, single_run.model
    unknown = single_run.feedback["unknown"]
    draws = known_label_draws(unknown, dm.num_labels, 3, draws=2, seed=1)
    cb = FeedbackPropCallback([FeedbackSetting("lf", ("conv17",), 0.01, 2)], unknown, draws, out_dir=tmp_path)
    seen = []

    class Probe(Callback):
        def on_test_batch_end(self, *args, **kwargs):
            seen.append(torch.is_inference_mode_enabled())

    trainer = Trainer(inference_mode=True, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[cb, Probe()], default_root_dir=tmp_path)
    trainer.test(model, datamodule=dm)
    assert seen and all(seen), "the test loop was expected to run under inference mode"
    assert single_run.trainer.test_loop.inference_mode is False  # evaluate.py turns it off for feedback-prop
    # by default only the reported iteration is kept, besides t = 0
    assert [r["iteration"] for r in cb.records] == [0, 2, 0, 2] and cb.summary[0]["draws"] == 2
    assert (tmp_path / "fp_test_summary.csv").is_file()
    # same iteration-0 scores whatever the trainer's inference mode
    ref = single_run.feedback["callback"].records[0]["map_unknown"]
    assert cb.records[0]["map_unknown"] == pytest.approx(ref, abs=1e-5)
    # a metric state over the budget is refused before the first batch
    small = FeedbackPropCallback([FeedbackSetting("lf", ("conv17",), 0.01, 2)], unknown, draws, max_state_gb=1e-4)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[small],
                      default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"needs 0.0\d GB of metric state, over max_state_gb=0.0001"):
        trainer.test(model, datamodule=dm)


@pytest.mark.slow
def test_invalid_rows_are_skipped_counted_and_state_stays_on_the_host(single_run):
    dm, model = single_run.datamodule, single_run.model
    unknown = single_run.feedback["unknown"]
    draws = known_label_draws(unknown, dm.num_labels, 3, draws=3, seed=1)
    # max_samples 4 < 3 valid rows x 3 draws: the draws run in several calls, the figures do not change
    cbs = [FeedbackPropCallback(FeedbackSetting("rf", ("conv17",), 0.01, 2), unknown, draws, max_samples=m)
           for m in (4, 64)]
    batch = next(iter(dm.test_dataloader()))
    batch["valid"] = torch.zeros_like(batch["valid"])
    batch["valid"][:3] = True
    results = []
    for cb in cbs:
        cb.evidence.setup(model)
        cb._reset()
        cb.evaluate_batch(model, batch)
        # only the reported iteration (t = 2) is kept per draw, besides t = 0 once, all in host memory
        assert sorted(cb._kept) == [(0, d, 2) for d in range(3)]
        assert all(t.device.type == "cpu" and t.shape == (3, len(unknown) + 3) for v in cb._kept.values() for t in v)
        assert cb._plain[0].shape == (3, dm.num_labels)
        results.append(cb.compute(None, model))
    (records, skipped), (ref, _) = results
    assert skipped == len(batch["valid"]) - 3
    for a, b in zip(records, ref):
        assert a["map_unknown"] == pytest.approx(b["map_unknown"], abs=1e-6)


@pytest.mark.slow
def test_ddp_gives_the_single_process_figures(tiny_scenes, fp_checkpoint, tmp_path):
    """2 ranks on an odd test split (no padding): every per-iteration mAP as in one process."""
    from test_distributed import finish, newest_run, run_entry

    args = eval_args(tiny_scenes, tmp_path / "runs", fp_checkpoint) + [
        "--data.val_size", "23", "--feedback.layers", "[conv17]", "--feedback.steps", "2", "--feedback.lr", "0.01",
        "--feedback.num_known", "4", "--feedback.draws", "2", "--feedback.unknown_file", str(tmp_path / "u.txt")]
    single = evaluate.main(args + ["--run.name", "single"])
    assert len(single.datamodule.dataset("test")) % 2 == 1
    finish(run_entry("evaluate.py", args + ["--run.name", "ddp", "--trainer.accelerator", "cpu",
                                            "--trainer.devices", "2", "--trainer.strategy", "ddp"], tmp_path))
    ddp = read_csv(newest_run(tmp_path / "runs", "ddp") / "fp_single_test_iterations.csv")
    ref = read_csv(single.run_dir / "fp_single_test_iterations.csv")
    assert len(ddp) == len(ref) == 2 * 2  # 2 draws x (t = 0, t = T)
    for a, b in zip(ddp, ref):
        assert float(a["map_unknown"]) == pytest.approx(float(b["map_unknown"]), abs=1e-5)
        assert float(a["map_known"]) == pytest.approx(float(b["map_known"]), abs=1e-5)
