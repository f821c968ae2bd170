"""Training, evaluation and the cached default model, on real data (digits, Fashion-MNIST)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calibration.data import CalibrationSet
from calibration.errors import FairEdgeError
from calibration.loaders import load_digits
from pipeline.models import MLP, SmallCNN
from pipeline.train import (
    DEFAULT_WIDTH,
    TrainConfig,
    default_data,
    default_model_info,
    evaluate,
    predict,
    train,
    train_cached,
)


@pytest.fixture(scope="module")
def digits_split() -> tuple[CalibrationSet, CalibrationSet]:
    cs = load_digits(flat=True)
    order = np.random.default_rng(0).permutation(len(cs))
    return cs.subset(order[:1400]), cs.subset(order[1400:])


def test_train_mlp_on_digits_learns_and_is_deterministic(digits_split) -> None:
    tr, te = digits_split
    torch.manual_seed(1)
    a = MLP(64, (64, 32), 10)
    b = MLP(64, (64, 32), 10)
    b.load_state_dict(a.state_dict())
    before = evaluate(a, te)
    rng_state = torch.get_rng_state()
    losses = train(a, tr, epochs=8, batch_size=64, lr=1e-2, seed=3, progress=False)
    assert torch.equal(rng_state, torch.get_rng_state())  # the caller's RNG is untouched
    train(b, tr, epochs=8, batch_size=64, lr=1e-2, seed=3, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    acc = evaluate(a, te)
    assert before < 0.3 and acc > 0.9, (before, acc)
    assert losses[-1] < losses[0] and not a.training


def test_evaluate_matches_a_plain_loop(digits_split) -> None:
    tr, te = digits_split
    torch.manual_seed(0)
    model = MLP(64, (32,), 10)
    train(model, tr, epochs=2, batch_size=64, lr=1e-2, seed=0, progress=False)
    model.train()  # evaluate must switch to eval mode and restore this afterwards
    correct = 0
    top3 = 0
    with torch.no_grad():
        model.eval()
        for x, y in zip(te.inputs, te.labels, strict=True):
            out = model(torch.from_numpy(x[None]))[0]
            correct += int(out.argmax()) == int(y)
            top3 += int(y) in out.topk(3).indices.tolist()
        model.train()
    assert evaluate(model, te, batch_size=17) == pytest.approx(correct / len(te), abs=1e-12)
    assert evaluate(model, te, top_k=3) == pytest.approx(top3 / len(te), abs=1e-12)
    assert model.training
    assert predict(model, te.inputs[:5]).shape == (5, 10)


def test_train_cached_trains_once_and_reports_corrupt_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_split
) -> None:
    monkeypatch.setenv("FAIR_EDGE_CACHE", str(tmp_path))
    tr, te = digits_split
    calls = []

    def data() -> CalibrationSet:
        calls.append(1)
        return tr

    cfg = TrainConfig(epochs=2, batch_size=64, lr=1e-2, seed=0)
    args = dict(data="digits", train_set=data, test_set=lambda: te, progress=False)
    m1, meta1 = train_cached("mlp", lambda: MLP(64, (32,), 10), cfg, **args)
    m2, meta2 = train_cached("mlp", lambda: MLP(64, (32,), 10), cfg, **args)
    assert calls == [1] and meta1 == meta2
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    assert meta1["test_accuracy"] == pytest.approx(evaluate(m2, te))
    # a different config is a different cache entry
    train_cached("mlp", lambda: MLP(64, (32,), 10), TrainConfig(epochs=1, seed=0), **args)
    assert calls == [1, 1]
    weights = tmp_path / "models" / f"mlp-{meta1['key']}.pt"
    weights.write_bytes(b"garbage")
    with pytest.raises(FairEdgeError, match="delete the file to retrain"):
        train_cached("mlp", lambda: MLP(64, (32,), 10), cfg, **args)
    assert not list((tmp_path / "models").glob("*.tmp"))


def test_default_model_accuracy_on_fashion_mnist_test() -> None:
    model, meta = default_model_info(progress=False)
    assert isinstance(model, SmallCNN) and not model.training
    assert model.features[0][0].out_channels == DEFAULT_WIDTH
    test = default_data("test")
    acc = evaluate(model, test)
    assert acc > 0.85, acc
    assert acc == pytest.approx(meta["test_accuracy"], abs=1e-9)
    json.dumps(meta)
    # a second call loads the cached weights: the same function
    again, _ = default_model_info(progress=False)
    x = torch.from_numpy(test.inputs[:64])
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
