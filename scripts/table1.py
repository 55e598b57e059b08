"""Feedback-prop Table 1: hierarchical scene categorization, 5 rows x (MC Acc, mAP, IoU Acc).

For each run r (the seed of the 50/10/40 per-category split and of the initialisation) this
trains Baseline, Baseline + PL and SINN + PL with ``train.py --model hierarchical``, then
evaluates the trained Baseline with feedback-prop (LF and RF, true coarse labels as known
evidence, pivots conv2-conv5) through ``evaluate.py``. The table reports mean ± std over runs.

    python scripts/table1.py --root data/scenes --runs 5            # embedded data (built if absent)
    python scripts/table1.py --sun397 /data --runs 5 --image-size 224 --epochs 30 \\
        --weights /data/alexnet_places365.pth                       # real SUN397 (docs/HIERARCHICAL.md)

Writes ``<out>/table1.csv`` (the table), ``<out>/table1_runs.csv`` (every run and row) and logs
the table to W&B (offline unless WANDB_MODE says otherwise) under ``<out>/wandb``.
"""
from __future__ import annotations

import argparse
import csv
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


def checkpoint_flag(out: Path) -> str:
    """One weights-only checkpoint, the best by val/mc_acc: AlexNet's Adam state would triple its size."""
    cb = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
          "init_args": {"monitor": "val/mc_acc", "mode": "max", "save_top_k": 1, "save_last": False,
                        "save_weights_only": True, "filename": "best"}}
    return "--trainer.callbacks=" + json.dumps([cb])


def common_flags(a: argparse.Namespace, out: Path) -> list[str]:
    flags = ["--run.root", str(out), "--run.wandb", str(bool(a.wandb_train)).lower(),
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    return flags


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


def train_variant(a, out: Path, run: int, variant: str):
    import train

    args = ["--model", "hierarchical", *common_flags(a, out), *data_flags(a, run),
            "--run.name", f"run{run}_{variant}", "--seed_everything", str(run),
            "--model.variant", variant, "--model.lr", str(a.lr), "--trainer.max_epochs", str(a.epochs),
            checkpoint_flag(out), *a.extra]
    if a.weights:
        args += ["--model.weights", a.weights]
    if a.backbone:
        args += ["--model.backbone", a.backbone]
    cli = train.main(args)
    return cli, cli.trainer.checkpoint_callback.best_model_path


def evaluate_feedback(a, out: Path, run: int, ckpt: str, method: str):
    import evaluate

    args = ["--model", "hierarchical", "--ckpt_path", ckpt, *common_flags(a, out), *data_flags(a, run),
            "--run.name", f"run{run}_{method}", "--model.feedback_method", method,
            "--model.feedback_steps", str(a.fp_steps), "--model.feedback_lr", str(a.fp_lr),
            "--model.feedback_layers", json.dumps(a.fp_layers), *a.extra]
    return evaluate.main(args)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single run)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarize(results: dict[str, list[dict[str, float]]]) -> list[list[str]]:
    """Table 1 rows ``[label, "mean±std", ...]`` in the paper's order, for the rows present."""
    table = []
    for label, _, _ in ROWS:
        if label not in results:
            continue
        cells = [label]
        for _, key in COLUMNS:
            m, s = mean_std([r[key] for r in results[label]])
            cells.append(f"{m:.2f}±{s:.2f}")
        table.append(cells)
    return table


def format_table(table: list[list[str]], title: str) -> str:
    header = ["", *(c for c, _ in COLUMNS)]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([title, line(header), *(line(r) for r in table)])


