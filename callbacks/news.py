"""Table 2 and Figure 6 of feedback-prop (§4.3): news images with article text as evidence.

:class:`TextEvidenceCallback` runs feedback-prop over a split with, for each image, the
article-noun labels of the first fraction of its article's words as known evidence
(:mod:`topdown.news`), and reports the caption-noun mAP after every iteration.
:func:`run_table2` is the protocol of ``scripts/table2.py``: every (lr, T) of a grid on val,
the best per cell (column × text fraction) applied on test, the table printed in the
paper's layout (rows no-text, 25 %, ..., 100 % text; columns LF-conv40, RF-conv22), CSV,
a PNG of mAP against the text fraction, Figure 6, all logged to W&B.

The no-text row is the plain forward pass: with no text nothing is known. A sample whose
prefix gives no known label (``absent="unknown"`` and no vocabulary noun in the prefix)
keeps its plain scores too, so the optimiser's weight decay cannot move it.

DDP: the evaluation samplers do not pad, every sample's evidence is looked up by its
``index``, and :class:`~lightning_modules.metrics.LabelMAP` gathers the scores of all
ranks when it computes, so the mAP does not depend on the number of processes.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.feedback import FeedbackSetting, image, log_wandb, table
from lightning_modules.metrics import LabelMAP
from topdown.feedback import feedback_prop, multilabel_known_loss
from topdown.news import check_fraction, known_evidence

CAPTION, ARTICLE = "caption", "article"


@dataclass(frozen=True)
class TextRun:
    """One feedback-prop configuration applied with the evidence of some text fractions."""

    setting: FeedbackSetting
    fractions: tuple[float, ...]


class TextEvidenceCallback(Callback):
    """Feedback-prop with text-prefix evidence; caption-noun mAP per run, fraction and iteration.

    Args:
        runs: the configurations and the (non-zero) text fractions each is applied with.
        prefix: ``{fraction: uint8 [N, K_article]}`` article-noun labels of each text prefix of the
            split's images, rows in ``index`` order.
        stage: ``"val"`` (runs in ``trainer.validate``) or ``"test"``.
        absent: ``"negative"`` or ``"unknown"`` (see :mod:`topdown.news`).
        optimizer, weight_decay: the pivots' update rule (reference code: Adam, 1e-4).
        max_samples: at most this many samples (images × fractions) per feedback-prop call.

    After the epoch, ``nofp`` is the plain caption-noun mAP and ``curves[(i, fraction)]`` the
    mAP after each iteration ``t = 0..`` of run ``i`` (the same on every rank).
    """

    def __init__(self, runs: Sequence[TextRun], prefix: dict[float, np.ndarray], stage: str = "test",
                 absent: str = "negative", optimizer: str = "adam", weight_decay: float = 1e-4,
                 max_samples: int = 256):
        super().__init__()
        if stage not in ("val", "test"):
            raise ValueError(f"stage must be 'val' or 'test', got {stage!r}")
        self.runs = list(runs)
        for r in self.runs:
            for f in r.fractions:
                if check_fraction(f) == 0.0:
                    raise ValueError("the no-text row is the plain forward pass; give only non-zero fractions")
                if f not in prefix:
                    raise ValueError(f"no prefix labels for text fraction {f}")
        self.prefix = {float(f): torch.from_numpy(np.asarray(v)) for f, v in prefix.items()}
        self.stage, self.absent, self.optimizer = stage, absent, optimizer
        self.weight_decay, self.max_samples = weight_decay, max(1, int(max_samples))
        self.metrics: torch.nn.ModuleDict | None = None
        self.nofp: float = math.nan
        self.curves: dict[tuple[int, float], list[float]] = {}
        self.seconds = 0.0

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        k = int(pl_module.hparams.num_caption_labels)
        names = {"nofp": LabelMAP(k)}
        for i, r in enumerate(self.runs):
            for f in r.fractions:
                for t in range(r.setting.iterations):
                    names[self._key(i, f, t)] = LabelMAP(k)
        self.metrics = torch.nn.ModuleDict(names).to(pl_module.device)

    @staticmethod
    def _key(i: int, f: float, t: int) -> str:
        return f"r{i}_f{f:g}_t{t}".replace(".", "p")

    def _active(self, trainer: Trainer) -> bool:
        if self.stage == "test":
            return trainer.testing
        return trainer.validating and not trainer.sanity_checking and trainer.state.fn == "validate"

    def _start(self, trainer, pl_module):
        if self._active(trainer):
            self.metrics.to(pl_module.device)
            for m in self.metrics.values():
                m.reset()
            self._t0 = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module):
        self._start(trainer, pl_module)

    def on_test_epoch_start(self, trainer, pl_module):
        self._start(trainer, pl_module)

    # --------------------------------------------------------------- per batch
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._active(trainer):
            self.evaluate_batch(pl_module, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._active(trainer):
            self.evaluate_batch(pl_module, batch)

    def evaluate_batch(self, pl_module: LightningModule, batch: dict) -> None:
        net = getattr(pl_module, "net", pl_module)
        with torch.inference_mode(False), torch.enable_grad():
            valid = batch["valid"]
            images = batch["image"][valid].clone()
            target = batch["caption_labels"][valid].long().clone()
            rows = batch["index"][valid].cpu()
            b = images.shape[0]
            if b == 0:
                return
            was_training = net.training
            net.eval()
            with torch.no_grad():
                plain = torch.sigmoid(net(images)[CAPTION].float())
            net.train(was_training)
            self.metrics["nofp"].update(plain, target)
            per_call = max(1, self.max_samples // b)
            for i, run in enumerate(self.runs):
                for first in range(0, len(run.fractions), per_call):
                    chunk = run.fractions[first:first + per_call]
                    scores = self._run(net, run.setting, images, rows, chunk, plain)
                    for j, f in enumerate(chunk):
                        for t, s in enumerate(scores):
                            self.metrics[self._key(i, f, t)].update(s[j * b:(j + 1) * b], target)

    def _run(self, net, setting: FeedbackSetting, images, rows, fractions, plain) -> list[torch.Tensor]:
        n, b = len(fractions), images.shape[0]
        masks, values = [], []
        for f in fractions:
            m, v = known_evidence(self.prefix[f][rows], f, self.absent)
            masks.append(m)
            values.append(v)
        mask, value = torch.cat(masks).to(images.device), torch.cat(values).to(images.device)
        x = images.repeat(n, 1, 1, 1) if n > 1 else images
        per_t: list[Optional[torch.Tensor]] = [None] * setting.iterations

        def record(t: int, outputs: dict) -> None:
            per_t[t] = torch.sigmoid(outputs[CAPTION].float())

        feedback_prop(net, x, multilabel_known_loss(mask, value, key=ARTICLE), list(setting.layers),
                      method=setting.method, steps=setting.steps, lr=setting.lr, optimizer=self.optimizer,
                      callback=record, weight_decay=self.weight_decay)
        missing = [t for t, v in enumerate(per_t) if v is None]
        if missing:
            raise RuntimeError(f"feedback_prop reported no outputs for iterations {missing} of {setting.name}")
        no_evidence = ~mask.any(1)
        if no_evidence.any():  # nothing known: no feedback, the plain scores stand
            base = plain.repeat(n, 1)
            per_t = [torch.where(no_evidence[:, None], base, s) for s in per_t]
        return per_t

    # ---------------------------------------------------------------- results
    def on_validation_epoch_end(self, trainer, pl_module):
        if self._active(trainer):
            self._finish()

    def on_test_epoch_end(self, trainer, pl_module):
        if self._active(trainer):
            self._finish()

    def _finish(self) -> None:
        # every rank computes every metric in the same order (LabelMAP gathers across ranks)
        self.nofp = float(self.metrics["nofp"].compute())
        self.curves = {}
        for i, run in enumerate(self.runs):
            for f in run.fractions:
                self.curves[(i, f)] = [float(self.metrics[self._key(i, f, t)].compute())
                                       for t in range(run.setting.iterations)]
        self.seconds = time.perf_counter() - self._t0


# ---------------------------------------------------------------------------------------
# The Table 2 protocol
# ---------------------------------------------------------------------------------------

def parse_column(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"lf:conv40"`` -> ``("lf", ("conv40",))``; several pivots: ``"rf:conv22+conv40"``."""
    method, sep, layers = spec.partition(":")
    if not sep or method.lower() not in ("lf", "rf") or not layers:
        raise ValueError(f"a Table 2 column is METHOD:LAYERS such as lf:conv40 or rf:conv22, got {spec!r}")
    return method.lower(), tuple(layers.split("+"))


