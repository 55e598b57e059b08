"""Rotation pairs of the zero-shot task (generators paper §3.2): is the rotation greater or less than 60°?

A pair is ``(I_j[θ_init], I_j[θ_init + Δθ])`` of a central-object original ``I_j``
(:mod:`datamodules.pairs`), with ``θ_init`` through 360° and ``Δθ`` in
``[0, max_amount)``; its label is ``Δθ > threshold``. Pair ``i`` of a split is drawn
from its own random stream ``(seed, split, i)``: the original is ``i mod n`` (so
every original gets the same number of pairs, ±1), ``θ_init ~ U[0, 360)``,
``Δθ ~ U[0, max_amount)``. The pairs therefore do not depend on the image size,
the batch size or the number of pairs asked for: the first 500 training pairs are
also the first 500 of 2,500, and the zero-shot estimate (at the bank's 224 px) and
the Siamese network (at its own size) see the same test pairs.

Training pairs come from ``split`` originals, test pairs from the held-out
``test_split`` originals (the paper: 1,600 previously unseen pairs). Batches:
``image``, ``transformed`` float [3, S, S] (ImageNet-normalised), ``amount``
(Δθ, degrees), ``state`` (θ_init), ``label`` (float 0/1), ``original`` (long),
``index`` (long), ``valid`` (bool: False when the image file was unreadable).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.common import distributed_eval_sampler
from datamodules.pairs import DATASETS, Original, _ImageCache, _normalize, coco_originals, ilsvrc_originals
from topdown.transforms import CentralObjectCriteria, canvas_side, render

SPLIT_STREAMS = {"train": 1, "val": 2, "test": 3}


def read_originals(root: str, dataset: str, split: str, criteria: CentralObjectCriteria = CentralObjectCriteria(),
                   rule: str = "single", limit: int | None = None) -> list[Original]:
    """Central-object originals of ``dataset`` (``"scenes"``/COCO layout or ``"ilsvrc"``) in ``split``."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    if dataset == "ilsvrc":
        return ilsvrc_originals(root, split, criteria, rule, limit)
    return coco_originals(root, split, criteria, limit)


