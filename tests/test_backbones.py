"""Backbones by name, paper layer names, local/cached weights, and the eq. 6 loss."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torchvision
from torch import nn

from topdown.backbones import build_backbone, train_head_only
from topdown.layers import paper_layer_names, resolve_layer
from topdown.losses import label_weights, weighted_bce


@pytest.mark.parametrize("head", ["linear", "conv_max"])
def test_multilabel_head_gives_one_score_per_label(head):
    net = build_backbone("resnet18", 7, head=head).eval()
    out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    assert net.topdown_head in dict(net.named_modules())


def test_conv_max_head_is_spatial_max_of_1x1_conv():
    net = build_backbone("resnet18", 5, head="conv_max").eval()
    x = torch.randn(1, 3, 64, 64)
    trunk = nn.Sequential(*list(net.children())[:-2])  # up to layer4
    expected = net.avgpool.conv(trunk(x)).amax(dim=(2, 3))
    torch.testing.assert_close(net(x), expected)


def meta(name: str) -> nn.Module:
    """Architecture only (no weight initialisation): names and shapes are all these tests read."""
    with torch.device("meta"):
        return torchvision.models.get_model(name)


def test_paper_layer_names():
    r18, r50 = meta("resnet18"), meta("resnet50")
    n18, n50 = paper_layer_names(r18), paper_layer_names(r50)
    assert list(n18) == [f"conv{k}" for k in range(1, 18)] and list(n50) == [f"conv{k}" for k in range(1, 50)]
    # Tables 3-5 and §6: the stem and the stage ends
    assert {k: n18[k] for k in ("conv1", "conv5", "conv9", "conv13", "conv17")} == {
        "conv1": "relu", "conv5": "layer1", "conv9": "layer2", "conv13": "layer3", "conv17": "layer4"}
    assert {k: n50[k] for k in ("conv1", "conv10", "conv22", "conv40", "conv49")} == {
        "conv1": "relu", "conv10": "layer1", "conv22": "layer2", "conv40": "layer3", "conv49": "layer4"}
    # inside residual blocks: Figure 4's ResNet-18 conv10 and §5's ResNet-50 conv20
    assert n18["conv10"] == "layer3.0.relu#0" and n18["conv11"] == "layer3.0" and n18["conv12"] == "layer3.1.relu#0"
    assert n50["conv20"] == "layer2.3.relu#0" and n50["conv21"] == "layer2.3.relu#1"
    vgg16 = meta("vgg16")
    vgg = paper_layer_names(vgg16)
    assert len(vgg) == 13 and vgg["conv1"] == "features.1" and vgg["conv13"] == "features.29"
    assert all(isinstance(vgg16.get_submodule(m), nn.ReLU) for m in vgg.values())
    alex = paper_layer_names(meta("alexnet"))
    assert alex == {f"conv{i + 1}": f"features.{j}" for i, j in enumerate([1, 4, 7, 9, 11])}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_paper_names_are_the_activation_after_each_conv(arch):
    """convK = the K-th conv (forward order, shortcuts not counted) after its batch norm and ReLU,
    with the shortcut added first at the end of a block: computed here from the convs' raw outputs."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    torch.manual_seed(0)
    net = torchvision.models.get_model(arch).eval()
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
    raw, block_in, calls = {}, {}, {}
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, a, o, name=name: raw.__setitem__(name, o))
        if isinstance(m, (BasicBlock, Bottleneck)):
            m.register_forward_pre_hook(lambda mod, a, name=name: block_in.__setitem__(name, a[0]))
        m.register_forward_hook(lambda mod, a, o, name=name: calls.setdefault(name, []).append(o))
    with torch.no_grad():
        net(torch.randn(1, 3, 32, 32))
        names = paper_layer_names(net)
        assert len(names) == len(convs) == (17 if arch == "resnet18" else 49)
        for k, conv in enumerate(convs, 1):
            block_name, _, leaf = conv.rpartition(".")
            if not block_name:  # the stem
                want = torch.relu(net.bn1(raw[conv]))
            else:
                block = net.get_submodule(block_name)
                j = int(leaf.removeprefix("conv"))
                want = getattr(block, f"bn{j}")(raw[conv])
                if not hasattr(block, f"conv{j + 1}"):  # the block's last conv: the shortcut, then the ReLU
                    x = block_in[block_name]
                    want = want + (block.downsample(x) if block.downsample is not None else x)
                want = torch.relu(want)
            module, _, call = names[f"conv{k}"].partition("#")
            torch.testing.assert_close(calls[module][int(call or 0)], want, msg=f"conv{k} -> {names[f'conv{k}']}")


