"""COCO-2014 multi-label annotation with caption concepts (feedback-prop §4.1).

Splits follow the paper: train2014 (82,783 images) trains; val2014 is divided
with ``split_seed`` into validation (20,000) and test (the remaining 20,504).
Labels are the ``vocab_size`` most frequent caption words of train2014 (see
:mod:`topdown.text`); ``label_weights`` are eq. 6's lambda_j = #negatives /
#positives on the training split.

Both the vocabulary (``vocab_<K>.txt``) and the label matrices
(``vocab_<K>.labels.npz``) are cached next to each other, in ``root`` or, when
``root`` is read-only, in ``~/.cache/topdown/``, so a second run starts fast.  Both are
keyed on what built them (the annotation files, the vocabulary size and the caption
pipeline: stop words, lemmatizer, NLTK version; :func:`topdown.text.pipeline_key`): a
change rebuilds them, with a warning saying why.  A ``vocab_file`` the user names is used as
given.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from datamodules.common import (SafeImageDataset, SplitLoaders, check_exists, image_transform,
                                split_count)
from topdown.losses import label_weights
from topdown.text import (build_vocabulary, labels_from_captions, load_vocabulary, pipeline_key, save_vocabulary,
                          vocabulary_key)

PREPROCESS = ("square", "resize_crop")
_CACHE_VERSION = 2


@contextmanager
def _file_lock(path: Path):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_captions(path: Path) -> tuple[np.ndarray, list[str], list[list[str]]]:
    """(image ids sorted, file names, captions per image) of a COCO captions file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"COCO captions file is not valid JSON: {path} ({err})") from None
    for key in ("images", "annotations"):
        if key not in data:
            raise KeyError(f"COCO captions file {path} has no '{key}' list")
    images = sorted(data["images"], key=lambda im: im["id"])
    row = {im["id"]: i for i, im in enumerate(images)}
    caps: list[list[str]] = [[] for _ in images]
    for ann in data["annotations"]:
        i = row.get(ann["image_id"])
        if i is None:
            raise KeyError(f"caption {ann.get('id')} in {path} refers to unknown image_id {ann['image_id']}")
        caps[i].append(ann["caption"])
    return np.array([im["id"] for im in images], np.int64), [im["file_name"] for im in images], caps


