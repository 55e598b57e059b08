"""Throughput of the scenes multi-label train dataloader alone (no model), in images/s.

    python benchmarks/data_loading.py --root data/scenes [--workers 0 1 2] [--batches 30]

Builds the root first when it is empty (that time is printed apart), then for
each worker count iterates the shuffled train loader with batch 64 and reports
images/s after one warm-up batch (which pays for starting the workers).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from datamodules.coco import ScenesMultiLabelDataModule
from datamodules.scenes import ensure_scenes


def train_loader_rate(dm: ScenesMultiLabelDataModule, batches: int) -> float:
    """Images/s of ``dm``'s train loader over ``batches`` batches; the first (worker start-up) is not timed."""
    dm.setup("fit")
    n, it, images, t0 = 0, None, 0, time.perf_counter()
    while n < batches:
        it = iter(dm.train_dataloader()) if it is None else it
        try:
            batch = next(it)
        except StopIteration:
            it = None
            continue
        if n == 0:
            t0 = time.perf_counter()
        else:
            images += len(batch["image"])
        n += 1
    return images / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data/scenes")
    p.add_argument("--num-images", type=int, default=3000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    t0 = time.perf_counter()
    ensure_scenes(a.root, num_images=a.num_images, size=a.size)
    print(f"scenes ready in {time.perf_counter() - t0:.1f}s ({a.root})")
    for workers in a.workers:
        dm = ScenesMultiLabelDataModule(root=a.root, num_images=a.num_images, size=a.size, image_size=a.image_size,
                                        batch_size=a.batch_size, num_workers=workers)
        t0 = time.perf_counter()
        dm.num_labels
        prep = time.perf_counter() - t0
        rate = train_loader_rate(dm, a.batches)
        print(f"workers={workers}: {rate:8.0f} images/s (batch {a.batch_size}, {a.image_size}px, "
              f"{a.batches - 1} timed batches; labels ready in {prep:.2f}s)")


if __name__ == "__main__":
    main()
