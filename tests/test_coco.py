"""COCO-2014 multi-label datamodule (feedback-prop §4.1) on tiny embedded scenes data."""
from __future__ import annotations

import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from datamodules.coco import COCOMultiLabelDataModule, ScenesMultiLabelDataModule
from datamodules.common import IMAGENET_MEAN, UnpaddedDistributedSampler, image_transform
from datamodules.scenes import build_scenes
from topdown.text import load_vocabulary, save_vocabulary

N_IMAGES, SIZE = 80, 48


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_scenes(tmp_path_factory.mktemp("scenes"), num_images=N_IMAGES, size=SIZE, seed=0, workers=1)


@pytest.fixture
def root(built, tmp_path):
    """A private copy, so a test may break files or leave caches behind."""
    return shutil.copytree(built, tmp_path / "scenes")


def _dm(root, **kw):
    kw = {"vocab_size": 40, "image_size": 32, "batch_size": 8, "num_workers": 0, **kw}
    return ScenesMultiLabelDataModule(root=str(root), num_images=N_IMAGES, size=SIZE, **kw)


def test_linked_properties_and_label_weights(root):
    dm = _dm(root)
    assert dm.num_labels == len(dm.vocabulary) == 40
    assert (root / "vocab_40.txt").is_file() and (root / "vocab_40.labels.npz").is_file()
    y = dm.split_labels("train").astype(np.float64)
    w = dm.label_weights
    assert w.dtype == torch.float32 and w.shape == (40,)
    expected = (len(y) - y.sum(0)) / y.sum(0)  # eq. 6: #negatives / #positives
    assert np.allclose(w.numpy(), expected, rtol=1e-5)


def test_labels_without_positives_get_the_largest_finite_weight(root):
    dm = _dm(root, vocab_size=60, max_train_images=4)
    with pytest.warns(UserWarning, match="no positive training image"):
        w = dm.label_weights.numpy()
    y = dm.split_labels("train")
    assert len(y) == 4 and (y.sum(0) == 0).any()
    assert np.isfinite(w).all() and np.isclose(w[y.sum(0) == 0], w[y.sum(0) > 0].max()).all()


def test_splits_sizes_disjoint_and_seeded(root):
    dm = _dm(root)
    n_train, n_val2014 = round(N_IMAGES * 0.6), round(N_IMAGES * 0.4)
    ids = {s: set(dm.split_image_ids(s).tolist()) for s in ("train", "val", "test")}
    assert len(ids["train"]) == n_train
    assert len(ids["val"]) == round(0.5 * n_val2014) and len(ids["val"]) + len(ids["test"]) == n_val2014
    assert not (ids["val"] & ids["test"]) and not (ids["train"] & (ids["val"] | ids["test"]))
    again, other = _dm(root), _dm(root, split_seed=1)
    assert set(again.split_image_ids("val").tolist()) == ids["val"]
    assert set(other.split_image_ids("val").tolist()) != ids["val"]
    assert len(_dm(root, val_size=10).split_image_ids("val")) == 10
    with pytest.raises(ValueError, match="val_size"):
        _dm(root, val_size=10_000).num_labels


def test_batches_follow_the_design_contract(root):
    dm = _dm(root)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "labels", "index", "valid"}
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["labels"].shape == (8, 40) and batch["labels"].dtype == torch.float32
    assert batch["index"].dtype == torch.long and batch["valid"].dtype == torch.bool and batch["valid"].all()
    val = next(iter(dm.val_dataloader()))
    assert val["index"].tolist() == list(range(8))  # in order, no sampler outside DDP
    row = dm.split_labels("val")[:8]
    assert torch.equal(val["labels"], torch.as_tensor(row, dtype=torch.float32))


