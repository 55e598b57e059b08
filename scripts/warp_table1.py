"""Generators paper Table 1: AlexNet, then more epochs of generator training, on ILSVRC CLS-LOC or its scenes view.

For each seed s (initialisation, data order and generator draws):

1. **Baseline**: ``train.py --model warp_alexnet`` for ``--epochs`` (plain AlexNet, no bank); the
   checkpoint with the best held-out val top-1 is kept.
2. **Bank**: ``train.py --model generators`` learns a generator bank from that AlexNet's own
   features (``--model.weights`` = the baseline checkpoint), rendered at the network's input size
   (``--crop-size``) so that its conv5 maps are the network's; its §3.1 evaluation table is kept.
3. **Generator training**: from the baseline checkpoint (``--model.init_from``), ``--extra-epochs``
   more epochs with the bank's six generators warping conv5 (the approximate inverse in backward).
4. **Control** (which the paper lacks): the same ``--extra-epochs`` from the same checkpoint, with
   the same rate and seed, without the warp.

Every row is tested on the CLS-LOC val set (the ``test`` split), centre crop and 10 views, at its
checkpoint with the best val top-1; nothing is chosen on test. The table is mean ± std over seeds.

    python scripts/warp_table1.py                        # scenes (data/scenes), 3 seeds
    python scripts/warp_table1.py --imagenet /data/imagenet --crop-size 224 --resize 256 --epochs 90 \\
        --extra-epochs 5 --batch-size 256 --num-workers 16 --pairs-root /data/imagenet --pairs-dataset ilsvrc

Writes ``<out>/warp_table1.csv`` (the table), ``warp_table1_runs.csv`` (every seed and row),
``warp_table1.png``, ``warp_table1.txt``, and per seed ``bank_eval_seed<s>.csv`` (the bank's §3.1
evaluation) and ``bank_conv5_seed<s>.csv`` (how far each generator moves conv5); logs the tables and the
figure to W&B (offline unless WANDB_MODE says otherwise) under ``<out>/wandb``. The seed-0 baseline
checkpoint is kept (``<out>/seed0_baseline/version_*/checkpoints/best.ckpt``): it is the trained
AlexNet for ``--model.weights`` of the generators, zero-shot and inversion commands.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ROWS = (("baseline", "AlexNet"), ("generator", "+ {k} epoch(s) of generator training"),
        ("control", "+ {k} epoch(s) without (control)"))
COLUMNS = (("top-1 centre", "test/top1"), ("top-1 m-view", "test/top1_10view"),
           ("top-5 centre", "test/top5"), ("top-5 m-view", "test/top5_10view"))
BANK_CASES = ("rotate 30", "rotate -30", "scale 1.3x", "scale 0.75x", "left 30", "up 30")


def checkpoint_flag() -> str:
    """One weights-only checkpoint, the best by val/top1 (SGD's momentum buffers would double its size)."""
    cb = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
          "init_args": {"monitor": "val/top1", "mode": "max", "save_top_k": 1, "save_last": False,
                        "save_weights_only": True, "filename": "best"}}
    return "--trainer.callbacks=" + json.dumps([cb])


