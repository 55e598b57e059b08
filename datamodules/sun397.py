"""SUN397 with its three-level scene hierarchy (feedback-prop §4.2, Table 1).

Expected files under ``root`` (the folder holding ``SUN397/``, or ``SUN397/`` itself)::

    SUN397/ClassName.txt                 # one fine category per line: /a/abbey, /b/bakery/shop, ...
    SUN397/<letter>/<category>/*.jpg     # the official image folders (397 categories)
    SUN397/hierarchy.csv                 # the three-level hierarchy (or pass hierarchy_file)

``hierarchy.csv`` is SUN's ``hierarchy_three_levels`` sheet saved as CSV: one header row
``category,<coarse_1>,...,<coarse_C>,<general_1>,...,<general_G>`` (the first ``num_coarse``
label columns are the coarse level, 3 on SUN, the others the general level, 16 on SUN), then
one row per fine category whose first cell is the ``ClassName.txt`` name (quotes allowed, as in
``'/a/abbey'``) and whose other cells are 0/1 memberships (empty = 0). A fine category may belong
to several general or coarse categories. Rows above the header (the spreadsheet's title rows)
are skipped; rows for categories not in ``ClassName.txt`` are ignored. Export the official
``.xlsx`` to CSV first.

Splits (feedback-prop §4.2, following Hu et al.): per fine category, after a shuffle seeded by
``run`` (Table 1 averages runs 0..4), the first ``train_per_class`` images train, the next
``val_per_class`` validate and the next ``test_per_class`` test (50 / 10 / 40).

Batches follow docs/DESIGN.md (``image``, ``target``, ``index``, ``valid``) plus ``coarse``
(float ``[C]``) and ``general`` (float ``[G]``): 0/1 indicators of the true labels of those levels.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.common import SafeImageDataset, check_exists, distributed_eval_sampler, image_transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def sun_dir(root) -> Path:
    """``root/SUN397`` when it exists, else ``root`` itself if it holds ``ClassName.txt``."""
    root = check_exists(root, "SUN397 root")
    if (root / "ClassName.txt").is_file():
        return root
    return check_exists(root / "SUN397", "SUN397 folder (with ClassName.txt)")


def read_class_names(path) -> list[str]:
    """The fine categories of ``ClassName.txt`` (``/a/abbey`` style), in file order."""
    path = check_exists(path, "SUN397 class list")
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} lists no category")
    return names


def _clean(name: str) -> str:
    return name.strip().strip("'\"").strip()


def read_hierarchy(path, classes: list[str], num_coarse: int = 3) -> dict:
    """Parse a three-level hierarchy CSV (see module docstring) for the fine ``classes``.

    Returns ``{"coarse_names", "general_names", "fine_to_coarse" [F, C], "fine_to_general" [F, G]}``
    with float 0/1 tensors whose rows follow ``classes``.
    """
    path = check_exists(path, "SUN397 hierarchy file")
    if Path(path).suffix.lower() in (".xlsx", ".xls"):
        raise ValueError(f"{path}: save the hierarchy sheet as CSV (header: category,<coarse...>,<general...>)")
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    start = next((i for i, r in enumerate(rows) if r and _clean(r[0]).lower() == "category"), None)
    if start is None:
        raise ValueError(f"{path}: no header row starting with 'category'")
    header = [_clean(c) for c in rows[start]]
    labels = header[1:]
    while labels and not labels[-1]:
        labels.pop()
    if len(labels) <= num_coarse:
        raise ValueError(f"{path}: header has {len(labels)} label columns, need more than num_coarse={num_coarse}")
    member = {}
    for line, r in enumerate(rows[start + 1:], start=start + 2):
        name = _clean(r[0])
        values = []
        for j, c in enumerate(r[1:1 + len(labels)]):
            c = c.strip()
            try:
                values.append(float(c) if c else 0.0)
            except ValueError:
                raise ValueError(f"{path}, row {line} ({name}), column {labels[j]!r}: expected 0/1, got {c!r}") from None
        values += [0.0] * (len(labels) - len(values))
        member[name] = values
    missing = [c for c in classes if c not in member]
    if missing:
        raise ValueError(f"{path}: no hierarchy row for {len(missing)} categories of ClassName.txt, e.g. {missing[:3]}")
    table = torch.tensor([member[c] for c in classes]) > 0
    orphans = [c for c, row in zip(classes, table) if not row[:num_coarse].any()]
    if orphans:  # the known coarse labels of their images would rule every fine category out
        raise ValueError(f"{path}: {len(orphans)} categories belong to no coarse category "
                         f"(columns {labels[:num_coarse]}), e.g. {orphans[:3]}")
    return {
        "coarse_names": labels[:num_coarse],
        "general_names": labels[num_coarse:],
        "fine_to_coarse": table[:, :num_coarse].float(),
        "fine_to_general": table[:, num_coarse:].float(),
    }


class HierarchicalImageDataset(SafeImageDataset):
    """:class:`SafeImageDataset` whose samples also carry the ``coarse`` and ``general`` indicators."""

    def __init__(self, paths, targets, transform, image_size: int, fine_to_coarse: torch.Tensor, fine_to_general: torch.Tensor):
        super().__init__(paths, transform, image_size, targets=targets)
        self.fine_to_coarse, self.fine_to_general = fine_to_coarse, fine_to_general

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item["coarse"] = self.fine_to_coarse[item["target"]]
        item["general"] = self.fine_to_general[item["target"]]
        return item


class SUN397DataModule(LightningDataModule):
    """SUN397 fine categories with their general and coarse labels (feedback-prop §4.2).

    Args:
        root: folder holding ``SUN397/`` (or ``SUN397/`` itself).
        hierarchy_file: hierarchy CSV; default ``<SUN397>/hierarchy.csv``.
        image_size: images are resized to this square side.
        train_per_class, val_per_class, test_per_class: images per fine category in each split.
        run: seed of the per-category shuffle (Table 1: runs 0..4).
        num_coarse: how many label columns of the hierarchy file are coarse categories.
        scale_split: when a category has fewer images than the three counts ask for, split what it
            has in the same proportions (at least one image per split) instead of failing.

    Properties for ``link_arguments``: ``num_classes``, ``num_general``, ``num_coarse``,
    ``hierarchy`` (``fine_to_general [F, G]``, ``fine_to_coarse [F, C]``); ``train_targets``
    (fine labels of the training split, for SINN's label correlations).
    """

    def __init__(
        self,
        root: str = "data/SUN397",
        hierarchy_file: Optional[str] = None,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 2,
        train_per_class: int = 50,
        val_per_class: int = 10,
        test_per_class: int = 40,
        run: int = 0,
        num_coarse: int = 3,
        scale_split: bool = False,
    ):
        super().__init__()
        for what, n in (("train_per_class", train_per_class), ("val_per_class", val_per_class), ("test_per_class", test_per_class)):
            if n < 1:
                raise ValueError(f"{what} must be >= 1, got {n}")
        self.save_hyperparameters()
        # Plain attributes: a subclass's save_hyperparameters() may not see every base argument.
        self.root, self.hierarchy_file, self.image_size = root, hierarchy_file, image_size
        self.batch_size, self.num_workers, self.run = batch_size, num_workers, run
        self.per_class = (train_per_class, val_per_class, test_per_class)
        self.coarse_columns, self.scale_split = num_coarse, scale_split
        self._meta: dict | None = None
        self._splits: dict | None = None

    # ---------------------------------------------------------------- metadata
    def _prepare_root(self) -> None:
        """Hook for subclasses that build the data on demand."""

    def _load_meta(self) -> dict:
        if self._meta is None:
            self._prepare_root()
            base = sun_dir(self.root)
            classes = read_class_names(base / "ClassName.txt")
            hfile = self.hierarchy_file or base / "hierarchy.csv"
            meta = read_hierarchy(hfile, classes, self.coarse_columns)
            meta.update(base=base, classes=classes)
            self._meta = meta
        return self._meta

    @property
    def class_names(self) -> list[str]:
        return list(self._load_meta()["classes"])

    @property
    def num_classes(self) -> int:
        return len(self._load_meta()["classes"])

    @property
    def num_general(self) -> int:
        return len(self._load_meta()["general_names"])

    @property
    def num_coarse(self) -> int:
        return len(self._load_meta()["coarse_names"])

    @property
    def hierarchy(self) -> dict[str, torch.Tensor]:
        meta = self._load_meta()
        return {"fine_to_general": meta["fine_to_general"].clone(), "fine_to_coarse": meta["fine_to_coarse"].clone()}

    @property
    def train_targets(self) -> torch.Tensor:
        return torch.as_tensor(self._split_lists()["train"][1], dtype=torch.long)

    # ---------------------------------------------------------------- splits
    def _counts(self, n: int, category: str) -> tuple[int, int, int]:
        want = self.per_class
        if n >= sum(want):
            return want
        if not self.scale_split:
            raise ValueError(
                f"category {category} has {n} images, the split asks for {sum(want)} "
                f"({want[0]}/{want[1]}/{want[2]}); lower the counts or set scale_split=true"
            )
        if n < 3:
            raise ValueError(f"category {category} has {n} images: too few for a train/val/test split")
        n_val = max(1, round(n * want[1] / sum(want)))
        n_test = max(1, round(n * want[2] / sum(want)))
        return n - n_val - n_test, n_val, n_test

    def _split_lists(self) -> dict[str, tuple[list[Path], list[int]]]:
        if self._splits is None:
            meta = self._load_meta()
            rng = np.random.default_rng(self.run)
            splits = {"train": ([], []), "val": ([], []), "test": ([], [])}
            for k, name in enumerate(meta["classes"]):
                folder = check_exists(meta["base"] / name.lstrip("/"), f"image folder of category {name}")
                files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                order = rng.permutation(len(files))
                n_train, n_val, n_test = self._counts(len(files), name)
                bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n_train + n_val + n_test)}
                for split, (a, b) in bounds.items():
                    splits[split][0].extend(files[i] for i in order[a:b])
                    splits[split][1].extend([k] * (b - a))
            self._splits = splits
        return self._splits

    def _dataset(self, split: str) -> HierarchicalImageDataset:
        paths, targets = self._split_lists()[split]
        meta = self._load_meta()
        size = self.image_size
        return HierarchicalImageDataset(paths, targets, image_transform(size, split == "train"), size,
                                        meta["fine_to_coarse"], meta["fine_to_general"])

    def prepare_data(self) -> None:
        self._prepare_root()

    def setup(self, stage: Optional[str] = None) -> None:
        self.datasets = {split: self._dataset(split) for split in ("train", "val", "test")}

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.datasets[split]
        return DataLoader(
            ds, batch_size=self.batch_size, shuffle=train, drop_last=False,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            sampler=None if train else distributed_eval_sampler(ds),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class ScenesSUNDataModule(SUN397DataModule):
    """The SUN397 part of the embedded ``scenes`` data, built on demand under ``root``.

    ``scale_split`` is on: with ``num_images`` spread over the scene categories, a category
    with fewer than 100 images is split 50:10:40 in proportion.
    """

    def __init__(
        self,
        root: str = "data/scenes",
        num_images: int = 3000,
        size: int = 128,
        seed: int = 0,
        image_size: int = 64,
        batch_size: int = 32,
        num_workers: int = 2,
        train_per_class: int = 50,
        val_per_class: int = 10,
        test_per_class: int = 40,
        run: int = 0,
        scale_split: bool = True,
    ):
        super().__init__(root=root, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         train_per_class=train_per_class, val_per_class=val_per_class,
                         test_per_class=test_per_class, run=run, num_coarse=3, scale_split=scale_split)
        self.num_images, self.size, self.seed = num_images, size, seed

    def _prepare_root(self) -> None:
        from datamodules.scenes import ensure_scenes

        ensure_scenes(self.root, num_images=self.num_images, size=self.size, seed=self.seed)
