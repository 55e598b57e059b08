"""Pivot layer names: the paper's names (feedback-prop §5, Tables 3-5) and module names.

A pivot is given either as a module name from ``model.named_modules()``, as
``"input"`` for the image, or as a paper name such as ``conv13``:

* ResNet-18: conv1, conv5, conv9, conv13, conv17 are the outputs of the stem
  conv and of layer1..layer4 (each stage ends after 4 more convs).
* ResNet-50: conv1, conv10, conv22, conv40, conv49 likewise (9, 12, 18, 9 convs
  per stage).
* VGG-16: conv1..conv13 are each conv's output after its ReLU.
* AlexNet: conv1..conv5 are each conv's output after its ReLU (the feature maps
  of the generators paper, 55x55, 27x27, 13x13 at 224x224).

Paper names are looked up on the first torchvision ResNet / VGG / AlexNet found
inside ``model``, so a wrapper module works too.
"""
from __future__ import annotations

from torch import nn
from torchvision.models import AlexNet, ResNet, VGG
from torchvision.models.resnet import BasicBlock, Bottleneck

INPUT = "input"


def _resnet_names(net: ResNet) -> dict[str, str]:
    convs_per_block = 3 if isinstance(net.layer1[0], Bottleneck) else 2
    names, depth = {"conv1": "conv1"}, 1
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        depth += convs_per_block * len(getattr(net, stage))
        names[f"conv{depth}"] = stage
    return names


def _relu_after_conv_names(features: nn.Sequential, prefix: str) -> dict[str, str]:
    names, k, mods = {}, 0, list(features.named_children())
    for i, (idx, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            k += 1
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            names[f"conv{k}"] = f"{prefix}features.{nxt[0] if nxt and isinstance(nxt[1], nn.ReLU) else idx}"
    return names


def paper_layer_names(model: nn.Module) -> dict[str, str]:
    """Map the paper's ``convK`` names to module names of ``model`` ({} if unknown)."""
    for prefix, m in model.named_modules():
        p = f"{prefix}." if prefix else ""
        if isinstance(m, ResNet) and isinstance(m.layer1[0], (BasicBlock, Bottleneck)):
            return {k: p + v for k, v in _resnet_names(m).items()}
        if isinstance(m, (VGG, AlexNet)):
            return _relu_after_conv_names(m.features, p)
    return {}


def resolve_layer(model: nn.Module, name: str) -> str:
    """Return the module name for pivot ``name`` ("input" stays "input").

    Raises ``ValueError`` naming the layer and listing the valid choices.
    """
    if name == INPUT:
        return INPUT
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return name
    aliases = paper_layer_names(model)
    if name in aliases:
        return aliases[name]
    choices = ", ".join(list(aliases) + ["input", "or any name from model.named_modules()"])
    raise ValueError(f"unknown pivot layer {name!r} for {type(model).__name__}; choose from {choices}")


def resolve_layers(model: nn.Module, names: list[str] | tuple[str, ...] | str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    return [resolve_layer(model, n) for n in names]
