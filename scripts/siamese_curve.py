"""Zero-shot generators against a Siamese network trained on N pairs (generators paper §3.2).

    python scripts/siamese_curve.py --bank runs/generators/version_0/generator_bank.pt

The paper: zero-shot 74% correct (>60° / <60°) on 1,600 unseen pairs; the Siamese
network 62%, 64%, 86%, 96% after 500, 2,500, 12,500, 30,000 training pairs. This
command runs

1. the zero-shot task with the bank (``scripts/zeroshot.py``), unless ``--zeroshot``
   points at the ``zeroshot.csv`` of a finished run; without ``--bank`` a rotation bank
   is first fitted with ``train.py --model generators --data.transform rotation``;
2. ``train.py --model siamese`` once per ``--train-pairs`` count (towers from ``--weights``, by
   default the bank's AlexNet weights), each for
   ``max(1, ceil(--samples / N))`` epochs (the same number of training samples for
   every N, at least one epoch), tested on the same test pairs as the zero-shot task;
3. writes ``siamese_curve.csv`` and ``siamese_curve.png`` (accuracy against the
   number of training pairs, log x, the zero-shot accuracy as a horizontal line; the
   paper's figures in grey) in ``<out>/siamese_curve/version_N/`` and logs both to W&B.

``--replot RUN_DIR`` draws ``siamese_curve.png`` again from that run's CSV (no training).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scripts.zeroshot import add_pair_arguments, evaluate, open_run  # noqa: E402

PAPER = {500: 62.0, 2500: 64.0, 12500: 86.0, 30000: 96.0}
PAPER_ZERO_SHOT = 74.0
CURVE_COLUMNS = ("train_pairs", "epochs", "samples_seen", "accuracy", "accuracy_below", "accuracy_above",
                 "test_pairs", "seconds")


def read_zeroshot(path: str) -> float:
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["range"] == "all":
                return float(row["accuracy"])
    raise ValueError(f"{path}: no 'all' row (not a zeroshot.csv?)")


def fit_bank(a, runs: Path) -> str:
    import train
    from lightning_modules.generators import BANK_FILE

    args = ["--model", "generators", "--data.transform", "rotation", "--run.root", str(runs), "--run.name",
            "generators", "--run.wandb", "false", "--trainer.enable_progress_bar", "false"]
    if a.weights:
        args += ["--model.weights", a.weights]
    cli = train.main(args)
    return str(Path(cli.run_dir) / BANK_FILE)


def train_siamese(a, runs: Path, n: int) -> dict:
    import train

    epochs = max(1, math.ceil(a.samples / n))
    args = ["--model", "siamese", "--run.root", str(runs), "--run.name", f"pairs{n}",
            "--run.wandb", str(a.wandb_runs).lower(), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.max_epochs", str(epochs),
            "--data.root", a.root, "--data.dataset", a.dataset, "--data.train_pairs", str(n),
            "--data.test_pairs", str(a.test_pairs), "--data.max_amount", str(a.max_amount),
            "--data.threshold", str(a.threshold), "--data.seed", str(a.seed), "--data.image_size", str(a.image_size),
            "--data.batch_size", str(a.batch_size), "--model.lr", str(a.lr), "--seed_everything", str(a.seed),
            "--trainer.enable_checkpointing", "false", *a.extra]
    if a.weights:
        args += ["--model.weights", a.weights]
    t0 = time.perf_counter()
    cli = train.main(args)
    m = cli.trainer.callback_metrics
    row = {"train_pairs": n, "epochs": epochs, "samples_seen": epochs * n,
           **{k: float(m[f"test/{k}"]) for k in ("accuracy", "accuracy_below", "accuracy_above")},
           "test_pairs": int(m["test/pairs"]), "seconds": round(time.perf_counter() - t0, 1)}
    print(f"[siamese_curve] {n} pairs, {epochs} epochs: test accuracy {100 * row['accuracy']:.1f}% "
          f"({row['seconds']:.0f} s)", flush=True)
    return row


def plot(path: Path, rows: list[dict], zero: float, test_pairs: int, dataset: str, image_size: int) -> Path:
    from topdown.pictures import save_curve

    return save_curve(path, [r["train_pairs"] for r in rows], [100 * r["accuracy"] for r in rows],
                      hline=100 * zero, hline_label=f"zero-shot generators ({100 * zero:.1f}%)",
                      label="Siamese AlexNet", xlabel="training pairs (log scale)", ylabel="correct >60° / <60° (%)",
                      title=f"§3.2 on {dataset}: {test_pairs} test pairs, {image_size} px Siamese", ylim=(0, 100),
                      reference=[("paper: Siamese (ILSVRC, 224 px)", list(PAPER), list(PAPER.values()))],
                      reference_hline=(f"paper: zero-shot ({PAPER_ZERO_SHOT:g}%)", PAPER_ZERO_SHOT))


def replot(run_dir: str, dataset: str, image_size: int) -> Path:
    with open(Path(run_dir) / "siamese_curve.csv", newline="") as fh:
        raw = list(csv.DictReader(fh))
    zero = next(float(r["accuracy"]) for r in raw if r["train_pairs"] == "zero-shot")
    rows = [{"train_pairs": int(r["train_pairs"]), "accuracy": float(r["accuracy"])} for r in raw
            if r["train_pairs"] != "zero-shot"]
    test_pairs = next(int(r["test_pairs"]) for r in raw if r["train_pairs"] != "zero-shot")
    return plot(Path(run_dir) / "siamese_curve.png", rows, zero, test_pairs, dataset, image_size)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", default=None, help="generator bank with a rotation generator (default: fit one)")
    p.add_argument("--zeroshot", default=None, help="zeroshot.csv of a finished scripts/zeroshot.py run to reuse")
    p.add_argument("--train-pairs", type=int, nargs="+", default=[50, 250, 1250, 3000],
                   help="training pairs per Siamese run (paper: 500 2500 12500 30000)")
    p.add_argument("--samples", type=int, default=2000, help="training samples per run (epochs = samples / N)")
    p.add_argument("--image-size", type=int, default=128, help="Siamese input side (paper: 224)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--wandb-runs", action="store_true", help="also log every Siamese run to W&B")
    p.add_argument("--replot", default=None, help="a finished siamese_curve run folder: redraw its PNG only")
    p.add_argument("extra", nargs="*", help="more train.py flags after --")
    add_pair_arguments(p)
    a = p.parse_args(argv)
    if a.replot:
        path = replot(a.replot, a.dataset, a.image_size)
        print(f"written to {path}")
        return {"png": path}
    import torch

    from topdown.evidence import text_table, write_csv

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    run_dir, logger = open_run(a.out, "siamese_curve", not a.no_wandb, a.wandb_project)
    runs = run_dir / "runs"
    if logger is not None:
        logger.log_hyperparams({k: v for k, v in vars(a).items() if k != "extra"})
    if a.zeroshot:
        zero = read_zeroshot(a.zeroshot)
        zero_info = {"zeroshot_csv": a.zeroshot}
    else:
        bank = a.bank or fit_bank(a, runs)
        if a.weights is None:  # the Siamese towers start from the AlexNet the generators were learned on
            from topdown.generators import GeneratorBank

            a.weights = GeneratorBank.load(bank).meta.get("weights")
        result = evaluate(bank, a, run_dir, logger=logger)
        zero = result["summary"][0]["accuracy"]
        zero_info = {"bank": bank, "zeroshot_seconds": result["seconds"]}
    rows = [train_siamese(a, runs, n) for n in sorted(a.train_pairs)]
    write_csv(run_dir / "siamese_curve.csv", [*rows, {"train_pairs": "zero-shot", "accuracy": zero}])
    png = plot(run_dir / "siamese_curve.png", rows, zero, rows[0]["test_pairs"], a.dataset, a.image_size)
    table = [[str(r["train_pairs"]), str(r["epochs"]), f"{100 * r['accuracy']:.1f}", f"{100 * r['accuracy_below']:.1f}",
              f"{100 * r['accuracy_above']:.1f}", f"{r['seconds']:.0f}"] for r in rows]
    table.append(["zero-shot", "-", f"{100 * zero:.1f}", "", "", ""])
    print(text_table(["train pairs", "epochs", "accuracy %", "Δθ<60 %", "Δθ>60 %", "seconds"], table,
                     "Siamese network vs zero-shot generators (paper: 62/64/86/96% vs 74%)"), flush=True)
    if logger is not None:
        logger.log_table("siamese_curve", columns=list(CURVE_COLUMNS), data=[[r[c] for c in CURVE_COLUMNS] for r in rows])
        logger.log_metrics({"siamese_curve/zero_shot_accuracy": zero})
        logger.log_image(key="siamese_curve/plot", images=[str(png)])
        logger.experiment.finish()
    seconds = time.perf_counter() - t0
    print(f"written to {run_dir} ({seconds:.0f} s)")
    return {"rows": rows, "zero_shot": zero, "run_dir": run_dir, "seconds": seconds, **zero_info}


if __name__ == "__main__":
    main()
