"""Feedback-prop evaluation as a Lightning callback (Wang et al., CVPR 2018, §4.1, §4.2 and §5).

For every test (or validation) batch the callback runs LF (Algorithm 1) or RF (Algorithm 2)
with the known evidence of each draw and, at the end of the epoch, reports the figures of an
:class:`topdown.evidence.Evidence` per reported iteration: for multi-label models the exact
mAP on the unknown labels (and on the known ones), for the hierarchical scene model MC Acc,
mAP and IoU Acc.  ``t = 0`` is the plain forward pass, so the no-fp row comes with no extra
computation.

One instance evaluates several configurations in one pass over the data: a list of
:class:`FeedbackSetting` (method, pivot layers, λ, T) times the evidence's draws.  The draws
of one setting run together as one feedback-prop call on the batch repeated once per draw
(``max_samples`` images x draws at most per call), each copy with its own known evidence;
the objective is a sum over samples and every update rule is elementwise, so this is the
same as running the draws one after the other.

Memory (the COCO test split has 20,504 images, Figure 4 has 46 draws x 6 settings): the
device holds only the current batch.  The scores are moved to host memory as soon as the
engine reports them, and only for the iterations that are reported (``keep="last"``: t = T;
``"all"``: every t, for choosing T on val).  The plain forward's scores are kept once for all
settings and draws.  ``max_state_gb`` refuses, before any work, an evaluation whose state
would not fit; :func:`topdown.evidence.plan_passes` splits a protocol into passes that fit.

DDP: the evaluation samplers do not pad, so no sample is counted twice.  At the end each
rank sends its rows to rank 0 (in chunks, :func:`gather_rows`), which computes the figures;
the records are then broadcast, so every rank holds the same results.  The AP does not depend
on the order of the samples (ties are one threshold), so the figures are those of one process.

Inference mode: Lightning runs the test and validation loops under
``torch.inference_mode()`` unless the Trainer is built with ``inference_mode=False``.
Feedback-prop needs gradients, so the callback leaves inference mode around its work
(``torch.inference_mode(False)`` + ``torch.enable_grad()``) and copies the batch tensors
that were created inside it; ``evaluate.py`` builds its Trainer with
``inference_mode=False`` anyway.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from topdown.evidence import Evidence, KnownDraw, MultiLabelEvidence, plain_rows, plan_passes, summarize, write_csv
from topdown.feedback import METHODS, StopFeedback, feedback_prop

KEEP = ("last", "all")
DEFAULT_MAX_SAMPLES = 32  # images x draws per call: ResNet-50 / VGG-16 at 224 px with an early pivot
DEFAULT_MAX_STATE_GB = 2.0
AP_RESERVE = 128 << 20  # bytes: average_precision's sorted blocks and label masks at COCO size


@dataclass(frozen=True)
class FeedbackSetting:
    """One feedback-prop configuration: method (``lf``/``rf``), pivot layers, update rate λ, T.

    ``steps`` is T (LF: per pivot, Algorithm 1).  ``stop`` reports iteration ``stop`` of that
    schedule and ends the call there (LF with several pivots chosen at an iteration inside the
    schedule); None reports its end.
    """

    method: str
    layers: tuple[str, ...]
    lr: float = 3e-3
    steps: int = 10
    stop: int | None = None

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
        if self.stop is not None:
            if not 0 <= self.stop <= self.end:
                raise ValueError(f"stop={self.stop} is outside the schedule of {self.name} (iterations 0..{self.end})")
            if self.stop == self.end:
                object.__setattr__(self, "stop", None)

    @property
    def layer_name(self) -> str:
        return "+".join(self.layers)

    @property
    def name(self) -> str:
        """``RF-conv13``, ``LF-input``, ``RF-conv9+conv13``."""
        return f"{self.method.upper()}-{self.layer_name}"

    @property
    def end(self) -> int:
        """The last iteration of the schedule: T, or T per pivot for LF (Algorithm 1)."""
        return self.steps * (len(self.layers) if self.method == "lf" else 1)

    @property
    def last(self) -> int:
        """The reported iteration."""
        return self.end if self.stop is None else self.stop

    @property
    def iterations(self) -> int:
        """Number of iterations t = 0..last."""
        return self.last + 1

    def at(self, t: int) -> "FeedbackSetting":
        """The setting that reports iteration ``t`` of this one's schedule (what val selection applies).

        RF and one-pivot LF: T = t.  LF with several pivots: the same T per pivot, stopped at t.
        """
        if not 0 <= t <= self.end:
            raise ValueError(f"iteration {t} is outside the schedule of {self.name} (0..{self.end})")
        if self.method == "rf" or len(self.layers) == 1:
            return replace(self, steps=t, stop=None)
        return replace(self, stop=t)

    def kept(self, keep: str) -> list[int]:
        """The iterations t >= 1 whose scores are kept (t = 0 is kept once for all settings)."""
        if keep == "all":
            return list(range(1, self.last + 1))
        return [self.last] if self.last > 0 else []

    def describe(self) -> dict:
        row = {"setting": self.name, "method": self.method, "layers": self.layer_name, "lr": self.lr,
               "steps": self.steps}
        if self.stop is not None:
            row["stop"] = self.stop
        return row


def state_bytes(evidence: Evidence, settings: Sequence[FeedbackSetting], keep: str, num_samples: int,
                units: Sequence[tuple[int, int]] | None = None) -> tuple[int, int]:
    """(shared, per-unit total) bytes of host metric state for ``num_samples`` samples.

    Shared: the plain forward's scores and the targets, once.  Per setting x draw: float32 scores
    of the draw's columns at each kept iteration.
    """
    shared = num_samples * (evidence.width() * 4 + evidence.target_bytes())
    units = units if units is not None else [(s, d) for s in range(len(settings)) for d in range(len(evidence.draws))]
    per = sum(unit_bytes(evidence, settings[s], d, keep, num_samples) for s, d in units)
    return shared, per


def unit_bytes(evidence: Evidence, setting: FeedbackSetting, d: int, keep: str, num_samples: int) -> int:
    return num_samples * len(setting.kept(keep)) * evidence.width(d) * 4


def plan_evaluation(evidence: Evidence, settings: Sequence[FeedbackSetting], keep: str, num_samples: int,
                    max_state_gb: float | None) -> list[tuple[list[int], list[int]]]:
    """The passes (setting indices, draw indices) that evaluate ``settings`` x the draws on
    ``num_samples`` samples with at most ``max_state_gb`` of metric state each
    (:func:`topdown.evidence.plan_passes`).

    The budget covers the kept scores and what computing the figures adds at its peak: the
    gathered scores of one (setting, draw, iteration) twice over (rank 0 receiving them) and the
    AP's working arrays (:data:`AP_RESERVE`).
    """
    widest = max([evidence.width()] + [evidence.width(d) for d in range(len(evidence.draws))])
    shared = num_samples * (evidence.width() * 4 + evidence.target_bytes()) + 2 * num_samples * widest * 4 + AP_RESERVE
    budget = None if max_state_gb is None else int(max_state_gb * 2**30)
    return plan_passes(len(settings), evidence.draws,
                       lambda s, d: unit_bytes(evidence, settings[s], d, keep, num_samples), shared, budget)


def _concat(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """``torch.cat(parts)``, freeing each part once copied (the peak is the result and one part)."""
    if not parts:
        return empty
    out = torch.empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype)
    i = 0
    parts.reverse()
    while parts:
        p = parts.pop()
        out[i:i + p.shape[0]] = p
        i += p.shape[0]
        del p
    return out


def _host(t: torch.Tensor) -> torch.Tensor:
    """A compact float32 copy in host memory (a slice must not keep its whole batch alive)."""
    return t.detach().to("cpu", torch.float32, copy=True)


def _usable(x: Any) -> Any:
    """Copies of tensors made under inference mode (they cannot take part in autograd)."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, dict):
        return {k: _usable(v) for k, v in x.items()}
    return x


