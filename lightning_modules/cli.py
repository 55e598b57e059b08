"""The command line shared by ``train.py`` and ``evaluate.py``.

``--model NAME`` picks a preset from :mod:`lightning_modules.registry`; it is
replaced by ``--config configs/NAME.yaml`` at the same place in the argument
list, so every later ``--model.*``, ``--data.*`` or ``--trainer.*`` flag
overrides the preset. LightningCLI runs in subclass mode with ``run=False``:
jsonargparse validates every key (an unknown one is an error naming it) and the
resolved config is saved beside the run and sent to the loggers.

Each run writes to ``<run.root>/<run.name>/version_<N>/``: ``config.yaml``,
``checkpoints/`` (the best by the preset's monitor and ``last.ckpt``; every epoch with
``--run.checkpoints all``), ``metrics.csv`` and ``wandb/``. ``--ckpt_path last`` resumes
the newest version of the same name, and W&B continues the same run id.

A checkpoint carries the resolved config it was trained with, so ``evaluate.py`` needs no more
than the checkpoint file: not its run folder, and not the pretrained weights file the
training started from (the checkpoint holds every weight).
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger

from lightning_modules.registry import MODELS, Preset, get_preset

# Set by the launching process, as "<pid>:<folder>", so the DDP ranks it starts write to its folder.
RUN_DIR_ENV = "TOPDOWN_RUN_DIR"
CHECKPOINT_DIR = "checkpoints"
CONFIG_KEY = "topdown_config"  # the resolved config inside a checkpoint


def split_model_arg(args: list[str]) -> tuple[Preset, list[str]]:
    """Replace ``--model NAME`` by ``--config configs/NAME.yaml`` and return the preset."""
    available = ", ".join(sorted(MODELS))
    for i, a in enumerate(args):
        if a == "--model" and i + 1 < len(args):
            name, rest = args[i + 1], args[i + 2 :]
        elif a.startswith("--model="):
            name, rest = a.split("=", 1)[1], args[i + 1 :]
        else:
            continue
        try:
            preset = get_preset(name)
        except KeyError:
            raise SystemExit(f"error: unknown model {name!r}; available models: {available}") from None
        if not preset.config.is_file():
            raise SystemExit(f"error: preset for model {name!r} is missing: {preset.config}")
        return preset, args[:i] + ["--config", str(preset.config)] + rest
    raise SystemExit(f"error: --model NAME is required; available models: {available}")


def _versions(base: Path) -> list[Path]:
    found = [p for p in base.glob("version_*") if p.name.removeprefix("version_").isdigit()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("version_")))


def resolve_run_dir(root: str, name: str, resume: bool) -> Path:
    """The run folder: the newest version holding ``last.ckpt`` when resuming, else a new version."""
    launcher, _, inherited = os.environ.get(RUN_DIR_ENV, "").partition(":")
    # Only a DDP rank > 0 that the launcher started itself (Lightning sets LOCAL_RANK for it) joins the
    # launcher's folder: any other child of a process that ran a command earlier starts its own run.
    if inherited and launcher == str(os.getppid()) and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(inherited)
    base = Path(root) / name
    versions = _versions(base)
    if resume:
        with_last = [v for v in versions if (v / CHECKPOINT_DIR / "last.ckpt").is_file()]
        if not with_last:
            raise SystemExit(f"error: --ckpt_path last: no {CHECKPOINT_DIR}/last.ckpt under {base}/version_*")
        return with_last[-1]
    nxt = int(versions[-1].name.removeprefix("version_")) + 1 if versions else 0
    return base / f"version_{nxt}"


def wandb_run_id(run_dir: Path) -> str:
    """A W&B run id stored in the run folder, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id


def make_wandb_logger(run_dir: Path, name: str, project: str, mode: str) -> Logger:
    """WandbLogger that never prompts and never waits on a network unless ``mode='online'``."""
    from lightning.pytorch.loggers import WandbLogger

    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir.parent / ".wandb-cache"))
    os.environ.setdefault("WANDB_CONFIG_DIR", str(run_dir.parent / ".wandb-config"))
    os.environ.setdefault("WANDB_DATA_DIR", str(run_dir.parent / ".wandb-data"))
    return WandbLogger(
        project=project,
        name=f"{name}/{run_dir.name}",
        save_dir=str(run_dir),
        id=wandb_run_id(run_dir),
        resume="allow",
        offline=mode != "online",
        mode=mode,
    )


