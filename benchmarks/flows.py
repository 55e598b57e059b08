"""Speed of topdown.flows.sift_flow on full AlexNet conv1-conv5 feature pairs.

The generators paper (§2.1.3) computes one SIFT Flow per conv layer for every
image pair: conv1 96x55x55, conv2 256x27x27, conv3 384x13x13, conv4 384x13x13,
conv5 256x13x13 (Caffe AlexNet; 8,522 flow values per pair). This script times
those five flows per pair at several batch sizes, on smooth random feature maps
in [0, 255] whose second map is the first rotated by 10 degrees (so the flows
are not trivial), and prints pairs/s plus where the time goes.

    PYTHONPATH=. .venv/bin/python benchmarks/flows.py --batch 1 32 --threads 2
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch
import torch.nn.functional as F

import topdown.flows as flows

CAFFE_ALEXNET = [("conv1", 96, 55), ("conv2", 256, 27), ("conv3", 384, 13),
                 ("conv4", 384, 13), ("conv5", 256, 13)]


def smooth_pair(b: int, c: int, s: int, deg: float = 10.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, s, s, generator=g)
    x = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), 5, stride=1)
    x = (x - x.amin()) / (x.amax() - x.amin()) * 255
    th = math.radians(deg)
    rot = torch.tensor([[math.cos(th), -math.sin(th), 0.0], [math.sin(th), math.cos(th), 0.0]])
    grid = F.affine_grid(rot.expand(b, 2, 3), list(x.shape), align_corners=True)
    return x, F.grid_sample(x, grid, padding_mode="border", align_corners=True)


def time_pairs(batch: int, repeats: int, device: str) -> tuple[float, float, dict[str, float]]:
    """Best total wall seconds, its process CPU seconds and per-layer wall seconds."""
    pairs = {name: tuple(t.to(device) for t in smooth_pair(batch, c, s, seed=i))
             for i, (name, c, s) in enumerate(CAFFE_ALEXNET)}
    for name in pairs:                                   # warm-up (allocator, kernels)
        flows.sift_flow(pairs[name][0][:1], pairs[name][1][:1])
    best, cpu, per_layer = float("inf"), float("inf"), {}
    for _ in range(repeats):
        layer_t = {}
        c0 = time.process_time()
        for name, (f1, f2) in pairs.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            flows.sift_flow(f1, f2)
            if device == "cuda":
                torch.cuda.synchronize()
            layer_t[name] = time.perf_counter() - t0
        cpu = min(cpu, time.process_time() - c0)
        if sum(layer_t.values()) < best:
            best, per_layer = sum(layer_t.values()), layer_t
    return best, cpu, per_layer


def profile_split(batch: int) -> dict[str, float]:
    """Seconds spent in the data term vs belief propagation, conv1..conv5."""
    spent = {"data term": 0.0, "BP": 0.0}
    data_fn, bp_fn = flows._data_cost, flows._bp_dual_layer

    def timed(key, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spent[key] += time.perf_counter() - t0
            return out
        return wrapper

    flows._data_cost, flows._bp_dual_layer = timed("data term", data_fn), timed("BP", bp_fn)
    try:
        t0 = time.perf_counter()
        for i, (_, c, s) in enumerate(CAFFE_ALEXNET):
            flows.sift_flow(*smooth_pair(batch, c, s, seed=i))
        spent["total"] = time.perf_counter() - t0
    finally:
        flows._data_cost, flows._bp_dual_layer = data_fn, bp_fn
    return spent


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {args.threads} threads, device {args.device}, load avg {load:.1f}")
    for b in args.batch:
        total, cpu, per_layer = time_pairs(b, args.repeats, args.device)
        layers = "  ".join(f"{k} {1000 * v / b:.1f}" for k, v in per_layer.items())
        # CPU seconds of this process (all its threads): the figure to trust
        # when other jobs share the cores and inflate wall time.
        print(f"batch {b:3d}: {b / total:6.1f} pairs/s wall, {b / cpu:6.1f} pairs per CPU-second "
              f"({1000 * total / b:.1f} ms/pair wall; by layer: {layers})")
    if args.device == "cpu":
        b = max(args.batch)
        split = profile_split(b)
        print(f"batch {b} split: " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items()))


if __name__ == "__main__":
    main()