class COCOMultiLabelDataModule(SplitLoaders, LightningDataModule):
    """COCO-2014 caption-concept multi-label data (feedback-prop §4.1); batches as in docs/DESIGN.md.

    ``preprocess``: ``"square"`` resizes every image to ``image_size`` squared; ``"resize_crop"``
    is the reference code's recipe, short side to ``resize_size`` (256 for 224) and a 224 crop
    (:func:`datamodules.common.image_transform`).
    """

    image_dirs = {"train": "train2014", "val": "val2014"}

    def __init__(self, root: str = "data/coco", vocab_size: int = 1000, vocab_file: str | None = None,
                 image_size: int = 224, batch_size: int = 32, num_workers: int = 2,
                 val_size: int | float = 20000, split_seed: int = 0, max_train_images: int | None = None,
                 preprocess: Literal["square", "resize_crop"] = "square", resize_size: int | None = None):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if preprocess not in PREPROCESS:
            raise ValueError(f"unknown preprocess {preprocess!r}; choose from {PREPROCESS}")
        self.preprocess, self.resize_size = preprocess, resize_size
        if max_train_images is not None and max_train_images < 1:
            raise ValueError(f"max_train_images must be positive or None, got {max_train_images}")
        self.root = Path(root)
        self.vocab_size = vocab_size
        self.vocab_file = vocab_file
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.split_seed = split_seed
        self.max_train_images = max_train_images
        self._data: dict | None = None
        self._datasets: dict = {}

    # ------------------------------------------------------------------ paths
    def _ensure_root(self) -> None:
        check_exists(self.root, "COCO-2014 root folder")

    def _annotation(self, split: str) -> Path:
        return check_exists(self.root / "annotations" / f"captions_{split}2014.json",
                            f"COCO captions annotation file ({split}2014)")

    def vocab_path(self) -> Path:
        """Where the vocabulary lives: ``vocab_file``, else ``<root>/vocab_<K>.txt`` (or a user cache)."""
        if self.vocab_file is not None:
            return Path(self.vocab_file)
        name = f"vocab_{self.vocab_size}.txt"
        if os.access(self.root, os.W_OK):
            return self.root / name
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "topdown" / f"{self.root.name}-{key}"
        return base / name

    # ------------------------------------------------------------ label data
    def _prepare(self) -> dict:
        """Read captions, vocabulary and label matrices once (from the cache when it is current)."""
        if self._data is not None:
            return self._data
        self._ensure_root()
        ann = {s: self._annotation(s) for s in ("train", "val")}
        for s, d in self.image_dirs.items():
            check_exists(self.root / d, f"COCO image folder ({d})")
        vpath = self.vocab_path()
        vpath.parent.mkdir(parents=True, exist_ok=True)
        cache = vpath.with_name(vpath.stem + ".labels.npz")
        pipeline = pipeline_key()
        stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in ann.values())
        stamp += f"|{pipeline}"
        train = ann["train"].stat()
        vkey = hashlib.sha1(f"{self.vocab_size}|{pipeline}|{train.st_size}:{train.st_mtime_ns}".encode()).hexdigest()[:16]
        with _file_lock(vpath.with_name(vpath.name + ".lock")):  # DDP ranks: one builds, others load
            vocab = self._current_vocabulary(vpath, vkey)
            data = None if vocab is None else self._load_cache(cache, vocab, stamp)
            if data is None:
                data = self._build(ann, vpath, cache, stamp, vkey, vocab)
        self._data = self._make_splits(data)
        return self._data

    def _current_vocabulary(self, vpath: Path, vkey: str) -> list[str] | None:
        """The vocabulary file's words when they can be used, else None (it must be built again)."""
        if not vpath.is_file():
            return None
        words, key = load_vocabulary(vpath), vocabulary_key(vpath)
        if self.vocab_file is not None:  # the user's file: used as given
            if key not in (None, vkey):
                warnings.warn(f"vocabulary {vpath} was built with other settings; using it as given", stacklevel=4)
            if len(words) != self.vocab_size:
                warnings.warn(f"vocabulary {vpath} has {len(words)} words, vocab_size={self.vocab_size}; "
                              "using the file", stacklevel=4)
            return words
        if key == vkey:
            return words
        why = ("it has no build key (an older file)" if key is None else
               "it was built with other settings (vocabulary size, caption pipeline or train captions)")
        warnings.warn(f"building the vocabulary {vpath} again: {why}", stacklevel=4)
        return None

    def _load_cache(self, cache: Path, vocab: list[str], stamp: str):
        if not cache.is_file():
            return None
        try:
            with np.load(cache, allow_pickle=False) as z:
                if (int(z["version"]) != _CACHE_VERSION or str(z["stamp"]) != stamp
                        or str(z["vocab_hash"]) != _vocab_hash(vocab)):
                    return None
                out = {"vocab": vocab}
                for s in ("train", "val"):
                    n = int(z[f"{s}_n"])
                    out[s] = {"ids": z[f"{s}_ids"], "files": z[f"{s}_files"].tolist(),
                              "labels": np.unpackbits(z[f"{s}_labels"], axis=1, count=len(vocab))[:n]}
                return out
        except (OSError, KeyError, ValueError) as err:
            warnings.warn(f"ignoring unreadable label cache {cache}: {err}", stacklevel=2)
            return None

    def _build(self, ann: dict, vpath: Path, cache: Path, stamp: str, vkey: str, vocab: list[str] | None) -> dict:
        read = {s: _read_captions(ann[s]) for s in ("train", "val")}
        if vocab is None:
            vocab = build_vocabulary((c for caps in read["train"][2] for c in caps), self.vocab_size)
            if len(vocab) < self.vocab_size:
                warnings.warn(f"train2014 captions in {ann['train']} hold only {len(vocab)} distinct words, "
                              f"fewer than vocab_size={self.vocab_size}", stacklevel=3)
            _atomic(vpath, lambda p: save_vocabulary(vocab, p, key=vkey))
        out = {"vocab": vocab}
        arrays = {"version": _CACHE_VERSION, "stamp": stamp, "vocab_hash": _vocab_hash(vocab)}
        for s, (ids, files, caps) in read.items():
            labels = labels_from_captions(caps, vocab)
            out[s] = {"ids": ids, "files": files, "labels": labels}
            arrays.update({f"{s}_ids": ids, f"{s}_files": np.array(files), f"{s}_n": len(ids),
                           f"{s}_labels": np.packbits(labels, axis=1)})
        try:
            _atomic(cache, lambda p: np.savez(p, **arrays), suffix=".npz")
        except OSError as err:
            warnings.warn(f"could not write the label cache {cache}: {err}", stacklevel=3)
        return out

    def _make_splits(self, data: dict) -> dict:
        train_n, val_n = len(data["train"]["ids"]), len(data["val"]["ids"])
        rng = np.random.default_rng(self.split_seed)
        train_rows = np.arange(train_n)
        if self.max_train_images is not None and self.max_train_images < train_n:
            train_rows = np.sort(rng.permutation(train_n)[: self.max_train_images])
        n_val = split_count(self.val_size, val_n, "val_size")
        perm = np.random.default_rng([self.split_seed, 1]).permutation(val_n)
        rows = {"train": train_rows, "val": np.sort(perm[:n_val]), "test": np.sort(perm[n_val:])}
        splits = {}
        for split, r in rows.items():
            src = data["train" if split == "train" else "val"]
            folder = self.root / self.image_dirs["train" if split == "train" else "val"]
            splits[split] = {"ids": src["ids"][r], "paths": [folder / src["files"][i] for i in r],
                             "labels": src["labels"][r]}
        return {"vocab": data["vocab"], "splits": splits}

    # ---------------------------------------------------- linked properties
    @property
    def vocabulary(self) -> list[str]:
        """The concept words, label j is ``vocabulary[j]``."""
        return list(self._prepare()["vocab"])

    @property
    def num_labels(self) -> int:
        return len(self._prepare()["vocab"])

    @property
    def label_weights(self) -> torch.Tensor:
        """Eq. 6's lambda_j = sum_i (1 - y_ij) / sum_i y_ij over the training split, float32 [K]
        (:func:`topdown.losses.label_weights`: a label without a positive gets the largest finite
        weight, with a warning naming the words)."""
        data = self._prepare()
        if "label_weights" not in data:
            data["label_weights"] = label_weights(torch.from_numpy(data["splits"]["train"]["labels"]), data["vocab"])
        return data["label_weights"].clone()

    def split_labels(self, split: str) -> np.ndarray:
        """Label matrix [N, K] uint8 of ``split`` (train, val or test), rows in ``index`` order."""
        return self._split(split)["labels"]

    def split_image_ids(self, split: str) -> np.ndarray:
        """COCO image ids of ``split``, in ``index`` order."""
        return self._split(split)["ids"]

    # ----------------------------------------------------------- lightning
    def dataset(self, split: str) -> SafeImageDataset:
        """The dataset of ``split`` (train, val or test); built once."""
        if split not in self._datasets:
            s = self._split(split)
            self._datasets[split] = SafeImageDataset(
                s["paths"], image_transform(self.image_size, train=split == "train", preprocess=self.preprocess,
                                            resize_size=self.resize_size), self.image_size,
                labels=s["labels"])
        return self._datasets[split]



