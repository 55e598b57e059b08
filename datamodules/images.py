"""Plain images, for training a feature-inversion decoder (Dosovitskiy & Brox 2016; generators paper Fig. 3, A2).

``dataset="scenes"``: the embedded data (built on demand) or any COCO-2014 layout:
``ROOT/train2014/*.jpg`` trains, ``ROOT/val2014/*.jpg`` is held out.
``dataset="folder"``: every image under ``ROOT`` (recursively; ``.jpg .jpeg .png .bmp
.webp``, any case), in sorted path order; every ``round(1/held_out)``-th is held
out. The held-out images give the validation split (the first ``val_images``)
and the test split (the next ``test_images``).

Images are resized to ``image_size`` x ``image_size`` (no crop), flipped at random
when training, and ImageNet-normalised (:func:`datamodules.common.image_transform`).
A missing or corrupt file gives ``valid=False`` and a warning naming it
(:class:`datamodules.common.SafeImageDataset`); the module counts it as skipped.
"""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.common import SafeImageDataset, check_exists, distributed_eval_sampler, image_transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); an error naming the folder when there are none."""
    folder = check_exists(folder, "image folder")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return found


class ImageFolderDataModule(LightningDataModule):
    """Images of ``scenes`` (or a COCO-2014 layout) or of any folder; batches ``image``, ``index``, ``valid``.

    Args:
        root: the dataset folder.
        dataset: ``"scenes"`` (``train2014`` / ``val2014``; the embedded data is built when absent) or
            ``"folder"`` (any tree of images).
        image_size: side of the square images (224 for AlexNet conv1 55 x 55, conv5 13 x 13).
        max_images: cap on the training images (None: all).
        val_images, test_images: held-out images for validation and test.
        held_out: fraction held out of a plain folder.
    """

    def __init__(self, root: str = "data/scenes", dataset: str = "scenes", image_size: int = 224,
                 batch_size: int = 16, num_workers: int = 0, max_images: int | None = None, val_images: int = 64,
                 test_images: int = 64, held_out: float = 0.1, scenes_images: int = 3000, scenes_size: int = 128):
        super().__init__()
        if dataset not in ("scenes", "folder"):
            raise ValueError(f"unknown dataset {dataset!r}; choose 'scenes' or 'folder'")
        if not 0 < held_out < 1:
            raise ValueError(f"held_out must be in (0, 1), got {held_out}")
        self.root, self.dataset = root, dataset
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.max_images, self.val_images, self.test_images = max_images, int(val_images), int(test_images)
        self.held_out = float(held_out)
        self.scenes_args = dict(num_images=scenes_images, size=scenes_size, seed=0)
        self.paths: dict[str, list[Path]] = {}

    def prepare_data(self) -> None:
        if self.dataset == "scenes" and not (Path(self.root) / "train2014").is_dir():
            from datamodules.scenes import ensure_scenes

            ensure_scenes(self.root, **self.scenes_args)

    def _split(self) -> tuple[list[Path], list[Path]]:
        root = check_exists(self.root, f"{self.dataset} root")
        if self.dataset == "scenes":
            return list_images(root / "train2014"), list_images(root / "val2014")
        images = list_images(root)
        step = max(2, round(1 / self.held_out))
        return ([p for i, p in enumerate(images) if i % step != step - 1],
                [p for i, p in enumerate(images) if i % step == step - 1])

    def setup(self, stage: str | None = None) -> None:
        if self.paths:
            return
        train, held = self._split()
        if self.max_images is not None:
            train = train[: self.max_images]
        if not train:
            raise RuntimeError(f"no training images in {self.root}")
        val = held[: self.val_images]
        test = held[self.val_images: self.val_images + self.test_images] or val
        self.paths = {"train": train, "val": val, "test": test}

    def dataset_for(self, split: str) -> SafeImageDataset:
        paths = self.paths[split]
        return SafeImageDataset(paths, image_transform(self.image_size, split == "train"), self.image_size,
                                targets=[0] * len(paths))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset_for("train"), batch_size=self.batch_size, shuffle=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0, drop_last=False)

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self.dataset_for(split)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          sampler=distributed_eval_sampler(ds))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


__all__ = ["ImageFolderDataModule", "list_images", "IMAGE_SUFFIXES"]
