"""Transformed image pairs of central-object images (generators paper §2.1, §2.1.1).

Originals are images whose one object is centered, roughly square and covers
40-60% of the pixels (:func:`topdown.transforms.is_central_object`), read from

* ILSVRC CLS-LOC (``dataset="ilsvrc"``)::

      ROOT/ILSVRC/Data/CLS-LOC/train/<wnid>/<id>.JPEG   ROOT/ILSVRC/Data/CLS-LOC/val/<id>.JPEG
      ROOT/ILSVRC/Annotations/CLS-LOC/train/<wnid>/<id>.xml  .../val/<id>.xml

  (``ROOT`` may also be the ``ILSVRC`` folder itself). PASCAL VOC XML:
  ``size/width,height`` and ``object/bndbox/xmin,ymin,xmax,ymax``. ``rule="single"``
  (default, the paper's "the bounding box"): the image has exactly one object box
  and it qualifies; ``rule="largest"``: the largest box qualifies. Box corners are
  read as continuous coordinates (the 1-pixel convention difference is immaterial here).
* the embedded ``scenes`` dataset, or any COCO-2014 layout (``dataset="scenes"``):
  ``annotations/instances_<split>2014.json``; an image qualifies when exactly one
  of its annotations meets the criteria and that one is also the image's largest
  annotation (the dominant object).

Each pair is ``(I[t_init], I[t_init ∘ Δ])`` (:mod:`topdown.transforms`), both
rendered at ``image_size`` from the same square canvas, so only the object's pose
differs. With ``reverse=True`` (default) every regression pair also counts
reversed, ``(I[t_init ∘ Δ], I[t_init])``: a pair of amount ``-Δ`` (``1/s`` for
scale) from the same two renderings, so each kind is fitted over both signs at
no extra image cost (the PCA pass keeps the forward base amount). Fitting goes in phases (:func:`topdown.generators.phase_schedule`): for
each kind a PCA epoch over the base-amount pairs, then a regression epoch over all
amounts; :meth:`PairsDataModule.train_dataloader` picks the epoch's pair set from
``trainer.current_epoch`` (set ``reload_dataloaders_every_n_epochs: 1``).

Batches (dicts, default collate): ``image`` (I[t_init]) and ``transformed``
(I[t_init ∘ Δ]) float [3, S, S] normalised with ImageNet mean/std; ``amount``
(Δ in natural units: degrees, factor or pixels), ``delta`` (the regression
variable ``a``, :func:`topdown.generators.normalized_amount`), ``state``
(the pose of ``image``), ``kind`` (str), ``index`` (long), ``valid`` (bool),
``reversed`` (bool: the pair is a forward pair read backwards). Test batches carry
``case`` (e.g. ``"left 30"``) and render I[0] vs I[Δ].

Under DDP (``use_distributed_sampler: false``), pairs are split by rank into equal
shards padded with items marked ``valid=False, pad=True`` (:class:`PaddedPairs`),
so every pair counts exactly once in the summed statistics.
"""
from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from topdown.generators import AMOUNT_UNITS, EVAL_CASES, inverse_amount, normalized_amount, phase_schedule
from topdown.transforms import CentralObjectCriteria, canvas_side, compose, is_central_object, render

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("scenes", "ilsvrc")
TRANSFORMS = ("rotation", "scale", "translation", "translation_x", "translation_y")


@dataclass(frozen=True)
class Original:
    """One "original image" (§2.1): its file, central-object box (x0, y0, x1, y1) and size."""

    path: str
    box: tuple[float, float, float, float]
    width: int
    height: int
    label: str = ""


# ----------------------------------------------------------------------------------------------- readers


def _xml_number(node: ET.Element, tag: str, path: Path) -> float:
    child = node.find(tag)
    if child is None or child.text is None:
        raise ValueError(f"{path}: missing <{tag}> in <{node.tag}>")
    try:
        return float(child.text)
    except ValueError:
        raise ValueError(f"{path}: <{tag}> is not a number: {child.text!r}") from None


