"""Warping feature maps by flows, and generator training (generators paper §3.1, §3.3, Fig. 5, Fig. A2).

* :func:`warp_features` applies a flow (a learned generator ``G[Δ]``, §3.1) to
  feature maps by bilinear sampling. Its ``backward`` option chooses how the
  gradient goes back through the warp: ``"autograd"``, the exact adjoint of the
  bilinear warp, or ``"negate"``, the paper's approximate inverse (§3.3): the
  gradient is warped by the negated field, "the root of the inverse vector
  placed at the head of the forward vector" approximated by negating the
  components on the same grid.
* :class:`GeneratorWarp` is Fig. 5's module: during training, for each batch,
  one generator drawn uniformly from a list (the paper: +30°, -30° rotation,
  1.3x and 0.75x scale, 30 px left, 30 px up) warps the layer's output (conv5);
  evaluation never warps.
* :func:`attach` inserts such a module after a layer of a network by a forward
  hook, so the network's ``state_dict`` keeps torchvision's names.

Flow convention (shared with :mod:`topdown.flows`): a flow ``V`` from ``F1`` to
``F2`` satisfies ``F2(x + V(x)) ≈ F1(x)``, in that map's pixel units.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INVERSES = ("negate", "exact", None)
BACKWARDS = ("autograd", "negate")
# The six generators of §3.3 as (kind, amount) in the bank's natural units: degrees, zoom factor and
# output pixels at the bank's image size (negative x = left, negative y = up; the paper's 30 px are at 224).
PAPER_GENERATORS: tuple[tuple[str, float], ...] = (
    ("rotation", 30.0), ("rotation", -30.0), ("scale", 1.3), ("scale", 0.75),
    ("translation_x", -30.0), ("translation_y", -30.0),
)


def _base_grid(h: int, w: int, device, dtype) -> torch.Tensor:
    ys = torch.arange(h, device=device, dtype=dtype)
    xs = torch.arange(w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy))  # [2, H, W] pixel coordinates (x, y)


def sample_at(features: torch.Tensor, displacement: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """``out[y] = features[y + displacement(y)]`` by bilinear sampling (pixel units, differentiable)."""
    b, _, h, w = features.shape
    disp = displacement if displacement.dim() == 4 else displacement[None]
    disp = disp.to(features.dtype).expand(b, 2, h, w)
    pos = _base_grid(h, w, features.device, features.dtype)[None] + disp
    # align_corners=False: pixel i's centre is at normalised (2i + 1)/W - 1.
    grid = torch.stack(((2 * pos[:, 0] + 1) / w - 1, (2 * pos[:, 1] + 1) / h - 1), dim=-1)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def invert_flow(flow: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Displacement ``d`` with ``ψ(y) = y + d(y)`` inverting ``φ(x) = x + flow(x)``.

    Fixed-point iteration ``d ← -flow(y + d)`` from ``d = -flow(y)`` (the
    paper's negation, Fig. A2); it converges where the field's Jacobian has
    norm below one. Border values of ``flow`` are extended outside the map.
    """
    f = flow if flow.dim() == 4 else flow[None]
    d = -f
    for _ in range(iters):
        d = -sample_at(f, d, padding_mode="border")
    return d if flow.dim() == 4 else d[0]


def _check_shapes(features: torch.Tensor, flow: torch.Tensor) -> None:
    if features.dim() != 4:
        raise ValueError(f"features must be [B, C, H, W], got {tuple(features.shape)}")
    if tuple(flow.shape[-2:]) != tuple(features.shape[-2:]) or flow.shape[-3] != 2:
        raise ValueError(f"flow {tuple(flow.shape)} does not fit features {tuple(features.shape)}: need [.., 2, H, W]")


