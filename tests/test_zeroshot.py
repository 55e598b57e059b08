"""Zero-shot amount estimation (§3.2): GeneratorBank.estimate, the >60° task's scores and its rotation pairs."""
from __future__ import annotations

import math

import pytest
import torch

from topdown.generators import FlowLayout, GeneratorBank, GeneratorModel
from topdown.zeroshot import angle_error, categorize

torch.set_num_threads(1)

FITTED = {"rotation": (-60.0, 60.0), "scale": (1 / 1.4, 1.4), "translation_x": (-30.0, 30.0)}


def _bank(seed=0):
    layout = FlowLayout(("conv1", "conv5"), ((6, 6), (3, 3)))
    g = torch.Generator().manual_seed(seed)
    bank = GeneratorBank(layout, 224)
    for kind, rng in FITTED.items():
        basis = torch.randn(layout.dim, 5, generator=g, dtype=torch.float64)
        bank.add(GeneratorModel(kind, basis, torch.randn(15, generator=g, dtype=torch.float64) / 4, 3, None,
                                {"amount_range": list(rng)}))
    return bank


@pytest.mark.parametrize("kind", list(FITTED))
def test_estimate_recovers_the_amount_of_a_generators_own_flow(kind):
    bank = _bank()
    lo, hi = FITTED[kind]
    if kind == "scale":  # natural units: factors, evenly spaced in log
        amounts = torch.logspace(math.log10(lo), math.log10(hi), 37, dtype=torch.float64)
    else:
        amounts = torch.linspace(lo, hi, 37, dtype=torch.float64)
    flows = torch.stack([bank.models[kind].flow_vector(float(a)) for a in amounts])  # [B, D] in layout order
    est = bank.estimate(kind, flows)
    assert est.shape == (37,) and est.dtype == torch.float32
    tol = 1e-4 if kind == "scale" else 1e-3
    assert torch.allclose(est.double(), amounts, atol=tol, rtol=0), (est - amounts).abs().max()
    as_dict = bank.layout.unflatten(flows.float())  # {layer: [B, 2, H, W]}, as feature_flows returns
    assert torch.allclose(bank.estimate(kind, as_dict).double(), amounts, atol=10 * tol, rtol=0)

    # Noise of 10% of the flow's RMS per value moves the estimate by a small fraction of the range.
    g = torch.Generator().manual_seed(1)
    rms = flows.pow(2).mean(1, keepdim=True).sqrt()
    noisy = flows + 0.1 * rms * torch.randn(flows.shape, generator=g, dtype=torch.float64)
    err = (bank.estimate(kind, noisy).double() - amounts).abs()
    if kind == "scale":
        err = (bank.estimate(kind, noisy).double().log() - amounts.log()).abs() / math.log(hi / lo)
        assert err.max() < 0.05, err.max()
    else:
        assert err.max() < 0.05 * (hi - lo), err.max()


def test_estimate_searches_beyond_the_fitted_range_and_checks_its_input():
    bank = _bank()
    assert bank.search_range("rotation") == (-180.0, 180.0) and bank.search_range("translation_x") == (-112.0, 112.0)
    far = bank.models["rotation"].flow_vector(100.0)[None]  # extrapolated, but still the nearest generator
    assert bank.estimate("rotation", far).item() == pytest.approx(100.0, abs=1e-3)
    assert bank.estimate("rotation", far, bounds=(-60.0, 60.0)).item() <= 60.0
    with pytest.raises(ValueError, match=r"flows must be \[B, 90\]"):
        bank.estimate("rotation", torch.zeros(3, 80))
    with pytest.raises(KeyError, match="translation_y"):
        bank.estimate("translation_y", torch.zeros(1, 90))
    with pytest.raises(KeyError, match="conv5"):
        bank.estimate("rotation", {"conv1": torch.zeros(1, 2, 6, 6)})


def test_categorize_scores_each_range():
    truth = torch.tensor([10.0, 50.0, 70.0, 110.0, 59.0])
    est = torch.tensor([20.0, 65.0, 80.0, -170.0, 40.0])  # -170° is 80° from 110° the short way round
    rows = {r["range"]: r for r in categorize(truth, est, 60.0)}
    assert rows["all"]["pairs"] == 5 and rows["all"]["accuracy"] == pytest.approx(3 / 5)
    assert rows["< 60"]["pairs"] == 3 and rows["< 60"]["accuracy"] == pytest.approx(2 / 3)
    assert rows["> 60"]["accuracy"] == pytest.approx(0.5)
    assert rows["> 60"]["abs_error_mean"] == pytest.approx((10 + 80) / 2)
    assert rows["< 60"]["abs_error_median"] == pytest.approx(15.0)
    assert angle_error(torch.tensor([350.0]), torch.tensor([10.0])).item() == pytest.approx(20.0)


def test_rotation_pairs_are_fixed_by_index_not_by_size(tmp_path):
    from datamodules.rotation_pairs import RotationPairs, RotationPairsDataModule
    from tests.test_pairs import CENTRAL, _write_coco

    _write_coco(tmp_path, "train", [[CENTRAL]] * 3)
    _write_coco(tmp_path, "val", [[CENTRAL]] * 2)
    dm = RotationPairsDataModule(root=str(tmp_path), train_pairs=40, test_pairs=6, image_size=32)
    dm.setup("fit")
    assert dm.describe() == {"train": {"originals": 3, "pairs": 40}, "test": {"originals": 2, "pairs": 6}}
    small = RotationPairs(dm.train_set.originals, 10, stream=1, image_size=64)
    assert [small.draw(i) for i in range(10)] == [dm.train_set.draw(i) for i in range(10)]
    draws = [dm.train_set.draw(i) for i in range(40)]
    assert [d[0] for d in draws[:6]] == [0, 1, 2, 0, 1, 2]  # originals in turn
    assert all(0 <= t < 360 and 0 <= a < 120 for _, t, a in draws)
    item = dm.train_set[5]
    assert item["label"].item() == float(item["amount"].item() > 60) and item["image"].shape == (3, 32, 32)
    assert dm.test_set.draw(0) != dm.train_set.draw(0)  # another stream for the held-out split


def test_rotation_field_turns_counter_clockwise_on_screen():
    from topdown.zeroshot import rotation_field

    layout = FlowLayout(("conv1", "conv5"), ((55, 55), (13, 13)))
    field = layout.unflatten(rotation_field(layout, 224, 90.0))
    # conv5 cell (row 6, col 12) sits at pixel (207.5, 111.5), offset (95.5, -0.5) from the centre (112, 112):
    # +90° takes the offset to (-0.5, -95.5) (up), a displacement of (-96, -95) px = (-6, -5.9375) cells.
    assert field["conv5"][:, 6, 12].tolist() == pytest.approx([-6.0, -5.9375])
    assert field["conv1"].abs().max() > 0 and rotation_field(layout, 224, 0.0).abs().max() == 0
