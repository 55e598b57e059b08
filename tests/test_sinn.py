"""SINN and the Table 1 baselines (topdown/sinn.py): relation graphs, partial labels, known loss."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from topdown.sinn import (
    SINN,
    FineClassifier,
    coarse_known_loss,
    coarse_probabilities,
    condition_on_coarse,
    feature_trunk,
    pearson_correlation,
    relation_masks,
    sinn_loss,
    stacked_level_targets,
)

# 5 fine categories, 3 general, 2 coarse; fine 2 belongs to two general and two coarse categories.
FINE_TO_GENERAL = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 1, 0], [0, 0, 1]], dtype=torch.float)
FINE_TO_COARSE = torch.tensor([[1, 0], [1, 0], [1, 1], [0, 1], [0, 1]], dtype=torch.float)


def tiny_trunk(dim: int = 6) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, dim, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_sinn(seed: int = 0) -> SINN:
    torch.manual_seed(seed)
    net = SINN(tiny_trunk(), 6, (2, 3, 5), observed=("coarse",))
    targets = torch.arange(5).repeat(8)
    labels = stacked_level_targets(targets, FINE_TO_GENERAL, FINE_TO_COARSE)
    net.set_relations(*relation_masks(pearson_correlation(labels), 0.05))
    return net.eval()


def test_pearson_matches_numpy_and_constant_labels_get_zero():
    torch.manual_seed(0)
    x = (torch.rand(50, 4) > 0.5).float()
    x[:, 3] = 1.0  # constant: correlation undefined
    corr = pearson_correlation(x)
    import numpy as np

    ref = np.corrcoef(x[:, :3].numpy(), rowvar=False)
    assert torch.allclose(corr[:3, :3], torch.from_numpy(ref).float(), atol=1e-5)
    assert torch.all(corr[3] == 0) and torch.all(corr[:, 3] == 0)


def test_relation_masks_follow_the_threshold():
    corr = torch.tensor([[1.0, 0.3, -0.3, 0.05], [0.3, 1.0, -0.1, 0.0], [-0.3, -0.1, 1.0, 0.2], [0.05, 0.0, 0.2, 1.0]])
    pos, neg = relation_masks(corr, 0.15)
    assert pos.tolist() == [[False, True, False, False], [True, False, False, False],
                            [False, False, False, True], [False, False, True, False]]
    assert neg.tolist() == [[False, False, True, False], [False, False, False, False],
                            [True, False, False, False], [False, False, False, False]]
    # a lower threshold admits the weaker relations too
    pos2, neg2 = relation_masks(corr, 0.01)
    assert pos2[0, 3] and neg2[1, 2] and not pos2.diagonal().any()
    with pytest.raises(ValueError, match="threshold"):
        relation_masks(corr, -0.1)


def test_sinn_layers_get_the_hierarchy_blocks_of_the_relation_graph():
    net = tiny_sinn()
    labels = stacked_level_targets(torch.arange(5).repeat(8), FINE_TO_GENERAL, FINE_TO_COARSE)
    pos, neg = relation_masks(pearson_correlation(labels), 0.05)
    # rows coarse 0:2, general 2:5, fine 5:10; down[coarse->general] holds rows=general, cols=coarse
    assert torch.equal(net.down["coarse_to_general"].mask_pos.bool(), pos[2:5, 0:2])
    assert torch.equal(net.up["fine_to_general"].mask_neg.bool(), neg[2:5, 5:10])
    assert torch.equal(net.intra["fine"].mask_neg.bool(), neg[5:10, 5:10])
    # memberships are positive relations: fine 2 -> general 1 and 2
    assert net.up["fine_to_general"].mask_pos[1, 2] == 1 and net.up["fine_to_general"].mask_pos[2, 2] == 1
    # a relation the graph lacks gets no message whatever its weight
    layer = net.down["general_to_fine"]
    with torch.no_grad():
        layer.weight_pos.fill_(5.0), layer.weight_neg.fill_(5.0)
        layer.mask_pos.zero_(), layer.mask_neg.zero_()
    assert torch.count_nonzero(layer(torch.randn(4, 3))) == 0


def test_sinn_partial_labels_change_the_fine_outputs():
    net = tiny_sinn()
    image = torch.randn(2, 3, 16, 16)
    out_a = net(image, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    out_b = net(image, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert set(out_a) == {"coarse", "general", "fine"}
    assert out_a["fine"].shape == (2, 5) and out_a["general"].shape == (2, 3) and out_a["coarse"].shape == (2, 2)
    assert not torch.allclose(out_a["fine"], out_b["fine"])
    # knowing "coarse 0" must favour the fine categories under coarse 0 (fine 0, 1) over those outside (3, 4)
    diff = out_a["fine"] - out_b["fine"]
    assert diff[:, :2].mean() > diff[:, 3:].mean()
    with pytest.raises(ValueError, match="partial labels"):
        net(image)


def test_sinn_loss_trains_all_levels():
    net = tiny_sinn().train()
    target = torch.tensor([0, 2, 4])
    out = net(torch.randn(3, 3, 16, 16), FINE_TO_COARSE[target])
    loss = sinn_loss(out, target, FINE_TO_GENERAL, FINE_TO_COARSE)
    loss.backward()
    assert torch.isfinite(loss)
    assert net.visual["fine"].weight.grad.abs().sum() > 0 and net.visual["general"].weight.grad.abs().sum() > 0
    assert net.partial["coarse"].weight.grad.abs().sum() > 0


def test_baseline_pl_partial_labels_reach_the_classifier():
    torch.manual_seed(0)
    net = FineClassifier(tiny_trunk(), 6, 5, num_partial=2).eval()
    image = torch.randn(2, 3, 16, 16)
    a = net(image, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    b = net(image, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="partial labels"):
        net(image)
    plain = FineClassifier(tiny_trunk(), 6, 5)
    assert plain(image).shape == (2, 5) and plain.classifier.in_features == 6


def test_coarse_probabilities_sum_memberships():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]]))
    p = coarse_probabilities(logits, FINE_TO_COARSE)
    assert torch.allclose(p, torch.tensor([[0.6, 0.7]]), atol=1e-6)  # fine 2 counts for both


def test_conditioning_on_known_coarse_labels_by_hand():
    """Bsln + cond: zero the fine classes outside the known coarse categories, renormalise; fine 2
    lies in both coarse categories, so it stays inside whichever is known."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    known = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got = condition_on_coarse(p.log().expand(3, 5), known, FINE_TO_COARSE)
    want = torch.tensor([[0.1 / 0.6, 0.2 / 0.6, 0.3 / 0.6, 0.0, 0.0],   # inside: 0, 1, 2 (sum 0.6)
                         [0.0, 0.0, 0.3 / 0.7, 0.15 / 0.7, 0.25 / 0.7],  # inside: 2, 3, 4 (sum 0.7)
                         [0.1, 0.2, 0.3, 0.15, 0.25]])                    # both known: unchanged
    assert torch.allclose(got, want, atol=1e-6)
    # the argmax moves only where the evidence rules the Baseline's top class out
    assert got.argmax(-1).tolist() == [2, 2, 2]
    assert condition_on_coarse(torch.tensor([[0.0, 0, 0, 9.0, 0]]), known[:1], FINE_TO_COARSE).argmax().item() == 0
    with pytest.raises(ValueError, match=r"image\(s\) \[1\]"):
        condition_on_coarse(p.log().expand(2, 5), torch.tensor([[1.0, 0.0], [0.0, 0.0]]), FINE_TO_COARSE)


