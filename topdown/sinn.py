"""Hierarchical scene categorization networks of feedback-prop §4.2 (Table 1).

Three label levels, ordered top-down: ``coarse`` (3 on SUN397), ``general`` (16) and ``fine``
(397). A hierarchy is given by two 0/1 matrices ``fine_to_general [F, G]`` and
``fine_to_coarse [F, C]``; a fine category may belong to several general or coarse ones.

* :class:`FineClassifier` is the Baseline (CNN + softmax over the fine categories) and, with
  ``num_partial > 0``, Baseline + PL: the true coarse labels, as a binary indicator vector, are
  concatenated to the classifier's input (the CNN's penultimate features).
* :class:`SINN` re-implements the Structured Inference Neural Network of Hu et al. (CVPR 2016,
  "Learning Structured Inference Neural Networks with Label Relations", §3): one output per
  level, linked by linear layers that model positive and negative label relations, top-down and
  bottom-up. As in feedback-prop §4.2 the relations are not taken from WordNet but from
  thresholded Pearson correlations between the label variables of the training split
  (:func:`relation_masks`). Observed levels (the coarse one in SINN + PL) enter as partial labels.
* :func:`coarse_probabilities` / :func:`coarse_known_loss` give feedback-prop's known loss for the
  LF / RF rows: the coarse labels are the known evidence for a Baseline that only predicts fine
  categories.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from topdown.backbones import build_backbone, load_weights, weights_path

LEVELS = ("coarse", "general", "fine")
DEFAULT_THRESHOLD = 0.05


# ---------------------------------------------------------------- hierarchy helpers


def level_targets(target: torch.Tensor, fine_to_general: torch.Tensor, fine_to_coarse: torch.Tensor) -> dict[str, torch.Tensor]:
    """0/1 indicators of every level for fine class indices ``target [N]``.

    Returns ``{"coarse": [N, C], "general": [N, G], "fine": [N, F]}`` (float).
    """
    target = target.long()
    fine = F.one_hot(target, fine_to_general.shape[0]).float()
    return {"coarse": fine_to_coarse.float()[target], "general": fine_to_general.float()[target], "fine": fine}


def stacked_level_targets(target: torch.Tensor, fine_to_general: torch.Tensor, fine_to_coarse: torch.Tensor) -> torch.Tensor:
    """All label variables ``[N, C + G + F]`` in top-down order (coarse, general, fine)."""
    levels = level_targets(target, fine_to_general, fine_to_coarse)
    return torch.cat([levels[name] for name in LEVELS], dim=1)


def pearson_correlation(labels: torch.Tensor) -> torch.Tensor:
    """Pearson correlation ``[L, L]`` between the columns of ``labels [N, L]``.

    A constant column (a label never or always on in the training split) has no defined
    correlation; it gets 0 so it takes part in no relation.
    """
    x = labels.double()
    x = x - x.mean(0, keepdim=True)
    cov = x.T @ x
    std = cov.diagonal().sqrt()
    denom = std[:, None] * std[None, :]
    corr = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
    return corr.float()


def relation_masks(corr: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive (corr > +τ) and negative (corr < −τ) relation graphs, self-relations excluded.

    feedback-prop §4.2: SINN's label relations come from thresholding the Pearson correlation
    between target variables on the training split (instead of WordNet as in Hu et al.).
    """
    if threshold < 0:
        raise ValueError(f"relation threshold must be >= 0, got {threshold}")
    off_diagonal = ~torch.eye(corr.shape[0], dtype=torch.bool, device=corr.device)
    return (corr > threshold) & off_diagonal, (corr < -threshold) & off_diagonal


def coarse_probabilities(fine_logits: torch.Tensor, fine_to_coarse: torch.Tensor) -> torch.Tensor:
    """P(coarse c) = Σ_{fine f ∈ c} softmax(fine)_f, ``[B, C]``.

    With multi-membership a fine category adds its mass to each of its coarse categories, so the
    coarse scores need not sum to one; each is still a probability because it sums a subset of a
    softmax.
    """
    return fine_logits.softmax(-1) @ fine_to_coarse.to(fine_logits)


