"""Invariants of feedback-prop inference (topdown.feedback; paper §3, Algorithms 1-2)."""
import warnings

import pytest
import torch
from torch import nn

from topdown.backbones import build_backbone
from topdown.feedback import StopFeedback, feedback_prop, multiclass_known_loss, multilabel_known_loss
from topdown.layers import resolve_layer


class Net(nn.Module):
    """Tiny convnet whose forward is not a Sequential: a skip connection and plain tensor code."""

    def __init__(self, k=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block1 = nn.Conv2d(4, 4, 3, padding=1)
        self.block2 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6, k)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(self.block1(h) + h)
        h = self.block2(h)
        return self.head(h.mean((2, 3)))


class TwoHeads(Net):
    """Multi-task model (§4.2-4.4): a multi-label head and a single-label head on one trunk."""

    def __init__(self):
        super().__init__(k=5)
        self.scene = nn.Linear(6, 3)

    def forward(self, x):
        h = self.block2(torch.relu(self.block1(self.stem(x))))
        p = h.mean((2, 3))
        return {"objects": self.head(p), "scene": self.scene(p)}


def _data(b=3, k=6, size=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, size, size, generator=g, dtype=dtype)
    known = torch.arange(0, k, 2)
    values = (torch.rand(b, known.numel(), generator=g) > 0.5).to(dtype)
    return x, known, values


def _net(cls=Net, seed=0):
    torch.manual_seed(seed)
    return cls().double().eval()


