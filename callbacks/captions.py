"""Feedback-prop on captions (Wang et al., CVPR 2018, §4.4, Table 6): the object labels are the
known evidence, the caption is the unknown target.

For every batch, :class:`CaptionFeedbackCallback` runs :func:`topdown.feedback.feedback_prop` on
the captioning network with the true object labels as known outputs (binary cross-entropy on the
``objects`` head, all K labels known), records the trunk ``features`` after every iteration
``t = 0..T`` (t = 0 is the plain forward, the no-fp row) and decodes a caption from each with beam
search. At the end of the epoch the captions of all ranks are gathered (each image once) and every
(setting, t) is scored on the whole split: one PTB tokenizer call, one METEOR process.

:data:`PROTOCOL_RUNNERS` are the ``evaluate.py --feedback.protocol`` runners for this model (the
registry's ``extra["feedback_protocols"]``):

* ``single``: one method (or ``both``) at ``--feedback.layers`` on ``--feedback.split``;
* ``layers``: each candidate pivot alone, LF and RF;
* ``select``: Table 6. The rows (default: no-fp, LF-input, LF-conv10, LF-conv22, LF-conv40,
  LF-conv10,40, RF-conv10,40 on ResNet-50) get their update rate from ``--feedback.lr_grid`` and
  their T ≤ ``--feedback.steps`` on the validation split by CIDEr, and are then run on test.

docs/CAPTIONING.md lists the flags and the files written.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.feedback import FeedbackSetting, log_wandb, table, wandb_loggers
from topdown.captions import (METRICS, gather_rows, mention_scores, score_caption_sets, start_meteor,
                               write_coco_results)
from topdown.evidence import best_iteration, fmt, plot_iterations, text_table, write_csv
from topdown.feedback import feedback_prop, multilabel_known_loss
from topdown.layers import paper_layer_names, resolve_layers

TABLE6_COLUMNS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def row_name(method: str, layers: Sequence[str]) -> str:
    """Table 6's row names: ``LF-input``, ``LF-conv10``, ``RF-conv10,40``; other pivots joined by ``+``."""
    if len(layers) > 1 and all(name.startswith("conv") and name[4:].isdigit() for name in layers):
        pivots = "conv" + ",".join(name[4:] for name in layers)
    else:
        pivots = "+".join(layers)
    return f"{method.upper()}-{pivots}"


