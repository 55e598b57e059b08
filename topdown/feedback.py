"""Feedback-prop inference (Wang et al., CVPR 2018, §3): refine intermediate activations
with the loss on the known outputs, then read the unknown outputs off one more forward pass.

* ``method="lf"`` — layer-wise feedback-prop, Algorithm 1 (§3.2): the pivot activations
  ``a_l`` are optimised one layer at a time, in topological order; after ``steps`` updates
  ``a_l`` is frozen and the next pivot starts from a forward pass of it.
* ``method="rf"`` — residual feedback-prop, Algorithm 2 (§3.3): every pivot gets an additive
  feedback residual, ``a_l = f_l(a_{l-1}) + r_l`` (eq. 5), and all residuals are updated
  together by one truncated backward pass per iteration.

Single-layer feedback-prop (eqs. 3-4) is either method with one pivot; ``layers=["input"]``
optimises the image itself (eqs. 1-2).

How the cost stays at the truncated network (§6)
------------------------------------------------
The first full forward pass is recorded with hooks on every module.  The modules whose call
finished by the end of the pivot's call and whose caller was still running at that moment
(the maximal calls of the prefix, the pivot included) keep their outputs.  During the
iterations those modules get a temporary instance ``forward`` that hands back the cached
output instead of computing (a module called again later runs its real forward) and their
forward hooks are set aside (the cached output already went through them), so each
iteration only pays for the network after the pivot.  RF replays ``f_1(a_0) + r_1`` for the
first pivot; LF replays ``a_l`` for the current pivot and the frozen values of the earlier
ones, so each LF stage is truncated at its own pivot.  This works for any ``nn.Module``, not
only ``nn.Sequential``.  Plain tensor code in a ``forward`` between modules still runs,
which is cheap.  If the model changes a cached tensor in place outside a cached module, the
cache would go stale; that is detected through the tensors' version counters and the call
restarts without the cache (with a warning).  The updates use the fused torch optimizers
where available (one kernel per variable).

Parameters never get ``.grad`` and stay bit-identical: gradients are taken with
``torch.autograd.grad`` w.r.t. the pivot variables only, with ``requires_grad`` of the
parameters switched off for the duration of the call.  The model runs in eval mode and
every submodule's train/eval flag is restored afterwards.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topdown.layers import INPUT, resolve_layers

METHODS = ("lf", "rf")
OPTIMIZERS = ("sgd", "momentum", "adam", "adagrad")

Outputs = Any  # a Tensor or a dict (or nested tuple/list/dict) of Tensors
KnownLoss = Callable[[Outputs], Tensor]
Callback = Callable[[int, Outputs], None]


# ---------------------------------------------------------------------------------------
# Known-evidence losses L(Y_k, Ŷ_k) (eq. 3), one value per sample
# ---------------------------------------------------------------------------------------

def _select_head(outputs: Outputs, key: str | None, what: str) -> Tensor:
    if isinstance(outputs, dict):
        if key is None:
            raise ValueError(f"{what}: the model returns a dict with keys {sorted(outputs)}; pass which one holds the known outputs")
        if key not in outputs:
            raise ValueError(f"{what}: head {key!r} not in the model outputs {sorted(outputs)}")
        return outputs[key]
    if key is not None:
        raise ValueError(f"{what}: head {key!r} was given but the model returns a {type(outputs).__name__}, not a dict")
    return outputs


def _usable(t: Tensor, like: Tensor) -> Tensor:
    # Targets built under torch.inference_mode() cannot be saved for backward: copy them.
    if t.is_inference():
        t = t.clone()
    return t.to(like.device)


def multilabel_known_loss(indices: Tensor, values: Tensor, key: str | None = None) -> KnownLoss:
    """Binary cross-entropy on the known labels only (the partial loss of §3.1), ``[B]``.

    Args:
        indices: ``LongTensor [k]`` of known label columns shared by the whole batch, or a
            ``bool [B, K]`` mask of the known labels of each sample.
        values: 0/1 targets, ``[B, k]`` with column indices, ``[B, K]`` with a mask.
        key: the dict entry holding the multi-label logits when the model returns a dict.

    The loss is the mean over a sample's known labels (0 for a sample with none), so a
    sample's value does not depend on the rest of the batch.
    """
    if indices.dtype == torch.bool:
        if indices.shape != values.shape:
            raise ValueError(f"multilabel_known_loss: mask shape {tuple(indices.shape)} != values shape {tuple(values.shape)}")
    elif indices.dim() != 1 or values.dim() != 2 or values.shape[1] != indices.numel():
        raise ValueError(
            f"multilabel_known_loss: indices must be [k] and values [B, k]; got {tuple(indices.shape)} and {tuple(values.shape)}"
        )
    top = int(indices.max()) if indices.dtype != torch.bool and indices.numel() else -1  # once, not per pass

    def loss(outputs: Outputs) -> Tensor:
        logits = _select_head(outputs, key, "multilabel_known_loss").flatten(1)
        target = _usable(values, logits).to(logits.dtype)
        idx = _usable(indices, logits)
        if idx.dtype == torch.bool:
            if idx.shape != logits.shape:
                raise ValueError(f"multilabel_known_loss: mask {tuple(idx.shape)} does not match logits {tuple(logits.shape)}")
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            m = idx.to(logits.dtype)
            return (bce * m).sum(1) / m.sum(1).clamp(min=1)
        if top >= logits.shape[1]:
            raise ValueError(f"multilabel_known_loss: label index {top} out of range for {logits.shape[1]} outputs")
        bce = F.binary_cross_entropy_with_logits(logits[:, idx], target, reduction="none")
        return bce.mean(1)

    return loss


def multiclass_known_loss(targets: Tensor, head: str | None = None) -> KnownLoss:
    """Cross-entropy of one single-label head (a known task of a multi-task model, §4.2-4.4), ``[B]``.

    Args:
        targets: ``LongTensor [B]`` of known class indices.
        head: the dict entry holding that head's logits when the model returns a dict.
    """
    if targets.dim() != 1:
        raise ValueError(f"multiclass_known_loss: targets must be [B] class indices, got shape {tuple(targets.shape)}")

    def loss(outputs: Outputs) -> Tensor:
        logits = _select_head(outputs, head, "multiclass_known_loss").flatten(1)
        return F.cross_entropy(logits, _usable(targets, logits), reduction="none")

    return loss


# ---------------------------------------------------------------------------------------
# Small helpers on output structures
# ---------------------------------------------------------------------------------------

def _tensors(x: Any) -> Iterable[Tensor]:
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _detach(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, dict):
        return type(x)((k, _detach(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    return x


def _plain(x: Any) -> Any:
    """Detached inputs, with normal copies of inference tensors so autograd may save them."""
    if isinstance(x, Tensor):
        return x.clone() if x.is_inference() else x.detach()
    if isinstance(x, dict):
        return type(x)((k, _plain(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    return x


class _StaleCache(Exception):
    """A cached prefix tensor was changed in place by the model: retry without the cache."""


class _Live:
    """Plan entry evaluated at call time (the LF pivot variable; §3.2 line 8 forwards from it)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Tensor]):
        self.fn = fn


