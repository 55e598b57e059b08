"""SIFT Flow on feature maps (topdown.flows; generators paper §2.1.3)."""
import math

import pytest
import torch
import torch.nn.functional as F

from topdown.flows import _l1_envelope_, _neighbour_shift, flow_energy, pyramid_levels, sift_flow


def smooth_maps(b, c, h, w, sigma=2.0, seed=0):
    """Gaussian-filtered noise rescaled per channel to [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    k = int(3 * sigma) * 2 + 1
    t = torch.arange(k, dtype=torch.float32) - k // 2
    ker = torch.exp(-t ** 2 / (2 * sigma ** 2))
    ker = ker / ker.sum()
    x = F.pad(x, (k // 2,) * 4, mode="reflect")
    x = F.conv2d(x, ker.view(1, 1, 1, k).repeat(c, 1, 1, 1), groups=c)
    x = F.conv2d(x, ker.view(1, 1, k, 1).repeat(c, 1, 1, 1), groups=c)
    x = x - x.amin((2, 3), keepdim=True)
    return x / x.amax((2, 3), keepdim=True) * 255


def similarity_pair(f1, deg, scale, tx=0.0, ty=0.0):
    """f2 = f1 warped by T(p) = s R (p - c) + c + t (bilinear), so f2(T(p)) = f1(p).

    Returns f2, the analytic flow T(p) - p as [2, H, W] (u, v) and the mask of
    pixels whose match T(p) stays in the image."""
    _, _, h, w = f1.shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    th = math.radians(deg)
    a = scale * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    p = torch.stack([xs, ys], -1)
    centre, shift = torch.tensor([cx, cy]), torch.tensor([cx + tx, cy + ty])
    tp = (p - centre) @ a.T + shift
    q = (p - shift) @ torch.linalg.inv(a).T + centre               # T^-1 of every f2 pixel
    grid = torch.stack([2 * q[..., 0] / (w - 1) - 1, 2 * q[..., 1] / (h - 1) - 1], -1)
    f2 = F.grid_sample(f1, grid[None].expand(f1.shape[0], h, w, 2), mode="bilinear",
                       padding_mode="border", align_corners=True)
    inside = (tp[..., 0] >= 0) & (tp[..., 0] <= w - 1) & (tp[..., 1] >= 0) & (tp[..., 1] <= h - 1)
    return f2, (tp - p).permute(2, 0, 1), inside


def test_integer_shift_is_recovered_exactly():
    f1 = smooth_maps(1, 16, 32, 32, seed=1)
    # f2(x + 3, y - 2) = f1(x, y)
    f2 = torch.roll(f1, shifts=(-2, 3), dims=(2, 3))
    flow = sift_flow(f1, f2)
    interior = flow[0, :, 4:-4, 4:-4]
    assert (interior[0] == 3).all() and (interior[1] == -2).all()


@pytest.mark.parametrize("deg,scale", [(10, 1.0), (30, 1.2), (45, 0.8), (20, 1.3)])
def test_similarity_warp_end_point_error(deg, scale):
    f1 = smooth_maps(1, 96, 55, 55, seed=deg)
    f2, truth, inside = similarity_pair(f1, deg, scale)
    flow = sift_flow(f1, f2)
    epe = (flow[0] - truth).norm(dim=0)[inside].mean().item()
    # Rounding the analytic field alone costs ~0.38 px: the integer flow must be
    # the nearest label almost everywhere.
    assert epe <= 0.45, f"EPE {epe:.3f} px at {deg} deg, scale {scale}"


def test_output_contract_and_other_sizes():
    f1 = smooth_maps(2, 8, 20, 27, seed=2)
    f2 = smooth_maps(2, 8, 17, 30, seed=3)
    flow = sift_flow(f1, f2, levels=3)
    assert flow.shape == (2, 2, 20, 27) and flow.dtype == torch.float32
    assert flow.device == f1.device
    assert torch.equal(flow, flow.round())
    x = torch.arange(27).view(1, 27)
    y = torch.arange(20).view(20, 1)
    # Every match lands inside f2, which has a different size.
    assert ((x + flow[:, 0] >= 0) & (x + flow[:, 0] <= 29)).all()
    assert ((y + flow[:, 1] >= 0) & (y + flow[:, 1] <= 16)).all()


def test_batch_equals_pairs_one_at_a_time():
    f1 = smooth_maps(3, 12, 24, 24, seed=4)
    f2 = torch.cat([similarity_pair(f1[i:i + 1], deg, s)[0]
                    for i, (deg, s) in enumerate([(10, 1.0), (25, 0.9), (40, 1.2)])])
    batched = sift_flow(f1, f2)
    single = torch.cat([sift_flow(f1[i:i + 1], f2[i:i + 1]) for i in range(3)])
    assert torch.equal(batched, single)


def test_energy_not_above_zero_flow_nor_ground_truth():
    f1 = smooth_maps(2, 32, 40, 40, seed=5)
    f2 = torch.cat([similarity_pair(f1[:1], 20, 1.1)[0], similarity_pair(f1[1:], 35, 0.9)[0]])
    truths = [similarity_pair(f1[:1], 20, 1.1)[1], similarity_pair(f1[1:], 35, 0.9)[1]]
    flow = sift_flow(f1, f2)
    x = torch.arange(40.0)
    # Rounded truth with matches clamped into f2, so it pays no outside cost.
    truth = torch.stack(truths).round()
    truth[:, 0] = (x.view(1, 1, 40) + truth[:, 0]).clamp(0, 39) - x.view(1, 1, 40)
    truth[:, 1] = (x.view(1, 40, 1) + truth[:, 1]).clamp(0, 39) - x.view(1, 40, 1)
    e_bp = flow_energy(f1, f2, flow)
    assert (e_bp < flow_energy(f1, f2, torch.zeros_like(flow))).all()
    assert (e_bp <= flow_energy(f1, f2, truth) * 1.001).all()


def test_small_maps_stop_coarsening():
    assert pyramid_levels((13, 13), (13, 13), 4) == 3
    assert pyramid_levels((55, 55), (55, 55), 4) == 4
    assert pyramid_levels((5, 9), (5, 9), 4) == 1
    f1 = smooth_maps(1, 16, 13, 13, sigma=1.5, seed=6)
    f2 = torch.roll(f1, shifts=(1, -1), dims=(2, 3))
    flow = sift_flow(f1, f2, levels=4)
    assert (flow[0, 0, 2:-2, 2:-2] == -1).all() and (flow[0, 1, 2:-2, 2:-2] == 1).all()


@pytest.mark.parametrize("dense", [False, True])
def test_messages_between_shifted_windows_match_brute_force(dense):
    # Outgoing message of every pixel to each neighbour, with window centres
    # that differ between neighbours: min_k h(k) + min(alpha |x_p(k) - x_q(j)|, d).
    g = torch.Generator().manual_seed(9)
    b, h, w, half, alpha, d = 1, 4, 5, 2, 3.0, 7.0
    n = 2 * half + 1
    centres = torch.randint(-3, 4, (b, 2, h, w), generator=g)
    msg = torch.rand(b, 2, 4, n, h, w, generator=g) * 20
    got = msg.clone()
    _l1_envelope_(got, alpha, 3, torch.empty(b, 2, 4, h, w))
    _neighbour_shift(centres, n, alpha, dense=dense)(got)
    got = torch.minimum(got, msg.amin(3, keepdim=True) + d)
    steps = {0: (0, 1), 1: (0, -1), 2: (1, 0), 3: (-1, 0)}     # right, left, down, up
    labels = torch.arange(n)
    for layer in range(2):
        for direction, (dy, dx) in steps.items():
            for y in range(h):
                for x in range(w):
                    if not (0 <= y + dy < h and 0 <= x + dx < w):
                        continue
                    src = centres[0, layer, y, x] + labels                     # sender values
                    dst = centres[0, layer, y + dy, x + dx] + labels           # receiver values
                    pair = (alpha * (src[:, None] - dst[None, :]).abs()).clamp(max=d)
                    want = (msg[0, layer, direction, :, y, x, None] + pair).amin(0)
                    assert torch.allclose(got[0, layer, direction, :, y, x], want), (layer, direction, y, x)


def test_flow_energy_matches_hand_computation():
    f1 = torch.tensor([[[[0.0, 10.0, 20.0]]]])                    # 1 channel, 1 x 3
    f2 = torch.tensor([[[[10.0, 20.0, 50.0]]]])
    flow = torch.tensor([[[[1.0, 1.0, -1.0]], [[0.0, 0.0, 0.0]]]])
    alpha, d, gamma = 2.0, 5.0, 0.5
    # data |0-20| + |10-50| + |20-20|; small displacement 0.5 * 3;
    # smoothness min(2*0, 5) + min(2*2, 5) on u, 0 on v.
    expected = (20 + 40 + 0) + 1.5 + 4
    got = flow_energy(f1, f2, flow, alpha=alpha, d=d, gamma=gamma)
    assert got.item() == pytest.approx(expected)
    truncated = flow_energy(f1, f2, flow, alpha=alpha, d=d, gamma=gamma, data_trunc=25.0)
    assert truncated.item() == pytest.approx(20 + 25 + 0 + 1.5 + 4)
    # A match outside f2 costs more than any L1 data cost inside could
    # (C * (max|f1| + max|f2|) = 70 here), whatever the smoothness saves.
    outside = flow.clone()
    outside[0, 0, 0, 2] = 1.0
    extra = flow_energy(f1, f2, outside, alpha=alpha, d=d, gamma=gamma) - got
    assert extra.item() > 70 + 4 * d


def test_data_trunc_changes_the_minimiser_input_only():
    f1 = smooth_maps(1, 8, 16, 16, seed=7)
    f2 = torch.roll(f1, shifts=(1, 2), dims=(2, 3))
    flow = sift_flow(f1, f2, data_trunc=300.0)
    assert (flow[0, 0, 3:-3, 3:-3] == 2).all() and (flow[0, 1, 3:-3, 3:-3] == 1).all()


@pytest.mark.parametrize("bad,match", [
    (dict(f1=torch.zeros(2, 3, 8)), "f1 must be"),
    (dict(f2=torch.zeros(2, 4, 8, 8)), "share batch and channels"),
    (dict(f2=torch.zeros(2, 3, 8, 8, dtype=torch.long)), "f2 must be a float"),
    (dict(levels=0), "levels"),
    (dict(wsize=-1), "wsize"),
    (dict(data_trunc=0.0), "data_trunc"),
    (dict(f1=torch.full((2, 3, 8, 8), float("nan"))), "f1 contains NaN"),
])
def test_bad_input_is_named(bad, match):
    args = dict(f1=torch.zeros(2, 3, 8, 8), f2=torch.zeros(2, 3, 8, 8))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        sift_flow(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    f1 = smooth_maps(2, 16, 27, 27, seed=8)
    f2 = torch.cat([similarity_pair(f1[:1], 15, 1.1)[0], similarity_pair(f1[1:], 30, 0.9)[0]])
    cpu = sift_flow(f1, f2)
    gpu = sift_flow(f1.cuda(), f2.cuda())
    assert gpu.is_cuda
    assert (gpu.cpu() != cpu).float().mean() < 0.01
