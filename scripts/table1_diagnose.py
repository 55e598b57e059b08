"""What the known coarse labels can tell the Baselines of Table 1 (docs/HIERARCHICAL.md, "Why").

For each Baseline checkpoint that ``scripts/table1.py --keep-checkpoints`` left in ``--from``
(``run<r>_baseline/version_*/checkpoints/*.ckpt``), on one split (``--split``, default test):

* ``mc_acc``, ``cond_mc_acc``: MC Acc of the Baseline and of its softmax conditioned on the
  known coarse labels (Bsln + cond, :func:`topdown.sinn.condition_on_coarse`);
* ``inside``: share of images whose top-1 fine class lies in their known coarse categories, i.e.
  the Baseline already gets the coarse level right; ``errors_outside``: share of the Baseline's
  errors that lie outside them, the only errors the evidence can rule out at the output;
  ``cond_fixed``: share of the errors that conditioning turns right;
* calibration: ``nll``, ``ece`` (15 equal-width confidence bins, percent), ``conf`` (mean top-1
  probability) and ``conf_errors`` (the same over the errors);
* the known loss (BCE of the coarse probabilities summed from the fine softmax): ``p_known_outside``,
  the median P(known coarse) of the outside errors, and ``saturated``, the share of images whose
  P(known coarse) is below 1e-6 or whose P(other coarse) is above 1 − 1e-6, where a loss computed
  from probabilities clamped to [1e-6, 1 − 1e-6] has no gradient at all.

Prints one row per run and the mean ± std over runs; writes ``<from>/diagnose_<split>.csv``.
Also prints how much the coarse label tells about the fine one on the split (mutual information
in bits and as a share of H(fine)).

    python scripts/table1_diagnose.py --from runs/table1
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FIELDS = ("mc_acc", "cond_mc_acc", "inside", "errors_outside", "cond_fixed", "nll", "ece", "conf", "conf_errors",
          "p_known_outside", "saturated")


def expected_calibration_error(probs, target, bins: int = 15) -> float:
    """ECE in percent: Σ_bins |acc − confidence| weighted by the bin's share of the images."""
    import torch

    conf, pred = probs.max(-1)
    right = (pred == target).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(inside.float().mean() * (right[inside].mean() - conf[inside].mean()).abs())
    return 100.0 * ece


def mutual_information(target, fine_to_coarse) -> tuple[float, float]:
    """(I(fine; coarse), H(fine)) in bits over the split's labels, the coarse label being the image's
    set of coarse categories (a multi-membership scene has its own set)."""
    from collections import Counter

    n = len(target)
    fine = Counter(int(t) for t in target)
    sets = {f: tuple(fine_to_coarse[f].nonzero().flatten().tolist()) for f in fine}
    coarse = Counter(sets[int(t)] for t in target)
    h_fine = -sum(c / n * math.log2(c / n) for c in fine.values())
    h_coarse = -sum(c / n * math.log2(c / n) for c in coarse.values())
    return h_coarse, h_fine  # the coarse set is a function of the fine class: I = H(coarse)


