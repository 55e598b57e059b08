"""Cost of generator training (generators paper §3.3): AlexNet's training step with and without the conv5 warp.

One process, one network, the same in-memory batch; three variants of the step, interleaved
(each repeat runs plain, then the warp with ``backward="negate"``, then with ``"autograd"``), best
of ``--repeats``:

* ``plain``: forward, cross-entropy, backward, SGD step of torchvision's AlexNet;
* ``negate`` / ``autograd``: the same with a :class:`topdown.warp.GeneratorWarp` after conv5
  (six random generators, a new one each step, as in training).

The warp's share of the step is ``(warp step - plain step) / warp step``; the target is at most 5 %.
That difference is small next to the noise of a shared machine, so the warp is also timed alone
(forward and backward of the module on a conv5-sized batch, same repeats): ``alone / plain step``.
Two clocks on the CPU: wall time and the process's CPU time (all its threads), which other jobs on a
shared machine disturb less. On a GPU, wall time with ``torch.cuda.synchronize``.

Usage: ``python benchmarks/warp_step.py [--sizes 96 224] [--batch 64] [--steps 5] [--repeats 3]
[--device cpu|cuda] [--threads 2]``
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F
import torchvision

from topdown.warp import GeneratorWarp, attach, layer_size


def _timed(one, steps: int, device) -> tuple[float, float]:
    """Mean seconds of ``one()`` over ``steps`` calls after a warm-up call (allocator, kernels), by
    wall clock and by process CPU clock; CUDA work is waited for at both ends."""
    one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - w) / steps, (time.process_time() - c) / steps


def step_time(net, opt, x, y, steps: int, device) -> tuple[float, float]:
    """Seconds per training step by wall clock and by process CPU clock (mean over ``steps``)."""
    def one():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    return _timed(one, steps, device)


def warp_alone(warp, x: torch.Tensor, steps: int, device) -> tuple[float, float]:
    """Seconds of the warp's forward and backward on conv5-sized features, per step, by both clocks."""
    grad = torch.randn_like(x)

    def one():
        xx = x.detach().requires_grad_()
        warp(xx).backward(grad)

    return _timed(one, steps, device)


def bench(size: int, batch: int, steps: int, repeats: int, device, classes: int = 1000) -> dict:
    torch.manual_seed(0)
    net = torchvision.models.alexnet(num_classes=classes).to(device).train()
    h, w = layer_size(net, "conv5", size)
    net.train()
    warp = GeneratorWarp(torch.randn(6, 2, h, w) * 2, p=1.0).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(classes, (batch,), device=device)
    feats = torch.randn(batch, 256, h, w, device=device)
    best = {v: (float("inf"), float("inf")) for v in ("plain", "negate", "autograd", "alone negate",
                                                       "alone autograd")}
    for _ in range(repeats):
        for variant in ("plain", "negate", "autograd"):
            hook = None if variant == "plain" else attach(net, "conv5", warp)  # plain: the network untouched
            warp.backward = "negate" if variant == "plain" else variant
            t = step_time(net, opt, x, y, steps, device)
            best[variant] = tuple(min(a, b) for a, b in zip(best[variant], t))
            if hook is not None:
                hook.remove()
        for mode in ("negate", "autograd"):
            warp.backward = mode
            t = warp_alone(warp, feats, steps, device)
            best[f"alone {mode}"] = tuple(min(a, b) for a, b in zip(best[f"alone {mode}"], t))
    return {"size": size, "conv5": (h, w), **best}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 224], help="input sides (scenes run: 96; paper: 224)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, batch {a.batch}, "
          f"{a.steps} steps x best of {a.repeats}")
    clocks = ("wall",) if device.type == "cuda" else ("wall", "cpu")
    print("| input | conv5 | clock | plain ms/step | negate ms/step | autograd ms/step | share, negate | "
          "share, autograd | warp alone ms, negate / autograd | alone / plain step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for size in a.sizes:
        r = bench(size, a.batch, a.steps, a.repeats, device)
        rows.append(r)
        for i, clock in enumerate(clocks):
            plain, neg, auto, a_neg, a_auto = (r[v][i] * 1e3 for v in ("plain", "negate", "autograd", "alone negate",
                                                                         "alone autograd"))
            print(f"| {size} | {r['conv5'][0]}x{r['conv5'][1]} | {clock} | {plain:.1f} | {neg:.1f} | {auto:.1f} | "
                  f"{100 * (neg - plain) / neg:+.1f} % | {100 * (auto - plain) / auto:+.1f} % | "
                  f"{a_neg:.2f} / {a_auto:.2f} | {100 * a_neg / plain:.2f} % / {100 * a_auto / plain:.2f} % |",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
