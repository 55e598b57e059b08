"""ILSVRC CLS-LOC image classification (generators paper §3.3, Table 1), and the same layout on ``scenes``.

Expected files under ``root`` (the folder of the official Kaggle/ILSVRC release)::

    ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG        # one folder per class
    ILSVRC/Data/CLS-LOC/val/*.JPEG                 # flat: ILSVRC2012_val_00000001.JPEG, ...
    LOC_val_solution.csv                           # ImageId,PredictionString ("<wnid> x0 y0 x1 y1 ...")
      or ILSVRC/Annotations/CLS-LOC/val/*.xml      # PASCAL VOC XML, <object><name>wnid</name>
    LOC_synset_mapping.txt                         # optional: "<wnid> <names>" lines

``root`` may also be the ``ILSVRC`` folder or the ``CLS-LOC`` folder itself; the
label files are looked for in ``root`` and its parent. Class index ``k`` is the
``k``-th wnid of the sorted train folders; class names come from
``LOC_synset_mapping.txt`` when present, else the wnids.

Splits: ``train`` is the CLS-LOC train set minus a held-out fraction per class
(``holdout``, seeded by ``seed``), which is the ``val`` split used to pick
checkpoints; ``test`` is the CLS-LOC val set, on which the paper reports Table 1.
No choice is made on ``test``.

Views: training takes a random ``crop_size`` crop of the image resized to
``resize`` (shorter side) and a random flip; ``val`` the centre crop; ``test``
(``test_views=10``) the four corner crops and the centre crop, each also
mirrored (:class:`torchvision.transforms.TenCrop`). Test batches then hold
``views`` [B, 10, 3, C, C] with ``views[:, 4]`` the centre crop, and ``image``,
that centre crop.

Bad input: a missing root or label file is an error naming the path, before any
work. A val image without a label, a label whose image is missing, and a label
whose wnid has no train folder are skipped, named in one warning and counted
(:attr:`ILSVRCDataModule.skipped`); a corrupt image is skipped at load time
(``valid=False``, ``<stage>/skipped``).
"""
from __future__ import annotations

import csv
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torchvision import transforms

from datamodules.common import IMAGENET_MEAN, IMAGENET_STD, SafeImageDataset, check_exists, distributed_eval_sampler
from topdown.warp import CENTER_VIEW

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------------------------- readers


def cls_loc_dir(root) -> Path:
    """The ``CLS-LOC`` data folder (holding ``train/`` and ``val/``) under ``root``."""
    root = check_exists(root, "ILSVRC root")
    for cand in (root / "ILSVRC" / "Data" / "CLS-LOC", root / "Data" / "CLS-LOC", root):
        if (cand / "train").is_dir() and (cand / "val").is_dir():
            return cand
    raise FileNotFoundError(f"no ILSVRC CLS-LOC train/ and val/ folders under {root} (looked for "
                            f"{root}/ILSVRC/Data/CLS-LOC, {root}/Data/CLS-LOC and {root} itself)")


def _label_dirs(root: Path, data_dir: Path) -> list[Path]:
    """Where LOC_*.{csv,txt} may lie: the root, its parent and the folder above ``ILSVRC/``."""
    out = [root, root.parent]
    if data_dir.parent.name == "Data" and data_dir.parent.parent.name == "ILSVRC":
        out.append(data_dir.parent.parent.parent)
    return list(dict.fromkeys(p.resolve() for p in out))


def read_synset_mapping(path) -> dict[str, str]:
    """``{wnid: names}`` of a ``LOC_synset_mapping.txt`` file (``n01440764 tench, Tinca tinca``)."""
    path = check_exists(path, "ILSVRC synset mapping")
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, names = line.strip().partition(" ")
        if not (wnid.startswith("n") and wnid[1:].isdigit()):
            raise ValueError(f"{path}:{n}: expected '<wnid> <names>', got {line!r}")
        out[wnid] = names.strip() or wnid
    return out