# ---------------------------------------------------------------------------------------
# Recording the prefix and replaying it from the cache
# ---------------------------------------------------------------------------------------

class _Recorder:
    """Hooks on every module for one forward pass.

    Keeps the outputs of the maximal calls that have finished when ``pivot`` finishes (the
    part of the network that the iterations need not recompute), and counts the calls of
    every pivot module to check that each runs once and in the listed order.
    """

    def __init__(self, model: nn.Module, pivot: nn.Module | None, pivots: list[nn.Module]):
        self.pivot = pivot
        self.done = pivot is None
        self.frames: list[list[tuple[nn.Module, Any]]] | None = [[]]
        self.cached: list[tuple[nn.Module, Any]] = []
        self.versions: list[tuple[nn.Module, Tensor, int]] = []
        self.calls = {m: 0 for m in pivots}
        self.ends: list[nn.Module] = []
        self.handles = []
        for m in model.modules():
            # appended: the recorded output is the one the caller gets, after the user's hooks
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        if not self.done:
            self.frames.append([])

    def _post(self, module, args, output):
        if module in self.calls:
            self.calls[module] += 1
            self.ends.append(module)
        if self.done:
            return
        self.frames.pop()  # the children of a finished call are inside it: drop their outputs
        self.frames[-1].append((module, output))
        if module is self.pivot:
            self.done = True
            self.cached = [rec for frame in self.frames for rec in frame]
            # the values the iterations must see: later in-place changes make the cache stale
            self.versions = [(m, t, t._version) for m, out in self.cached for t in _tensors(out)]
            self.frames = None

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _check_versions(versions: list[tuple[Tensor, int]]) -> None:
    for t, v in versions:
        if t._version != v:
            raise _StaleCache


