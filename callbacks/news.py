"""Table 2 and Figure 6 of feedback-prop (§4.3): news images with article text as evidence.

:func:`run_table2` is the protocol of ``scripts/table2.py``, on the house's one feedback-prop
evaluation path: the text-prefix evidence (:class:`topdown.news.TextPrefixEvidence`, one draw per
text fraction) is evaluated by :class:`callbacks.feedback.FeedbackPropCallback` in passes planned
under the metric-state budget (``callbacks.protocols``), λ and T are chosen per cell
(column × text fraction) on val by :func:`topdown.evidence.select_setting` and applied on test as
the same computation (:meth:`callbacks.feedback.FeedbackSetting.at`).  The table is printed in the
paper's layout (rows no-text, 25 %, ..., 100 % text; columns LF-conv40, RF-conv22), written as text
and CSV with a PNG of mAP against the text fraction and Figure 6, all logged to W&B.

The no-text row is the plain forward pass (t = 0 of the evaluation): with no text nothing is known.

DDP: the evaluation samplers do not pad, every sample's evidence is looked up by its ``index``
and the callback gathers the scores on rank 0, so the mAP does not depend on the number of
processes.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def parse_column(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"lf:conv40"`` -> ``("lf", ("conv40",))``; several pivots: ``"rf:conv22+conv40"``."""
    method, sep, layers = spec.partition(":")
    if not sep or method.lower() not in ("lf", "rf") or not layers:
        raise ValueError(f"a Table 2 column is METHOD:LAYERS such as lf:conv40 or rf:conv22, got {spec!r}")
    return method.lower(), tuple(layers.split("+"))


def text_evidence(dm, split: str, fractions, absent: str):
    """The text-prefix evidence of ``split``'s images for the non-zero ``fractions``."""
    from topdown.news import TextPrefixEvidence

    return TextPrefixEvidence({f: dm.prefix_labels(split, f) for f in fractions}, absent, len(dm.caption_vocabulary))


def run_table2(cli, cfg) -> dict:
    """Table 2 (§4.3): caption-noun mAP on test for each text fraction and column, λ and T chosen on val.

    ``cfg``: the ``--table2.*`` options of ``scripts/table2.py``.
    """
    from callbacks.feedback import FeedbackSetting, log_wandb, table
    from callbacks.protocols import _choose, _Protocol, _public, _with_test, _write_selection
    from topdown.evidence import fmt, text_table, write_csv
    from topdown.news import check_fraction, plot_text_fraction, row_name

    t_start = time.perf_counter()
    dm = cli.datamodule
    dm.prepare_data()
    fractions = sorted({check_fraction(f) for f in cfg.fractions})
    text = [f for f in fractions if f > 0]
    if not text:
        raise ValueError(f"--table2.fractions {list(cfg.fractions)}: Table 2 needs at least one fraction of text > 0")
    if not cfg.lr_grid:
        raise ValueError("--table2.lr_grid needs at least one update rate")
    columns = [parse_column(c) for c in cfg.columns]
    options = SimpleNamespace(optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, max_samples=cfg.max_samples,
                              max_state_gb=cfg.max_state_gb, iterations="last", select_by=None)
    p = _Protocol(cli, options, "table2", text_evidence(dm, "val", text, cfg.absent))
    for _, layers in columns:
        p.check_layers(list(layers))  # a bad name is an error naming it, before any evaluation

    # 1. every (column, λ) on val with T = steps; the per-iteration records give every t <= T
    grid = [FeedbackSetting(m, layers, lr, cfg.steps) for m, layers in columns for lr in cfg.lr_grid]
    trainer, saved = cli.trainer, cli.trainer.limit_val_batches
    try:
        if cfg.val_batches is not None:
            trainer.limit_val_batches = cfg.val_batches  # the selection only; the test split is always whole
        val = p.run(grid, "val", "table2_val", keep="all")
    finally:
        trainer.limit_val_batches = saved
    t_val = time.perf_counter()

    # 2. per cell (column, fraction): the best (λ, t >= 1) on val
    names = [FeedbackSetting(m, layers).name for m, layers in columns]
    groups = {(n, f): [s for s in grid if s.name == n] for n in names for f in text}
    chosen = _choose(p, val, groups, at={key: key[1] for key in groups})
    for (n, _), c in zip(groups, chosen):
        c["column"] = n

    # 3. each chosen setting on test, with the fractions it was chosen for
    p.evidence = text_evidence(dm, "test", text, cfg.absent)
    applied = list(dict.fromkeys(c["apply"] for c in chosen))
    draws = [[text.index(c["text_fraction"]) for c in chosen if c["apply"] == s] for s in applied]
    test = p.run(applied, "test", "table2_test", keep="last", draws=draws)
    _with_test(p, chosen, test)
    t_test = time.perf_counter()

    m0 = "map_caption"
    nofp = test.summary[0][f"{m0}_nofp"]
    cells = {(c["column"], c["text_fraction"]): c for c in chosen}
    rows, csv_rows = [], []
    for f in fractions:
        values = [nofp if f == 0 else cells[(n, f)][f"test_{m0}"] for n in names]
        rows.append([row_name(f)] + [fmt(v) for v in values])
        for n, v in zip(names, values):
            c = cells.get((n, f))
            csv_rows.append({"row": row_name(f), "fraction": f, "column": n, "test_map": v,
                             "lr": c["lr"] if c else None, "T": c["iteration"] if c else 0,
                             "val_map": c[f"val_{m0}"] if c else chosen[0][f"val_{m0}_nofp"],
                             "test_map_nofp": nofp, "absent": cfg.absent})
    per_pivot = " per pivot" if any(m == "lf" and len(layers) > 1 for m, layers in columns) else ""
    subset = "" if cfg.val_batches is None else f", first {cfg.val_batches} val batches"
    table_text = text_table([""] + names, rows, (
        f"Table 2 layout: caption-noun mAP (%) on test, {len(dm.caption_vocabulary)} caption nouns, "
        f"{len(dm.article_vocabulary)} article nouns; lr and T (1..{cfg.steps}{per_pivot}) chosen on val per "
        f"cell (lr grid {list(cfg.lr_grid)}{subset}); absent nouns: {cfg.absent}"
        + (f"; {test.skipped} missing or corrupt test images left out" if test.skipped else "")))
    seconds = {"val": round(t_val - t_start, 1), "test": round(t_test - t_val, 1)}
    images = []
    if p.rank0:
        out = p.out
        p.files.append(write_csv(out / "fp_table2_table.csv", csv_rows))
        _write_selection(p, chosen, "fp_table2_selection")
        p.files += [out / "fp_table2_selection.csv", out / "fp_table2_selection.json"]
        log_wandb(trainer, {"fp/table2_table": table(csv_rows)})
        series = {n: [(f, nofp if f == 0 else cells[(n, f)][f"test_{m0}"]) for f in fractions] for n in names}
        images.append(plot_text_fraction(out / "fp_table2_test.png", series,
                                         "caption-noun mAP against article text (test)"))
        if cfg.figure6_images > 0 and 1.0 in text:
            t_fig = time.perf_counter()
            pictures = figure6(cli, cfg, cells[(names[0], 1.0)], out)
            images += [f for f in pictures if f.suffix == ".png"]  # the HTML page stays a file
            p.files += [f for f in pictures if f.suffix != ".png"]
            seconds["figure6"] = round(time.perf_counter() - t_fig, 1)
    seconds["total"] = round(time.perf_counter() - t_start, 1)
    return p.finish(table_text, images, {"rows": csv_rows, "chosen": _public(chosen), "nofp": nofp,
                                         "skipped": {"val": val.skipped, "test": test.skipped},
                                         "val_nofp": chosen[0][f"val_{m0}_nofp"], "seconds": seconds,
                                         "val_callback": val, "callback": test})


