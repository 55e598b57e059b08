"""Zero-shot categorisation of the rotation amount (generators paper §3.2) with a learned generator bank.

    python scripts/zeroshot.py --bank runs/generators/version_0/generator_bank.pt        # 1,600 test pairs

Test pairs: held-out (``val``) central-object originals, ``θ_init`` through 360°,
``Δθ`` uniform in [0°, 120°) (:mod:`datamodules.rotation_pairs`), rendered at the
bank's image size. For each pair: AlexNet features (the bank's weights, or the same
seeded random AlexNet when the bank was fitted without weights), SIFT flows with the
bank's settings, then ``bank.estimate("rotation", flows)``; the pair is categorised
"greater than 60°" when the estimate is.

Writes ``<out>/zeroshot/version_N/``: ``zeroshot.csv`` (accuracy and absolute angle
error, all pairs and per range), ``zeroshot_pairs.csv`` (every pair's truth and
estimate), ``zeroshot_bins.csv`` (per 15° of the true Δθ: mean estimate and error, and
how well the measured flows follow the ideal rotation flow: cosine and gain),
``zeroshot_generator.csv`` (the generator G[Δθ] itself, Δθ = -60..120°: the amount the estimate
gives back for it, and its cosine and gain against the ideal flow), ``zeroshot_scatter.png``
(estimate against truth) and the W&B run. ``--test-pairs 0`` writes the generator table only.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def add_pair_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared with scripts/siamese_curve.py: the test pairs."""
    p.add_argument("--root", default="data/scenes", help="scenes / COCO-2014 layout (or ILSVRC with --dataset)")
    p.add_argument("--dataset", default="scenes", choices=("scenes", "ilsvrc"))
    p.add_argument("--test-pairs", type=int, default=1600, help="zero-shot test pairs (paper: 1,600)")
    p.add_argument("--max-amount", type=float, default=120.0, help="Δθ is drawn from [0, max-amount) degrees")
    p.add_argument("--threshold", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0, help="the pair draw")
    p.add_argument("--weights", default=None, help="AlexNet weights (default: the bank's)")
    p.add_argument("--out", default="runs", help="run root: results go to <out>/<name>/version_N")
    p.add_argument("--no-wandb", action="store_true")
    p.add_argument("--wandb-project", default="topdown")
    p.add_argument("--threads", type=int, default=2)


def test_pairs(a, image_size: int):
    from datamodules.rotation_pairs import RotationPairsDataModule

    dm = RotationPairsDataModule(root=a.root, dataset=a.dataset, train_pairs=0, test_pairs=a.test_pairs,
                                 max_amount=a.max_amount, threshold=a.threshold, image_size=image_size,
                                 seed=a.seed)
    dm.prepare_data()
    dm.setup("test")
    return dm


