"""Host memory of the feedback-prop evaluation's metric state at COCO size (feedback-prop §4.1, Figure 4).

The defaults are Figure 4's protocol on the COCO test split: 20,504 images, 1,000 labels of
which 500 unknown, 10 amounts of known labels (50, 100, ..., 500) with 5 draws each except
the whole complement, LF and RF at three pivots (6 settings), T = 10, batches of 64.  No image
and no network is involved: ``feedback_prop`` is replaced by a stand-in that reports simulated
logits of the real size for every iteration, so what is measured is the callback's own state
(what it keeps per batch, the per-pass gathering and the exact AP computation), run through
:class:`callbacks.feedback.FeedbackPropCallback` in the passes the protocols plan
(:func:`callbacks.feedback.plan_evaluation`, ``--max-state-gb``).

Prints the passes, the time, and as its last line ``peak_gb=<number>``: the peak resident
memory of the process minus its resident memory before the evaluation started.

    PYTHONPATH=. python benchmarks/feedback_memory.py                    # COCO Figure 4
    PYTHONPATH=. python benchmarks/feedback_memory.py --images 512       # a small slice

``--code-root DIR`` imports ``callbacks.feedback`` from another checkout of the project (e.g. a
``git worktree`` of an older commit) to measure that version the same way.
"""
from __future__ import annotations

import argparse
import importlib
import os
import resource
import sys
import time
from pathlib import Path


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=20504, help="samples of the split (COCO test: 20,504)")
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--unknown", type=int, default=500)
    p.add_argument("--counts", type=int, nargs="+", default=list(range(50, 501, 50)), help="known-label amounts")
    p.add_argument("--draws", type=int, default=5, help="draws per amount (one for the whole complement)")
    p.add_argument("--pivots", nargs="+", default=["conv5", "conv10", "conv13"], help="one LF and one RF setting each")
    p.add_argument("--steps", type=int, default=10, help="T")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--positive-rate", type=float, default=0.03, help="share of positive labels (COCO words: ~3%%)")
    p.add_argument("--keep", choices=("last", "all"), default="last", help="iterations kept (the protocols' option)")
    p.add_argument("--max-state-gb", type=float, default=2.0, help="budget of the passes (the protocols' option)")
    p.add_argument("--max-samples", type=int, default=None, help="images x draws per call (default: the callback's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--code-root", default=None, help="import callbacks.feedback from this checkout instead")
    return p.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None) -> float:
    args = parse(argv)
    root = Path(args.code_root).resolve() if args.code_root else Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    import torch

    torch.set_num_threads(args.threads)
    fb = importlib.import_module("callbacks.feedback")
    from topdown.evidence import known_label_draws

    if str(Path(fb.__file__).resolve().parent.parent) != str(root):
        raise SystemExit(f"callbacks.feedback came from {fb.__file__}, not from {root}")
    g = torch.Generator().manual_seed(0)
    unknown = torch.randperm(args.labels, generator=g)[:args.unknown].sort().values
    draws = known_label_draws(unknown, args.labels, args.counts, args.draws, seed=0)
    settings = [fb.FeedbackSetting(m, (p,), 3e-3, args.steps) for p in args.pivots for m in ("lf", "rf")]
    labels = (torch.rand(args.images, args.labels, generator=g) < args.positive_rate).to(torch.uint8)
    rows = max(args.batch, args.max_samples or 0) * max(1, len(draws))
    logits = torch.randn(min(rows, 4096), args.labels, generator=g)

    def engine(net, x, known_loss, layers, method="rf", steps=10, lr=3e-3, optimizer="adam", *, callback=None, **kw):
        out = logits[:x.shape[0]] if x.shape[0] <= logits.shape[0] else torch.randn(x.shape[0], args.labels)
        for t in range(steps * (len(layers) if method == "lf" else 1) + 1):
            try:
                callback(t, out)
            except getattr(fb, "StopFeedback", ()):  # a version that stops the schedule early
                break
        return out

    fb.feedback_prop = engine

    class Module(torch.nn.Module):  # what the callback needs of a LightningModule
        device = torch.device("cpu")
        hparams = {"num_labels": args.labels}

    module = Module()

    def batches():
        for start in range(0, args.images, args.batch):
            y = labels[start:start + args.batch]
            yield {"image": torch.zeros(len(y), 3, 1, 1), "labels": y.float(), "valid": torch.ones(len(y), dtype=torch.bool)}

    kw = {} if args.max_samples is None else {"max_samples": args.max_samples}
    base = rss_bytes()
    t0 = time.perf_counter()
    if hasattr(fb, "plan_evaluation"):
        from topdown.evidence import MultiLabelEvidence

        evidence = MultiLabelEvidence(unknown, draws, args.labels)
        passes = fb.plan_evaluation(evidence, settings, args.keep, args.images, args.max_state_gb)
        print(f"{len(settings)} settings x {len(draws)} draws on {args.images} images, {args.labels} labels: "
              f"{len(passes)} passes (max_state_gb {args.max_state_gb:g}, keep {args.keep})", flush=True)
        records = 0
        for i, (s_idx, d_idx) in enumerate(passes):
            cb = fb.FeedbackPropCallback([settings[s] for s in s_idx], evidence=evidence.with_draws(d_idx),
                                         keep=args.keep, max_state_gb=None, log=False, **kw)
            cb._reset()
            for batch in batches():
                cb.evaluate_batch(module, batch)
            out, _ = cb.compute(None, module)
            records += len(out)
            print(f"  pass {i + 1}/{len(passes)}: {len(s_idx)} settings x {len(d_idx)} draws "
                  f"(known {sorted({draws[d].num_known for d in d_idx})}), peak so far "
                  f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**30:.2f} GB, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    else:  # the callback before the state went to the host: one pass, every iteration, states on the module's device
        print(f"{len(settings)} settings x {len(draws)} draws on {args.images} images, {args.labels} labels: "
              f"one pass ({fb.__file__})", flush=True)
        cb = fb.FeedbackPropCallback(settings, unknown, draws, **kw)
        cb._build(args.labels, torch.device("cpu"))
        cb._start(module)
        for batch in batches():
            cb.evaluate_batch(module, batch)
        curves = [[m.compute() for m in row] for row in cb.metrics]
        records = sum(len(c["unknown"].reshape(-1)) for row in curves for c in row)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is in KiB on Linux
    print(f"{records} records in {time.perf_counter() - t0:.0f} s; resident memory before {base / 2**30:.2f} GB")
    print(f"peak_gb={peak / 2**30:.3f}")
    return peak / 2**30


if __name__ == "__main__":
    main()