def test_alexnet_conv_maps_have_the_papers_flow_size():
    """2*55^2 + 2*27^2 + 3*2*13^2 = 8,522 flow values per pair (generators paper, footnote 1)."""
    net = torchvision.models.alexnet().eval()
    sizes = {}
    for name, module in paper_layer_names(net).items():
        net.get_submodule(module).register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, o.shape[-2:]))
    net(torch.randn(1, 3, 224, 224))
    assert sum(2 * h * w for h, w in sizes.values()) == 8522


def test_paper_names_resolve_inside_a_wrapper_and_bad_names_are_named():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torchvision.models.resnet18()

    w = Wrapper()
    assert resolve_layer(w, "conv13") == "trunk.layer3"
    assert resolve_layer(w, "trunk.layer2") == "trunk.layer2"
    assert resolve_layer(w, "input") == "input"
    assert resolve_layer(w, "conv10") == "trunk.layer3.0.relu#0"
    assert resolve_layer(w, "trunk.layer3.0.relu#1") == "trunk.layer3.0.relu#1"
    with pytest.raises(ValueError, match="conv18.*conv1"):
        resolve_layer(w, "conv18")
    with pytest.raises(ValueError, match="must be a number"):
        resolve_layer(w, "trunk.layer3.0.relu#x")


def test_weights_from_a_local_file_skip_the_old_head(tmp_path):
    source = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    net = build_backbone("resnet18", 3, weights=str(path))
    torch.testing.assert_close(net.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert net.fc.out_features == 3
    report = net.topdown_weights
    assert report.complete and len(report.loaded) == len(source.state_dict()) and not report.unused
    assert "loaded 122 tensors" in str(report)


def test_an_incomplete_trunk_is_an_error_unless_partial_loading_is_asked_for(tmp_path):
    source = torchvision.models.resnet18().state_dict()
    kept = {k: v for k, v in source.items() if not k.startswith("layer4.")}  # most of the file matches
    kept["conv1.weight"] = torch.zeros(64, 3, 5, 5)  # and one tensor has another shape
    kept["extra.weight"] = torch.zeros(2)
    torch.save(kept, tmp_path / "part.pth")
    missing = sum(1 for k in source if k.startswith("layer4.") and not k.endswith("num_batches_tracked"))
    with pytest.raises(ValueError, match=rf"{missing} trunk tensors missing \(layer4.*1 with other shapes \(conv1.weight "
                                         r"\(64, 3, 5, 5\) in the file vs \(64, 3, 7, 7\).*partial_weights"):
        build_backbone("resnet18", 3, weights=str(tmp_path / "part.pth"))
    with pytest.warns(UserWarning, match=f"partial weights.*{missing} trunk tensors missing"):
        net = build_backbone("resnet18", 3, weights=str(tmp_path / "part.pth"), partial_weights=True)
    report = net.topdown_weights
    assert not report.complete and report.unused == ["extra.weight"] and len(report.missing) == missing
    torch.testing.assert_close(net.layer3[1].conv2.weight, source["layer3.1.conv2.weight"])
    assert not torch.equal(net.conv1.weight, torch.zeros(64, 3, 7, 7))


def test_dataparallel_prefixes_are_stripped(tmp_path):
    source = torchvision.models.alexnet()
    path = tmp_path / "places365_alexnet.pth"
    torch.save({k.replace("features.", "features.module."): v for k, v in source.state_dict().items()}, path)
    net = build_backbone("alexnet", 4, weights=str(path))
    torch.testing.assert_close(net.features[3].weight, source.features[3].weight)


def test_torchvision_weights_name_only_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not cached.*no download"):
        build_backbone("resnet18", 3, weights="ResNet18_Weights.IMAGENET1K_V1")
    source = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    net = build_backbone("resnet18", 3, weights="ResNet18_Weights.IMAGENET1K_V1")
    torch.testing.assert_close(net.conv1.weight, source.conv1.weight)


def test_bad_names_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'.*resnet18"):
        build_backbone("resnet19", 3)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("resnet18", 3, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="unknown head"):
        build_backbone("resnet18", 3, head="avg")


def test_label_weights_are_negatives_over_positives():
    y = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]])
    w = label_weights(y)
    assert w[0] == 1.0 and w[2] == 3.0
    assert w[1] == 3.0  # no positive: the largest finite weight, not inf


def test_weighted_bce_is_eq6():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    lam = torch.tensor([1.5, 4.0])
    s = torch.sigmoid(logits)
    expected = -sum(
        lam[j] * (y[i, j] * math.log(s[i, j]) + (1 - y[i, j]) * math.log(1 - s[i, j])) / 2
        for i in range(2) for j in range(2)
    )
    torch.testing.assert_close(weighted_bce(logits, y, lam), torch.as_tensor(expected, dtype=torch.float32))


def test_train_head_only_freezes_the_trunk_and_releases_it():
    net = build_backbone("resnet18", 5)
    train_head_only(net, frozen=True)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    train_head_only(net, frozen=False)
    assert all(p.requires_grad for p in net.parameters())
