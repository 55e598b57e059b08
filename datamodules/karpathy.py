"""COCO captions in Karpathy's split, joined with the COCO object instances (feedback-prop §4.4).

Files under ``root`` (COCO-2014 layout; the embedded ``scenes`` data writes the same):

```
annotations/dataset_coco.json                             # Karpathy's split file (split_file)
annotations/instances_train2014.json  instances_val2014.json
train2014/COCO_train2014_*.jpg   val2014/COCO_val2014_*.jpg   # <filepath>/<filename> of the split file
```

* The split file lists ``images[]`` with ``filepath``, ``filename``, ``cocoid``, ``split``
  (``train``, ``restval``, ``val``, ``test``) and ``sentences[]`` (``tokens``, ``raw``).
  ``restval`` trains. ``split="paper"`` is §4.4's own split instead: all images shuffled with
  ``split_seed``, ``val_size`` for validation and ``test_size`` for test (5,000 each on COCO),
  the rest for training.
* Object labels: COCO category ids (1-90 with gaps) map to ``0..K-1`` in the order of the
  instances file's ``categories``; the names are kept (``object_names``). An image carries
  category j when it has an instance of it. Images missing from the instances files are skipped
  with a warning naming them and counted (``skipped_no_instances``, logged by the module as
  ``<stage>/skipped_no_instances``).
* Captions: the caption vocabulary of :func:`topdown.captions.caption_vocabulary` (words seen
  ``min_count`` times in the training captions clipped at ``max_len`` tokens), saved as
  ``captions_vocab.json`` beside the data with the settings that built it; a changed setting
  rebuilds it. The joined object labels are cached beside it (``karpathy_objects.npz``), keyed by
  the instances files, because COCO's instances files take a while to parse.

Batches (docs/DESIGN.md): ``image``, ``labels`` (object labels, float [K]), ``captions`` (long
[C, max_len + 2], C = ``captions_per_image``: a random C of the image's captions when training,
the first C otherwise), ``image_id``, ``index``, ``valid``.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from datamodules.coco import _atomic, _file_lock
from datamodules.common import SPLITS, SafeImageDataset, SplitLoaders, check_exists, image_transform, split_count
from topdown.captions import CaptionVocab, caption_vocabulary, tokenize
from topdown.losses import label_weights as eq6_weights

KARPATHY_SPLITS = ("train", "restval", "val", "test")
_OBJECTS_CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------

def read_karpathy(path: str | Path) -> list[dict]:
    """Images of a Karpathy split file: ``cocoid``, ``filepath``, ``filename``, ``split``,
    ``tokens`` (a list per sentence) and ``raw`` (the sentences).

    A missing file, invalid JSON, a missing field or an unknown split is an error naming the file
    (and the image).
    """
    path = check_exists(path, "Karpathy split file (dataset_coco.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"Karpathy split file is not valid JSON: {path} ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise KeyError(f"Karpathy split file {path} has no 'images' list")
    out = []
    for n, im in enumerate(data["images"]):
        missing = [k for k in ("filepath", "filename", "cocoid", "split", "sentences") if k not in im]
        if missing:
            raise KeyError(f"{path}: image #{n} ({im.get('filename', '?')}) lacks {missing}")
        if im["split"] not in KARPATHY_SPLITS:
            raise ValueError(f"{path}: image {im['filename']} has split {im['split']!r}; expected one of {KARPATHY_SPLITS}")
        if not im["sentences"]:
            raise ValueError(f"{path}: image {im['filename']} has no sentences")
        raw = [s["raw"] for s in im["sentences"]]
        tokens = [[t.lower() for t in s["tokens"]] if s.get("tokens") else tokenize(s["raw"]) for s in im["sentences"]]
        out.append({"cocoid": int(im["cocoid"]), "filepath": im["filepath"], "filename": im["filename"],
                    "split": im["split"], "tokens": tokens, "raw": raw})
    return out


def read_instances(paths) -> tuple[list[dict], dict[int, np.ndarray]]:
    """Categories (``id``, ``name``, in the first file's order) and each image's object labels.

    Returns ``(categories, labels)`` with ``labels[cocoid]`` a uint8 [K] vector; every image of
    the files' ``images`` lists has an entry (all zeros when it has no instance).
    """
    categories: list[dict] | None = None
    labels: dict[int, np.ndarray] = {}
    for path in paths:
        path = check_exists(path, "COCO instances file")
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"COCO instances file is not valid JSON: {path} ({err})") from None
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise KeyError(f"COCO instances file {path} has no '{key}' list")
        cats = [{"id": int(c["id"]), "name": c["name"]} for c in data["categories"]]
        if categories is None:
            categories = cats
        elif cats != categories:
            raise ValueError(f"COCO instances file {path} lists other categories than {paths[0]}")
        column = {c["id"]: j for j, c in enumerate(categories)}
        for im in data["images"]:
            labels.setdefault(int(im["id"]), np.zeros(len(categories), np.uint8))
        for ann in data["annotations"]:
            row = labels.get(int(ann["image_id"]))
            if row is None:
                raise KeyError(f"instance {ann.get('id')} in {path} refers to unknown image_id {ann['image_id']}")
            j = column.get(int(ann["category_id"]))
            if j is None:
                raise KeyError(f"instance {ann.get('id')} in {path} has unknown category_id {ann['category_id']}")
            row[j] = 1
    return categories or [], labels


def paper_split(n: int, val_size: int | float, test_size: int | float, seed: int) -> np.ndarray:
    """§4.4's split of ``n`` images: 0 train, 1 val, 2 test, from a shuffle with ``seed``."""
    n_val, n_test = split_count(val_size, n, "val_size"), split_count(test_size, n, "test_size")
    if n_val + n_test > n:
        raise ValueError(f"val_size + test_size = {n_val + n_test} exceeds the {n} images")
    order = np.random.default_rng([seed, 0x44]).permutation(n)
    out = np.zeros(n, np.int64)
    out[order[:n_val]] = 1
    out[order[n_val:n_val + n_test]] = 2
    return out


# ---------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------

class CaptionImageDataset(SafeImageDataset):
    """:class:`SafeImageDataset` with object labels, encoded captions and COCO image ids.

    ``captions`` is an int64 array ``[N, M, max_len + 2]`` with ``counts[i]`` real captions for
    image i; an item holds ``per_image`` of them (random ones when ``sample`` is set).
    """

    def __init__(self, paths, transform, image_size, labels, image_ids, captions, counts, per_image: int,
                 sample: bool):
        super().__init__(paths, transform, image_size, labels=labels)
        self.image_ids = np.asarray(image_ids, np.int64)
        self.captions, self.counts = captions, np.asarray(counts, np.int64)
        self.per_image, self.sample = per_image, sample

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        n = int(self.counts[index])
        if self.sample:
            pick = torch.randperm(n)[:self.per_image].numpy()
            if len(pick) < self.per_image:  # fewer captions than asked: repeat some at random
                pick = np.concatenate([pick, torch.randint(n, (self.per_image - len(pick),)).numpy()])
        else:
            pick = np.arange(self.per_image) % n
        item["captions"] = torch.from_numpy(self.captions[index, pick])
        item["image_id"] = torch.tensor(self.image_ids[index])
        return item


# ---------------------------------------------------------------------------------------
# Datamodule
# ---------------------------------------------------------------------------------------

class KarpathyCaptionsDataModule(SplitLoaders, LightningDataModule):
    """COCO captions (Karpathy split) with the 80 object categories as multi-label targets (§4.4).

    Args:
        root: COCO-2014 folder (images under ``<root>/<filepath>/<filename>``).
        split_file: Karpathy's ``dataset_coco.json`` (default ``<root>/annotations/dataset_coco.json``).
        instances_dir: folder of ``instances_{train,val}2014.json`` (default ``<root>/annotations``).
        split: ``karpathy`` (the file's split, restval trains) or ``paper`` (§4.4: a seeded shuffle,
            ``val_size`` / ``test_size`` images, int or fraction).
        min_count, max_len: caption vocabulary threshold and caption length in tokens.
        vocab_file: where the vocabulary lives (default ``captions_vocab.json`` beside the data).
        captions_per_image: captions per image in a batch (they share the image's CNN pass).
        max_train_images, max_val_images, max_test_images: seeded random subsets (None: all).
    """

    def __init__(self, root: str = "data/coco", split_file: str | None = None, instances_dir: str | None = None,
                 split: str = "karpathy", split_seed: int = 0, val_size: int | float = 5000,
                 test_size: int | float = 5000, min_count: int = 5, max_len: int = 16,
                 vocab_file: str | None = None, captions_per_image: int = 5, image_size: int = 224,
                 batch_size: int = 32, num_workers: int = 2, max_train_images: int | None = None,
                 max_val_images: int | None = None, max_test_images: int | None = None):
        super().__init__()
        if split not in ("karpathy", "paper"):
            raise ValueError(f"split must be 'karpathy' or 'paper', got {split!r}")
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")
        for name, v in (("max_train_images", max_train_images), ("max_val_images", max_val_images),
                        ("max_test_images", max_test_images)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be positive or None, got {v}")
        self.root = Path(root)
        self.split_file = split_file
        self.instances_dir = instances_dir
        self.split, self.split_seed = split, split_seed
        self.val_size, self.test_size = val_size, test_size
        self.min_count, self.max_len = min_count, max_len
        self.vocab_file = vocab_file
        self.captions_per_image = captions_per_image
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.limits = {"train": max_train_images, "val": max_val_images, "test": max_test_images}
        self._data: dict | None = None
        self._datasets: dict = {}

    # ------------------------------------------------------------------ paths
    def _ensure_root(self) -> None:
        check_exists(self.root, "COCO-2014 root folder")

    def split_path(self) -> Path:
        return Path(self.split_file) if self.split_file else self.root / "annotations" / "dataset_coco.json"

    def instances_paths(self) -> list[Path]:
        folder = Path(self.instances_dir) if self.instances_dir else self.root / "annotations"
        return [folder / f"instances_{s}2014.json" for s in ("train", "val")]

    def _beside_data(self, name: str) -> Path:
        """``<root>/name``, or a per-user cache folder when ``root`` is read-only."""
        if os.access(self.root, os.W_OK):
            return self.root / name
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "topdown" / f"{self.root.name}-{key}"
        return base / name

    def vocab_path(self) -> Path:
        return Path(self.vocab_file) if self.vocab_file else self._beside_data("captions_vocab.json")

    # ------------------------------------------------------------------ reading
    def _prepare(self) -> dict:
        if self._data is not None:
            return self._data
        self._ensure_root()
        split_path = check_exists(self.split_path(), "Karpathy split file (dataset_coco.json)")
        inst = [check_exists(p, "COCO instances file") for p in self.instances_paths()]
        images = read_karpathy(split_path)
        categories, labels = self._object_labels(inst)

        missing = [im for im in images if im["cocoid"] not in labels]
        if self.split == "karpathy":
            part = np.array([{"train": 0, "restval": 0, "val": 1, "test": 2}[im["split"]] for im in images], np.int64)
        else:
            part = paper_split(len(images), self.val_size, self.test_size, self.split_seed)
        skipped = {s: [] for s in SPLITS}
        rows = {s: [] for s in SPLITS}
        for i, im in enumerate(images):
            s = SPLITS[part[i]]
            (rows[s] if im["cocoid"] in labels else skipped[s]).append(i)
        if missing:
            names = [f"{im['filepath']}/{im['filename']} (cocoid {im['cocoid']})" for im in missing[:10]]
            warnings.warn(f"{len(missing)} images of {split_path} have no entry in the instances files "
                          f"({', '.join(str(p) for p in inst)}) and are skipped: {'; '.join(names)}"
                          f"{' ...' if len(missing) > 10 else ''} "
                          f"(per split: {', '.join(f'{s} {len(v)}' for s, v in skipped.items())})", stacklevel=3)

        vocab = self._vocabulary(split_path, [images[i] for i in rows["train"]])
        splits = {}
        for s in SPLITS:
            r = np.array(rows[s], np.int64)
            limit = self.limits[s]
            if limit is not None and limit < len(r):
                r = np.sort(np.random.default_rng([self.split_seed, SPLITS.index(s), 7]).permutation(r)[:limit])
            splits[s] = self._encode([images[i] for i in r], labels, vocab, len(categories))
        self._data = {"categories": categories, "vocab": vocab, "splits": splits,
                      "skipped": {s: len(v) for s, v in skipped.items()},
                      "skipped_names": {s: [images[i]["filename"] for i in v] for s, v in skipped.items()}}
        return self._data

    def _object_labels(self, inst: list[Path]) -> tuple[list[dict], dict[int, np.ndarray]]:
        """:func:`read_instances`, through a cache keyed by the instances files."""
        cache = self._beside_data("karpathy_objects.npz")
        cache.parent.mkdir(parents=True, exist_ok=True)
        stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in inst)
        with _file_lock(cache.with_name(cache.name + ".lock")):  # DDP ranks: one reads, the others load
            if cache.is_file():
                try:
                    with np.load(cache, allow_pickle=False) as z:
                        if int(z["version"]) == _OBJECTS_CACHE_VERSION and str(z["stamp"]) == stamp:
                            k = len(z["cat_ids"])
                            cats = [{"id": int(i), "name": str(n)} for i, n in zip(z["cat_ids"], z["cat_names"])]
                            lab = np.unpackbits(z["labels"], axis=1, count=k) if k else np.zeros((len(z["ids"]), 0), np.uint8)
                            return cats, dict(zip(z["ids"].tolist(), lab))
                except (OSError, KeyError, ValueError) as err:
                    warnings.warn(f"ignoring unreadable object-label cache {cache}: {err}", stacklevel=2)
            cats, labels = read_instances(inst)
            ids = np.array(sorted(labels), np.int64)
            mat = np.stack([labels[i] for i in ids]) if len(ids) else np.zeros((0, len(cats)), np.uint8)
            try:
                _atomic(cache, lambda p: np.savez(p, version=_OBJECTS_CACHE_VERSION, stamp=stamp, ids=ids,
                                                  cat_ids=np.array([c["id"] for c in cats], np.int64),
                                                  cat_names=np.array([c["name"] for c in cats]),
                                                  labels=np.packbits(mat, axis=1)), suffix=".npz")
            except OSError as err:
                warnings.warn(f"could not write the object-label cache {cache}: {err}", stacklevel=2)
            return cats, labels

    def vocab_settings(self, split_path: Path) -> dict:
        """What decides the caption vocabulary; a change rebuilds it."""
        st = split_path.stat()
        settings = {"min_count": self.min_count, "max_len": self.max_len, "split": self.split,
                    "split_file": f"{split_path.resolve()}:{st.st_size}:{st.st_mtime_ns}",
                    "instances": [str(p.resolve()) for p in self.instances_paths()]}
        if self.split == "paper":
            settings.update(split_seed=self.split_seed, val_size=self.val_size, test_size=self.test_size)
        return settings

    def _vocabulary(self, split_path: Path, train_images: list[dict]) -> CaptionVocab:
        path = self.vocab_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path.with_name(path.name + ".lock")):  # DDP ranks: one builds, the others read
            vocab, _ = caption_vocabulary(path, lambda: (t for im in train_images for t in im["tokens"]),
                                          self.vocab_settings(split_path))
        return vocab

    def _encode(self, images: list[dict], labels: dict, vocab: CaptionVocab, k: int) -> dict:
        m = max([len(im["tokens"]) for im in images], default=1)
        caps = np.zeros((len(images), m, self.max_len + 2), np.int64)
        counts = np.zeros(len(images), np.int64)
        for i, im in enumerate(images):
            counts[i] = len(im["tokens"])
            for j, tokens in enumerate(im["tokens"]):
                caps[i, j] = vocab.encode(tokens, self.max_len)
        return {"ids": np.array([im["cocoid"] for im in images], np.int64),
                "paths": [Path(self.root) / im["filepath"] / im["filename"] for im in images],
                "labels": np.stack([labels[im["cocoid"]] for im in images]) if images else np.zeros((0, k), np.uint8),
                "captions": caps, "counts": counts, "references": [im["raw"] for im in images]}

    # ---------------------------------------------------- linked properties
    @property
    def caption_vocabulary(self) -> list[str]:
        """The caption words, id i is ``caption_vocabulary[i]`` (``<pad> <start> <end> <unk>`` first)."""
        return list(self._prepare()["vocab"].words)

    @property
    def vocab(self) -> CaptionVocab:
        return self._prepare()["vocab"]

    @property
    def num_objects(self) -> int:
        return len(self._prepare()["categories"])

    @property
    def object_names(self) -> list[str]:
        return [c["name"] for c in self._prepare()["categories"]]

    @property
    def label_weights(self) -> torch.Tensor:
        """Eq. 6's lambda_j over the training split's object labels (float32 [K])."""
        return eq6_weights(torch.from_numpy(self._prepare()["splits"]["train"]["labels"].astype(np.float32)))

    @property
    def skipped_no_instances(self) -> dict[str, int]:
        """Images of each split left out because the instances files do not list them."""
        return dict(self._prepare()["skipped"])

    def split_image_ids(self, split: str) -> np.ndarray:
        """COCO image ids of ``split``, in ``index`` order."""
        return self._split(split)["ids"]

    def split_references(self, split: str) -> dict[int, list[str]]:
        """The raw reference sentences of every image of ``split``, keyed by COCO image id."""
        s = self._split(split)
        return {int(i): list(r) for i, r in zip(s["ids"], s["references"])}

    def split_labels(self, split: str) -> np.ndarray:
        return self._split(split)["labels"]

    def split_paths(self, split: str) -> list[Path]:
        return list(self._split(split)["paths"])

    # ----------------------------------------------------------- lightning
    def dataset(self, split: str) -> CaptionImageDataset:
        if split not in self._datasets:
            s = self._split(split)
            self._datasets[split] = CaptionImageDataset(
                s["paths"], image_transform(self.image_size, train=split == "train"), self.image_size, s["labels"],
                s["ids"], s["captions"], s["counts"], self.captions_per_image, sample=split == "train")
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS):
            if len(self._split(split)["ids"]) == 0:
                raise ValueError(f"the {split} split of {self.split_path()} is empty")
        super().setup(stage)