class ScenesMultiLabelDataModule(COCOMultiLabelDataModule):
    """The same task on the embedded ``scenes`` data, built under ``root`` on first use."""

    def __init__(self, root: str = "data/scenes", vocab_size: int = 100, vocab_file: str | None = None,
                 image_size: int = 128, batch_size: int = 32, num_workers: int = 2,
                 val_size: int | float = 0.5, split_seed: int = 0, max_train_images: int | None = None,
                 num_images: int = 3000, size: int = 128, seed: int = 0,
                 preprocess: Literal["square", "resize_crop"] = "square", resize_size: int | None = None):
        super().__init__(root=root, vocab_size=vocab_size, vocab_file=vocab_file, image_size=image_size,
                         batch_size=batch_size, num_workers=num_workers, val_size=val_size,
                         split_seed=split_seed, max_train_images=max_train_images, preprocess=preprocess,
                         resize_size=resize_size)
        self.num_images = num_images
        self.size = size
        self.seed = seed

    def _ensure_root(self) -> None:
        from datamodules.scenes import ensure_scenes

        ensure_scenes(self.root, num_images=self.num_images, size=self.size, seed=self.seed)


def _vocab_hash(vocab) -> str:
    return hashlib.sha1("\n".join(vocab).encode()).hexdigest()


def _atomic(path: Path, write, suffix: str = "") -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
