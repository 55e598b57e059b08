"""Feedback-prop Table 1: hierarchical scene categorization, 6 rows x (MC Acc, mAP, IoU Acc).

Every row of a run gets the same training budget.  For each run r (the seed of the 50/10/40
per-category split and of the initialisation):

1. with ``--warm-start`` (the default without ``--weights``): train a Baseline for ``--epochs``
   (best epoch by ``val/mc_acc``); its trunk is the shared starting point, a stand-in for the
   Places365 AlexNet that all models of the paper start from (§4.2).  Then Baseline, Baseline + PL
   and SINN + PL are each fine-tuned from that trunk for ``--finetune-epochs`` with a fresh head at
   ``--head-lr``: the same recipe and budget, the partial-label input the only difference between
   Baseline and Baseline + PL.  With ``--weights`` (or ``--no-warm-start``) the three start from
   the file (or random init) and train for ``--epochs``;
2. Bsln + cond: the Baseline's fine softmax conditioned on the true coarse labels (fine classes
   outside the known coarse categories zeroed, the rest renormalised,
   :func:`topdown.sinn.condition_on_coarse`), logged by the Baseline's own test;
3. Ours (LF) / Ours (RF): feedback-prop on the same Baseline with the true coarse labels as known
   evidence, through ``evaluate.py --feedback.protocol select`` (the one LF/RF path of the
   project): every λ of ``--fp-lr-grid`` runs once with ``--fp-steps`` iterations (per pivot for
   LF) on val, every t ≤ T is read from that run, and the (λ, t ≥ 1) with the best val MC Acc
   wins (ties: mAP, then fewer iterations, then the smaller λ).  When val picks a λ at an edge
   of the grid, the grid is extended beyond that edge (``--fp-extend`` times at most) before
   the choice is applied on test (LF stopped at t);
4. the paired differences LF − Bsln + PL, RF − Bsln + PL, LF − Bsln + cond, RF − Bsln + cond
   per run (the rows of a run share its split), mean ± std over runs under the table.

    python scripts/table1.py --runs 5              # embedded data/scenes1500 (1500 images, built if absent)
    python scripts/table1.py --sun397 /data --runs 5 --image-size 224 --epochs 30 \\
        --weights /data/alexnet_places365.pth.tar --num-workers 8 --threads 8     # real SUN397

Writes ``<out>/table1.csv`` (the table), ``<out>/table1_runs.csv`` (every run and row, with the
chosen λ / T and the final λ grid of the LF and RF rows), ``<out>/table1_paired.csv`` (the paired
differences per run, their mean and std), ``<out>/fp_val_grid.csv`` (val metrics of every λ and
t), ``<out>/table1.txt`` (the printed table, caption and differences), the evaluation's own files
under ``<out>/run<r>_fp/``, and logs the tables to W&B (offline unless WANDB_MODE says otherwise)
under ``<out>/wandb``.  ``--combine DIR ...`` trains nothing and prints the table of the runs that earlier
outputs hold (one sweep split over processes with ``--first-run`` / ``--runs``).

``--jobs N`` (default: the cores divided by ``--threads``, so 2 on a 2-core machine) computes the
runs N at a time, each run in its own process writing ``<out>/run<r>/`` and ``<out>/run<r>.log``,
then combines them into the files above: the same digits as one process, in about half the wall
time on 2 cores (docs/HIERARCHICAL.md).
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

ROWS = (  # (row label as in the paper, variant trained, which of its figures)
    ("Baseline", "baseline", "test"),
    ("Bsln + PL", "baseline_pl", "test"),
    ("SINN + PL", "sinn_pl", "test"),
    ("Bsln + cond", "baseline", "cond"),
    ("Ours (LF)", "baseline", "lf"),
    ("Ours (RF)", "baseline", "rf"),
)
PAIRS = (("Ours (LF)", "Bsln + PL"), ("Ours (RF)", "Bsln + PL"), ("Ours (LF)", "Bsln + cond"),
         ("Ours (RF)", "Bsln + cond"))
COLUMNS = (("MC Acc", "mc_acc"), ("mAP", "map"), ("IoU Acc", "iou_acc"))
RUN_FIELDS = ("run", "row", "mc_acc", "map", "iou_acc", "fp_lr", "fp_T", "fp_grid", "val_mc_acc", "val_map",
              "seconds")
TRUNK = "trunk"  # raw-CSV name of the warm start's first stage (not a row of the table)


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


def test_metrics(cli, prefix: str = "") -> dict[str, float]:
    """The test figures of a trained model; ``prefix="cond_"``: those of its conditioned softmax."""
    m = cli.trainer.callback_metrics
    return {key: float(m[f"test/{prefix}{key}"]) for _, key in COLUMNS}


def train_variant(a, out: Path, run: int, variant: str, init: str | None = None, name: str | None = None):
    """Train one model through train.py; ``init``: checkpoint whose trunk initialises it (warm start),
    trained for ``--finetune-epochs``."""
    import train

    epochs = a.epochs if init is None else a.finetune_epochs
    args = ["--model", "hierarchical", *common_flags(a, out), *data_flags(a, run),
            "--run.name", f"run{run}_{name or variant}", "--seed_everything", str(run),
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


def feedback_rows(a, out: Path, run: int, ckpt: str) -> tuple[dict[str, dict], list[dict], dict[str, list[float]]]:
    """LF and RF on the trained Baseline through ``evaluate.py --feedback.protocol select``.

    Returns ``{"lf": choice, "rf": choice}`` (chosen λ, t and the val and test figures), the val
    figures of every λ and t ≥ 1, and the λ grid of each method after its extensions.
    """
    import evaluate

    criterion = ["mc_acc", "map"] if a.fp_select == "mc_acc" else ["map", "mc_acc"]
    args = ["--model", "hierarchical", "--ckpt_path", ckpt, *common_flags(a, out), "--run.name", f"run{run}_fp",
            "--feedback.protocol", "select", "--feedback.method", "both",
            "--feedback.lr_grid", json.dumps(a.fp_lr_grid), "--feedback.steps", str(a.fp_steps),
            "--feedback.extend_grid", str(a.fp_extend), "--feedback.optimizer", a.fp_optimizer,
            "--feedback.weight_decay", str(a.fp_weight_decay), "--feedback.select_by", json.dumps(criterion),
            *a.extra]
    if a.fp_layers:
        args += ["--feedback.layers", json.dumps(a.fp_layers)]
    cli = evaluate.main(args)
    chosen = {c["method"]: c for c in cli.feedback["selection"]}
    grid = [{"method": r["method"], "lr": r["lr"], "t": r["iteration"],
             **{k: r[k] for _, k in COLUMNS}} for r in cli.feedback["val_callback"].records if r["iteration"] >= 1]
    grids = {c["method"]: c["grid"] for c in cli.feedback["selection"]}
    return chosen, grid, grids


# ---------------------------------------------------------------- table


def per_run(raw: list[dict]) -> dict[str, dict[int, dict[str, float]]]:
    """``{row: {run: figures}}`` from the raw per-run records."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for r in raw:
        out.setdefault(r["row"], {})[r["run"]] = {k: r[k] for _, k in COLUMNS}
    return out