class RotationPairs(Dataset):
    """``count`` random rotation pairs of ``originals`` (see the module docstring for the draw)."""

    def __init__(self, originals: list[Original], count: int, seed: int = 0, stream: int = 0,
                 max_amount: float = 120.0, threshold: float = 60.0, image_size: int = 224, fill: str = "mean"):
        if not originals:
            raise ValueError("RotationPairs: no originals")
        if count < 0:
            raise ValueError(f"RotationPairs: count must be >= 0, got {count}")
        if not 0 < threshold < max_amount <= 360:
            raise ValueError(f"RotationPairs: need 0 < threshold ({threshold}) < max_amount ({max_amount}) <= 360")
        self.originals, self.count, self.seed, self.stream = list(originals), int(count), int(seed), int(stream)
        self.max_amount, self.threshold = float(max_amount), float(threshold)
        self.image_size, self.fill = int(image_size), fill
        # A rotation by any angle keeps the object box within its half-diagonal: one canvas per original.
        self.sides = [canvas_side(o.box, o.width, o.height, "rotation", [45.0], self.image_size) for o in self.originals]
        self.cache = _ImageCache()

    def __len__(self) -> int:
        return self.count

    def draw(self, index: int) -> tuple[int, float, float]:
        """``(original, θ_init, Δθ)`` of pair ``index``."""
        if not 0 <= index < self.count:
            raise IndexError(f"pair index {index} out of range [0, {self.count})")
        rng = np.random.default_rng([self.seed, self.stream, index])
        theta, delta = rng.uniform(0.0, 360.0), rng.uniform(0.0, self.max_amount)
        return index % len(self.originals), float(theta), float(delta)

    def __getitem__(self, index: int) -> dict:
        j, theta, delta = self.draw(index)
        orig = self.originals[j]
        img = self.cache.get(orig.path)
        s = self.image_size
        if img is not None:
            pair = render(img.float() / 255, orig.box, "rotation", [theta, theta + delta], s, side=self.sides[j],
                          fill=self.fill).clamp(0, 1)
            pair = _normalize(pair)
        else:
            pair = torch.zeros(2, 3, s, s)
        return {
            "image": pair[0],
            "transformed": pair[1],
            "amount": torch.tensor(delta, dtype=torch.float32),
            "state": torch.tensor(theta, dtype=torch.float32),
            "label": torch.tensor(float(delta > self.threshold)),
            "original": torch.tensor(j, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
            "valid": torch.tensor(img is not None),
        }


class RotationPairsDataModule(LightningDataModule):
    """Training and zero-shot test pairs of §3.2 from central-object originals.

    Args:
        root, dataset: ``scenes`` (COCO-2014 layout, built on demand) or ``ilsvrc``.
        train_pairs: training pairs (paper: 500, 2,500, 12,500, 30,000), from ``split`` originals.
        test_pairs: test pairs (paper: 1,600), from the held-out ``test_split`` originals.
        max_amount: Δθ is drawn from ``[0, max_amount)`` degrees; ``threshold``: the class boundary (60°).
        image_size: rendered side (224 for AlexNet as in the paper).
        seed: the pair draw (pairs of every split and size come from it, see the module docstring).
        max_images / test_max_images: caps on the originals of each split.
    """

    def __init__(self, root: str = "data/scenes", dataset: str = "scenes", train_pairs: int = 500,
                 test_pairs: int = 1600, max_amount: float = 120.0, threshold: float = 60.0, image_size: int = 224,
                 batch_size: int = 32, num_workers: int = 0, split: str = "train", test_split: str = "val",
                 seed: int = 0, max_images: int | None = None, test_max_images: int | None = None,
                 fill: str = "mean", rule: str = "single", scenes_images: int = 3000, scenes_size: int = 128):
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
        self.root, self.dataset = root, dataset
        self.train_pairs, self.test_pairs = int(train_pairs), int(test_pairs)
        self.max_amount, self.threshold = float(max_amount), float(threshold)
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.split, self.test_split, self.seed = split, test_split, int(seed)
        self.max_images, self.test_max_images = max_images, test_max_images
        self.fill, self.rule = fill, rule
        self.scenes_args = dict(num_images=scenes_images, size=scenes_size, seed=0)
        self.train_set: RotationPairs | None = None
        self.test_set: RotationPairs | None = None

    def prepare_data(self) -> None:
        instances = Path(self.root) / "annotations" / f"instances_{self.split}2014.json"
        if self.dataset == "scenes" and not instances.is_file():
            from datamodules.scenes import ensure_scenes

            ensure_scenes(self.root, **self.scenes_args)

    def _pairs(self, split: str, count: int, limit: int | None) -> RotationPairs:
        originals = read_originals(self.root, self.dataset, split, rule=self.rule, limit=limit)
        if not originals:
            raise RuntimeError(f"no central-object originals in {self.dataset} split {split!r} at {self.root}")
        return RotationPairs(originals, count, self.seed, SPLIT_STREAMS.get(split, 9), self.max_amount,
                             self.threshold, self.image_size, self.fill)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._pairs(self.split, self.train_pairs, self.max_images)
        if stage in (None, "fit", "test") and self.test_set is None:
            self.test_set = self._pairs(self.test_split, self.test_pairs, self.test_max_images)
            if self.test_split == self.split:
                warnings.warn(f"test pairs come from the training split {self.split!r}: not held out", stacklevel=2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          sampler=distributed_eval_sampler(self.test_set))

    def describe(self) -> dict:
        """Counts of originals and pairs per split (for the docs and the logs)."""
        out = {}
        for name, ds in (("train", self.train_set), ("test", self.test_set)):
            if ds is not None:
                out[name] = {"originals": len(ds.originals), "pairs": len(ds)}
        return out


__all__ = ["RotationPairs", "RotationPairsDataModule", "read_originals"]
