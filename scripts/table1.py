"""Feedback-prop Table 1: hierarchical scene categorization, 5 rows x (MC Acc, mAP, IoU Acc).

For each run r (the seed of the 50/10/40 per-category split and of the initialisation):

1. train the Baseline with ``train.py --model hierarchical`` (best epoch by ``val/mc_acc``);
2. choose feedback-prop's update rate λ and number of iterations T on the validation split, for
   LF and RF separately (§4.1: "We determine the update rate parameter and number of iterations
   using the validation split"), and apply them to the trained Baseline on the test split (rows
   Ours (LF), Ours (RF)): the ``select`` protocol of ``evaluate.py`` with the true coarse labels as
   evidence, the one LF/RF path of the project (a Trainer on the training's accelerator, batches
   streamed from the datamodule).  Every λ of ``--fp-lr-grid`` runs once with ``--fp-steps``
   iterations (per pivot for LF) and every t ≤ T is read from that run; the (λ, t ≥ 1) with the
   best val MC Acc wins (ties: mAP, then fewer iterations), and LF is stopped at t on test;
4. train Baseline + PL and SINN + PL. With ``--warm-start`` (the default without ``--weights``)
   they start from the trained Baseline's trunk, a stand-in for the Places365 AlexNet that all
   models of the paper share (§4.2), and are fine-tuned for ``--pl-epochs`` with ``--head-lr``
   on their new layers; with ``--weights`` every model starts from that file for ``--epochs``.

The table reports mean ± std over runs.

    python scripts/table1.py --runs 5              # embedded data/scenes1500 (1500 images, built if absent)
    python scripts/table1.py --sun397 /data --runs 5 --image-size 224 --epochs 30 \\
        --weights /data/alexnet_places365.pth.tar --num-workers 8 --threads 8     # real SUN397

Writes ``<out>/table1.csv`` (the table), ``<out>/table1_runs.csv`` (every run and row, with the
chosen λ / T of the LF and RF rows), ``<out>/fp_val_grid.csv`` (val metrics of every λ and t),
the evaluation's own files under ``<out>/run<r>_fp/`` and logs the tables to W&B (offline
unless WANDB_MODE says otherwise) under ``<out>/wandb``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ROWS = (  # (row label as in the paper, variant trained, feedback-prop method)
    ("Baseline", "baseline", None),
    ("Bsln + PL", "baseline_pl", None),
    ("SINN + PL", "sinn_pl", None),
    ("Ours (LF)", "baseline", "lf"),
    ("Ours (RF)", "baseline", "rf"),
)
COLUMNS = (("MC Acc", "mc_acc"), ("mAP", "map"), ("IoU Acc", "iou_acc"))
RUN_FIELDS = ("run", "row", "mc_acc", "map", "iou_acc", "fp_lr", "fp_T", "val_mc_acc", "val_map", "seconds")


def checkpoint_flag() -> str:
    """One weights-only checkpoint, the best by val/mc_acc: AlexNet's Adam state would triple its size."""
    cb = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
          "init_args": {"monitor": "val/mc_acc", "mode": "max", "save_top_k": 1, "save_last": False,
                        "save_weights_only": True, "filename": "best"}}
    return "--trainer.callbacks=" + json.dumps([cb])