@contextmanager
def _replayed(plan: dict[nn.Module, list[Any]]):
    """Temporarily make each planned module return its cached outputs for its first calls.

    The module's forward hooks are set aside meanwhile: the cached outputs already went
    through them, and without hooks ``Module.__call__`` takes its fast path.
    """
    saved = []
    try:
        for m, entries in plan.items():
            # plain instance attributes, set through __dict__: Module.__setattr__ is slow
            # enough to show up when the truncated network is small
            d = m.__dict__
            own = d.get("forward", None)
            real = m.forward
            saved.append((m, own, d["_forward_hooks"], d["_forward_pre_hooks"]))
            d["_forward_hooks"], d["_forward_pre_hooks"] = OrderedDict(), OrderedDict()
            count = [0]

            def forward(*args, _entries=entries, _count=count, _real=real, **kwargs):
                i = _count[0]
                _count[0] += 1
                if i < len(_entries):
                    e = _entries[i]
                    return e.fn() if isinstance(e, _Live) else e
                return _real(*args, **kwargs)

            d["forward"] = forward
        yield
    finally:
        for m, own, hooks, pre_hooks in reversed(saved):
            d = m.__dict__
            d["_forward_hooks"], d["_forward_pre_hooks"] = hooks, pre_hooks
            if own is None:
                del d["forward"]
            else:
                d["forward"] = own