class ScenesCaptionsDataModule(KarpathyCaptionsDataModule):
    """The same on the embedded ``scenes`` data (built under ``root`` on first use), Karpathy-style
    split from ``annotations/dataset_coco.json``: 30 object categories."""

    def __init__(self, root: str = "data/scenes", split_file: str | None = None, instances_dir: str | None = None,
                 split: str = "karpathy", split_seed: int = 0, val_size: int | float = 0.1,
                 test_size: int | float = 0.1, min_count: int = 5, max_len: int = 16,
                 vocab_file: str | None = None, captions_per_image: int = 5, image_size: int = 64,
                 batch_size: int = 32, num_workers: int = 2, max_train_images: int | None = None,
                 max_val_images: int | None = None, max_test_images: int | None = None,
                 num_images: int = 3000, size: int = 128, seed: int = 0):
        super().__init__(root=root, split_file=split_file, instances_dir=instances_dir, split=split,
                         split_seed=split_seed, val_size=val_size, test_size=test_size, min_count=min_count,
                         max_len=max_len, vocab_file=vocab_file, captions_per_image=captions_per_image,
                         image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         max_train_images=max_train_images, max_val_images=max_val_images,
                         max_test_images=max_test_images)
        self.num_images, self.size, self.seed = num_images, size, seed

    def _ensure_root(self) -> None:
        from datamodules.scenes import ensure_scenes

        ensure_scenes(self.root, num_images=self.num_images, size=self.size, seed=self.seed)