def _run_split(cli, cb: TextEvidenceCallback, split: str, limit_batches: Optional[int] = None) -> TextEvidenceCallback:
    trainer = cli.trainer
    trainer.callbacks.append(cb)
    saved = trainer.limit_val_batches
    try:
        if limit_batches is not None:
            trainer.limit_val_batches = limit_batches  # the selection only; the test split is always whole
        fn = trainer.validate if split == "val" else trainer.test
        fn(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    finally:
        trainer.callbacks.remove(cb)
        trainer.limit_val_batches = saved
    return cb


def run_table2(cli, cfg) -> dict:
    """Table 2 (§4.3): caption-noun mAP on test for each text fraction and column, lr and T chosen on val."""
    from topdown.evidence import best_iteration, fmt, text_table, write_csv
    from topdown.layers import resolve_layers
    from topdown.news import plot_text_fraction, row_name

    t_start = time.perf_counter()
    dm, out = cli.datamodule, Path(cli.run_dir)
    net = getattr(cli.model, "net", cli.model)
    fractions = sorted({check_fraction(f) for f in cfg.fractions})
    columns = [parse_column(c) for c in cfg.columns]
    for _, layers in columns:
        resolve_layers(net, list(layers))  # a bad name is an error naming it, before any evaluation
    if not cfg.lr_grid:
        raise ValueError("--table2.lr_grid needs at least one update rate")
    text = [f for f in fractions if f > 0]
    rank0 = cli.trainer.is_global_zero and os.environ.get("LOCAL_RANK", "0") == "0"
    dm.prepare_data()

    # 1. every (column, lr) on val with T = steps; the per-iteration records give every T <= steps
    grid = [TextRun(FeedbackSetting(m, layers, lr, cfg.steps), tuple(text)) for m, layers in columns for lr in cfg.lr_grid]
    kw = dict(absent=cfg.absent, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, max_samples=cfg.max_samples)
    val = _run_split(cli, TextEvidenceCallback(grid, {f: dm.prefix_labels("val", f) for f in text}, "val", **kw), "val",
                     cfg.val_batches)

    # 2. the best (lr, T) of each cell on val
    chosen: dict[tuple[str, float], dict] = {}
    for i, run in enumerate(grid):
        s = run.setting
        for f in text:
            t, v = best_iteration(val.curves[(i, f)])
            best = chosen.get((s.name, f))
            if best is None or v > best["val_map"] + 1e-12:
                chosen[(s.name, f)] = {"column": s.name, "method": s.method, "layers": s.layer_name, "fraction": f,
                                       "lr": s.lr, "T": t, "val_map": v, "val_map_nofp": val.nofp}

    # 3. the chosen cells on test
    runs = [TextRun(FeedbackSetting(c["method"], tuple(c["layers"].split("+")), c["lr"], c["T"]), (c["fraction"],))
            for c in chosen.values()]
    test = _run_split(cli, TextEvidenceCallback(runs, {f: dm.prefix_labels("test", f) for f in text}, "test", **kw), "test")
    for i, c in enumerate(chosen.values()):
        c["test_map"] = test.curves[(i, c["fraction"])][-1]
        c["test_map_nofp"] = test.nofp

    names = [FeedbackSetting(m, layers).name for m, layers in columns]
    cells = {(c["column"], c["fraction"]): c for c in chosen.values()}
    rows, csv_rows = [], []
    for f in fractions:
        vals = [test.nofp if f == 0 else cells[(n, f)]["test_map"] for n in names]
        rows.append([row_name(f)] + [fmt(v) for v in vals])
        for n, v in zip(names, vals):
            c = cells.get((n, f), {})
            csv_rows.append({"row": row_name(f), "fraction": f, "column": n, "test_map": v,
                             "lr": c.get("lr"), "T": c.get("T", 0), "val_map": c.get("val_map", val.nofp),
                             "test_map_nofp": test.nofp, "absent": cfg.absent})
    seconds = {"val": round(val.seconds, 1), "test": round(test.seconds, 1)}
    title = (f"Table 2 layout: caption-noun mAP (%) on test, {len(dm.caption_vocabulary)} caption nouns, "
             f"{len(dm.article_vocabulary)} article nouns; lr and T <= {cfg.steps} chosen on val per cell "
             f"(lr grid {list(cfg.lr_grid)}{'' if cfg.val_batches is None else f', first {cfg.val_batches} val batches'}); "
             f"absent nouns: {cfg.absent}")
    table_text = text_table([""] + names, rows, title)
    files: list[Path] = []
    result = {"table": table_text, "rows": csv_rows, "chosen": list(chosen.values()), "nofp": test.nofp,
              "val_nofp": val.nofp, "seconds": seconds, "files": files}
    if rank0:
        files.append(write_csv(out / "table2.csv", csv_rows))
        files.append(write_csv(out / "table2_chosen.csv", list(chosen.values())))
        files.append(write_csv(out / "table2_val_grid.csv", [
            {"column": run.setting.name, "lr": run.setting.lr, "fraction": f, "iteration": t, "val_map": v}
            for i, run in enumerate(grid) for f in text for t, v in enumerate(val.curves[(i, f)])]))
        series = {n: [(f, test.nofp if f == 0 else cells[(n, f)]["test_map"]) for f in fractions] for n in names}
        files.append(plot_text_fraction(out / "table2.png", series, "caption-noun mAP against article text (test)"))
        t_fig = time.perf_counter()
        figs = figure6(cli, cfg, cells, names[0], out) if cfg.figure6_images > 0 and 1.0 in text else []
        files += figs
        seconds["figure6"] = round(time.perf_counter() - t_fig, 1)
        seconds["total"] = round(time.perf_counter() - t_start, 1)
        (out / "table2.txt").write_text(table_text + "\n")
        files.append(out / "table2.txt")
        print("\n" + table_text + f"\n(val {seconds['val']} s, test {seconds['test']} s; files in {out})\n")
        items = {"table2/table": table(csv_rows), "table2/chosen": table(list(chosen.values())),
                 "table2/plot": image(out / "table2.png")}
        items.update({f"table2/{p.stem}": image(p) for p in figs if p.suffix == ".png"})
        log_wandb(cli.trainer, items)
    return result


# ---------------------------------------------------------------------------------------
# Figure 6
# ---------------------------------------------------------------------------------------

def figure6(cli, cfg, cells: dict, column: str, out: Path, top: int = 8) -> list[Path]:
    """Top caption nouns without and with feedback-prop (``column`` at 100 % text, its chosen lr and T)
    for the first ``cfg.figure6_images`` test images that have article evidence; PNG and HTML."""
    from datamodules.common import IMAGENET_MEAN, IMAGENET_STD
    from topdown.news import figure6_html, figure6_png

    dm = cli.datamodule
    c = cells[(column, 1.0)]
    net = getattr(cli.model, "net", cli.model)
    ds = dm.dataset("test")
    evidence = dm.prefix_labels("test", 1.0)
    cap_vocab, art_vocab = dm.caption_vocabulary, dm.article_vocabulary
    picks = []
    for i in range(len(ds)):
        if len(picks) == cfg.figure6_images:
            break
        if evidence[i].any():
            item = ds[i]
            if bool(item["valid"]):
                picks.append((i, item))
    if not picks:
        return []
    device = cli.model.device
    x = torch.stack([it["image"] for _, it in picks]).to(device)
    rows = torch.tensor([i for i, _ in picks])
    mask, value = known_evidence(torch.from_numpy(evidence)[rows], 1.0, cfg.absent)
    net.eval()
    with torch.no_grad():
        before = torch.sigmoid(net(x)[CAPTION].float()).cpu()
    after = before
    if c["T"] > 0:
        out_fp = feedback_prop(net, x, multilabel_known_loss(mask.to(device), value.to(device), key=ARTICLE),
                               c["layers"].split("+"), method=c["method"], steps=c["T"], lr=c["lr"],
                               optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)
        after = torch.sigmoid(out_fp[CAPTION].float()).cpu()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    keys = dm.split_keys("test")
    examples = []
    for j, (i, it) in enumerate(picks):
        pixels = ((it["image"] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        truth = [cap_vocab[k] for k in torch.nonzero(it["caption_labels"]).flatten().tolist()]
        topb, topa = before[j].topk(min(top, len(cap_vocab))), after[j].topk(min(top, len(cap_vocab)))
        examples.append({"image": pixels, "key": keys[i], "truth": truth,
                         "before": [(cap_vocab[int(k)], float(s)) for s, k in zip(*topb)],
                         "after": [(cap_vocab[int(k)], float(s)) for s, k in zip(*topa)],
                         "evidence": [art_vocab[k] for k in np.flatnonzero(evidence[i])]})
    title = f"{column} with all article text (lr {c['lr']:g}, T {c['T']}); true labels in capitals"
    return [figure6_png(out / "figure6.png", examples, title), figure6_html(out / "figure6.html", examples, title)]
