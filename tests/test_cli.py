"""The train/evaluate entry points: presets, overrides, errors, run folders, W&B, checkpoints, bad images."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

import evaluate
import train
from conftest import TINY_SCENES, tiny_multilabel_args
from datamodules.coco import ScenesMultiLabelDataModule


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    assert values, f"{key} was never logged"
    return values[-1]


def test_fast_dev_run_multilabel(tiny_scenes, tmp_path):
    cli = train.main(tiny_multilabel_args(tiny_scenes, tmp_path) + ["--trainer.fast_dev_run", "true", "--run.wandb", "false"])
    assert cli.trainer.state.finished
    assert cli.model.net.topdown_head == "fc"
    assert cli.model.hparams.num_labels == cli.datamodule.num_labels == 20  # linked from the data


def test_print_config_shows_overrides(tiny_scenes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(tiny_multilabel_args(tiny_scenes, tmp_path) + ["--model.backbone", "resnet50", "--print_config"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "backbone: resnet50" in out and "class_path: lightning_modules.multilabel.MultiLabelModule" in out


def test_unknown_model_lists_available(capsys):
    with pytest.raises(SystemExit, match="unknown model 'nope'.*multilabel"):
        train.main(["--model", "nope"])


def test_unknown_config_key_is_named(tiny_scenes, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(tiny_multilabel_args(tiny_scenes, tmp_path) + ["--model.no_such_option", "3"])
    assert "no_such_option" in capsys.readouterr().err


def test_evaluate_refuses_without_checkpoint():
    with pytest.raises(SystemExit, match="--ckpt_path"):
        evaluate.main(["--model", "multilabel"])


def test_missing_coco_root_is_named_before_training(tmp_path):
    missing = tmp_path / "no_coco_here"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train.main(["--model", "multilabel", "--data", "datamodules.coco.COCOMultiLabelDataModule",
                    "--data.root", str(missing), "--run.root", str(tmp_path / "runs"), "--run.wandb", "false"])
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


@pytest.mark.slow
def test_training_run_writes_checkpoints_logs_and_wandb(trained_run):
    run_dir = trained_run.run_dir
    assert run_dir == Path(trained_run.config.run.root) / "multilabel" / "version_0"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and len(ckpts) == 2, ckpts  # the best and the last (every epoch: --run.checkpoints all)
    rows = read_metrics(run_dir)
    assert 0.0 <= last_value(rows, "test/map") <= 1.0
    assert last_value(rows, "test/skipped") == 0
    assert (run_dir / "config.yaml").is_file()
    wandb_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_files, "W&B offline run missing under the run folder"
    run_id = (run_dir / "wandb_id").read_text().strip()
    assert run_id in wandb_files[0].name
    assert b"0.000321" in wandb_files[0].read_bytes(), "resolved config (model.lr override) not in wandb.config"


@pytest.mark.slow
def test_evaluate_reproduces_test_map_from_checkpoint(trained_run, tmp_path):
    best = trained_run.trainer.checkpoint_callback.best_model_path
    cli = evaluate.main(["--model", "multilabel", "--ckpt_path", best, "--run.root", str(tmp_path),
                         "--run.wandb", "false", "--trainer.enable_progress_bar", "false"])
    expected = last_value(read_metrics(trained_run.run_dir), "test/map")
    got = last_value(read_metrics(cli.run_dir), "test/map")
    assert got == pytest.approx(expected, abs=1e-6)
    # The trained run's settings came from its config.yaml, not from the preset defaults.
    assert cli.model.hparams.lr == pytest.approx(0.000321)


@pytest.mark.slow
def test_a_checkpoint_alone_is_enough_to_evaluate(trained_run, tmp_path):
    """No run folder beside it and no pretrained weights file on this machine: the checkpoint
    holds the config it was trained with and every weight."""
    import torch

    best = trained_run.trainer.checkpoint_callback.best_model_path
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert ckpt["topdown_config"]["model"]["init_args"]["lr"] == pytest.approx(0.000321)
    ckpt["topdown_config"]["model"]["init_args"]["weights"] = str(tmp_path / "gone" / "imagenet_r18.pth")
    alone = tmp_path / "copied" / "model.ckpt"
    alone.parent.mkdir()
    torch.save(ckpt, alone)
    cli = evaluate.main(["--model", "multilabel", "--ckpt_path", str(alone), "--run.root", str(tmp_path / "runs"),
                         "--run.wandb", "false", "--trainer.enable_progress_bar", "false"])
    assert cli.model.hparams.weights is None and cli.model.hparams.lr == pytest.approx(0.000321)
    expected = last_value(read_metrics(trained_run.run_dir), "test/map")
    assert last_value(read_metrics(cli.run_dir), "test/map") == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_corrupt_and_missing_images_are_skipped_and_counted(tiny_scenes, trained_run, tmp_path):
    root = tmp_path / "scenes"
    shutil.copytree(tiny_scenes, root, symlinks=False)
    dm = ScenesMultiLabelDataModule(root=str(root), num_images=TINY_SCENES["num_images"], size=TINY_SCENES["size"],
                                    vocab_size=20, image_size=64, num_workers=0)
    files = [Path(p) for p in dm.dataset("test").paths[:2]]
    files[0].write_bytes(b"not a jpeg at all")
    files[1].unlink()
    best = trained_run.trainer.checkpoint_callback.best_model_path
    with pytest.warns(UserWarning, match=files[0].name):
        cli = evaluate.main(["--model", "multilabel", "--ckpt_path", best, "--data.root", str(root),
                             "--run.root", str(tmp_path / "runs"), "--run.wandb", "false",
                             "--trainer.enable_progress_bar", "false"])
    assert last_value(read_metrics(cli.run_dir), "test/skipped") == 2
    # feedback-prop counts and reports them too
    with pytest.warns(UserWarning, match="feedback-prop on test: 2 images were missing or corrupt"):
        fp = evaluate.main(["--model", "multilabel", "--ckpt_path", best, "--data.root", str(root),
                            "--run.root", str(tmp_path / "runs"), "--run.wandb", "false",
                            "--trainer.enable_progress_bar", "false", "--feedback.layers", "[conv17]",
                            "--feedback.steps", "1"])
    assert last_value(read_metrics(fp.run_dir), "fp/skipped") == 2 and fp.feedback["callback"].skipped == 2
