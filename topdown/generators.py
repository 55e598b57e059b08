"""Learned generators of feature flows (Gallagher et al. 2015, §2.1.3-§3.1, Fig. A2).

Pipeline, per transformation kind (rotation, scale, translation_x, translation_y):

1. Feature flows ``V_{j,:}`` between the AlexNet conv1..conv5 features of a pair
   ``(I[t], I[t+Δ])`` (§2.1.3), computed by :func:`topdown.flows.sift_flow`.
2. PCA of the base-amount flows (10° for rotation): mean ``M`` and the top
   ``U_1..U_10`` (§2.1.4), from streaming sufficient statistics
   (:class:`PCAStats`).
3. Least squares ``min_w ½‖U w - V‖²`` over all amounts (eq. 1-2) from streaming
   normal equations (:class:`RegressionStats`).
4. The generator ``G[Δ] = U[Δ]·w`` for any amount (§3.1), held by a
   :class:`GeneratorBank`, applied to features by :func:`warp_features`.

Flow vector layout (the 8,522-vector of footnote 1 at 224x224): layers in the
order conv1, conv2, conv3, conv4, conv5; within a layer its field
``[2, H_l, W_l]`` flattened row-major, i.e. all ``u`` (x, columns) values then
all ``v`` (y, rows) values: ``2·55² + 2·27² + 3·2·13² = 8,522``.

Flow convention (shared with :mod:`topdown.flows`): ``f2`` at ``(x+u, y+v)``
matches ``f1`` at ``(x, y)``, in that layer's pixel units.

Amount units (the regression variable ``a`` of eq. 1; the paper uses Δθ/10 for
rotation): rotation ``a = Δ/10°``; translation ``a = Δ/10 px`` (output pixels of
the rendered image, positive = right/down); scale ``a = ln(Δ)/ln(1.1)`` (so a
1.1x zoom is one unit, 1.3x is 2.75, 0.75x is -3.02; the log makes zooming in
and out symmetric).

Basis ``U[Δ]`` (eq. 1): the paper's text is garbled at the column definition;
we read each of the 11 groups as a quadratic in ``a``:
``[B, a·B, a²·B]`` for ``B`` in ``(M, U_1, ..., U_10)``, so column ``3i+k`` is
``a^k·B_i`` and ``w = (a_M, b_M, c_M, ..., a_U10, b_U10, c_U10)``.

Both signs. The reversed pair ``(I[t∘Δ], I[t])`` is a pair of amount
:func:`inverse_amount` ``(Δ)`` (``-Δ``; ``1/s`` for scale), so its normalised
amount is ``-a`` in every kind (``ln(1/s) = -ln s``). The regression is fitted
over both signs; the PCA basis comes from the forward base-amount flows only
(the paper's ``M``, ``U_i`` of the +10° flows, Fig. 2). No basis of the other
sign is needed: ``G[a] = g_0 + a·g_1 + a²·g_2`` with ``g_k = Σ_i w_{3i+k} B_i``,
and the odd term ``a·g_1`` flips with the sign while the even terms ``g_0``
(a flow at zero amount: the matcher's bias) and ``a²·g_2`` (e.g. the ``cos θ - 1``
radial part of a rotation's displacement ``(R_θ - I)x``) do not; a reversed
flow is close to ``-V``, which lies in the span of the same ``B_i``. Fitted on one
sign only, the three coefficients per group are not identified for the other
sign, and ``G[-30°]`` extrapolates the quadratic.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

PAPER_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
# Regression variable per kind: ("linear", unit) gives a = Δ/unit, ("log", base) gives a = ln Δ / ln base.
AMOUNT_UNITS: dict[str, tuple[str, float]] = {
    "rotation": ("linear", 10.0),
    "scale": ("log", 1.1),
    "translation_x": ("linear", 10.0),
    "translation_y": ("linear", 10.0),
}
BANK_FORMAT = "topdown.generator_bank"
BANK_VERSION = 1


def normalized_amount(kind: str, amount: float | torch.Tensor) -> float | torch.Tensor:
    """The regression variable ``a`` of eq. 1 for an amount in natural units (see module docstring)."""
    if kind not in AMOUNT_UNITS:
        raise ValueError(f"unknown transform kind {kind!r}; choose from {tuple(AMOUNT_UNITS)}")
    mode, unit = AMOUNT_UNITS[kind]
    if mode == "linear":
        return amount / unit
    if isinstance(amount, torch.Tensor):
        if (amount <= 0).any():
            raise ValueError(f"{kind} amounts must be positive factors")
        return torch.log(amount) / math.log(unit)
    if amount <= 0:
        raise ValueError(f"{kind} amount must be a positive factor, got {amount}")
    return math.log(amount) / math.log(unit)


def natural_amount(kind: str, a: float | torch.Tensor) -> float | torch.Tensor:
    """Inverse of :func:`normalized_amount`: the amount in natural units (degrees, factor, pixels) of ``a``."""
    if kind not in AMOUNT_UNITS:
        raise ValueError(f"unknown transform kind {kind!r}; choose from {tuple(AMOUNT_UNITS)}")
    mode, unit = AMOUNT_UNITS[kind]
    if mode == "linear":
        return a * unit
    return unit ** a if isinstance(a, torch.Tensor) else math.exp(a * math.log(unit))


def inverse_amount(kind: str, amount: float) -> float:
    """The amount of the reversed pair ``(I[t∘Δ], I[t])``: ``-Δ``, or ``1/Δ`` for scale (a factor)."""
    if kind not in AMOUNT_UNITS:
        raise ValueError(f"unknown transform kind {kind!r}; choose from {tuple(AMOUNT_UNITS)}")
    if AMOUNT_UNITS[kind][0] == "log":
        if amount <= 0:
            raise ValueError(f"{kind} amount must be a positive factor, got {amount}")
        return 1.0 / amount
    return -amount


def phase_schedule(kinds: Sequence[str]) -> list[tuple[str, str]]:
    """Epoch plan of a fit: for each kind a PCA pass (base amount) then a regression pass (all amounts)."""
    return [(k, phase) for k in kinds for phase in ("pca", "regression")]


# --------------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class FlowLayout:
    """Layer names and map sizes of the flattened flow vector (footnote 1)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if len(self.names) != len(self.shapes):
            raise ValueError(f"FlowLayout: {len(self.names)} names but {len(self.shapes)} shapes")

    @property
    def sizes(self) -> list[int]:
        return [2 * h * w for h, w in self.shapes]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def flatten(self, flows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{layer: [B, 2, H, W]}`` -> ``[B, D]`` in layer order, u block then v block per layer."""
        parts = []
        for name, (h, w) in zip(self.names, self.shapes):
            if name not in flows:
                raise KeyError(f"flow for layer {name!r} missing; have {sorted(flows)}")
            f = flows[name]
            if tuple(f.shape[-3:]) != (2, h, w):
                raise ValueError(f"flow for layer {name!r} has shape {tuple(f.shape)}, expected [B, 2, {h}, {w}]")
            parts.append(f.reshape(f.shape[0], -1))
        return torch.cat(parts, dim=1)

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """``[D]`` -> ``{layer: [2, H, W]}``; ``[B, D]`` -> ``{layer: [B, 2, H, W]}``."""
        if vec.shape[-1] != self.dim:
            raise ValueError(f"flow vector has {vec.shape[-1]} values, layout {self.names} needs {self.dim}")
        out, chunks = {}, torch.split(vec, self.sizes, dim=-1)
        for name, (h, w), c in zip(self.names, self.shapes, chunks):
            out[name] = c.reshape(*vec.shape[:-1], 2, h, w)
        return out


# --------------------------------------------------------------------------------------------------- PCA


def _sum_tensor(t: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    return t if reduce is None else reduce(t)


@dataclass
class PCAStats:
    """Sufficient statistics of the flow PCA (§2.1.4): count, Σv and Σvvᵀ in float64.

    Every field is a plain tensor that sums across batches and DDP ranks, so
    :meth:`merge` and :meth:`all_reduce` are elementwise sums. At D = 8,522 the
    outer-product sum is 8,522² doubles (580 MB); we keep it rather than the
    rows (the Gram trick) because it all-reduces by a plain sum whatever the
    number of pairs per rank.
    """

    count: torch.Tensor
    sum: torch.Tensor
    outer: torch.Tensor

    @classmethod
    def zeros(cls, dim: int) -> "PCAStats":
        z = dict(dtype=torch.float64)
        return cls(torch.zeros((), **z), torch.zeros(dim, **z), torch.zeros(dim, dim, **z))

    def update(self, flows: torch.Tensor) -> "PCAStats":
        """Add rows ``flows [N, D]`` in place."""
        v = flows.detach().to(device=self.sum.device, dtype=torch.float64)
        if v.dim() != 2 or v.shape[1] != self.sum.numel():
            raise ValueError(f"PCAStats.update expects [N, {self.sum.numel()}] flows, got {tuple(flows.shape)}")
        self.count += v.shape[0]
        self.sum += v.sum(0)
        self.outer.addmm_(v.T, v)
        return self

    def merge(self, other: "PCAStats") -> "PCAStats":
        return PCAStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> "PCAStats":
        """Sum every field with ``reduce`` (e.g. a DDP all-reduce); ``None`` leaves them as they are."""
        return PCAStats(*(_sum_tensor(getattr(self, f.name), reduce) for f in fields(self)))

    def mean(self) -> torch.Tensor:
        if self.count <= 0:
            raise ValueError("PCAStats: no flows were accumulated")
        return self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """Population covariance Σ(v-M)(v-M)ᵀ/n."""
        m = self.mean()
        return self.outer / self.count - torch.outer(m, m)

    def components(self, k: int = 10, exact_below: int = 3000, iters: int = 60, seed: int = 0,
                   on_rank: str = "drop", rtol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean ``M`` [D], top-``k`` principal directions ``U`` [D, k'] and their variances [k'].

        ``torch.linalg.eigh`` when D < ``exact_below``; otherwise subspace iteration
        with a Rayleigh-Ritz step on a block of ``k + 10`` vectors (the exact
        eigendecomposition of an 8,522² matrix costs minutes on a CPU). Signs are
        fixed so each direction's largest-magnitude entry is positive.

        Rank check: ``n`` centred flows span at most ``n - 1`` directions, and a
        direction whose variance is below ``rtol`` times the largest is numerically
        null; components beyond that rank are arbitrary. ``on_rank="drop"`` keeps
        ``k' = rank`` of them and warns how many were dropped; ``"error"`` raises.
        """
        if on_rank not in ("drop", "error"):
            raise ValueError(f"on_rank must be 'drop' or 'error', got {on_rank!r}")
        cov = self.covariance()
        d = cov.shape[0]
        k = min(k, d)
        if d < exact_below:
            vals, vecs = torch.linalg.eigh(cov)
            vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
        else:
            vals, vecs = _subspace_top(cov, k, iters=iters, seed=seed)
        n = int(self.count)
        top = float(vals.max()) if vals.numel() else 0.0
        rank = min(k, max(n - 1, 0), int((vals > rtol * top).sum()) if top > 0 else 0)
        if rank < k:
            msg = (f"PCA of {n} flows has rank {rank}, fewer than the {k} components asked for: "
                   f"the {k - rank} beyond the rank are arbitrary")
            if on_rank == "error":
                raise ValueError(msg + "; use more pairs or fewer components (num_components)")
            warnings.warn(msg + f"; keeping {rank}, dropping {k - rank}", stacklevel=2)
            vals, vecs = vals[:rank], vecs[:, :rank]
        idx = vecs.abs().argmax(0)
        signs = torch.sign(vecs[idx, torch.arange(vecs.shape[1])])
        signs[signs == 0] = 1
        return self.mean(), vecs * signs, vals.clamp_min(0)


def _subspace_top(sym: torch.Tensor, k: int, iters: int, seed: int, tol: float = 1e-9
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of a symmetric PSD matrix by block subspace iteration.

    One ``D x D`` by ``D x (k+10)`` product per iteration serves both the
    Rayleigh-Ritz step (``qᵀ(Sq)``) and the next block (``qr(Sq)``); stops when
    the top-``k`` Ritz values change by less than ``tol`` (relative).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    block = min(sym.shape[0], k + 10)
    q, _ = torch.linalg.qr(torch.randn(sym.shape[0], block, generator=gen, dtype=sym.dtype).to(sym.device))
    prev = None
    for _ in range(iters):
        z = sym @ q
        vals, rot = torch.linalg.eigh(q.T @ z)
        top = vals.flip(0)[:k]
        if prev is not None and ((top - prev).abs() <= tol * top[0].abs().clamp_min(1e-300)).all():
            break
        prev = top
        q, _ = torch.linalg.qr(z)
    else:  # not converged: Ritz pairs of the last block
        vals, rot = torch.linalg.eigh(q.T @ (sym @ q))
    vecs = q @ rot
    return vals.flip(0)[:k], vecs.flip(1)[:, :k]


# --------------------------------------------------------------------------------------------------- regression


def amount_powers(a: torch.Tensor, degree: int = 3) -> torch.Tensor:
    """``[N] -> [N, degree]``: ``(1, a, a², ...)``, the per-group multipliers of eq. 1."""
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    return torch.stack([a**k for k in range(degree)], dim=1)


def basis_matrix(basis: torch.Tensor, a: float, degree: int = 3) -> torch.Tensor:
    """``U[Δ]`` of eq. 1: [D, degree·(K+1)] with column ``degree·i + k`` equal to ``a^k · basis[:, i]``.

    ``basis`` [D, K+1] holds ``(M, U_1, ..., U_K)`` as columns; ``a`` is the
    normalised amount (:func:`normalized_amount`).
    """
    q = amount_powers(torch.tensor([float(a)]), degree)[0].to(basis)
    return (basis[:, :, None] * q[None, None, :]).reshape(basis.shape[0], -1)


@dataclass
class RegressionStats:
    """Streaming normal equations of eq. 2 for a fixed basis ``B = (M, U_1..U_K)``.

    With ``U[a] = B ⊗ q(a)ᵀ`` (``q = (1, a, a²)``), ``U[a]ᵀU[a] = (BᵀB) ⊗ q qᵀ``
    depends on the pair only through ``a``, so ``A = (BᵀB) ⊗ Σ q qᵀ`` needs just
    the 3x3 ``qq``; ``b = Σ U[a]ᵀ V = Σ (BᵀV) ⊗ q`` needs one [N, K+1] product
    per batch. ``vv = Σ‖V‖²`` gives the residual. All fields sum across batches
    and ranks (:meth:`merge`, :meth:`all_reduce`); everything is float64.
    """

    count: torch.Tensor
    qq: torch.Tensor
    b: torch.Tensor
    vv: torch.Tensor

    @classmethod
    def zeros(cls, num_basis: int, degree: int = 3) -> "RegressionStats":
        z = dict(dtype=torch.float64)
        return cls(torch.zeros((), **z), torch.zeros(degree, degree, **z), torch.zeros(num_basis * degree, **z),
                   torch.zeros((), **z))

    @property
    def degree(self) -> int:
        return self.qq.shape[0]

    def update(self, flows: torch.Tensor, a: torch.Tensor, basis: torch.Tensor) -> "RegressionStats":
        """Add pairs with flows ``[N, D]`` and normalised amounts ``a [N]`` in place."""
        v = flows.detach().to(dtype=torch.float64, device=self.b.device)
        basis = basis.to(v)
        if v.dim() != 2 or v.shape[1] != basis.shape[0]:
            raise ValueError(f"RegressionStats.update: flows {tuple(flows.shape)} vs basis {tuple(basis.shape)}")
        q = amount_powers(torch.as_tensor(a).detach().cpu(), self.degree).to(v)
        if q.shape[0] != v.shape[0]:
            raise ValueError(f"RegressionStats.update: {v.shape[0]} flows but {q.shape[0]} amounts")
        c = v @ basis  # [N, K+1]: B_iᵀ V_n
        self.count += v.shape[0]
        self.qq += q.T @ q
        self.b += (c[:, :, None] * q[:, None, :]).sum(0).reshape(-1)
        self.vv += (v * v).sum()
        return self

    def merge(self, other: "RegressionStats") -> "RegressionStats":
        return RegressionStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> "RegressionStats":
        return RegressionStats(*(_sum_tensor(getattr(self, f.name), reduce) for f in fields(self)))

    def normal_equations(self, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, b)`` with ``A = Σ U[a]ᵀU[a]`` [33, 33] and ``b = Σ U[a]ᵀV`` [33]."""
        btb = basis.to(torch.float64).T @ basis.to(torch.float64)
        return torch.kron(btb.to(self.qq.device), self.qq), self.b

    def solve(self, basis: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``w_lsq`` of eq. 2 (minimum-norm when ``A`` is singular, e.g. a single amount) and the RMS residual."""
        if self.count <= 0:
            raise ValueError("RegressionStats: no flows were accumulated")
        a_mat, b = self.normal_equations(basis)
        w = torch.linalg.lstsq(a_mat.cpu(), b.cpu()[:, None], driver="gelsd").solution[:, 0]
        # ‖Uw - V‖² = wᵀAw - 2wᵀb + Σ‖V‖², exact for the accumulated normal equations.
        sse = float(w @ a_mat.cpu() @ w - 2 * w @ b.cpu() + self.vv.cpu())
        rms = math.sqrt(max(sse, 0.0) / (float(self.count) * basis.shape[0]))
        return w, rms


# --------------------------------------------------------------------------------------------------- bank

# Amounts (natural units) estimate() searches by default, beside each kind's fitted range.
ESTIMATE_DOMAIN: dict[str, tuple[float, float]] = {"rotation": (-180.0, 180.0), "scale": (0.5, 2.0)}


def _minimise_polynomial_error(g: torch.Tensor, v: torch.Tensor, lo: float, hi: float, newton: int = 3
                               ) -> torch.Tensor:
    """``argmin_{a in [lo, hi]} ‖Σ_k a^k g_k - v_b‖²`` for each row ``v_b`` of ``v`` [B, D]; ``g`` [P, D].

    ``f(a) = Σ_jk a^(j+k) <g_j, g_k> - 2 Σ_k a^k <g_k, v_b> + ‖v_b‖²``; the candidates are the
    bounds and the real roots of ``f'`` inside them.
    """
    p = g.shape[0]
    gram, c = g @ g.T, v @ g.T  # [P, P], [B, P]
    b = v.shape[0]
    # f(a) = Σ_m coef[:, m] a^m, m = 0..2(P-1)
    coef = torch.zeros(b, 2 * p - 1, dtype=torch.float64)
    for j in range(p):
        for k in range(p):
            coef[:, j + k] += gram[j, k]
        coef[:, j] -= 2 * c[:, j]
    deriv = coef[:, 1:] * torch.arange(1, 2 * p - 1, dtype=torch.float64)  # f'(a), degree 2P-3
    scale = deriv.abs().max().clamp_min(1e-300)
    # The leading coefficients come from the Gram matrix alone, so a vanishing one vanishes for every row.
    top = deriv.shape[1] - 1
    while top > 0 and float(deriv[:, top].abs().max()) <= 1e-13 * float(scale):
        top -= 1
    cands = [torch.full((b, 1), lo, dtype=torch.float64), torch.full((b, 1), hi, dtype=torch.float64)]
    if top >= 1:
        lead = deriv[:, top:top + 1]
        comp = torch.zeros(b, top, top, dtype=torch.float64)
        comp[:, 0, :] = -deriv[:, :top].flip(1) / lead
        if top > 1:
            comp[:, 1:, :-1] = torch.eye(top - 1, dtype=torch.float64)
        roots = torch.linalg.eigvals(comp)
        real = roots.real
        ok = roots.imag.abs() <= 1e-6 * (1 + real.abs())
        dd = deriv[:, 1:top + 1] * torch.arange(1, top + 1, dtype=torch.float64)  # f''(a)
        for _ in range(newton):  # polish the eigenvalue roots on f' itself
            num = _polyval(deriv[:, :top + 1], real)
            den = _polyval(dd, real)
            step = torch.where(den.abs() > 0, num / den.where(den.abs() > 0, torch.ones_like(den)), torch.zeros_like(num))
            real = torch.where(ok, real - step, real)
        real = torch.where(ok, real.clamp(lo, hi), torch.full_like(real, lo))
        cands.append(real)
    cands = torch.cat(cands, dim=1)
    best = _polyval(coef, cands).argmin(dim=1)
    return cands.gather(1, best[:, None])[:, 0]


def _polyval(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Σ_m coef[:, m] x^m`` for ``coef`` [B, M] and ``x`` [B, N] (Horner)."""
    out = torch.zeros_like(x)
    for m in range(coef.shape[1] - 1, -1, -1):
        out = out * x + coef[:, m:m + 1]
    return out



@dataclass
class GeneratorModel:
    """One kind's learned generator: basis ``(M, U_1..U_K)`` [D, K+1] and ``w_lsq`` [degree·(K+1)]."""

    kind: str
    basis: torch.Tensor
    w: torch.Tensor
    degree: int = 3
    base_amount: float | None = None
    info: dict | None = None

    def flow_vector(self, amount: float) -> torch.Tensor:
        """``G[Δ] = U[Δ]·w_lsq`` (§3.1) as a [D] vector, for an amount in natural units."""
        a = normalized_amount(self.kind, amount)
        return basis_matrix(self.basis.to(torch.float64), a, self.degree) @ self.w.to(torch.float64)

    def curve(self) -> torch.Tensor:
        """``[degree, D]`` float64 rows ``g_k = Σ_i w_{degree·i+k} B_i``, so that ``G[a] = Σ_k a^k g_k``."""
        w = self.w.to(torch.float64).reshape(-1, self.degree)  # [K+1, degree]
        return (self.basis.to(torch.float64) @ w).T

    @property
    def fitted_range(self) -> tuple[float, float] | None:
        """Smallest and largest amount (natural units) of the regression pairs, when the fit recorded them."""
        r = (self.info or {}).get("amount_range")
        return None if r is None else (float(r[0]), float(r[1]))


class GeneratorBank:
    """Generators of several kinds over one :class:`FlowLayout` (§3.1).

    File format (one ``torch.save`` file, read with ``weights_only=True``)::

        {"format": "topdown.generator_bank", "version": 1,
         "image_size": 224,                           # rendered image side the flows were learned at
         "layers": [[name, H, W], ...],               # conv1..conv5 order of the flow vector
         "kinds": {kind: {"basis": float64 [D, K+1],  # columns M, U_1..U_K
                          "w": float64 [degree·(K+1)],
                          "degree": 3, "base_amount": float | None,
                          "info": {...}}},             # counts, residuals, variances (plain numbers)
         "meta": {...}}                               # backbone, weights, flow settings
    """

    def __init__(self, layout: FlowLayout, image_size: int, meta: dict | None = None):
        self.layout = layout
        self.image_size = int(image_size)
        self.meta = dict(meta or {})
        self.models: dict[str, GeneratorModel] = {}

    @property
    def kinds(self) -> list[str]:
        return list(self.models)

    def add(self, model: GeneratorModel) -> None:
        if model.basis.shape[0] != self.layout.dim:
            raise ValueError(f"{model.kind}: basis has {model.basis.shape[0]} rows, layout needs {self.layout.dim}")
        self.models[model.kind] = model

    def generator(self, kind: str, amount: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Flow field per layer ``{name: [2, H, W]}`` of ``G[amount]`` (§3.1)."""
        if kind not in self.models:
            raise KeyError(f"no generator of kind {kind!r} in the bank; it holds {self.kinds}")
        return self.layout.unflatten(self.models[kind].flow_vector(amount).to(dtype))

    def search_range(self, kind: str) -> tuple[float, float]:
        """Default amounts (natural units) :meth:`estimate` searches: the kind's domain and its fitted range.

        Domain: rotation ±180°, translations ± half the image side, scale 0.5x-2x; so amounts
        beyond the fitted range (e.g. rotations over 60° from a 10-60° fit, §3.2) can be estimated.
        """
        lo, hi = ESTIMATE_DOMAIN[kind] if kind in ESTIMATE_DOMAIN else (-0.5 * self.image_size, 0.5 * self.image_size)
        fitted = self.models[kind].fitted_range if kind in self.models else None
        if fitted is not None:
            lo, hi = min(lo, fitted[0]), max(hi, fitted[1])
        return lo, hi

    def estimate(self, kind: str, flows: torch.Tensor | Mapping[str, torch.Tensor],
                 bounds: tuple[float, float] | None = None) -> torch.Tensor:
        """Zero-shot amount (§3.2): per flow, the Δ whose generator best explains it, ``argmin_Δ ‖G[Δ] - V‖²``.

        ``flows``: ``[B, D]`` in the bank's layout order (:class:`FlowLayout`), or ``{layer: [B, 2, H, W]}``
        as :func:`feature_flows` returns. Returns float32 ``[B]`` in natural units (degrees, scale factor,
        pixels). ``bounds``: the amounts searched (natural units, default :meth:`search_range`).

        With ``G[a] = Σ_k a^k g_k`` (:meth:`GeneratorModel.curve`) the squared error is a polynomial in
        ``a`` (a quartic for the quadratic basis of eq. 1): its minimum over ``[lo, hi]`` is at a real root
        of the derivative (companion-matrix eigenvalues, then Newton steps) or at a bound. A generator's own
        flow ``G[Δ]`` gives error 0 at ``Δ``, and only there when ``g_1`` and ``g_2`` are independent.
        """
        if kind not in self.models:
            raise KeyError(f"no generator of kind {kind!r} in the bank; it holds {self.kinds}")
        if isinstance(flows, Mapping):
            v = self.layout.flatten(flows)
        else:
            v = torch.as_tensor(flows)
            if v.dim() != 2 or v.shape[1] != self.layout.dim:
                raise ValueError(f"estimate: flows must be [B, {self.layout.dim}] ({'/'.join(self.layout.names)} "
                                 f"flattened) or a dict by layer, got shape {tuple(v.shape)}")
        v = v.detach().to(torch.float64).cpu()
        lo, hi = self.search_range(kind) if bounds is None else (float(bounds[0]), float(bounds[1]))
        a_lo, a_hi = (float(normalized_amount(kind, x)) for x in (lo, hi))
        if not a_lo <= a_hi:
            raise ValueError(f"estimate: empty search range {(lo, hi)} for {kind}")
        a = _minimise_polynomial_error(self.models[kind].curve(), v, a_lo, a_hi)
        return natural_amount(kind, a).to(torch.float32)

    def state_dict(self) -> dict:
        return {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "image_size": self.image_size,
            "layers": [[n, h, w] for n, (h, w) in zip(self.layout.names, self.layout.shapes)],
            "kinds": {k: {"basis": m.basis.to(torch.float64).cpu(), "w": m.w.to(torch.float64).cpu(),
                          "degree": m.degree, "base_amount": m.base_amount, "info": dict(m.info or {})}
                      for k, m in self.models.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping, source: str = "state dict") -> "GeneratorBank":
        if not isinstance(state, Mapping) or state.get("format") != BANK_FORMAT:
            raise ValueError(f"{source} is not a generator bank (missing format {BANK_FORMAT!r})")
        if state.get("version") != BANK_VERSION:
            raise ValueError(f"{source}: bank format version {state.get('version')}, this code reads {BANK_VERSION}")
        layout = FlowLayout(tuple(str(n) for n, _, _ in state["layers"]),
                            tuple((int(h), int(w)) for _, h, w in state["layers"]))
        bank = cls(layout, state["image_size"], state.get("meta"))
        for kind, m in state["kinds"].items():
            bank.add(GeneratorModel(kind, m["basis"], m["w"], int(m["degree"]), m.get("base_amount"), m.get("info")))
        return bank

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GeneratorBank":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"generator bank file not found: {path}")
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True), str(path))


# --------------------------------------------------------------------------------------------------- warping

# Applying flows and generator training (§3.3) live in topdown/warp.py; re-exported for existing callers.
from topdown.warp import INVERSES, GeneratorWarp, invert_flow, sample_at, warp_features  # noqa: E402,F401


# --------------------------------------------------------------------------------------------------- features


def scale_for_flow(f1: torch.Tensor, f2: torch.Tensor, quantile: float = 0.99, top: float = 255.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale a pair's feature maps to ~[0, ``top``] for SIFT flow (its costs assume 8-bit-like ranges).

    Per pair, both maps are divided by the ``quantile`` of their joint values
    (a robust max shared by the two, so matching costs compare like with like),
    multiplied by ``top`` and clipped to ``[0, top]``.
    """
    both = torch.cat((f1.flatten(1), f2.flatten(1)), dim=1).float()
    k = max(1, min(both.shape[1], int(round(quantile * both.shape[1]))))
    robust = both.kthvalue(k, dim=1).values.clamp_min(1e-6)
    s = (top / robust).view(-1, *([1] * (f1.dim() - 1)))
    return (f1 * s).clamp(0, top), (f2 * s).clamp(0, top)


def feature_flows(feats1: Mapping[str, torch.Tensor], feats2: Mapping[str, torch.Tensor],
                  flow_fn: Callable | None = None, flow_kwargs: Mapping | None = None, quantile: float = 0.99
                  ) -> dict[str, torch.Tensor]:
    """Per-layer feature flows ``V_{j,l}`` (§2.1.3) from ``feats1`` to ``feats2``, ``{layer: [B, 2, H, W]}``."""
    if flow_fn is None:
        from topdown.flows import sift_flow as flow_fn
    out = {}
    for name, f1 in feats1.items():
        a, b = scale_for_flow(f1, feats2[name], quantile)
        out[name] = flow_fn(a, b, **dict(flow_kwargs or {})).float()
    return out


class ConvFeatures(nn.Module):
    """AlexNet conv1..conv5 (after ReLU) of an image batch, as ``{paper name: [B, C, H, W]}`` (§2.1.2).

    Only ``model.features`` up to the last requested layer is kept.
    ``weights``: a local state-dict or checkpoint file (:func:`topdown.backbones.load_state`: a plain
    state dict, or a Lightning checkpoint whose keys carry a ``net.``/``model.`` prefix);
    ``None`` keeps torchvision's random initialisation drawn from ``init_seed`` alone (not the global
    RNG), so every command without weights (the bank, the zero-shot estimate, the inversion decoders,
    the pictures) sees the same random AlexNet.
    """

    def __init__(self, layers: Sequence[str] = PAPER_LAYERS, weights: str | None = None, arch: str = "alexnet",
                 init_seed: int = 0):
        super().__init__()
        import torchvision

        from topdown.layers import paper_layer_names

        # Built on the meta device: the classifier (58M parameters) is never initialised, only the convs.
        with torch.device("meta"):
            model = torchvision.models.get_model(arch, weights=None)
        model.features.to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            for m in model.features.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.init_seed = init_seed
        names = paper_layer_names(model)
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown} for {arch}; choose from {list(names)}")
        if weights:
            from topdown.backbones import load_state

            state = load_state(weights)
            feats = {k: v for k, v in state.items() if k.startswith("features.")}
            missing = [k for k in model.features.state_dict() if f"features.{k}" not in feats]
            if missing:
                raise ValueError(f"weights file {weights} lacks {arch} tensors features.{missing[0]} (and "
                                 f"{len(missing) - 1} more)")
            model.features.load_state_dict({k.removeprefix("features."): v for k, v in feats.items()})
        self.layers = tuple(layers)
        self.module_of = {n: names[n] for n in layers}
        idx = {n: int(names[n].rsplit(".", 1)[1]) for n in layers}
        self.index_of = {i: n for n, i in idx.items()}
        self.features = model.features[: max(idx.values()) + 1]
        self.pretrained = bool(weights)

    @classmethod
    def for_bank(cls, bank: "GeneratorBank", weights: str | None = None, layers: Sequence[str] | None = None
                 ) -> "ConvFeatures":
        """The AlexNet a bank was fitted with: its ``meta`` weights file (or ``weights``) and random-init seed.

        Passing other ``weights`` than the bank's warns: flows of other features do not match its generators.
        """
        fitted = bank.meta.get("weights")
        if weights is None:
            weights = fitted
        elif fitted != weights:
            warnings.warn(f"the bank was fitted with AlexNet weights {fitted!r}, features now come from "
                          f"{weights!r}: its generators describe other features", stacklevel=2)
        return cls(tuple(layers or bank.layout.names), weights, init_seed=int(bank.meta.get("init_seed", 0)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out, x = {}, images
        for i, m in enumerate(self.features):
            x = m(x)
            if i in self.index_of:
                # ReLU is in place in torchvision's AlexNet: clone so later layers cannot alter it.
                out[self.index_of[i]] = x.clone()
        return {n: out[n] for n in self.layers}

    def layout(self, image_size: int) -> FlowLayout:
        with torch.no_grad():
            feats = self(torch.zeros(1, 3, image_size, image_size))
        return FlowLayout(self.layers, tuple(tuple(f.shape[-2:]) for f in feats.values()))


# --------------------------------------------------------------------------------------------------- evaluation

EVAL_CASES: tuple[tuple[str, str, float], ...] = (
    ("rotate 30", "rotation", 30.0),
    ("rotate -30", "rotation", -30.0),
    ("scale 1.3x", "scale", 1.3),
    ("scale 0.75x", "scale", 0.75),
    ("left 30", "translation_x", -30.0),
    ("up 30", "translation_y", -30.0),
)
EVAL_COLUMNS = ("case", "kind", "amount", "layer", "images", "rms_generator", "mad_generator",
                "rms_no_warp", "mad_no_warp", "rms_negation", "mad_negation")


@dataclass
class WarpErrorStats:
    """Summable error sums of one evaluation case (§3.1, Fig. A2) at one layer.

    ``*_gen``: generator-warped F[0] vs bottom-up F[Δ]; ``*_base``: F[0] vs F[Δ]
    (no warp); ``*_neg``: F[0] warped by G then by -G vs F[0].
    """

    images: torch.Tensor
    n: torch.Tensor
    sq_gen: torch.Tensor
    abs_gen: torch.Tensor
    sq_base: torch.Tensor
    abs_base: torch.Tensor
    sq_neg: torch.Tensor
    abs_neg: torch.Tensor

    @classmethod
    def zeros(cls) -> "WarpErrorStats":
        return cls(*(torch.zeros((), dtype=torch.float64) for _ in fields(cls)))

    def update(self, f0: torch.Tensor, f1: torch.Tensor, flow: torch.Tensor, inverse: str | None = "negate"
               ) -> "WarpErrorStats":
        gen = warp_features(f0, flow, inverse=inverse)
        back = warp_features(gen, -flow, inverse=inverse)
        for name, d in (("gen", gen - f1), ("base", f0 - f1), ("neg", back - f0)):
            d = d.detach().double()
            setattr(self, f"sq_{name}", getattr(self, f"sq_{name}") + (d * d).sum().cpu())
            setattr(self, f"abs_{name}", getattr(self, f"abs_{name}") + d.abs().sum().cpu())
        self.images = self.images + f0.shape[0]
        self.n = self.n + f0.numel()
        return self

    def merge(self, other: "WarpErrorStats") -> "WarpErrorStats":
        return WarpErrorStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> "WarpErrorStats":
        return WarpErrorStats(*(_sum_tensor(getattr(self, f.name), reduce) for f in fields(self)))

    def row(self) -> dict[str, float]:
        n = max(float(self.n), 1.0)
        r = {"images": int(self.images)}
        for name, col in (("gen", "generator"), ("base", "no_warp"), ("neg", "negation")):
            r[f"rms_{col}"] = math.sqrt(float(getattr(self, f"sq_{name}")) / n)
            r[f"mad_{col}"] = float(getattr(self, f"abs_{name}")) / n
        return r


def evaluate_bank(bank: GeneratorBank, extractor: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
                  pairs: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
                  cases: Sequence[tuple[str, str, float]] = EVAL_CASES, layer: str = "conv5",
                  inverse: str | None = "negate") -> list[dict]:
    """RMS / mean absolute deviation of generated vs bottom-up features (§3.1) and of G then -G (Fig. A2).

    ``pairs`` yields ``(case name, I[0] [B, 3, S, S], I[Δ] [B, 3, S, S])``;
    ``extractor`` maps images to ``{layer: features}``. Returns one row per case
    (see :data:`EVAL_COLUMNS`), errors over all elements of ``layer``.
    """
    by_name = {c[0]: c for c in cases}
    stats = {c[0]: WarpErrorStats.zeros() for c in cases}
    for name, img0, img1 in pairs:
        if name not in by_name:
            raise KeyError(f"evaluation case {name!r} unknown; cases: {list(by_name)}")
        _, kind, amount = by_name[name]
        with torch.no_grad():
            f0, f1 = extractor(img0)[layer], extractor(img1)[layer]
        stats[name].update(f0, f1, bank.generator(kind, amount)[layer], inverse)
    return table_rows(stats, cases, layer)


def table_rows(stats: Mapping[str, WarpErrorStats], cases: Sequence[tuple[str, str, float]], layer: str
               ) -> list[dict]:
    rows = []
    for name, kind, amount in cases:
        if name in stats and float(stats[name].images) > 0:
            rows.append({"case": name, "kind": kind, "amount": amount, "layer": layer, **stats[name].row()})
    return rows


def format_table(rows: Sequence[Mapping]) -> str:
    """Fixed-width text table of :func:`evaluate_bank` rows."""
    head = ("case", "images", "rms_generator", "mad_generator", "rms_no_warp", "mad_no_warp", "rms_negation",
            "mad_negation")
    lines = ["  ".join(f"{h:>13}" for h in head)]
    for r in rows:
        lines.append("  ".join(f"{r[h]:>13}" if isinstance(r[h], (str, int)) else f"{r[h]:>13.4f}" for h in head))
    return "\n".join(lines)
