"""Training throughput: the Lightning training step against a plain PyTorch loop, and the data loader alone.

    python benchmarks/train_throughput.py [--root data/scenes] [--backbone resnet18] [--image-size 128]
                                          [--batch-size 32] [--steps 20] [--repeats 3] [--threads 2]

Both loops train the same ``MultiLabelModule`` network with the same optimizer on the same
in-memory batches, in the same process, alternating plain/Lightning ``--repeats`` times; the
ratio compares the best repeat of each (target: Lightning >= 0.95x plain), by wall clock and
by process CPU time (the CPU clock does not count other jobs' time slices on a shared
machine; read it with ``--threads 1``). The data loader is timed alone over the real
``ScenesMultiLabelDataModule`` train split (JPEG decode + transforms).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset

from data_loading import train_loader_rate  # benchmarks/ is on sys.path when run as a script
from datamodules.coco import ScenesMultiLabelDataModule
from lightning_modules.multilabel import MultiLabelModule
from topdown.losses import weighted_bce


class Batches(Dataset):
    """Pre-collated batches served one per item (batch_size=None), so loading costs nothing."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def plain_loop(module: MultiLabelModule, batches) -> tuple[float, float]:
    net, opt = module.net, module.configure_optimizers()
    net.train()
    wall, cpu = clocks()
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss = weighted_bce(net(batch["image"]), batch["labels"], module.label_weights)
        loss.backward()
        opt.step()
    end_wall, end_cpu = clocks()
    return end_wall - wall, end_cpu - cpu


class StepTimer:
    """Times the fit loop from the first to the last training batch (no setup/teardown)."""

    def __init__(self):
        from lightning.pytorch.callbacks import Callback

        timer = self

        class _CB(Callback):
            def on_train_batch_start(self, *a):
                timer.start = timer.start or clocks()

            def on_train_batch_end(self, *a):
                timer.end = clocks()

        self.callback, self.start, self.end = _CB(), None, None


def lightning_loop(module: MultiLabelModule, batches) -> tuple[float, float]:
    timer = StepTimer()
    trainer = Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, callbacks=[timer.callback])
    trainer.fit(module, train_dataloaders=DataLoader(Batches(batches), batch_size=None))
    # The first start hook fires before its step, the last end hook after its step: all steps.
    return timer.end[0] - timer.start[0], timer.end[1] - timer.start[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/scenes")
    p.add_argument("--num-images", type=int, default=3000)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    dm = ScenesMultiLabelDataModule(root=args.root, num_images=args.num_images, image_size=args.image_size,
                                    batch_size=args.batch_size, num_workers=0)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(args.steps)]
    module = MultiLabelModule(backbone=args.backbone, num_labels=dm.num_labels, label_weights=dm.label_weights)
    plain_loop(module, batches[:2])  # warm-up: allocator, kernels

    images = args.steps * args.batch_size
    plain, light = [], []  # (wall images/s, CPU images/s) per repeat
    for _ in range(args.repeats):
        plain.append(tuple(images / t for t in plain_loop(module, batches)))
        light.append(tuple(images / t for t in lightning_loop(module, batches)))

    rates = {}
    for workers in (0, 1, 2):
        dm_w = ScenesMultiLabelDataModule(root=args.root, num_images=args.num_images, image_size=args.image_size,
                                          batch_size=args.batch_size, num_workers=workers)
        rates[workers] = train_loader_rate(dm_w, args.loader_batches)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}")
    print(f"{args.backbone} at {args.image_size}px, batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats")
    print("| loop | wall images/s (best) | CPU images/s (best) | wall, all repeats |")
    print("|---|---|---|---|")
    for name, runs in (("plain PyTorch", plain), ("Lightning", light)):
        print(f"| {name} | {max(r[0] for r in runs):.1f} | {max(r[1] for r in runs):.1f} | "
              f"{', '.join(f'{r[0]:.1f}' for r in runs)} |")
    for i, clock in enumerate(("wall", "CPU")):
        ratio = max(r[i] for r in light) / max(r[i] for r in plain)
        print(f"Lightning / plain by {clock} clock = {ratio:.3f} (target >= 0.95)")
    print("\n| data loader workers | images/s |")
    print("|---|---|")
    for w, r in rates.items():
        print(f"| {w} | {r:.0f} |")


if __name__ == "__main__":
    main()