def _warp_one(features: torch.Tensor, flow: torch.Tensor, inverse: str | None, padding_mode: str,
              iters: int) -> torch.Tensor:
    _check_shapes(features, flow)
    flow = flow.to(device=features.device, dtype=features.dtype)
    if inverse is None:
        disp = flow
    elif inverse == "negate":
        disp = -flow
    else:
        disp = invert_flow(flow, iters)
    return sample_at(features, disp, padding_mode)


class _NegatedFieldBackward(torch.autograd.Function):
    """The warp forward; in backward the incoming gradient is warped by ``-flow`` (§3.3's approximate inverse)."""

    @staticmethod
    def forward(ctx, features, flow, inverse, padding_mode, iters):
        ctx.save_for_backward(flow)
        ctx.options = (inverse, padding_mode, iters)
        return _warp_one(features, flow, inverse, padding_mode, iters)

    @staticmethod
    def backward(ctx, grad):
        (flow,) = ctx.saved_tensors
        with torch.no_grad():
            return _warp_one(grad, -flow, *ctx.options), None, None, None, None


def _warp(features: torch.Tensor, flow: torch.Tensor, inverse: str | None, padding_mode: str, iters: int,
          backward: str) -> torch.Tensor:
    if backward == "autograd":
        return _warp_one(features, flow, inverse, padding_mode, iters)
    if flow.requires_grad:
        raise ValueError("warp_features(backward='negate') treats the flow as a fixed generator and gives it no "
                         "gradient; detach the flow or use backward='autograd'")
    _check_shapes(features, flow)
    return _NegatedFieldBackward.apply(features, flow.to(device=features.device, dtype=features.dtype), inverse,
                                       padding_mode, iters)


def warp_features(features, flow, inverse: str | None = "negate", padding_mode: str = "zeros", iters: int = 30,
                  backward: str = "autograd"):
    """Apply a flow (a generator, §3.1) to feature maps.

    ``features`` and ``flow`` are tensors (``[B, C, H, W]`` and ``[2, H, W]`` or
    ``[B, 2, H, W]``) or dicts by layer name (every layer of ``features`` needs
    a flow; the flow is in that layer's pixel units).

    With a flow ``V`` from ``F1`` to ``F2`` (``F2(x + V(x)) ≈ F1(x)``), the forward pass:

    * ``inverse="negate"`` (default): ``out(y) = F(y - V(y))``, the paper's
      approximate inverse of the displacement. ``warp_features(F[t], G[Δ])``
      approximates ``F[t + Δ]``; applying ``-G[Δ]`` next approximately undoes it (Fig. A2).
    * ``inverse="exact"``: ``out(y) = F(ψ(y))`` with ``ψ`` the inverse of
      ``x ↦ x + V(x)`` (:func:`invert_flow`): exact for smooth, non-folding fields.
    * ``inverse=None``: ``out(x) = F(x + V(x))``, the pull-back: maps ``F2`` onto ``F1``'s frame.

    The backward pass (``backward``):

    * ``"autograd"`` (default): the exact adjoint of the bilinear warp, for the
      features and the flow.
    * ``"negate"``: §3.3's approximate inverse warp: the gradient with respect to
      the features is ``warp_features(grad, -flow)`` with the same ``inverse``,
      ``padding_mode`` and ``iters``; the flow is a fixed generator and gets no
      gradient (a flow that requires one is an error). For a constant translation
      the two modes agree away from the borders; they differ where the field varies.

    Positions outside the map read ``padding_mode`` (``"zeros"``: features
    beyond the border are unknown).
    """
    if inverse not in INVERSES:
        raise ValueError(f"unknown inverse {inverse!r}; choose from {INVERSES}")
    if backward not in BACKWARDS:
        raise ValueError(f"unknown backward {backward!r}; choose from {BACKWARDS}")
    if isinstance(features, Mapping):
        if not isinstance(flow, Mapping):
            raise TypeError("features is a dict by layer, so flow must be a dict by layer too")
        missing = [n for n in features if n not in flow]
        if missing:
            raise KeyError(f"no flow for layer(s) {missing}; flows given for {sorted(flow)}")
        return {n: _warp(f, flow[n], inverse, padding_mode, iters, backward) for n, f in features.items()}
    return _warp(features, flow, inverse, padding_mode, iters, backward)


