"""News images with captions and articles in the GoodNews layout (feedback-prop §4.3).

The paper's BBC set is not public; GoodNews (Biten et al., CVPR 2019) has the same shape and
is read from the user's disk::

    ROOT/article_caption.json   {article_id: {"article": text, "images": {idx: caption}, "headline": ...}}
    ROOT/img_splits.json        {"<article_id>_<idx>": "train" | "val" | "test"}
    ROOT/images/<article_id>_<idx>.jpg          (``image_dir`` names another folder, e.g. resized)

Two vocabularies come from the training split (§4.3, with the tokenization and lemmatization
of §4.1 and the offline noun finder of :mod:`topdown.text`): the ``caption_vocab_size`` (500)
nouns found in the most captions, the unknown targets, and the ``article_vocab_size`` (1,000)
nouns found in the most articles, the evidence. Both are counted per training image.

Bad input: a missing root, file or image folder is an error naming the path, raised before
training. An image whose article is missing or has no text, an image without a caption and
a missing image file are skipped, named (a warning with the first few, and the full list in
``skipped_images.json`` beside the vocabularies) and counted (:attr:`skipped`). A corrupt
image file is found when it is read: the sample is dropped and counted as ``<stage>/skipped``.

Vocabularies, labels and the article nouns by word position (for text-prefix evidence) are
cached beside each other, in ``ROOT/topdown_cache/`` or, when ROOT is read-only, in
``~/.cache/topdown/``, under a name derived from the record of the settings that built them
(input files, sizes, noun finder, stop words and lemmatizer: :func:`topdown.text.pipeline_key`): a
change of any of them builds a new cache.
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
from datamodules.common import SPLITS, SafeImageDataset, SplitLoaders, check_exists, image_transform
from topdown.losses import label_weights
from topdown.news import pack_positions, prefix_labels
from topdown.text import (NOUN_FINDER, build_noun_vocabulary, find_nouns, labels_from_nouns, noun_positions,
                          pipeline_key, save_vocabulary)

SKIP_REASONS = ("article missing", "article without text", "image without caption", "image file missing")
_CACHE_FORMAT = 1


class NewsImageDataset(SafeImageDataset):
    """Images with caption-noun and article-noun labels; batches hold ``caption_labels`` and ``article_labels``."""

    def __init__(self, paths, transform, image_size: int, caption_labels: np.ndarray, article_labels: np.ndarray):
        super().__init__(paths, transform, image_size, labels=caption_labels)
        if len(article_labels) != len(paths):
            raise ValueError(f"NewsImageDataset: {len(paths)} images but {len(article_labels)} article label rows")
        self.article_labels = np.ascontiguousarray(article_labels)

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item["caption_labels"] = item.pop("labels")
        item["article_labels"] = torch.from_numpy(self.article_labels[index].astype(np.float32))
        return item


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} is not valid JSON: {path} ({err})") from None


def read_goodnews(root: Path, image_dir: str = "images") -> tuple[list[dict], dict[str, list[str]], dict]:
    """The usable images of a GoodNews tree and the skipped ones by reason.

    Each image is ``{"key", "article_id", "split", "caption", "path"}``, sorted by key; the
    ``article_caption.json`` contents come third, so each article is tagged only once.
    """
    root = check_exists(root, "GoodNews root folder")
    articles = _read_json(check_exists(root / "article_caption.json", "GoodNews article_caption.json"),
                          "GoodNews article_caption.json")
    splits = _read_json(check_exists(root / "img_splits.json", "GoodNews img_splits.json"), "GoodNews img_splits.json")
    folder = check_exists(root / image_dir, f"GoodNews image folder (image_dir={image_dir!r})")
    if not isinstance(articles, dict) or not isinstance(splits, dict):
        raise ValueError(f"GoodNews files must hold JSON objects: {root / 'article_caption.json'}, {root / 'img_splits.json'}")
    bad = sorted({v for v in splits.values() if v not in SPLITS})
    if bad:
        raise ValueError(f"{root / 'img_splits.json'}: unknown split names {bad[:5]}; expected {SPLITS}")
    images, skipped = [], {r: [] for r in SKIP_REASONS}
    for key in sorted(splits):
        aid, _, idx = key.rpartition("_")
        art = articles.get(aid)
        if not isinstance(art, dict):
            skipped["article missing"].append(key)
            continue
        text = art.get("article")
        if not isinstance(text, str) or not text.strip():
            skipped["article without text"].append(key)
            continue
        caption = (art.get("images") or {}).get(idx)
        if not isinstance(caption, str) or not caption.strip():
            skipped["image without caption"].append(key)
            continue
        path = folder / f"{key}.jpg"
        if not path.is_file():
            skipped["image file missing"].append(str(path))
            continue
        images.append({"key": key, "article_id": aid, "split": splits[key], "caption": caption, "path": str(path)})
    return images, skipped, articles


class GoodNewsDataModule(SplitLoaders, LightningDataModule):
    """GoodNews images with caption-noun targets and article-noun evidence (feedback-prop §4.3).

    Args:
        root: the GoodNews folder (see the module docstring for its layout).
        image_dir: image folder under ``root``.
        caption_vocab_size: caption nouns, the unknown targets (paper: 500).
        article_vocab_size: article nouns, the evidence (paper: 1,000).
        proper_nouns: count proper nouns (NNP) as nouns besides common ones.
        max_train_images: train on a random subset (the vocabularies still come from all of train).
    """

    def __init__(self, root: str = "data/goodnews", image_dir: str = "images", caption_vocab_size: int = 500,
                 article_vocab_size: int = 1000, proper_nouns: bool = True, image_size: int = 224,
                 batch_size: int = 32, num_workers: int = 4, max_train_images: int | None = None,
                 split_seed: int = 0):
        super().__init__()
        for name, v in (("caption_vocab_size", caption_vocab_size), ("article_vocab_size", article_vocab_size)):
            if v < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        self.root = Path(root)
        self.image_dir = image_dir
        self.caption_vocab_size, self.article_vocab_size = caption_vocab_size, article_vocab_size
        self.proper_nouns = proper_nouns
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.max_train_images, self.split_seed = max_train_images, split_seed
        self._data: dict | None = None
        self._datasets: dict = {}
        self._prefix: dict = {}
        self.skipped: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ paths
    def news_root(self) -> Path:
        return self.root

    def _ensure_root(self) -> None:
        check_exists(self.root, "GoodNews root folder")

    def cache_dir(self) -> Path:
        root = self.news_root()
        if os.access(root, os.W_OK):
            return root / "topdown_cache"
        key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "topdown" / f"{root.name}-{key}"

    def settings_record(self) -> dict:
        """What the cached vocabularies and labels depend on; the cache is used only when it matches."""
        root = self.news_root()
        files = {}
        for name in ("article_caption.json", "img_splits.json"):
            p = root / name
            st = p.stat()
            files[name] = {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return {"format": _CACHE_FORMAT, "files": files, "image_dir": self.image_dir,
                "caption_vocab_size": self.caption_vocab_size, "article_vocab_size": self.article_vocab_size,
                "proper_nouns": self.proper_nouns, "noun_finder": NOUN_FINDER, "vocabulary_source": "train split",
                "pipeline": pipeline_key()}  # stop words, lemmatizer (NLTK version): as every vocabulary cache

    # ------------------------------------------------------------ label data
    def _prepare(self) -> dict:
        if self._data is not None:
            return self._data
        self._ensure_root()
        images, skipped, articles = read_goodnews(self.news_root(), self.image_dir)
        self._report_skipped(skipped)
        if not any(im["split"] == "train" for im in images):
            raise ValueError(f"no usable training image in {self.news_root()} (see the skipped images above)")
        record = self.settings_record()
        tag = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
        cache = self.cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"news_{tag}.npz"
        with _file_lock(cache / ".lock"):  # DDP ranks: one builds, the others load
            data = self._load(path, record)
            if data is None:
                data = self._build(images, articles, path, record)
        _atomic(cache / "skipped_images.json", lambda p: p.write_text(json.dumps(skipped, indent=1) + "\n"))
        self._data = self._attach(data, images)
        return self._data

    def _report_skipped(self, skipped: dict[str, list[str]]) -> None:
        self.skipped = {k: list(v) for k, v in skipped.items() if v}
        if self.skipped:
            parts = [f"{len(v)} {k} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})" for k, v in self.skipped.items()]
            warnings.warn(f"GoodNews {self.news_root()}: skipped {sum(map(len, self.skipped.values()))} images: "
                          + "; ".join(parts) + f" (all in {self.cache_dir() / 'skipped_images.json'})", stacklevel=3)

    def _load(self, path: Path, record: dict) -> dict | None:
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["record"])) != record:
                    return None
                return {k: z[k] for k in z.files}
        except (OSError, KeyError, ValueError) as err:
            warnings.warn(f"ignoring unreadable news cache {path}: {err}", stacklevel=2)
            return None

    def _build(self, images: list[dict], articles: dict, path: Path, record: dict) -> dict:
        caption_nouns = [find_nouns(im["caption"], self.proper_nouns) for im in images]
        article_pos = {aid: noun_positions(articles[aid]["article"], self.proper_nouns)
                       for aid in sorted({im["article_id"] for im in images})}
        train = [i for i, im in enumerate(images) if im["split"] == "train"]
        cap_vocab = build_noun_vocabulary((caption_nouns[i] for i in train), self.caption_vocab_size)
        art_vocab = build_noun_vocabulary(([n for _, n in article_pos[images[i]["article_id"]][1]] for i in train),
                                          self.article_vocab_size)
        for what, vocab, k in (("caption", cap_vocab, self.caption_vocab_size), ("article", art_vocab, self.article_vocab_size)):
            if len(vocab) < k:
                warnings.warn(f"the training {what}s of {self.news_root()} hold only {len(vocab)} distinct nouns, "
                              f"fewer than {what}_vocab_size={k}", stacklevel=3)
        packed = pack_positions([article_pos[im["article_id"]] for im in images], art_vocab)
        arrays = {"record": json.dumps(record, sort_keys=True), "keys": np.array([im["key"] for im in images]),
                  "caption_vocab": np.array(cap_vocab), "article_vocab": np.array(art_vocab),
                  "caption_labels": np.packbits(labels_from_nouns(caption_nouns, cap_vocab), axis=1),
                  **{f"article_{k}": v for k, v in packed.items()}}
        _atomic(path, lambda p: np.savez(p, **arrays), suffix=".npz")
        for name, vocab in (("caption", cap_vocab), ("article", art_vocab)):
            # human-readable copies; the npz (keyed by the settings record) is what is read back
            _atomic(path.with_name(f"{name}_nouns_{len(vocab)}.txt"), lambda p, v=vocab: save_vocabulary(v, p))
        return arrays

    def _attach(self, data: dict, images: list[dict]) -> dict:
        keys = [str(k) for k in data["keys"]]
        if keys != [im["key"] for im in images]:
            raise RuntimeError("the news cache does not list the images read from disk; delete it: "
                               f"{self.cache_dir()}")
        cap_vocab = [str(w) for w in data["caption_vocab"]]
        art_vocab = [str(w) for w in data["article_vocab"]]
        caption = np.unpackbits(data["caption_labels"], axis=1, count=len(cap_vocab))
        packed = {k: data[f"article_{k}"] for k in ("num_words", "offsets", "positions", "labels")}
        splits = {}
        for split in SPLITS:
            rows = np.array([i for i, im in enumerate(images) if im["split"] == split], np.int64)
            if split == "train" and self.max_train_images is not None and self.max_train_images < len(rows):
                rng = np.random.default_rng(self.split_seed)
                rows = np.sort(rng.permutation(rows)[: self.max_train_images])
            splits[split] = {"rows": rows, "keys": [keys[i] for i in rows], "paths": [images[i]["path"] for i in rows],
                             "captions": [images[i]["caption"] for i in rows], "caption_labels": caption[rows],
                             "article_labels": prefix_labels(packed, 1.0, len(art_vocab), rows)}
        return {"caption_vocab": cap_vocab, "article_vocab": art_vocab, "packed": packed, "splits": splits}

    # ---------------------------------------------------- linked properties
    @property
    def caption_vocabulary(self) -> list[str]:
        return list(self._prepare()["caption_vocab"])

    @property
    def article_vocabulary(self) -> list[str]:
        return list(self._prepare()["article_vocab"])

    @property
    def num_caption_labels(self) -> int:
        return len(self._prepare()["caption_vocab"])

    @property
    def num_article_labels(self) -> int:
        return len(self._prepare()["article_vocab"])

    @property
    def caption_label_weights(self) -> torch.Tensor:
        """Eq. 6's lambda_j of the caption nouns over the training split."""
        return label_weights(torch.from_numpy(self.split_labels("train", "caption")))

    @property
    def article_label_weights(self) -> torch.Tensor:
        """Eq. 6's lambda_j of the article nouns over the training split."""
        return label_weights(torch.from_numpy(self.split_labels("train", "article")))

    def split_labels(self, split: str, head: str) -> np.ndarray:
        """Labels ``[N, K]`` uint8 of ``head`` (caption or article) for ``split``, rows in ``index`` order."""
        if head not in ("caption", "article"):
            raise KeyError(f"unknown head {head!r}; expected 'caption' or 'article'")
        return self._split(split)[f"{head}_labels"]

    def split_keys(self, split: str) -> list[str]:
        """The ``<article_id>_<idx>`` image keys of ``split`` in ``index`` order."""
        return list(self._split(split)["keys"])

    def prefix_labels(self, split: str, fraction: float) -> np.ndarray:
        """Article-noun labels ``[N, K]`` of the first ``fraction`` of each article's words (Table 2)."""
        key = (split, float(fraction))
        if key not in self._prefix:
            data = self._prepare()
            self._prefix[key] = prefix_labels(data["packed"], fraction, len(data["article_vocab"]),
                                              self._split(split)["rows"])
        return self._prefix[key]

    # ----------------------------------------------------------- lightning
    def dataset(self, split: str) -> NewsImageDataset:
        if split not in self._datasets:
            s = self._split(split)
            if not len(s["rows"]):
                raise ValueError(f"the {split} split of {self.news_root()} has no usable image")
            self._datasets[split] = NewsImageDataset(
                s["paths"], image_transform(self.image_size, train=split == "train"), self.image_size,
                s["caption_labels"], s["article_labels"])
        return self._datasets[split]



