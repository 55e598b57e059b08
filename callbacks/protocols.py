"""The feedback-prop evaluation protocols of the paper, run through a Trainer and FeedbackPropCallback.

* ``single``: one method (or both) at given pivots and a given λ and T, random known-label draws.
* ``sweep``: Figure 4 (§4.1): unknown-label mAP against the number of known labels.
* ``layers``: §5, Tables 3-5: LF and RF at each candidate pivot, all complement labels known;
  λ and T chosen per cell on val, the test figure reported.
* ``select``: §4.1: λ and T chosen on val, then applied on test.

Nothing is chosen on a test split: λ and T come from validation curves
(:func:`topdown.evidence.select_setting`), and a chosen iteration t is applied as exactly that
computation (:meth:`FeedbackSetting.at`: LF with several pivots is stopped at t of the same
schedule).

The evidence follows the model: a multi-label model gets known/unknown labels
(:class:`~topdown.evidence.MultiLabelEvidence`), the hierarchical scene model the true coarse
categories (:class:`~topdown.evidence.CoarseLabelEvidence`, Table 1).  A split is evaluated in
as many passes as its metric state needs to stay under ``--feedback.max_state_gb``
(:func:`topdown.evidence.plan_passes`).

``evaluate.py --feedback.protocol NAME`` calls :data:`PROTOCOL_RUNNERS`; docs/FEEDBACK.md
lists the flags and outputs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# ---------------------------------------------------------------------------------------
# Shared pieces of the protocols
# ---------------------------------------------------------------------------------------


@dataclass
class Result:
    """The merged records of one split (all passes): ``records``, ``summary``, ``skipped``."""

    stage: str
    settings: list
    records: list[dict]
    summary: list[dict]
    skipped: int
    passes: int = 1
    files: list[Path] = field(default_factory=list)
    amount: str = "num_known"  # the evidence's amount column (Evidence.amount)

    def row(self, setting, at=None) -> dict:
        """The summary row of ``setting`` (with ``at`` as its amount of evidence, when given)."""
        for r in self.summary:
            if (r["setting"], r["lr"], r["steps"], r.get("stop")) == (setting.name, setting.lr, setting.steps,
                                                                     setting.stop) \
                    and (at is None or r[self.amount] == at):
                return r
        raise KeyError(f"no result for {setting.name} (lr={setting.lr}, steps={setting.steps}, {self.amount}={at})")


class _Protocol:
    """What every protocol needs: the evidence, the settings, running a split in passes, outputs.

    ``fb``: the evaluation options (``--feedback.*``: optimizer, weight_decay, max_samples,
    max_state_gb, iterations, select_by, and the label-split ones).  ``evidence``: given by a
    protocol of its own (the news task's text evidence, ``callbacks/news.py``); default: the
    model's (coarse labels for the hierarchical model, what a model's ``feedback_evidence(fb, out_dir)``
    returns (captioning: ``topdown.captions.CaptionEvidence``), else known/unknown labels).
    """

    def __init__(self, cli, fb, name: str, evidence=None):
        from topdown.evidence import CoarseLabelEvidence, unknown_labels

        self.cli, self.fb, self.name = cli, fb, name
        self.out = Path(cli.run_dir)
        self.model = cli.model
        self.net = getattr(cli.model, "net", cli.model)
        self.hparams = getattr(cli.model, "hparams", {})
        self.files: list[Path] = []
        self.unknown = self.unknown_file = None
        if evidence is not None:
            self.evidence = evidence
            return
        if hasattr(cli.model, "fine_to_coarse"):  # hierarchical scenes: the coarse categories are known (§4.2)
            self.evidence = CoarseLabelEvidence(self.hparams["num_classes"], self.hparams["num_coarse"])
            return
        if callable(getattr(cli.model, "feedback_evidence", None)):  # the model names its evidence (captions, §4.4)
            self.evidence = cli.model.feedback_evidence(fb, self.out)
            return
        dm = cli.datamodule
        self.vocabulary = list(getattr(dm, "vocabulary", None) or [])
        if not self.vocabulary:
            raise ValueError(f"feedback-prop evaluation needs a multi-label datamodule with a vocabulary or a model "
                             f"with a scene hierarchy; {type(dm).__name__} / {type(cli.model).__name__} have neither")
        self.num_labels = len(self.vocabulary)
        path = Path(fb.unknown_file) if fb.unknown_file else self.default_unknown_file(dm, fb.num_unknown)
        self.unknown, created = unknown_labels(path, self.vocabulary, fb.num_unknown, fb.seed)
        self.unknown_file = path
        if self.rank0:
            if path.resolve() != (self.out / "unknown_labels.txt").resolve():
                shutil.copyfile(path, self.out / "unknown_labels.txt")  # the split beside the results
            print(f"[feedback] {'saved new' if created else 'reusing'} unknown labels: {path} "
                  f"({len(self.unknown)} of {self.num_labels})")
        self.evidence = None  # built per protocol, with its draws

    @property
    def rank0(self) -> bool:
        # asked each time: under DDP the ranks are only known once the strategy is set up
        return self.cli.trainer.is_global_zero and os.environ.get("LOCAL_RANK", "0") == "0"

    @property
    def multilabel(self) -> bool:
        return self.unknown is not None

    def default_unknown_file(self, dm, num_unknown: Optional[int]) -> Path:
        k = num_unknown if num_unknown is not None else self.num_labels // 2
        if hasattr(dm, "vocab_path"):
            vocab = Path(dm.vocab_path())
            return vocab.with_name(f"{vocab.stem}.unknown{k}.txt")
        return self.out / f"unknown{k}_of_{self.num_labels}.txt"

    def with_counts(self, counts: Optional[list[int]]):
        """The evidence of this protocol: ``counts`` known labels, ``--feedback.draws`` draws each."""
        from topdown.evidence import MultiLabelEvidence, known_label_draws

        if not self.multilabel:
            if counts is not None:
                raise ValueError("--feedback.num_known applies to multi-label models; the hierarchical model's "
                                 "evidence is its coarse categories")
            return self.evidence
        draws = known_label_draws(self.unknown, self.num_labels, counts, self.fb.draws, self.fb.seed)
        self.evidence = MultiLabelEvidence(self.unknown, draws, self.num_labels)
        return self.evidence

    def methods(self, default: str = "rf") -> list[str]:
        m = self.fb.method or default
        return ["lf", "rf"] if m == "both" else [m]

    def check_layers(self, names: list[str]) -> None:
        from topdown.layers import resolve_layers

        resolve_layers(self.net, names)  # a bad name is an error naming it, before any evaluation

    def default_layers(self) -> Optional[list[str]]:
        layers = self.fb.layers or self.hparams.get("feedback_layers")
        return list(layers) if layers else None

    def pivot_sets(self, defaults: Optional[dict] = None) -> list[tuple[str, ...]]:
        if self.fb.candidates:
            sets = [(c,) for c in self.fb.candidates]
        elif self.default_layers():
            sets = [tuple(self.default_layers())]
        elif defaults and self.hparams.get("backbone") in defaults:
            sets = [(c,) for c in defaults[self.hparams["backbone"]]]
        else:
            raise ValueError(f"feedback protocol {self.name!r} needs --feedback.layers or --feedback.candidates")
        for s in sets:
            self.check_layers(list(s))
        return sets

    def counts(self, allow_list: bool) -> Optional[list[int]]:
        k = self.fb.num_known
        if k is None:
            return None
        ks = [k] if isinstance(k, int) else list(k)
        if not allow_list and len(ks) > 1:
            raise ValueError(f"--feedback.num_known: protocol {self.name!r} takes one count, got {ks}")
        return ks

    def split(self) -> str:
        return self.fb.split or "test"

    def no_split(self) -> None:
        if self.fb.split:
            raise ValueError(f"feedback protocol {self.name!r} chooses λ and T on val and reports test; "
                             "--feedback.split does not apply to it")

    def split_size(self, split: str) -> int:
        """Samples the split will feed (an upper bound: invalid images are dropped later)."""
        dm, trainer = self.cli.datamodule, self.cli.trainer
        dm.setup("test" if split == "test" else "validate")
        loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
        n = len(loader.dataset)
        limit = trainer.limit_test_batches if split == "test" else trainer.limit_val_batches
        if isinstance(limit, int) and loader.batch_size:
            n = min(n, limit * loader.batch_size)
        elif isinstance(limit, float) and limit < 1.0:
            n = min(n, math.ceil(n * limit))
        return n

    def run(self, settings, split: str, tag: str, keep: Optional[str] = None,
            draws: Optional[list[list[int]]] = None) -> Result:
        """Evaluate ``settings`` x the evidence's draws on ``split``, in passes that fit the state budget;
        write ``fp_<tag>_iterations.csv`` / ``_summary.csv`` and log the merged figures.

        ``draws``: per setting, the indices of the draws it runs with (default: all of them), for a
        choice made per draw (Table 2 chooses λ and T per text fraction)."""
        from callbacks.feedback import (FeedbackPropCallback, log_metrics, log_wandb, plan_evaluation, result_metrics,
                                        table)
        from topdown.evidence import plain_rows, summarize, write_csv

        ev, fb, trainer = self.evidence, self.fb, self.cli.trainer
        keep = keep or fb.iterations
        groups: dict[tuple[int, ...], list] = {}  # the settings that run with the same draws run together
        for i, s in enumerate(settings):
            groups.setdefault(tuple(range(len(ev.draws))) if draws is None else tuple(draws[i]), []).append(s)
        n, work = self.split_size(split), []
        for d_idx, group in groups.items():  # every plan before any work: a unit that cannot fit fails first
            sub = ev.with_draws(list(d_idx))
            work.append((group, sub, plan_evaluation(sub, group, keep, n, fb.max_state_gb)))
        passes_run = sum(len(passes) for _, _, passes in work)
        if passes_run > len(groups) and self.rank0:
            print(f"[feedback] {split}: {len(settings)} setting(s) x {len(ev.draws)} draw(s) in {passes_run} passes "
                  f"to keep the metric state under {fb.max_state_gb:g} GB")
        records, skipped = [], 0
        for group, sub, passes in work:
            for s_idx, d_idx in passes:
                cb = FeedbackPropCallback([group[i] for i in s_idx], evidence=sub.with_draws(d_idx), stage=split,
                                          optimizer=fb.optimizer, weight_decay=fb.weight_decay,
                                          max_samples=fb.max_samples, keep=keep, max_state_gb=None, log=False)
                trainer.callbacks.append(cb)
                try:
                    fn = trainer.test if split == "test" else trainer.validate
                    fn(self.cli.model, datamodule=self.cli.datamodule, ckpt_path=self.cli.config.ckpt_path)
                finally:
                    trainer.callbacks.remove(cb)
                records += cb.records
                skipped = cb.skipped
        result = Result(split, list(settings), records, summarize(records, ev.metrics, ev.amount), skipped,
                        passes_run, amount=ev.amount)
        prefix = "fp" if split == "test" else "fp_val"
        log_metrics(trainer, result_metrics(result.summary, ev.metrics, prefix, skipped, ev.amount))
        files = [self.out / f"fp_{tag}_iterations.csv", self.out / f"fp_{tag}_summary.csv"]
        if self.rank0:
            write_csv(files[0], records)
            write_csv(files[1], plain_rows(result.summary))
            log_wandb(trainer, {f"fp/{tag}_iterations": table(records), f"fp/{tag}_summary": table(plain_rows(result.summary))})
            if skipped:
                print(f"[feedback] {split}: {skipped} missing or corrupt images skipped (logged as {prefix}/skipped)")
        self.files += files
        return result

    def show(self, value: float, std: Optional[float] = None) -> str:
        """A figure as printed (percent), ``±std`` when given."""
        from topdown.evidence import fmt

        return fmt(value, std, scale=self.evidence.scale)

    def cell(self, row: dict, m: str) -> str:
        return self.show(row[m], row[f"{m}_std"])

    def iteration_plot(self, res: Result, tag: str, num_known: Optional[int] = None) -> Optional[Path]:
        """Primary figure against iteration t, when every iteration was kept."""
        from topdown.evidence import plot_iterations

        m0 = self.evidence.metrics[0]
        series = {}
        for row in res.summary:
            if len(row["curve_t"]) <= 2 or (num_known is not None and row["num_known"] != num_known):
                continue
            label = f"{row['setting']} lr={row['lr']:g}"
            if len({r['num_known'] for r in res.summary}) > 1 and num_known is None:
                label += f" k={row['num_known']}"
            series[label] = [self.evidence.scale / 100 * v for v in row["curves"][m0]]
        if not series:
            return None
        return plot_iterations(self.out / f"fp_{tag}_iterations.png", series,
                               ylabel=f"{self.evidence.headers.get(m0, m0)} (%)",
                               title=f"feedback-prop on {res.stage}: {m0} per iteration")

    def val_curves(self, res: Result, settings, at=None) -> dict:
        """``{setting: {t: criterion tuple}}`` of the mean validation curves (at amount ``at``)."""
        crit = list(self.fb.select_by or self.evidence.criterion)
        unknown = [c for c in crit if c not in self.evidence.metrics]
        if unknown:
            raise ValueError(f"--feedback.select_by {unknown}: not a figure of this evaluation; choose from "
                             f"{list(self.evidence.metrics)}")
        curves = {}
        for s in settings:
            row = res.row(s, at)
            curves[s] = {t: tuple(row["curves"][c][i] for c in crit) for i, t in enumerate(row["curve_t"])}
        return curves

    def finish(self, table: str, images: list[Optional[Path]], extra: Optional[dict] = None) -> dict:
        from callbacks.feedback import image, log_wandb

        images = [p for p in images if p is not None]
        path = self.out / f"fp_{self.name}_table.txt"
        if self.rank0:
            print("\n" + table + "\n")
            path.write_text(table + "\n")
            log_wandb(self.cli.trainer, {f"fp/{self.name}_{p.stem}": image(p) for p in images})
        self.files += [path, *images]
        return {"protocol": self.name, "table": table, "files": self.files, "unknown": self.unknown,
                "unknown_file": self.unknown_file, **(extra or {})}


def _settings(methods, pivot_sets, lrs, steps):
    from callbacks.feedback import FeedbackSetting

    return [FeedbackSetting(m, p, lr, steps) for p in pivot_sets for m in methods for lr in lrs]


def _choose(p: _Protocol, val: Result, groups: dict, at: Optional[dict] = None) -> list[dict]:
    """Per group of val settings (one per λ), the (λ, t) of :func:`select_setting` and the setting
    that applies it; ``groups`` maps a group key to its settings, ``at`` (optional) a group key to
    the amount of evidence its curves are read at (one draw's records, e.g. a text fraction)."""
    from topdown.evidence import select_setting

    m0 = p.evidence.metrics[0]
    chosen = []
    for key, settings in groups.items():
        amount = None if at is None else at[key]
        pick = select_setting(p.val_curves(val, settings, amount))
        setting, t = pick.key, pick.iteration
        row = val.row(setting, amount)
        i = row["curve_t"].index(t)
        c = {} if amount is None else {val.amount: amount}
        c.update({"method": setting.method, "layers": setting.layer_name, "lr": setting.lr, "iteration": t,
                  "apply": setting.at(t)})
        c["steps"], c["stop"] = c["apply"].steps, c["apply"].stop
        for m in p.evidence.metrics:
            c[f"val_{m}"] = row["curves"][m][i]
        c[f"val_{m0}_nofp"] = row[f"{m0}_nofp"]
        chosen.append(c)
    return chosen


def _with_test(p: _Protocol, chosen: list[dict], test: Result) -> None:
    for c in chosen:
        r = test.row(c["apply"], c.get(test.amount))  # a choice made at one amount of evidence is read there
        for m in p.evidence.metrics:
            c[f"test_{m}"], c[f"test_{m}_std"], c[f"test_{m}_nofp"] = r[m], r[f"{m}_std"], r[f"{m}_nofp"]


def _steps_text(c: dict) -> str:
    """T as applied: ``12`` or, for LF stopped inside its schedule, ``t=12 (10/pivot)``."""
    return str(c["steps"]) if c["stop"] is None else f"t={c['iteration']} ({c['steps']}/pivot)"


# ---------------------------------------------------------------------------------------
# The protocols
# ---------------------------------------------------------------------------------------

def run_single(cli, fb) -> dict:
    """One feedback-prop configuration (or LF and RF) with one amount of known labels."""
    from topdown.evidence import text_table

    p = _Protocol(cli, fb, "single")
    layers = p.default_layers()
    if not layers:
        raise ValueError("feedback protocol 'single' needs --feedback.layers, e.g. '[conv13]'")
    p.check_layers(layers)
    ev = p.with_counts(p.counts(allow_list=True))
    settings = _settings(p.methods(), [tuple(layers)], [fb.lr], fb.steps)
    split = p.split()
    res = p.run(settings, split, f"single_{split}")
    ms = ev.metrics
    first = res.summary[0]
    known = ["known"] if p.multilabel else []
    # no-fp: the known-label figure depends on the draw, so only the first figure has one value
    nofp = [p.show(first[f"{m}_nofp"]) if i == 0 or not known else "" for i, m in enumerate(ms)]
    rows = [["no-fp"] + [""] * len(known) + nofp]
    for r in res.summary:
        rows.append([r["setting"]] + ([str(r["num_known"])] if known else []) + [p.cell(r, m) for m in ms])
    table = text_table([""] + known + [ev.headers.get(m, m) for m in ms], rows,
                       f"feedback-prop on {split} (T={fb.steps}, lr={fb.lr:g}"
                       + (f", {len(p.unknown)} unknown labels, mean±std over draws)" if known
                          else f", {getattr(ev, 'known_text', 'coarse labels known')})"))
    images = [p.iteration_plot(res, f"single_{split}")] if p.rank0 else []
    return p.finish(table, images, {"callback": res})


def run_sweep(cli, fb) -> dict:
    """Figure 4: unknown-label mAP against the number of known labels, 5 draws per count."""
    from topdown.evidence import FIGURE4_LAYERS, complement, known_counts, plot_known_sweep, text_table

    p = _Protocol(cli, fb, "sweep")
    if not p.multilabel:
        raise ValueError("feedback protocol 'sweep' varies the number of known labels of a multi-label model")
    pool = len(complement(p.unknown, p.num_labels))
    counts = p.counts(allow_list=True) or known_counts(pool, 10)
    p.with_counts(counts)
    settings = _settings(p.methods(), p.pivot_sets(FIGURE4_LAYERS), [fb.lr], fb.steps)
    split = p.split()
    res = p.run(settings, split, f"sweep_{split}")
    nofp = res.summary[0]["map_unknown_nofp"]
    rows = [[str(k), p.show(nofp)] + [p.cell(res.row(s, k), "map_unknown") for s in settings]
            for k in sorted(set(counts))]
    table = text_table(["known", "no-fp"] + [s.name for s in settings], rows,
                       f"unknown-label mAP on {split} against the number of known labels "
                       f"(T={fb.steps}, lr={fb.lr:g}; mean±std over {fb.draws} draws)")
    images = []
    if p.rank0:
        series = {s.name: [(r["num_known"], r["map_unknown"], r["map_unknown_std"])
                           for r in res.summary if r["setting"] == s.name] for s in settings}
        images.append(plot_known_sweep(p.out / f"fp_sweep_{split}_known.png", series, nofp,
                                       title=f"feedback-prop, {len(p.unknown)} unknown labels"))
        images.append(p.iteration_plot(res, f"sweep_{split}", num_known=max(counts)))
    return p.finish(table, images, {"callback": res})


def run_layers(cli, fb) -> dict:
    """§5, Tables 3-5: LF and RF at each pivot layer alone, all complement labels known; λ and T of
    each cell chosen on val (§4.1), the cell's test figure reported."""
    from topdown.evidence import PAPER_LAYERS, layer_table, plot_layers, text_table

    p = _Protocol(cli, fb, "layers")
    p.no_split()
    candidates = list(fb.candidates or [])
    if not candidates:
        backbone = p.hparams.get("backbone")
        if backbone not in PAPER_LAYERS:
            raise ValueError(f"no paper layer list for backbone {backbone!r}; pass --feedback.candidates "
                             f"(paper lists exist for {sorted(PAPER_LAYERS)})")
        candidates = list(PAPER_LAYERS[backbone])
    for c in candidates:
        p.check_layers([c])
    methods = p.methods(default="both")
    ev = p.with_counts(p.counts(allow_list=False))
    m0 = ev.metrics[0]
    val_settings = _settings(methods, [(c,) for c in candidates], list(fb.lr_grid), fb.steps)
    val = p.run(val_settings, "val", "layers_val", keep="all")
    groups = {(c, m): [s for s in val_settings if s.layers == (c,) and s.method == m] for c in candidates for m in methods}
    chosen = _choose(p, val, groups)
    test = p.run([c["apply"] for c in chosen], "test", "layers_test", keep="last")
    _with_test(p, chosen, test)
    cells = {(c["layers"], c["method"]): (c[f"test_{m0}"], c[f"test_{m0}_std"]) for c in chosen}
    k = test.summary[0]["num_known"]
    nofp = test.summary[0][f"{m0}_nofp"]
    what = f"{k} known / {len(p.unknown)} unknown labels" if p.multilabel else getattr(ev, "known_text",
                                                                                      "coarse labels known")
    table = layer_table((nofp, None), cells, candidates, methods,
                        f"layer-wise analysis: {ev.headers.get(m0, m0)} on test, {what}; λ in {list(fb.lr_grid)} and "
                        f"T <= {fb.steps} chosen per cell on val", scale=ev.scale)
    choice = text_table(["", "method", "lr", "T", f"val {ev.headers.get(m0, m0)}"],
                        [[c["layers"], c["method"].upper(), f"{c['lr']:g}", _steps_text(c), p.show(c[f"val_{m0}"])]
                         for c in chosen],
                        f"chosen on val (no-fp {p.show(chosen[0][f'val_{m0}_nofp'])})")
    crit = list(fb.select_by or ev.criterion)
    best = max(chosen, key=lambda c: (tuple(c[f"val_{x}"] for x in crit), -c["iteration"]))  # on val only
    images = []
    if p.rank0:
        series = {m.upper(): [cells[(c, m)][0] * ev.scale / 100 for c in candidates] for m in methods}
        images.append(plot_layers(p.out / "fp_layers_test.png", candidates, series, nofp * ev.scale / 100,
                                  title="feedback-prop: which pivot layer? (λ, T chosen on val)"))
        images.append(p.iteration_plot(val, "layers_val"))
        _write_selection(p, chosen, "fp_layers_selection")
    return p.finish(table + "\n\n" + choice, images,
                    {"callback": test, "val_callback": val, "selection": _public(chosen),
                     "best": {"method": best["method"], "layer": best["layers"], "lr": best["lr"],
                              "iteration": best["iteration"], f"val_{m0}": best[f"val_{m0}"]}})


def run_select(cli, fb) -> dict:
    """§4.1: "We determine the update rate parameter and number of iterations using the
    validation split, and report results on the test split." One val pass over the λ grid
    with T = ``steps`` gives every t ≤ T; the best (λ, t) per method and pivots is then run on
    test as that same computation (LF with several pivots: the same schedule stopped at t).
    """
    from topdown.evidence import text_table

    p = _Protocol(cli, fb, "select")
    p.no_split()
    ev = p.with_counts(p.counts(allow_list=False))
    m0 = ev.metrics[0]
    pivots, methods = p.pivot_sets(), p.methods()
    val_settings = _settings(methods, pivots, sorted(fb.lr_grid), fb.steps)
    val = p.run(val_settings, "val", "select_val", keep="all")
    groups = {(piv, m): [s for s in val_settings if s.layers == piv and s.method == m] for piv in pivots for m in methods}
    val, extensions = _extend(p, val, groups, getattr(fb, "extend_grid", 0) or 0)
    chosen = _choose(p, val, groups)
    for c, settings in zip(chosen, groups.values()):
        c["grid"] = [s.lr for s in settings]
    test = p.run([c["apply"] for c in chosen], "test", "select_test", keep="last")
    _with_test(p, chosen, test)
    header = ["", "lr", "T"] + [f"val {ev.headers.get(m, m)}" for m in ev.metrics[:1]] + \
             [f"test {ev.headers.get(m, m)}" for m in ev.metrics]
    first = chosen[0]
    nofp = ["no-fp", "", "", p.show(first[f"val_{m0}_nofp"])]
    nofp += [p.show(first[f"test_{m}_nofp"]) if m == m0 or not p.multilabel else "" for m in ev.metrics]
    rows = [nofp] + [[f"{c['method'].upper()}-{c['layers']}", f"{c['lr']:g}", _steps_text(c), p.show(c[f"val_{m0}"])]
                     + [p.show(c[f"test_{m}"], c[f"test_{m}_std"]) for m in ev.metrics] for c in chosen]
    by = ", ".join(fb.select_by or ev.criterion)
    grids = "; ".join(f"{c['method'].upper()}-{c['layers']} lr grid {c['grid']}" for c in chosen) if extensions \
        else f"lr grid {sorted(fb.lr_grid)}"
    table = text_table(header, rows, f"lr and T chosen on val by {by} ({grids}, T <= {fb.steps}"
                                     f"{' per pivot' if 'lf' in methods else ''}), applied on test")
    images = []
    if p.rank0:
        _write_selection(p, chosen, "fp_selection")
        images = [p.iteration_plot(val, "select_val"), p.iteration_plot(test, "select_test")]
    p.files += [p.out / "fp_selection.csv", p.out / "fp_selection.json"]
    return p.finish(table, images, {"selection": _public(chosen), "val_callback": val, "callback": test,
                                    "extensions": extensions})


def _extend(p: _Protocol, val: Result, groups: dict, rounds: int) -> tuple[Result, int]:
    """Extend each group's λ grid beyond an edge that validation picks (:func:`topdown.evidence.extend_grid`),
    at most ``rounds`` times: the new λ run on val only, their curves join the others, and the
    choice is made on the extended grid.  ``groups`` is updated in place (each kept sorted by λ, so
    ties still go to the smaller λ).  Returns the merged val result and the rounds run."""
    from dataclasses import replace

    from topdown.evidence import extend_grid, select_setting

    for k in range(rounds):
        new: dict = {}
        for key, settings in groups.items():
            curves = p.val_curves(val, settings)
            best = {}
            for s in settings:
                try:
                    best[s.lr] = select_setting({s: curves[s]}).value
                except ValueError:  # no finite value at t >= 1
                    best[s.lr] = float("nan")
            new[key] = [replace(settings[0], lr=lr) for lr in extend_grid(best)]
        todo = [s for v in new.values() for s in v]
        if not todo:
            return val, k
        if p.rank0:
            print(f"[feedback] val picked an edge of the lr grid: extending it with "
                  + ", ".join(f"{s.name} lr={s.lr:g}" for s in todo))
        more = p.run(todo, "val", f"select_val_ext{k + 1}", keep="all")
        val = replace(val, settings=val.settings + more.settings, records=val.records + more.records,
                      summary=val.summary + more.summary, skipped=max(val.skipped, more.skipped),
                      passes=val.passes + more.passes, files=val.files + more.files)
        for key, v in new.items():
            groups[key] = sorted(groups[key] + v, key=lambda s: s.lr)
    return val, rounds


def _public(chosen: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "apply"} for c in chosen]


def _write_selection(p: _Protocol, chosen: list[dict], stem: str) -> None:
    from callbacks.feedback import log_wandb, table as wb_table
    from topdown.evidence import write_csv

    rows = _public(chosen)
    write_csv(p.out / f"{stem}.csv", rows)
    (p.out / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    log_wandb(p.cli.trainer, {f"fp/{stem.removeprefix('fp_')}": wb_table(rows)})


PROTOCOL_RUNNERS = {"single": run_single, "sweep": run_sweep, "layers": run_layers, "select": run_select}
