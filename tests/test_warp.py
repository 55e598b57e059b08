"""The warp's two backward modes and generator training's module (generators paper §3.3, Fig. 5)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from topdown.generators import FlowLayout, GeneratorBank, GeneratorModel
from topdown.warp import GeneratorWarp, attach, check_bank_fits, layer_size, warp_features

REPO = Path(__file__).resolve().parent.parent


def _smooth_field(h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """A field that varies over the map (a rotation plus a zoom, in map pixels)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return torch.stack((-0.3 * (ys - cy) + 0.15 * (xs - cx), 0.3 * (xs - cx) + 0.15 * (ys - cy)))


@pytest.mark.parametrize("inverse", ["negate", "exact", None])
def test_negate_backward_is_the_negated_field_warp_of_the_gradient(inverse):
    g = torch.Generator().manual_seed(0)
    flow = _smooth_field(7, 9)
    x = torch.rand(2, 3, 7, 9, generator=g, requires_grad=True)
    grad = torch.rand(2, 3, 7, 9, generator=g)
    out = warp_features(x, flow, inverse=inverse, backward="negate")
    assert torch.equal(out, warp_features(x, flow, inverse=inverse))  # the forward pass is the same warp
    out.backward(grad)
    assert torch.equal(x.grad, warp_features(grad, -flow, inverse=inverse))
    exact = torch.autograd.grad(warp_features(x, flow, inverse=inverse), x, grad)[0]
    assert not torch.allclose(exact, x.grad, atol=1e-3)  # on a varying field the approximation is not the adjoint

    feats = {"conv5": x.detach().clone().requires_grad_()}
    warp_features(feats, {"conv5": flow}, inverse=inverse, backward="negate")["conv5"].backward(grad)
    assert torch.equal(feats["conv5"].grad, x.grad)


def test_negate_backward_refuses_a_flow_that_wants_a_gradient():
    flow = _smooth_field(4, 4).requires_grad_()
    with pytest.raises(ValueError, match="fixed generator"):
        warp_features(torch.rand(1, 1, 4, 4), flow, backward="negate")
    with pytest.raises(ValueError, match="unknown backward 'exact'"):
        warp_features(torch.rand(1, 1, 4, 4), flow.detach(), backward="exact")


def test_autograd_backward_is_the_exact_adjoint():
    """<W x, y> = <x, Wᵀ y> with Wᵀ y from autograd, and Wᵀ y equals the dense matrix's transpose."""
    h, w = 5, 6
    flow = _smooth_field(h, w, torch.float64) + 0.37
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    dense = warp_features(basis, flow).reshape(h * w, h * w).T  # column j = W e_j
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 1, h, w, generator=g, dtype=torch.float64)
    wx = warp_features(x, flow, backward="autograd")
    wty = torch.autograd.grad(wx, x, y)[0]
    assert abs(float((wx.detach() * y).sum()) - float((x.detach() * wty).sum())) <= 1e-6
    assert torch.allclose(wty.reshape(-1), dense.T @ y.reshape(-1), atol=1e-12)
    assert torch.allclose(wx.reshape(-1), dense @ x.detach().reshape(-1), atol=1e-12)


def test_modes_agree_for_a_constant_translation_away_from_the_borders():
    h, w, (u, v) = 12, 14, (1.25, -0.5)
    flow = torch.empty(2, h, w, dtype=torch.float64)
    flow[0], flow[1] = u, v
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    grads = {}
    for mode in ("autograd", "negate"):
        x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64, requires_grad=True)
        warp_features(x, flow, backward=mode).backward(grad)
        grads[mode] = x.grad
    inner = (slice(None), slice(None), slice(2, -2), slice(3, -3))
    assert torch.allclose(grads["autograd"][inner], grads["negate"][inner], atol=1e-12)


# ----------------------------------------------------------------------------------------- GeneratorWarp