def test_corrupt_image_warns_once_and_is_marked_invalid(root):
    dm = _dm(root)
    ds = dm.dataset("test")
    bad = str(ds.paths[2])
    with open(bad, "wb") as fh:
        fh.write(b"\xff\xd8 definitely not a jpeg" * 10)
    with pytest.warns(UserWarning, match=re.escape(bad)):
        item = ds[2]
    assert not item["valid"] and item["image"].abs().sum() == 0 and item["image"].shape == (3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not ds[2]["valid"] and ds[3]["valid"]  # second read: no new warning


def test_missing_root_or_annotation_names_the_path(tmp_path, root):
    missing = tmp_path / "no_coco_here"
    with pytest.raises(FileNotFoundError, match="no_coco_here"):
        COCOMultiLabelDataModule(root=str(missing)).num_labels
    (root / "annotations" / "captions_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        COCOMultiLabelDataModule(root=str(root), vocab_size=10).label_weights


def test_vocab_file_is_written_then_read_back(root, tmp_path):
    path = tmp_path / "vocab" / "words.txt"
    first = _dm(root, vocab_file=str(path)).vocabulary
    assert load_vocabulary(path) == first and len(first) == 40
    custom = ["tree", "woman", "chair"]
    save_vocabulary(custom, path)
    second = _dm(root, vocab_file=str(path))
    with pytest.warns(UserWarning, match="has 3 words, vocab_size=40; using the file"):
        assert second.vocabulary == custom
    assert second.num_labels == 3
    names = np.array(second.split_labels("train"))
    assert names[:, 0].sum() > 0 and names.shape[1] == 3


def test_vocabulary_and_labels_are_rebuilt_when_the_caption_pipeline_changes(root, monkeypatch):
    import topdown.text

    first = _dm(root).vocabulary
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dm(root).vocabulary == first  # same settings: the caches are reused silently
    # a new stop word (the most frequent word) must not come back from the old cache
    monkeypatch.setattr(topdown.text, "STOP_WORDS", topdown.text.STOP_WORDS | {first[0]})
    with pytest.warns(UserWarning, match="building the vocabulary .*vocab_40.txt again: it was built with other"):
        dm = _dm(root)
        again = dm.vocabulary
    assert first[0] not in again and len(again) == 40
    assert dm.split_labels("train").shape[1] == 40
    y = topdown.text.labels_from_captions([["A " + again[0] + "."]], again)
    assert y[0, 0] == 1


def test_scenes_module_builds_an_empty_root_on_demand(tmp_path):
    dm = ScenesMultiLabelDataModule(root=str(tmp_path / "fresh"), num_images=20, size=32, vocab_size=10,
                                    image_size=32, num_workers=0)
    assert dm.num_labels == 10 and (tmp_path / "fresh" / "scenes.json").is_file()


def test_unpadded_sampler_yields_every_index_once():
    data = list(range(10))
    parts = [list(UnpaddedDistributedSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(UnpaddedDistributedSampler(data, num_replicas=3, rank=r)) for r in range(3)] == [4, 3, 3]
    assert isinstance(UnpaddedDistributedSampler(data, 3, 0), DistributedSampler)  # Lightning keeps it
    shuffled = [list(UnpaddedDistributedSampler(data, num_replicas=4, rank=r, shuffle=True, seed=1))
                for r in range(4)]
    assert sorted(i for p in shuffled for i in p) == data


def test_image_transform_normalises_and_flips_only_in_training():
    from PIL import Image

    arr = np.zeros((20, 30, 3), np.uint8)
    arr[:, :15] = 255  # left half white
    img = Image.fromarray(arr)
    out = image_transform(16, train=False)(img)
    assert out.shape == (3, 16, 16)
    assert torch.isclose(out[0, 0, 0], torch.tensor((1 - IMAGENET_MEAN[0]) / 0.229), atol=1e-3)
    torch.manual_seed(0)
    flips = [image_transform(16, train=True)(img)[0, 0, 0] < 0 for _ in range(20)]
    assert 0 < sum(flips) < 20


def test_reference_preprocessing_resizes_the_short_side_then_crops():
    from PIL import Image

    arr = np.zeros((256, 512, 3), np.uint8)
    arr[:, 240:272] = 255  # a white band in the middle, cut by neither crop
    img = Image.fromarray(arr)
    evaluation = image_transform(224, train=False, preprocess="resize_crop")(img)
    assert evaluation.shape == (3, 224, 224)
    # short side 256 -> 256 x 512, centre crop 224: the band stays in the middle, the sides are gone
    assert evaluation[0, :, 96:128].mean() > 1.5 and evaluation[0, :, :80].mean() < -1.5
    square = image_transform(224, train=False)(img)  # the whole width squeezed in
    assert square[0, :, 105:119].mean() > 1.5 and (square[0, 0] > 0).sum() < (evaluation[0, 0] > 0).sum()
    assert image_transform(224, train=True, preprocess="resize_crop")(img).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="resize_size 200 is smaller"):
        image_transform(224, train=False, preprocess="resize_crop", resize_size=200)
