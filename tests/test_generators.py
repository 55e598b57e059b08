"""Flow PCA, streaming regression, the generator bank, warping and an end-to-end tiny fit."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from topdown.generators import (ConvFeatures, FlowLayout, GeneratorBank, GeneratorModel, PCAStats,
                                RegressionStats, WarpErrorStats, basis_matrix, evaluate_bank, invert_flow,
                                normalized_amount, warp_features)

torch.set_num_threads(1)


def test_alexnet_flow_vector_has_8522_values():
    layout = ConvFeatures().layout(224)
    assert layout.shapes == ((55, 55), (27, 27), (13, 13), (13, 13), (13, 13))
    assert layout.dim == 8522  # footnote 1
    vec = torch.arange(layout.dim, dtype=torch.float64)
    parts = layout.unflatten(vec)
    assert parts["conv1"][1, 0, 0].item() == 55 * 55  # v block follows the u block
    assert parts["conv2"][0, 0, 0].item() == 2 * 55 * 55
    assert torch.equal(layout.flatten({k: v[None] for k, v in parts.items()})[0], vec)


def _planted(n=400, d=60, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    coef = torch.randn(n, rank, generator=g, dtype=torch.float64) * torch.tensor([10.0, 5.0, 2.0])
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    rows = mean + coef @ basis.T + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return rows, mean, basis


@pytest.mark.parametrize("exact_below", [10_000, 1])  # eigh, then subspace iteration
def test_pca_recovers_planted_subspace(exact_below):
    rows, mean, basis = _planted()
    stats = PCAStats.zeros(rows.shape[1])
    for chunk in rows.split(64):
        stats.update(chunk)
    m, u, var = stats.components(3, exact_below=exact_below)
    assert torch.allclose(m, rows.mean(0), atol=1e-12)
    assert (m - mean).abs().max() < 1.5  # the sample mean is near the planted one
    # Same subspace: the planted basis projects onto the recovered one without loss.
    assert torch.linalg.norm(basis - u @ (u.T @ basis)) < 1e-2
    assert torch.allclose(u.T @ u, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert var[0] > var[1] > var[2] > 0


def test_basis_matrix_layout():
    basis = torch.randn(7, 4, dtype=torch.float64)
    u = basis_matrix(basis, 2.5)
    assert u.shape == (7, 12)
    for i in range(4):
        for k in range(3):
            assert torch.equal(u[:, 3 * i + k], basis[:, i] * 2.5**k)
    assert normalized_amount("rotation", 30.0) == 3.0
    assert normalized_amount("scale", 1.1) == pytest.approx(1.0)
    assert normalized_amount("translation_x", -30.0) == -3.0


def test_streaming_normal_equations_equal_dense_lstsq():
    g = torch.Generator().manual_seed(1)
    d, k1, n = 15, 4, 24
    basis = torch.randn(d, k1, generator=g, dtype=torch.float64)
    amounts = torch.tensor([1.0, 2.0, 3.0, -1.5] * 6, dtype=torch.float64)
    flows = torch.randn(n, d, generator=g, dtype=torch.float64)
    stats = RegressionStats.zeros(k1)
    for f, a in zip(flows.split(5), amounts.split(5)):
        stats.update(f, a, basis)
    w, rms = stats.solve(basis)
    dense_u = torch.cat([basis_matrix(basis, float(a)) for a in amounts])
    dense_v = flows.reshape(-1, 1)
    w_ref = torch.linalg.lstsq(dense_u, dense_v).solution[:, 0]
    assert torch.allclose(w, w_ref, atol=1e-8, rtol=0)
    a_mat, b = stats.normal_equations(basis)
    assert torch.allclose(a_mat, dense_u.T @ dense_u, atol=1e-8) and torch.allclose(b, (dense_u.T @ dense_v)[:, 0])
    rms_ref = torch.sqrt(((dense_u @ w_ref[:, None] - dense_v) ** 2).mean())
    assert rms == pytest.approx(float(rms_ref), rel=1e-8)


def test_statistics_merge_equals_one_pass():
    rows, _, _ = _planted(n=50, d=12)
    amounts = torch.linspace(-3, 3, 50, dtype=torch.float64)
    basis = torch.randn(12, 3, dtype=torch.float64)
    one = PCAStats.zeros(12).update(rows)
    parts = PCAStats.zeros(12).update(rows[:17]).merge(PCAStats.zeros(12).update(rows[17:]))
    reg_one = RegressionStats.zeros(3).update(rows, amounts, basis)
    reg_parts = RegressionStats.zeros(3).update(rows[:30], amounts[:30], basis).merge(
        RegressionStats.zeros(3).update(rows[30:], amounts[30:], basis))
    for a, b in ((one, parts), (reg_one, reg_parts)):
        for name, t in vars(a).items():
            assert torch.allclose(t, getattr(b, name), rtol=1e-12, atol=1e-9), name
    # all_reduce applies the reduction to every field (a stand-in for a 2-rank sum of equal halves).
    doubled = one.all_reduce(lambda t: 2 * t)
    assert doubled.count == 100 and torch.equal(doubled.outer, 2 * one.outer)
    assert one.all_reduce(None) is not one and torch.equal(one.all_reduce(None).sum, one.sum)


def _tiny_bank():
    layout = FlowLayout(("conv1", "conv5"), ((4, 5), (3, 3)))
    g = torch.Generator().manual_seed(2)
    bank = GeneratorBank(layout, 64, {"backbone": "alexnet"})
    for kind in ("rotation", "scale"):
        bank.add(GeneratorModel(kind, torch.randn(layout.dim, 3, generator=g, dtype=torch.float64),
                                torch.randn(9, generator=g, dtype=torch.float64), 3, 10.0, {"pairs_pca": 5}))
    return bank


def test_bank_save_load_round_trip(tmp_path):
    bank = _tiny_bank()
    path = bank.save(tmp_path / "bank.pt")
    back = GeneratorBank.load(path)
    assert back.kinds == ["rotation", "scale"] and back.image_size == 64 and back.layout == bank.layout
    for kind, amount in (("rotation", 25.0), ("scale", 0.75)):
        g1, g2 = bank.generator(kind, amount), back.generator(kind, amount)
        assert g1["conv5"].shape == (2, 3, 3) and all(torch.equal(g1[n], g2[n]) for n in g1)
    model = bank.models["rotation"]
    expected = basis_matrix(model.basis, 2.5) @ model.w
    assert torch.allclose(bank.generator("rotation", 25.0, torch.float64)["conv1"].reshape(-1), expected[:40])
    with pytest.raises(KeyError, match="translation_x"):
        bank.generator("translation_x", 3.0)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt.*not a generator bank"):
        GeneratorBank.load(tmp_path / "other.pt")


def test_warp_by_integer_shift_is_exact():
    f1 = torch.rand(2, 3, 9, 11)
    f2 = torch.zeros_like(f1)
    f2[..., 1:, 3:] = f1[..., :-1, :-3]  # f2 at (x+3, y+1) equals f1 at (x, y): flow (u, v) = (3, 1)
    flow = torch.zeros(2, 9, 11)
    flow[0], flow[1] = 3, 1
    for inverse in ("negate", "exact"):
        assert torch.allclose(warp_features(f1, flow, inverse=inverse), f2, atol=1e-6)  # F[t] -> F[t+Δ]
    assert torch.allclose(warp_features(f2, flow, inverse=None)[..., :-1, :-3], f1[..., :-1, :-3], atol=1e-6)
    out = warp_features({"conv1": f1}, {"conv1": flow})
    assert torch.allclose(out["conv1"], f2, atol=1e-6)
    with pytest.raises(KeyError, match="conv2"):
        warp_features({"conv2": f1}, {"conv1": flow})


def test_sift_flow_and_warp_share_the_flow_convention():
    """The real solver's flow of a shifted map, applied by warp_features, reproduces the shifted map."""
    from topdown.flows import sift_flow

    g = torch.Generator().manual_seed(3)
    f1 = torch.rand(1, 8, 16, 16, generator=g) * 255
    f2 = torch.roll(f1, shifts=(1, 2), dims=(2, 3))  # content moves 2 right, 1 down
    flow = sift_flow(f1, f2, levels=1, top_wsize=3, top_iters=20)
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    assert torch.equal(flow[0, 0][3:-3, 3:-3], torch.full((10, 10), 2.0))
    assert torch.equal(flow[0, 1][3:-3, 3:-3], torch.full((10, 10), 1.0))
    assert torch.allclose(warp_features(f1, flow[0])[inner], f2[inner], atol=1e-3)