def test_generator_warp_warps_each_batch_by_one_generator_drawn_uniformly():
    flows = torch.stack([torch.full((2, 4, 4), float(i)) for i in range(6)])
    mod = GeneratorWarp(flows, p=1.0)
    x = torch.rand(5, 3, 4, 4)
    assert mod.eval()(x) is x  # evaluation never warps
    mod.train()
    out = mod(x)
    assert mod.last is not None and int(mod.step) == 1
    assert torch.equal(out, warp_features(x, flows[mod.last]))  # every sample of the batch, the same generator
    torch.manual_seed(123)  # the draws do not come from torch's random state
    picks = [mod.draw(t) for t in range(600)]
    torch.manual_seed(7)
    assert picks == [GeneratorWarp(flows, p=1.0).draw(t) for t in range(600)]
    counts = torch.bincount(torch.tensor(picks), minlength=6)
    assert counts.min() >= 70 and counts.max() <= 130, counts  # uniform: 100 each expected
    assert all(GeneratorWarp(flows, p=0.0).draw(t) is None for t in range(50))
    warped = sum(GeneratorWarp(flows, p=0.5, seed=3).draw(t) is not None for t in range(400))
    assert 160 <= warped <= 240

    resumed = GeneratorWarp(flows, p=1.0)
    resumed.load_state_dict(mod.state_dict())  # the step counter travels with a checkpoint
    resumed.train()(x)
    assert resumed.last == mod.draw(1)


def test_generator_warp_backward_and_size_check():
    flow = _smooth_field(5, 5)
    mod = GeneratorWarp(flow[None], ["rotation 30"], backward="negate", layer="conv5").train()
    x = torch.rand(2, 4, 5, 5, requires_grad=True)
    grad = torch.rand(2, 4, 5, 5)
    mod(x).backward(grad)
    assert torch.equal(x.grad, warp_features(grad, -flow))
    with pytest.raises(ValueError, match="flows are 5x5 but the feature maps at conv5 are 6x6"):
        mod(torch.rand(1, 4, 6, 6))


def _bank(shape=(5, 5), image_size=96):
    layout = FlowLayout(("conv1", "conv5"), ((23, 23), shape))
    bank = GeneratorBank(layout, image_size)
    g = torch.Generator().manual_seed(0)
    for kind in ("rotation", "scale", "translation_x", "translation_y"):
        bank.add(GeneratorModel(kind, torch.randn(layout.dim, 2, generator=g, dtype=torch.float64),
                                torch.randn(6, generator=g, dtype=torch.float64)))
    return bank


def test_attach_after_conv5_keeps_torchvision_names_and_checks_the_bank():
    net = torchvision.models.alexnet(num_classes=7)
    keys = list(net.state_dict())
    assert layer_size(net, "conv5", 96) == (5, 5) and layer_size(net, "conv5", 224) == (13, 13)
    warp = GeneratorWarp.from_bank(_bank(), "conv5")
    assert warp.names == ["rotation 30", "rotation -30", "scale 1.3", "scale 0.75", "translation_x -30",
                          "translation_y -30"]
    attach(net, "conv5", warp)
    assert list(net.state_dict()) == keys  # the warp is not part of the network's weights
    x = torch.rand(2, 3, 96, 96)
    net.eval()
    plain = net(x)
    assert int(warp.step) == 0
    net.train()
    torch.manual_seed(0)
    net(x)
    assert int(warp.step) == 1  # the hook ran the warp in training
    check_bank_fits(_bank(), "conv5", (5, 5), 96)
    with pytest.raises(ValueError, match=r"conv5 maps are 6x6 \(learned at 112 px\).*conv5 is 5x5 at 96 px"):
        check_bank_fits(_bank((6, 6), 112), "conv5", (5, 5), 96)
    assert plain.shape == (2, 7)


DDP_SCRIPT = r'''
import os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from topdown.warp import GeneratorWarp


def run(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)  # different global random states on the two ranks
    warp = GeneratorWarp(torch.randn(6, 2, 4, 4), p=0.8, seed=11)
    model = DistributedDataParallel(nn.Sequential(nn.Conv2d(3, 3, 1), warp))
    picks = []
    for _ in range(12):
        model(torch.rand(3, 3, 4, 4)).sum().backward()
        picks.append(-1 if warp.last is None else warp.last)
    gathered = [None, None]
    dist.all_gather_object(gathered, picks)
    if rank == 0:
        open(out, "w").write(repr(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.start_processes(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2, start_method="fork")
'''


@pytest.mark.slow
def test_ddp_ranks_warp_each_step_by_the_same_generator(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp_warp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "picks.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(port), str(out)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = eval(out.read_text())
    assert rank0 == rank1 and len(rank0) == 12
    assert len(set(rank0)) >= 3  # the draws do vary from step to step