def finish_wandb(run) -> None:
    """Finish a W&B run so that its files are complete when this returns.

    ``Run.finish()`` returns once the run's last records are handed to the W&B service; the
    service writes them to the offline run file (``run-<id>.wandb``) and closes it afterwards, on
    its own time.  A reader right after (a test, ``wandb sync``, the next step of a script) could
    find only the file's 8-byte header, and a process that ends abruptly then loses the records.
    Tearing the service down waits for it to flush and exit; that is done when no other run of
    this process is active (the next run starts a new service).
    """
    import wandb
    from wandb.sdk import wandb_setup

    run.finish()
    if wandb_setup.singleton().most_recent_active_run is None:
        wandb.teardown()


class ConfigToLoggers(SaveConfigCallback):
    """Save ``config.yaml`` in the run folder, send the resolved config to every logger (rank 0 only)
    and store it in every (full) checkpoint."""

    def _resolved(self) -> dict:
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False))

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self._resolved()
        for logger in trainer.loggers:
            logger.log_hyperparams(config)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = {k: v for k, v in self._resolved().items() if k in ("model", "data")}


class TopdownCLI(LightningCLI):
    """LightningCLI with presets, run folders, W&B and checkpoints wired the same way for every model."""

    def __init__(self, preset: Preset, args: list[str], stage: Literal["fit", "test"], **kwargs: Any):
        self.preset, self.stage = preset, stage
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=args,
            save_config_callback=ConfigToLoggers,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="checkpoint to resume (fit) or evaluate (test); 'last' = newest run of this name")
        parser.add_argument("--run.root", type=str, default="runs", help="folder holding all runs")
        parser.add_argument("--run.name", type=Optional[str], default=None, help="run name (default: the model name)")
        parser.add_argument("--run.wandb", type=bool, default=True, help="log to Weights & Biases (false: CSV only)")
        parser.add_argument("--run.wandb_mode", type=Literal["offline", "online", "disabled"], default="offline")
        parser.add_argument("--run.wandb_project", type=str, default="topdown")
        parser.add_argument("--run.test_after_fit", type=bool, default=True,
                            help="after fitting, run the test stage on the best checkpoint")
        parser.add_argument("--run.checkpoints", type=Literal["best", "all"], default="best",
                            help="keep the best checkpoint and last.ckpt (best), or one per epoch too (all)")
        for source, target in self.preset.links:
            parser.link_arguments(source, target, apply_on="instantiate")
        self.add_stage_arguments(parser)

    def add_stage_arguments(self, parser: LightningArgumentParser) -> None:
        """Hook for entry points that add their own arguments (evaluate.py adds feedback-prop)."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        run = self.config_init.run
        name = run.name or self.preset.name
        if self.stage == "test" and not run.name:
            name = f"{self.preset.name}-eval"
        resume = self.stage == "fit" and self.config_init.get("ckpt_path") == "last"
        self.run_dir = resolve_run_dir(run.root, name, resume)
        os.environ[RUN_DIR_ENV] = f"{os.getpid()}:{self.run_dir}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        trainer_cfg = self.config_init.trainer
        loggers: list[Logger] = []
        if trainer_cfg.get("logger") is not False:
            loggers.append(CSVLogger(save_dir=str(self.run_dir), name="", version=""))
            if run.wandb and run.wandb_mode != "disabled":
                loggers.append(make_wandb_logger(self.run_dir, name, run.wandb_project, run.wandb_mode))
        kwargs.setdefault("logger", loggers or False)
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        callbacks = list(trainer_cfg.get("callbacks") or [])
        wants_checkpoints = trainer_cfg.get("enable_checkpointing") is not False and not trainer_cfg.get("fast_dev_run")
        if self.stage == "fit" and wants_checkpoints and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(self._checkpointing())
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)

    def _checkpointing(self) -> ModelCheckpoint:
        """``last.ckpt`` and the best checkpoint by the preset's monitor in the run folder; with
        ``--run.checkpoints all`` one per epoch too (each holds the optimizer state: on COCO that
        fills a disk, hence not the default)."""
        monitor = self.preset.monitor
        filename = "epoch{epoch:03d}" + (f"-{monitor.replace('/', '_')}{{{monitor}:.4f}}" if monitor else "")
        return ModelCheckpoint(
            dirpath=str(self.run_dir / CHECKPOINT_DIR),
            filename=filename,
            monitor=monitor,
            mode=self.preset.mode,
            save_top_k=-1 if self.config_init.run.checkpoints == "all" else 1,
            save_last=True,
            auto_insert_metric_name=False,
        )


def close_run(cli: LightningCLI) -> None:
    """End the W&B run of this command, so its files are complete and a later run in the same process starts clean."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in cli.trainer.loggers:
        if isinstance(logger, WandbLogger) and cli.trainer.is_global_zero:
            finish_wandb(logger.experiment)
    end_process_group()