def read_voc_annotation(path: str | Path) -> tuple[int, int, list[tuple[str, tuple[float, float, float, float]]]]:
    """``(width, height, [(name, (xmin, ymin, xmax, ymax)), ...])`` of a PASCAL VOC-style XML file."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid XML ({e})") from None
    size = root.find("size")
    if size is None:
        raise ValueError(f"{path}: missing <size>")
    width, height = int(_xml_number(size, "width", path)), int(_xml_number(size, "height", path))
    objects = []
    for obj in root.findall("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ValueError(f"{path}: <object> without <bndbox>")
        box = tuple(_xml_number(bnd, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((obj.findtext("name", default=""), box))
    return width, height, objects


def _ilsvrc_base(root: Path) -> Path:
    for base in (root / "ILSVRC", root):
        if (base / "Annotations" / "CLS-LOC").is_dir():
            return base
    raise FileNotFoundError(f"no ILSVRC CLS-LOC annotations under {root} (expected {root}/ILSVRC/Annotations/CLS-LOC)")


def _pick_box(objects, width, height, criteria, rule, where) -> tuple[float, ...] | None:
    if rule == "single":
        if len(objects) != 1:
            return None
        box = objects[0][1]
    elif rule == "largest":
        if not objects:
            return None
        box = max((b for _, b in objects), key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    else:
        raise ValueError(f"unknown selection rule {rule!r} ({where}); choose 'single' or 'largest'")
    return box if is_central_object(box, width, height, criteria) else None


def ilsvrc_originals(root: str | Path, split: str = "train", criteria: CentralObjectCriteria = CentralObjectCriteria(),
                     rule: str = "single", max_images: int | None = None) -> list[Original]:
    """Central-object originals of ILSVRC CLS-LOC ``split`` ("train" or "val"), in sorted file order (§2.1)."""
    base = _ilsvrc_base(Path(root))
    ann_dir = base / "Annotations" / "CLS-LOC" / split
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"ILSVRC split {split!r}: annotation folder {ann_dir} does not exist")
    found = []
    for xml in sorted(ann_dir.rglob("*.xml")):
        width, height, objects = read_voc_annotation(xml)
        box = _pick_box(objects, width, height, criteria, rule, xml)
        if box is None:
            continue
        rel = xml.relative_to(ann_dir).with_suffix(".JPEG")
        image = base / "Data" / "CLS-LOC" / split / rel
        label = objects[0][0] if rule == "single" else ""
        found.append(Original(str(image), tuple(float(v) for v in box), width, height, label))
        if max_images is not None and len(found) >= max_images:
            break
    return found


def coco_originals(root: str | Path, split: str = "train", criteria: CentralObjectCriteria = CentralObjectCriteria(),
                   max_images: int | None = None) -> list[Original]:
    """Central-object originals of a COCO-2014 layout (the embedded ``scenes``), sorted by image id."""
    root = Path(root)
    ann_path = root / "annotations" / f"instances_{split}2014.json"
    if not ann_path.is_file():
        raise FileNotFoundError(f"COCO instances file not found: {ann_path}")
    data = json.loads(ann_path.read_text())
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{ann_path}: missing key {key!r}")
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    found = []
    for img in sorted(data["images"], key=lambda i: i["id"]):
        anns = by_image.get(img["id"], [])
        w, h = img["width"], img["height"]
        boxes = [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]) for a in anns]
        good = [b for b in boxes if is_central_object(b, w, h, criteria)]
        if len(good) != 1:
            continue
        area = (good[0][2] - good[0][0]) * (good[0][3] - good[0][1])
        if any((b[2] - b[0]) * (b[3] - b[1]) > area for b in boxes):
            continue
        path = root / f"{split}2014" / img["file_name"]
        found.append(Original(str(path), tuple(float(v) for v in good[0]), w, h))
        if max_images is not None and len(found) >= max_images:
            break
    return found


# ----------------------------------------------------------------------------------------------- datasets


def expand_kinds(transform: str | Sequence[str]) -> list[str]:
    """``"translation"`` stands for both ``translation_x`` and ``translation_y``."""
    names = [transform] if isinstance(transform, str) else list(transform)
    kinds: list[str] = []
    for n in names:
        if n not in TRANSFORMS:
            raise ValueError(f"unknown transform {n!r}; choose from {TRANSFORMS}")
        for k in (["translation_x", "translation_y"] if n == "translation" else [n]):
            if k not in kinds:
                kinds.append(k)
    return kinds


class _ImageCache:
    """Decoded originals (uint8), loaded once per worker; a bad file warns once and gives ``None``."""

    def __init__(self):
        self.images: dict[str, torch.Tensor | None] = {}

    def get(self, path: str) -> torch.Tensor | None:
        if path not in self.images:
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im.convert("RGB"))
                self.images[path] = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
            except (OSError, ValueError) as e:
                warnings.warn(f"pairs: cannot read image {path}: {e}; its pairs are skipped", stacklevel=2)
                self.images[path] = None
        return self.images[path]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1)
    return (x - mean) / std


class TransformPairs(Dataset):
    """Pairs ``(I[t], I[t ∘ Δ])`` for every original x initial state x amount (§2.1.1).

    ``sides`` gives each original's canvas side (shared by all of its renderings).
    ``cases`` (evaluation) replaces the grid by named ``(case, amount)`` pairs from state 0 / 1.
    ``reverse``: items ``n .. 2n-1`` are items ``0 .. n-1`` read backwards, ``(I[t∘Δ], I[t])`` with
    amount :func:`~topdown.generators.inverse_amount` ``(Δ)``, rendered from the same two states.
    """

    def __init__(self, originals: Sequence[Original], kind: str, init_states: Sequence[float],
                 amounts: Sequence[float], sides: Sequence[float], image_size: int = 224, fill: str = "mean",
                 cases: Sequence[tuple[str, float]] | None = None, reverse: bool = False):
        if len(sides) != len(originals):
            raise ValueError("TransformPairs: one canvas side per original is required")
        if reverse and cases is not None:
            raise ValueError("TransformPairs: evaluation cases are named forward pairs; reverse applies to grids")
        self.originals, self.kind, self.sides = list(originals), kind, list(sides)
        self.image_size, self.fill, self.reverse = image_size, fill, bool(reverse)
        if cases is not None:
            identity = 1.0 if kind == "scale" else 0.0
            self.grid = [(identity, float(a), name) for name, a in cases]
        else:
            self.grid = [(float(t), float(a), "") for t in init_states for a in amounts]
        self.cache = _ImageCache()

    @property
    def num_forward(self) -> int:
        return len(self.originals) * len(self.grid)

    def __len__(self) -> int:
        return self.num_forward * (2 if self.reverse else 1)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} out of range [0, {len(self)})")
        backwards, fwd = divmod(index, self.num_forward)
        j, g = divmod(fwd, len(self.grid))
        state, amount, case = self.grid[g]
        end = compose(self.kind, state, amount)
        orig = self.originals[j]
        img = self.cache.get(orig.path)
        s = self.image_size
        valid = img is not None
        if valid:
            pair = render(img.float() / 255, orig.box, self.kind, [state, end], s,
                          side=self.sides[j], fill=self.fill).clamp(0, 1)
            pair = _normalize(pair)
        else:
            pair = torch.zeros(2, 3, s, s)
        if backwards:
            pair, state, amount = pair.flip(0), end, inverse_amount(self.kind, amount)
        item = {
            "image": pair[0],
            "transformed": pair[1],
            "amount": torch.tensor(amount, dtype=torch.float32),
            "delta": torch.tensor(float(normalized_amount(self.kind, amount)), dtype=torch.float32),
            "state": torch.tensor(state, dtype=torch.float32),
            "kind": self.kind,
            "index": torch.tensor(index, dtype=torch.long),
            "valid": torch.tensor(valid),
            "reversed": torch.tensor(bool(backwards)),
        }
        if case:
            item["case"] = case
        return item


class PaddedPairs(Dataset):
    """``dataset`` padded to a multiple of ``multiple`` items; padding items carry ``valid=False, pad=True``.

    DDP ranks must run the same number of steps (uneven ranks deadlock on the
    wrapper's collectives), yet a pair may count only once in the summed
    statistics: padding repeats real items marked invalid, which the module drops.
    """

    def __init__(self, dataset: Dataset, multiple: int = 1):
        self.dataset, self.n = dataset, len(dataset)
        self.length = -(-self.n // multiple) * multiple if self.n else 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index % self.n])
        pad = index >= self.n
        item["pad"] = torch.tensor(pad)
        if pad:
            item["valid"] = torch.tensor(False)
        return item


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of a :class:`PaddedPairs`: equal shards, each pair in exactly one."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardSampler: rank {rank} outside world size {world_size}")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


# ----------------------------------------------------------------------------------------------- datamodule


class PairsDataModule(LightningDataModule):
    """Transformed pairs of central-object originals for fitting a generator bank (§2.1).

    Args:
        root: dataset folder (``scenes``: built on demand with :func:`datamodules.scenes.ensure_scenes`).
        dataset: ``"scenes"`` or ``"ilsvrc"``.
        transform: ``"rotation"``, ``"scale"``, ``"translation"`` (= x and y) or a list of them;
            one PCA + one regression epoch per kind, in this order.
        rotation_step: θ_init spacing in degrees (paper: 5, i.e. 72 initial angles).
        rotation_amounts: Δθ values (paper: 10..60); base amount 10 for the PCA pass.
        scale_inits, scale_amounts: initial factors and zoom factors (composed by product).
        translation_inits, translation_amounts: initial shifts and shifts, output pixels at ``image_size``.
        reverse: regression pairs also count reversed (amount -Δ, 1/s): both signs from the same renderings.
            The defaults then fit rotation over ±10..60°, scale over 0.71x..1.4x, translations over ±10..30 px,
            which hold every amount of the paper (±30°, 1.3x, 0.75x, 30 px left, 30 px up).
        base_amounts: PCA-pass amount per kind (default: rotation 10°, scale 1.3x as in Fig. A1, translations
            10 px; at conv5 a 1.1x zoom moves no 13x13 cell by a whole pixel, so its integer flows are all 0).
        image_size: rendered side (224 for AlexNet conv1-conv5 maps of 55/27/13).
        max_images / test_max_images: caps on the number of originals for fitting / evaluation.
        split / test_split: source splits of the fitting and evaluation originals.
        fill: ``"mean"`` (default: the image's mean colour) or ``"reflection"`` for pixels from outside the
            source image; reflection can mirror a copy of the object into the frame when zooming out.
        rule: ILSVRC box rule, ``"single"`` or ``"largest"``.
        center_tol, aspect, area: central-object criteria (:class:`CentralObjectCriteria`).
        scenes_images, scenes_size, scenes_seed: how to build ``scenes`` when ``root`` lacks it.
    """

    def __init__(self, root: str = "data/scenes", dataset: str = "scenes", transform: str | list[str] = "rotation",
                 rotation_step: float = 5.0, rotation_amounts: list[float] = (10, 20, 30, 40, 50, 60),
                 scale_inits: list[float] = (0.8, 0.9, 1.0), scale_amounts: list[float] = (1.1, 1.2, 1.3, 1.4),
                 translation_inits: list[float] = (-10, 0, 10),
                 translation_amounts: list[float] = (10, 20, 30), reverse: bool = True,
                 base_amounts: dict[str, float] | None = None, image_size: int = 224, batch_size: int = 8,
                 num_workers: int = 0, max_images: int | None = None, test_max_images: int | None = None,
                 split: str = "train", test_split: str = "val", fill: str = "mean", rule: str = "single",
                 center_tol: float = 0.10, aspect: tuple[float, float] = (0.75, 4 / 3),
                 area: tuple[float, float] = (0.40, 0.60), scenes_images: int = 3000, scenes_size: int = 128,
                 scenes_seed: int = 0):
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
        self.root, self.dataset, self.reverse = root, dataset, bool(reverse)
        self.kinds = expand_kinds(transform)
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.max_images, self.test_max_images = max_images, test_max_images
        self.split, self.test_split, self.fill, self.rule = split, test_split, fill, rule
        self.criteria = CentralObjectCriteria(center_tol, tuple(aspect), tuple(area))
        self.scenes_args = dict(num_images=scenes_images, size=scenes_size, seed=scenes_seed)
        if rotation_step <= 0:
            raise ValueError(f"rotation_step must be positive, got {rotation_step}")
        n_rot = int(round(360 / rotation_step))
        self.grids = {
            "rotation": ([i * rotation_step for i in range(n_rot)], [float(a) for a in rotation_amounts]),
            "scale": ([float(s) for s in scale_inits], [float(a) for a in scale_amounts]),
            "translation_x": ([float(t) for t in translation_inits], [float(a) for a in translation_amounts]),
            "translation_y": ([float(t) for t in translation_inits], [float(a) for a in translation_amounts]),
        }
        self.base_amounts = {"rotation": 10.0, "scale": 1.3, "translation_x": 10.0, "translation_y": 10.0}
        for k, v in (base_amounts or {}).items():
            if k not in AMOUNT_UNITS:
                raise ValueError(f"base_amounts: unknown kind {k!r}; choose from {tuple(AMOUNT_UNITS)}")
            self.base_amounts[k] = float(v)
        for k in self.kinds:
            normalized_amount(k, self.base_amounts[k])
            for a in self.grids[k][1]:
                normalized_amount(k, a)
        self.schedule = phase_schedule(self.kinds)
        self.phase_index = 0  # used when no trainer drives the epochs
        self.train_originals: list[Original] = []
        self.test_originals: list[Original] = []

    # -- data ---------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        # Only an absent dataset is built: any COCO-2014 layout with instances files is read as it is.
        instances = Path(self.root) / "annotations" / f"instances_{self.split}2014.json"
        if self.dataset == "scenes" and not instances.is_file():
            from datamodules.scenes import ensure_scenes

            ensure_scenes(self.root, **self.scenes_args)

    def _read(self, split: str, limit: int | None) -> list[Original]:
        if self.dataset == "ilsvrc":
            return ilsvrc_originals(self.root, split, self.criteria, self.rule, limit)
        return coco_originals(self.root, split, self.criteria, limit)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and not self.train_originals:
            self.train_originals = self._read(self.split, self.max_images)
            if not self.train_originals:
                raise RuntimeError(f"no central-object originals in {self.dataset} split {self.split!r} at {self.root}")
        if stage in (None, "test") and not self.test_originals:
            self.test_originals = self._read(self.test_split, self.test_max_images)
            if not self.test_originals:
                warnings.warn(f"no central-object originals in split {self.test_split!r}; evaluating on "
                              f"{self.split!r} originals", stacklevel=2)
                self.test_originals = self._read(self.split, self.test_max_images)

    def eval_cases(self, kind: str) -> list[tuple[str, float]]:
        return [(name, amount) for name, k, amount in EVAL_CASES if k == kind]

    def reachable_states(self, kind: str) -> list[float]:
        """Every state a rendering of ``kind`` can take (training grid and evaluation cases)."""
        inits, amounts = self.grids[kind]
        identity = 1.0 if kind == "scale" else 0.0
        states = set(inits) | {identity}
        states |= {compose(kind, t, a) for t in inits for a in amounts + [self.base_amounts[kind]]}
        states |= {compose(kind, identity, a) for _, a in self.eval_cases(kind)}
        return sorted(states)

    def sides(self, originals: Sequence[Original], kind: str) -> list[float]:
        """Canvas side per original so the object stays in frame in every state of ``kind``."""
        states = self.reachable_states(kind)
        return [canvas_side(o.box, o.width, o.height, kind, states, self.image_size) for o in originals]

    def phase(self, epoch: int | None = None) -> tuple[str, str]:
        """``(kind, "pca" | "regression")`` of a fitting epoch."""
        if epoch is None:
            epoch = self.trainer.current_epoch if self.trainer is not None else self.phase_index
        return self.schedule[min(epoch, len(self.schedule) - 1)]

    def pairs(self, kind: str, phase: str) -> TransformPairs:
        inits, amounts = self.grids[kind]
        if phase == "pca":
            amounts = [self.base_amounts[kind]]
        elif phase != "regression":
            raise ValueError(f"unknown phase {phase!r}; choose 'pca' or 'regression'")
        return TransformPairs(self.train_originals, kind, inits, amounts, self.sides(self.train_originals, kind),
                              self.image_size, self.fill, reverse=self.reverse and phase == "regression")

    def amount_range(self, kind: str) -> tuple[float, float]:
        """Smallest and largest amount (natural units) the regression pass of ``kind`` fits."""
        amounts = list(self.grids[kind][1])
        if self.reverse:
            amounts += [inverse_amount(kind, a) for a in amounts]
        return min(amounts), max(amounts)

    def test_pairs(self) -> torch.utils.data.ConcatDataset:
        parts = [TransformPairs(self.test_originals, k, [], [], self.sides(self.test_originals, k), self.image_size,
                                self.fill, cases=self.eval_cases(k)) for k in self.kinds if self.eval_cases(k)]
        return torch.utils.data.ConcatDataset(parts)

    def _loader(self, ds: Dataset) -> DataLoader:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        ds = PaddedPairs(ds, world)
        return DataLoader(ds, batch_size=self.batch_size, sampler=ShardSampler(len(ds), rank, world),
                          num_workers=self.num_workers, persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        if not self.train_originals:
            self.setup("fit")
        return self._loader(self.pairs(*self.phase()))

    def test_dataloader(self) -> DataLoader:
        if not self.test_originals:
            self.setup("test")
        return self._loader(self.test_pairs())

    @property
    def num_phases(self) -> int:
        return len(self.schedule)


__all__ = ["Original", "read_voc_annotation", "ilsvrc_originals", "coco_originals", "TransformPairs",
           "ShardSampler", "PaddedPairs", "PairsDataModule", "expand_kinds"]