def test_exact_inverse_beats_negation_on_smooth_field():
    h = w = 40
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")

    def field(x, y):  # smooth, non-folding (|gradient| < 1)
        return 3 * torch.sin(y / 7), 2 * torch.cos(x / 6)

    def image(x, y):
        return torch.sin(x / 3) + torch.cos(y / 4)

    u, v = field(xs, ys)
    flow = torch.stack((u, v))
    # Ground truth forward transport: out(y) = f(φ⁻¹(y)), φ(x) = x + V(x), inverted to 1e-12 analytically.
    px, py = xs.clone(), ys.clone()
    for _ in range(200):
        du, dv = field(px, py)
        px, py = xs - du, ys - dv
    target = image(px, py)[None, None]
    f = image(xs, ys)[None, None]
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    err = {inv: (warp_features(f, flow, inverse=inv) - target)[inner].abs().mean().item() for inv in ("negate", "exact")}
    assert err["exact"] < 0.3 * err["negate"]
    disp = invert_flow(flow, iters=50)
    # ψ(y) = y + d(y) satisfies ψ(y) + V(ψ(y)) = y.
    ru, rv = field(xs + disp[0], ys + disp[1])
    assert (xs + disp[0] + ru - xs)[6:-6, 6:-6].abs().max() < 0.05