def evaluate(bank_path: str, a, out_dir: Path, batch_size: int = 16, logger=None) -> dict:
    """Run the zero-shot task for ``bank_path``; write the CSVs and the scatter plot into ``out_dir``."""
    import torch
    from torch.utils.data import DataLoader

    from topdown.evidence import text_table, write_csv
    from topdown.generators import ConvFeatures, GeneratorBank
    from topdown.zeroshot import (SUMMARY_COLUMNS, by_amount, categorize, estimate_pairs, generator_rows,
                                  rotation_field)

    bank = GeneratorBank.load(bank_path)
    if "rotation" not in bank.kinds:
        raise ValueError(f"{bank_path} holds no rotation generator (kinds: {bank.kinds}); fit one with "
                         "python train.py --model generators --data.transform rotation")
    # Flows are compared with the ideal flow of their true rotation (a perfect matcher's), and so is G[Δ].
    reference = (lambda amount: rotation_field(bank.layout, bank.image_size, amount)) if _alexnet(bank) else None
    gen = generator_rows(bank, "rotation", [-60.0 + 10 * i for i in range(19)], reference)
    write_csv(out_dir / "zeroshot_generator.csv", gen)
    keys = [k for k in ("cosine", "gain") if k in gen[0]]
    print(text_table(["Δθ", "estimate of G[Δθ]", *keys],
                     [[f"{r['amount']:g}", f"{r['own_estimate']:.6g}", *(f"{r[k]:.3f}" for k in keys)] for r in gen],
                     "the rotation generator G[Δθ] against the ideal rotation flow"), flush=True)
    if a.test_pairs == 0:
        return {"generator": gen}
    extractor = ConvFeatures.for_bank(bank, a.weights).eval()
    dm = test_pairs(a, bank.image_size)
    loader = DataLoader(dm.test_set, batch_size=batch_size, shuffle=False, num_workers=0)
    t0 = time.perf_counter()
    rows = estimate_pairs(bank, extractor, loader, "rotation", reference=reference)
    seconds = time.perf_counter() - t0
    skipped = len(dm.test_set) - len(rows)
    truth = torch.tensor([r["amount"] for r in rows])
    est = torch.tensor([r["estimate"] for r in rows])
    summary = categorize(truth, est, a.threshold)
    info = {"test_pairs": len(rows), "skipped": skipped, "test_originals": len(dm.test_set.originals),
            "fitted_range": bank.models["rotation"].fitted_range, "search_range": bank.search_range("rotation"),
            "weights": bank.meta.get("weights") if a.weights is None else a.weights, "seconds": round(seconds, 1)}
    write_csv(out_dir / "zeroshot.csv", summary)
    write_csv(out_dir / "zeroshot_pairs.csv", rows)
    bins = by_amount(rows)
    write_csv(out_dir / "zeroshot_bins.csv", bins)
    bin_keys = [k for k in ("flow_cosine", "flow_gain") if k in bins[0]] if bins else []
    print(text_table(["true Δθ", "pairs", "mean estimate °", "mean |error| °", *bin_keys],
                     [[f"{b['amount_from']:g}-{b['amount_to']:g}", str(b["pairs"]), f"{b['estimate_mean']:.1f}",
                       f"{b['abs_error_mean']:.1f}", *(f"{b[k]:.3f}" for k in bin_keys)] for b in bins],
                     "by true amount (flow_cosine / flow_gain: measured flow against the ideal rotation flow)"))
    scatter = plot_scatter(out_dir / "zeroshot_scatter.png", truth, est, a.threshold, summary[0]["accuracy"],
                           bank.models["rotation"].fitted_range)
    table = [[r["range"], str(r["pairs"]), f"{100 * r['accuracy']:.1f}", f"{r['abs_error_mean']:.1f}",
              f"{r['abs_error_median']:.1f}"] for r in summary]
    print(text_table(["Δθ range", "pairs", "accuracy %", "mean |error| °", "median |error| °"], table,
                     f"zero-shot >{a.threshold:g}° / <{a.threshold:g}° ({info['test_pairs']} pairs of "
                     f"{info['test_originals']} held-out originals, {skipped} skipped, {seconds:.0f} s)"), flush=True)
    if logger is not None:
        logger.log_table("zeroshot", columns=list(SUMMARY_COLUMNS), data=[[r[c] for c in SUMMARY_COLUMNS] for r in summary])
        logger.log_metrics({"zeroshot/accuracy": summary[0]["accuracy"], "zeroshot/pairs": len(rows),
                            "zeroshot/abs_error_mean": summary[0]["abs_error_mean"]})
        logger.log_image(key="zeroshot/scatter", images=[str(scatter)])
    return {"summary": summary, "generator": gen, **info}


def _alexnet(bank) -> bool:
    from topdown.zeroshot import ALEXNET_GRID

    return bank.meta.get("backbone", "alexnet") == "alexnet" and all(n in ALEXNET_GRID for n in bank.layout.names)


def plot_scatter(path: Path, truth, est, threshold: float, accuracy: float, fitted) -> Path:
    from topdown.evidence import _finish, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(truth.numpy(), est.numpy(), s=6, alpha=0.5, label="pairs")
    lo, hi = float(min(truth.min(), est.min(), 0)), float(max(truth.max(), est.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8, label="estimate = truth")
    ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=0.8)
    ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=0.8, label=f"{threshold:g}°")
    if fitted:
        ax.axhspan(fitted[0], fitted[1], color="tab:green", alpha=0.08, label="fitted range")
    ax.set_xlabel("true Δθ (degrees)")
    return _finish(fig, ax, path, f"zero-shot estimate: {100 * accuracy:.1f}% correct >/<{threshold:g}°",
                   ylabel="estimated Δθ (degrees)")


def open_run(out: str, name: str, wandb: bool, project: str):
    """A new run folder ``<out>/<name>/version_N`` and its W&B logger (offline unless WANDB_MODE=online)."""
    from lightning_modules.cli import make_wandb_logger, resolve_run_dir

    run_dir = resolve_run_dir(out, name, resume=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = make_wandb_logger(run_dir, name, project, os.environ.get("WANDB_MODE", "offline")) if wandb else None
    return run_dir, logger


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", required=True, help="generator_bank.pt with a rotation generator")
    p.add_argument("--batch-size", type=int, default=16)
    add_pair_arguments(p)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    run_dir, logger = open_run(a.out, "zeroshot", not a.no_wandb, a.wandb_project)
    if logger is not None:
        logger.log_hyperparams({**vars(a), "run_dir": str(run_dir)})
    result = evaluate(a.bank, a, run_dir, a.batch_size, logger)
    print(f"written to {run_dir}")
    if logger is not None:
        logger.experiment.finish()
    return {**result, "run_dir": run_dir}


if __name__ == "__main__":
    main()