# --------------------------------------------------------------------------------------------------- §3.3


def generator_name(kind: str, amount: float) -> str:
    return f"{kind} {amount:g}"


class GeneratorWarp(nn.Module):
    """Network-internal augmentation, "generator training" (§3.3, Fig. 5): warp a layer's output.

    In training mode, each batch is, with probability ``p`` (the paper: 1, every
    batch), warped by one generator drawn uniformly from ``flows`` [G, 2, H, W];
    in eval mode the module is the identity. ``backward="negate"`` sends the
    gradient back through the approximate inverse warp, as the paper does.

    The draw of the ``t``-th training batch depends only on ``(seed, t)``
    (:meth:`draw`), not on torch's random state. Under DDP every rank runs the
    same number of steps, so all ranks warp step ``t`` by the same generator: one
    generator per global batch, as the paper's "for each batch of 256 images", with
    no communication. ``step`` is a buffer, so a resumed run continues the sequence.

    A map whose size differs from the flows' is an error naming both sizes (a
    bank fitted at another image size does not describe this network's maps).
    """

    def __init__(self, flows: torch.Tensor, names: Sequence[str] | None = None, p: float = 1.0,
                 backward: str = "negate", inverse: str | None = "negate", padding_mode: str = "zeros",
                 seed: int = 0, layer: str = ""):
        super().__init__()
        flows = torch.as_tensor(flows, dtype=torch.float32)
        if flows.dim() == 3:
            flows = flows[None]
        if flows.dim() != 4 or flows.shape[1] != 2 or flows.shape[0] == 0:
            raise ValueError(f"GeneratorWarp needs flows [G, 2, H, W] with G >= 1, got {tuple(flows.shape)}")
        if not 0 <= p <= 1:
            raise ValueError(f"GeneratorWarp: p must be in [0, 1], got {p}")
        if inverse not in INVERSES:
            raise ValueError(f"unknown inverse {inverse!r}; choose from {INVERSES}")
        if backward not in BACKWARDS:
            raise ValueError(f"unknown backward {backward!r}; choose from {BACKWARDS}")
        names = list(names) if names is not None else [f"generator {i}" for i in range(flows.shape[0])]
        if len(names) != flows.shape[0]:
            raise ValueError(f"GeneratorWarp: {len(names)} names for {flows.shape[0]} flows")
        self.register_buffer("flows", flows)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.names, self.p, self.backward, self.inverse = names, float(p), backward, inverse
        self.padding_mode, self.seed, self.layer = padding_mode, int(seed), layer
        self.last: int | None = None  # the generator applied to the last training batch (None: not warped)

    @classmethod
    def from_bank(cls, bank, layer: str = "conv5", generators: Sequence[Sequence] = PAPER_GENERATORS,
                  **kwargs) -> "GeneratorWarp":
        """Generators ``[(kind, amount), ...]`` of a :class:`~topdown.generators.GeneratorBank` at ``layer``."""
        if layer not in bank.layout.names:
            raise KeyError(f"layer {layer!r} not in the bank; it holds {bank.layout.names}")
        if not generators:
            raise ValueError("GeneratorWarp.from_bank: the list of generators is empty")
        pairs = []
        for g in generators:
            if len(g) != 2:
                raise ValueError(f"a generator is (kind, amount), got {g!r}")
            pairs.append((str(g[0]), float(g[1])))
        flows = torch.stack([bank.generator(k, a)[layer] for k, a in pairs])
        return cls(flows, [generator_name(k, a) for k, a in pairs], layer=layer, **kwargs)

    @property
    def map_size(self) -> tuple[int, int]:
        return tuple(self.flows.shape[-2:])

    def draw(self, step: int) -> int | None:
        """Generator index for training batch ``step``, or None when that batch is not warped."""
        rng = np.random.default_rng([self.seed, int(step)])
        warped = rng.random() < self.p
        pick = int(rng.integers(self.flows.shape[0]))
        return pick if warped else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if tuple(x.shape[-2:]) != self.map_size:
            where = f" at {self.layer}" if self.layer else ""
            raise ValueError(f"generator flows are {self.map_size[0]}x{self.map_size[1]} but the feature maps{where} "
                             f"are {x.shape[-2]}x{x.shape[-1]}: fit the bank at the network's input size")
        self.last = self.draw(int(self.step))
        self.step += 1
        if self.last is None:
            return x
        return warp_features(x, self.flows[self.last], self.inverse, self.padding_mode, backward=self.backward)

    def extra_repr(self) -> str:
        return (f"layer={self.layer!r}, generators={self.names}, map={self.map_size}, p={self.p}, "
                f"backward={self.backward!r}, inverse={self.inverse!r}")