def summarize(raw: list[dict]) -> list[list[str]]:
    """Table 1 rows ``[label, "mean±std", ...]`` in the paper's order (Bsln + cond before ours), for
    the rows present (mean ± sample std over runs, :func:`topdown.evidence.mean_std`)."""
    from topdown.evidence import fmt, mean_std

    runs = per_run(raw)
    table = []
    for label, _, _ in ROWS:
        if label not in runs:
            continue
        cells = [label]
        for _, key in COLUMNS:
            m = mean_std(r[key] for r in runs[label].values())
            cells.append(fmt(m.mean, m.std, scale=1.0) if m.count > 1 else f"{m.mean:.2f}")
        table.append(cells)
    return table


def paired(raw: list[dict]) -> list[dict]:
    """The paired differences of :data:`PAIRS` per run, with mean ± std over runs
    (:func:`topdown.evidence.paired_differences`)."""
    from topdown.evidence import paired_differences

    return paired_differences(per_run(raw), PAIRS, [k for _, k in COLUMNS])


def paired_table(diffs: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["", *(c for c, _ in COLUMNS)]
    rows = []
    for d in diffs:
        n = len(d["runs"])
        rows.append([d["pair"]] + [f"{d[k]:+.2f}±{d[f'{k}_std']:.2f}" if n > 1 else f"{d[k]:+.2f}" for _, k in COLUMNS])
    return header, rows


def paired_csv_rows(diffs: list[dict]) -> list[dict]:
    out = []
    for d in diffs:
        for c, k in COLUMNS:
            out.append({"pair": d["pair"], "metric": c, "mean": round(d[k], 4), "std": round(d[f"{k}_std"], 4),
                        **{f"run{r}": round(v, 4) for r, v in zip(d["runs"], d[f"{k}_runs"])}})
    return out


def write_csvs(out: Path, table: list[list[str]], raw: list[dict], grid: list[dict], diffs: list[dict]) -> None:
    from topdown.evidence import write_csv

    header = ["", *(c for c, _ in COLUMNS)]
    write_csv(out / "table1.csv", [dict(zip(header, row)) for row in table], header)
    write_csv(out / "table1_runs.csv", raw, RUN_FIELDS)
    if diffs:
        write_csv(out / "table1_paired.csv", paired_csv_rows(diffs))
    if grid:
        write_csv(out / "fp_val_grid.csv", grid)


def log_wandb(out: Path, table: list[list[str]], raw: list[dict], diffs: list[dict], config: dict) -> None:
    from lightning_modules.cli import finish_wandb, make_wandb_logger

    # The run folders' W&B set-up: offline unless asked, cache and config kept beside the runs.
    logger = make_wandb_logger(out, "table1", config.get("wandb_project", "topdown"),
                               os.environ.get("WANDB_MODE", "offline"))
    logger.log_hyperparams(config)
    logger.log_table("table1", columns=["", *(c for c, _ in COLUMNS)], data=table)
    logger.log_table("table1_runs", columns=list(RUN_FIELDS),  # one type per column
                     data=[[r.get(k, math.nan) if k not in ("fp_grid", "row") else str(r.get(k, "")) for k in RUN_FIELDS]
                           for r in raw])
    if diffs:
        header, rows = paired_table(diffs)
        logger.log_table("table1_paired", columns=header, data=rows)
    finish_wandb(logger.experiment)


def grid_text(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def caption(a, raw: list[dict], wall: float, load: tuple[float, float]) -> str:
    """The table's title: data, budgets, the λ grids (after extension) and T, wall time and load."""
    data = f"SUN397 at {a.sun397}" if a.sun397 else f"scenes ({a.num_images} images) at {a.root}"
    runs = sorted({r["run"] for r in raw})
    if a.warm_start:
        budget = (f"equal budgets: a Baseline trained {a.epochs} epochs gives the trunk; Baseline, Bsln + PL and "
                  f"SINN + PL are each fine-tuned from it for {a.finetune_epochs} epochs with a fresh head "
                  f"(lr {a.lr:g}, head lr {a.head_lr:g})")
    else:
        start = f"from {a.weights}" if a.weights else "from random init"
        budget = f"equal budgets: Baseline, Bsln + PL and SINN + PL each trained {a.epochs} epochs {start}"
    if a.reuse:
        budget += f" (models and their rows reused from {a.reuse})"
    if a.combine:
        budget += f" (runs combined from {', '.join(a.combine)}; wall and load below are the combining command's)"
    elif a.jobs > 1:
        budget += f" (runs computed {a.jobs} at a time, one process of {a.threads} thread(s) each)"
    grids = []
    for method in ("LF", "RF"):
        used = {tuple(r["fp_grid"]) for r in raw if r["row"] == f"Ours ({method})"}
        extended = sorted(g for g in used if list(g) != sorted(a.fp_lr_grid))
        text = f"{method} λ grid {grid_text(sorted(a.fp_lr_grid))}"
        if extended:
            which = [r["run"] for r in raw if r["row"] == f"Ours ({method})" and list(r["fp_grid"]) != sorted(a.fp_lr_grid)]
            text += f", extended on val to {' / '.join(grid_text(g) for g in extended)} (run {', '.join(map(str, which))})"
        grids.append(text)
    steps = f"T ≤ {a.fp_steps} per pivot (LF), ≤ {a.fp_steps} (RF)"
    pivots = " ".join(a.fp_layers) if a.fp_layers else "the model's pivots (AlexNet conv2-conv5)"
    return (f"Table 1 — {data}, {len(runs)} run(s) at {a.image_size}px; {budget}; Bsln + cond, LF and RF use "
            f"that Baseline. Feedback-prop: {a.fp_optimizer}, {pivots}, {'; '.join(grids)}; {steps}; (λ, T) chosen "
            f"on val by {a.fp_select}. Wall {wall / 60:.1f} min, load {load[0]:.1f} at start, {load[1]:.1f} at end.")


def combined_rows(dirs: list[str]) -> tuple[list[dict], list[dict]]:
    """The per-run rows (``table1_runs.csv``) and val grids of earlier outputs, e.g. runs of one sweep
    split over processes with ``--first-run``; a run found in two of them is an error naming both."""
    import csv

    raw, grid, seen = [], [], {}
    for d in map(Path, dirs):
        table = d / "table1_runs.csv"
        if not table.is_file():
            raise FileNotFoundError(f"--combine {d}: no table1_runs.csv (the output folder of scripts/table1.py)")
        with open(table) as f:
            rows = list(csv.DictReader(f))
        for run in sorted({int(r["run"]) for r in rows}):
            if run in seen:
                raise ValueError(f"--combine: run {run} is in both {seen[run]} and {d}")
            seen[run] = d
        for r in rows:
            row = {"run": int(r["run"]), "row": r["row"], **{k: float(r[k]) for _, k in COLUMNS},
                   "seconds": float(r["seconds"] or 0.0)}
            if r.get("fp_lr"):
                row.update(fp_lr=float(r["fp_lr"]), fp_T=int(r["fp_T"]), fp_grid=json.loads(r["fp_grid"]),
                           val_mc_acc=float(r["val_mc_acc"]), val_map=float(r["val_map"]))
            raw.append(row)
        if (d / "fp_val_grid.csv").is_file():
            with open(d / "fp_val_grid.csv") as f:
                grid += list(csv.DictReader(f))
    raw.sort(key=lambda r: r["run"])  # stable: each run keeps its rows' order
    return raw, grid


def reused_rows(a) -> dict[int, dict]:
    """``{run: {"ckpt": Baseline checkpoint, "rows": its non-feedback-prop rows}}`` of ``--reuse DIR``
    (an earlier ``--keep-checkpoints`` output), for the runs asked; missing pieces are an error naming them."""
    import csv

    src = Path(a.reuse)
    table = src / "table1_runs.csv"
    if not table.is_file():
        raise FileNotFoundError(f"--reuse {src}: no table1_runs.csv (the output folder of an earlier scripts/table1.py)")
    with open(table) as f:
        rows = [r for r in csv.DictReader(f) if not r["row"].startswith("Ours (")]
    out = {}
    for run in range(a.first_run, a.first_run + a.runs):
        ckpts = sorted([*src.glob(f"run{run}_baseline/version_*/checkpoints/*.ckpt"),  # --jobs 1
                        *src.glob(f"run{run}/run{run}_baseline/version_*/checkpoints/*.ckpt")])  # --jobs > 1
        mine = [r for r in rows if int(r["run"]) == run]
        if not ckpts or not mine:
            raise FileNotFoundError(f"--reuse {src}: run {run} has no kept Baseline checkpoint "
                                    f"(run{run}_baseline/version_*/checkpoints/*.ckpt; was it run with "
                                    "--keep-checkpoints?) or no rows in table1_runs.csv")
        out[run] = {"ckpt": str(ckpts[-1]), "rows": mine}
    return out


def run_in_processes(a, argv: list[str] | None, out: Path) -> list[str]:
    """Compute the runs ``--jobs`` at a time, each as this command with ``--runs 1`` in its own process
    writing to ``<out>/run<r>/`` (log: ``<out>/run<r>.log``); returns those folders for
    :func:`combined_rows`.  A run that fails stops the others and is an error naming its log.

    The runs are independent (each has its own split and seeds), so a run's rows are the same digits
    as in one process; the cores are used by runs side by side because feedback-prop's small
    per-image updates do not split over threads.
    """
    import subprocess

    from lightning_modules.cli import child_env

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--"):] if "--" in argv else []
    own = argv[:len(argv) - len(extra)]
    env = child_env(OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    todo = list(range(a.first_run, a.first_run + a.runs))
    dirs = [out / f"run{r}" for r in todo]
    running: dict[int, tuple] = {}
    print(f"[table1] runs {todo[0]}-{todo[-1]}: {a.jobs} processes of {a.threads} thread(s) side by side; "
          f"logs {out}/run<r>.log", flush=True)
    try:
        while todo or running:
            while todo and len(running) < a.jobs:
                r = todo.pop(0)
                log = open(out / f"run{r}.log", "w")
                cmd = [sys.executable, str(Path(__file__).resolve()), *own, "--first-run", str(r), "--runs", "1",
                       "--jobs", "1", "--no-wandb", "--out", str(out / f"run{r}"), *extra]
                running[r] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()),
                              log, time.perf_counter())
            time.sleep(0.5)
            for r, (proc, log, t) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[r]
                if proc.returncode != 0:
                    tail = (out / f"run{r}.log").read_text()[-3000:]
                    raise RuntimeError(f"table1: run {r} failed (exit {proc.returncode}); its log "
                                       f"{out / f'run{r}.log'} ends with:\n{tail}")
                print(f"[table1] run {r} done in {(time.perf_counter() - t) / 60:.1f} min", flush=True)
    finally:
        for proc, log, _ in running.values():
            proc.kill()
            proc.wait()
            log.close()
    return [str(d) for d in dirs]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data/scenes1500", help="embedded scenes root (built on demand)")
    p.add_argument("--num-images", type=int, default=1500)
    p.add_argument("--size", type=int, default=128, help="side of the stored scenes images")
    p.add_argument("--sun397", default=None, help="folder holding SUN397/ (real data; uses configs/hierarchical_sun397.yaml)")
    p.add_argument("--hierarchy", default=None, help="hierarchy CSV for --sun397 (default SUN397/hierarchy.csv)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--first-run", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs of the warm start's trunk (of every model without --warm-start); with the default "
                        "--finetune-epochs every model of a run has 10 + 2 epochs")
    p.add_argument("--finetune-epochs", "--pl-epochs", dest="finetune_epochs", type=int, default=2,
                   help="epochs of Baseline, Bsln + PL and SINN + PL fine-tuned from the trunk (--warm-start)")
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                   help="train a Baseline first and fine-tune every row's model from its trunk "
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
    p.add_argument("--fp-lr-grid", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2],
                   help="update rates λ tried on val (SGD's; Adam's useful rates on scenes are about 1e-4)")
    p.add_argument("--fp-extend", type=int, default=3,
                   help="times the λ grid may be extended beyond an edge that val picks (0: never)")
    p.add_argument("--fp-optimizer", choices=("sgd", "momentum", "adam", "adagrad"), default="sgd",
                   help="update rule of the pivots: Algorithm 1 line 7's plain SGD (the paper allows momentum, "
                        "AdaGrad, Adam; docs/HIERARCHICAL.md: Adam gains far less here)")
    p.add_argument("--fp-layers", nargs="+", default=None,
                   help="pivots (default: the model's feedback_layers, AlexNet conv2-conv5 as in §4.2)")
    p.add_argument("--fp-select", choices=("mc_acc", "map"), default="mc_acc", help="val figure that picks (λ, T)")
    p.add_argument("--fp-weight-decay", type=float, default=0.0, help="weight decay of the updates of the pivots")
    p.add_argument("--out", default="runs/table1")
    p.add_argument("--wandb-train", action="store_true", help="also log every training run to W&B")
    p.add_argument("--no-wandb", action="store_true", help="do not log the table to W&B")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--reuse", default=None, metavar="DIR",
                   help="take the trained models and their rows from an earlier --keep-checkpoints output DIR and "
                        "compute only the LF / RF rows again (other --fp-* flags: ablations on the same Baselines)")
    p.add_argument("--combine", nargs="+", default=None, metavar="DIR",
                   help="train nothing: the table and paired differences of the runs that earlier outputs DIR hold "
                        "(a sweep split over processes with --first-run / --runs); its flags must match theirs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each process; with 1, runs side by side (--jobs) use the cores better "
                        "than threads do, and 2 is several times slower than 1 when the cores are shared")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs computed side by side, each in its own process with --threads threads, then combined "
                        "(default: as many as the cores hold, cores // threads, at most --runs)")
    p.add_argument("extra", nargs="*", help="more train.py flags after --, e.g. -- --trainer.limit_train_batches=2")
    a = p.parse_args(argv)
    if a.fp_steps < 1:
        p.error("--fp-steps must be >= 1")
    if a.fp_extend < 0:
        p.error("--fp-extend must be >= 0")
    if any(not (lr > 0) for lr in a.fp_lr_grid):
        p.error(f"--fp-lr-grid: update rates must be > 0, got {a.fp_lr_grid}")
    if a.combine and a.reuse:
        p.error("--combine and --reuse: choose one")
    if a.jobs is not None and a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    if a.jobs is None:
        a.jobs = max(1, (os.cpu_count() or 1) // max(1, a.threads))
    a.jobs = 1 if a.combine else min(a.jobs, a.runs)
    if a.warm_start is None:
        a.warm_start = a.weights is None
    return a


def main(argv: list[str] | None = None) -> list[list[str]]:
    a = parse_args(argv)

    import torch

    from topdown.evidence import text_table

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    raw: list[dict] = []
    val_grid: list[dict] = []
    table: list[list[str]] = []
    diffs: list[dict] = []

    def add(run: int, label: str, metrics: dict, seconds: float, **extra) -> None:
        raw.append({"run": run, "row": label, **{k: round(v, 4) for k, v in metrics.items()}, **extra,
                    "seconds": round(seconds, 1)})
        chosen = f" [λ {extra['fp_lr']:g}, T {extra['fp_T']}, grid {grid_text(extra['fp_grid'])}]" if "fp_lr" in extra else ""
        print(f"[table1] run {run} {label}: " + ", ".join(f"{c} {metrics[k]:.2f}" for c, k in COLUMNS)
              + f"{chosen} ({seconds:.0f}s)", flush=True)

    reused = reused_rows(a) if a.reuse else {}

    def fp_rows(run: int, ckpt: str) -> None:
        t = time.perf_counter()
        chosen, grid, grids = feedback_rows(a, out, run, ckpt)
        seconds = time.perf_counter() - t  # val grid and test of both methods, together
        val_grid.extend({"run": run, **g} for g in grid)
        for method in ("lf", "rf"):
            c = chosen[method]
            add(run, f"Ours ({method.upper()})", {k: c[f"test_{k}"] for _, k in COLUMNS}, seconds, fp_lr=c["lr"],
                fp_T=c["iteration"], fp_grid=grids[method], val_mc_acc=round(c["val_mc_acc"], 4),
                val_map=round(c["val_map"], 4))

    if a.combine or a.jobs > 1:
        raw, val_grid = combined_rows(a.combine or run_in_processes(a, argv, out))
        table, diffs = summarize(raw), paired(raw)
        write_csvs(out, table, raw, val_grid, diffs)
    for run in range(a.first_run, a.first_run + a.runs) if not (a.combine or a.jobs > 1) else ():
        if a.reuse:  # the trained models of an earlier run: only the feedback-prop rows are computed again
            for r in reused[run]["rows"]:
                add(run, r["row"], {k: float(r[k]) for _, k in COLUMNS}, float(r["seconds"] or 0.0))
            fp_rows(run, reused[run]["ckpt"])
            table, diffs = summarize(raw), paired(raw)
            write_csvs(out, table, raw, val_grid, diffs)
            continue
        checkpoints = []
        init = None
        if a.warm_start:
            t = time.perf_counter()
            cli, init = train_variant(a, out, run, "baseline", name=TRUNK)
            add(run, TRUNK, test_metrics(cli), time.perf_counter() - t)
            checkpoints.append(init)
            del cli

        t = time.perf_counter()
        cli, ckpt = train_variant(a, out, run, "baseline", init=init)
        seconds = time.perf_counter() - t
        add(run, "Baseline", test_metrics(cli), seconds)
        add(run, "Bsln + cond", test_metrics(cli, "cond_"), 0.0)  # the same test pass
        checkpoints.append(ckpt)
        del cli

        fp_rows(run, ckpt)

        for variant in ("baseline_pl", "sinn_pl"):
            t = time.perf_counter()
            vcli, vckpt = train_variant(a, out, run, variant, init=init)
            add(run, next(lbl for lbl, v, _ in ROWS if v == variant), test_metrics(vcli), time.perf_counter() - t)
            checkpoints.append(vckpt)
        if not a.keep_checkpoints:  # after the run: the fine-tuned models' checkpoints name the trunk's file
            for c in checkpoints:
                if c:
                    shutil.rmtree(Path(c).parent, ignore_errors=True)
        table, diffs = summarize(raw), paired(raw)
        write_csvs(out, table, raw, val_grid, diffs)  # after every run, so an interrupted sweep keeps what it has

    wall = time.perf_counter() - t0
    title = caption(a, raw, wall, (load0, os.getloadavg()[0]))
    text = text_table(["", *(c for c, _ in COLUMNS)], table, title)
    header, rows = paired_table(diffs)
    n = len({r["run"] for r in raw})
    text += "\n\n" + text_table(header, rows, f"paired differences (the rows of a run share its split): "
                                              f"mean ± std over {n} run(s) of the per-run differences")
    for method in ("LF", "RF"):
        chosen = [f"run {r['run']}: λ {r['fp_lr']:g}, T {r['fp_T']}" for r in raw if r["row"] == f"Ours ({method})"]
        text += f"\nchosen {method}: " + "; ".join(chosen)
    print(text, flush=True)
    (out / "table1.txt").write_text(text + "\n")
    if not a.no_wandb:
        log_wandb(out, table, raw, diffs,
                  {k: v for k, v in vars(a).items() if k != "extra"} | {"wall_seconds": round(wall, 1)})
    return table


if __name__ == "__main__":
    main()