def diagnose(ckpt: Path, split: str) -> dict:
    import torch
    from lightning.pytorch.cli import instantiate_class

    from lightning_modules.cli import trained_config
    from lightning_modules.hierarchical import HierarchicalModule
    from topdown.sinn import coarse_probabilities, condition_on_coarse, inside_known_coarse

    config = trained_config(str(ckpt))
    if not config or "data" not in config:
        raise ValueError(f"{ckpt}: no data config in the checkpoint or beside it (config.yaml)")
    model = HierarchicalModule.load_from_checkpoint(str(ckpt), map_location="cpu", weights=None).eval()
    dm = instantiate_class((), config["data"])
    dm.num_workers = 0
    dm.setup("test")
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    logits, target, known = [], [], []
    with torch.no_grad():
        for batch in loader:
            keep = batch["valid"]
            logits.append(model.fine_logits(model(batch["image"][keep], batch["coarse"][keep])))
            target.append(batch["target"][keep])
            known.append(batch["coarse"][keep])
    logits, target, known = torch.cat(logits), torch.cat(target), torch.cat(known)
    f2c = model.fine_to_coarse
    probs = logits.softmax(-1)
    pred = probs.argmax(-1)
    right = pred == target
    inside = inside_known_coarse(known, f2c).gather(1, pred[:, None]).squeeze(1)
    cond = condition_on_coarse(logits, known, f2c).argmax(-1) == target
    errors = ~right
    p_coarse = coarse_probabilities(logits.double(), f2c.double())
    p_known = (p_coarse * known).max(-1).values  # multi-membership: the larger known category
    p_other = torch.where(known > 0, torch.zeros_like(p_coarse), p_coarse).max(-1).values
    saturated = (p_known < 1e-6) | (p_other > 1 - 1e-6)
    outside_err = errors & ~inside
    mi, h_fine = mutual_information(target, f2c)
    return {
        "mc_acc": 100.0 * float(right.float().mean()),
        "cond_mc_acc": 100.0 * float(cond.float().mean()),
        "inside": 100.0 * float(inside.float().mean()),
        "errors_outside": 100.0 * float(outside_err.sum() / errors.sum().clamp_min(1)),
        "cond_fixed": 100.0 * float((errors & cond).sum() / errors.sum().clamp_min(1)),
        "nll": float(torch.nn.functional.cross_entropy(logits, target)),
        "ece": expected_calibration_error(probs, target),
        "conf": 100.0 * float(probs.max(-1).values.mean()),
        "conf_errors": 100.0 * float(probs.max(-1).values[errors].mean()) if errors.any() else float("nan"),
        "p_known_outside": float(p_known[outside_err].median()) if outside_err.any() else float("nan"),
        "saturated": 100.0 * float(saturated.double().mean()),
        "images": len(target), "mi_bits": mi, "h_fine_bits": h_fine,
    }


def find_checkpoints(root: Path) -> dict[int, Path]:
    found = {}
    for ckpt in sorted(root.glob("run*_baseline/version_*/checkpoints/*.ckpt")):
        m = re.match(r"run(\d+)_baseline$", ckpt.parents[2].name)
        if m:
            found[int(m.group(1))] = ckpt  # the last version of a run wins
    return found


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="source", required=True,
                   help="output folder of scripts/table1.py --keep-checkpoints (holds run<r>_baseline/)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    import torch

    from topdown.evidence import fmt, mean_std, text_table, write_csv

    torch.set_num_threads(a.threads)
    root = Path(a.source)
    if not root.is_dir():
        raise FileNotFoundError(f"--from {root}: no such folder (run scripts/table1.py --keep-checkpoints first)")
    ckpts = find_checkpoints(root)
    if not ckpts:
        raise FileNotFoundError(f"--from {root}: no run<r>_baseline/version_*/checkpoints/*.ckpt (was "
                                "scripts/table1.py run with --keep-checkpoints?)")
    rows = []
    for run, ckpt in ckpts.items():
        rows.append({"run": run, **diagnose(ckpt, a.split)})
        print(f"[diagnose] run {run}: " + ", ".join(f"{k} {rows[-1][k]:.3g}" for k in FIELDS), flush=True)
    body = [[str(r["run"])] + [f"{r[k]:.3g}" for k in FIELDS] for r in rows]
    if len(rows) > 1:
        body.append(["mean"] + [fmt(*mean_std(r[k] for r in rows), scale=1.0) for k in FIELDS])
    first = rows[0]
    title = (f"What the known coarse labels tell the Baselines of {root} on {a.split} ({first['images']} images; "
             f"I(fine; coarse) = {first['mi_bits']:.2f} of H(fine) = {first['h_fine_bits']:.2f} bits, "
             f"{100 * first['mi_bits'] / first['h_fine_bits']:.0f} %)")
    print(text_table(["run", *FIELDS], body, title), flush=True)
    write_csv(root / f"diagnose_{a.split}.csv", rows)
    return rows


if __name__ == "__main__":
    main()