# --------------------------------------------------------------------------------------------------- wiring


class _ApplyAfter:
    """Forward hook: while the layer trains, its output becomes ``module(output)`` (a class: models stay picklable)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, layer: nn.Module, inputs, output):
        return self.module(output) if layer.training else None


def attach(model: nn.Module, layer: str, module: nn.Module):
    """Apply ``module`` to the output of ``layer`` of ``model`` (a paper name such as ``conv5``, or a module name).

    ``module`` runs only while the network is in training mode (and a
    :class:`GeneratorWarp` warps only while it is too), so evaluation never warps.
    Returns the hook handle. The model's modules and ``state_dict`` are unchanged,
    so its weights still load as a plain torchvision network.
    """
    from topdown.layers import resolve_layer

    name = resolve_layer(model, layer)
    if name == "input":
        raise ValueError("attach: a warp after the input is an image transform, not a feature warp; name a layer")
    return model.get_submodule(name).register_forward_hook(_ApplyAfter(module))


@torch.no_grad()
def layer_size(model: nn.Module, layer: str, image_size: int) -> tuple[int, int]:
    """Spatial size ``(H, W)`` of ``layer``'s output for a square ``image_size`` input."""
    from topdown.layers import resolve_layer

    name = resolve_layer(model, layer)
    found = {}

    def record(module, inputs, output) -> None:
        found["shape"] = output.shape

    handle = model.get_submodule(name).register_forward_hook(record)
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        handle.remove()
        model.train(was_training)
    return tuple(found["shape"][-2:])


def check_bank_fits(bank, layer: str, size: tuple[int, int], image_size: int, source: str = "generator bank") -> None:
    """Raise a ValueError naming both sizes when the bank's ``layer`` maps are not ``size``."""
    if layer not in bank.layout.names:
        raise KeyError(f"{source}: no layer {layer!r}; it holds {list(bank.layout.names)}")
    have = tuple(bank.layout.shapes[bank.layout.names.index(layer)])
    if have != tuple(size):
        raise ValueError(f"{source}: its {layer} maps are {have[0]}x{have[1]} (learned at {bank.image_size} px) but "
                         f"the network's {layer} is {size[0]}x{size[1]} at {image_size} px input; fit the bank at "
                         f"image_size {image_size}, or train at the bank's image size")


# --------------------------------------------------------------------------------------------------- Table 1

# torchvision's TenCrop order: top-left, top-right, bottom-left, bottom-right, centre, then the five mirrored.
CENTER_VIEW = 4


def view_probabilities(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities of Table 1's two evaluations from ``[B, 10, K]`` logits of the ten views.

    Returns ``(centre crop, multi-view)``: the centre view's softmax, and the
    softmax averaged over the four corner and centre crops and their mirror images.
    """
    if logits.dim() != 3:
        raise ValueError(f"expected logits [B, views, K], got {tuple(logits.shape)}")
    probs = logits.float().softmax(-1)
    return probs[:, CENTER_VIEW], probs.mean(1)
