"""Feedback-prop evaluation as a Lightning callback (Wang et al., CVPR 2018, §4.1 and §5).

For every test (or validation) batch the callback runs LF (Algorithm 1) or RF
(Algorithm 2) with the known labels as partial evidence and records, for each iteration
``t = 0..T``, the scores of every label; at the end of the epoch it reports the exact
mAP on the unknown labels (and on the known ones) per iteration.  ``t = 0`` is the plain
forward pass, so the no-fp row comes with no extra computation.

One instance evaluates several configurations in one pass over the data: a list of
:class:`FeedbackSetting` (method, pivot layers, lr, steps) times a list of known-label
draws (:class:`topdown.evidence.KnownDraw`).  The draws of one setting are run together
as one feedback-prop call on a batch repeated once per draw, each copy with its own known
labels (a per-sample mask); the objective is a sum over samples and every update rule is
elementwise, so this is the same as running the draws one after the other.

DDP: the evaluation samplers do not pad, so no sample is counted twice; the score
states are concatenated across ranks by torchmetrics when the mAP is computed.

Inference mode: Lightning runs the test and validation loops under
``torch.inference_mode()`` unless the Trainer is built with ``inference_mode=False``.
Feedback-prop needs gradients, so the callback leaves inference mode around its work
(``torch.inference_mode(False)`` + ``torch.enable_grad()``) and copies the batch tensors
that were created inside it; ``evaluate.py`` builds its Trainer with
``inference_mode=False`` anyway.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics import Metric
from torchmetrics.functional.classification import multilabel_average_precision
from torchmetrics.utilities.data import dim_zero_cat

from topdown.evidence import KnownDraw, known_label_draws, mean_std, write_csv
from topdown.feedback import METHODS, feedback_prop, multilabel_known_loss


@dataclass(frozen=True)
class FeedbackSetting:
    """One feedback-prop configuration: method (``lf``/``rf``), pivot layers, update rate λ, T."""

    method: str
    layers: tuple[str, ...]
    lr: float = 3e-3
    steps: int = 10

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown feedback-prop method {self.method!r}; choose from {METHODS}")
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", (self.layers,))
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("a feedback-prop setting needs at least one pivot layer")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")

    @property
    def layer_name(self) -> str:
        return "+".join(self.layers)

    @property
    def name(self) -> str:
        """``RF-conv13``, ``LF-input``, ``RF-conv9+conv13``."""
        return f"{self.method.upper()}-{self.layer_name}"

    @property
    def iterations(self) -> int:
        """Number of recorded iterations: t = 0..T, where LF counts T per pivot (Algorithm 1)."""
        return self.steps * (len(self.layers) if self.method == "lf" else 1) + 1


class IterationMAP(Metric):
    """Exact macro mAP per iteration on the unknown and on the known labels of one draw.

    Keeps the scores of the columns ``unknown ∪ known`` for every iteration (``[N, I, C]``)
    and the targets once; labels without a positive in the split are left out of the
    means, as in :class:`lightning_modules.metrics.LabelMAP`.
    """

    full_state_update = False

    def __init__(self, unknown: torch.Tensor, known: torch.Tensor, iterations: int, **kwargs):
        super().__init__(**kwargs)
        self.iterations = iterations
        self.register_buffer("columns", torch.cat([unknown.long(), known.long()]), persistent=False)
        self.num_unknown = len(unknown)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def start(self) -> None:
        """Empty but well-shaped states, so a rank without a valid sample still syncs."""
        c = len(self.columns)
        self.scores.append(torch.zeros(0, self.iterations, c, device=self.device))
        self.target.append(torch.zeros(0, c, dtype=torch.uint8, device=self.device))

    def update(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """``scores [B, I, K]`` (probabilities per iteration), ``target [B, K]`` 0/1."""
        cols = self.columns.to(scores.device)
        self.scores.append(scores[:, :, cols].float())
        self.target.append(target[:, cols].to(torch.uint8))

    def compute(self) -> dict[str, torch.Tensor]:
        scores, target = dim_zero_cat(self.scores), dim_zero_cat(self.target).long()
        c = len(self.columns)
        out = torch.full((2, self.iterations), float("nan"))
        if scores.shape[0] == 0:
            return {"unknown": out[0], "known": out[1]}
        positives = target.sum(0) > 0
        parts = (slice(0, self.num_unknown), slice(self.num_unknown, c))
        for t in range(self.iterations):
            ap = multilabel_average_precision(scores[:, t], target, num_labels=c, average="none", thresholds=None)
            for j, part in enumerate(parts):
                keep = positives[part]
                if keep.any():
                    out[j, t] = ap[part][keep].mean().item()
        return {"unknown": out[0], "known": out[1]}


class FeedbackPropCallback(Callback):
    """Feedback-prop over a split with a known/unknown label split; per-iteration mAP (§4.1, §5).

    Args:
        settings: the configurations to run (one or several :class:`FeedbackSetting`).
        unknown: the fixed unknown label indices (§4.1).
        draws: the known-label sets; default: the whole complement of ``unknown``, one draw.
        stage: ``"test"`` runs in ``trainer.test``; ``"val"`` in ``trainer.validate`` (never
            during fitting).
        optimizer, weight_decay: the update rule of the pivots (reference code: Adam, 1e-4).
        max_samples: at most this many samples (batch × draws) per feedback-prop call.
        out_dir: where rank 0 writes ``fp_<tag>_iterations.csv`` and ``fp_<tag>_summary.csv``.
        tag: the name of this evaluation in file names and W&B keys (default: the stage).
        log_prefix: metric key prefix (``fp/map_unknown`` ...).

    After the epoch, ``records`` holds one row per (setting, draw, iteration) and
    ``summary`` one row per (setting, number of known labels), the same on every rank.
    """

    def __init__(self, settings: FeedbackSetting | Sequence[FeedbackSetting], unknown: torch.Tensor,
                 draws: Sequence[KnownDraw] | None = None, stage: Literal["test", "val"] = "test",
                 optimizer: str = "adam", weight_decay: float = 1e-4, max_samples: int = 256,
                 out_dir: str | Path | None = None, tag: str | None = None, log_prefix: str = "fp"):
        super().__init__()
        self.settings = [settings] if isinstance(settings, FeedbackSetting) else list(settings)
        if not self.settings:
            raise ValueError("FeedbackPropCallback needs at least one FeedbackSetting")
        if stage not in ("test", "val"):
            raise ValueError(f"stage must be 'test' or 'val', got {stage!r}")
        self.unknown = torch.as_tensor(unknown).long()
        self.draws = None if draws is None else list(draws)
        self.stage, self.optimizer, self.weight_decay = stage, optimizer, weight_decay
        self.max_samples = max(1, int(max_samples))
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.tag = tag or stage
        self.log_prefix = log_prefix
        self.metrics: list[list[IterationMAP]] = []
        self.records: list[dict] = []
        self.summary: list[dict] = []

    # ------------------------------------------------------------------ set-up
    def _build(self, num_labels: int, device: torch.device) -> None:
        if self.unknown.numel() and int(self.unknown.max()) >= num_labels:
            raise ValueError(f"unknown label {int(self.unknown.max())} is out of range for {num_labels} labels")
        if self.draws is None:
            self.draws = known_label_draws(self.unknown, num_labels)
        for d in self.draws:
            if set(d.labels.tolist()) & set(self.unknown.tolist()):
                raise ValueError(f"known draw (num_known={d.num_known}, draw={d.draw}) overlaps the unknown labels")
        self.metrics = [[IterationMAP(self.unknown, d.labels, s.iterations).to(device) for d in self.draws]
                        for s in self.settings]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        hparams = getattr(pl_module, "hparams", {})
        num_labels = hparams.get("num_labels") if hasattr(hparams, "get") else None
        if num_labels is None:
            num_labels = getattr(trainer.datamodule, "num_labels", None)
        if num_labels is None:
            raise ValueError("FeedbackPropCallback: cannot tell the number of labels (no hparams.num_labels "
                             "on the module and no num_labels on the datamodule)")
        self._build(int(num_labels), pl_module.device)

    def _active(self, trainer: Trainer) -> bool:
        if self.stage == "test":
            return trainer.testing
        return trainer.validating and not trainer.sanity_checking and trainer.state.fn == "validate"

    def _start(self, pl_module: LightningModule) -> None:
        for row in self.metrics:
            for m in row:
                m.to(pl_module.device)
                m.reset()
                m.start()

    def on_test_epoch_start(self, trainer, pl_module):
        if self._active(trainer):
            self._start(pl_module)

    def on_validation_epoch_start(self, trainer, pl_module):
        if self._active(trainer):
            self._start(pl_module)

    # --------------------------------------------------------------- per batch
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._active(trainer):
            self.evaluate_batch(pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._active(trainer):
            self.evaluate_batch(pl_module, batch)

    def evaluate_batch(self, pl_module: LightningModule, batch: dict) -> None:
        """Run every setting × draw on the valid rows of ``batch`` and update the metrics."""
        net = getattr(pl_module, "net", pl_module)
        with torch.inference_mode(False), torch.enable_grad():
            valid = batch["valid"]
            # copies: tensors made under inference mode cannot take part in autograd
            images, labels = batch["image"][valid].clone(), batch["labels"][valid].clone()
            b = images.shape[0]
            if b == 0:
                return
            per_call = max(1, self.max_samples // b)
            for s, setting in enumerate(self.settings):
                for first in range(0, len(self.draws), per_call):
                    chunk = list(range(first, min(first + per_call, len(self.draws))))
                    scores = self._run(net, setting, images, labels, chunk)
                    for j, d in enumerate(chunk):
                        self.metrics[s][d].update(scores[j * b:(j + 1) * b], labels)

    def _run(self, net, setting: FeedbackSetting, images, labels, chunk: list[int]) -> torch.Tensor:
        n, b = len(chunk), images.shape[0]
        x = images.repeat(n, 1, 1, 1) if n > 1 else images
        y = labels.repeat(n, 1) if n > 1 else labels
        mask = torch.zeros_like(y, dtype=torch.bool)
        for j, d in enumerate(chunk):
            mask[j * b:(j + 1) * b, self.draws[d].labels.to(mask.device)] = True
        per_t: list[torch.Tensor | None] = [None] * setting.iterations

        def record(t: int, outputs: torch.Tensor) -> None:
            per_t[t] = torch.sigmoid(outputs.float().flatten(1))

        feedback_prop(net, x, multilabel_known_loss(mask, y), list(setting.layers), method=setting.method,
                      steps=setting.steps, lr=setting.lr, optimizer=self.optimizer, callback=record,
                      weight_decay=self.weight_decay)
        missing = [t for t, v in enumerate(per_t) if v is None]
        if missing:
            raise RuntimeError(f"feedback_prop reported no outputs for iterations {missing} of {setting.name}")
        return torch.stack(per_t, 1)  # [n*b, I, K]

    # ---------------------------------------------------------------- results
    def on_test_epoch_end(self, trainer, pl_module):
        if self._active(trainer):
            self._finish(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._active(trainer):
            self._finish(trainer, pl_module)

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # every rank computes (torchmetrics gathers the states), in the same order
        # (torchmetrics squeezes a one-iteration curve to a scalar: T = 0 is a valid setting)
        curves = [[{k: v.reshape(-1) for k, v in m.compute().items()} for m in row] for row in self.metrics]
        self.records, self.summary = [], []
        for s, setting in enumerate(self.settings):
            for d, draw in enumerate(self.draws):
                c = curves[s][d]
                for t in range(setting.iterations):
                    self.records.append({
                        "split": self.stage, "method": setting.method, "layers": setting.layer_name,
                        "lr": setting.lr, "steps": setting.steps, "num_known": draw.num_known, "draw": draw.draw,
                        "iteration": t, "map_unknown": float(c["unknown"][t]), "map_known": float(c["known"][t]),
                    })
        for s, setting in enumerate(self.settings):
            for k in sorted({d.num_known for d in self.draws}):
                idx = [i for i, d in enumerate(self.draws) if d.num_known == k]
                last = setting.iterations - 1
                unk = [float(curves[s][i]["unknown"][last]) for i in idx]
                kno = [float(curves[s][i]["known"][last]) for i in idx]
                unk0 = [float(curves[s][i]["unknown"][0]) for i in idx]
                kno0 = [float(curves[s][i]["known"][0]) for i in idx]
                mean_curve = [mean_std([float(curves[s][i]["unknown"][t]) for i in idx])[0]
                              for t in range(setting.iterations)]
                row = {"split": self.stage, "setting": setting.name, "method": setting.method,
                       "layers": setting.layer_name, "lr": setting.lr, "steps": setting.steps, "num_known": k,
                       "draws": len(idx)}
                row["map_unknown_nofp"], _ = mean_std(unk0)
                row["map_unknown"], row["map_unknown_std"] = mean_std(unk)
                row["map_known_nofp"], row["map_known_nofp_std"] = mean_std(kno0)
                row["map_known"], row["map_known_std"] = mean_std(kno)
                row["curve_unknown"] = mean_curve
                self.summary.append(row)
        self._log(trainer, pl_module)

    def mean_curve(self, setting: FeedbackSetting, num_known: int | None = None) -> list[float]:
        """Unknown-label mAP per iteration, mean over the draws (of ``num_known`` labels, if given)."""
        for row in self.summary:
            if row["setting"] == setting.name and row["lr"] == setting.lr and row["steps"] == setting.steps \
                    and (num_known is None or row["num_known"] == num_known):
                return row["curve_unknown"]
        raise KeyError(f"no result for {setting.name} (lr={setting.lr}, steps={setting.steps}, num_known={num_known})")

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        p = self.log_prefix
        groups = self.summary
        metrics = {f"{p}/map_unknown_nofp": groups[0]["map_unknown_nofp"]}
        names = {(g["setting"], g["lr"], g["steps"]) for g in groups}
        lrs = {g["lr"] for g in groups}
        for g in groups:
            if len(groups) == 1:
                key = p
            else:
                key = f"{p}/{g['setting']}" + (f"-lr{g['lr']:g}" if len(lrs) > 1 else "")
                if len(names) != len(groups):  # several amounts of known labels
                    key += f"/k{g['num_known']}"
            metrics[f"{key}/map_unknown"] = g["map_unknown"]
            metrics[f"{key}/map_known"] = g["map_known"]
            if g["draws"] > 1:
                metrics[f"{key}/map_unknown_std"] = g["map_unknown_std"]
            if len(groups) > 1:
                metrics[f"{key}/map_known_nofp"] = g["map_known_nofp"]
        if len(groups) == 1:
            metrics[f"{p}/map_known_nofp"] = groups[0]["map_known_nofp"]
        for k, v in metrics.items():
            if not math.isnan(v):
                # values are already gathered over ranks: no further sync
                pl_module.log(k, v, sync_dist=False, rank_zero_only=False)
        if not trainer.is_global_zero:
            return
        rows = [{k: v for k, v in r.items() if k != "curve_unknown"} for r in self.summary]
        if self.out_dir is not None:
            write_csv(self.out_dir / f"fp_{self.tag}_iterations.csv", self.records)
            write_csv(self.out_dir / f"fp_{self.tag}_summary.csv", rows)
        log_wandb(trainer, {f"{p}/{self.tag}_iterations": table(self.records),
                            f"{p}/{self.tag}_summary": table(rows)})


# ---------------------------------------------------------------------------------------
# W&B (rank 0 only; no-ops without a WandbLogger)
# ---------------------------------------------------------------------------------------

def wandb_loggers(trainer: Trainer) -> list:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def table(rows: Sequence[dict]) -> Any:
    """A ``wandb.Table`` of dict rows (lazy: only built when W&B is logged to)."""
    return ("table", list(rows))


def image(path: str | Path) -> Any:
    return ("image", str(path))


def log_wandb(trainer: Trainer, items: dict[str, Any]) -> None:
    """Log tables (:func:`table`) and images (:func:`image`) to every WandbLogger, on rank 0."""
    if not trainer.is_global_zero:
        return
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    payload = {}
    for key, (kind, value) in items.items():
        if kind == "table":
            if not value:
                continue
            cols: list[str] = []
            for r in value:
                cols += [c for c in r if c not in cols]
            payload[key] = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in value])
        else:
            payload[key] = wandb.Image(value)
    for lg in loggers:
        lg.experiment.log(payload)