def common(a: argparse.Namespace, out: Path) -> list[str]:
    return ["--run.root", str(out), "--run.wandb", str(bool(a.wandb_train)).lower(),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def data_flags(a: argparse.Namespace) -> list[str]:
    if a.imagenet:
        flags = ["--data.class_path", "datamodules.ilsvrc.ILSVRCDataModule", "--data.root", a.imagenet]
    else:
        flags = ["--data.root", a.root, "--data.num_images", str(a.num_images), "--data.size", str(a.size)]
    return flags + ["--data.crop_size", str(a.crop_size), "--data.resize", str(a.resize),
                    "--data.batch_size", str(a.batch_size), "--data.num_workers", str(a.num_workers)]


def train_classifier(a, out: Path, seed: int, row: str, epochs: int, lr: float, init: str | None = None,
                     bank: str | None = None):
    """One row's network through train.py; returns (test metrics, best checkpoint path)."""
    import train

    args = ["--model", "warp_alexnet", *common(a, out), *data_flags(a), "--run.name", f"seed{seed}_{row}",
            "--seed_everything", str(seed), "--model.warp_seed", str(seed), "--model.lr", str(lr),
            "--model.lr_schedule", a.lr_schedule, "--trainer.max_epochs", str(epochs), checkpoint_flag(),
            "--model.generators", json.dumps(a.generators), *a.extra]
    if init:
        args += ["--model.init_from", init]
    if bank:
        args += ["--model.bank", bank]
    cli = train.main(args)
    metrics = {key: float(cli.trainer.callback_metrics[key]) for _, key in COLUMNS}
    warped = cli.model.warp is not None and int(cli.model.warp.step) > 0
    return metrics, cli.trainer.checkpoint_callback.best_model_path, warped


def fit_bank(a, out: Path, seed: int, weights: str) -> tuple[str, list[dict]]:
    """The generators model on the baseline's features, rendered at the network's input size."""
    import train

    args = ["--model", "generators", *common(a, out), "--run.name", f"seed{seed}_bank", "--seed_everything", str(seed),
            "--model.weights", weights, "--data.root", a.pairs_root or a.root, "--data.dataset", a.pairs_dataset,
            "--data.image_size", str(a.crop_size), "--data.max_images", str(a.bank_images),
            "--data.rotation_step", str(a.bank_rotation_step),
            "--data.rotation_amounts", json.dumps(a.bank_rotation_amounts),
            "--data.base_amounts", json.dumps(a.bank_base_amounts), *a.bank_extra]
    cli = train.main(args)
    run_dir = Path(cli.trainer.log_dir or cli.trainer.default_root_dir)
    return str(run_dir / "generator_bank.pt"), list(getattr(cli.model, "eval_rows", []))


def generator_sizes(bank_path: str, generators: list, layer: str = "conv5") -> list[dict]:
    """Mean and largest displacement (map pixels) of each generator's flow at ``layer``: how far the warp moves."""
    from topdown.generators import GeneratorBank

    bank = GeneratorBank.load(bank_path)
    rows = []
    for kind, amount in generators:
        norm = bank.generator(kind, float(amount))[layer].norm(dim=0)
        rows.append({"generator": f"{kind} {float(amount):g}", "mean_px": round(float(norm.mean()), 3),
                     "max_px": round(float(norm.max()), 3)})
    return rows


def summarize(results: dict[str, list[dict]], k: int) -> list[list[str]]:
    from topdown.evidence import mean_std

    table = []
    for row, label in ROWS:
        if row not in results:
            continue
        cells = [label.format(k=k)]
        for _, key in COLUMNS:
            m, s = mean_std([r[key] for r in results[row]])
            cells.append(f"{m:.2f}±{s:.2f}")
        table.append(cells)
    return table


def paired_gain(results: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """Generator training minus the control, per seed (same starting checkpoint), then mean and std."""
    from topdown.evidence import mean_std

    n = min(len(results.get("generator", [])), len(results.get("control", [])))
    return {key: mean_std([results["generator"][i][key] - results["control"][i][key] for i in range(n)])
            for _, key in COLUMNS} if n else {}


def plot(path: Path, results: dict[str, list[dict]], k: int, title: str) -> Path:
    from topdown.evidence import _finish, _pyplot, mean_std

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [r for r, _ in ROWS if r in results]
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        stats = [mean_std([r[key] for r in results[row]]) for _, key in COLUMNS]
        ax.bar([j + (i - (len(rows) - 1) / 2) * width for j in range(len(COLUMNS))], [m for m, _ in stats], width,
               yerr=[s for _, s in stats], capsize=3, label=dict(ROWS)[row].format(k=k))
    ax.set_xticks(range(len(COLUMNS)), [c for c, _ in COLUMNS])
    return _finish(fig, ax, path, title, ylabel="accuracy (%)", legend_size=7)


def log_wandb(out: Path, table: list[list[str]], raw: list[dict], png: Path, config: dict) -> None:
    from lightning_modules.cli import make_wandb_logger

    logger = make_wandb_logger(out, "warp_table1", config.get("wandb_project", "topdown"),
                               os.environ.get("WANDB_MODE", "offline"))
    logger.log_hyperparams(config)
    logger.log_table("warp_table1", columns=["", *(c for c, _ in COLUMNS)], data=table)
    fields = list(raw[0]) if raw else []
    logger.log_table("warp_table1_runs", columns=fields, data=[[r.get(f) for f in fields] for r in raw])
    logger.log_image("warp_table1_plot", [str(png)])
    logger.experiment.finish()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data/scenes", help="embedded scenes root (built, and its CLS-LOC view added, on demand)")
    p.add_argument("--num-images", type=int, default=3000)
    p.add_argument("--size", type=int, default=128, help="side of the stored scenes images")
    p.add_argument("--imagenet", default=None, help="ILSVRC CLS-LOC release folder (real data instead of scenes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=6, help="baseline epochs")
    p.add_argument("--extra-epochs", type=int, default=3, help="K: epochs with (and, as control, without) the warp")
    p.add_argument("--lr", type=float, default=0.01, help="baseline SGD rate")
    p.add_argument("--extra-lr", type=float, default=0.001, help="rate of the K extra epochs (both rows)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--crop-size", type=int, default=96, help="network input; the bank is rendered at this size")
    p.add_argument("--resize", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--generators", type=json.loads,
                   default=[["rotation", 30], ["rotation", -30], ["scale", 1.3], ["scale", 0.75],
                            ["translation_x", -13], ["translation_y", -13]],
                   help="JSON [[kind, amount], ...]; translations in px at --crop-size (30 px at 224 = 13 px at 96)")
    p.add_argument("--pairs-root", default=None, help="images of the bank's originals (default: --root)")
    p.add_argument("--pairs-dataset", default="scenes", choices=("scenes", "ilsvrc"))
    p.add_argument("--bank-images", type=int, default=6, help="central-object originals of the bank (paper: 91)")
    p.add_argument("--bank-rotation-step", type=float, default=60.0, help="θ_init spacing (paper: 5)")
    p.add_argument("--bank-rotation-amounts", type=json.loads, default=[-30, -20, -10, 10, 20, 30],
                   help="Δθ of the regression pairs; both signs, so that -30° is fitted, not extrapolated")
    p.add_argument("--bank-base-amounts", type=json.loads,
                   default={"rotation": 30, "scale": 1.3, "translation_x": 30, "translation_y": 30},
                   help="amounts of the PCA pairs; at 96 px a 10° rotation or a 10 px shift moves no conv5 cell by a "
                        "whole pixel (integer flows all 0, so the basis has no conv5 motion); 30 moves the corners ~1.5")
    p.add_argument("--bank-extra", type=shlex.split, default=[],
                   help="more train.py flags for the generators run, one quoted string")
    p.add_argument("--out", default="runs/warp_table1")
    p.add_argument("--wandb-train", action="store_true", help="also log every training run to W&B")
    p.add_argument("--no-wandb", action="store_true", help="do not log the table to W&B")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every checkpoint (default: seed-0 baseline only)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("extra", nargs="*", help="more train.py flags for the classifier runs, after --")
    a = p.parse_args(argv)
    if a.extra_epochs < 1 or a.epochs < 1:
        p.error("--epochs and --extra-epochs must be >= 1")
    return a


def main(argv: list[str] | None = None) -> list[list[str]]:
    a = parse_args(argv)
    import torch

    from topdown.evidence import text_table, write_csv

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, list[dict]] = {}
    raw: list[dict] = []
    table: list[list[str]] = []
    k = a.extra_epochs

    def add(seed: int, row: str, metrics: dict, seconds: float, **extra) -> None:
        results.setdefault(row, []).append(metrics)
        raw.append({"seed": seed, "row": row, **{key: round(v, 3) for key, v in metrics.items()}, **extra,
                    "seconds": round(seconds, 1)})
        print(f"[warp_table1] seed {seed} {row}: " + ", ".join(f"{c} {metrics[key]:.2f}" for c, key in COLUMNS)
              + f" ({seconds:.0f}s)", flush=True)

    for seed in a.seeds:
        t = time.perf_counter()
        metrics, base_ckpt, _ = train_classifier(a, out, seed, "baseline", a.epochs, a.lr)
        add(seed, "baseline", metrics, time.perf_counter() - t, checkpoint=base_ckpt)

        t = time.perf_counter()
        bank, bank_rows = fit_bank(a, out, seed, base_ckpt)
        if bank_rows:
            write_csv(out / f"bank_eval_seed{seed}.csv", bank_rows)
        sizes = generator_sizes(bank, a.generators)
        write_csv(out / f"bank_conv5_seed{seed}.csv", sizes)
        print(f"[warp_table1] seed {seed} bank: {bank} ({time.perf_counter() - t:.0f}s); conv5 displacement (px): "
              + ", ".join(f"{s['generator']} {s['mean_px']:.2f} (max {s['max_px']:.2f})" for s in sizes), flush=True)
        bank_seconds = time.perf_counter() - t

        for row, use_bank in (("generator", bank), ("control", None)):
            t = time.perf_counter()
            metrics, ckpt, warped = train_classifier(a, out, seed, row, k, a.extra_lr, init=base_ckpt, bank=use_bank)
            if warped != bool(use_bank):
                raise RuntimeError(f"seed {seed} {row}: the warp {'did not run' if use_bank else 'ran'}")
            extra = {"bank_seconds": round(bank_seconds, 1)} if use_bank else {}
            add(seed, row, metrics, time.perf_counter() - t, **extra)
            if not a.keep_checkpoints and ckpt:
                shutil.rmtree(Path(ckpt).parent, ignore_errors=True)
        if not a.keep_checkpoints and seed != a.seeds[0]:
            shutil.rmtree(Path(base_ckpt).parent, ignore_errors=True)
        table = summarize(results, k)
        write_csv(out / "warp_table1_runs.csv", raw)  # after every seed: an interrupted sweep keeps what it has

    wall = time.perf_counter() - t0
    data = f"ILSVRC CLS-LOC at {a.imagenet}" if a.imagenet else f"scenes CLS-LOC view ({a.num_images} images) at {a.root}"
    title = (f"Table 1 — {data}; AlexNet {a.epochs} epochs (lr {a.lr:g}) + {k} (lr {a.extra_lr:g}) at "
             f"{a.crop_size}px; {len(a.seeds)} seed(s), mean±std; wall {wall / 60:.1f} min")
    gain = paired_gain(results)
    lines = [text_table(["", *(c for c, _ in COLUMNS)], table, title)]
    if gain:
        lines.append("generator training − control, paired by seed: "
                     + ", ".join(f"{c} {gain[key][0]:+.2f}±{gain[key][1]:.2f}" for c, key in COLUMNS))
    text = "\n".join(lines)
    print(text, flush=True)
    (out / "warp_table1.txt").write_text(text + "\n")
    with open(out / "warp_table1.csv", "w") as f:
        f.write(",".join(["", *(c for c, _ in COLUMNS)]) + "\n")
        f.writelines(",".join(r) + "\n" for r in table)
    png = plot(out / "warp_table1.png", results, k, f"Table 1 on {'ILSVRC' if a.imagenet else 'scenes'} "
                                                      f"({len(a.seeds)} seeds)")
    if not a.no_wandb:
        config = {key: v for key, v in vars(a).items() if key != "extra"}
        log_wandb(out, table, raw, png, config | {"wall_seconds": round(wall, 1)})
    return table


if __name__ == "__main__":
    main()
