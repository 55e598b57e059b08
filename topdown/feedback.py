"""Feedback-prop inference (Wang et al., CVPR 2018, §3): refine intermediate activations
with the loss on the known outputs, then read the unknown outputs off one more forward pass.

* ``method="lf"`` — layer-wise feedback-prop, Algorithm 1 (§3.2): the pivot activations
  ``a_l`` are optimised one layer at a time, in topological order; after ``steps`` updates
  ``a_l`` is frozen and the next pivot starts from a forward pass of it.
* ``method="rf"`` — residual feedback-prop, Algorithm 2 (§3.3): every pivot gets an additive
  feedback residual, ``a_l = f_l(a_{l-1}) + r_l`` (eq. 5), and all residuals are updated
  together by one truncated backward pass per iteration.

Single-layer feedback-prop (eqs. 3-4) is either method with one pivot; ``layers=["input"]``
optimises the image itself (eqs. 1-2).  A pivot is a module's output, or one call of a module
that runs several times in a forward pass (``"layer3.0.relu#0"``, :mod:`topdown.layers`): the
paper counts activations inside residual blocks (ResNet-18 conv10, ResNet-50 conv20), and
torchvision reuses one ReLU module per block.

How the cost stays at the truncated network (§6)
------------------------------------------------
The first full forward pass is recorded with hooks on every module.  The modules whose call
finished by the end of the pivot's call and whose caller was still running at that moment
(the maximal calls of the prefix, the pivot included) keep their outputs.  During the
iterations those modules get a temporary instance ``forward`` that hands back the cached
output instead of computing (a module called again later runs its real forward) and their
forward hooks are set aside (the cached output already went through them), so each
iteration only pays for the network after the pivot.  Replay is per call: a module whose
first calls are cached runs its real forward, hooks included, for its later calls.  RF replays ``f_1(a_0) + r_1`` for the
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

from topdown.layers import INPUT, resolve_layers, split_call

METHODS = ("lf", "rf")
OPTIMIZERS = ("sgd", "momentum", "adam", "adagrad")

Outputs = Any  # a Tensor or a dict (or nested tuple/list/dict) of Tensors
KnownLoss = Callable[[Outputs], Tensor]
Callback = Callable[[int, Outputs], None]
Pivot = tuple[nn.Module, int | None]  # a module and which of its calls (None: the only one)


class StopFeedback(Exception):
    """Raised by a ``feedback_prop`` callback to end the call after the iteration it was given.

    ``feedback_prop`` then returns the outputs of that iteration: an evaluation that reports
    iteration t of a longer LF schedule (Algorithm 1 with T per pivot) need not pay for the rest.
    """


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


_RUN = object()  # plan entry: this call of the module computes for real (no cached value)


# ---------------------------------------------------------------------------------------
# Recording the prefix and replaying it from the cache
# ---------------------------------------------------------------------------------------

class _Recorder:
    """Hooks on every module for one forward pass.

    Keeps the outputs of the maximal calls that have finished when the pivot call finishes
    (the part of the network that the iterations need not recompute), and counts the calls
    of every pivot module to check which calls exist and in which order they finish.
    """

    def __init__(self, model: nn.Module, pivot: Pivot | None, pivots: list[Pivot]):
        self.pivot = pivot
        self.done = pivot is None
        self.frames: list[list[tuple]] | None = [[]]
        self.inputs: list[list[tuple[Tensor, int]]] = []  # versions of each running call's inputs
        self.cached: list[tuple[nn.Module, Any]] = []
        self.versions: list[list[tuple[Tensor, int]]] = []  # per cached entry
        self.mutated: list[bool] = []
        self.calls = {m: 0 for m, _ in pivots}
        self.calls_at_pivot: dict[nn.Module, int] = {}
        self.ends: list[tuple[nn.Module, int]] = []
        self.handles = []
        for m in model.modules():
            # appended: the recorded output is the one the caller gets, after the user's hooks
            self.handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args, kwargs):
        if not self.done:
            self.frames.append([])
            self.inputs.append([(t, t._version) for t in _tensors((args, kwargs))])

    def _post(self, module, args, output):
        call = None
        if module in self.calls:
            call = self.calls[module]
            self.calls[module] += 1
            self.ends.append((module, call))
        if self.done:
            return
        self.frames.pop()  # the children of a finished call are inside it: drop their outputs
        changed = [(t, t._version - v) for t, v in self.inputs.pop() if t._version != v]  # in-place on its inputs
        self.frames[-1].append((module, output, [(t, t._version) for t in _tensors(output)], changed))
        if module is self.pivot[0] and call == (self.pivot[1] or 0):
            self.done = True
            entries = [rec for frame in self.frames for rec in frame]
            self.cached = [(m, out) for m, out, _, _ in entries]
            # the values the iterations must see: later in-place changes make the cache stale
            self.versions = [[(t, t._version) for t in _tensors(out)] for m, out in self.cached]
            self.mutated = [self._changed_by_code(i, entries) for i in range(len(entries))]
            self.calls_at_pivot = dict(self.calls)
            self.frames = None

    @staticmethod
    def _changed_by_code(i: int, entries: list[tuple]) -> bool:
        """Did plain code (not a cached module call) change entry i's output in place before the pivot?

        Such code runs again in every iteration (a residual block's ``out += identity`` on bn2's
        output), so the call must be recomputed rather than replayed.  Changes made by later
        cached calls (an in-place ReLU) do not re-run: the cache then holds the final value.
        """
        for t, v in entries[i][2]:
            delta = t._version - v
            if delta and delta > sum(d for _, _, _, changed in entries[i + 1:] for u, d in changed if u is t):
                return True
        return False

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _check_versions(versions: list[tuple[Tensor, int]]) -> None:
    for t, v in versions:
        if t._version != v:
            raise _StaleCache


@contextmanager
def _replayed(plan: dict[nn.Module, list[Any]], seen: dict[nn.Module, int] | None = None):
    """Temporarily make each planned module return its cached outputs for its first calls.

    Entry ``i`` of ``plan[m]`` answers the ``i``-th call of ``m`` in the pass: a cached output,
    a :class:`_Live` value, or ``_RUN``.  The module's forward hooks are set aside meanwhile:
    the cached outputs already went through them, and without hooks ``Module.__call__`` takes
    its fast path.  A call with ``_RUN`` or beyond the entries runs the real module with its
    hooks.  ``seen`` counts the replayed calls of every planned module, so the pivot hooks of
    :class:`_Run` know which call of their module they are looking at.
    """
    saved = []
    try:
        for m, entries in plan.items():
            # plain instance attributes, set through __dict__: Module.__setattr__ is slow
            # enough to show up when the truncated network is small
            d = m.__dict__
            own = d.get("forward", None)
            hooks, pre_hooks = d["_forward_hooks"], d["_forward_pre_hooks"]
            saved.append((m, own, hooks, pre_hooks))
            d["_forward_hooks"], d["_forward_pre_hooks"] = OrderedDict(), OrderedDict()
            count = [0]

            def forward(*args, _m=m, _d=d, _entries=entries, _count=count, _own=own, _hooks=hooks,
                        _pre=pre_hooks, **kwargs):
                i = _count[0]
                _count[0] += 1
                e = _entries[i] if i < len(_entries) else _RUN
                if e is not _RUN:
                    if seen is not None:
                        seen[_m] = seen.get(_m, 0) + 1
                    return e.fn() if isinstance(e, _Live) else e
                # the real module, with the hooks set aside (the outer call already ran the
                # hooks added while replaying, e.g. a recorder's)
                here = _d["forward"], _d["_forward_hooks"], _d["_forward_pre_hooks"]
                _d["_forward_hooks"], _d["_forward_pre_hooks"] = _hooks, _pre
                if _own is None:
                    del _d["forward"]
                else:
                    _d["forward"] = _own
                try:
                    return _m(*args, **kwargs)
                finally:
                    _d["forward"], _d["_forward_hooks"], _d["_forward_pre_hooks"] = here

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
        self.names, self.pivots = names, pivots  # user names, (module, call) pairs (None = the image)
        self.method, self.steps, self.lr = method, steps, lr
        self.optimizer, self.opt_kwargs = optimizer, opt_kwargs
        self.callback, self.use_cache = callback, use_cache
        self.delivered = delivered  # [n, outputs]: iterations already delivered (by an earlier attempt too)
        self.network_input: Callable[[], Tensor] | None = None  # set when the image is a pivot
        self.seen: dict[nn.Module, int] = {}  # calls of each module so far in the current pass
        self.t = 0

    # -- pieces -------------------------------------------------------------------------
    def forward(self, plan, grad: bool = True):
        with _replayed(plan, self.seen), torch.set_grad_enabled(grad):
            return self._call()

    def _call(self):
        self.seen.clear()
        x = self.inputs if self.network_input is None else self.network_input()
        return self.model(*x) if isinstance(x, (tuple, list)) else self.model(x)

    def emit(self, outputs):
        if self.t >= self.delivered[0]:
            self.delivered[0] = self.t + 1
            self.delivered[1] = _detach(outputs)
            if self.callback is not None:
                self.callback(self.t, self.delivered[1])

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

    def pivot_hooks(self, fns: dict[int, Callable[[int, Any], Any]]) -> list:
        """One forward hook per pivot module; ``fns[i](i, out)`` replaces the output of pivot i's call.

        The hook counts the module's calls in the pass (replayed calls are counted by
        :func:`_replayed`), so a pivot ``module#k`` touches the k-th call only.
        """
        by_module: dict[nn.Module, dict[int, int]] = {}
        for i in fns:
            m, k = self.pivots[i]
            by_module.setdefault(m, {})[k or 0] = i

        def make(m, calls):
            def hook(module, args, out):
                k = self.seen.get(m, 0)
                self.seen[m] = k + 1
                i = calls.get(k)
                return out if i is None else fns[i](i, out)
            return hook

        return [m.register_forward_hook(make(m, calls)) for m, calls in by_module.items()]

    def record(self, pivot: Pivot | None, plan):
        """One forward pass that records the prefix of ``pivot`` (and is iteration 0 of its stage)."""
        with _replayed(plan, self.seen):
            # hooks go on after the replay has set the planned modules' own hooks aside
            rec = _Recorder(self.model, pivot, [p for p in self.pivots if p is not None])
            try:
                out = self._call()
            finally:
                rec.remove()
        return out, rec

    def validate(self, rec: _Recorder):
        for name, p in zip(self.names, self.pivots):
            if p is None:
                continue
            m, k = p
            n = rec.calls[m]
            if k is None and n != 1:
                calls = f"; name one call as '{name}#k', k = 0..{n - 1}" if n > 1 else ""
                raise ValueError(
                    f"pivot layer {name!r} is called {n} times in one forward pass of "
                    f"{type(self.model).__name__}{calls}"
                )
            if k is not None and k >= n:
                raise ValueError(f"pivot layer {name!r}: the module is called {n} time(s) in one forward pass "
                                 f"of {type(self.model).__name__}, so its calls are #0..#{n - 1}")
        wanted = [(m, k or 0) for m, k in (p for p in self.pivots if p is not None)]
        order = [e for e in rec.ends if e in wanted]
        if order != wanted:
            by_call = {(m, k or 0): n for n, (m, k) in ((n, p) for n, p in zip(self.names, self.pivots) if p)}
            raise ValueError(
                f"pivot layers must be listed in topological (forward) order: got {self.names}, "
                f"the forward pass finishes them as {[by_call[e] for e in order]}"
            )

    def plan(self, rec: _Recorder, live: dict[tuple[nn.Module, int], Callable[[], Tensor]]) -> tuple[dict, list]:
        """Entries per module for the replay, and the (tensor, version) pairs that must stay unchanged.

        ``live`` gives the pivot calls whose value is a variable (:class:`_Live`); they are exempt
        from the version check: RF adds its residual to a new tensor and LF hands out copies, so
        the model never sees those tensors.  Without the cache the other calls run for real, and
        so do the calls whose output the model changed in place before the pivot finished.
        """
        for m, _ in (p for p in self.pivots if p is not None):
            planned = sum(1 for c, _ in rec.cached if c is m)
            if planned and planned != rec.calls_at_pivot.get(m, planned):
                raise ValueError(f"pivot module {type(m).__name__} is also called inside another module before the "
                                 "pivot; feedback_prop cannot tell its calls apart there: pick a module that runs "
                                 "at one nesting level")
        plan: dict[nn.Module, list[Any]] = {}
        versions: list[tuple[Tensor, int]] = []
        for (m, out), vers, mutated in zip(rec.cached, rec.versions, rec.mutated):
            entries = plan.setdefault(m, [])
            fn = live.get((m, len(entries)))
            if fn is not None:
                entries.append(_Live(fn))
            elif self.use_cache and not mutated:
                entries.append(out)
                versions += vers
            else:
                entries.append(_RUN)
        return {m: e for m, e in plan.items() if any(x is not _RUN for x in e)}, versions

    # -- Algorithm 2 ----------------------------------------------------------------------
    def rf(self):
        residuals: dict[int, Tensor] = {}
        first_raw: list[Tensor] = []
        desc = str(self.names)

        def residual(i, out):
            if not isinstance(out, Tensor):
                raise ValueError(f"pivot layer {self.names[i]!r} returns {type(out).__name__}, not a tensor")
            if i not in residuals:  # line 1: r^(0) := 0, shaped like the activation
                residuals[i] = torch.zeros_like(out, requires_grad=True)
                if i == 0:
                    first_raw.append(out)  # f_1(a_0) does not change: the iterations reuse it
            return out + residuals[i]  # eq. 5

        if self.pivots[0] is None:  # a_0 = X + r_0
            x = self.inputs
            residuals[0] = torch.zeros_like(x, requires_grad=True)
            self.network_input = lambda: x + residuals[0]
        hooks = self.pivot_hooks({i: residual for i, p in enumerate(self.pivots) if p is not None})
        try:
            first = self.pivots[0]
            out, rec = self.record(first, {})
            self.validate(rec)
            live = {} if first is None else {(first[0], first[1] or 0): lambda: first_raw[0] + residuals[0]}
            plan, versions = self.plan(rec, live)
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
        frozen: dict[tuple[nn.Module, int], Tensor] = {}
        out = None
        for i, (name, p) in enumerate(zip(self.names, self.pivots)):
            desc = repr(name)
            holder: dict[str, Tensor] = {}
            if p is None:  # line 1: a_0 := X, the image itself is the variable
                holder["a"] = self.inputs.detach().clone().requires_grad_(True)
                # later stages keep forwarding from this (then frozen) image
                self.network_input = lambda h=holder: h["a"].clone()
                out, rec = self.record(None, plan)
                new_plan, versions = {}, []
            else:
                def take(j, o, h=holder, name=name):
                    # line 3: a_l^(0) := Forward(a_{l-1}^(T)).  The model gets a copy, so an
                    # in-place op after the pivot cannot touch the leaf variable.
                    if not isinstance(o, Tensor):
                        raise ValueError(f"pivot layer {name!r} returns {type(o).__name__}, not a tensor")
                    h["a"] = o.detach().clone().requires_grad_(True)
                    return h["a"].clone()

                hooks = self.pivot_hooks({i: take})
                try:
                    out, rec = self.record(p, plan)
                finally:
                    for h in hooks:
                        h.remove()
                live = {key: (lambda a_f=a_f: a_f.clone()) for key, a_f in frozen.items()}
                live[(p[0], p[1] or 0)] = lambda h=holder: h["a"].clone()  # line 8 forwards from a_l
                new_plan, versions = self.plan(rec, live)
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
            if p is not None:
                frozen[(p[0], p[1] or 0)] = a
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
            ``model.named_modules()``, one call of a module that runs several times
            (``"layer3.0.relu#0"``) or paper names (``conv13``, ``conv10``; :mod:`topdown.layers`).
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
            The callback may raise :class:`StopFeedback` to end the call after iteration t;
            the outputs of t are then returned.

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
    calls = [(module, call or 0) for module, call in map(split_call, resolved)]
    if len(set(calls)) != len(calls):
        raise ValueError(f"pivot layers {names} name the same module call twice ({resolved})")
    if INPUT in resolved[1:]:
        raise ValueError(f"'input' can only be the first pivot layer; got {names}")
    if resolved[0] == INPUT and not isinstance(inputs, Tensor):
        raise ValueError("the 'input' pivot needs the inputs as a single tensor")
    pivots: list[Pivot | None] = []
    for r in resolved:
        if r == INPUT:
            pivots.append(None)
        else:
            module, call = split_call(r)
            pivots.append((model.get_submodule(module), call))

    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    needs_grad = [p.requires_grad for p in params]
    delivered: list[Any] = [0, None]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            x = _plain(inputs)
            if steps == 0:
                with torch.no_grad():
                    out = _detach(model(*x) if isinstance(x, (tuple, list)) else model(x))
                if callback is not None:
                    try:
                        callback(0, out)
                    except StopFeedback:
                        pass
                return out
            for use_cache in (True, False):
                run = _Run(model, x, known_loss, names, pivots, method, int(steps), lr, optimizer,
                           optimizer_kwargs, callback, use_cache, delivered)
                try:
                    out = run.rf() if method == "rf" else run.lf()
                    return _detach(out)
                except StopFeedback:
                    return delivered[1]
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