class CaptionFeedbackCallback(Callback):
    """Caption metrics per feedback-prop iteration, with the object labels known (§4.4).

    Args:
        settings: the configurations (method, pivots, λ, T), run on the same batches.
        stage: ``"test"`` (in ``trainer.test``) or ``"val"`` (in ``trainer.validate`` only).
        optimizer, weight_decay: the update rule of the pivots (reference code: Adam, 1e-4).
        max_samples: at most this many images per feedback-prop call.
        metrics: caption metrics per iteration (the selection on val only needs ``CIDEr``).
        out_dir, tag: where rank 0 writes ``fp_<tag>_iterations.csv``, ``fp_<tag>_summary.csv`` and
            the COCO results files ``captions_<tag>_<row>.json`` (no-fp and every setting at t = T).
        examples: captions of this many images (the first of the split) kept in ``examples``.

    After the epoch (the same on every rank): ``records``, one row per (setting, t) with the
    metrics and the mean known-object loss; ``summary``, one row per setting at t = T with the
    no-fp values beside; ``curves[setting.name, lr]`` = CIDEr per iteration; ``examples``.
    """

    def __init__(self, settings: FeedbackSetting | Sequence[FeedbackSetting], stage: Literal["test", "val"] = "test",
                 optimizer: str = "adam", weight_decay: float = 1e-4, max_samples: int = 256,
                 metrics: Sequence[str] = METRICS, out_dir: str | Path | None = None, tag: str | None = None,
                 log_prefix: str = "fp", examples: int = 0):
        super().__init__()
        self.settings = [settings] if isinstance(settings, FeedbackSetting) else list(settings)
        if not self.settings:
            raise ValueError("CaptionFeedbackCallback needs at least one FeedbackSetting")
        if stage not in ("test", "val"):
            raise ValueError(f"stage must be 'test' or 'val', got {stage!r}")
        bad = [m for m in metrics if m not in METRICS]
        if bad:
            raise ValueError(f"unknown caption metrics {bad}; choose from {METRICS}")
        self.stage, self.optimizer, self.weight_decay = stage, optimizer, weight_decay
        self.max_samples = max(1, int(max_samples))
        self.metrics = tuple(metrics)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.tag = tag or stage
        self.log_prefix = log_prefix
        self.num_examples = examples
        self.records: list[dict] = []
        self.summary: list[dict] = []
        self.curves: dict[tuple[str, float], list[float]] = {}
        self.examples: list[dict] = []
        self._index: list[torch.Tensor] = []
        self._tokens: list[list[torch.Tensor]] = []
        self._loss: list[list[torch.Tensor]] = []

    # ------------------------------------------------------------------ hooks
    def _active(self, trainer: Trainer) -> bool:
        if self.stage == "test":
            return trainer.testing
        return trainer.validating and not trainer.sanity_checking and trainer.state.fn == "validate"

    def _start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._index = []
        self._tokens = [[] for _ in self.settings]
        self._loss = [[] for _ in self.settings]
        if "METEOR" in self.metrics and trainer.is_global_zero:
            start_meteor()

    def on_test_epoch_start(self, trainer, pl_module):
        if self._active(trainer):
            self._start(trainer, pl_module)

    def on_validation_epoch_start(self, trainer, pl_module):
        if self._active(trainer):
            self._start(trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._active(trainer):
            self.evaluate_batch(pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self._active(trainer):
            self.evaluate_batch(pl_module, batch)

    def on_test_epoch_end(self, trainer, pl_module):
        if self._active(trainer):
            self._finish(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._active(trainer):
            self._finish(trainer, pl_module)

    # --------------------------------------------------------------- per batch
    def evaluate_batch(self, pl_module: LightningModule, batch: dict) -> None:
        """Feedback-prop and decoding of every setting on the valid rows of ``batch``."""
        net = pl_module.net
        beam, length = pl_module.hparams.beam_size, pl_module.hparams.max_decode_len
        with torch.inference_mode(False), torch.enable_grad():
            valid = batch["valid"]
            # copies: tensors made under inference mode cannot take part in autograd
            images, labels = batch["image"][valid].clone(), batch["labels"][valid].clone()
            index = batch["index"][valid].clone()
            if images.shape[0] == 0:
                return
            self._index.append(index)
            known = torch.arange(labels.shape[1], device=labels.device)
            for first in range(0, images.shape[0], self.max_samples):
                x, y = images[first:first + self.max_samples], labels[first:first + self.max_samples]
                for s, setting in enumerate(self.settings):
                    tokens, loss = self._run(net, setting, x, y, known, beam, length)
                    self._tokens[s].append(tokens)
                    self._loss[s].append(loss)

    def _run(self, net, setting: FeedbackSetting, x, y, known, beam: int, length: int):
        feats: list[Optional[torch.Tensor]] = [None] * setting.iterations
        loss: list[Optional[torch.Tensor]] = [None] * setting.iterations

        def record(t: int, outputs: dict) -> None:
            feats[t] = outputs["features"]
            loss[t] = F.binary_cross_entropy_with_logits(outputs["objects"].float(), y.float(),
                                                         reduction="none").mean(1)

        feedback_prop(net, x, multilabel_known_loss(known, y, key="objects"), list(setting.layers),
                      method=setting.method, steps=setting.steps, lr=setting.lr, optimizer=self.optimizer,
                      callback=record, weight_decay=self.weight_decay)
        missing = [t for t, v in enumerate(feats) if v is None]
        if missing:
            raise RuntimeError(f"feedback_prop reported no outputs for iterations {missing} of {setting.name}")
        with torch.no_grad():
            tokens = net.decode(torch.cat(feats), beam, length)  # all iterations in one batched search
        b = x.shape[0]
        return tokens.view(setting.iterations, b, length).transpose(0, 1), torch.stack(loss, 1)  # [b, I, L], [b, I]

    # ---------------------------------------------------------------- results
    def _gathered(self, pl_module, s: int, setting: FeedbackSetting):
        device, length = pl_module.device, pl_module.hparams.max_decode_len
        index = torch.cat(self._index) if self._index else torch.zeros(0, dtype=torch.long, device=device)
        tokens = (torch.cat(self._tokens[s]) if self._tokens[s]
                  else torch.zeros(0, setting.iterations, length, dtype=torch.long, device=device))
        loss = (torch.cat(self._loss[s]) if self._loss[s]
                else torch.zeros(0, setting.iterations, device=device))
        _, loss = gather_rows(index, loss)
        index, tokens = gather_rows(index, tokens)
        return index, tokens, loss

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm, split = trainer.datamodule, self.stage
        gathered = [self._gathered(pl_module, s, setting) for s, setting in enumerate(self.settings)]
        payload = None
        if trainer.is_global_zero:
            payload = self._score(dm, pl_module, split, gathered)
        payload = trainer.strategy.broadcast(payload, src=0)
        self.records, self.summary, self.examples = payload["records"], payload["summary"], payload["examples"]
        self.curves = {(r["setting"], r["lr"]): [x["CIDEr"] for x in self.records
                                                 if x["setting"] == r["setting"] and x["lr"] == r["lr"]
                                                 and x["steps"] == r["steps"]]
                       for r in self.summary} if "CIDEr" in self.metrics else {}
        self._index, self._tokens, self._loss = [], [], []
        self._log(trainer, pl_module)

    def _score(self, dm, pl_module, split: str, gathered) -> dict:
        refs_all = dm.split_references(split)
        index0 = gathered[0][0]
        ids = dm.split_image_ids(split)[index0.cpu().numpy()]
        refs = {int(i): refs_all[int(i)] for i in ids}
        decode = pl_module.vocab.decode
        sets, keys = [], []
        for s, (index, tokens, _) in enumerate(gathered):
            for t in range(tokens.shape[1]):
                sets.append({int(i): decode(tok) for i, tok in zip(ids, tokens[:, t].cpu())})
                keys.append((s, t))
        scores = dict(zip(keys, score_caption_sets(refs, sets, self.metrics))) if refs else {}
        captions = dict(zip(keys, sets))
        names = getattr(dm, "object_names", None)
        if names and refs:  # which objects the captions name, against the known labels
            labels = dm.split_labels(split)[index0.cpu().numpy()]
            for key, cands in captions.items():
                scores[key].update(mention_scores([cands[int(i)] for i in ids], labels, names))
        records, summary = [], []
        for s, setting in enumerate(self.settings):
            loss = gathered[s][2]
            last = setting.iterations - 1
            for t in range(setting.iterations):
                row = {"split": split, "setting": row_name(setting.method, setting.layers), "method": setting.method,
                       "layers": setting.layer_name, "lr": setting.lr, "steps": setting.steps, "iteration": t,
                       **scores.get((s, t), {}),
                       "object_loss": float(loss[:, t].mean()) if loss.numel() else float("nan")}
                records.append(row)
            final = records[-1]
            nofp = records[-setting.iterations]
            summary.append({**{k: final[k] for k in ("split", "setting", "method", "layers", "lr", "steps")},
                            **{m: final.get(m) for m in self.metrics},
                            **{f"{m}_nofp": nofp.get(m) for m in self.metrics},
                            **{f"{m}{sfx}": row.get(m) for m in ("mention_precision", "mention_recall")
                               for sfx, row in (("", final), ("_nofp", nofp)) if m in row},
                            "object_loss_nofp": nofp["object_loss"], "object_loss": final["object_loss"]})
        examples = []
        if self.num_examples and len(ids):
            paths = dm.split_paths(split)
            names = getattr(dm, "object_names", None)
            labels = dm.split_labels(split)
            for j in range(min(self.num_examples, len(ids))):
                row_i = int(index0[j])
                ex = {"image_id": int(ids[j]), "path": str(paths[row_i]),
                      "objects": ", ".join(names[k] for k in labels[row_i].nonzero()[0]) if names else "",
                      "references": refs[int(ids[j])], "no-fp": captions[(0, 0)][int(ids[j])]}
                for s, setting in enumerate(self.settings):
                    ex[f"{row_name(setting.method, setting.layers)} lr={setting.lr:g}"] = \
                        captions[(s, setting.iterations - 1)][int(ids[j])]
                examples.append(ex)
        if self.out_dir is not None:
            write_csv(self.out_dir / f"fp_{self.tag}_iterations.csv", records)
            write_csv(self.out_dir / f"fp_{self.tag}_summary.csv", summary)
            write_coco_results(self.out_dir / f"captions_{self.tag}_no-fp.json", captions[(0, 0)])
            for s, setting in enumerate(self.settings):
                name = row_name(setting.method, setting.layers).replace(",", "_")
                name += f"_lr{setting.lr:g}_T{setting.steps}" if len(self.settings) > 1 else ""
                write_coco_results(self.out_dir / f"captions_{self.tag}_{name}.json",
                                   captions[(s, setting.iterations - 1)])
        return {"records": records, "summary": summary, "examples": examples}

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        p = self.log_prefix
        metrics = {}
        for r in self.summary:
            key = f"{p}/{self.tag}/{r['setting']}" + (f"-lr{r['lr']:g}" if len(self.summary) > 1 else "")
            for m in self.metrics:
                metrics[f"{key}/{m}"] = r[m]
            metrics[f"{key}/object_loss"] = r["object_loss"]
        first = self.summary[0] if self.summary else {}
        for m in self.metrics:
            metrics[f"{p}/{self.tag}/no-fp/{m}"] = first.get(f"{m}_nofp")
        metrics[f"{p}/{self.tag}/no-fp/object_loss"] = first.get("object_loss_nofp")
        for k, v in metrics.items():
            if v is not None and not math.isnan(v):
                pl_module.log(k, v, sync_dist=False, rank_zero_only=False)  # already the same on every rank
        log_wandb(trainer, {f"{p}/{self.tag}_iterations": table(self.records),
                            f"{p}/{self.tag}_summary": table(self.summary)})


# ---------------------------------------------------------------------------------------
# The protocols of evaluate.py for this model
# ---------------------------------------------------------------------------------------

def table6_pivots(net) -> tuple[str, str, str]:
    """The paper names of the outputs of ``layer1``-``layer3`` of the trunk: conv10, conv22,
    conv40 on ResNet-50 (Table 6), conv5, conv9, conv13 on ResNet-18."""
    aliases = paper_layer_names(net)
    by_module = {module: name for name, module in aliases.items()}
    found = [by_module.get(m) for m in ("trunk.layer1", "trunk.layer2", "trunk.layer3")]
    if None in found:
        raise ValueError(f"Table 6's pivots are defined for ResNet trunks; pass --feedback.candidates for "
                         f"{type(net.trunk).__name__} (pivot names: {', '.join(aliases) or 'any module name'})")
    return tuple(found)


def table6_rows(net) -> list[tuple[str, tuple[str, ...]]]:
    """Table 6's rows after no-fp: LF at the image, at each of three stages, at the first and third
    together, and RF at the first and third together."""
    c10, c22, c40 = table6_pivots(net)
    return [("lf", ("input",)), ("lf", (c10,)), ("lf", (c22,)), ("lf", (c40,)), ("lf", (c10, c40)),
            ("rf", (c10, c40))]


class _CaptionProtocol:
    """What the caption protocols share: checks, rows, running a split, the outputs."""

    def __init__(self, cli, fb, name: str):
        self.cli, self.fb, self.name = cli, fb, name
        self.out = Path(cli.run_dir)
        unused = [f"--feedback.{k}" for k in ("unknown_file", "num_unknown", "num_known") if fb.get(k) is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)} do not apply to the captioning model: all of its object labels "
                             "are the known evidence and the caption is the unknown target (§4.4)")
        self.net = cli.model.net
        self.files: list[Path] = []

    @property
    def rank0(self) -> bool:
        return self.cli.trainer.is_global_zero and os.environ.get("LOCAL_RANK", "0") == "0"

    def methods(self, default: str) -> list[str]:
        m = self.fb.method or default
        return ["lf", "rf"] if m == "both" else [m]

    def pivot_sets(self) -> list[tuple[str, ...]]:
        """``--feedback.candidates`` (each a pivot, or pivots joined by ``+``), then ``--feedback.layers``."""
        sets = [tuple(c.split("+")) for c in (self.fb.candidates or [])]
        if self.fb.layers:
            sets.append(tuple(self.fb.layers))
        for s in sets:
            resolve_layers(self.net, list(s))  # a bad name is an error naming it, before any work
        return sets

    def run(self, settings: list[FeedbackSetting], split: str, tag: str, metrics=METRICS,
            examples: int = 0) -> CaptionFeedbackCallback:
        cb = CaptionFeedbackCallback(settings, stage=split, optimizer=self.fb.optimizer,
                                     weight_decay=self.fb.weight_decay, max_samples=self.fb.max_samples,
                                     metrics=metrics, out_dir=self.out, tag=tag, examples=examples)
        trainer = self.cli.trainer
        trainer.callbacks.append(cb)
        try:
            fn = trainer.test if split == "test" else trainer.validate
            fn(self.cli.model, datamodule=self.cli.datamodule, ckpt_path=self.cli.config.ckpt_path)
        finally:
            trainer.callbacks.remove(cb)
        self.files += [self.out / f"fp_{tag}_iterations.csv", self.out / f"fp_{tag}_summary.csv"]
        return cb

    def metric_table(self, cb: CaptionFeedbackCallback, title: str, extra: Optional[dict] = None) -> tuple[str, list]:
        """Table 6's layout: rows no-fp and the settings, columns BLEU-4, METEOR, ROUGE-L, CIDEr."""
        first = cb.summary[0]
        diag = [k for k in ("mention_precision", "mention_recall") if k in first]  # in the CSV, not the table
        rows = [{"row": "no-fp", **{m: first[f"{m}_nofp"] for m in TABLE6_COLUMNS + tuple(diag)}}]
        for r in cb.summary:
            rows.append({"row": r["setting"], **{m: r[m] for m in TABLE6_COLUMNS + tuple(diag)},
                         **(extra or {}).get(r["setting"], {})})
        cells = [[r["row"], fmt(r["BLEU-4"]), fmt(r["METEOR"]), f"{r['ROUGE-L']:.4f}", f"{r['CIDEr']:.4f}"]
                 for r in rows]
        return text_table(["", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"], cells, title), rows

    def finish(self, text: str, rows: list[dict], images: list[Path], cb: CaptionFeedbackCallback,
               extra: Optional[dict] = None) -> dict:
        from callbacks.feedback import image

        path = self.out / f"fp_{self.name}_table.txt"
        csv_path = self.out / f"fp_{self.name}_table.csv"
        if self.rank0:
            print("\n" + text + "\n")
            path.write_text(text + "\n")
            write_csv(csv_path, rows)
            log_wandb(self.cli.trainer, {f"fp/{self.name}_table": table(rows),
                                         **{f"fp/{self.name}_{p.stem}": image(p) for p in images}})
            log_examples(self.cli.trainer, f"fp/{self.name}_examples", cb.examples)
            if cb.examples:
                (self.out / f"fp_{self.name}_examples.json").write_text(json.dumps(cb.examples, indent=1) + "\n")
        self.files += [path, csv_path, *images]
        return {"protocol": self.name, "table": text, "rows": rows, "files": self.files, "callback": cb,
                **(extra or {})}


def log_examples(trainer: Trainer, key: str, examples: list[dict]) -> None:
    """A W&B table of a few images with their known objects, references and captions (rank 0)."""
    if not examples or not trainer.is_global_zero:
        return
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    cols = ["image"] + [c for c in examples[0] if c != "path"]
    data = [[wandb.Image(ex["path"])] + [" / ".join(ex[c]) if isinstance(ex[c], list) else ex[c] for c in cols[1:]]
            for ex in examples]
    for lg in loggers:
        lg.experiment.log({key: wandb.Table(columns=cols, data=data)})


def _curve_plot(p: _CaptionProtocol, curves: dict[str, list[float]], tag: str, split: str) -> Path:
    return plot_iterations(p.out / f"fp_{tag}_iterations.png", curves, ylabel="CIDEr x 100",
                           title=f"feedback-prop on captions, {split}: CIDEr per iteration")


def run_single(cli, fb) -> dict:
    """One configuration (or LF and RF) at ``--feedback.layers`` on ``--feedback.split``."""
    p = _CaptionProtocol(cli, fb, "single")
    if not fb.layers:
        raise ValueError("feedback protocol 'single' needs --feedback.layers, e.g. '[conv40]'")
    layers = tuple(fb.layers)
    resolve_layers(p.net, list(layers))
    settings = [FeedbackSetting(m, layers, fb.lr, fb.steps) for m in p.methods("rf")]
    tag = f"single_{fb.split}"
    cb = p.run(settings, fb.split, tag, examples=8)
    text, rows = p.metric_table(cb, f"feedback-prop on captions, {fb.split} (object labels known, T={fb.steps}, "
                                    f"lr={fb.lr:g})")
    images = [_curve_plot(p, {r["setting"]: cb.curves[(r["setting"], r["lr"])] for r in cb.summary}, tag,
                          fb.split)] if p.rank0 else []
    return p.finish(text, rows, images, cb)


def run_layers(cli, fb) -> dict:
    """Each candidate pivot alone (default: input and Table 6's three stages), LF and RF."""
    p = _CaptionProtocol(cli, fb, "layers")
    sets = p.pivot_sets() if (fb.candidates or fb.layers) else [("input",)] + [(c,) for c in table6_pivots(p.net)]
    settings = [FeedbackSetting(m, s, fb.lr, fb.steps) for s in sets for m in p.methods("both")]
    tag = f"layers_{fb.split}"
    cb = p.run(settings, fb.split, tag, examples=8)
    text, rows = p.metric_table(cb, f"feedback-prop on captions by pivot, {fb.split} (T={fb.steps}, lr={fb.lr:g})")
    images = [_curve_plot(p, {r["setting"]: cb.curves[(r["setting"], r["lr"])] for r in cb.summary}, tag,
                          fb.split)] if p.rank0 else []
    return p.finish(text, rows, images, cb)


def run_select(cli, fb) -> dict:
    """Table 6: λ from ``--feedback.lr_grid`` and T ≤ ``--feedback.steps`` chosen on val by CIDEr
    (§4.1: "We determine the update rate parameter and number of iterations using the validation
    split"), then every row is run once on test with its choice."""
    p = _CaptionProtocol(cli, fb, "select")
    if fb.candidates or fb.layers:
        rows = [(m, s) for s in p.pivot_sets() for m in p.methods("rf")]
    else:
        rows = [(m, s) for m, s in table6_rows(p.net) if fb.method in (None, "both", m)]
    val = p.run([FeedbackSetting(m, s, lr, fb.steps) for m, s in rows for lr in fb.lr_grid], "val", "select_val",
                metrics=("CIDEr",))
    chosen = []
    for m, s in rows:
        name, every = row_name(m, s), len(s) if m == "lf" else 1  # LF: T counts per pivot (Algorithm 1)
        best = None
        for lr in fb.lr_grid:
            curve = val.curves[(name, lr)]
            t, v = best_iteration(curve, every)
            if best is None or v > best["val_CIDEr"] + 1e-12:
                best = {"row": name, "method": m, "layers": "+".join(s), "lr": lr, "steps": t // every,
                        "iteration": t, "val_CIDEr": v, "val_CIDEr_nofp": curve[0]}
        chosen.append(best)
    settings = [FeedbackSetting(c["method"], tuple(c["layers"].split("+")), c["lr"], c["steps"]) for c in chosen]
    test = p.run(settings, "test", "select_test", examples=6)
    by_row = {c["row"]: c for c in chosen}
    for r in test.summary:
        by_row[r["setting"]].update({f"test_{m}": r[m] for m in METRICS if m in r})
    text, table_rows = p.metric_table(
        test, f"Table 6 on test: captions with the object labels known (λ from {list(fb.lr_grid)} and "
              f"T <= {fb.steps} chosen on val by CIDEr)",
        extra={c["row"]: {"lr": c["lr"], "T": c["steps"], "val_CIDEr": c["val_CIDEr"]} for c in chosen})
    choice = text_table(["", "lr", "T", "val CIDEr", "val CIDEr no-fp"],
                        [[c["row"], f"{c['lr']:g}", str(c["steps"]), f"{c['val_CIDEr']:.4f}",
                          f"{c['val_CIDEr_nofp']:.4f}"] for c in chosen], "chosen on val")
    images = []
    if p.rank0:
        write_csv(p.out / "fp_selection.csv", chosen)
        (p.out / "fp_selection.json").write_text(json.dumps(chosen, indent=2) + "\n")
        best_val = {c["row"]: val.curves[(c["row"], c["lr"])] for c in chosen}
        images.append(_curve_plot(p, best_val, "select_val", "val (chosen λ)"))
        images.append(_curve_plot(p, {r["setting"]: test.curves[(r["setting"], r["lr"])] for r in test.summary},
                                  "select_test", "test"))
    p.files += [p.out / "fp_selection.csv", p.out / "fp_selection.json"]
    return p.finish(text + "\n\n" + choice, table_rows, images, test, {"selection": chosen, "val_callback": val})


def run_sweep(cli, fb) -> dict:
    raise ValueError("feedback protocol 'sweep' varies the number of known labels of a multi-label model; the "
                     "captioning model knows all of its object labels: use single, layers or select")


PROTOCOL_RUNNERS = {"single": run_single, "sweep": run_sweep, "layers": run_layers, "select": run_select}