def _make_optimizer(name: str, variables: list[Tensor], lr: float, kwargs: dict) -> torch.optim.Optimizer:
    kwargs = dict(kwargs)
    cls = {"sgd": torch.optim.SGD, "momentum": torch.optim.SGD, "adam": torch.optim.Adam,
           "adagrad": torch.optim.Adagrad}[name]
    if name == "momentum":
        kwargs.setdefault("momentum", 0.9)
    if "fused" not in kwargs and "foreach" not in kwargs and variables[0].device.type in ("cpu", "cuda"):
        # one kernel per tensor: the unfused update of large activations costs as much as a
        # sizeable part of the truncated backward on CPU (measured ~9x slower for Adam)
        try:
            return cls(variables, lr=lr, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            pass
    return cls(variables, lr=lr, **kwargs)


def _finite(tensors: list[Tensor]) -> bool:
    """One pass and one sync: a NaN or inf anywhere makes the (float64) sum non-finite."""
    sums = [t.sum(dtype=torch.float64 if t.device.type != "mps" else None) for t in tensors]
    return bool(torch.isfinite(torch.stack(sums)).all())


# ---------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------

class _Run:
    """One attempt of a feedback_prop call (with or without the prefix cache)."""

    def __init__(self, model, inputs, known_loss, names, pivots, method, steps, lr, optimizer, opt_kwargs,
                 callback, use_cache, delivered):
        self.model, self.inputs, self.known_loss = model, inputs, known_loss
        self.names, self.pivots = names, pivots  # user names, modules (None = the image)
        self.method, self.steps, self.lr = method, steps, lr
        self.optimizer, self.opt_kwargs = optimizer, opt_kwargs
        self.callback, self.use_cache = callback, use_cache
        self.delivered = delivered  # [n]: callback iterations already delivered by an earlier attempt
        self.network_input: Callable[[], Tensor] | None = None  # set when the image is a pivot
        self.t = 0

    # -- pieces -------------------------------------------------------------------------
    def forward(self, plan, grad: bool = True):
        with _replayed(plan), torch.set_grad_enabled(grad):
            return self._call()

    def _call(self):
        x = self.inputs if self.network_input is None else self.network_input()
        return self.model(*x) if isinstance(x, (tuple, list)) else self.model(x)

    def emit(self, outputs):
        if self.callback is not None and self.t >= self.delivered[0]:
            self.callback(self.t, _detach(outputs))
            self.delivered[0] = self.t + 1

    def fail(self, what: str, pivot: str):
        raise FloatingPointError(
            f"feedback-prop {self.method.upper()}: non-finite {what} at iteration {self.t}, pivot layer {pivot}"
        )

    def loss(self, outputs, pivot: str, grad: bool = True) -> Tensor:
        loss = self.known_loss(outputs)
        if not isinstance(loss, Tensor) or loss.dim() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"known_loss must return one value per sample, a [B] tensor; got {shape}")
        if not bool(torch.isfinite(loss).all()):
            self.fail("known loss", pivot)
        if grad and not loss.requires_grad:
            raise ValueError(f"feedback-prop {self.method.upper()}: the known loss does not depend on pivot layer {pivot}")
        return loss

    def step(self, opt, variables, loss, pivot: str):
        # the objective is the SUM over samples: each sample's update is its own
        grads = torch.autograd.grad(loss.sum(), variables, allow_unused=True)
        for v, g in zip(variables, grads):
            v.grad = torch.zeros_like(v) if g is None else g
        opt.step()
        for v in variables:
            v.grad = None
        if not _finite(variables):
            self.fail("pivot activations", pivot)

    def record(self, pivot, plan):
        """One forward pass that records the prefix of ``pivot`` (and is iteration 0 of its stage)."""
        with _replayed(plan):
            # hooks go on after the replay has set the planned modules' own hooks aside
            rec = _Recorder(self.model, pivot, [p for p in self.pivots if p is not None])
            try:
                out = self._call()
            finally:
                rec.remove()
        return out, rec

    def validate(self, rec: _Recorder):
        for name, m in zip(self.names, self.pivots):
            if m is not None and rec.calls[m] != 1:
                raise ValueError(
                    f"pivot layer {name!r} is called {rec.calls[m]} times in one forward pass of "
                    f"{type(self.model).__name__}; a pivot must be a module that runs exactly once"
                )
        order = [m for m in rec.ends if m in rec.calls]
        if order != [m for m in self.pivots if m is not None]:
            by_module = {m: n for n, m in zip(self.names, self.pivots)}
            raise ValueError(
                f"pivot layers must be listed in topological (forward) order: got {self.names}, "
                f"the forward pass finishes them as {[by_module[m] for m in order]}"
            )

    def plan(self, rec: _Recorder, keep: set) -> tuple[dict, list]:
        """Cached outputs per module, and the (tensor, version) pairs that must stay unchanged.

        Pivot entries are exempt from the version check: RF adds its residual to a new
        tensor and LF hands out copies, so the model never sees those tensors.
        """
        plan: dict[nn.Module, list[Any]] = {}
        for m, out in rec.cached:
            if self.use_cache or m in keep:
                plan.setdefault(m, []).append(out)
        versions = [(t, v) for m, t, v in rec.versions if self.use_cache and m not in keep]
        return plan, versions

    # -- Algorithm 2 ----------------------------------------------------------------------
    def rf(self):
        residuals: dict[int, Tensor] = {}
        first_raw: list[Tensor] = []
        desc = str(self.names)

        def residual(i):
            def hook(module, args, out):
                if not isinstance(out, Tensor):
                    raise ValueError(f"pivot layer {self.names[i]!r} returns {type(out).__name__}, not a tensor")
                if i not in residuals:  # line 1: r^(0) := 0, shaped like the activation
                    residuals[i] = torch.zeros_like(out, requires_grad=True)
                    if i == 0:
                        first_raw.append(out)  # f_1(a_0) does not change: the iterations reuse it
                return out + residuals[i]  # eq. 5
            return hook

        if self.pivots[0] is None:  # a_0 = X + r_0
            x = self.inputs
            residuals[0] = torch.zeros_like(x, requires_grad=True)
            self.network_input = lambda: x + residuals[0]
        hooks = [m.register_forward_hook(residual(i)) for i, m in enumerate(self.pivots) if m is not None]
        try:
            first = self.pivots[0]
            out, rec = self.record(first, {})
            self.validate(rec)
            plan, versions = self.plan(rec, {first})
            if first is not None:
                plan[first] = [_Live(lambda: first_raw[0] + residuals[0])]
            _check_versions(versions)
            variables = [residuals[i] for i in range(len(self.pivots))]
            self.emit(out)
            opt = _make_optimizer(self.optimizer, variables, self.lr, self.opt_kwargs)
            for t in range(self.steps):
                self.step(opt, variables, self.loss(out, desc), desc)  # lines 8-10
                out = self.forward(plan, grad=t < self.steps - 1)  # lines 4-7 (line 12 at the end)
                _check_versions(versions)
                self.t = t + 1
                self.emit(out)
            self.loss(out, desc, grad=False)
            return out
        finally:
            for h in hooks:
                h.remove()

    # -- Algorithm 1 ----------------------------------------------------------------------
    def lf(self):
        plan: dict[nn.Module, list[Any]] = {}
        frozen: dict[nn.Module, Tensor] = {}
        out = None
        for i, (name, m) in enumerate(zip(self.names, self.pivots)):
            desc = repr(name)
            holder: dict[str, Tensor] = {}
            if m is None:  # line 1: a_0 := X, the image itself is the variable
                holder["a"] = self.inputs.detach().clone().requires_grad_(True)
                # later stages keep forwarding from this (then frozen) image
                self.network_input = lambda h=holder: h["a"].clone()
                out, rec = self.record(None, plan)
                new_plan, versions = {}, []
            else:
                def take(module, args, o, h=holder, name=name):
                    # line 3: a_l^(0) := Forward(a_{l-1}^(T)).  The model gets a copy, so an
                    # in-place op after the pivot cannot touch the leaf variable.
                    if not isinstance(o, Tensor):
                        raise ValueError(f"pivot layer {name!r} returns {type(o).__name__}, not a tensor")
                    h["a"] = o.detach().clone().requires_grad_(True)
                    return h["a"].clone()

                hook = m.register_forward_hook(take)
                try:
                    out, rec = self.record(m, plan)
                finally:
                    hook.remove()
                new_plan, versions = self.plan(rec, set(frozen) | {m})
                for f, a_f in frozen.items():
                    new_plan[f] = [_Live(lambda a_f=a_f: a_f.clone())]
                new_plan[m] = [_Live(lambda h=holder: h["a"].clone())]  # line 8 forwards from a_l
            if i == 0:
                self.validate(rec)
            _check_versions(versions)
            self.emit(out)
            plan = new_plan
            a = holder["a"]
            opt = _make_optimizer(self.optimizer, [a], self.lr, self.opt_kwargs)
            for s in range(self.steps):
                self.step(opt, [a], self.loss(out, desc), desc)  # lines 5-7
                if s == self.steps - 1:
                    break  # the next stage's first pass (line 3) is this stage's last forward
                out = self.forward(plan)  # line 8
                _check_versions(versions)
                self.t += 1
                self.emit(out)
            self.t += 1
            a.requires_grad_(False)
            if m is not None:
                frozen[m] = a
        out = self.forward(plan, grad=False)  # line 11
        _check_versions(versions)
        self.loss(out, repr(self.names[-1]), grad=False)
        self.emit(out)
        return out