def test_evaluate_bank_reports_generator_below_no_warp():
    layout = FlowLayout(("conv5",), ((8, 8),))
    vec = torch.zeros(layout.dim, dtype=torch.float64)
    vec[:64] = -1.0  # u = -1 everywhere: "move left by one map pixel"
    basis = torch.stack((vec, torch.zeros_like(vec)), dim=1)  # M and one (unused) component
    w = torch.zeros(6, dtype=torch.float64)
    w[1] = 1 / 3  # G = (a/3)·M, a = Δ/10: Δ = -30 gives u = +1
    bank = GeneratorBank(layout, 64)
    bank.add(GeneratorModel("translation_x", basis, w))
    img0 = torch.rand(4, 5, 8, 8)
    img1 = torch.zeros_like(img0)
    img1[..., 1:] = img0[..., :-1]
    rows = evaluate_bank(bank, lambda im: {"conv5": im}, [("left 30", img0, img1)],
                         cases=[("left 30", "translation_x", -30.0)])
    (row,) = rows
    assert row["images"] == 4 and row["rms_generator"] < 1e-6 and row["rms_no_warp"] > 0.2
    assert 0 < row["mad_negation"] < row["mad_no_warp"]  # only the last column is lost by G then -G
    stats = WarpErrorStats.zeros().update(img0, img1, bank.generator("translation_x", -30.0)["conv5"])
    assert math.isclose(stats.row()["rms_generator"], row["rms_generator"], abs_tol=1e-9)


