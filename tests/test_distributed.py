"""Real processes: 2-process DDP evaluation and resuming a training run killed with SIGKILL.

DDP re-executes ``sys.argv`` for rank 1, so these tests start ``train.py`` and
``evaluate.py`` as subprocesses instead of running DDP inside pytest.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate

from conftest import REPO, tiny_multilabel_args
from lightning_modules.cli import child_env
from test_cli import last_value, read_metrics

pytestmark = pytest.mark.slow


def run_entry(script: str, args: list[str], tmp_path: Path, **kw) -> subprocess.Popen:
    env = child_env(WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    log = tmp_path / f"{script}-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = proc.log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def newest_run(runs: Path, name: str) -> Path:
    return sorted((runs / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]


def test_ddp_test_map_equals_single_process(tiny_scenes, trained_run, tmp_path):
    assert len(trained_run.datamodule.dataset("test")) % 2 == 1, "the test split must not divide by 2 ranks"
    ckpt = str(trained_run.run_dir / "checkpoints" / "last.ckpt")
    base = tiny_multilabel_args(tiny_scenes, tmp_path / "runs") + ["--ckpt_path", ckpt, "--run.wandb", "false"]
    single = evaluate.main(base + ["--run.name", "single"])
    ddp = base + ["--run.name", "ddp", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                  "--trainer.strategy", "ddp"]
    out = finish(run_entry("evaluate.py", ddp, tmp_path))
    assert "distributed_backend=gloo" in out and "All distributed processes registered" in out

    m_single = last_value(read_metrics(single.run_dir), "test/map")
    m_ddp = last_value(read_metrics(newest_run(tmp_path / "runs", "ddp")), "test/map")
    assert abs(m_single - m_ddp) <= 1e-6, (m_single, m_ddp)


def test_resume_after_sigkill_continues_run_and_wandb_id(tiny_scenes, tmp_path):
    runs = tmp_path / "runs"
    args = tiny_multilabel_args(tiny_scenes, runs) + ["--trainer.max_epochs", "2", "--run.test_after_fit", "false",
                                                      "--run.checkpoints", "all"]
    proc = run_entry("train.py", args, tmp_path)
    first_epoch = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(runs.glob("multilabel/version_*/checkpoints/epoch000*.ckpt"))
        if found and (found[0].parent / "last.ckpt").is_file():
            time.sleep(0.5)  # let last.ckpt finish writing
            first_epoch = found[0]
            break
        time.sleep(0.2)
    assert first_epoch is not None, "no epoch checkpoint appeared before the kill"
    os.killpg(proc.pid, signal.SIGKILL)  # in epoch 1: its checkpoint is not written yet
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run_dir = first_epoch.parent.parent
    assert not list(run_dir.glob("checkpoints/epoch001*.ckpt"))
    run_id = (run_dir / "wandb_id").read_text().strip()

    out = finish(run_entry("train.py", args + ["--ckpt_path", "last"], tmp_path))
    assert "Restoring states from the checkpoint path" in out
    assert newest_run(runs, "multilabel") == run_dir, "resume must reuse the killed run's folder"
    assert list(run_dir.glob("checkpoints/epoch001*.ckpt")), "training did not finish after resuming"
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(run_id) for name in wandb_runs), wandb_runs


def test_close_run_destroys_the_process_group(tmp_path):
    """A gloo group left to interpreter shutdown aborts the process now and then (exit -6 after a
    finished run); every entry point ends through close_run, which must destroy it."""
    import types

    import torch.distributed as dist

    from lightning_modules.cli import close_run

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        close_run(types.SimpleNamespace(trainer=types.SimpleNamespace(loggers=[], is_global_zero=True)))
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