def feedback_prop(
    model: nn.Module,
    inputs: Tensor,
    known_loss: KnownLoss,
    layers: str | list[str] | tuple[str, ...],
    method: str = "rf",
    steps: int = 10,
    lr: float = 3e-3,
    optimizer: str = "adam",
    *,
    callback: Callback | None = None,
    **optimizer_kwargs,
) -> Outputs:
    """Feedback-prop inference (§3): refine the pivot activations with the known loss, return
    the outputs of a forward pass with the refined activations (eqs. 2, 4; Algorithms 1-2).

    Args:
        model: any ``nn.Module`` returning a tensor or a dict of tensors.  Run in eval mode;
            the train/eval flag of every submodule is restored afterwards.
        inputs: the image batch ``[B, 3, H, W]`` (a tuple is passed as positional arguments;
            then ``"input"`` cannot be a pivot).
        known_loss: ``outputs -> Tensor[B]``, L(Y_k, Ŷ_k) per sample (see
            :func:`multilabel_known_loss`, :func:`multiclass_known_loss`).  The objective is its
            sum over the batch, so a sample's result does not depend on its batch.
        layers: pivots in topological order: ``"input"``, module names of
            ``model.named_modules()`` or paper names (``conv13``; :mod:`topdown.layers`).
        method: ``"lf"`` (Algorithm 1) or ``"rf"`` (Algorithm 2).
        steps: updates T per pivot (LF) or of all residuals together (RF).
        lr: update rate λ.
        optimizer: ``"sgd"``, ``"momentum"`` (SGD, momentum 0.9 unless given), ``"adam"``,
            ``"adagrad"``; ``optimizer_kwargs`` go to the torch optimizer (``weight_decay``,
            ``betas``, ...).  The reference code used Adam, lr 3e-3, weight decay 1e-4, 10 steps.
        callback: ``callback(t, outputs)`` with detached outputs after each update, from the
            forward passes the method makes anyway (no extra cost).  ``t = 0`` is the plain
            forward.  RF: ``t = 1..steps``.  LF: ``t`` counts inner iterations over all layers,
            ``t = 1..steps * len(layers)``; the outputs at the end of one layer's updates are
            the start of the next layer's (Algorithm 1 line 3), so they are reported once.

    Cost: the part before the first pivot runs once; every iteration is one truncated forward
    and one truncated backward from the (current, for LF) pivot, plus one last forward.

    Returns:
        The detached outputs (tensor or dict) of the last forward pass.

    Raises:
        ValueError: unknown method/optimizer, bad or badly ordered pivot layer, bad loss shape.
        FloatingPointError: non-finite known loss or pivot activations (names method, pivot and
            iteration).
    """
    if method not in METHODS:
        raise ValueError(f"unknown feedback-prop method {method!r}; choose from {METHODS}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown feedback-prop optimizer {optimizer!r}; choose from {OPTIMIZERS}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("feedback_prop needs at least one pivot layer")
    resolved = resolve_layers(model, names)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"pivot layers {names} name the same module twice ({resolved})")
    if INPUT in resolved[1:]:
        raise ValueError(f"'input' can only be the first pivot layer; got {names}")
    if resolved[0] == INPUT and not isinstance(inputs, Tensor):
        raise ValueError("the 'input' pivot needs the inputs as a single tensor")
    pivots = [None if r == INPUT else model.get_submodule(r) for r in resolved]

    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    needs_grad = [p.requires_grad for p in params]
    delivered = [0]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            x = _plain(inputs)
            if steps == 0:
                with torch.no_grad():
                    out = model(*x) if isinstance(x, (tuple, list)) else model(x)
                if callback is not None:
                    callback(0, _detach(out))
                return _detach(out)
            for use_cache in (True, False):
                run = _Run(model, x, known_loss, names, pivots, method, int(steps), lr, optimizer,
                           optimizer_kwargs, callback, use_cache, delivered)
                try:
                    out = run.rf() if method == "rf" else run.lf()
                    return _detach(out)
                except _StaleCache:
                    if not use_cache:
                        raise RuntimeError("feedback_prop: the model changes the pivot activations in place between passes")
                    warnings.warn(
                        f"{type(model).__name__} changes a tensor before the pivot in place; feedback_prop "
                        "re-runs the whole network in every iteration for this call",
                        RuntimeWarning, stacklevel=2,
                    )
    finally:
        for p, r in zip(params, needs_grad):
            p.requires_grad_(r)
        for m, training in modes.items():
            m.training = training  # per module: Module.train() would recurse into the children