def _resnet(k=6, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return build_backbone("resnet18", k).to(dtype).eval()


def _on_call(model, name, fn):
    """Hook ``fn(out)`` on one call of a module, ``"name"`` or ``"name#k"`` (k-th call of a forward pass)."""
    module, _, k = name.partition("#")
    k, count = int(k or 0), [0]
    handles = [model.register_forward_pre_hook(lambda *a: count.__setitem__(0, 0))]  # a new pass

    def hook(mod, a, out):
        count[0] += 1
        return fn(out) if count[0] - 1 == k else None

    handles.append(model.get_submodule(module).register_forward_hook(hook))
    return handles


def _naive(model, x, loss, layers, method, steps, lr):
    """Algorithms 1 and 2 written plainly: hooks on the pivot calls and a full forward every time."""
    params = [p.requires_grad_(False) for p in model.parameters()]
    hooks = []
    try:
        if method == "rf":
            rs = {}
            for i, name in enumerate(layers):
                hooks += _on_call(model, name, lambda o, i=i: o + rs.setdefault(i, torch.zeros_like(o, requires_grad=True)))
            model(x)
            opt = torch.optim.Adam(list(rs.values()), lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                loss(model(x)).sum().backward()
                opt.step()
            return model(x).detach()
        values = {}
        for i, name in enumerate(layers):
            o = {}
            h = _on_call(model, name, lambda out: o.setdefault("a", out.detach().clone().requires_grad_()))
            model(x)
            for handle in h:
                handle.remove()
            values[i] = o["a"]
            hooks += _on_call(model, name, lambda out, i=i: values[i])
            opt = torch.optim.Adam([values[i]], lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                loss(model(x)).sum().backward()
                opt.step()
            values[i] = values[i].detach()
        return model(x).detach()
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.requires_grad_(True)


@pytest.mark.parametrize("method", ["lf", "rf"])
def test_matches_plain_algorithm(method):
    """The prefix cache and truncated passes give exactly what Algorithms 1/2 give with full passes."""
    model, (x, known, values) = _net(), _data()
    loss = multilabel_known_loss(known, values)
    layers = ["stem", "block1", "block2.0"]
    got = feedback_prop(model, x, loss, layers, method=method, steps=4, lr=0.05)
    want = _naive(model, x, loss, layers, method, steps=4, lr=0.05)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["lf", "rf"])
@pytest.mark.parametrize("layers", [
    ["conv6", "conv10"],                         # paper names inside blocks (Figure 4's ResNet-18 conv10)
    ["layer2.0.relu#0", "layer2.0.relu#1"],      # two calls of one module
    ["layer2.0.conv2", "layer2.0.relu#1"],       # a pivot call of a module whose first call is cached
])
def test_pivots_inside_residual_blocks_match_plain_algorithm(method, layers):
    model, (x, known, values) = _resnet(), _data(b=2, size=16)
    loss = multilabel_known_loss(known, values)
    got = feedback_prop(model, x, loss, layers, method=method, steps=3, lr=0.05)
    want = _naive(model, x, loss, [resolve_layer(model, n) for n in layers], method, steps=3, lr=0.05)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    with torch.no_grad():
        assert not torch.allclose(got, model(x))


@pytest.mark.parametrize("method", ["lf", "rf"])
def test_model_untouched(method):
    model, (x, known, values) = _resnet(dtype=torch.float32), _data(size=32, dtype=torch.float32)
    model.train()
    model.layer2.eval()  # a mixed mode must come back as it was
    model.fc.weight.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    feedback_prop(model, x, multilabel_known_loss(known, values), ["layer3", "layer4"], method=method, steps=2, lr=0.1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model.fc.weight.requires_grad and model.fc.bias.requires_grad


@pytest.mark.parametrize("method", ["lf", "rf"])
def test_prefix_runs_once(method):
    model, (x, known, values) = _resnet(dtype=torch.float32), _data(b=2, size=32, dtype=torch.float32)
    names = ["conv1", "bn1", "maxpool", "layer1", "layer2", "layer2.1.conv2", "layer3", "layer4"]
    calls, computed = dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    for n in names:
        m = model.get_submodule(n)
        m.register_forward_hook(lambda m, a, o, n=n: calls.__setitem__(n, calls[n] + 1))

        def counted(*a, _real=m.forward, n=n):  # counts real computations, not just calls
            computed[n] += 1
            return _real(*a)

        m.forward = counted
    feedback_prop(model, x, multilabel_known_loss(known, values), ["layer3", "layer4"], method=method, steps=3)
    stem = names[:6]
    assert all(calls[n] == 1 and computed[n] == 1 for n in stem), (calls, computed)
    assert all(m.forward.__name__ == "counted" for m in map(model.get_submodule, names))  # restored
    calls = computed
    # the first pivot's own output is cached too: RF adds r_3 to it, LF replays frozen a_3 in layer4's stage
    assert calls["layer3"] == 1
    # RF: the first pass and one per update; LF: 3 passes in layer3's stage and the one that starts
    # layer4's stage, which then replays a_4
    assert calls["layer4"] == 4


@pytest.mark.parametrize("method", ["lf", "rf"])
@pytest.mark.parametrize("net, layers, size", [(_net, ["input", "stem", "block2"], 8), (_resnet, ["conv9", "conv13"], 32)])
def test_batch_equals_samples(method, net, layers, size):
    model, (x, known, values) = net(), _data(b=2, size=size)
    kw = dict(method=method, steps=2, lr=0.05, optimizer="adam", weight_decay=1e-4)
    out = feedback_prop(model, x, multilabel_known_loss(known, values), layers, **kw)
    for i in range(len(x)):
        one = feedback_prop(model, x[i:i + 1], multilabel_known_loss(known, values[i:i + 1]), layers, **kw)
        torch.testing.assert_close(one[0], out[i], rtol=0, atol=1e-6)


def test_zero_steps_is_plain_forward():
    model, (x, known, values) = _net(), _data()
    with torch.no_grad():
        want = model(x)
    seen = []
    got = feedback_prop(model, x, multilabel_known_loss(known, values), ["block1"], steps=0, callback=lambda t, o: seen.append(t))
    assert torch.equal(got, want) and seen == [0]


def test_lf_equals_rf_with_one_layer_and_sgd():
    model, (x, known, values) = _net(), _data()
    loss = multilabel_known_loss(known, values)
    lf = feedback_prop(model, x, loss, ["block1"], method="lf", steps=5, lr=0.5, optimizer="sgd")
    rf = feedback_prop(model, x, loss, ["block1"], method="rf", steps=5, lr=0.5, optimizer="sgd")
    torch.testing.assert_close(lf, rf, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert not torch.allclose(lf, model(x))  # the updates did something


@pytest.mark.parametrize("method", ["lf", "rf"])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adagrad"])
def test_known_loss_decreases(method, optimizer):
    model, (x, known, values) = _net(), _data()
    loss = multilabel_known_loss(known, values)
    with torch.no_grad():
        before = loss(model(x))
    after = loss(feedback_prop(model, x, loss, ["stem", "block1"], method=method, steps=5, lr=0.05, optimizer=optimizer))
    assert (after < before).all()


def test_callback_sees_every_iteration():
    model, (x, known, values) = _net(), _data()
    loss = multilabel_known_loss(known, values)
    for method, total in [("rf", 4), ("lf", 8)]:
        seen = []
        out = feedback_prop(model, x, loss, ["stem", "block1"], method=method, steps=4, lr=0.05,
                            callback=lambda t, o: seen.append((t, o)))
        assert [t for t, _ in seen] == list(range(total + 1))
        assert not seen[-1][1].requires_grad and torch.equal(seen[-1][1], out)
        with torch.no_grad():
            assert torch.equal(seen[0][1], model(x))


@pytest.mark.parametrize("method", ["lf", "rf"])
def test_dict_model_known_head_refines_unknown_head(method):
    model, (x, _, _) = _net(TwoHeads), _data()
    scene = torch.tensor([0, 2, 1])
    loss = multiclass_known_loss(scene, head="scene")
    with torch.no_grad():
        before = model(x)
    after = feedback_prop(model, x, loss, ["block1"], method=method, steps=5, lr=0.1)
    assert set(after) == {"objects", "scene"}
    assert (loss(after) < loss(before)).all()
    assert not torch.allclose(after["objects"], before["objects"])
    # the multi-label helper reads one head too, with a per-sample mask
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, :2] = True
    ml = multilabel_known_loss(mask, torch.ones(3, 5, dtype=torch.float64), key="objects")
    assert ml(before).shape == (3,)
    with pytest.raises(ValueError, match="scene"):
        multilabel_known_loss(mask, torch.ones(3, 5))(before)


def test_layer_names():
    model, (x, known, values) = _resnet(dtype=torch.float32), _data(b=1, size=32, dtype=torch.float32)
    loss = multilabel_known_loss(known, values)
    a = feedback_prop(model, x, loss, ["conv13"], steps=2)
    b = feedback_prop(model, x, loss, ["layer3"], steps=2)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="conv99"):
        feedback_prop(model, x, loss, ["conv99"])
    with pytest.raises(ValueError, match="topological"):
        feedback_prop(model, x, loss, ["layer3", "layer2"])
    with pytest.raises(ValueError, match=r"relu' is called 2 times.*'layer1.0.relu#k', k = 0..1"):
        feedback_prop(model, x, loss, ["layer1.0.relu"])  # a block's ReLU runs twice
    with pytest.raises(ValueError, match="calls are #0..#1"):
        feedback_prop(model, x, loss, ["layer1.0.relu#2"])
    with pytest.raises(ValueError, match="same module call twice"):
        feedback_prop(model, x, loss, ["layer1.0.relu", "layer1.0.relu#0"])


@pytest.mark.parametrize("method", ["lf", "rf"])
def test_callback_can_stop_the_schedule_at_an_iteration(method):
    model, (x, known, values) = _net(), _data()
    loss = multilabel_known_loss(known, values)
    seen = {}
    feedback_prop(model, x, loss, ["stem", "block1"], method=method, steps=3, lr=0.05,
                  callback=lambda t, o: seen.__setitem__(t, o))

    def stop_at_2(t, o):
        if t == 2:
            raise StopFeedback

    got = feedback_prop(model, x, loss, ["stem", "block1"], method=method, steps=3, lr=0.05, callback=stop_at_2)
    assert torch.equal(got, seen[2]) and not torch.equal(got, seen[max(seen)])


def test_bad_method_and_optimizer():
    model, (x, known, values) = _net(), _data()
    loss = multilabel_known_loss(known, values)
    with pytest.raises(ValueError, match="'lf', 'rf'"):
        feedback_prop(model, x, loss, ["stem"], method="bp")
    with pytest.raises(ValueError, match="'sgd', 'momentum', 'adam', 'adagrad'"):
        feedback_prop(model, x, loss, ["stem"], optimizer="lbfgs")
    with pytest.raises(ValueError, match=r"\[B\]"):
        feedback_prop(model, x, lambda o: loss(o).mean(), ["stem"])


@pytest.mark.parametrize("method", ["lf", "rf"])
def test_inference_mode(method):
    model, (x, known, values) = _net(), _data()
    want = feedback_prop(model, x, multilabel_known_loss(known, values), ["input", "block1"], method=method, steps=2)
    with torch.inference_mode():  # as in Lightning's test loop: inputs and targets are inference tensors
        xi, ki, vi = x.clone(), known.clone(), values.clone()
        got = feedback_prop(model, xi, multilabel_known_loss(ki, vi), ["input", "block1"], method=method, steps=2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lf", "rf"])
def test_non_finite_raises(method):
    model, (x, known, values) = _net(), _data()
    loss = multilabel_known_loss(known, values)
    calls = [0]

    def breaks_at_third(outputs):
        calls[0] += 1
        value = loss(outputs)
        return value * float("nan") if calls[0] == 3 else value

    with pytest.raises(FloatingPointError, match=r"(?i)" + method + r".*iteration 2.*block1"):
        feedback_prop(model, x, breaks_at_third, ["block1"], method=method, steps=5)
    model.head.bias.data[0] = float("nan")
    with pytest.raises(FloatingPointError, match="iteration 0.*stem"):
        feedback_prop(model, x, loss, ["stem"], method=method, steps=5)


class InPlacePrefix(Net):
    """Changes a module output in place with plain tensor code before the pivot (as a residual
    block's ``out += identity``): that module is recomputed, the rest of the prefix stays cached."""

    def forward(self, x):
        h = self.stem(x)
        h.mul_(0.5)
        h = torch.relu(self.block1(h) + h)
        return self.head(self.block2(h).mean((2, 3)))


class InPlaceAfterPivot(Net):
    """Changes a cached prefix tensor in place after the pivot: the cache must not be reused."""

    def forward(self, x):
        h = self.stem(x)
        a = self.block1(h)
        h.mul_(0.5)
        h = torch.relu(a + h)
        return self.head(self.block2(h).mean((2, 3)))


@pytest.mark.parametrize("method", ["lf", "rf"])
def test_in_place_changes_of_the_prefix(method):
    loss = multilabel_known_loss(*_data()[1:])
    x = _data()[0]
    model = _net(InPlacePrefix)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = feedback_prop(model, x, loss, ["block1", "block2"], method=method, steps=3, lr=0.05)
    torch.testing.assert_close(got, _naive(model, x, loss, ["block1", "block2"], method, steps=3, lr=0.05),
                               rtol=0, atol=1e-10)
    model = _net(InPlaceAfterPivot)
    with pytest.warns(RuntimeWarning, match="in place"):
        got = feedback_prop(model, x, loss, ["block1", "block2"], method=method, steps=3, lr=0.05)
    torch.testing.assert_close(got, _naive(model, x, loss, ["block1", "block2"], method, steps=3, lr=0.05),
                               rtol=0, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the in-place op is after the pivot's own call: no fallback
        feedback_prop(_net(InPlacePrefix), x, loss, ["stem"], method=method, steps=2)
