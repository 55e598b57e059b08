"""``train.py --model warp_alexnet`` with and without a bank, its checkpoint as an AlexNet weights file,
and the centre / 10-view accuracies under 2-process DDP on an odd-sized test split."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import evaluate
import train
from topdown.generators import ConvFeatures, FlowLayout, GeneratorBank, GeneratorModel

from test_cli import last_value, read_metrics
from test_distributed import finish, newest_run, run_entry
from test_ilsvrc import write_cls_loc

ACCURACIES = ("test/top1", "test/top5", "test/top1_10view", "test/top5_10view")


def write_bank(path: Path, size: tuple[int, int], image_size: int) -> Path:
    """A bank with conv5 generators of every kind (small random flows): only its layout matters here."""
    layout = FlowLayout(("conv5",), (size,))
    bank = GeneratorBank(layout, image_size, {"backbone": "alexnet"})
    g = torch.Generator().manual_seed(0)
    for kind in ("rotation", "scale", "translation_x", "translation_y"):
        bank.add(GeneratorModel(kind, 0.1 * torch.randn(layout.dim, 2, generator=g, dtype=torch.float64),
                                torch.randn(6, generator=g, dtype=torch.float64)))
    return bank.save(path)


def tiny_args(root: Path, runs: Path) -> list[str]:
    """AlexNet at 64 px (conv5 3x3) on a 3-class CLS-LOC tree: 12 train, 3 held out, 7 test images."""
    return ["--model", "warp_alexnet", "--data.class_path", "datamodules.ilsvrc.ILSVRCDataModule",
            "--data.root", str(root), "--data.crop_size", "64", "--data.resize", "72", "--data.batch_size", "4",
            "--data.num_workers", "0", "--data.holdout", "0.2", "--run.root", str(runs),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def cls_loc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cls_loc")
    write_cls_loc(root)
    return root


def weights_only_best() -> str:
    """One weights-only checkpoint, the best by val/top1 (AlexNet's momentum buffers would double its size)."""
    cb = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
          "init_args": {"monitor": "val/top1", "mode": "max", "save_top_k": 1, "save_weights_only": True,
                        "filename": "best"}}
    return "--trainer.callbacks=" + json.dumps([cb])


def test_alexnet_with_and_without_a_bank(cls_loc, tmp_path):
    fast = ["--trainer.fast_dev_run", "true", "--run.wandb", "false"]
    cli = train.main(tiny_args(cls_loc, tmp_path) + fast)
    assert cli.trainer.state.finished and cli.model.warp is None
    assert cli.model.hparams.num_classes == 3 and cli.model.hparams.image_size == 64  # linked from the data

    cli = train.main(tiny_args(cls_loc, tmp_path) + fast + ["--model.bank", str(write_bank(tmp_path / "b.pt", (3, 3), 64))])
    assert int(cli.model.warp.step) == 1 and cli.model.warp.names[0] == "rotation 30"  # one training batch, warped
    cli.trainer.save_checkpoint(tmp_path / "w.ckpt", weights_only=True)
    extractor = ConvFeatures(weights=str(tmp_path / "w.ckpt"))  # a Lightning checkpoint is an AlexNet weights file
    for name, value in extractor.features.state_dict().items():
        assert torch.equal(value, cli.model.net.features.state_dict()[name])

    bank = write_bank(tmp_path / "bank13.pt", (13, 13), 224)
    with pytest.raises(ValueError, match=r"conv5 maps are 13x13 \(learned at 224 px\).*conv5 is 3x3 at 64 px"):
        train.main(tiny_args(cls_loc, tmp_path) + fast + ["--model.bank", str(bank)])


@pytest.mark.slow
def test_generator_training_and_ddp_ten_view_accuracy(cls_loc, tmp_path):
    """ResNet-18 (any torchvision backbone; its conv5 is layer1, 16x16 at 64 px) keeps the checkpoints small."""
    bank = write_bank(tmp_path / "bank.pt", (16, 16), 64)
    args = tiny_args(cls_loc, tmp_path / "runs") + ["--model.backbone", "resnet18", "--run.wandb", "false"]
    cli = train.main(args + ["--model.bank", str(bank), "--trainer.max_epochs", "2", "--run.test_after_fit", "false",
                             "--model.generators", "[[rotation, 30], [scale, 0.75]]", weights_only_best()])
    assert cli.model.warp.names == ["rotation 30", "scale 0.75"]
    assert int(cli.model.warp.step) == 6  # 2 epochs x 3 training batches, each warped once
    assert last_value(read_metrics(cli.run_dir), "train/warped") == 1.0  # the paper warps every batch
    ckpt = cli.trainer.checkpoint_callback.best_model_path

    single = evaluate.main(args + ["--ckpt_path", ckpt, "--run.name", "single"])
    assert int(single.model.warp.step) == int(torch.load(ckpt, weights_only=False)["state_dict"]["warp.step"])
    rows = read_metrics(single.run_dir)  # testing warped nothing (the step counter did not move)
    expected = {k: last_value(rows, k) for k in ACCURACIES}
    assert last_value(rows, "test/skipped") == 4  # 1 corrupt file + 3 val images left out by the reader

    # The warp is training state only: the checkpoint also evaluates without the bank.
    ddp = args + ["--ckpt_path", ckpt, "--run.name", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                  "--trainer.strategy", "ddp", "--model.bank", "null"]
    out = finish(run_entry("evaluate.py", ddp, tmp_path))
    assert "All distributed processes registered" in out
    rows = read_metrics(newest_run(tmp_path / "runs", "ddp"))
    for key in ACCURACIES:  # 7 test images over 2 ranks (4 + 3): each counted once
        assert abs(last_value(rows, key) - expected[key]) <= 1e-6, (key, last_value(rows, key), expected[key])
    assert last_value(rows, "test/skipped") == 4
