"""Speed of topdown.flows.sift_flow on full AlexNet conv1-conv5 feature pairs.

The generators paper (§2.1.3) computes one SIFT Flow per conv layer for every
image pair: conv1 96x55x55, conv2 256x27x27, conv3 384x13x13, conv4 384x13x13,
conv5 256x13x13 (Caffe AlexNet; 8,522 flow values per pair). This script times
those five flows per pair at each batch size and thread count, on smooth random
feature maps in [0, 255] whose second map is the first rotated by 10 degrees
(so the flows are not trivial), by wall clock and by the CPU time of the
process (all its threads) and of the helper processes the batch is split over,
and prints the load average before and after.

``--baseline REV`` also times ``topdown/flows.py`` as of git revision REV (for
example the solver before a change), in the same process, alternating with the
current one, so the two are measured under the same load.

    PYTHONPATH=. .venv/bin/python benchmarks/flows.py --batch 32 --threads 1 2 --baseline 35b82b4
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import subprocess
import sys
import time
import types

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


def load_revision(rev: str, path: str = "topdown/flows.py") -> types.ModuleType:
    """The module at ``path`` as of git revision ``rev``, imported under another name."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True,
                                text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"cannot read {path} at revision {rev!r}: {getattr(err, 'stderr', err)}")
    module = types.ModuleType(f"flows_{rev}")
    module.__file__ = f"{rev}:{path}"
    sys.modules[module.__name__] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def _call(module, threads: int):
    fn = module.sift_flow
    if "workers" in inspect.signature(fn).parameters:
        return lambda f1, f2: fn(f1, f2, workers=threads)
    return fn


def time_pairs(solve, pairs: dict, device: str) -> tuple[float, float, dict[str, float]]:
    """Total wall seconds, process CPU seconds and per-layer wall seconds of one pass."""
    layer_t = {}
    c0 = cpu_seconds()
    for name, (f1, f2) in pairs.items():
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        solve(f1, f2)
        if device == "cuda":
            torch.cuda.synchronize()
        layer_t[name] = time.perf_counter() - t0
    return sum(layer_t.values()), cpu_seconds() - c0, layer_t


def cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of sift_flow's helper processes."""
    from topdown.parallel import helper_cpu_seconds

    return time.process_time() + helper_cpu_seconds()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch threads; the current solver also splits the batch over this many processes")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per setting (best is reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--baseline", default=None, help="git revision of topdown/flows.py to time alongside")
    args = p.parse_args(argv)
    solvers = {"current": flows}
    if args.baseline:
        solvers[f"at {args.baseline}"] = load_revision(args.baseline)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {args.device}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")
    print("| solver | threads | batch | pairs/s wall | pairs per CPU-second | ms/pair wall by layer "
          "(conv1 / 2 / 3 / 4 / 5) |")
    print("|---|---|---|---|---|---|")
    for b in args.batch:
        pairs = {name: tuple(t.to(args.device) for t in smooth_pair(b, c, s, seed=i))
                 for i, (name, c, s) in enumerate(CAFFE_ALEXNET)}
        for threads in args.threads:
            torch.set_num_threads(threads)
            calls = {label: _call(m, threads) for label, m in solvers.items()}
            for solve in calls.values():                   # warm-up (allocator, workspaces, kernels)
                for f1, f2 in pairs.values():
                    solve(f1, f2)
            best = {label: (math.inf, math.inf, {}) for label in calls}
            for _ in range(args.repeats):                  # alternate solvers: same load for both
                for label, solve in calls.items():
                    wall, cpu, per_layer = time_pairs(solve, pairs, args.device)
                    w0, c0, l0 = best[label]
                    best[label] = (min(w0, wall), min(c0, cpu), per_layer if wall < w0 else l0)
            for label, (wall, cpu, per_layer) in best.items():
                layers = " / ".join(f"{1000 * v / b:.1f}" for v in per_layer.values())
                # CPU seconds of this process (all its threads) and its helpers: the figure to trust when other
                # jobs share the cores and inflate wall time.
                print(f"| {label} | {threads} | {b} | {b / wall:.1f} | {b / cpu:.1f} | {layers} |", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# load average after: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
