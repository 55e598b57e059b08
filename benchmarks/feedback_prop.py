"""Feedback-prop speed: seconds per image per iteration of LF and RF next to the floor (§6, Figure 5).

For each model and each start layer, the pivots are the start layer and every later layer
of the paper's list (ResNet-50: input, conv1, conv10, conv22, conv40, conv49; ResNet-18:
input, conv1, conv5, conv9, conv13, conv17), as in Figure 5.  Measured in one process,
interleaved, best of ``--repeats``:

* ``floor``: one truncated forward and backward from the first pivot (frozen parameters, the
  gradient w.r.t. the pivot activation only) — what one iteration cannot go below;
* ``RF``/``LF``: ``(time of feedback_prop(steps=T) - time of the plain forward) / T``, i.e.
  the cost of one iteration once the one-off first forward pass is paid.  One LF iteration
  updates every pivot once (so it makes len(layers) truncated passes), as in Figure 5;
* ``RF call``: the whole call per image per iteration, first forward included.

Two clocks: wall time, and the process's CPU time (all its threads), which other jobs on a
shared machine disturb much less.  Ratios are printed for both.

Usage: ``python benchmarks/feedback_prop.py [--size 224] [--batch 2] [--steps 3] [--repeats 2]
[--models resnet18 resnet50] [--starts input conv1 ...] [--threads 2]``
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from topdown.backbones import build_backbone
from topdown.feedback import feedback_prop, multilabel_known_loss
from topdown.layers import paper_layer_names, resolve_layer

PIVOTS = {
    "resnet18": ["input", "conv1", "conv5", "conv9", "conv13", "conv17"],
    "resnet50": ["input", "conv1", "conv10", "conv22", "conv40", "conv49"],
}
STAGES = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]


def prefix_and_suffix(model: nn.Module, pivot: str):
    """The ResNet split at a top-level pivot: (prefix modules, suffix callable)."""
    name = resolve_layer(model, pivot)
    cut = 0 if name == "input" else STAGES.index(name) + 1
    prefix = [getattr(model, s) for s in STAGES[:cut]]
    rest = [getattr(model, s) for s in STAGES[cut:]]

    def suffix(a):
        for m in rest:
            a = m(a)
        return model.fc(torch.flatten(a, 1))

    return prefix, suffix


def clocks():
    return time.perf_counter(), time.process_time()


def since(start):
    return tuple(b - a for a, b in zip(start, clocks()))


def floor_time(model, x, loss, pivot, steps):
    prefix, suffix = prefix_and_suffix(model, pivot)
    with torch.no_grad():
        a = x
        for m in prefix:
            a = m(a)
    a = a.detach().requires_grad_(True)
    start = clocks()
    for _ in range(steps):
        torch.autograd.grad(loss(suffix(a)).sum(), a)
    return tuple(t / steps for t in since(start))


def call_time(model, x, loss, layers, method, steps):
    start = clocks()
    feedback_prop(model, x, loss, layers, method=method, steps=steps, lr=3e-3, optimizer="adam", weight_decay=1e-4)
    return since(start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"], choices=sorted(PIVOTS))
    p.add_argument("--starts", nargs="+", default=None, help="start layers (default: every layer of the list)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-lf", action="store_true", help="skip LF (the slowest part)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for name in args.models:
        model = build_backbone(name, 80).eval()
        for p_ in model.parameters():
            p_.requires_grad_(False)
        x = torch.randn(args.batch, 3, args.size, args.size)
        known = torch.arange(0, 80, 2)
        loss = multilabel_known_loss(known, (torch.rand(args.batch, known.numel()) > 0.5).float())
        pivots = PIVOTS[name]
        assert all(k in paper_layer_names(model) for k in pivots[1:])
        starts = args.starts or pivots
        call_time(model, x, loss, pivots[-1:], "rf", 1)  # warm-up (allocator, kernels)
        best: dict[tuple, float] = {}
        for _ in range(args.repeats):
            for start in starts:
                layers = pivots[pivots.index(start):]
                times = {
                    "plain": call_time(model, x, loss, layers, "rf", 0),
                    "floor": floor_time(model, x, loss, start, args.steps),
                    "rf": call_time(model, x, loss, layers, "rf", args.steps),
                }
                if not args.no_lf:
                    times["lf"] = call_time(model, x, loss, layers, "lf", args.steps)
                for k, v in times.items():
                    for c, clock in enumerate(("wall", "cpu")):
                        best[start, k, clock] = min(best.get((start, k, clock), float("inf")), v[c])
            print(f"# {name}: repeat done", flush=True)
        for clock in ("cpu", "wall"):
            for start in starts:
                b, t = args.batch, args.steps
                plain, floor, rf = (best[start, k, clock] for k in ("plain", "floor", "rf"))
                rf_it = (rf - plain) / t
                lf_it = (best[start, "lf", clock] - plain) / t if not args.no_lf else float("nan")
                rows.append((clock, name, start, len(pivots) - pivots.index(start), plain / b, floor / b, rf_it / b,
                             lf_it / b, rf / (t * b), rf_it / floor, lf_it / rf_it))

    print(f"\nsize {args.size}, batch {args.batch}, steps {args.steps}, best of {args.repeats}, "
          f"{args.threads} threads, torch {torch.__version__}; seconds per image (per iteration where noted)\n")
    print("| clock | model | start | pivots | forward | floor / it | RF / it | LF / it | RF call / it | RF / floor | LF / RF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r[0]):
        print("| {} | {} | {} | {} | {:.4f} | {:.4f} | {:.4f} | {:.4f} | {:.4f} | {:.2f} | {:.2f} |".format(*r))


if __name__ == "__main__":
    main()
