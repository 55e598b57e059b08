"""Feature flows: SIFT Flow on CNN feature maps (generators paper §2.1.3).

The generators paper (Gallagher et al. 2015, §2.1.3) computes, for every
convolutional layer, the "feature flow" between the AlexNet features of an image
and of its transformed copy with the SIFT Flow method of Liu, Yuen & Torralba
(TPAMI 2011), using CNN feature vectors in place of SIFT descriptors. This
module implements that matcher in batched PyTorch (CPU or CUDA, the device of
the inputs).

Energy (SIFT Flow, TPAMI 2011, eq. 3), for a flow w(p) = (u(p), v(p))::

    E(w) = sum_p  min(|f1(p) - f2(p + w(p))|_1, t)                 data term
         + sum_p  gamma (|u(p)| + |v(p)|)                          small displacement
         + sum_{(p,q) 4-neighbours} min(alpha |u(p) - u(q)|, d)
                                  + min(alpha |v(p) - v(q)|, d)    smoothness

``t`` is ``data_trunc`` (no truncation when ``None``). The default weights
(alpha = 2*255, d = 40*255, gamma = 0.005*255, 4 levels, half-windows 10 / 2,
60 / 30 iterations) are the widely used SIFT Flow settings for descriptors in
[0, 255], so callers scale features to roughly that range.

Matches outside f2. A displacement whose target p + w(p) falls outside f2 is
compared with the nearest border vector of f2 (clamping) and its data cost gets
an extra ``big + alpha * dist``, where ``dist`` is the L1 distance in pixels to
the image and ``big = C * (max|f1| + max|f2|) + 8 d`` (per pair) exceeds any
in-image data cost plus everything the four smoothness edges of a pixel can
save; so an outside match is only taken when a pixel has no inside label, and
then the one nearest the image wins. :func:`flow_energy` uses the same rule.

Minimiser. Coarse to fine (SIFT Flow §3.2): features are average-pooled by 2 per
level (odd sizes are replicate-padded first) while both maps stay at least
``MIN_SIZE`` px, so 13x13 maps get 3 levels even when ``levels=4``. The top
level searches a ``top_wsize`` half-window around zero flow (capped at the map
size, since larger displacements are always outside), every finer level
searches ``wsize`` around the bilinearly upsampled, doubled and rounded coarser
flow. As in the reference implementation, gamma is multiplied by 2**level at
coarse levels (a coarse pixel spans 2**level fine ones); alpha and d are not.

Each level runs loopy min-sum belief propagation on SIFT Flow's dual-layer
factor graph (§3.1, Fig. 4): a u-layer and a v-layer of 1-D label nodes,
coupled per pixel by the data term (an L x L table), with the truncated-L1
smoothness acting within each layer, so spatial messages are 1-D and computed
in O(L) with the distance transform of Felzenszwalb & Huttenlocher. Labels are
relative to a per-pixel window centre; a message between neighbours with
different centres is read from the sender's distance transform at the shifted
position (exactly, by extending the L1 envelope beyond the window). Messages
are updated synchronously (all edges in parallel), vectorised over the batch,
the pixels and the labels; the label is the argmin of the belief.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sift_flow", "flow_energy", "pyramid_levels", "MIN_SIZE"]

#: Smallest side (px) of a pyramid level; coarsening stops before going below.
MIN_SIZE = 4

# Sending directions of the 4-neighbour messages. Incoming messages are stored
# in the slot of the direction whose outgoing message must exclude them: what
# came from the right neighbour sits in slot _RIGHT, since a message sent right
# must not echo it back. So the outgoing messages are belief - slots, no shuffle.
_RIGHT, _LEFT, _DOWN, _UP = 0, 1, 2, 3


# --------------------------------------------------------------------------- checks
def _check_pair(f1: Tensor, f2: Tensor) -> None:
    for name, f in (("f1", f1), ("f2", f2)):
        if not isinstance(f, Tensor):
            raise TypeError(f"sift_flow: {name} must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() != 4:
            raise ValueError(f"sift_flow: {name} must be [B, C, H, W], got shape {tuple(f.shape)}")
        if not f.is_floating_point():
            raise TypeError(f"sift_flow: {name} must be a float tensor, got {f.dtype}")
    if f1.shape[:2] != f2.shape[:2]:
        raise ValueError(
            f"sift_flow: f1 and f2 must share batch and channels, got f1 {tuple(f1.shape)} "
            f"and f2 {tuple(f2.shape)}")
    if f1.device != f2.device:
        raise ValueError(f"sift_flow: f1 is on {f1.device} but f2 is on {f2.device}")


def _check_weights(alpha: float, d: float, gamma: float, data_trunc: float | None) -> None:
    for name, val in (("alpha", alpha), ("d", d), ("gamma", gamma)):
        if not val >= 0:
            raise ValueError(f"sift_flow: {name} must be >= 0, got {val}")
    if data_trunc is not None and not data_trunc > 0:
        raise ValueError(f"sift_flow: data_trunc must be > 0 or None, got {data_trunc}")


def _oob_cost(f1: Tensor, f2: Tensor, d: float) -> Tensor:
    """Per-pair cost added to matches outside f2 (see module docstring), [B]."""
    c = f1.shape[1]
    m1 = f1.detach().abs().flatten(1).amax(1)
    m2 = f2.detach().abs().flatten(1).amax(1)
    # amax propagates NaN and inf, so this doubles as the finiteness check.
    for name, m in (("f1", m1), ("f2", m2)):
        if not torch.isfinite(m).all():
            raise ValueError(f"sift_flow: {name} contains NaN or inf")
    return (c * (m1 + m2) + 8.0 * d + 1.0).float()


# --------------------------------------------------------------------------- data term
def _data_cost(f1: Tensor, f2: Tensor, ou: Tensor, ov: Tensor, w: int, alpha: float,
               big: Tensor, data_trunc: float | None) -> Tensor:
    """Data term of eq. 3 for every label of a (2w+1)^2 window around (ou, ov).

    Returns ``D[b, iv, iu, y, x]``: cost of flow (ou + iu - w, ov + iv - w) at
    pixel (y, x), outside matches handled as in the module docstring.
    """
    b, c, h, wd = f1.shape
    h2, w2 = f2.shape[-2:]
    n = 2 * w + 1
    dev = f1.device
    r = torch.arange(-w, w + 1, device=dev)
    tx = (torch.arange(wd, device=dev).view(1, 1, wd) + ou)[:, :, :, None, None] + r.view(1, 1, 1, 1, n)
    ty = (torch.arange(h, device=dev).view(1, h, 1) + ov)[:, :, :, None, None] + r.view(1, 1, 1, n, 1)
    txc, tyc = tx.clamp(0, w2 - 1), ty.clamp(0, h2 - 1)
    outside = (tx - txc).abs() + (ty - tyc).abs()                      # [B, H, W, n(v), n(u)]
    target = tyc * w2 + txc                                             # index into f2's pixels
    f1p = f1.permute(0, 2, 3, 1).reshape(b, h * wd, c).float()
    f2p = f2.permute(0, 2, 3, 1).reshape(b, h2 * w2, c).float()
    if h2 * w2 <= n * n:
        # Window larger than f2 (top level): all-pairs L1 is cheaper than per-label gathers.
        allpairs = torch.cdist(f1p, f2p, p=1)                           # [B, HW, H2W2]
        cost = allpairs.gather(2, target.reshape(b, h * wd, n * n))
    else:
        flat = (target + (torch.arange(b, device=dev) * (h2 * w2)).view(b, 1, 1, 1, 1)).reshape(-1)
        rows = f2p.reshape(b * h2 * w2, c)
        f1rows = f1p.reshape(b * h * wd, 1, c)
        per_px = n * n
        # Chunks of ~1M gathered values in one reused buffer (fresh multi-MB
        # tensors cost more in page faults than the arithmetic); cdist(p=1)
        # reduces each |f1 - f2| row in one vectorised pass.
        step = max(1, min(b * h * wd, (1 << 20) // max(c, 1) // per_px))
        buf = torch.empty(step * per_px, c, device=dev)
        cost = torch.empty(b * h * wd, per_px, device=dev)
        for q0 in range(0, b * h * wd, step):
            q1 = min(q0 + step, b * h * wd)
            g = buf[:(q1 - q0) * per_px]
            torch.index_select(rows, 0, flat[q0 * per_px:q1 * per_px], out=g)
            cost[q0:q1] = torch.cdist(f1rows[q0:q1], g.view(q1 - q0, per_px, c), p=1).view(q1 - q0, per_px)
        cost = cost.view(b, h * wd, per_px)
    if data_trunc is not None:
        cost = cost.clamp(max=float(data_trunc))
    outside = outside.reshape(b, h * wd, n * n)
    cost = torch.where(outside > 0, cost + big.view(b, 1, 1) + alpha * outside, cost)
    return cost.view(b, h, wd, n, n).permute(0, 3, 4, 1, 2).contiguous()


# --------------------------------------------------------------------------- BP
def _neighbour_shift(o: Tensor, n: int, alpha: float, dense: bool | None = None):
    """In-place correction turning a sender's L1 envelope into the receiver's
    window where neighbouring window centres differ.

    With centres o_p (sender) and o_q (receiver), receiver label j is the
    absolute value j + o_q - w, i.e. sender label k = j + o_q - o_p; outside
    the sender's window the envelope continues linearly with slope alpha.
    ``o``: [B, 2 layers, H, W]. Returns a function applying the correction to
    the outgoing messages [B, 2, 4, L, H, W]: a sparse row copy when few edges
    are shifted, a dense gather otherwise (cheaper per element at high
    density); ``dense`` forces one of them.
    """
    b, _, h, w = o.shape
    diff = torch.zeros(b, 2, 4, h, w, dtype=o.dtype, device=o.device)
    diff[:, :, _RIGHT, :, :-1] = o[..., 1:] - o[..., :-1]
    diff[:, :, _LEFT, :, 1:] = o[..., :-1] - o[..., 1:]
    diff[:, :, _DOWN, :-1, :] = o[..., 1:, :] - o[..., :-1, :]
    diff[:, :, _UP, 1:, :] = o[..., :-1, :] - o[..., 1:, :]
    labels = torch.arange(n, device=o.device)
    nz = (diff != 0).float().mean().item() if diff.numel() else 0.0
    if nz == 0.0 and dense is None:
        return lambda msg: msg
    if dense or (dense is None and nz > 0.3):
        k = labels.view(1, 1, 1, n, 1, 1) + diff[:, :, :, None]
        kc = k.clamp(0, n - 1)
        pen = alpha * (k - kc).abs().float()
        out = torch.empty(pen.shape, device=o.device)

        def dense(msg: Tensor) -> Tensor:
            torch.gather(msg, 3, kc, out=out)
            torch.add(out, pen, out=msg)
            return msg
        return dense
    group, pixel = diff.view(b * 8, h * w).nonzero(as_tuple=True)
    k = labels.view(1, n) + diff.view(b * 8, h * w)[group, pixel].view(-1, 1)
    kc = k.clamp(0, n - 1)
    pen = (alpha * (k - kc).abs().float()).view(-1)
    row = (group * (n * h * w) + pixel).view(-1, 1)
    dst = (row + labels.view(1, n) * (h * w)).view(-1)
    src = (row + kc * (h * w)).view(-1)

    def sparse(msg: Tensor) -> Tensor:
        flat = msg.view(-1)
        flat.index_copy_(0, dst, flat.index_select(0, src).add_(pen))
        return msg
    return sparse


def _l1_envelope_(h: Tensor, alpha: float, dim: int, tmp: Tensor) -> Tensor:
    """In place: h(j) <- min_k h(k) + alpha |j - k| along ``dim`` (the O(L)
    two-pass distance transform); ``tmp`` has the shape of one slice."""
    n = h.shape[dim]
    passes = [(i, i - 1) for i in range(1, n)] + [(i, i + 1) for i in range(n - 2, -1, -1)]
    for i, prev in passes:
        cur = h.select(dim, i)
        torch.add(h.select(dim, prev), alpha, out=tmp)
        torch.minimum(cur, tmp, out=cur)
    return h


def _bp_dual_layer(data: Tensor, ou: Tensor, ov: Tensor, w: int, alpha: float, d: float,
                   gamma: float, iters: int) -> tuple[Tensor, Tensor]:
    """Loopy min-sum BP on SIFT Flow's dual-layer graph (TPAMI 2011 §3.1).

    ``data``: [B, L, L, H, W] indexed (iv, iu); returns window labels (iu, iv),
    each [B, H, W] long, minimising the belief after ``iters`` parallel sweeps.
    Large temporaries are allocated once per level: fresh multi-MB buffers
    every iteration cost more in page faults than the arithmetic on CPU.
    """
    b, n, _, h, wd = data.shape
    dev = data.device
    r = torch.arange(-w, w + 1, device=dev).view(1, 1, n, 1, 1)
    offsets = torch.stack([ou, ov], 1)                       # [B, 2, H, W]
    # [B, 2 layers (u, v), L, H, W]: gamma |u|, gamma |v| of the absolute flow.
    rng = (gamma * (offsets[:, :, None] + r).abs()).float()
    shift = _neighbour_shift(offsets, n, alpha)
    spatial = torch.zeros(b, 2, 4, n, h, wd, device=dev)    # incoming, by excluding direction
    send = torch.empty_like(spatial)
    hmin = torch.empty(b, 2, 4, 1, h, wd, device=dev)
    tmp = torch.empty(b, 2, 4, h, wd, device=dev)
    layer = torch.empty(b, 2, n, h, wd, device=dev)          # everything but the data factor
    belief = torch.empty_like(layer)
    dual = torch.zeros_like(layer)                           # [:,0]: factor->u, [:,1]: factor->v
    joint = torch.empty_like(data)
    dual_min = torch.empty(b, 2, 1, h, wd, device=dev)
    for _ in range(iters):
        torch.sum(spatial, 2, out=layer)
        layer += rng
        torch.add(dual, layer, out=belief)
        # Data factor -> u-node: min over v of D(u, v) + v-layer sums, and vice versa.
        torch.add(data, layer[:, 1, :, None], out=joint)
        torch.amin(joint, 1, out=dual[:, 0])
        torch.add(data, layer[:, 0, None, :], out=joint)
        torch.amin(joint, 2, out=dual[:, 1])
        torch.amin(dual, 2, keepdim=True, out=dual_min)
        dual -= dual_min
        torch.sub(belief[:, :, None], spatial, out=send)
        torch.amin(send, 3, keepdim=True, out=hmin)
        _l1_envelope_(send, alpha, 3, tmp)
        shift(send)
        torch.minimum(send, hmin + d, out=send)              # truncation of the L1 smoothness
        # Normalising (- hmin) while moving each message to its receiver.
        torch.sub(send[:, :, _LEFT, :, :, 1:], hmin[:, :, _LEFT, :, :, 1:],
                  out=spatial[:, :, _RIGHT, :, :, :-1])
        torch.sub(send[:, :, _RIGHT, :, :, :-1], hmin[:, :, _RIGHT, :, :, :-1],
                  out=spatial[:, :, _LEFT, :, :, 1:])
        torch.sub(send[:, :, _UP, :, 1:, :], hmin[:, :, _UP, :, 1:, :],
                  out=spatial[:, :, _DOWN, :, :-1, :])
        torch.sub(send[:, :, _DOWN, :, :-1, :], hmin[:, :, _DOWN, :, :-1, :],
                  out=spatial[:, :, _UP, :, 1:, :])
    torch.sum(spatial, 2, out=layer)
    layer += rng
    total = data + layer[:, 0, None, :] + layer[:, 1, :, None]
    # argmin over a contiguous last dim is several times faster on CPU.
    best = total.flatten(1, 2).permute(0, 2, 3, 1).contiguous().argmin(-1)
    return best % n, torch.div(best, n, rounding_mode="floor")


# --------------------------------------------------------------------------- pyramid
def _downsample(f: Tensor) -> Tensor:
    # With ceil_mode an odd last row/column is averaged over its valid
    # entries, the same as replicate-padding to an even size first.
    return F.avg_pool2d(f, 2, ceil_mode=True)


def pyramid_levels(shape1: tuple[int, int], shape2: tuple[int, int], levels: int) -> int:
    """Number of pyramid levels used: at most ``levels``, while both maps keep
    at least ``MIN_SIZE`` px per side (13x13 with levels=4 gives 3)."""
    if levels < 1:
        raise ValueError(f"sift_flow: levels must be >= 1, got {levels}")
    sizes = [*shape1, *shape2]
    n = 1
    while n < levels:
        sizes = [(s + 1) // 2 for s in sizes]
        if min(sizes) < MIN_SIZE:
            break
        n += 1
    return n


def sift_flow(f1: Tensor, f2: Tensor, alpha=2 * 255, d=40 * 255, gamma=0.005 * 255, levels=4,
              wsize=2, top_wsize=10, top_iters=60, iters=30, *, data_trunc=None) -> Tensor:
    """SIFT Flow (Liu et al., TPAMI 2011, eq. 3, §3) between CNN feature maps,
    as used for the per-layer feature flows of the generators paper §2.1.3.

    Args:
        f1, f2: float [B, C, H, W] (f2 may have another H, W), scaled by the
            caller; the default weights assume values in about [0, 255].
        alpha, d: truncated-L1 smoothness weight and truncation.
        gamma: weight of the small-displacement term |u| + |v|.
        levels: pyramid levels (fewer when the maps are small, see
            :func:`pyramid_levels`).
        wsize, iters: half-window and BP iterations of the finer levels.
        top_wsize, top_iters: half-window and BP iterations of the top level.
        data_trunc: keyword-only truncation ``t`` of the L1 data term.

    Returns:
        float32 [B, 2, H, W] holding integers on the device of ``f1``: channel 0
        is u (x, columns), channel 1 is v (y, rows), such that f2 at
        (x + u, y + v) matches f1 at (x, y).
    """
    _check_pair(f1, f2)
    _check_weights(alpha, d, gamma, data_trunc)
    for name, val in (("wsize", wsize), ("top_wsize", top_wsize), ("top_iters", top_iters),
                      ("iters", iters)):
        if int(val) != val or val < 0:
            raise ValueError(f"sift_flow: {name} must be a non-negative integer, got {val}")
    nlev = pyramid_levels(tuple(f1.shape[-2:]), tuple(f2.shape[-2:]), int(levels))
    big = _oob_cost(f1, f2, d)
    pyr1, pyr2 = [f1.float()], [f2.float()]
    for _ in range(nlev - 1):
        pyr1.append(_downsample(pyr1[-1]))
        pyr2.append(_downsample(pyr2[-1]))
    flow = None
    for lev in range(nlev - 1, -1, -1):
        g1, g2 = pyr1[lev], pyr2[lev]
        b, _, h, w = g1.shape
        if flow is None:
            ou = torch.zeros(b, h, w, dtype=torch.long, device=g1.device)
            ov = torch.zeros_like(ou)
            reach = max(h, w, *g2.shape[-2:]) - 1            # larger |u|, |v| always land outside
            win, nit = min(int(top_wsize), reach), int(top_iters)
        else:
            up = F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=False)
            up = torch.round(2 * up[:, :, :h, :w]).long()
            ou, ov = up[:, 0], up[:, 1]
            win, nit = int(wsize), int(iters)
        data = _data_cost(g1, g2, ou, ov, win, float(alpha), big, data_trunc)
        iu, iv = _bp_dual_layer(data, ou, ov, win, float(alpha), float(d),
                                float(gamma) * 2 ** lev, nit)
        flow = torch.stack([ou + iu - win, ov + iv - win], 1).float()
    return flow


def flow_energy(f1: Tensor, f2: Tensor, flow: Tensor, alpha=2 * 255, d=40 * 255,
                gamma=0.005 * 255, *, data_trunc=None) -> Tensor:
    """SIFT Flow energy (TPAMI 2011, eq. 3) of an integer ``flow`` [B, 2, H, W]
    at full resolution, same weights and outside-match rule as
    :func:`sift_flow` (``flow`` is rounded). Returns float64 [B]."""
    _check_pair(f1, f2)
    _check_weights(alpha, d, gamma, data_trunc)
    b, c, h, w = f1.shape
    if flow.dim() != 4 or tuple(flow.shape) != (b, 2, h, w):
        raise ValueError(f"flow_energy: flow must be [{b}, 2, {h}, {w}], got {tuple(flow.shape)}")
    fl = torch.round(flow.to(f1.device)).long()
    data = _data_cost(f1.float(), f2.float(), fl[:, 0], fl[:, 1], 0, float(alpha),
                      _oob_cost(f1, f2, d), data_trunc)[:, 0, 0]
    fd = fl.double()
    small = gamma * fd.abs().sum(1)
    smooth = (alpha * (fd[:, :, :, 1:] - fd[:, :, :, :-1]).abs()).clamp(max=d).sum((1, 2, 3)) \
        + (alpha * (fd[:, :, 1:] - fd[:, :, :-1]).abs()).clamp(max=d).sum((1, 2, 3))
    return data.double().sum((1, 2)) + small.sum((1, 2)) + smooth