def read_val_solution(path) -> dict[str, str]:
    """``{image id: wnid}`` of ``LOC_val_solution.csv``; the class is the first wnid of ``PredictionString``."""
    path = check_exists(path, "ILSVRC val label file")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{path}: expected the header 'ImageId,PredictionString', got {header}")
        out = {}
        for n, row in enumerate(reader, 2):
            if not row or not row[0].strip():
                continue
            tokens = row[1].split() if len(row) > 1 else []
            if not tokens or not tokens[0].startswith("n"):
                raise ValueError(f"{path}:{n}: image {row[0]!r} has no wnid in its PredictionString {row[1:]}")
            out[row[0].strip()] = tokens[0]
    return out


def read_val_xml(folder) -> dict[str, str]:
    """``{image id: wnid}`` from the val XML annotations (PASCAL VOC, first ``<object><name>``)."""
    folder = check_exists(folder, "ILSVRC val annotation folder")
    out = {}
    for xml in sorted(Path(folder).glob("*.xml")):
        try:
            node = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise ValueError(f"{xml}: not valid XML ({e})") from None
        name = node.findtext("object/name")
        if not name:
            raise ValueError(f"{xml}: no <object><name> (the image's wnid)")
        out[xml.stem] = name.strip()
    return out


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _name_some(items: list[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


# ----------------------------------------------------------------------------------------------- data


def train_transform(crop_size: int, resize: int):
    """AlexNet's augmentation: resize the shorter side, a random crop, a random horizontal flip."""
    return transforms.Compose([transforms.Resize(resize, antialias=True), transforms.RandomCrop(crop_size),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class _StackViews:
    """PIL crops -> one normalised tensor [V, 3, C, C] (a class, so spawned loader workers can pickle it)."""

    def __init__(self):
        self.tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __call__(self, crops) -> torch.Tensor:
        return torch.stack([self.tensor(c) for c in crops])


def eval_transform(crop_size: int, resize: int, views: int = 1):
    """The centre crop (``views=1``), or the ten views [10, 3, C, C] (``views=10``), of the resized image."""
    resized = transforms.Resize(resize, antialias=True)
    if views == 1:
        return transforms.Compose([resized, transforms.CenterCrop(crop_size), transforms.ToTensor(),
                                   transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if views != 10:
        raise ValueError(f"views must be 1 (centre crop) or 10 (corners and centre, mirrored), got {views}")
    return transforms.Compose([resized, transforms.TenCrop(crop_size), _StackViews()])


class ClassificationDataset(SafeImageDataset):
    """:class:`SafeImageDataset` with class targets; with ``views > 1`` items also hold ``views`` [V, 3, C, C]."""

    def __init__(self, paths, targets, transform, crop_size: int, views: int = 1):
        super().__init__(paths, transform, crop_size, targets=targets)
        self.views = views

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        if self.views > 1:
            views = item["image"] if item["valid"] else torch.zeros(self.views, 3, self.image_size, self.image_size)
            item["views"], item["image"] = views, views[CENTER_VIEW]
        return item


class ILSVRCDataModule(LightningDataModule):
    """ILSVRC CLS-LOC classification (see the module docstring for layout, splits, views and skips).

    Args:
        root: release folder (holding ``ILSVRC/`` and ``LOC_*`` files), the ``ILSVRC`` or the ``CLS-LOC`` folder.
        val_labels: the val label source, a ``LOC_val_solution.csv`` file or a folder of val XML files;
            default: ``LOC_val_solution.csv`` beside the data, else ``Annotations/CLS-LOC/val``.
        crop_size: side of the network's input (224 for AlexNet on ImageNet).
        resize: the shorter side is resized to this before cropping (256 on ImageNet).
        holdout: fraction of each class's train images held out as the ``val`` split (model selection).
        seed: seed of that hold-out draw.
        test_views: 10 (the paper's multi-view evaluation, centre crop included) or 1 (centre crop only).
        max_train_per_class: cap on train images per class (for quick runs), None = all.

    Properties for ``link_arguments``: ``num_classes``, ``crop_size``; also ``wnids``, ``class_names``, ``skipped``.
    """

    def __init__(self, root: str = "data/imagenet", val_labels: Optional[str] = None, crop_size: int = 224,
                 resize: int = 256, batch_size: int = 128, num_workers: int = 8, holdout: float = 0.01, seed: int = 0,
                 test_views: int = 10, max_train_per_class: Optional[int] = None):
        super().__init__()
        if not 0 <= holdout < 1:
            raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout}")
        if crop_size > resize:
            raise ValueError(f"crop_size {crop_size} is larger than resize {resize}: a crop must fit in the image")
        if test_views not in (1, 10):
            raise ValueError(f"test_views must be 1 or 10, got {test_views}")
        self.root, self.val_labels, self.crop_size, self.resize = root, val_labels, int(crop_size), int(resize)
        self.batch_size, self.num_workers, self.holdout, self.seed = batch_size, num_workers, holdout, seed
        self.test_views, self.max_train_per_class = test_views, max_train_per_class
        self._index: dict | None = None
        self._datasets: dict[str, ClassificationDataset] = {}

    # ---------------------------------------------------------------- reading
    def _prepare_root(self) -> None:
        """Hook for subclasses that build the data on demand."""

    def _label_source(self, root: Path, data_dir: Path) -> tuple[str, Path]:
        if self.val_labels:
            path = check_exists(self.val_labels, "ILSVRC val label file")
            return ("xml" if path.is_dir() else "csv"), path
        looked = []
        for d in _label_dirs(root, data_dir):
            looked.append(d / "LOC_val_solution.csv")
            if looked[-1].is_file():
                return "csv", looked[-1]
        for ann in (data_dir.parent.parent / "Annotations" / "CLS-LOC" / "val", root / "Annotations" / "CLS-LOC" / "val"):
            looked.append(ann)
            if ann.is_dir():
                return "xml", ann
        raise FileNotFoundError("ILSVRC val labels not found: looked for " + ", ".join(str(p) for p in looked)
                                + " (or pass val_labels)")

    def _read(self) -> dict:
        if self._index is not None:
            return self._index
        self._prepare_root()
        root = Path(self.root)
        data_dir = cls_loc_dir(root)
        kind, label_path = self._label_source(root, data_dir)  # before listing: a missing file fails fast
        wnids = sorted(p.name for p in (data_dir / "train").iterdir() if p.is_dir())
        if not wnids:
            raise ValueError(f"{data_dir / 'train'} holds no class folder (train/<wnid>/*.JPEG)")
        names = {}
        for d in _label_dirs(root, data_dir):
            if (d / "LOC_synset_mapping.txt").is_file():
                names = read_synset_mapping(d / "LOC_synset_mapping.txt")
                break
        index = {w: k for k, w in enumerate(wnids)}
        rng = np.random.default_rng([self.seed, 0x1C])
        splits = {s: ([], []) for s in SPLITS}
        for w in wnids:
            files = _images(data_dir / "train" / w)
            if self.max_train_per_class is not None:
                files = files[: self.max_train_per_class]
            order = rng.permutation(len(files))
            n_hold = int(round(self.holdout * len(files)))
            for rank, i in enumerate(order):
                split = "val" if rank < n_hold else "train"
                splits[split][0].append(files[i])
                splits[split][1].append(index[w])
        labels = read_val_solution(label_path) if kind == "csv" else read_val_xml(label_path)
        on_disk = {p.stem: p for p in _images(data_dir / "val")}
        skipped = {
            "unlabelled": sorted(str(on_disk[s]) for s in on_disk if s not in labels),
            "missing": sorted(str(data_dir / "val" / f"{s}.JPEG") for s in labels if s not in on_disk),
            "unknown_class": sorted(f"{on_disk[s]} ({labels[s]})" for s in labels
                                    if s in on_disk and labels[s] not in index),
        }
        for stem in sorted(on_disk):
            if stem in labels and labels[stem] in index:
                splits["test"][0].append(on_disk[stem])
                splits["test"][1].append(index[labels[stem]])
        reasons = {"unlabelled": f"without a label in {label_path}", "missing": f"listed in {label_path} but not on disk",
                   "unknown_class": "whose wnid has no train folder"}
        for reason, items in skipped.items():
            if items:
                warnings.warn(f"ILSVRC val: {len(items)} image(s) {reasons[reason]} skipped: {_name_some(items)}",
                              stacklevel=2)
        if not splits["test"][0]:
            raise ValueError(f"no labelled val image under {data_dir / 'val'} (labels from {label_path})")
        self._index = {"wnids": wnids, "names": [names.get(w, w) for w in wnids], "splits": splits,
                       "skipped": skipped, "labels_from": str(label_path)}
        return self._index

    @property
    def wnids(self) -> list[str]:
        return list(self._read()["wnids"])

    @property
    def class_names(self) -> list[str]:
        return list(self._read()["names"])

    @property
    def num_classes(self) -> int:
        return len(self._read()["wnids"])

    @property
    def skipped(self) -> dict[str, list[str]]:
        """Val images left out while reading, by reason: ``unlabelled``, ``missing``, ``unknown_class``."""
        return {k: list(v) for k, v in self._read()["skipped"].items()}

    def skipped_count(self, split: str) -> int:
        """Images of ``split`` left out while reading (only ``test``, the CLS-LOC val set, has any)."""
        return sum(len(v) for v in self._read()["skipped"].values()) if split == "test" else 0

    # ---------------------------------------------------------------- lightning
    def dataset(self, split: str) -> ClassificationDataset:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._datasets:
            paths, targets = self._read()["splits"][split]
            if split == "train":
                tf, views = train_transform(self.crop_size, self.resize), 1
            else:
                views = self.test_views if split == "test" else 1
                tf = eval_transform(self.crop_size, self.resize, views)
            self._datasets[split] = ClassificationDataset(paths, targets, tf, self.crop_size, views)
        return self._datasets[split]

    def prepare_data(self) -> None:
        self._prepare_root()

    def setup(self, stage: Optional[str] = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS):
            self.dataset(split)

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.dataset(split)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=train, drop_last=False,
                          sampler=None if train else distributed_eval_sampler(ds), num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        if not len(self.dataset("val")):
            raise ValueError(f"the val split is empty (holdout={self.holdout}): raise holdout or turn validation off")
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class ScenesILSVRCDataModule(ILSVRCDataModule):
    """The CLS-LOC view of the embedded ``scenes`` data (:func:`datamodules.scenes.write_classification_view`).

    Built on demand under ``root``; a build that predates the view gets it added. Images are
    ``size`` px (128 by default), so the defaults resize to 112 and crop 96 (AlexNet's conv5 is
    then 5x5; 224 / 256 on ImageNet give 13x13).
    """

    def __init__(self, root: str = "data/scenes", num_images: int = 3000, size: int = 128, scenes_seed: int = 0,
                 crop_size: int = 96, resize: int = 112, batch_size: int = 64, num_workers: int = 1,
                 holdout: float = 0.1, seed: int = 0, test_views: int = 10, max_train_per_class: Optional[int] = None):
        super().__init__(root=root, crop_size=crop_size, resize=resize, batch_size=batch_size,
                         num_workers=num_workers, holdout=holdout, seed=seed, test_views=test_views,
                         max_train_per_class=max_train_per_class)
        self.num_images, self.size, self.scenes_seed = num_images, size, scenes_seed

    def _prepare_root(self) -> None:
        from datamodules.scenes import ensure_classification_view, ensure_scenes

        ensure_scenes(self.root, num_images=self.num_images, size=self.size, seed=self.scenes_seed)
        ensure_classification_view(self.root)


__all__ = ["ILSVRCDataModule", "ScenesILSVRCDataModule", "ClassificationDataset", "read_val_solution", "read_val_xml",
           "read_synset_mapping", "cls_loc_dir", "train_transform", "eval_transform"]
