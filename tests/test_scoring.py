"""FAIR scores against slow, obvious oracles.

U: a per-unit loop with scipy.stats.wasserstein_distance (linear units; equal and unequal class
counts) and a per-channel loop of the sliced definition with the same directions (conv).
R: a per-layer loop of autograd gradients for one layer's weight and bias at a time,
w * dW + b * db per unit, summed over batches, absolute value at the end.
Tolerances: U rtol 1e-4 (float32 activations vs float64 scipy), R 1e-4 of the layer's largest
value (float32 summation order).
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr, wasserstein_distance
from torch import nn

from calibration.errors import CalibrationError, FairEdgeError
from pipeline.models import MLP, VGG, VGG_SMALL_CFG, MobileNet, ResNet, SmallCNN
from pipeline.scores import Scores, ScoringError
from pipeline.scoring import projection_directions, score, unit_view

SPC = 4


def interleaved(n_classes: int, per_class: int, shape: tuple[int, ...], seed: int = 0):
    """Random inputs whose labels are already in the scorer's round-robin order."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes * per_class) % n_classes
    x = torch.randn(len(y), *shape, generator=g) + 0.5 * y.float().view(-1, *([1] * len(shape)))
    return x, y


def capture(model: nn.Module, x: torch.Tensor, names: list[str], where: str = "raw", scores=None):
    """Outputs of each named layer (or its BN / activation) on x, in eval mode, float64."""
    model.eval()
    got: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        target = n
        if scores is not None and scores.layers[n].where == "bn":
            target = scores.layers[n].bn
        if scores is not None and scores.layers[n].where == "act":
            target = scores.layers[n].act

        def hook(mod, inp, out, n=n):
            got.setdefault(n, out.detach().clone().double())

        handles.append(model.get_submodule(target).register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return got


def oracle_u(
    acts: torch.Tensor, kind: str, y: np.ndarray, seed: int, name: str, P: int
) -> np.ndarray:
    """max over class pairs of (mean over directions of) scipy's 1-D W1, one unit at a time."""
    v = unit_view(acts, kind).double().numpy()  # N x C x S
    n, c, s = v.shape
    if s > 1:
        d = projection_directions(seed, name, s, P).double().numpy()
        v = np.einsum("ncs,sp->ncp", v, d)
    classes = np.unique(y)
    out = np.zeros(c)
    for u in range(c):
        best = 0.0
        for a, b in itertools.combinations(classes, 2):
            w = np.mean(
                [wasserstein_distance(v[y == a, u, p], v[y == b, u, p]) for p in range(v.shape[2])]
            )
            best = max(best, w)
        out[u] = best
    return out


def oracle_r(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str], batch_size: int
) -> dict:
    """One layer at a time: |sum over batches of sum(w * dL/dw) + b * dL/db| per output unit."""
    res = {}
    for n in names:
        mod = model.get_submodule(n)
        total = torch.zeros(mod.weight.shape[0], dtype=torch.float64)
        for s in range(0, len(x), batch_size):
            loss = F.cross_entropy(model(x[s : s + batch_size]), y[s : s + batch_size])
            params = [mod.weight] + ([mod.bias] if mod.bias is not None else [])
            grads = torch.autograd.grad(loss, params)
            r = (mod.weight * grads[0]).reshape(mod.weight.shape[0], -1).sum(1).double()
            if mod.bias is not None:
                r += (mod.bias * grads[1]).double()
            total += r.detach()
        res[n] = total.abs().numpy()
    return res


def assert_r_close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * max(want.max(), 1e-12))


# ---------------------------------------------------------------------------- U oracles


def test_linear_u_equal_counts_matches_scipy() -> None:
    model = MLP(in_features=12, hidden=(10, 6), num_classes=4)
    x, y = interleaved(4, 6, (12,))
    s = score(model, (x, y), samples_per_class=6, progress=False)
    acts = capture(model, x, s.names())
    assert s.names() == ["net.1", "net.3"] and s.output_layers == ["net.5"]
    for n in s.names():
        want = oracle_u(acts[n], "linear", y.numpy(), 0, n, 1)
        np.testing.assert_allclose(s[n].U, want, rtol=1e-4, atol=1e-7)


