"""Shared fixtures: offline W&B and NLTK, a small thread budget, and one tiny `scenes` dataset per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("NLTK_DATA", str(REPO / ".nltk_data"))
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Flags that make the multi-label CLI run on a tiny embedded dataset in seconds.
TINY_SCENES = dict(num_images=120, size=64, seed=0)


@pytest.fixture(autouse=True)
def _wandb_in_tmp(tmp_path, monkeypatch):
    """Keep W&B's cache and config out of the home directory."""
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / ".wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / ".wandb-data"))


@pytest.fixture(scope="session")
def tiny_scenes(tmp_path_factory) -> Path:
    """A 120-image, 64 px `scenes` root shared by the tests that only read it."""
    from datamodules.scenes import build_scenes

    root = tmp_path_factory.mktemp("scenes")
    build_scenes(root, workers=1, **TINY_SCENES)
    return root


def tiny_multilabel_args(root: Path, runs: Path) -> list[str]:
    """CLI flags for a seconds-long multi-label run on ``root``."""
    return [
        "--model", "multilabel",
        "--data.root", str(root),
        "--data.num_images", str(TINY_SCENES["num_images"]),
        "--data.size", str(TINY_SCENES["size"]),
        "--data.image_size", "64",
        "--data.vocab_size", "20",
        "--data.batch_size", "16",
        "--data.val_size", "23",  # leaves an odd test split (25): DDP padding would show
        "--data.num_workers", "0",
        "--run.root", str(runs),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]


@pytest.fixture(scope="session")
def trained_run(tiny_scenes, tmp_path_factory):
    """One real 2-epoch multi-label training run on the tiny scenes data, shared by evaluation tests."""
    import train

    runs = tmp_path_factory.mktemp("runs")
    return train.main(tiny_multilabel_args(tiny_scenes, runs) + ["--trainer.max_epochs", "2", "--model.lr", "0.000321"])