def write_csvs(out: Path, table: list[list[str]], raw: list[dict]) -> None:
    with open(out / "table1.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", *(c for c, _ in COLUMNS)])
        w.writerows(table)
    with open(out / "table1_runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(raw[0]))
        w.writeheader()
        w.writerows(raw)


def log_wandb(out: Path, table: list[list[str]], raw: list[dict], config: dict) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project=config.get("wandb_project", "topdown"), name="table1", save_dir=str(out),
                         offline=os.environ["WANDB_MODE"] != "online")
    logger.log_hyperparams(config)
    logger.log_table("table1", columns=["", *(c for c, _ in COLUMNS)], data=table)
    logger.log_table("table1_runs", columns=list(raw[0]), data=[list(r.values()) for r in raw])
    logger.experiment.finish()


def main(argv: list[str] | None = None) -> list[list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data/scenes", help="embedded scenes root (built on demand)")
    p.add_argument("--num-images", type=int, default=3000)
    p.add_argument("--size", type=int, default=128, help="side of the stored scenes images")
    p.add_argument("--sun397", default=None, help="folder holding SUN397/ (real data; uses configs/hierarchical_sun397.yaml)")
    p.add_argument("--hierarchy", default=None, help="hierarchy CSV for --sun397 (default SUN397/hierarchy.csv)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--first-run", type=int, default=0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--backbone", default=None, help="torchvision model name (default: the preset's AlexNet)")
    p.add_argument("--weights", default=None, help="pretrained weights file, e.g. a Places365 AlexNet")
    p.add_argument("--fp-steps", type=int, default=10)
    p.add_argument("--fp-lr", type=float, default=3e-3)
    p.add_argument("--fp-layers", nargs="+", default=["conv2", "conv3", "conv4", "conv5"])
    p.add_argument("--out", default="runs/table1")
    p.add_argument("--wandb-train", action="store_true", help="also log every training run to W&B")
    p.add_argument("--no-wandb", action="store_true", help="do not log the table to W&B")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is several times faster than 2 when the cores are shared (spin-waits)")
    p.add_argument("extra", nargs="*", help="more train.py flags after --, e.g. -- --trainer.limit_train_batches=2")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, list[dict[str, float]]] = {}
    raw: list[dict] = []
    for run in range(a.first_run, a.first_run + a.runs):
        for variant in ("baseline", "baseline_pl", "sinn_pl"):
            t = time.perf_counter()
            cli, ckpt = train_variant(a, out, run, variant)
            label = next(lbl for lbl, v, m in ROWS if v == variant and m is None)
            evaluations = [(label, test_metrics(cli), time.perf_counter() - t)]
            if variant == "baseline":
                for method in ("lf", "rf"):
                    t = time.perf_counter()
                    ev = evaluate_feedback(a, out, run, ckpt, method)
                    evaluations.append((f"Ours ({method.upper()})", test_metrics(ev), time.perf_counter() - t))
            if not a.keep_checkpoints and ckpt:
                shutil.rmtree(Path(ckpt).parent, ignore_errors=True)
            for lbl, metrics, seconds in evaluations:
                results.setdefault(lbl, []).append(metrics)
                raw.append({"run": run, "row": lbl, **{k: round(v, 4) for k, v in metrics.items()}, "seconds": round(seconds, 1)})
                print(f"[table1] run {run} {lbl}: " + ", ".join(f"{c} {metrics[k]:.2f}" for c, k in COLUMNS)
                      + f" ({seconds:.0f}s)", flush=True)
        table = summarize(results)
        write_csvs(out, table, raw)  # after every run, so an interrupted sweep keeps what it has

    wall = time.perf_counter() - t0
    data = f"SUN397 at {a.sun397}" if a.sun397 else f"scenes ({a.num_images} images) at {a.root}"
    title = f"Table 1 — {data}, {a.runs} run(s), {a.epochs} epochs at {a.image_size}px, wall {wall / 60:.1f} min"
    print(format_table(table, title), flush=True)
    if not a.no_wandb:
        log_wandb(out, table, raw, {k: v for k, v in vars(a).items() if k != "extra"} | {"wall_seconds": round(wall, 1)})
    return table


if __name__ == "__main__":
    main()