class FeedbackPropCallback(Callback):
    """Feedback-prop over a split: per-iteration figures of each setting and known-evidence draw.

    Args:
        settings: the configurations to run (one or several :class:`FeedbackSetting`).
        unknown: the fixed unknown label indices (§4.1) of a multi-label model; not needed
            with ``evidence``.
        draws: the known-label sets; default: the whole complement of ``unknown``, one draw.
        stage: ``"test"`` runs in ``trainer.test``; ``"val"`` in ``trainer.validate`` (never
            during fitting).
        optimizer, weight_decay: the update rule of the pivots (reference code: Adam, 1e-4).
        max_samples: at most this many samples (images x draws) per feedback-prop call; a
            batch larger than that is split.  Feedback-prop holds the activations of the
            truncated network for backward, like training: 32 fits ResNet-50 or VGG-16 at
            224 px with the image as pivot on a 12 GB GPU; raise it for later pivots or larger
            devices, lower it for larger images.
        out_dir: where rank 0 writes ``fp_<tag>_iterations.csv`` and ``fp_<tag>_summary.csv``.
        tag: the name of this evaluation in file names and W&B keys (default: the stage).
        log_prefix: metric key prefix (``fp/map_unknown`` ...).
        evidence: what the evaluation reads and computes (:class:`topdown.evidence.Evidence`);
            default :class:`~topdown.evidence.MultiLabelEvidence` of ``unknown`` and ``draws``.
        keep: ``"last"`` keeps the scores of the reported iteration only (and t = 0), ``"all"``
            those of every iteration (per-iteration curves, choosing T on val).
        max_state_gb: host memory the metric state may take; an evaluation that needs more
            is refused before its first batch (None: no limit).
        log: log the figures through ``pl_module.log`` (the protocols log merged passes
            themselves).

    After the epoch, ``records`` holds one row per (setting, draw, kept iteration),
    ``summary`` one row per (setting, number of known labels) and ``skipped`` the number of
    invalid (missing or corrupt) images, the same on every rank.
    """

    def __init__(self, settings: FeedbackSetting | Sequence[FeedbackSetting], unknown: torch.Tensor | None = None,
                 draws: Sequence[KnownDraw] | None = None, stage: Literal["test", "val"] = "test",
                 optimizer: str = "adam", weight_decay: float = 1e-4, max_samples: int = DEFAULT_MAX_SAMPLES,
                 out_dir: str | Path | None = None, tag: str | None = None, log_prefix: str = "fp", *,
                 evidence: Evidence | None = None, keep: Literal["last", "all"] = "last",
                 max_state_gb: float | None = DEFAULT_MAX_STATE_GB, log: bool = True):
        super().__init__()
        self.settings = [settings] if isinstance(settings, FeedbackSetting) else list(settings)
        if not self.settings:
            raise ValueError("FeedbackPropCallback needs at least one FeedbackSetting")
        if stage not in ("test", "val"):
            raise ValueError(f"stage must be 'test' or 'val', got {stage!r}")
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
        if evidence is None:
            if unknown is None:
                raise ValueError("FeedbackPropCallback needs the unknown labels or an evidence")
            evidence = MultiLabelEvidence(unknown, draws)
        self.evidence = evidence
        self.stage, self.optimizer, self.weight_decay = stage, optimizer, weight_decay
        self.max_samples = max(1, int(max_samples))
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.tag = tag or stage
        self.log_prefix, self.keep, self.max_state_gb, self.log_results = log_prefix, keep, max_state_gb, log
        self.records: list[dict] = []
        self.summary: list[dict] = []
        self.skipped = 0
        self._reset()

    @property
    def unknown(self) -> torch.Tensor | None:
        return getattr(self.evidence, "unknown", None)

    @property
    def draws(self) -> list[KnownDraw]:
        return self.evidence.draws

    def _reset(self) -> None:
        self._plain: list[torch.Tensor] = []
        self._target: list[torch.Tensor] = []
        self._kept: dict[tuple[int, int, int], list[torch.Tensor]] = {}
        self._skipped = 0

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.evidence.setup(pl_module, getattr(trainer, "datamodule", None))

    def _active(self, trainer: Trainer) -> bool:
        if self.stage == "test":
            return trainer.testing
        return trainer.validating and not trainer.sanity_checking and trainer.state.fn == "validate"

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.evidence.setup(pl_module, getattr(trainer, "datamodule", None))  # the checkpoint is loaded now
        self._reset()
        if self.max_state_gb is None:
            return
        n, why = self._num_samples(trainer), ""
        try:
            passes = plan_evaluation(self.evidence, self.settings, self.keep, n, self.max_state_gb)
        except ValueError as err:
            passes, why = None, f" ({err})"
        if passes is None or len(passes) > 1:
            shared, per = state_bytes(self.evidence, self.settings, self.keep, n)
            raise ValueError(
                f"feedback-prop evaluation of {len(self.settings)} setting(s) x {len(self.draws)} draw(s) on "
                f"{n} {self.stage} samples needs {(shared + per) / 2**30:.2f} GB of metric state, over "
                f"max_state_gb={self.max_state_gb:g}{why}; run it in parts (the protocols of "
                "evaluate.py do: callbacks.feedback.plan_evaluation), keep fewer iterations or raise the limit")

    def _num_samples(self, trainer: Trainer) -> int:
        loaders = trainer.test_dataloaders if self.stage == "test" else trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        batches = trainer.num_test_batches if self.stage == "test" else trainer.num_val_batches
        total = 0
        for i, dl in enumerate(loaders):
            n = len(dl.dataset) if hasattr(dl, "dataset") else 0
            limit = batches[i] if i < len(batches) else math.inf
            if getattr(dl, "batch_size", None) and limit != math.inf:
                n = min(n, int(limit) * dl.batch_size)
            total += n
        return total

    def on_test_epoch_start(self, trainer, pl_module):
        if self._active(trainer):
            self._start(trainer, pl_module)

    def on_validation_epoch_start(self, trainer, pl_module):
        if self._active(trainer):
            self._start(trainer, pl_module)

    # --------------------------------------------------------------- per batch
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._active(trainer):
            self.evaluate_batch(pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._active(trainer):
            self.evaluate_batch(pl_module, batch)

    def _calls(self, b: int) -> list[tuple[list[int], slice]]:
        """(draws, rows) of each feedback-prop call on a batch of ``b`` valid images."""
        n = len(self.draws)
        if b >= self.max_samples:
            return [([d], slice(r, min(r + self.max_samples, b))) for d in range(n) for r in range(0, b, self.max_samples)]
        per_call = max(1, self.max_samples // b)
        return [(list(range(f, min(f + per_call, n))), slice(0, b)) for f in range(0, n, per_call)]

    def evaluate_batch(self, pl_module: LightningModule, batch: dict) -> None:
        """Run every setting x draw on the valid rows of ``batch`` and keep what the figures need."""
        net = getattr(pl_module, "net", pl_module)
        with torch.inference_mode(False), torch.enable_grad():
            self._skipped += int((~batch["valid"]).sum())
            inputs, context = self.evidence.batch(batch)
            inputs, context = _usable(inputs), _usable(context)
            b = inputs.shape[0]
            if b == 0:
                return
            self._target.append(self.evidence.target(context).cpu())
            plain: dict[int, torch.Tensor] = {}
            for s, setting in enumerate(self.settings):
                for draws, rows in self._calls(b):
                    self._run(net, s, setting, inputs, context, draws, rows, plain if s == 0 else None)
            self._plain.append(torch.cat([plain[k] for k in sorted(plain)]))

    def batch_scores(self, pl_module: LightningModule, batch: dict) -> tuple[torch.Tensor, dict[tuple[int, int], torch.Tensor]]:
        """One batch outside a Trainer (figures of single images): the plain forward's scores
        ``[B, K]`` of the valid rows and ``{(setting, draw): [B, C_d]}`` at each setting's reported
        iteration, computed exactly as in an evaluation.  Leaves no state behind."""
        self.evidence.setup(pl_module)
        self._reset()
        try:
            self.evaluate_batch(pl_module, batch)
            plain = _concat(self._plain, torch.zeros(0, self.evidence.width()))
            fed = {(s, d): _concat(self._kept.pop((s, d, setting.last), []), torch.zeros(0, self.evidence.width(d)))
                   for s, setting in enumerate(self.settings) for d in range(len(self.draws))}
        finally:
            self._reset()
        return plain, fed

    def _run(self, net, s: int, setting: FeedbackSetting, inputs, context, draws: list[int], rows: slice,
             plain: dict | None) -> None:
        x = inputs[rows]
        nb, n = x.shape[0], len(draws)
        x = x.repeat(n, *([1] * (x.dim() - 1))) if n > 1 else x
        kept = set(setting.kept(self.keep))
        seen: set[int] = set()
        idle = self.evidence.no_evidence(context, draws, rows)
        idle = idle if idle is not None and bool(idle.any()) else None
        start: list[torch.Tensor] = []

        def record(t: int, outputs) -> None:
            if t == 0 and plain is not None and draws[0] == 0:
                plain[rows.start] = _host(self.evidence.scores(outputs)[:nb])
            if t == 0 and idle is not None:
                start.append(self.evidence.scores(outputs).detach().clone())
            if t in kept:
                scores = self.evidence.scores(outputs)
                if idle is not None:  # samples that know nothing stay at the plain forward pass
                    scores = torch.where(idle.to(scores.device)[:, None], start[0], scores)
                for j, d in enumerate(draws):
                    part = self.evidence.part(scores[j * nb:(j + 1) * nb], d)
                    self._kept.setdefault((s, d, t), []).append(_host(part))
                seen.add(t)
            if setting.stop is not None and t >= setting.stop:
                raise StopFeedback

        feedback_prop(net, x, self.evidence.known_loss(context, draws, rows), list(setting.layers),
                      method=setting.method, steps=setting.steps, lr=setting.lr, optimizer=self.optimizer,
                      callback=record, weight_decay=self.weight_decay)
        if seen != kept:
            raise RuntimeError(f"feedback_prop reported no outputs for iterations {sorted(kept - seen)} of {setting.name}")

    # ---------------------------------------------------------------- results
    def on_test_epoch_end(self, trainer, pl_module):
        if self._active(trainer):
            self._finish(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._active(trainer):
            self._finish(trainer, pl_module)

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.records, self.skipped = self.compute(trainer, pl_module)
        self.summary = summarize(self.records, self.evidence.metrics, self.evidence.amount)
        if self.skipped:
            warnings.warn(f"feedback-prop on {self.stage}: {self.skipped} images were missing or corrupt and are "
                          "left out of every figure", stacklevel=2)
        if self.log_results:
            for k, v in result_metrics(self.summary, self.evidence.metrics, self.log_prefix, self.skipped,
                                       self.evidence.amount).items():
                if not math.isnan(v):
                    # the same value on every rank (computed on rank 0, broadcast): no further sync
                    pl_module.log(k, v, sync_dist=False, rank_zero_only=False)
        if not trainer.is_global_zero:
            return
        rows = plain_rows(self.summary)
        if self.out_dir is not None:
            write_csv(self.out_dir / f"fp_{self.tag}_iterations.csv", self.records)
            write_csv(self.out_dir / f"fp_{self.tag}_summary.csv", rows)
        if self.log_results:
            log_wandb(trainer, {f"{self.log_prefix}/{self.tag}_iterations": table(self.records),
                                f"{self.log_prefix}/{self.tag}_summary": table(rows)})

    def compute(self, trainer: Trainer, pl_module: LightningModule) -> tuple[list[dict], int]:
        """Gather the host state on rank 0, compute the figures there, share the records; frees the state."""
        ev = self.evidence
        dist = _distributed()
        device = pl_module.device if dist and torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        target = _concat(self._target, ev.empty_target())
        plain = _concat(self._plain, torch.zeros(0, ev.width()))
        skipped = self._skipped
        if dist:
            counts = _all_gather_int(len(target), device)
            skipped = sum(_all_gather_int(skipped, device))
            target, plain = gather_rows(target, counts, device), gather_rows(plain, counts, device)
        rank0 = not dist or torch.distributed.get_rank() == 0
        records: list[dict] = []
        base = ev.evaluate_plain(plain, target) if rank0 else None
        del plain
        for s, setting in enumerate(self.settings):
            for d in range(len(self.draws)):
                head = {"split": self.stage, **setting.describe(), **ev.describe(d)}
                if rank0:
                    records.append({**head, "iteration": 0, **base[d]})
                for t in setting.kept(self.keep):
                    scores = _concat(self._kept.pop((s, d, t), []), torch.zeros(0, ev.width(d)))
                    if dist:
                        scores = gather_rows(scores, counts, device)
                    if rank0:
                        records.append({**head, "iteration": t, **ev.evaluate(scores, target, d)})
                    del scores
        self._reset()
        if dist:
            records = trainer.strategy.broadcast(records, src=0)
        return records, skipped


def result_metrics(summary: Sequence[dict], metrics: Sequence[str], prefix: str = "fp", skipped: int = 0,
                   amount: str = "num_known") -> dict:
    """Scalar keys of a summary: ``fp/<m>`` (one setting) or ``fp/<setting>[-lr<λ>][/k<known>]/<m>``
    (another :attr:`~topdown.evidence.Evidence.amount` than ``num_known``: ``/<amount><value>``),
    their ``_std`` over draws and ``_nofp`` (t = 0) values, ``fp/<m0>_nofp`` and ``fp/skipped``."""
    if not summary:
        return {}
    m0 = metrics[0]
    out = {f"{prefix}/{m0}_nofp": summary[0][f"{m0}_nofp"], f"{prefix}/skipped": float(skipped)}
    names = {(g["setting"], g["lr"], g["steps"], g.get("stop")) for g in summary}
    lrs = {g["lr"] for g in summary}
    for g in summary:
        if len(summary) == 1:
            key = prefix
        else:
            key = f"{prefix}/{g['setting']}" + (f"-lr{g['lr']:g}" if len(lrs) > 1 else "")
            if len(names) != len(summary):  # several amounts of known labels
                key += f"/{'k' if amount == 'num_known' else amount}{g[amount]}"
        for m in metrics:
            out[f"{key}/{m}"] = g[m]
            if g["draws"] > 1:
                out[f"{key}/{m}_std"] = g[f"{m}_std"]
            if m != m0 or len(summary) == 1:
                out[f"{key}/{m}_nofp"] = g[f"{m}_nofp"]
    return out


# ---------------------------------------------------------------------------------------
# DDP: rows to rank 0 (the house gather helper; host memory, device chunks for NCCL)
# ---------------------------------------------------------------------------------------

def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _all_gather_int(value: int, device) -> list[int]:
    dist = torch.distributed
    mine = torch.tensor([int(value)], dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(v) for v in every]


def gather_rows(t: torch.Tensor, counts: Sequence[int], device=None, chunk_bytes: int = 64 << 20) -> torch.Tensor | None:
    """The rows of ``t`` from every rank (``counts[r]`` rows on rank r), concatenated in rank order
    in rank 0's host memory; None on the other ranks.

    Sent in chunks of about ``chunk_bytes`` through ``device`` (the accelerator for NCCL, the CPU
    for gloo), so no rank holds more than a chunk of the others' rows on its device.
    """
    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    device = device or torch.device("cpu")
    row_bytes = max(1, math.prod(t.shape[1:]) * t.element_size())
    step = max(1, chunk_bytes // row_bytes)
    longest = max(counts)
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, longest, step):
        n = min(step, longest - start)
        buf = torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=device)
        mine = t[start:start + n]
        buf[:mine.shape[0]] = mine.to(device)
        bufs = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
        dist.gather(buf, bufs, dst=0)
        if rank == 0:
            for r in range(world):
                k = max(0, min(n, counts[r] - start))
                if k:
                    parts[r].append(bufs[r][:k].cpu())
    if rank != 0:
        return None
    pieces = [p for r in range(world) for p in parts[r]]
    return torch.cat(pieces) if pieces else t[:0].cpu()


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
    """Log tables (:func:`table`; a cell may be an :func:`image`) and images (:func:`image`) to every
    WandbLogger, on rank 0."""
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
            payload[key] = wandb.Table(columns=cols, data=[[_cell(r.get(c)) for c in cols] for r in value])
        else:
            payload[key] = wandb.Image(value)
    for lg in loggers:
        lg.experiment.log(payload)


def _cell(value: Any) -> Any:
    """A table cell; an :func:`image` in a row becomes a ``wandb.Image`` (tables of examples)."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "image":
        import wandb

        return wandb.Image(value[1])
    return value


def log_metrics(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Write scalars to every logger of ``trainer`` outside a loop (rank 0; NaN left out)."""
    if not trainer.is_global_zero:
        return
    values = {k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}
    for lg in trainer.loggers:
        lg.log_metrics(values, step=trainer.global_step)
        lg.save()