def test_linear_u_unequal_counts_matches_scipy() -> None:
    model = MLP(in_features=8, hidden=(7,), num_classes=6)
    g = torch.Generator().manual_seed(3)
    y = torch.tensor([0] * 5 + [1] * 2 + [2] * 7 + [1] * 1 + [3] * 2 + [4] * 8 + [5] * 6)
    x = torch.randn(len(y), 8, generator=g) + 0.3 * y.float().view(-1, 1)
    s = score(model, (x, y), samples_per_class=8, progress=False)
    assert s.class_counts == [5, 3, 7, 2, 8, 6]
    acts = capture(model, x, s.names())
    want = oracle_u(acts["net.1"], "linear", y.numpy(), 0, "net.1", 1)
    np.testing.assert_allclose(s["net.1"].U, want, rtol=1e-4, atol=1e-7)


def test_conv_u_matches_sliced_loop() -> None:
    model = VGG(cfg=(6, "M", 8), in_channels=2, num_classes=3, hidden=5)
    x, y = interleaved(3, SPC, (2, 8, 8))
    s = score(model, (x, y), samples_per_class=SPC, projections=5, seed=7, progress=False)
    acts = capture(model, x, s.names())
    for n in s.names():
        kind = s[n].kind
        want = oracle_u(acts[n], kind, y.numpy(), 7, n, 5)
        np.testing.assert_allclose(s[n].U, want, rtol=1e-4, atol=1e-7)
    assert s["features.0.0"].positions == 64


@pytest.mark.parametrize("where", ["bn", "act"])
def test_where_bn_act_measures_the_right_tensor(where: str) -> None:
    model = SmallCNN(width=4)  # conv -> BN -> ReLU(inplace); Linear -> ReLU(inplace)
    x, y = interleaved(3, SPC, (1, 28, 28))
    s = score(model, (x, y), samples_per_class=SPC, projections=3, where=where, progress=False)
    assert s["features.0.0"].bn == "features.0.1" and s["features.0.0"].act == "features.0.2"
    assert s["features.0.0"].where == where
    assert s["classifier.1"].where == ("act" if where == "act" else "raw")  # no BN: falls back
    acts = capture(model, x, s.names(), scores=s)
    for n in ("features.0.0", "classifier.1"):
        want = oracle_u(acts[n], s[n].kind, y.numpy(), 0, n, 3)
        np.testing.assert_allclose(s[n].U, want, rtol=1e-4, atol=1e-7)
    if where == "act":  # post-ReLU U differs from raw U
        raw = score(model, (x, y), samples_per_class=SPC, projections=3, progress=False)
        assert not np.allclose(raw["classifier.1"].U, s["classifier.1"].U)


# ---------------------------------------------------------------------------- R oracles


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: MLP(in_features=10, hidden=(8, 6), num_classes=3), (10,)),
        (lambda: SmallCNN(width=4, num_classes=3), (1, 28, 28)),
        (lambda: VGG(VGG_SMALL_CFG[:5], num_classes=3, hidden=8), (3, 16, 16)),
        (lambda: ResNet(blocks=(1, 1), widths=(4, 8), num_classes=3), (3, 12, 12)),
        (lambda: MobileNet(num_classes=3, cfg=((1, 4, 1, 1), (2, 6, 2, 2)), stem=4), (3, 16, 16)),
    ],
    ids=["mlp", "smallcnn", "vgg", "resnet", "mobilenet"],
)
def test_r_matches_per_layer_gradient_loop(make, shape) -> None:
    model = make()
    x, y = interleaved(3, SPC, shape)
    s = score(model, (x, y), samples_per_class=SPC, projections=4, batch_size=5, progress=False)
    model.eval()
    want = oracle_r(model, x, y, s.names(), batch_size=5)  # same batches: 5, 5, 2
    for n in s.names():
        assert_r_close(s[n].R, want[n])
    # every Conv/Linear except the output layer is a candidate
    all_layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert set(s.names()) | set(s.output_layers) == set(all_layers)
    assert len(s.output_layers) == 1


