"""Feature flows: SIFT Flow on CNN feature maps (generators paper §2.1.3).

The generators paper (Gallagher et al. 2015, §2.1.3) computes, for every
convolutional layer, the "feature flow" between the AlexNet features of an image
and of its transformed copy with the SIFT Flow method of Liu, Yuen & Torralba
(TPAMI 2011), using CNN feature vectors in place of SIFT descriptors. This
module implements that matcher in batched PyTorch (CPU or CUDA, the device of
the inputs), following the original solver (Ce Liu's BPFlow, driven coarse to
fine as its SIFTflowc2f does) step by step.

Energy (SIFT Flow, TPAMI 2011, eq. 3), for a flow w(p) = (u(p), v(p))::

    E(w) = sum_p  min(|f1(p) - f2(p + w(p))|_1, t)                 data term
         + sum_p  gamma (|u(p)| + |v(p)|)                          small displacement
         + sum_{(p,q) 4-neighbours} min(alpha |u(p) - u(q)|, d)
                                  + min(alpha |v(p) - v(q)|, d)    smoothness

``t`` is ``data_trunc`` (no truncation when ``None``). The default weights
(alpha = 2*255, d = 40*255, gamma = 0.005*255, 4 levels, half-windows 2 / 10,
30 / 60 iterations) are the widely used SIFT Flow settings for descriptors in
[0, 255], so callers scale features to roughly that range.

Matches outside f2 (BPFlow's data term). A label whose target p + w(p) falls
outside f2 costs a default value computed per pair and level from the costs of
all in-image labels of that level: BPFlow's 20,000-bin histogram median. As in
the released code, the bin of a cost c is floor(c / bin width) while the value
read back is bin * width + smallest cost, so the default is the median of the
in-image costs plus their minimum (to within one bin). :func:`flow_energy`
scores a flow with the fixed rule of the reference comparison instead: an
outside match costs the median over grid points of the zero-flow distance.

Coarse to fine (SIFTflowc2f). Level 0 is the input; each coarser level is the
previous one smoothed by a 5x5 Gaussian (sigma 0.67, replicated borders) and
resized bicubically (Keys a = -0.75, as OpenCV's INTER_CUBIC) to
ceil(H/2) x ceil(W/2), while both maps keep at least ``MIN_SIZE`` px per side.
The top level searches a ``top_wsize`` half-window around zero flow (around
the size ratio when f2 has another size) with ``top_iters`` iterations; level
``l`` below it searches ``wsize + l`` around round(2 x the bicubically
upsampled coarser flow) with ``iters`` iterations. gamma is multiplied by 2**l
at level l; alpha and d are not.

Each level is one MRF on SIFT Flow's dual-layer factor graph (§3.1, Fig. 4): a
u-layer and a v-layer of 1-D label nodes (labels relative to a per-pixel window
centre, the offset), coupled per pixel by the data term, with the truncated-L1
smoothness acting within each layer. It is minimised by BPFlow's belief
propagation:

* Hierarchy inside a level: before its own iterations, a level with hierarchy
  ``h > 0`` builds a coarser MRF of the same labels (2x2 blocks: data costs
  summed, offsets averaged and truncated toward zero, the range weight gamma
  halved, alpha and d kept), solves it with ``HIERARCHY_ITERS`` iterations and
  hierarchy ``h - 1``, and copies its messages to the four children as their
  starting messages. The top level uses ``h = 2``, level ``l`` below it
  ``levels - 1 - l``, as in SIFTflowc2f.
* Schedule (BPFlow's BP_S): iteration ``i`` updates plane ``i % 2`` (u, then
  v) in place in a raster sweep, forward (messages sent right and down) when
  ``i % 4 < 2``, backward (left and up) otherwise, and sends that plane's
  messages to the other plane through the data term when ``i % 8 < 4``.
* Labels: u and v are read from the argmin of their own plane's belief.

Vectorisation. In a forward raster sweep a pixel only reads messages written
by its left and upper neighbours earlier in the same sweep (the messages from
the right and from below change only in backward sweeps, and the dual message
a plane reads is written only while the other plane is swept), so the sweep
equals a wavefront over the anti-diagonals x + y = t: all pixels of one
diagonal are updated at once, from diagonal t - 1, giving the same messages as
the raster order in H + W - 1 steps. The dual messages of a pixel only read
its final incoming messages, so they are updated in one pass after the sweep.
Pixels are stored diagonal by diagonal (``_Grid``), each step works on a
contiguous block of columns ``[2 messages, labels, batch x diagonal]`` across
the whole batch, and a message's distance transform, truncation and move to a
receiver whose window is centred elsewhere are one broadcast minimum plus one
precomputed gather. On CPU the batch is split over ``workers`` processes (this
one and persistent helpers, :func:`topdown.parallel.map_split`), each running
single-threaded torch ops: the ops are too small for intra-op threads, and
their dispatch holds the GIL, so threads of one process do not add a core.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sift_flow", "flow_energy", "pyramid_levels", "MIN_SIZE", "HIERARCHY_ITERS"]

#: Smallest side (px) of a pyramid level; coarsening stops before going below.
MIN_SIZE = 4

#: Iterations of BPFlow's coarsened MRFs inside a level (``MessagePassing(20, ...)``).
HIERARCHY_ITERS = 20

# BPFlow's histogram of in-image matching costs (ComputeDataTerm).
_HIST_BINS = 20000
_HIST_MIN_START = 32767.0

# Largest neighbour offset difference handled inside the broadcast distance
# transform; larger ones (rare: flow discontinuities) are read at the edge of
# the extended envelope plus the exact linear remainder.
_SHIFT_IN_BROADCAST = 1


# --------------------------------------------------------------------------- checks
def _check_pair(f1: Tensor, f2: Tensor, who: str = "sift_flow") -> None:
    for name, f in (("f1", f1), ("f2", f2)):
        if not isinstance(f, Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() != 4:
            raise ValueError(f"{who}: {name} must be [B, C, H, W], got shape {tuple(f.shape)}")
        if not f.is_floating_point():
            raise TypeError(f"{who}: {name} must be a float tensor, got {f.dtype}")
    if f1.shape[:2] != f2.shape[:2]:
        raise ValueError(
            f"{who}: f1 and f2 must share batch and channels, got f1 {tuple(f1.shape)} "
            f"and f2 {tuple(f2.shape)}")
    if f1.device != f2.device:
        raise ValueError(f"{who}: f1 is on {f1.device} but f2 is on {f2.device}")
    for name, f in (("f1", f1), ("f2", f2)):
        # amax propagates NaN and inf, and is cheaper than isfinite().all().
        if f.numel() and not torch.isfinite(f.detach().abs().amax()):
            raise ValueError(f"{who}: {name} contains NaN or inf")


def _check_weights(alpha: float, d: float, gamma: float, data_trunc: float | None,
                   who: str = "sift_flow") -> None:
    for name, val in (("alpha", alpha), ("d", d), ("gamma", gamma)):
        if not val >= 0:
            raise ValueError(f"{who}: {name} must be >= 0, got {val}")
    if data_trunc is not None and not data_trunc > 0:
        raise ValueError(f"{who}: data_trunc must be > 0 or None, got {data_trunc}")


# --------------------------------------------------------------------------- pyramid
def _cubic_weights(n_in: int, n_out: int) -> Tensor:
    """[n_out, n_in] bicubic resampling (Keys a = -0.75, pixel centres mapped
    by the size ratio, clamped borders): OpenCV's INTER_CUBIC, the resize of
    BPFlow's C++ driver, and ``F.interpolate(mode="bicubic")``."""
    a = -0.75
    u = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5
    taps = torch.floor(u)[:, None] + torch.arange(-1, 3, dtype=torch.float64)
    x = (u[:, None] - taps).abs()
    wts = torch.where(x <= 1, (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1,
                      torch.where(x < 2, a * (x ** 3 - 5 * x ** 2 + 8 * x - 4), torch.zeros_like(x)))
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    return m.scatter_add_(1, taps.clamp(0, n_in - 1).long(), wts)


def _gauss_weights(n: int) -> Tensor:
    """[n, n] 5-tap Gaussian, sigma 0.67, replicated borders (SIFTflowc2f's
    ``fspecial('gaussian', 5, 0.67)`` with ``'replicate'``)."""
    k = torch.arange(-2, 3, dtype=torch.float64)
    g = torch.exp(-k ** 2 / (2 * 0.67 ** 2))
    g = g / g.sum()
    rows = torch.arange(n).view(n, 1).expand(n, 5)
    cols = (rows + torch.arange(-2, 3)).clamp(0, n - 1)
    return torch.zeros(n, n, dtype=torch.float64).index_put_((rows, cols), g.expand(n, 5), accumulate=True)


def _downsample(f: Tensor) -> Tensor:
    """One pyramid step on channels-last maps [B, H, W, C]: Gaussian smoothing,
    then bicubic resize to ceil(H/2) x ceil(W/2), as separable [out, in] matrices."""
    b, h, w, c = f.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    mh = (_cubic_weights(h, ho) @ _gauss_weights(h)).to(f.device, f.dtype)
    mw = (_cubic_weights(w, wo) @ _gauss_weights(w)).to(f.device, f.dtype)
    rows = torch.matmul(mh, f.reshape(b, h, w * c))                   # [B, Ho, W C]
    return torch.matmul(mw, rows.view(b * ho, w, c)).view(b, ho, wo, c)


def _upsample_flow(flow: Tensor, h: int, w: int) -> Tensor:
    """Bicubic resize of a coarse flow to h x w (SIFTflowc2f's imresize; not yet doubled)."""
    mh = _cubic_weights(flow.shape[-2], h).to(flow.device, flow.dtype)
    mw = _cubic_weights(flow.shape[-1], w).to(flow.device, flow.dtype)
    return torch.matmul(torch.matmul(mh, flow), mw.t())


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


def _round_half_away(x: Tensor) -> Tensor:
    # MATLAB's round (SIFTflowc2f), not torch's round-half-to-even.
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _size_ratio_offsets(h: int, w: int, h2: int, w2: int, device) -> Tensor:
    """SIFTflowc2f's zero-flow reference when f2 has another size: pixel x of
    f1 maps to x (W2 - 1) / (W - 1) of f2. [2, H, W] float64 (u, v)."""
    x = torch.arange(w, dtype=torch.float64, device=device)
    y = torch.arange(h, dtype=torch.float64, device=device)
    bx = _round_half_away(x * ((w2 - 1) / (w - 1)) - x) if w > 1 else torch.zeros_like(x)
    by = _round_half_away(y * ((h2 - 1) / (h - 1)) - y) if h > 1 else torch.zeros_like(y)
    return torch.stack([bx.view(1, w).expand(h, w), by.view(h, 1).expand(h, w)])


# --------------------------------------------------------------------------- data term
def _data_cost(f1: Tensor, f2: Tensor, ou: Tensor, ov: Tensor, w: int,
               data_trunc: float | None) -> tuple[Tensor, Tensor]:
    """L1 data term of eq. 3 for every label of a (2w+1)^2 window around (ou, ov).

    ``f1``, ``f2``: channels-last float maps [B, H, W, C]. Returns
    ``D[b, y, x, iv, iu]``, the cost of flow (ou + iu - w, ov + iv - w) at
    pixel (y, x) (outside matches filled in by :func:`_fill_outside`), and the
    mask of labels whose match lies inside f2.
    """
    b, h, wd, c = f1.shape
    h2, w2 = f2.shape[1:3]
    n = 2 * w + 1
    dev = f1.device
    r = torch.arange(-w, w + 1, device=dev)
    tx = (torch.arange(wd, device=dev).view(1, 1, wd) + ou)[..., None] + r          # [B, H, W, n(u)]
    ty = (torch.arange(h, device=dev).view(1, h, 1) + ov)[..., None] + r            # [B, H, W, n(v)]
    inside = ((ty >= 0) & (ty < h2))[..., :, None] & ((tx >= 0) & (tx < w2))[..., None, :]
    per_px, rows = n * n, b * h * wd
    f1p = f1.reshape(rows, 1, c)
    if h2 * w2 <= per_px:
        # Window larger than f2 (top level): all-pairs L1 is cheaper than per-label gathers.
        target = ty.clamp(0, h2 - 1)[..., :, None] * w2 + tx.clamp(0, w2 - 1)[..., None, :]
        cost = torch.cdist(f1.reshape(b, h * wd, c), f2.reshape(b, h2 * w2, c), p=1)
        cost = cost.gather(2, target.reshape(b, h * wd, per_px)).view(rows, per_px)
    else:
        # The n labels of one window row are n consecutive pixels of f2: gather
        # them as one contiguous run of n * C values (f2 padded in x so that
        # every window fits), in chunks of ~1M values (CPU; fresh multi-MB
        # tensors cost more in page faults than the arithmetic) through one
        # reused buffer, then |f1 - f2| summed over channels in place.
        left = max(0, -int(tx[..., 0].min()))
        right = max(0, int(tx[..., -1].max()) - (w2 - 1))
        wp = w2 + left + right
        f2p = F.pad(f2, (0, 0, left, right)) if left or right else f2.contiguous()
        runs = f2p.view(-1).as_strided((b * h2 * wp - n + 1, n * c), (c, 1))
        x0 = tx[..., 0] + left                                        # first label's padded column
        start = (torch.arange(b, device=dev).view(b, 1, 1, 1) * h2 + ty.clamp(0, h2 - 1)) * wp + x0[..., None]
        start = start.reshape(-1)                                     # [B H W n(v)]
        budget = 1 << 20 if dev.type == "cpu" else 1 << 28             # values per chunk: cache vs launches
        step = max(1, min(rows, budget // max(c, 1) // per_px))
        buf = torch.empty(step * n, n * c, device=dev)
        cost = torch.empty(rows, per_px, device=dev)
        for q0 in range(0, rows, step):
            q1 = min(q0 + step, rows)
            g = buf[:(q1 - q0) * n]
            torch.index_select(runs, 0, start[q0 * n:q1 * n], out=g)
            g3 = g.view(q1 - q0, per_px, c)
            torch.sub(g3, f1p[q0:q1], out=g3).abs_()
            torch.sum(g3, 2, out=cost[q0:q1])
    if data_trunc is not None:
        cost = cost.clamp(max=float(data_trunc))
    return cost.view(b, h, wd, n, n), inside


def _outside_cost(cost: Tensor, inside: Tensor) -> Tensor:
    """BPFlow's default matching score per pair, [B] (see the module docstring).

    The first of 20,000 bins of width (max - min) / 20,000, indexed by
    floor(cost / width), at which the cumulative share of in-image costs
    reaches one half; the score is that bin (at least 1) times the width plus
    the smallest cost."""
    b = cost.shape[0]
    c = cost.reshape(b, -1).float()
    out = ~inside.reshape(b, -1)
    # Costs are >= 0, so the maximum over in-image labels is that of the masked costs.
    lo = c.masked_fill(out, float("inf")).amin(1).double().clamp(max=_HIST_MIN_START)
    hi = c.masked_fill(out, 0.0).amax(1).double()
    width = (hi - lo) / _HIST_BINS
    safe = torch.where(width > 0, width, torch.ones_like(width))
    bins = (c / safe[:, None].float()).floor_().clamp_(0, _HIST_BINS - 1)
    bins += _HIST_BINS * torch.arange(b, device=c.device, dtype=bins.dtype)[:, None]
    bins = bins.masked_fill_(out, b * _HIST_BINS).long()
    counts = torch.bincount(bins.view(-1), minlength=b * _HIST_BINS + 1)[:-1].view(b, _HIST_BINS)
    total = counts.sum(1, keepdim=True)
    share = torch.cumsum(counts.double() / total.clamp(min=1), 1)
    first = (share >= 0.5).to(torch.int8).argmax(1)
    score = first.clamp(min=1).double() * width + lo
    # No in-image label at all (cannot happen with a window around the image) or all costs equal.
    return torch.where(total[:, 0] > 0, torch.where(width > 0, score, lo), torch.zeros_like(lo))


def _fill_outside(cost: Tensor, inside: Tensor) -> Tensor:
    default = _outside_cost(cost, inside).to(cost.dtype)
    return torch.where(inside, cost, default.view(-1, 1, 1, 1, 1))


# --------------------------------------------------------------------------- MRF
class _Mrf:
    """One BPFlow MRF: ``data`` [B, H, W, L(v), L(u)], integer window centres
    ``offsets`` [B, 2 (u, v), H, W], half-window ``w`` and range weight ``gamma``."""

    def __init__(self, data: Tensor, offsets: Tensor, w: int, gamma: float):
        self.data, self.offsets, self.w, self.gamma = data, offsets, w, gamma

    def range_term(self) -> Tensor:
        """gamma |offset + label| per plane, [2, L, B, H, W]."""
        r = torch.arange(-self.w, self.w + 1, device=self.offsets.device)
        o = self.offsets.permute(1, 0, 2, 3)[:, None]
        return self.gamma * (o + r.view(1, -1, 1, 1, 1)).abs().float()

    def coarser(self) -> "_Mrf":
        """BPFlow's generateCoarserLevel: 2x2 blocks, same labels."""
        b, h, w, n, _ = self.data.shape
        hc, wc = (h + 1) // 2, (w + 1) // 2
        pad = (0, 2 * wc - w, 0, 2 * hc - h)
        data = F.pad(self.data, (0, 0, 0, 0, *pad)).view(b, hc, 2, wc, 2, n, n).sum((2, 4))
        total = F.pad(self.offsets, pad).view(b, 2, hc, 2, wc, 2).sum((3, 5))
        count = F.pad(torch.ones(1, 1, h, w, dtype=torch.long, device=self.offsets.device), pad)
        count = count.view(1, 1, hc, 2, wc, 2).sum((3, 5))
        return _Mrf(data, torch.div(total, count, rounding_mode="trunc"), self.w, self.gamma / 2)


class _Grid:
    """Pixels of a B x H x W grid stored anti-diagonal by anti-diagonal.

    Diagonal t (x + y = t) holds rows y0[t] .. y0[t] + n[t] - 1; its pixels of
    all pairs are the contiguous columns ``cols[t]`` of every ``[..., P]``
    tensor (P = B H W), ordered (pair, row), so one wavefront step reads and
    writes one slice of columns.
    """

    def __init__(self, b: int, h: int, w: int, device):
        t = torch.arange(h + w - 1)
        y0 = (t - w + 1).clamp(min=0)
        n = t.clamp(max=h - 1) - y0 + 1
        q = b * (torch.cumsum(n, 0) - n)
        self.b, self.h, self.w, self.t, self.p, self.device = b, h, w, h + w - 1, b * h * w, device
        self.sizes = (b * n).tolist()
        self.cols = [slice(s, s + m) for s, m in zip(q.tolist(), self.sizes)]
        bb = torch.arange(b).view(b, 1, 1)
        yy = torch.arange(h).view(1, h, 1)
        tt = torch.arange(w).view(1, 1, w) + yy
        col = (q[tt] + bb * n[tt] + (yy - y0[tt])).reshape(-1)
        self.col_of_pix = col.to(device)
        self.pix_of_col = torch.empty_like(self.col_of_pix)
        self.pix_of_col[self.col_of_pix] = torch.arange(self.p, device=device)
        self.diag_of_col = torch.repeat_interleave(torch.arange(self.t), b * n).to(device)
        self.first_col = q.to(device)
        self.size_of_diag = (b * n).to(device)
        self.cache: dict = {}

    def pack(self, x: Tensor) -> Tensor:
        """[..., B, H, W] -> [..., P]."""
        return x.flatten(-3).index_select(-1, self.pix_of_col)

    def unpack(self, x: Tensor) -> Tensor:
        """[..., P] -> [..., B, H, W]."""
        return x.index_select(-1, self.col_of_pix).unflatten(-1, (self.b, self.h, self.w))

    def children_of(self, coarse: "_Grid") -> Tensor:
        """For each column, the column in ``coarse`` of the 2x2 block holding it."""
        key = ("children", coarse.h, coarse.w)
        if key not in self.cache:
            pix = self.pix_of_col
            b, rest = pix // (self.h * self.w), pix % (self.h * self.w)
            y, x = rest // self.w, rest % self.w
            self.cache[key] = coarse.col_of_pix[(b * coarse.h + y // 2) * coarse.w + x // 2]
        return self.cache[key]


class _Workspace:
    """Message buffers of one grid and label count, with the views every
    wavefront step uses, built once and reused by all MRFs of that shape.

    Spatial messages ``msg[plane, slot, label, column]``, slots: 0 from the
    left, 1 from above, 2 from below, 3 from the right. A forward step of
    diagonal t sends the right- and down-going messages (filling slots 0, 1 of
    diagonal t + 1) from ``base + slot 0 + slot 1`` plus slot 2 and 3
    respectively; a backward step sends the up- and left-going ones (slots 2, 3
    of diagonal t - 1) from ``base + slot 2 + slot 3`` plus slot 0 and 1.
    """

    def __init__(self, grid: _Grid, n: int, ext: int):
        dev, p = grid.device, grid.p
        self.grid, self.n, self.ext, self.le = grid, n, ext, n + 2 * ext
        self.msg = torch.zeros(2, 4, n, p, device=dev)
        self.base = torch.zeros(2, n, p, device=dev)
        mmax = max(grid.sizes)
        self.ebuf = torch.zeros(2 * 2 * self.le * mmax + 1, device=dev)   # trailing zero: no sender
        self.zero = self.ebuf.numel() - 1
        self._buf = [torch.empty(k * mmax, device=dev)
                     for k in (2 * n, 4 * n, 4, 4 * n * self.le, 4 * n, 4 * self.le)]
        self.steps: dict = {}
        self.rng = self.base                                          # range term of the last MRF solved

    def step_views(self, planes: slice, forward: bool) -> list:
        key = (planes.start, planes.stop, forward)
        if key in self.steps:
            return self.steps[key]
        g = self.grid
        npl, n, le = planes.stop - planes.start, self.n, self.le
        got, add = (slice(0, 2), slice(2, 4)) if forward else (slice(2, 4), slice(0, 2))
        views = []
        order = range(g.t - 1) if forward else range(g.t - 1, 0, -1)
        for t in order:
            r = t + 1 if forward else t - 1
            m, mr, c, cr = g.sizes[t], g.sizes[r], g.cols[t], g.cols[r]
            gb = self._buf[0][:npl * n * m].view(npl, n, m)
            hh = self._buf[1][:npl * 2 * n * m].view(npl, 2, n, m)
            hmin = self._buf[2][:npl * 2 * m].view(npl, 2, 1, m)
            bg = self._buf[3][:npl * 2 * n * le * m].view(npl, 2, n, le, m)
            e = self.ebuf[:2 * 2 * le * m].view(2, 2, le, m)[planes]
            es = self._buf[5][:npl * 2 * le * m].view(npl, 2, le, m)
            out = self._buf[4][:npl * 2 * n * mr]
            views.append((self.base[planes, :, c], self.msg[planes, got.start, :, c],
                          self.msg[planes, got.start + 1, :, c], self.msg[planes, add, :, c],
                          gb, gb.unsqueeze(1), hh, hmin, hh.unsqueeze(3), bg, e, es,
                          es[:, :, self.ext:self.ext + 1], out, out.view(npl, 2, n, mr),
                          self.msg[planes, got, :, cr], r))
        self.steps[key] = views
        return views


# Workspaces (buffers, views, index maps) are kept per thread between calls:
# the generator pipeline calls sift_flow again and again with the same shapes.
_LOCAL = threading.local()
_CACHE_ENTRIES = 64
# Below this many pairs per worker the per-step costs that every worker pays
# in full outweigh the split (measured: docs/BENCHMARKS.md).
_PAIRS_PER_WORKER = 16


def _thread_cache() -> dict:
    cache = getattr(_LOCAL, "cache", None)
    if cache is None or len(cache) > _CACHE_ENTRIES:
        cache = _LOCAL.cache = {}
    return cache


def _workspace(cache: dict, b: int, h: int, w: int, n: int, ext: int, device) -> _Workspace:
    gkey = ("grid", str(device), b, h, w)
    if gkey not in cache:
        cache[gkey] = _Grid(b, h, w, device)
    key = ("ws", str(device), b, h, w, n, ext)
    if key not in cache:
        cache[key] = _Workspace(cache[gkey], n, ext)
    return cache[key]


def _shift_extension(offsets: Tensor, alpha: float, d: float) -> int:
    """Labels added on each side of the envelope buffer: enough for the
    neighbour offset differences up to ``_SHIFT_IN_BROADCAST``."""
    o = offsets
    big = 0
    if o.shape[-1] > 1:
        big = max(big, int((o[..., 1:] - o[..., :-1]).abs().max()))
    if o.shape[-2] > 1:
        big = max(big, int((o[..., 1:, :] - o[..., :-1, :]).abs().max()))
    ext = min(big, _SHIFT_IN_BROADCAST)
    if alpha > 0:
        ext = min(ext, int(math.ceil(d / alpha)))                     # beyond this the message is d
    return ext


def _senders(g: _Grid, forward: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Sender column of each receiver column, per slot [2, P], whether it
    exists, and its position within its diagonal's block. Forward: slot 0 <- right-going message of (x - 1, y), slot 1 <-
    down-going message of (x, y - 1); backward: slot 2 <- up-going message of
    (x, y + 1), slot 3 <- left-going message of (x + 1, y)."""
    key = ("senders", forward)
    if key not in g.cache:
        pix = g.pix_of_col
        b, rest = pix // (g.h * g.w), pix % (g.h * g.w)
        y, x = rest // g.w, rest % g.w
        step = -1 if forward else 1
        src, valid = [], []
        for dy, dx in ([(0, step), (step, 0)] if forward else [(step, 0), (0, step)]):
            ys, xs = y + dy, x + dx
            valid.append((ys >= 0) & (ys < g.h) & (xs >= 0) & (xs < g.w))
            src.append(g.col_of_pix[(b * g.h + ys.clamp(0, g.h - 1)) * g.w + xs.clamp(0, g.w - 1)])
        src = torch.stack(src)
        g.cache[key] = (src, torch.stack(valid), src - g.first_col[g.diag_of_col[src]])
    return g.cache[key]


def _message_tables(ws: _Workspace, off: Tensor, forward: bool, alpha: float) -> list:
    """Gather tables that move one step's envelopes to their receivers.

    For every receiver (plane, slot, label j, column) of a diagonal: the
    position in the sender step's envelope buffer ``[2 planes, 2, Le, B n_s]``
    of the sender's value at the receiver's absolute label (j + own offset -
    sender offset), or the buffer's trailing zero where there is no sender
    (image border). Shifts beyond the extended envelope read its last entry
    plus ``alpha`` per extra label (``pen``). ``off``: packed offsets [2, P].
    Returns, per receiving diagonal, None or {planes: (flat index, flat pen or
    None)} for planes (0, 2), (0, 1) and (1, 2).
    """
    g, n, le, ext = ws.grid, ws.n, ws.le, ws.ext
    dev = g.device
    src, valid, local, sender_size, const, feed = _table_constants(g, forward, n, le, ext, ws.zero)
    delta = (off[:, None, :] - off[:, src]) * valid                   # [2 planes, 2 slots, P]
    # Within the extension a shift only moves the read position: index = constant + delta * n_s.
    idx = const + (delta * sender_size).view(-1).index_select(0, feed)
    has_pen, pen = [False] * g.t, None
    far = delta.abs() > ext
    if bool(far.any()):
        # Rare far shifts: clamp to the extended envelope and add alpha per label beyond it.
        row, col = far.view(4, -1).nonzero(as_tuple=True)
        j = torch.arange(n, device=dev)
        i = ext + j + delta.view(4, -1)[row, col][:, None]            # [F, L]
        ic = i.clamp(0, le - 1)
        t = g.diag_of_col[col]
        size, first = g.size_of_diag[t][:, None], g.first_col[t][:, None]
        pos = 4 * n * first + (row[:, None] * n + j) * size + (col[:, None] - first)
        idx[pos] = (row[:, None] * le + ic) * sender_size[col][:, None] + local.view(-1)[
            (row % 2) * g.p + col][:, None]
        pen = torch.zeros(idx.shape, device=dev)
        pen[pos] = alpha * (i - ic).abs().float()
        for r in set(t.tolist()):
            has_pen[r] = True
    tables, start = [], 0
    for r in range(g.t):
        size = 4 * n * g.sizes[r]
        s = r - 1 if forward else r + 1
        if 0 <= s < g.t:
            blk = idx[start:start + size].view(2, -1)
            pb = pen[start:start + size].view(2, -1) if has_pen[r] else None
            tables.append({(0, 2): (blk.view(-1), None if pb is None else pb.view(-1)),
                           (0, 1): (blk[0], None if pb is None else pb[0]),
                           (1, 2): (blk[1], None if pb is None else pb[1])})
        else:
            tables.append(None)
        start += size
    return tables


def _table_constants(g: _Grid, forward: bool, n: int, le: int, ext: int, zero: int) -> tuple:
    """Offset-independent parts of :func:`_message_tables`, per grid and layout:
    senders, validity, sender columns, sender block sizes, the block-major index
    for zero shifts and, per block-major position, its [plane, slot, column]."""
    key = ("tables", forward, n, le, ext, zero)
    if key not in g.cache:
        src, valid, local = _senders(g, forward)
        # Every receiver of diagonal t hears from diagonal t - 1 (forward) or t + 1 (backward).
        size = g.size_of_diag[(g.diag_of_col + (-1 if forward else 1)).clamp(0, g.t - 1)]
        rows = torch.arange(4, device=g.device).view(4, 1, 1)       # (plane, slot) lanes of the buffer
        j = torch.arange(n, device=g.device).view(1, n, 1)
        const = (rows * le + ext + j) * size + local.repeat(2, 1)[:, None]
        const.masked_fill_(~valid.repeat(2, 1)[:, None], zero)
        perm = _blocks(g, 4 * n)
        feed = (rows * g.p + torch.arange(g.p, device=g.device)).expand(4, n, g.p)
        g.cache[key] = (src, valid, local, size, const.view(-1).index_select(0, perm),
                        feed.reshape(-1).index_select(0, perm))
    return g.cache[key]


def _blocks(g: _Grid, rows: int) -> Tensor:
    """Permutation taking a flattened ``[rows, P]`` tensor to the concatenation
    of its diagonal blocks ``[rows, cols[t]]``, t = 0, 1, ... (each contiguous)."""
    key = ("blocks", rows)
    if key not in g.cache:
        r = torch.arange(rows).view(rows, 1) * g.p
        g.cache[key] = torch.cat([(r + torch.arange(c.start, c.stop)).reshape(-1)
                                  for c in g.cols]).to(g.device)
    return g.cache[key]


def _sweeps(mrf: _Mrf, iters: int, alpha: float, d: float, cache: dict,
            init: tuple[_Grid, Tensor, Tensor] | None) -> _Workspace:
    """``iters`` iterations of BPFlow's BP_S on one MRF (see the module docstring).

    Messages are normalised differently from BPFlow (a spatial message by the
    sender's truncated envelope at its first label, or by the sender's minimum
    where a far shift needs the truncation level; a dual message by its
    minimum), which changes each message by a constant and so no belief's
    argmin. Iterations ``i, i + 1`` with ``i % 8 == 4`` or ``6`` send no dual
    messages, so their two planes are independent and are swept together.

    Returns the workspace holding the final messages (``msg``; ``base`` =
    range term + dual messages).
    """
    data, w = mrf.data, mrf.w
    b, h, wd, n, _ = data.shape
    dev = data.device
    ext = _shift_extension(mrf.offsets, alpha, d)
    ws = _workspace(cache, b, h, wd, n, ext, dev)
    g = ws.grid
    off = g.pack(mrf.offsets.transpose(0, 1))                         # [2, P]
    r = torch.arange(-w, w + 1, device=dev).view(1, n, 1)
    rng = mrf.gamma * (off[:, None] + r).abs().float()                # [2, L, P]
    cost = data.view(-1, n * n).index_select(0, g.pix_of_col).t().contiguous().view(n, n, -1)  # [L(v), L(u), P]
    if init is None:
        ws.msg.zero_()
        dual = torch.zeros(2, n, g.p, device=dev)
    else:
        coarse, cmsg, cdual = init
        parent = g.children_of(coarse)
        torch.index_select(cmsg, 3, parent, out=ws.msg)
        dual = cdual.index_select(2, parent)
    torch.add(rng, dual, out=ws.base)
    le = ws.le
    kk = torch.arange(n, device=dev).view(n, 1)
    ii = torch.arange(le, device=dev).view(1, le) - ext
    v = (alpha * (kk - ii).abs().float()).clamp(max=d).view(n, le, 1)
    tables = {}
    it = 0
    while it < iters:
        k, forward, dual_update = it % 2, it % 4 < 2, it % 8 < 4
        planes = slice(0, 2) if (not dual_update and k == 0 and it + 1 < iters) else slice(k, k + 1)
        if forward not in tables:
            tables[forward] = _message_tables(ws, off, forward, alpha)
        table, pk = tables[forward], (planes.start, planes.stop)
        ebuf = ws.ebuf
        for base, got0, got1, add, gb, gb1, hh, hmin, hh4, bg, e, es, es0, outf, outv, dest, rcv in ws.step_views(
                planes, forward):
            idx, pen = table[rcv][pk]
            torch.add(base, got0, out=gb)
            gb.add_(got1)
            torch.add(gb1, add, out=hh)
            if pen is None:
                # Envelope, truncated at min + d; then any per-message constant keeps the
                # values bounded: the envelope at the sender's label 0.
                torch.add(hh4, v, out=bg)
                torch.amin(bg, 2, out=es)
                torch.sub(es, es0, out=e)
                torch.index_select(ebuf, 0, idx, out=outf)
            else:
                # Far-shifted windows read the envelope's last entry plus alpha per label,
                # truncated at d above the sender's minimum, so normalise by that minimum.
                torch.amin(hh, 2, keepdim=True, out=hmin)
                hh.sub_(hmin)
                torch.add(hh4, v, out=bg)
                torch.amin(bg, 2, out=e)
                torch.index_select(ebuf, 0, idx, out=outf)
                outf.add_(pen)
                outf.clamp_(max=d)
            dest.copy_(outv)
        if dual_update and planes.stop - planes.start == 1:
            incoming = rng[k] + ws.msg[k].sum(0)                       # everything but the data factor
            new = (cost + incoming[None]).amin(1) if k == 0 else (cost + incoming[:, None]).amin(0)
            torch.sub(new, new.amin(0, keepdim=True), out=dual[1 - k])
            torch.add(rng[1 - k], dual[1 - k], out=ws.base[1 - k])
        it += planes.stop - planes.start
    ws.rng = rng
    return ws


def _solve(mrf: _Mrf, iters: int, hierarchy: int, alpha: float, d: float, cache: dict) -> _Workspace:
    """BPFlow's MessagePassing: coarsened MRFs first (their messages start
    this one's), then ``iters`` iterations. Returns the workspace with the
    final messages."""
    init = None
    if hierarchy > 0 and max(mrf.data.shape[1:3]) > 1:
        ws = _solve(mrf.coarser(), HIERARCHY_ITERS, hierarchy - 1, alpha, d, cache)
        init = (ws.grid, ws.msg, ws.base - ws.rng)
    return _sweeps(mrf, iters, alpha, d, cache, init)


def _labels(ws: _Workspace) -> Tensor:
    """Window labels (iu, iv) from each plane's belief, [B, 2, H, W] long."""
    belief = ws.base + ws.msg.sum(1)                                  # [2, L, P]
    return ws.grid.unpack(belief.argmin(1)).transpose(0, 1)


def _sift_flow_serial(f1: Tensor, f2: Tensor, alpha: float, d: float, gamma: float, nlev: int,
                      wsize: int, top_wsize: int, top_iters: int, iters: int,
                      data_trunc: float | None) -> Tensor:
    """SIFTflowc2f on one chunk of the batch (see the module docstring)."""
    # Channels-last: the data term gathers whole feature vectors.
    pyr1 = [f1.permute(0, 2, 3, 1).float().contiguous()]
    pyr2 = [f2.permute(0, 2, 3, 1).float().contiguous()]
    for _ in range(nlev - 1):
        pyr1.append(_downsample(pyr1[-1]))
        pyr2.append(_downsample(pyr2[-1]))
    flow, ref_prev, cache = None, None, _thread_cache()
    for lev in range(nlev - 1, -1, -1):
        g1, g2 = pyr1[lev], pyr2[lev]
        b, h, w, _ = g1.shape
        ref = _size_ratio_offsets(h, w, *g2.shape[1:3], g1.device)
        if flow is None:
            offsets = ref.expand(b, 2, h, w)
            win, nit, hierarchy = top_wsize, top_iters, 2
        else:
            up = _upsample_flow(flow - ref_prev, h, w)
            offsets = _round_half_away(ref + 2 * up)
            win, nit, hierarchy = wsize + lev, iters, nlev - 1 - lev
        offsets = offsets.long()
        cost, inside = _data_cost(g1, g2, offsets[:, 0], offsets[:, 1], win, data_trunc)
        mrf = _Mrf(_fill_outside(cost, inside), offsets, win, gamma * 2 ** lev)
        labels = _labels(_solve(mrf, nit, hierarchy, alpha, d, cache))
        flow = (offsets + labels - win).double()
        ref_prev = ref
    return flow.float()


def sift_flow(f1: Tensor, f2: Tensor, alpha=2 * 255, d=40 * 255, gamma=0.005 * 255, levels=4,
              wsize=2, top_wsize=10, top_iters=60, iters=30, *, data_trunc=None,
              workers: int | None = None) -> Tensor:
    """SIFT Flow (Liu et al., TPAMI 2011, eq. 3, §3) between CNN feature maps,
    as used for the per-layer feature flows of the generators paper §2.1.3.

    Args:
        f1, f2: float [B, C, H, W] (f2 may have another H, W), scaled by the
            caller; the default weights assume values in about [0, 255].
        alpha, d: truncated-L1 smoothness weight and truncation.
        gamma: weight of the small-displacement term |u| + |v|.
        levels: pyramid levels (fewer when the maps are small, see
            :func:`pyramid_levels`).
        wsize, iters: half-window (widened by one per level above the finest)
            and BP iterations of the levels below the top.
        top_wsize, top_iters: half-window and BP iterations of the top level.
        data_trunc: keyword-only truncation ``t`` of the L1 data term.
        workers: keyword-only; CPU processes the batch is split over, this
            one and ``workers - 1`` helpers (default: ``torch.get_num_threads()``,
            so 1 under DDP and in DataLoader workers; at most one per 16 pairs,
            since each worker pays the per-step costs in full). CUDA inputs
            always run as one batch.

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
    if workers is not None and (int(workers) != workers or workers < 1):
        raise ValueError(f"sift_flow: workers must be a positive integer or None, got {workers}")
    nlev = pyramid_levels(tuple(f1.shape[-2:]), tuple(f2.shape[-2:]), int(levels))
    args = (float(alpha), float(d), float(gamma), nlev, int(wsize), int(top_wsize), int(top_iters),
            int(iters), None if data_trunc is None else float(data_trunc))
    b = f1.shape[0]
    if b == 0:
        return torch.zeros(0, 2, *f1.shape[-2:], device=f1.device)
    n = 1 if f1.device.type != "cpu" else max(1, min(int(workers or torch.get_num_threads()),
                                                       b // _PAIRS_PER_WORKER))
    with torch.no_grad():
        if n <= 1:
            return _sift_flow_serial(f1.detach(), f2.detach(), *args)
        from topdown.parallel import map_split

        bounds = [round(i * b / n) for i in range(n + 1)]
        chunks = [(f1[i:j].detach().float(), f2[i:j].detach().float()) for i, j in zip(bounds, bounds[1:])]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # like the helpers: BP's small ops do not split over threads
        try:
            out = map_split(_sift_flow_serial, chunks, args)
        finally:
            torch.set_num_threads(threads)
    return torch.cat(out)


def flow_energy(f1: Tensor, f2: Tensor, flow: Tensor, alpha=2 * 255, d=40 * 255,
                gamma=0.005 * 255, *, data_trunc=None, outside_cost=None) -> Tensor:
    """SIFT Flow energy (TPAMI 2011, eq. 3) of an integer ``flow`` [B, 2, H, W]
    at full resolution (``flow`` is rounded). Returns float64 [B].

    A match outside f2 costs ``outside_cost`` (keyword-only: a number or a [B]
    tensor); by default the reference comparison's rule, after the original
    solver's: the median over grid points of the zero-flow L1 distance
    |f1(p) - f2(p)| (points whose zero-flow match lies in f2), truncated at
    ``data_trunc`` like every data cost.
    """
    _check_pair(f1, f2, "flow_energy")
    _check_weights(alpha, d, gamma, data_trunc, "flow_energy")
    b, c, h, w = f1.shape
    h2, w2 = f2.shape[-2:]
    if not isinstance(flow, Tensor) or flow.dim() != 4 or tuple(flow.shape) != (b, 2, h, w):
        got = tuple(flow.shape) if isinstance(flow, Tensor) else type(flow).__name__
        raise ValueError(f"flow_energy: flow must be [{b}, 2, {h}, {w}], got {got}")
    if not torch.isfinite(flow).all():
        raise ValueError("flow_energy: flow contains NaN or inf")
    f1d, f2d = f1.double(), f2.double()
    fl = torch.round(flow.to(f1.device)).long()
    x = torch.arange(w, device=f1.device).view(1, 1, w) + fl[:, 0]
    y = torch.arange(h, device=f1.device).view(1, h, 1) + fl[:, 1]
    inside = (x >= 0) & (x < w2) & (y >= 0) & (y < h2)
    idx = (y.clamp(0, h2 - 1) * w2 + x.clamp(0, w2 - 1)).view(b, 1, h * w).expand(b, c, h * w)
    match = torch.gather(f2d.flatten(2), 2, idx).view(b, c, h, w)
    data = (f1d - match).abs().sum(1)
    if data_trunc is not None:
        data = data.clamp(max=float(data_trunc))
    if outside_cost is None:
        hh, ww = min(h, h2), min(w, w2)
        zero = (f1d[..., :hh, :ww] - f2d[..., :hh, :ww]).abs().sum(1).flatten(1)
        if data_trunc is not None:
            zero = zero.clamp(max=float(data_trunc))
        outside_cost = zero.quantile(0.5, dim=1)
    out = torch.as_tensor(outside_cost, dtype=torch.float64, device=f1.device).expand(b)
    data = torch.where(inside, data, out.view(b, 1, 1))
    fd = fl.double()
    small = gamma * fd.abs().sum(1)
    smooth = (alpha * (fd[:, :, :, 1:] - fd[:, :, :, :-1]).abs()).clamp(max=d).sum((1, 2, 3)) \
        + (alpha * (fd[:, :, 1:] - fd[:, :, :-1]).abs()).clamp(max=d).sum((1, 2, 3))
    return data.sum((1, 2)) + small.sum((1, 2)) + smooth