class ScenesNewsDataModule(GoodNewsDataModule):
    """The same task on the news view of the embedded ``scenes`` data (``root/news``), built on first use."""

    def __init__(self, root: str = "data/scenes", caption_vocab_size: int = 80, article_vocab_size: int = 200,
                 proper_nouns: bool = True, image_size: int = 128, batch_size: int = 32, num_workers: int = 2,
                 max_train_images: int | None = None, split_seed: int = 0, num_images: int = 3000, size: int = 128,
                 seed: int = 0):
        super().__init__(root=root, image_dir="images", caption_vocab_size=caption_vocab_size,
                         article_vocab_size=article_vocab_size, proper_nouns=proper_nouns, image_size=image_size,
                         batch_size=batch_size, num_workers=num_workers, max_train_images=max_train_images,
                         split_seed=split_seed)
        self.num_images, self.size, self.seed = num_images, size, seed

    def news_root(self) -> Path:
        from datamodules.scenes_news import NEWS_DIR

        return self.root / NEWS_DIR

    def _ensure_root(self) -> None:
        from datamodules.scenes import ensure_scenes
        from datamodules.scenes_news import ensure_news_view

        ensure_scenes(self.root, num_images=self.num_images, size=self.size, seed=self.seed)
        ensure_news_view(self.root, self.seed)