@pytest.mark.slow
def test_end_to_end_tiny_fit(tmp_path):
    """train.py-style fit through lightning_modules.generators: PCA then regression, bank and table written."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from datamodules.pairs import PairsDataModule
    from lightning_modules.generators import BANK_FILE, TABLE_FILE, GeneratorsModule
    from tests.test_pairs import CENTRAL, _write_coco

    _write_coco(tmp_path / "data", "train", [[CENTRAL], [CENTRAL]])
    _write_coco(tmp_path / "data", "val", [[CENTRAL]])
    dm = PairsDataModule(root=str(tmp_path / "data"), transform="rotation", rotation_step=120,
                         rotation_amounts=[10, 30], image_size=96, batch_size=4, max_images=2, test_max_images=1)
    model = GeneratorsModule(num_components=2, flow_kwargs={"levels": 2, "top_wsize": 3, "top_iters": 10, "iters": 5})
    run = tmp_path / "run"
    trainer = Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False,
                      logger=CSVLogger(str(run), name="", version=""), default_root_dir=str(run),
                      callbacks=[ModelCheckpoint(dirpath=str(run / "checkpoints"), save_last=True)],
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      accelerator="cpu", devices=1)
    trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch == 2  # stopped by itself after PCA + regression
    bank = GeneratorBank.load(run / BANK_FILE)
    assert bank.kinds == ["rotation"] and bank.models["rotation"].info["pairs_pca"] == 6
    assert bank.models["rotation"].info["pairs_regression"] == 24  # 12 pairs, each also reversed
    assert bank.models["rotation"].basis.shape[1] == 3
    assert bank.models["rotation"].fitted_range == (-30.0, 30.0)
    trainer.test(model, datamodule=dm, ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    with open(run / TABLE_FILE) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == ["rotate 30", "rotate -30"]
    assert all(float(r["rms_no_warp"]) > 0 for r in rows)


DDP_SCRIPT = '''
import sys
import torch
torch.set_num_threads(1)
from lightning.pytorch import Trainer, seed_everything
from datamodules.pairs import PairsDataModule
from lightning_modules.cli import end_process_group
from lightning_modules.generators import GeneratorsModule

root, run = sys.argv[1], sys.argv[2]
seed_everything(0)
dm = PairsDataModule(root=root, transform="rotation", rotation_step=120, rotation_amounts=[10, 30], image_size=64,
                     batch_size=2, max_images=3, reverse=False)  # sharding does not depend on the reversal
model = GeneratorsModule(num_components=2, flow_kwargs={"levels": 2, "top_wsize": 3, "top_iters": 10, "iters": 5})
trainer = Trainer(max_epochs=-1, reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False, logger=False,
                  default_root_dir=run, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                  enable_model_summary=False, accelerator="cpu", devices=int(sys.argv[3]),
                  strategy="ddp" if int(sys.argv[3]) > 1 else "auto")
trainer.fit(model, datamodule=dm)
end_process_group()  # as every entry point does: gloo left to interpreter shutdown can abort
'''


@pytest.mark.slow
def test_two_ddp_processes_give_the_same_bank_as_one(tmp_path):
    """9 PCA pairs over 2 ranks (5 + 4, padded to equal steps): the summed statistics give the same bank."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lightning_modules.generators import BANK_FILE
    from tests.test_pairs import CENTRAL, _write_coco

    _write_coco(tmp_path / "data", "train", [[CENTRAL]] * 3)
    script = tmp_path / "fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    banks = []
    for devices in (1, 2):
        run = tmp_path / f"run{devices}"
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "data"), str(run), str(devices)],
                              env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        banks.append(GeneratorBank.load(run / BANK_FILE).models["rotation"])
    one, two = banks
    assert one.info["pairs_pca"] == two.info["pairs_pca"] == 9 and two.info["pairs_regression"] == 18
    assert torch.allclose(one.basis, two.basis, atol=1e-9) and torch.allclose(one.w, two.w, atol=1e-9)


