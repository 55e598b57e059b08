"""The feedback-prop evaluation protocols of the paper, run through a Trainer and FeedbackPropCallback.

* ``single``: one method (or both) at given pivots, random known-label draws.
* ``sweep``: Figure 4 (§4.1): unknown-label mAP against the number of known labels.
* ``layers``: §5, Tables 3-5: LF and RF at each candidate pivot, all complement labels known.
* ``select``: §4.1: the update rate and T chosen on val, then applied on test.

``evaluate.py --feedback.protocol NAME`` calls :data:`PROTOCOL_RUNNERS`; docs/FEEDBACK.md
lists the flags and outputs.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

# ---------------------------------------------------------------------------------------
# Shared pieces of the protocols
# ---------------------------------------------------------------------------------------

class _Protocol:
    """What every protocol needs: the label split, the settings, running a split, outputs."""

    def __init__(self, cli, fb, name: str):
        from topdown.evidence import unknown_labels

        self.cli, self.fb, self.name = cli, fb, name
        self.out = Path(cli.run_dir)
        dm = cli.datamodule
        self.vocabulary = list(getattr(dm, "vocabulary", None) or [])
        if not self.vocabulary:
            raise ValueError(f"feedback-prop evaluation needs a multi-label datamodule with a vocabulary; "
                             f"{type(dm).__name__} has none")
        self.num_labels = len(self.vocabulary)
        path = Path(fb.unknown_file) if fb.unknown_file else self.default_unknown_file(dm, fb.num_unknown)
        self.unknown, created = unknown_labels(path, self.vocabulary, fb.num_unknown, fb.seed)
        self.unknown_file = path
        if self.rank0:
            if path.resolve() != (self.out / "unknown_labels.txt").resolve():
                shutil.copyfile(path, self.out / "unknown_labels.txt")  # the split beside the results
            print(f"[feedback] {'saved new' if created else 'reusing'} unknown labels: {path} "
                  f"({len(self.unknown)} of {self.num_labels})")
        self.net = getattr(cli.model, "net", cli.model)
        self.files: list[Path] = []

    @property
    def rank0(self) -> bool:
        # asked each time: under DDP the ranks are only known once the strategy is set up
        return self.cli.trainer.is_global_zero and os.environ.get("LOCAL_RANK", "0") == "0"

    def default_unknown_file(self, dm, num_unknown: Optional[int]) -> Path:
        k = num_unknown if num_unknown is not None else self.num_labels // 2
        if hasattr(dm, "vocab_path"):
            vocab = Path(dm.vocab_path())
            return vocab.with_name(f"{vocab.stem}.unknown{k}.txt")
        return self.out / f"unknown{k}_of_{self.num_labels}.txt"

    def methods(self, default: str = "rf") -> list[str]:
        m = self.fb.method or default
        return ["lf", "rf"] if m == "both" else [m]

    def check_layers(self, names: list[str]) -> None:
        from topdown.layers import resolve_layers

        resolve_layers(self.net, names)  # a bad name is an error naming it, before any evaluation

    def pivot_sets(self, need: bool = True) -> list[tuple[str, ...]]:
        if self.fb.candidates:
            sets = [(c,) for c in self.fb.candidates]
        elif self.fb.layers:
            sets = [tuple(self.fb.layers)]
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

    def run(self, settings, draws, split: str, tag: str):
        from callbacks.feedback import FeedbackPropCallback

        cb = FeedbackPropCallback(settings, self.unknown, draws, stage=split, optimizer=self.fb.optimizer,
                                  weight_decay=self.fb.weight_decay, max_samples=self.fb.max_samples,
                                  out_dir=self.out, tag=tag)
        trainer = self.cli.trainer
        trainer.callbacks.append(cb)
        try:
            fn = trainer.test if split == "test" else trainer.validate
            fn(self.cli.model, datamodule=self.cli.datamodule, ckpt_path=self.cli.config.ckpt_path)
        finally:
            trainer.callbacks.remove(cb)
        self.files += [self.out / f"fp_{tag}_iterations.csv", self.out / f"fp_{tag}_summary.csv"]
        return cb

    def iteration_plot(self, cb, tag: str, num_known: Optional[int] = None) -> Path:
        from topdown.evidence import plot_iterations

        series = {}
        for row in cb.summary:
            if num_known is None or row["num_known"] == num_known:
                label = f"{row['setting']} lr={row['lr']:g}"
                if len({r['num_known'] for r in cb.summary}) > 1 and num_known is None:
                    label += f" k={row['num_known']}"
                series[label] = row["curve_unknown"]
        return plot_iterations(self.out / f"fp_{tag}_iterations.png", series,
                               title=f"feedback-prop on {cb.stage}: mAP per iteration")

    def finish(self, table: str, images: list[Path], extra: Optional[dict] = None) -> dict:
        from callbacks.feedback import image, log_wandb

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


# ---------------------------------------------------------------------------------------
# The protocols
# ---------------------------------------------------------------------------------------

def run_single(cli, fb) -> dict:
    """One feedback-prop configuration (or LF and RF) with one amount of known labels."""
    from topdown.evidence import fmt, known_label_draws, text_table

    p = _Protocol(cli, fb, "single")
    if not fb.layers:
        raise ValueError("feedback protocol 'single' needs --feedback.layers, e.g. '[conv13]'")
    p.check_layers(list(fb.layers))
    draws = known_label_draws(p.unknown, p.num_labels, p.counts(allow_list=True), fb.draws, fb.seed)
    settings = _settings(p.methods(), [tuple(fb.layers)], [fb.lr], fb.steps)
    cb = p.run(settings, draws, fb.split, f"single_{fb.split}")
    rows = [["no-fp", "", fmt(cb.summary[0]["map_unknown_nofp"]), ""]]
    for r in cb.summary:
        rows.append([r["setting"], str(r["num_known"]), fmt(r["map_unknown"], r["map_unknown_std"]),
                     fmt(r["map_known"], r["map_known_std"])])
    table = text_table(["", "known", "mAP unknown", "mAP known"], rows,
                       f"feedback-prop on {fb.split} (T={fb.steps}, lr={fb.lr:g}, {len(p.unknown)} unknown labels, "
                       f"mean±std over draws)")
    images = [p.iteration_plot(cb, f"single_{fb.split}")] if p.rank0 else []
    return p.finish(table, images, {"callback": cb})


def run_sweep(cli, fb) -> dict:
    """Figure 4: unknown-label mAP against the number of known labels, 5 draws per count."""
    from topdown.evidence import complement, fmt, known_counts, known_label_draws, plot_known_sweep, text_table

    p = _Protocol(cli, fb, "sweep")
    pool = len(complement(p.unknown, p.num_labels))
    counts = p.counts(allow_list=True) or known_counts(pool, 10)
    draws = known_label_draws(p.unknown, p.num_labels, counts, fb.draws, fb.seed)
    settings = _settings(p.methods(), p.pivot_sets(), [fb.lr], fb.steps)
    cb = p.run(settings, draws, fb.split, f"sweep_{fb.split}")
    nofp = cb.summary[0]["map_unknown_nofp"]
    by = {(r["setting"], r["num_known"]): r for r in cb.summary}
    rows = [[str(k), fmt(nofp)] + [fmt(by[(s.name, k)]["map_unknown"], by[(s.name, k)]["map_unknown_std"])
                                   for s in settings] for k in sorted(set(counts))]
    table = text_table(["known", "no-fp"] + [s.name for s in settings], rows,
                       f"unknown-label mAP on {fb.split} against the number of known labels "
                       f"(T={fb.steps}, lr={fb.lr:g}; mean±std over {fb.draws} draws)")
    images = []
    if p.rank0:
        series = {s.name: [(r["num_known"], r["map_unknown"], r["map_unknown_std"])
                           for r in cb.summary if r["setting"] == s.name] for s in settings}
        images.append(plot_known_sweep(p.out / f"fp_sweep_{fb.split}_known.png", series, nofp,
                                       title=f"feedback-prop, {len(p.unknown)} unknown labels"))
        images.append(p.iteration_plot(cb, f"sweep_{fb.split}", num_known=max(counts)))
    return p.finish(table, images, {"callback": cb})


def run_layers(cli, fb) -> dict:
    """§5, Tables 3-5: LF and RF at each pivot layer alone, all complement labels known."""
    from topdown.evidence import PAPER_LAYERS, known_label_draws, layer_table, plot_layers

    p = _Protocol(cli, fb, "layers")
    candidates = list(fb.candidates or [])
    if not candidates:
        backbone = getattr(cli.model, "hparams", {}).get("backbone")
        if backbone not in PAPER_LAYERS:
            raise ValueError(f"no paper layer list for backbone {backbone!r}; pass --feedback.candidates "
                             f"(paper lists exist for {sorted(PAPER_LAYERS)})")
        candidates = list(PAPER_LAYERS[backbone])
    for c in candidates:
        p.check_layers([c])
    methods = p.methods(default="both")
    draws = known_label_draws(p.unknown, p.num_labels, p.counts(allow_list=False), fb.draws, fb.seed)
    settings = _settings(methods, [(c,) for c in candidates], [fb.lr], fb.steps)
    cb = p.run(settings, draws, fb.split, f"layers_{fb.split}")
    cells = {(r["layers"], r["method"]): (r["map_unknown"], r["map_unknown_std"]) for r in cb.summary}
    nofp = cb.summary[0]["map_unknown_nofp"]
    k = cb.summary[0]["num_known"]
    table = layer_table((nofp, None), cells, candidates, methods,
                        f"layer-wise analysis on {fb.split}: unknown-label mAP, {k} known / {len(p.unknown)} "
                        f"unknown labels, T={fb.steps}, lr={fb.lr:g}")
    best = max(cb.summary, key=lambda r: r["map_unknown"])
    images = []
    if p.rank0:
        series = {m.upper(): [cells[(c, m)][0] for c in candidates] for m in methods}
        images.append(plot_layers(p.out / f"fp_layers_{fb.split}.png", candidates, series, nofp,
                                  title="feedback-prop: which pivot layer?"))
        images.append(p.iteration_plot(cb, f"layers_{fb.split}"))
    return p.finish(table, images, {"callback": cb, "best": {"method": best["method"], "layer": best["layers"],
                                                            "map_unknown": best["map_unknown"]}})


def run_select(cli, fb) -> dict:
    """§4.1: "We determine the update rate parameter and number of iterations using the
    validation split, and report results on the test split." One val pass over the lr grid
    with T = ``steps`` gives every T ≤ steps; the best (lr, T) per method and pivots is then
    run on test.
    """
    from callbacks.feedback import FeedbackSetting, log_wandb, table as wb_table
    from topdown.evidence import best_iteration, fmt, known_label_draws, text_table, write_csv

    p = _Protocol(cli, fb, "select")
    counts = p.counts(allow_list=False)
    draws = known_label_draws(p.unknown, p.num_labels, counts, fb.draws, fb.seed)
    pivots, methods = p.pivot_sets(), p.methods()
    val = p.run(_settings(methods, pivots, list(fb.lr_grid), fb.steps), draws, "val", "select_val")
    chosen: list[dict] = []
    for piv in pivots:
        for m in methods:
            every = len(piv) if m == "lf" else 1  # LF: T is counted per pivot (Algorithm 1)
            best = None
            for lr in fb.lr_grid:
                curve = val.mean_curve(FeedbackSetting(m, piv, lr, fb.steps))
                t, v = best_iteration(curve, every)
                if best is None or v > best["val_map_unknown"] + 1e-12:
                    best = {"method": m, "layers": "+".join(piv), "lr": lr, "steps": t // every,
                            "iteration": t, "val_map_unknown": v, "val_map_unknown_nofp": curve[0]}
            chosen.append(best)
    test_settings = [FeedbackSetting(c["method"], tuple(c["layers"].split("+")), c["lr"], c["steps"]) for c in chosen]
    test = p.run(test_settings, draws, "test", "select_test")
    for c, s in zip(chosen, test_settings):
        r = next(r for r in test.summary if r["setting"] == s.name and r["lr"] == s.lr and r["steps"] == s.steps)
        c.update(test_map_unknown=r["map_unknown"], test_map_unknown_std=r["map_unknown_std"],
                 test_map_unknown_nofp=r["map_unknown_nofp"], test_steps=s.steps, test_lr=s.lr)
    rows = [["no-fp", "", "", fmt(chosen[0]["val_map_unknown_nofp"]), fmt(chosen[0]["test_map_unknown_nofp"])]]
    rows += [[f"{c['method'].upper()}-{c['layers']}", f"{c['lr']:g}", str(c["steps"]), fmt(c["val_map_unknown"]),
              fmt(c["test_map_unknown"], c["test_map_unknown_std"])] for c in chosen]
    table = text_table(["", "lr", "T", "val mAP unk", "test mAP unk"], rows,
                       f"lr and T chosen on val (lr grid {list(fb.lr_grid)}, T <= {fb.steps}), applied on test")
    images = []
    if p.rank0:
        write_csv(p.out / "fp_selection.csv", chosen)
        (p.out / "fp_selection.json").write_text(json.dumps(chosen, indent=2) + "\n")
        log_wandb(cli.trainer, {"fp/selection": wb_table(chosen)})
        images = [p.iteration_plot(val, "select_val"), p.iteration_plot(test, "select_test")]
    p.files += [p.out / "fp_selection.csv", p.out / "fp_selection.json"]
    return p.finish(table, images, {"selection": chosen, "val_callback": val, "callback": test})


PROTOCOL_RUNNERS = {"single": run_single, "sweep": run_sweep, "layers": run_layers, "select": run_select}
