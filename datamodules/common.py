"""Pieces shared by the datamodules: image transform, fault-tolerant image dataset, DDP sampler.

The batch format is fixed in docs/DESIGN.md: every sample is a dict with
``image``, ``labels`` (multi-label) or ``target`` (multi-class), ``index`` (its
position in the split, to de-duplicate across DDP ranks) and ``valid`` (False
when the image file was missing or corrupt).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms

SPLITS = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(image_size: int, train: bool, preprocess: str = "square", resize_size: int | None = None):
    """The image pipeline, then ImageNet normalisation.

    * ``"square"``: resize to ``image_size`` x ``image_size`` (no crop: a crop could cut a
      labelled object out), a random horizontal flip when training.
    * ``"resize_crop"``: the reference recipe of feedback-prop's COCO code: the short side to
      ``resize_size`` (default ``image_size`` x 256/224, i.e. 256 for 224), then a centre crop
      of ``image_size`` (a random crop and a horizontal flip when training).
    """
    if preprocess == "square":
        steps = [transforms.Resize((image_size, image_size), antialias=True)]
    elif preprocess == "resize_crop":
        side = resize_size or round(image_size * 256 / 224)
        if side < image_size:
            raise ValueError(f"resize_size {side} is smaller than the crop ({image_size})")
        steps = [transforms.Resize(side, antialias=True),
                 transforms.RandomCrop(image_size) if train else transforms.CenterCrop(image_size)]
    else:
        raise ValueError(f"unknown preprocess {preprocess!r}; choose 'square' or 'resize_crop'")
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def check_exists(path, what: str) -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError naming it and what it should be."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_image(path) -> Image.Image:
    """Open an image file as RGB, fully decoded (so truncated files fail here, not later)."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


class SafeImageDataset(Dataset):
    """Images with multi-label ``labels`` [N, K] or class ``targets`` [N]; bad files never stop a run.

    A missing or corrupt file gives a zero image and ``valid=False``, and a
    ``warnings.warn`` naming the file, once per file (per worker process).
    """

    def __init__(self, paths: Sequence, transform, image_size: int, labels: np.ndarray | None = None,
                 targets: Sequence[int] | None = None):
        if (labels is None) == (targets is None):
            raise ValueError("SafeImageDataset: give exactly one of labels (multi-label) or targets (multi-class)")
        n_lab = len(labels) if labels is not None else len(targets)
        if n_lab != len(paths):
            raise ValueError(f"SafeImageDataset: {len(paths)} image paths but {n_lab} label rows")
        # numpy arrays, not lists of Python objects or float tensors: forked loader workers then share
        # them copy-on-write, and COCO's 82,783 x 1000 labels stay 83 MB of uint8 instead of 331 MB.
        self.paths = np.array([str(p) for p in paths])
        self.transform = transform
        self.image_size = image_size
        self.labels = None if labels is None else np.ascontiguousarray(labels)
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        self._warned: set[str] = set()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = str(self.paths[index])
        valid = True
        try:
            image = self.transform(load_image(path))
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three on bad files
            valid = False
            image = torch.zeros(3, self.image_size, self.image_size)
            if path not in self._warned:
                self._warned.add(path)
                kind = "missing" if isinstance(err, FileNotFoundError) else "unreadable"
                warnings.warn(f"image file {kind}, sample skipped: {path} ({type(err).__name__}: {err})",
                              stacklevel=2)
        item = {"image": image, "index": torch.tensor(index, dtype=torch.long),
                "valid": torch.tensor(valid)}
        if self.labels is not None:
            item["labels"] = torch.from_numpy(self.labels[index].astype(np.float32))
        else:
            item["target"] = torch.tensor(self.targets[index], dtype=torch.long)
        return item


def valid_rows(batch: dict) -> dict:
    """The batch without its ``valid == False`` rows (missing or corrupt images): every tensor whose
    first dimension is the batch's; other entries are dropped."""
    keep = batch["valid"]
    return {k: v[keep] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape[:1] == keep.shape}


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``w`` gets ``indices[r::w]``: every sample exactly once, no padding.

    Lightning's own DistributedSampler pads with duplicates so every rank has the
    same length, which would count some validation/test images twice in mAP.
    Being a DistributedSampler subclass, Lightning keeps it as it is. Ranks may
    differ in length by one, so metrics must be gathered by ``index``.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = False, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        n = len(self.dataset)
        self.num_samples = len(range(self.rank, n, self.num_replicas))
        self.total_size = n

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        return iter(indices[self.rank::self.num_replicas])

    def __len__(self):
        return self.num_samples


def distributed_eval_sampler(dataset):
    """An UnpaddedDistributedSampler when a process group is up, else None (plain sequential order)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return UnpaddedDistributedSampler(dataset, shuffle=False)
    return None


def split_count(size: int | float, total: int, what: str) -> int:
    """A split size given as a count (int) or a fraction (float in (0, 1)) of ``total``."""
    if isinstance(size, bool):
        raise TypeError(f"{what} must be an int or a float, got {size!r}")
    if isinstance(size, float):
        if not 0.0 < size < 1.0:
            raise ValueError(f"{what} as a fraction must be in (0, 1), got {size}")
        n = int(math.floor(size * total + 0.5))
    else:
        n = int(size)
    if not 0 <= n <= total:
        raise ValueError(f"{what}={size} asks for {n} images but only {total} are available")
    return n


class SplitLoaders:
    """The set-up and loaders of a datamodule whose ``dataset(split)`` builds (and caches) each of
    :data:`SPLITS` and whose ``_prepare()`` reads the data once into ``{"splits": {split: ...}}``;
    it needs ``batch_size`` and ``num_workers``.  Put it before ``LightningDataModule`` in the
    bases.  Training shuffles; val and test are read in order, one unpadded shard per rank under
    DDP (:func:`distributed_eval_sampler`)."""

    def _split(self, split: str) -> dict:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self._prepare()["splits"][split]

    def prepare_data(self) -> None:
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS):
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool, sampler=None) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, sampler=distributed_eval_sampler(self.dataset("val")))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, sampler=distributed_eval_sampler(self.dataset("test")))