def _rotation_like_flows(seed=0, d=200, originals=12):
    """Per-original displacement fields of a rotation by θ: sinθ·Jx (odd) + e_j(cosθ - 1)·x (even)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.randn(d // 2, 2, generator=g, dtype=torch.float64) * 3
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    strengths = 1 + 0.5 * torch.randn(originals, generator=g, dtype=torch.float64)

    def flow(theta, e, noise=0.01):
        t = math.radians(theta)
        field = math.sin(t) * (xy @ rot.T) + (math.cos(t) - 1) * e * xy
        return field.T.reshape(-1) + noise * torch.randn(d, generator=g, dtype=torch.float64)

    return flow, strengths


def test_bank_fitted_on_both_signs_interpolates_minus_30():
    """PCA of the +10° flows, regression over ±10..60° (reversed pairs): G[-30°] is an interpolation."""
    from topdown.generators import inverse_amount

    flow, strengths = _rotation_like_flows()
    pca = PCAStats.zeros(200)
    for e in strengths:
        pca.update(flow(10.0, e)[None])
    mean, comps, _ = pca.components(4)
    basis = torch.cat((mean[:, None], comps), dim=1)
    forward = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]

    def fit(amounts):
        reg = RegressionStats.zeros(basis.shape[1])
        for e in strengths:
            for a in amounts:
                reg.update(flow(a, e)[None], torch.tensor([normalized_amount("rotation", a)]), basis)
        return GeneratorModel("rotation", basis, reg.solve(basis)[0])

    truth = torch.stack([flow(-30.0, e, noise=0) for e in strengths]).mean(0)
    rel = {name: float((fit(am).flow_vector(-30.0) - truth).norm() / truth.norm())
           for name, am in (("one sign", forward), ("both signs", forward + [inverse_amount("rotation", a)
                                                                               for a in forward]))}
    assert rel["both signs"] < 0.15 and rel["both signs"] < 0.5 * rel["one sign"], rel


def test_pca_rank_check_drops_or_refuses_arbitrary_components():
    rows, _, _ = _planted(n=4, d=30)
    stats = PCAStats.zeros(30).update(rows)
    with pytest.warns(UserWarning, match="4 flows has rank 3.*keeping 3, dropping 7"):
        mean, u, var = stats.components(10)
    assert u.shape == (30, 3) and var.shape == (3,) and (var > 0).all()
    with pytest.raises(ValueError, match="4 flows has rank 3, fewer than the 10 components"):
        stats.components(10, on_rank="error")
    twice = PCAStats.zeros(30).update(torch.cat((rows, rows)))  # 8 flows, still rank 3
    with pytest.warns(UserWarning, match="8 flows has rank 3"):
        assert twice.components(5)[1].shape == (30, 3)


def test_alexnet_weights_from_a_lightning_checkpoint(tmp_path):
    """--model.weights: a plain state dict or a Lightning checkpoint whose keys carry net. / model. prefixes."""
    import warnings

    source = ConvFeatures(init_seed=7)
    full = {f"features.{k}": v for k, v in source.features.state_dict().items()}
    full["classifier.6.weight"] = torch.zeros(3, 4096)  # a head that ConvFeatures ignores
    torch.save(full, tmp_path / "plain.pth")
    torch.save({"state_dict": {f"net.{k}": v for k, v in full.items()}, "epoch": 3}, tmp_path / "net.ckpt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in full.items()}}, tmp_path / "model.ckpt")
    for name in ("plain.pth", "net.ckpt", "model.ckpt"):
        loaded = ConvFeatures(weights=str(tmp_path / name))
        assert loaded.pretrained
        assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), source.parameters()))
    # No weights: the seeded random AlexNet, whatever the global RNG did before.
    torch.manual_seed(123)
    a = ConvFeatures()
    torch.rand(1000)
    b = ConvFeatures()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    bank = GeneratorBank(a.layout(224), 224, {"weights": None, "init_seed": 7})
    assert torch.equal(ConvFeatures.for_bank(bank).features[0].weight, source.features[0].weight)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ConvFeatures.for_bank(bank, str(tmp_path / "plain.pth"))
    assert any("fitted with AlexNet weights None" in str(w.message) for w in caught)