def coarse_known_loss(known_coarse: torch.Tensor, fine_to_coarse: torch.Tensor, eps: float = 1e-6) -> Callable[[torch.Tensor], torch.Tensor]:
    """Known loss for feedback-prop on a fine classifier (LF / RF rows of Table 1).

    The known evidence is the true coarse indicator ``[B, C]``; the loss is the binary
    cross-entropy between :func:`coarse_probabilities` and it, summed over the coarse labels,
    one value per image (feedback-prop eq. 6 without label weights, applied to the derived
    coarse variables). Returns ``known_loss(outputs) -> Tensor[B]``.
    """

    def known_loss(outputs) -> torch.Tensor:
        logits = outputs["fine"] if isinstance(outputs, dict) else outputs
        p = coarse_probabilities(logits, fine_to_coarse).clamp(eps, 1 - eps)
        y = known_coarse.to(p)
        if y.is_inference():  # targets made under torch.inference_mode() cannot be saved for backward
            y = y.clone()
        return -(y * p.log() + (1 - y) * (1 - p).log()).sum(-1)

    return known_loss


# ---------------------------------------------------------------- backbones


def feature_trunk(backbone: str = "alexnet", weights: str | None = None, partial: bool = False) -> tuple[nn.Module, int]:
    """A torchvision model whose last linear layer is the identity, and its feature width.

    The penultimate features are what Baseline + PL concatenates the partial labels to and what
    SINN maps to visual activations; torchvision's module names are kept so the paper's pivot
    names (AlexNet ``conv2``..``conv5``) still resolve inside the wrapping network.

    ``weights``: a local file (plain state dict, ``{"state_dict": ...}`` checkpoint such as the
    Places365 AlexNet of feedback-prop §4.2, or a checkpoint of this module's networks, whose
    trunk is reused), keys remapped by :func:`topdown.backbones.torchvision_keys`; or a cached
    torchvision weights name; random initialisation when None.  Every trunk tensor must be in the
    file unless ``partial`` (:func:`topdown.backbones.load_weights`); the report is kept in
    ``model.topdown_weights``.
    """
    model = build_backbone(backbone, 1, head="linear")
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    if weights:
        model.topdown_weights = load_weights(model, weights_path(weights), partial=partial)
    return model, last.in_features


class FineClassifier(nn.Module):
    """Baseline (CNN + softmax over fine categories) and Baseline + PL (feedback-prop §4.2).

    ``forward(image, partial=None) -> fine logits [B, F]``. With ``num_partial > 0`` the partial
    labels ``[B, num_partial]`` (the true coarse indicator) are concatenated to the CNN features.
    """

    def __init__(self, trunk: nn.Module, feature_dim: int, num_classes: int, num_partial: int = 0):
        super().__init__()
        self.trunk = trunk
        self.num_partial = num_partial
        self.classifier = nn.Linear(feature_dim + num_partial, num_classes)

    def forward(self, image: torch.Tensor, partial: torch.Tensor | None = None) -> torch.Tensor:
        h = self.trunk(image)
        if self.num_partial:
            if partial is None:
                raise ValueError("Baseline + PL needs the partial labels (true coarse indicator) as input")
            if partial.shape[-1] != self.num_partial:
                raise ValueError(f"partial labels have {partial.shape[-1]} columns, expected {self.num_partial}")
            h = torch.cat([h, partial.to(h)], dim=1)
        return self.classifier(h)


# ---------------------------------------------------------------- SINN