def test_coarse_known_loss_is_per_sample_and_lower_when_consistent():
    fine = torch.tensor([[5.0, 0, 0, 0, 0], [0, 0, 0, 0, 5.0]])
    loss = coarse_known_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), FINE_TO_COARSE)({"fine": fine})
    assert loss.shape == (2,)
    assert loss[0] < loss[1]  # fine 0 is indoor-like coarse 0, fine 4 is not


def test_feature_trunk_keeps_alexnet_pivot_names():
    from topdown.layers import resolve_layers

    trunk, dim = feature_trunk("alexnet")
    net = FineClassifier(trunk, dim, 4)
    assert dim == 4096
    assert resolve_layers(net, ["conv2", "conv5"]) == ["trunk.features.4", "trunk.features.11"]
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_trunk_state_keys_strip_wrapper_prefixes():
    from topdown.backbones import torchvision_keys as trunk_state_keys

    w = torch.zeros(1)
    keys = trunk_state_keys({
        "features.module.0.weight": w,      # Places365 AlexNet: DataParallel on features only
        "module.classifier.1.weight": w,    # DataParallel on the whole model
        "net.trunk.features.3.bias": w,     # a FineClassifier / SINN inside a Lightning module
        "trunk.classifier.4.bias": w,
        "features.10.weight": w,            # already plain
    })
    assert sorted(keys) == ["classifier.1.weight", "classifier.4.bias", "features.0.weight",
                            "features.10.weight", "features.3.bias"]


def test_feature_trunk_loads_prefixed_files_and_rejects_foreign_ones(tmp_path):
    from topdown.sinn import feature_trunk

    torch.manual_seed(0)
    source, _ = feature_trunk("mobilenet_v3_small")
    state = source.state_dict()
    places = {"state_dict": {k.replace("features.", "features.module.", 1): v for k, v in state.items()}}
    places["state_dict"]["classifier.3.weight"] = torch.randn(365, 1024)  # the file's own head: skipped
    lightning = {"state_dict": {f"net.trunk.{k}": v for k, v in state.items()} | {"net.classifier.weight": torch.randn(5, 1024)}}
    for name, blob in (("places.pth.tar", places), ("baseline.ckpt", lightning)):
        torch.save(blob, tmp_path / name)
        torch.manual_seed(1)
        trunk, dim = feature_trunk("mobilenet_v3_small", str(tmp_path / name))
        assert dim == 1024
        loaded = trunk.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), name
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth"):
        feature_trunk("mobilenet_v3_small", str(tmp_path / "other.pth"))
