"""Cost of the generator-learning pipeline's pieces at the paper's sizes (224 px, 8,522-value flows).

    PYTHONPATH=. python benchmarks/generators.py [--pairs 8] [--threads 2] [--device cpu]

Prints seconds for: AlexNet conv1-conv5 features of a pair batch, SIFT flow of
every layer, one PCAStats / RegressionStats update, the top-10 principal flows
of an 8,522² covariance (subspace iteration vs full eigh), and extrapolates
the paper's ILSVRC rotation run (6,552 PCA pairs + 39,312 regression pairs).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from topdown.generators import ConvFeatures, PCAStats, RegressionStats, feature_flows
from topdown.transforms import render


def clock(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full-eigh", action="store_true", help="also time torch.linalg.eigh on 8,522² (minutes on CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
          f"device {dev}")

    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 300, 400, generator=g)
    box = (110, 60, 290, 240)
    imgs, t_render = clock(lambda: render(img, box, "rotation", [5.0 * i for i in range(args.pairs + 1)], 224), dev)
    extractor = ConvFeatures().to(dev).eval()
    batch = torch.cat((imgs[:-1], imgs[1:])).to(dev)
    with torch.no_grad():
        feats, t_feat = clock(lambda: extractor(batch), dev)
    n = args.pairs
    f1, f2 = {k: v[:n] for k, v in feats.items()}, {k: v[n:] for k, v in feats.items()}
    flows, t_flow = clock(lambda: feature_flows(f1, f2), dev)
    per_layer = {}
    for name in f1:
        _, per_layer[name] = clock(lambda: feature_flows({name: f1[name]}, {name: f2[name]}), dev)
    layout = extractor.layout(224)
    vec = layout.flatten({k: v.cpu() for k, v in flows.items()})
    pca = PCAStats.zeros(layout.dim)
    _, t_pca = clock(lambda: pca.update(vec), torch.device("cpu"))

    # 400 flow-like rows: a decaying spectrum over 30 directions plus noise (real flows decay similarly).
    dirs = torch.linalg.qr(torch.randn(layout.dim, 30, generator=g, dtype=torch.float64))[0]
    coef = torch.randn(400, 30, generator=g, dtype=torch.float64) * torch.logspace(1, -1, 30, dtype=torch.float64)
    rows = coef @ dirs.T + 0.01 * torch.randn(400, layout.dim, generator=g, dtype=torch.float64)
    big = PCAStats.zeros(layout.dim).update(rows)
    (_, basis, _), t_sub = clock(lambda: big.components(10), torch.device("cpu"))
    basis = torch.cat((big.mean()[:, None], basis), 1)
    reg = RegressionStats.zeros(11)
    _, t_reg = clock(lambda: reg.update(vec, torch.full((n,), 1.0), basis), torch.device("cpu"))

    print(f"render {n + 1} images at 224:            {t_render:8.3f} s")
    print(f"AlexNet conv1-5 of {2 * n} images:          {t_feat:8.3f} s")
    print(f"SIFT flow, all layers, {n} pairs:         {t_flow:8.3f} s  ({t_flow / n:.3f} s/pair)")
    for name, t in per_layer.items():
        print(f"  {name} {tuple(f1[name].shape[1:])}: {t / n:.3f} s/pair")
    print(f"PCAStats.update ({n} x {layout.dim}):      {t_pca:8.3f} s")
    print(f"RegressionStats.update ({n} pairs):      {t_reg:8.3f} s")
    print(f"top-10 components, subspace, D={layout.dim} (decaying spectrum): {t_sub:8.3f} s")
    if args.full_eigh:
        _, t_eigh = clock(lambda: torch.linalg.eigh(big.covariance()), torch.device("cpu"))
        print(f"full eigh, D={layout.dim}:                 {t_eigh:8.3f} s")
    per_pair = (t_feat + t_flow + t_pca) / n
    print(f"paper's ILSVRC rotation run (45,864 pairs) at this rate: {45864 * per_pair / 3600:.1f} h")


if __name__ == "__main__":
    main()