def child_env(**overrides: str) -> dict[str, str]:
    """The environment of a command started as a subprocess: this one with the repository on
    ``PYTHONPATH``, less the W&B service that a run of this process may have started (a child
    that shared it would log into this process's run)."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("WANDB_SERVICE") or k == "WANDB__SERVICE")}
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    return {**env, **overrides}


def end_process_group() -> None:
    """Destroy the DDP process group while the interpreter is still whole.

    Lightning does this at exit for NCCL only. A gloo group left to interpreter shutdown
    aborts the process now and then ("terminate called without an active exception", exit
    -6) after all its work succeeded: 5 of 30 two-process runs here, 0 of 30 with this call.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def checkpoint_for_test(trainer: Trainer) -> Optional[str]:
    """The best checkpoint when one was monitored, else the last one; None when nothing was saved."""
    ckpt = trainer.checkpoint_callback
    if ckpt is None or trainer.fast_dev_run:
        return None
    if ckpt.best_model_path:
        return ckpt.best_model_path
    return ckpt.last_model_path or None


def trained_config(ckpt_path: str) -> Optional[dict]:
    """The ``model`` and ``data`` config a checkpoint was trained with.

    From the checkpoint itself (train.py stores it in every full checkpoint), else from the
    ``config.yaml`` of the run folder that holds it (``<run>/checkpoints/x.ckpt``), else the
    model part from the checkpoint's hyperparameters.
    """
    import torch

    path = Path(ckpt_path)
    ckpt = None
    if path.is_file():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # noqa: BLE001 - not a zip checkpoint: Lightning will say so when loading it
            ckpt = None
    if isinstance(ckpt, dict) and isinstance(ckpt.get(CONFIG_KEY), dict):
        return ckpt[CONFIG_KEY]
    beside = path.resolve().parent.parent / "config.yaml"
    if beside.is_file():
        return yaml.safe_load(beside.read_text())
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if isinstance(hp, dict) and hp.get("_class_path"):
        args = {k: v for k, v in hp.items() if not k.startswith("_")}
        return {"model": {"class_path": hp["_class_path"], "init_args": args}}
    return None


def build_cli(args: list[str] | None, stage: Literal["fit", "test"], cli_class: type[TopdownCLI] = TopdownCLI,
              **kwargs: Any) -> TopdownCLI:
    args = list(sys.argv[1:] if args is None else args)
    preset, args = split_model_arg(args)
    if stage == "test":
        if not _ckpt_arg(args):
            raise SystemExit("error: evaluate.py needs --ckpt_path PATH (a checkpoint written by train.py)")
        args = _with_trained_config(args)
    return cli_class(preset, args, stage, **kwargs)


def _ckpt_arg(args: list[str]) -> Optional[str]:
    ckpt = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--ckpt_path"), None)
    return ckpt or next((a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path=")), None)


def _with_trained_config(args: list[str]) -> list[str]:
    """Evaluate a checkpoint with the model and data it was trained with (later flags still override).

    The pretrained weights file the training started from is not read again: the checkpoint
    holds every weight, and the machine that evaluates may not have that file.
    """
    trained = trained_config(_ckpt_arg(args))
    if not trained:
        return args
    trained = {k: v for k, v in trained.items() if k in ("model", "data") and v}
    init = (trained.get("model") or {}).get("init_args") or {}
    if init.get("weights"):
        trained["model"] = {**trained["model"], "init_args": {**init, "weights": None}}
    at = args.index("--config") + 2
    extra = [f"--{key}={json.dumps(value)}" for key, value in trained.items()]
    return args[:at] + extra + args[at:]