# ---------------------------------------------------------------------------------------
# Figure 6
# ---------------------------------------------------------------------------------------

def figure6(cli, cfg, cell: dict, out: Path, top: int = 8) -> list[Path]:
    """Top caption nouns without and with feedback-prop (``cell``: a column at 100 % text with its
    chosen λ and t, run as in the evaluation) for the first ``cfg.figure6_images`` test images that
    have article evidence, next to their true caption nouns and the article nouns used; PNG and HTML."""
    from callbacks.feedback import FeedbackPropCallback
    from datamodules.common import IMAGENET_MEAN, IMAGENET_STD
    from topdown.news import figure6_html, figure6_png

    dm = cli.datamodule
    ds = dm.dataset("test")
    evidence = dm.prefix_labels("test", 1.0)
    cap_vocab, art_vocab = dm.caption_vocabulary, dm.article_vocabulary
    picks = []
    for i in np.flatnonzero(evidence.any(1)):
        item = ds[int(i)]
        if bool(item["valid"]):
            picks.append((int(i), item))
        if len(picks) == cfg.figure6_images:
            break
    if not picks:
        return []
    device = cli.model.device
    batch = {"image": torch.stack([it["image"] for _, it in picks]).to(device),
             "valid": torch.ones(len(picks), dtype=torch.bool, device=device),
             "index": torch.tensor([i for i, _ in picks], device=device),
             "caption_labels": torch.stack([it["caption_labels"] for _, it in picks]).to(device)}
    cb = FeedbackPropCallback(cell["apply"], evidence=text_evidence(dm, "test", [1.0], cfg.absent),
                              optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, max_samples=cfg.max_samples,
                              max_state_gb=None, log=False)
    plain, fed = cb.batch_scores(cli.model, batch)
    before, after = torch.sigmoid(plain), torch.sigmoid(fed[(0, 0)])
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    keys = dm.split_keys("test")
    k = min(top, len(cap_vocab))
    examples = []
    for j, (i, it) in enumerate(picks):
        pixels = ((it["image"] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        truth = [cap_vocab[c] for c in torch.nonzero(it["caption_labels"]).flatten().tolist()]
        topb, topa = before[j].topk(k), after[j].topk(k)
        examples.append({"image": pixels, "key": keys[i], "truth": truth,
                         "before": [(cap_vocab[int(c)], float(s)) for s, c in zip(*topb)],
                         "after": [(cap_vocab[int(c)], float(s)) for s, c in zip(*topa)],
                         "evidence": [art_vocab[c] for c in np.flatnonzero(evidence[i])]})
    title = (f"{cell['column']} with all article text (lr {cell['lr']:g}, t {cell['iteration']}); "
             "true labels in capitals")
    return [figure6_png(out / "figure6.png", examples, title), figure6_html(out / "figure6.html", examples, title)]
