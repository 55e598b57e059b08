"""Pivot layer names: the paper's names (feedback-prop Figure 4, §4.3-§6, Tables 2-6) and module names.

A pivot is given either as a module name from ``model.named_modules()``, as
``"input"`` for the image, as one call of a module that runs several times in a
forward pass (``"layer3.0.relu#1"``: the second call, counting from 0), or as a
paper name ``convK``: the activation after the K-th convolution of the network,
counted in forward order, once its batch norm, its ReLU and (at the end of a
residual block) the shortcut have been applied.

* ResNet (18: 17 convs, 50: 49 convs; the 1x1 projection shortcuts do not count):
  ``conv1`` is the stem after ``bn1`` and ``relu``; a conv that ends a residual
  block is the block's output (``layer1.0``; the whole stage, ``layer3``, for its
  last block); a conv inside a block is one call of the block's shared ReLU
  (``layer3.0.relu#0`` after ``bn1``, ``#1`` after ``bn2`` in a bottleneck).
  So ResNet-18 ``conv5, conv9, conv13, conv17`` end layer1..layer4 and
  ``conv10`` (Figure 4) is ``layer3.0.relu#0``; ResNet-50 ``conv10, conv22,
  conv40, conv49`` end layer1..layer4 and ``conv20`` (§5) is ``layer2.3.relu#0``.
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
CALL = "#"  # "module#k": the k-th call (from 0) of a module in one forward pass


def split_call(name: str) -> tuple[str, int | None]:
    """``"layer3.0.relu#1"`` -> ``("layer3.0.relu", 1)``; a plain module name -> ``(name, None)``."""
    module, sep, k = name.partition(CALL)
    if not sep:
        return name, None
    if not k.isdigit():
        raise ValueError(f"pivot layer {name!r}: the call after '{CALL}' must be a number from 0, e.g. {module}{CALL}1")
    return module, int(k)


def _resnet_names(net: ResNet) -> dict[str, str]:
    convs_per_block = 3 if isinstance(net.layer1[0], Bottleneck) else 2
    names, k = {"conv1": "relu"}, 1
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks = getattr(net, stage)
        for b in range(len(blocks)):
            for j in range(convs_per_block):
                k += 1
                if j < convs_per_block - 1:  # inside the block: the j-th call of its ReLU
                    names[f"conv{k}"] = f"{stage}.{b}.relu{CALL}{j}"
                else:  # the block's last conv: its output after the shortcut and the ReLU
                    names[f"conv{k}"] = stage if b == len(blocks) - 1 else f"{stage}.{b}"
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
    """Map the paper's ``convK`` names to module names (or ``module#k`` calls) of ``model`` ({} if unknown)."""
    for prefix, m in model.named_modules():
        p = f"{prefix}." if prefix else ""
        if isinstance(m, ResNet) and isinstance(m.layer1[0], (BasicBlock, Bottleneck)):
            return {k: p + v for k, v in _resnet_names(m).items()}
        if isinstance(m, (VGG, AlexNet)):
            return _relu_after_conv_names(m.features, p)
    return {}


def resolve_layer(model: nn.Module, name: str) -> str:
    """Return the module name (``module#k`` for one call) for pivot ``name`` ("input" stays "input").

    Raises ``ValueError`` naming the layer and listing the valid choices.
    """
    if name == INPUT:
        return INPUT
    modules = dict(model.named_modules())
    module, call = split_call(name)
    if module in modules and module != "":
        return name if call is None else f"{module}{CALL}{call}"
    aliases = paper_layer_names(model)
    if name in aliases:
        return aliases[name]
    shown = list(aliases)
    if len(shown) > 20:
        shown = shown[:8] + ["...", shown[-1]]
    choices = ", ".join(shown + ["input", "any name from model.named_modules()",
                                 f"or one call of a module that runs several times (name{CALL}k)"])
    raise ValueError(f"unknown pivot layer {name!r} for {type(model).__name__}; choose from {choices}")


def resolve_layers(model: nn.Module, names: list[str] | tuple[str, ...] | str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    return [resolve_layer(model, n) for n in names]