def test_conv1d_and_sequence_linear() -> None:
    """Conv1d maps (C x L) and a Linear applied per position (N x T x F): sliced W1, R summed."""

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3, padding=1)
            self.proj = nn.Linear(4, 5)
            self.head = nn.Linear(5 * 7, 3)

        def forward(self, x):
            h = torch.relu(self.conv(x)).transpose(1, 2)  # N x T x 4
            return self.head(torch.tanh(self.proj(h)).flatten(1))

    model = Seq()
    x, y = interleaved(3, SPC, (2, 7))
    s = score(model, (x, y), samples_per_class=SPC, projections=4, batch_size=5, progress=False)
    assert s.names() == ["conv", "proj"] and s["conv"].positions == 7 and s["proj"].positions == 7
    acts = capture(model, x, s.names())
    for n in s.names():
        want = oracle_u(acts[n], s[n].kind, y.numpy(), 0, n, 4)
        np.testing.assert_allclose(s[n].U, want, rtol=1e-4, atol=1e-7)
    want_r = oracle_r(model, x, y, s.names(), batch_size=5)
    for n in s.names():
        assert_r_close(s[n].R, want_r[n])


def test_reference_compat_uses_train_mode_and_restores_buffers() -> None:
    model = VGG(VGG_SMALL_CFG[:5], num_classes=3, hidden=8)  # BN, no dropout
    x, y = interleaved(3, SPC, (3, 16, 16))
    before = copy.deepcopy(model.state_dict())
    s = score(
        model,
        (x, y),
        samples_per_class=SPC,
        projections=4,
        batch_size=6,
        reference_compat=True,
        progress=False,
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert s.mode == "train"
    train_model = copy.deepcopy(model).train()
    want = oracle_r(train_model, x, y, s.names(), batch_size=6)
    for n in s.names():
        if s[n].bn is None:
            assert_r_close(s[n].R, want[n])
        else:  # BN scale invariance: both are float32 rounding noise around 0
            assert s[n].R.max() < 1e-5 and want[n].max() < 1e-5
    # train mode collapses R of BN-followed convs (scale invariance); eval mode does not
    ev = score(model, (x, y), samples_per_class=SPC, projections=4, batch_size=6, progress=False)
    assert s["features.0.0"].R.max() < 1e-2 * ev["features.0.0"].R.max()


# ---------------------------------------------------------------------------- behaviour


def test_model_left_untouched_and_deterministic() -> None:
    model = SmallCNN(width=4, num_classes=3)
    model.train()
    model.features[0][0].weight.requires_grad_(False)
    model.classifier[1].eval()
    x, y = interleaved(3, SPC, (1, 28, 28))
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    a = score(model, (x, y), samples_per_class=SPC, projections=4, progress=False)
    b = score(model, (x, y), samples_per_class=SPC, projections=4, progress=False)
    c = score(
        model, (x, y), samples_per_class=SPC, projections=4, reference_compat=True, progress=False
    )
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for n in a.names():
        assert np.array_equal(a[n].U, b[n].U) and np.array_equal(a[n].R, b[n].R)
    assert a.names() == c.names()
    d = score(model, (x, y), samples_per_class=SPC, projections=4, seed=1, progress=False)
    assert not np.array_equal(a["features.0.0"].U, d["features.0.0"].U)  # seeded directions


def test_output_layer_found_by_graph_position() -> None:
    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(6, 3)  # defined first, used last
            self.body = nn.Linear(5, 6)
            self.extra = nn.Linear(6, 6)

        def forward(self, x):
            return self.head(torch.relu(self.extra(torch.relu(self.body(x)))))

    x, y = interleaved(3, SPC, (5,))
    s = score(HeadFirst(), (x, y), samples_per_class=SPC, progress=False)
    assert s.output_layers == ["head"] and s.names() == ["body", "extra"]
    assert s.graph["extra"]["producers"] == ["body"] and s.graph["head"]["producers"] == ["extra"]


def test_class_cap_and_batches_iterable() -> None:
    model = MLP(in_features=6, hidden=(5,), num_classes=12)
    x, y = interleaved(12, 3, (6,))
    batches = [(x[i : i + 7], y[i : i + 7]) for i in range(0, len(x), 7)]
    s = score(model, batches, samples_per_class=3, max_classes=5, progress=False)
    t = score(model, (x, y), samples_per_class=3, max_classes=5, progress=False)
    assert len(s.classes) == 5 and s.n_classes_total == 12 and s.classes == sorted(s.classes)
    assert s.classes == t.classes and np.array_equal(s["net.1"].U, t["net.1"].U)
    u = score(model, (x, y), samples_per_class=3, max_classes=5, seed=3, progress=False)
    assert u.classes != s.classes
    full = score(model, (x, y), samples_per_class=2, progress=False)
    assert full.class_counts == [2] * 12


def test_unit_chunks_do_not_change_u(monkeypatch) -> None:
    import pipeline.scoring as scoring

    model = VGG(cfg=(6, "M", 8), in_channels=2, num_classes=4, hidden=5)
    g = torch.Generator().manual_seed(4)
    y = torch.tensor([0, 1, 2, 3] * 3 + [0, 2])  # unequal counts 4, 3, 4, 3
    x = torch.randn(len(y), 2, 8, 8, generator=g)
    whole = score(model, (x, y), samples_per_class=4, projections=5, progress=False)
    monkeypatch.setattr(scoring, "PAIR_CHUNK_ELEMENTS", 1)  # one unit per chunk
    chunked = score(model, (x, y), samples_per_class=4, projections=5, progress=False)
    for n in whole.names():
        np.testing.assert_allclose(chunked[n].U, whole[n].U, rtol=1e-6)
    acts = capture(model, x, ["features.2.0"])
    want = oracle_u(acts["features.2.0"], "conv", y.numpy(), 0, "features.2.0", 5)
    np.testing.assert_allclose(whole["features.2.0"].U, want, rtol=1e-4, atol=1e-7)


def test_calibration_set_input() -> None:
    from calibration.data import CalibrationSet

    model = MLP(in_features=6, hidden=(5,), num_classes=3)
    x, y = interleaved(3, 4, (6,))
    cs = CalibrationSet(inputs=x.numpy(), labels=y.numpy(), class_names=["a", "b", "c"])
    s = score(model, cs, samples_per_class=4, progress=False)
    t = score(model, (x, y), samples_per_class=4, progress=False)
    assert s.classes == [0, 1, 2] and np.array_equal(s["net.1"].U, t["net.1"].U)
    assert np.array_equal(s["net.1"].R, t["net.1"].R)


def test_unlabelled_data_uses_pseudo_labels() -> None:
    model = MLP(in_features=6, hidden=(5,), num_classes=3)
    x, _ = interleaved(3, 10, (6,))
    with torch.no_grad():
        pseudo = model(x).argmax(1)
    s = score(model, [(x, None)], samples_per_class=30, progress=False)
    counts = np.bincount(pseudo.numpy(), minlength=3)
    assert s.class_counts == [int(c) for c in counts if c > 0]
    t = score(model, (x, None), samples_per_class=30, progress=False)  # (X, None) form
    assert t.class_counts == s.class_counts and np.array_equal(t["net.1"].U, s["net.1"].U)


def test_half_precision_model() -> None:
    model = MLP(in_features=10, hidden=(8,), num_classes=3)
    x, y = interleaved(3, SPC, (10,))
    full = score(model, (x, y), samples_per_class=SPC, progress=False)
    half = score(copy.deepcopy(model).half(), (x, y), samples_per_class=SPC, progress=False)
    assert half["net.1"].U.dtype == np.float64 and np.isfinite(half["net.1"].R).all()
    np.testing.assert_allclose(half["net.1"].U, full["net.1"].U, rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(
        half["net.1"].R, full["net.1"].R, rtol=5e-2, atol=5e-2 * full["net.1"].R.max()
    )


def test_save_load_roundtrip(tmp_path) -> None:
    model = ResNet(blocks=(1,), widths=(4,), num_classes=3)
    x, y = interleaved(3, SPC, (3, 8, 8))
    s = score(model, (x, y), samples_per_class=SPC, projections=4, progress=False)
    s.save(tmp_path / "s.npz")
    t = Scores.load(tmp_path / "s.npz")
    assert t.meta() == s.meta()
    for n in s.names():
        assert np.array_equal(s[n].U, t[n].U) and np.array_equal(s[n].R, t[n].R)
    np.save(tmp_path / "bad.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "bad.npz").write_bytes((tmp_path / "bad.npy").read_bytes())
    np.save(tmp_path / "plain.npy", np.arange(3))
    (tmp_path / "plain.npz").write_bytes((tmp_path / "plain.npy").read_bytes())
    (tmp_path / "text.npz").write_text("not scores")
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    for bad in ("bad.npz", "missing.npz", "plain.npz", "text.npz", "other.npz"):
        with pytest.raises(ScoringError):
            Scores.load(tmp_path / bad)


# ---------------------------------------------------------------------------- bad input


def test_bad_input_errors() -> None:
    model = MLP(in_features=4, hidden=(3,), num_classes=2)
    x, y = interleaved(2, 4, (4,))
    cases = [
        ((x, torch.zeros(8, dtype=torch.long)), CalibrationError, "only one class"),
        ((x, torch.tensor([0, 1, 1, 1, 1, 1, 1, 1])), CalibrationError, "fewer than 2"),
        ([], CalibrationError, "empty"),
        ((x[:0], y[:0]), CalibrationError, "empty"),
        ((x, y.float()), CalibrationError, "integers"),
        ((x, y[:5]), CalibrationError, "labels"),
        ((x, y - 1), CalibrationError, ">= 0"),
        ((x, y + 1), CalibrationError, "out of range"),
    ]
    for data, exc, text in cases:
        with pytest.raises(exc, match=text):
            score(model, data, progress=False)
    with pytest.raises(ScoringError, match="no prunable layer"):
        score(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (x, y), progress=False)
    with pytest.raises(ScoringError, match="no Conv1d/Conv2d/Linear"):
        score(nn.Sequential(nn.ReLU()), (x, y), progress=False)
    with pytest.raises(ScoringError, match="where"):
        score(model, (x, y), where="post", progress=False)
    broken = MLP(in_features=4, hidden=(3, 3), num_classes=2)
    with torch.no_grad():
        broken.net[3].weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"'net\.3'"):
        score(broken, (x, y), progress=False)
    assert issubclass(ScoringError, FairEdgeError)


# ---------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def digits_mlp():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    torch.manual_seed(0)
    model = MLP(in_features=64, hidden=(32, 16), num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    return model, x, y


def test_digits_mlp_against_oracles(digits_mlp) -> None:
    model, x, y = digits_mlp
    spc = 8
    s = score(model, (x, y), samples_per_class=spc, batch_size=32, progress=False)
    # the selection the scorer documents: first spc per class, classes interleaved
    idx = np.concatenate([np.flatnonzero(y.numpy() == c)[:spc] for c in range(10)])
    order = np.argsort(np.concatenate([np.arange(spc) * 10 + c for c in range(10)]), kind="stable")
    xs, ys = x[idx[order]], y[idx[order]]
    acts = capture(model, xs, s.names())
    want_r = oracle_r(model, xs, ys, s.names(), batch_size=32)
    for n in s.names():
        np.testing.assert_allclose(
            s[n].U, oracle_u(acts[n], "linear", ys.numpy(), 0, n, 1), rtol=1e-4, atol=1e-7
        )
        assert_r_close(s[n].R, want_r[n])
    # R is a first-order estimate of the loss change when a unit is removed: check it ranks
    # the real change (zeroing the unit's row) of the first hidden layer sensibly.
    layer = model.net[1]
    base = F.cross_entropy(model(xs), ys).item()
    delta = []
    for u in range(layer.out_features):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.net[1].weight[u] = 0
            m.net[1].bias[u] = 0
            delta.append(abs(F.cross_entropy(m(xs), ys).item() - base))
    rho = spearmanr(s["net.1"].R, delta).statistic
    assert rho > 0.5, rho
