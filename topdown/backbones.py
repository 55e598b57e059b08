"""Backbones by name with a multi-label (or any-size) head, keeping torchvision's module names.

``build_backbone("resnet18", 80)`` is torchvision's ResNet-18 whose last linear
layer now has 80 outputs, so pivot names such as ``layer3`` or the paper's
``conv13`` (see :mod:`topdown.layers`) address the same modules as in any
torchvision model. ``head="conv_max"`` is the feedback-prop reference code's
head: a 1x1 convolution on the last feature map followed by a spatial max.

Weights never come from the network: ``weights`` is a local file (a state dict,
or a Lightning checkpoint) or the name of torchvision weights that are already
in the torch hub cache.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import nn

HEADS = ("linear", "conv_max")


class ConvMaxHead(nn.Module):
    """1x1 conv to ``num_outputs`` maps, then the spatial max (one score per label)."""

    def __init__(self, in_channels: int, num_outputs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_outputs, kernel_size=1)

    def forward(self, x):
        return torch.amax(self.conv(x), dim=(2, 3), keepdim=True)


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to replace")
    return found[-1]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _last_conv_channels(model: nn.Module) -> int:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no conv layer for the conv_max head")
    return convs[-1].out_channels


def cached_weights_path(weights_name: str) -> Path:
    """Local cache path of torchvision weights ``weights_name`` (e.g. ``ResNet18_Weights.IMAGENET1K_V1``).

    Raises ``FileNotFoundError`` when the file is not cached: nothing is downloaded.
    """
    try:
        w = torchvision.models.get_weight(weights_name)
    except (ValueError, AttributeError, KeyError) as e:
        raise ValueError(f"unknown torchvision weights name {weights_name!r}") from e
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    if not path.is_file():
        raise FileNotFoundError(
            f"torchvision weights {weights_name!r} are not cached at {path}; no download is attempted. "
            "Copy the file there or pass a local file path as weights."
        )
    return path


# Wrappers that prefix a network's keys: nn.DataParallel (``module.``, or ``features.module.`` when only
# ``features`` was wrapped, as in the Places365 AlexNet release), Lightning modules (``net.``), the
# hierarchical networks (``trunk.``) and other wrappers (``model.``).
_WRAPPER_PREFIXES = ("module.", "net.", "trunk.", "model.")


def torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a state dict's keys onto torchvision names: drop wrapper prefixes and ``.module.`` segments.

    ``module.features.0.weight``, ``features.module.0.weight``, ``net.trunk.features.0.weight`` and
    ``trunk.features.0.weight`` all become ``features.0.weight``.
    """
    out = {}
    for key, value in state.items():
        k = key.replace(".module.", ".")
        while k.startswith(_WRAPPER_PREFIXES):
            k = k[k.index(".") + 1:]
        out[k] = value
    return out


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a plain ``.pth`` file or of a checkpoint (``state_dict`` / ``model`` entry), torchvision-named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    for entry in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(entry), dict):
            state = state[entry]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return torchvision_keys({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


@dataclass
class WeightsReport:
    """What :func:`load_weights` did with a weights file."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors outside the head that the file lacks
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # name, file shape, model shape
    unused: list[str] = field(default_factory=list)  # file tensors with no counterpart in the model
    head: list[str] = field(default_factory=list)  # head tensors not loaded (the head is replaced anyway)

    @property
    def complete(self) -> bool:
        """Every tensor of the trunk (the model without its head) came from the file."""
        return not self.missing and not self.mismatched

    def __str__(self) -> str:
        def some(names):
            return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

        parts = [f"weights {self.path}: loaded {len(self.loaded)} tensors"]
        if self.head:
            parts.append(f"head not loaded ({some(self.head)})")
        if self.missing:
            parts.append(f"{len(self.missing)} trunk tensors missing ({some(self.missing)})")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} with other shapes (" + ", ".join(
                f"{n} {tuple(a)} in the file vs {tuple(b)}" for n, a, b in self.mismatched[:3]) + ")")
        if self.unused:
            parts.append(f"{len(self.unused)} file tensors unused ({some(self.unused)})")
        return "; ".join(parts)


def load_weights(model: nn.Module, path: str | os.PathLike, partial: bool = False,
                 head: Sequence[str] = ()) -> WeightsReport:
    """Load the tensors of ``path`` into ``model`` by name and shape, and report what happened.

    ``head``: module names whose tensors may be absent or shaped otherwise (a layer that is
    replaced after loading, e.g. ImageNet's 1000-way ``fc``).  Everything else is the trunk:
    a trunk tensor the file does not hold, or holds with another shape, is an error naming it,
    before any training, unless ``partial`` (then it keeps its random initialisation and a
    warning says how many).  A file where nothing matches is always an error.  Tensors of the
    file that the model has no place for (a Places365 file's own classifier) are reported as
    unused.  BatchNorm's ``num_batches_tracked`` counters are not required.
    """
    state = load_state(path)
    own = model.state_dict()
    in_head = lambda key: any(key == h or key.startswith(h + ".") for h in head)  # noqa: E731
    report = WeightsReport(str(path))
    compatible = {}
    for key, value in state.items():
        if key not in own:
            report.unused.append(key)
        elif own[key].shape != value.shape:
            if not in_head(key):
                report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            compatible[key] = value
    report.loaded = list(compatible)
    for key in own:
        if key not in compatible:
            if in_head(key):
                report.head.append(key)
            elif key not in state and not key.endswith("num_batches_tracked"):
                report.missing.append(key)
    if not compatible:
        raise ValueError(f"no tensor of {path} matches {type(model).__name__}: wrong architecture? "
                         f"file keys look like {list(state)[:3]}, the model's like {list(own)[:3]}")
    if not report.complete:
        if not partial:
            raise ValueError(f"{report}. The file does not hold the whole trunk of {type(model).__name__}; "
                             "training from it would start partly from random weights. Pass partial weights "
                             "(--model.partial_weights true) to accept that.")
        warnings.warn(f"partial weights: {report}", stacklevel=2)
    model.load_state_dict(compatible, strict=False)
    return report


def weights_path(weights: str) -> str | Path:
    """A local file, or the cached file of a torchvision weights name (nothing is downloaded)."""
    looks_like_file = Path(weights).exists() or os.sep in str(weights) or str(weights).endswith((".pt", ".pth", ".ckpt", ".tar"))
    return weights if looks_like_file else cached_weights_path(weights)


def train_head_only(model: nn.Module, frozen: bool) -> None:
    """Freeze (``frozen``) or release every parameter of a :func:`build_backbone` model except its
    new head's (``model.topdown_head``): the reference recipe trains the head alone first."""
    for p in model.parameters():
        p.requires_grad_(not frozen)
    for p in model.get_submodule(model.topdown_head).parameters():
        p.requires_grad_(True)


def build_backbone(name: str, num_outputs: int, head: str = "linear", weights: str | None = None,
                   partial_weights: bool = False) -> nn.Module:
    """Torchvision classification model ``name`` with a fresh ``num_outputs`` head.

    The new head's module name is stored in ``model.topdown_head`` (for head-only training), the
    :class:`WeightsReport` of ``weights`` in ``model.topdown_weights`` (None without weights).

    Args:
        name: any torchvision classification model name (``resnet18``, ``resnet50``, ``vgg16``, ``alexnet``, ...).
        num_outputs: size of the new last layer (labels or classes).
        head: ``"linear"`` replaces the last ``nn.Linear``; ``"conv_max"`` replaces the global pooling by
            :class:`ConvMaxHead` and drops the fully connected classifier (models with ``avgpool`` only).
        weights: local file path or cached torchvision weights name; the old head's tensors are skipped,
            every other tensor must be in the file (:func:`load_weights`).
        partial_weights: accept a file that holds only part of the trunk.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {HEADS}")
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown backbone {name!r}; torchvision classification models: {', '.join(available)}")
    model = torchvision.models.get_model(name, weights=None)
    lin_name, lin = _last_linear(model)
    report = None
    if weights:
        report = load_weights(model, weights_path(weights), partial=partial_weights, head=[lin_name])

    if head == "linear":
        _set_submodule(model, lin_name, nn.Linear(lin.in_features, num_outputs))
        model.topdown_head = lin_name
    else:
        if not hasattr(model, "avgpool"):
            raise ValueError(f"head='conv_max' needs a model with an avgpool stage; {name} has none")
        model.avgpool = ConvMaxHead(_last_conv_channels(model), num_outputs)
        # The classifier after the pooled 1x1 scores becomes the identity: flatten gives [B, K].
        if hasattr(model, "fc"):
            model.fc = nn.Identity()
        else:
            model.classifier = nn.Identity()
        model.topdown_head = "avgpool"
    model.topdown_weights = report
    return model