def common_flags(a: argparse.Namespace, out: Path) -> list[str]:
    return ["--run.root", str(out), "--run.wandb", str(bool(a.wandb_train)).lower(),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def data_flags(a: argparse.Namespace, run: int) -> list[str]:
    flags = []
    if a.sun397:
        flags += ["--config", str(REPO / "configs" / "hierarchical_sun397.yaml"), "--data.root", a.sun397]
        if a.hierarchy:
            flags += ["--data.hierarchy_file", a.hierarchy]
    else:
        flags += ["--data.root", a.root, "--data.num_images", str(a.num_images), "--data.size", str(a.size)]
    flags += ["--data.run", str(run), "--data.image_size", str(a.image_size), "--data.batch_size", str(a.batch_size),
              "--data.num_workers", str(a.num_workers)]
    return flags


def test_metrics(cli) -> dict[str, float]:
    m = cli.trainer.callback_metrics
    return {key: float(m[f"test/{key}"]) for _, key in COLUMNS}


def train_variant(a, out: Path, run: int, variant: str, init: str | None = None):
    """Train one model through train.py; ``init``: checkpoint whose trunk initialises it (warm start)."""
    import train

    epochs = a.epochs if init is None else a.pl_epochs
    args = ["--model", "hierarchical", *common_flags(a, out), *data_flags(a, run),
            "--run.name", f"run{run}_{variant}", "--seed_everything", str(run),
            "--model.variant", variant, "--model.lr", str(a.lr), "--trainer.max_epochs", str(epochs),
            checkpoint_flag(), *a.extra]
    if init or a.weights:  # a pretrained trunk: its new layers learn at --head-lr
        args += ["--model.weights", init or a.weights]
        if a.head_lr is not None:
            args += ["--model.head_lr", str(a.head_lr)]
    if a.backbone:
        args += ["--model.backbone", a.backbone]
    cli = train.main(args)
    return cli, cli.trainer.checkpoint_callback.best_model_path


# ---------------------------------------------------------------- feedback-prop: λ, T on val, rows on test


def feedback_rows(a, out: Path, run: int, ckpt: str) -> tuple[dict[str, dict], list[dict]]:
    """LF and RF on the trained Baseline through ``evaluate.py --feedback.protocol select``.

    Returns ``{"lf": choice, "rf": choice}`` (chosen λ, t and the val and test figures) and the
    val figures of every λ and t ≥ 1.
    """
    import evaluate

    criterion = ["mc_acc", "map"] if a.fp_select == "mc_acc" else ["map", "mc_acc"]
    args = ["--model", "hierarchical", "--ckpt_path", ckpt, *common_flags(a, out), "--run.name", f"run{run}_fp",
            "--feedback.protocol", "select", "--feedback.method", "both",
            "--feedback.lr_grid", json.dumps(a.fp_lr_grid), "--feedback.steps", str(a.fp_steps),
            "--feedback.weight_decay", str(a.fp_weight_decay), "--feedback.select_by", json.dumps(criterion),
            *a.extra]
    if a.fp_layers:
        args += ["--feedback.layers", json.dumps(a.fp_layers)]
    cli = evaluate.main(args)
    chosen = {c["method"]: c for c in cli.feedback["selection"]}
    grid = [{"method": r["method"], "lr": r["lr"], "t": r["iteration"],
             **{k: r[k] for _, k in COLUMNS}} for r in cli.feedback["val_callback"].records if r["iteration"] >= 1]
    return chosen, grid


# ---------------------------------------------------------------- table


def summarize(results: dict[str, list[dict[str, float]]]) -> list[list[str]]:
    """Table 1 rows ``[label, "mean±std", ...]`` in the paper's order, for the rows present
    (mean ± sample std over runs, :func:`topdown.evidence.mean_std`)."""
    from topdown.evidence import fmt, mean_std

    table = []
    for label, _, _ in ROWS:
        if label not in results:
            continue
        cells = [label]
        for _, key in COLUMNS:
            m = mean_std(r[key] for r in results[label])
            cells.append(fmt(m.mean, m.std, scale=1.0) if m.count > 1 else f"{m.mean:.2f}")
        table.append(cells)
    return table


def write_csvs(out: Path, table: list[list[str]], raw: list[dict], grid: list[dict]) -> None:
    from topdown.evidence import write_csv

    header = ["", *(c for c, _ in COLUMNS)]
    write_csv(out / "table1.csv", [dict(zip(header, row)) for row in table], header)
    write_csv(out / "table1_runs.csv", raw, RUN_FIELDS)
    if grid:
        write_csv(out / "fp_val_grid.csv", grid)


def log_wandb(out: Path, table: list[list[str]], raw: list[dict], config: dict) -> None:
    from lightning_modules.cli import finish_wandb, make_wandb_logger

    # The run folders' W&B set-up: offline unless asked, cache and config kept beside the runs.
    logger = make_wandb_logger(out, "table1", config.get("wandb_project", "topdown"),
                               os.environ.get("WANDB_MODE", "offline"))
    logger.log_hyperparams(config)
    logger.log_table("table1", columns=["", *(c for c, _ in COLUMNS)], data=table)
    logger.log_table("table1_runs", columns=list(RUN_FIELDS), data=[[r.get(k, math.nan) for k in RUN_FIELDS] for r in raw])  # one type per column
    finish_wandb(logger.experiment)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data/scenes1500", help="embedded scenes root (built on demand)")
    p.add_argument("--num-images", type=int, default=1500)
    p.add_argument("--size", type=int, default=128, help="side of the stored scenes images")
    p.add_argument("--sun397", default=None, help="folder holding SUN397/ (real data; uses configs/hierarchical_sun397.yaml)")
    p.add_argument("--hierarchy", default=None, help="hierarchy CSV for --sun397 (default SUN397/hierarchy.csv)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--first-run", type=int, default=0)
    p.add_argument("--epochs", type=int, default=12, help="Baseline epochs (and PL models' without --warm-start)")
    p.add_argument("--pl-epochs", type=int, default=2, help="fine-tuning epochs of Bsln + PL and SINN + PL when warm-started")
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                   help="start Bsln + PL and SINN + PL from the trained Baseline's trunk "
                        "(default: on without --weights, off with them)")
    p.add_argument("--head-lr", type=float, default=1e-3,
                   help="rate of the layers after a pretrained trunk (--weights or warm start)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0, help="data workers (0: the 2-core default; more on real SUN397)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--backbone", default=None, help="torchvision model name (default: the preset's AlexNet)")
    p.add_argument("--weights", default=None, help="pretrained weights file, e.g. a Places365 AlexNet")
    p.add_argument("--fp-steps", type=int, default=10, help="largest number of iterations T tried (per pivot for LF)")
    p.add_argument("--fp-lr-grid", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3],
                   help="update rates λ tried on val")
    p.add_argument("--fp-layers", nargs="+", default=None,
                   help="pivots (default: the model's feedback_layers, AlexNet conv2-conv5 as in §4.2)")
    p.add_argument("--fp-select", choices=("mc_acc", "map"), default="mc_acc", help="val figure that picks (λ, T)")
    p.add_argument("--fp-weight-decay", type=float, default=0.0, help="weight decay of the Adam updates of the pivots")
    p.add_argument("--out", default="runs/table1")
    p.add_argument("--wandb-train", action="store_true", help="also log every training run to W&B")
    p.add_argument("--no-wandb", action="store_true", help="do not log the table to W&B")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is several times faster than 2 when the cores are shared (spin-waits)")
    p.add_argument("extra", nargs="*", help="more train.py flags after --, e.g. -- --trainer.limit_train_batches=2")
    a = p.parse_args(argv)
    if a.fp_steps < 1:
        p.error("--fp-steps must be >= 1")
    if a.warm_start is None:
        a.warm_start = a.weights is None
    return a


def main(argv: list[str] | None = None) -> list[list[str]]:
    a = parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, list[dict[str, float]]] = {}
    raw: list[dict] = []
    val_grid: list[dict] = []
    table: list[list[str]] = []

    def add(run: int, label: str, metrics: dict, seconds: float, **extra) -> None:
        results.setdefault(label, []).append(metrics)
        raw.append({"run": run, "row": label, **{k: round(v, 4) for k, v in metrics.items()}, **extra,
                    "seconds": round(seconds, 1)})
        chosen = f" [λ {extra['fp_lr']:g}, T {extra['fp_T']}]" if "fp_lr" in extra else ""
        print(f"[table1] run {run} {label}: " + ", ".join(f"{c} {metrics[k]:.2f}" for c, k in COLUMNS)
              + f"{chosen} ({seconds:.0f}s)", flush=True)

    for run in range(a.first_run, a.first_run + a.runs):
        t = time.perf_counter()
        cli, ckpt = train_variant(a, out, run, "baseline")
        add(run, "Baseline", test_metrics(cli), time.perf_counter() - t)
        del cli

        t = time.perf_counter()
        chosen, grid = feedback_rows(a, out, run, ckpt)
        seconds = time.perf_counter() - t  # val grid and test of both methods, together
        val_grid += [{"run": run, **g} for g in grid]
        for method in ("lf", "rf"):
            c = chosen[method]
            add(run, f"Ours ({method.upper()})", {k: c[f"test_{k}"] for _, k in COLUMNS}, seconds, fp_lr=c["lr"],
                fp_T=c["iteration"], val_mc_acc=round(c["val_mc_acc"], 4), val_map=round(c["val_map"], 4))

        for variant in ("baseline_pl", "sinn_pl"):
            t = time.perf_counter()
            vcli, vckpt = train_variant(a, out, run, variant, init=ckpt if a.warm_start else None)
            add(run, next(lbl for lbl, v, m in ROWS if v == variant and m is None), test_metrics(vcli), time.perf_counter() - t)
            if not a.keep_checkpoints and vckpt:
                shutil.rmtree(Path(vckpt).parent, ignore_errors=True)
        if not a.keep_checkpoints and ckpt:
            shutil.rmtree(Path(ckpt).parent, ignore_errors=True)
        table = summarize(results)
        write_csvs(out, table, raw, val_grid)  # after every run, so an interrupted sweep keeps what it has

    wall = time.perf_counter() - t0
    data = f"SUN397 at {a.sun397}" if a.sun397 else f"scenes ({a.num_images} images) at {a.root}"
    pl = f"PL models warm-started, {a.pl_epochs} epochs" if a.warm_start else "PL models from scratch"
    title = (f"Table 1 — {data}, {a.runs} run(s), Baseline {a.epochs} epochs at {a.image_size}px, {pl}, "
             f"feedback-prop (λ, T) chosen on val by {a.fp_select}, wall {wall / 60:.1f} min")
    from topdown.evidence import text_table

    print(text_table(["", *(c for c, _ in COLUMNS)], table, title), flush=True)
    for method in ("LF", "RF"):
        chosen = [f"run {r['run']}: λ {r['fp_lr']:g}, T {r['fp_T']}" for r in raw if r["row"] == f"Ours ({method})"]
        print(f"chosen {method}: " + "; ".join(chosen), flush=True)
    if not a.no_wandb:
        log_wandb(out, table, raw, {k: v for k, v in vars(a).items() if k != "extra"} | {"wall_seconds": round(wall, 1)})
    return table


if __name__ == "__main__":
    main()