class RelationLayer(nn.Module):
    """Linear message along a positive and a negative label graph (Hu et al. §3.2-3.3).

    ``m = relu((W⁺ ⊙ M⁺) a) − relu((W⁻ ⊙ M⁻) a)``: along a positive relation an active source
    can only raise its target, along a negative one only lower it. The masks M are buffers, so
    they travel with checkpoints; they are set from the training split by
    :meth:`SINN.set_relations`.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / max(in_features, 1) ** 0.5
        self.weight_pos = nn.Parameter(torch.empty(out_features, in_features).uniform_(0, bound))
        self.weight_neg = nn.Parameter(torch.empty(out_features, in_features).uniform_(0, bound))
        self.register_buffer("mask_pos", torch.zeros(out_features, in_features))
        self.register_buffer("mask_neg", torch.zeros(out_features, in_features))

    def set_masks(self, positive: torch.Tensor, negative: torch.Tensor) -> None:
        if positive.shape != self.mask_pos.shape or negative.shape != self.mask_neg.shape:
            raise ValueError(f"relation masks {tuple(positive.shape)}/{tuple(negative.shape)} do not fit {tuple(self.mask_pos.shape)}")
        self.mask_pos.copy_(positive.float())
        self.mask_neg.copy_(negative.float())

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return F.relu(F.linear(a, self.weight_pos * self.mask_pos)) - F.relu(F.linear(a, self.weight_neg * self.mask_neg))


class SINN(nn.Module):
    """Structured Inference Neural Network (Hu et al., CVPR 2016) on a CNN trunk.

    Levels ``t = 1..m`` are coarse, general, fine. With CNN features ``h``:

    * visual activations ``x_t = W_t h + b_t``; an observed level (partial labels ``y_t``)
      replaces them by ``x_t = E_t (2 y_t − 1) + e_t`` (Hu et al.'s inference with partially
      observed labels, SINN + PL in feedback-prop Table 1);
    * top-down pass ``→a_t = x_t + R_t(x_t) + V_{t−1→t}(→a_{t−1}) + →b_t``,
    * bottom-up pass ``←a_t = x_t + R_t(x_t) + V_{t+1→t}(←a_{t+1}) + ←b_t``,
    * outputs ``y_t = →U_t →a_t + ←U_t ←a_t + c_t``,

    where ``R_t`` (intra-level, Hu's H_t) and ``V`` (inter-level) are :class:`RelationLayer`s on
    the thresholded-correlation graphs. The self-relation of ``H_t`` is kept as the plain
    ``x_t`` term so a label's own evidence reaches its output unclipped; ``U`` starts at ``½ I``
    so an untrained SINN behaves like the plain visual classifier.

    ``forward(image, partial=None) -> {"coarse": [B, C], "general": [B, G], "fine": [B, F]}``
    logits (fine: softmax; coarse, general: sigmoid, since memberships may overlap).
    """

    def __init__(self, trunk: nn.Module, feature_dim: int, level_sizes: Sequence[int], observed: Sequence[str] = ("coarse",)):
        super().__init__()
        if len(level_sizes) != len(LEVELS):
            raise ValueError(f"level_sizes must give the sizes of {LEVELS}, got {list(level_sizes)}")
        unknown = [o for o in observed if o not in LEVELS]
        if unknown:
            raise ValueError(f"unknown observed level(s) {unknown}; choose from {LEVELS}")
        self.trunk = trunk
        self.sizes = dict(zip(LEVELS, (int(s) for s in level_sizes)))
        self.observed = tuple(observed)
        self.visual = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in self.sizes.items() if name not in self.observed})
        self.partial = nn.ModuleDict()
        for name in self.observed:
            embed = nn.Linear(self.sizes[name], self.sizes[name])
            with torch.no_grad():  # a known label starts as a confident activation of itself
                embed.weight.copy_(3.0 * torch.eye(self.sizes[name]))
                embed.bias.zero_()
            self.partial[name] = embed
        self.intra = nn.ModuleDict({name: RelationLayer(n, n) for name, n in self.sizes.items()})
        pairs = list(zip(LEVELS[:-1], LEVELS[1:]))
        self.down = nn.ModuleDict({f"{a}_to_{b}": RelationLayer(self.sizes[a], self.sizes[b]) for a, b in pairs})
        self.up = nn.ModuleDict({f"{b}_to_{a}": RelationLayer(self.sizes[b], self.sizes[a]) for a, b in pairs})
        self.bias_down = nn.ParameterDict({name: nn.Parameter(torch.zeros(n)) for name, n in self.sizes.items()})
        self.bias_up = nn.ParameterDict({name: nn.Parameter(torch.zeros(n)) for name, n in self.sizes.items()})
        self.out_down = nn.ModuleDict({name: self._half_identity(n) for name, n in self.sizes.items()})
        self.out_up = nn.ModuleDict({name: self._half_identity(n, bias=False) for name, n in self.sizes.items()})

    @staticmethod
    def _half_identity(n: int, bias: bool = True) -> nn.Linear:
        lin = nn.Linear(n, n, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(0.5 * torch.eye(n))
            if bias:
                lin.bias.zero_()
        return lin

    @torch.no_grad()
    def set_relations(self, positive: torch.Tensor, negative: torch.Tensor) -> None:
        """Install the relation graphs ``[L, L]`` over all labels (coarse, general, fine order).

        Row = target label, column = source label. Blocks between adjacent levels feed the
        top-down and bottom-up layers; diagonal blocks feed the intra-level layers.
        """
        total = sum(self.sizes.values())
        if positive.shape != (total, total) or negative.shape != (total, total):
            raise ValueError(f"relation graphs must be [{total}, {total}] (coarse+general+fine), got {tuple(positive.shape)}")
        start, spans = 0, {}
        for name in LEVELS:
            spans[name] = slice(start, start + self.sizes[name])
            start += self.sizes[name]

        def block(m, tgt, src):
            return m[spans[tgt], spans[src]]

        for name in LEVELS:
            self.intra[name].set_masks(block(positive, name, name), block(negative, name, name))
        for a, b in zip(LEVELS[:-1], LEVELS[1:]):
            self.down[f"{a}_to_{b}"].set_masks(block(positive, b, a), block(negative, b, a))
            self.up[f"{b}_to_{a}"].set_masks(block(positive, a, b), block(negative, a, b))

    def activations(self, features: torch.Tensor, partial: dict[str, torch.Tensor] | torch.Tensor | None) -> dict[str, torch.Tensor]:
        if partial is not None and not isinstance(partial, dict):
            if len(self.observed) != 1:
                raise ValueError(f"give partial labels as a dict keyed by {self.observed}")
            partial = {self.observed[0]: partial}
        x = {}
        for name in LEVELS:
            if name in self.observed:
                if partial is None or name not in partial:
                    raise ValueError(f"SINN + PL needs the partial labels of level {name!r}")
                y = partial[name].to(features)
                if y.shape[-1] != self.sizes[name]:
                    raise ValueError(f"partial labels of {name!r} have {y.shape[-1]} columns, expected {self.sizes[name]}")
                x[name] = self.partial[name](2 * y - 1)
            else:
                x[name] = self.visual[name](features)
        return x

    def forward(self, image: torch.Tensor, partial: dict[str, torch.Tensor] | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = self.activations(self.trunk(image), partial)
        base = {name: x[name] + self.intra[name](x[name]) for name in LEVELS}
        down, up = {}, {}
        previous = None
        for name in LEVELS:
            down[name] = base[name] + self.bias_down[name]
            if previous is not None:
                down[name] = down[name] + self.down[f"{previous}_to_{name}"](down[previous])
            previous = name
        previous = None
        for name in reversed(LEVELS):
            up[name] = base[name] + self.bias_up[name]
            if previous is not None:
                up[name] = up[name] + self.up[f"{previous}_to_{name}"](up[previous])
            previous = name
        return {name: self.out_down[name](down[name]) + self.out_up[name](up[name]) for name in LEVELS}


def sinn_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor, fine_to_general: torch.Tensor, fine_to_coarse: torch.Tensor) -> torch.Tensor:
    """Sum of the level losses (Hu et al. §3.4): softmax cross-entropy on the fine level, binary
    cross-entropy (averaged over labels) on the general and coarse levels, whose memberships
    may overlap."""
    levels = level_targets(target, fine_to_general, fine_to_coarse)
    loss = F.cross_entropy(outputs["fine"], target.long())
    for name in ("general", "coarse"):
        loss = loss + F.binary_cross_entropy_with_logits(outputs[name], levels[name].to(outputs[name]))
    return loss
