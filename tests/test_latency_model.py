"""Per-layer latency tables: graph analysis, interpolation, caching, and held-out accuracy.

Accuracy oracle: models pruned for real by the verified surgery (exporters.surgery.apply_plan)
and timed whole in ONNX Runtime. Tolerance: MAPE <= 30% on held-out random rounded plans. The
model is built for a quiet device; this 2-core machine is shared, so the bound is loose (the
benchmark reports the measured MAPE, typically 5-15% here).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from devices.latency_model import (
    LatencyModel,
    LatencyModelError,
    LayerTable,
    analyze,
    build_latency_model,
    calibrate,
    evaluate,
    grid,
    model_fingerprint,
    summarize_profile,
    time_onnx,
    uniform_counts,
)
from exporters.graph_groups import find_groups
from exporters.onnx_export import export_onnx
from exporters.random_plan import random_plan
from exporters.surgery import apply_plan
from pipeline.models import VGG, MobileNet, ResNet, SmallCNN
from pipeline.plan import ModelFingerprint
from pipeline.rounding import round_plan

VGG_CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M")


def _export(model: torch.nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(model.eval(), torch.randn(*shape), None)


@pytest.fixture(scope="module")
def vgg() -> tuple[torch.nn.Module, onnx.ModelProto, LatencyModel]:
    torch.manual_seed(0)
    model = VGG(VGG_CFG, in_channels=3).eval()
    proto = _export(model, (1, 3, 96, 96))
    lm = build_latency_model(proto, "host", threads=1, multiple=8, cache=False, repeats=8)
    return model, proto, lm


def test_analysis_finds_sources_depthwise_flatten_and_output() -> None:
    infos = {i.name: i for i in analyze(_export(SmallCNN(width=16), (1, 1, 28, 28)))}
    assert infos["features.1.0"].in_source == "features.0.0"
    assert infos["features.0.0"].in_source is None  # the image
    fc = infos["classifier.1"]  # Flatten -> Linear: 32 channels x 7 x 7 positions
    assert (fc.op, fc.in_source, fc.in_full, fc.in_per_unit) == ("gemm", "features.4.0", 32, 49)
    assert not infos["classifier.4"].out_prunable and infos["classifier.1"].out_prunable
    res = {i.name: i for i in analyze(_export(ResNet(in_channels=1), (1, 1, 28, 28)))}
    # through the residual Add and ReLU to a conv of the same channel group
    assert res["layers.2.conv1"].in_source == "layers.1.conv2"
    assert res["layers.2.shortcut.0"].in_source == "layers.1.conv2"
    mob = {i.name: i for i in analyze(_export(MobileNet(in_channels=1), (1, 1, 28, 28)))}
    dw = mob["features.2.block.1.0"]
    assert dw.op == "depthwise" and dw.in_source == "features.2.block.0.0"
    # every traced source sits in the same coupled group as what actually feeds the layer
    groups = find_groups(_export(MobileNet(in_channels=1), (1, 1, 28, 28)))
    group_of = {m: g.name for g in groups for m in g.members}
    for info in mob.values():
        if info.op == "depthwise":
            assert group_of[info.name] == group_of[info.in_source]


def test_grid_and_interpolation_oracle() -> None:
    assert grid(64, 8) == [16, 32, 48, 64]
    assert grid(30, 8) == [8, 16, 24, 30]
    assert grid(6, 8) == [6]
    # a product-form cost (MACs ~ cin * cout) is reproduced exactly by bilinear interpolation
    gi, go = [8, 16, 32], [16, 48, 64]
    table = LayerTable(
        "l", "n", "conv", 32, 64, "src", 1, True, {}, gi, go,
        [[0.001 * a * b + 0.5 for b in go] for a in gi],
    )  # fmt: skip
    for cin, cout in [(8, 16), (12, 20), (24, 64), (32, 40), (4, 8), (40, 72)]:
        assert table.predict(cin, cout) == pytest.approx(0.001 * cin * cout + 0.5, rel=1e-9)
    assert table.counts({"src": 24, "l": 40}) == (24, 40)
    assert table.counts({}) == (32, 64)


def test_tables_measured_and_cached(vgg, tmp_path, monkeypatch) -> None:
    _, proto, lm = vgg
    assert lm.full_ms > 0 and lm.threads == 1 and lm.stat == "min"
    names = [t.name for t in lm.layers]
    assert names[:2] == ["features.0.0", "features.1.0"] and names[-1] == "classifier.3"
    for t in lm.layers:
        arr = np.asarray(t.ms)
        assert arr.shape == (len(t.in_grid), len(t.out_grid)) and np.all(arr >= 0)
    conv = lm.layers[1]
    # more output channels cost more (16 vs 32 channels: twice the MACs; allow noise)
    assert conv.ms[-1][-1] > conv.ms[-1][0]
    assert lm.predict({}) == pytest.approx(lm.full_ms)
    half = uniform_counts(lm, 0.5)
    assert half["features.0.0"] == 16 and "classifier.3" not in half
    assert lm.predict(half) < lm.full_ms
    # JSON round trip keeps every prediction
    lm.save(tmp_path / "lm.json")
    back = LatencyModel.load(tmp_path / "lm.json")
    assert back.predict(half) == pytest.approx(lm.predict(half))
    # the cache: a second build of the same model, profile and settings measures nothing
    monkeypatch.setenv("FAIR_EDGE_CACHE", str(tmp_path / "cache"))
    small = _export(SmallCNN(width=8), (1, 1, 28, 28))
    first = build_latency_model(small, "host", threads=1, multiple=8, repeats=3, full_repeats=5)
    files = list((tmp_path / "cache" / "latency").glob("host-ort*-t1-*.json"))
    assert len(files) == 1
    again = build_latency_model(small, "host", threads=1, multiple=8, repeats=3, full_repeats=5)
    assert again.to_json() == first.to_json()  # same measured numbers: loaded, not re-measured
    assert json.loads(files[0].read_text())["fingerprint"] == model_fingerprint(small)


def test_heldout_accuracy_on_surgically_pruned_models(vgg) -> None:
    model, proto, lm = vgg
    groups = find_groups(proto)
    fp = ModelFingerprint.from_model(model)
    u = {name: np.arange(g.n_channels, dtype=float) for g in groups for name in g.members}

    def plans(seeds):
        out = []
        for s in seeds:
            p = random_plan(groups, 0.3 + 0.05 * (s % 5), s, fp)
            out.append(round_plan(p, u, 8, "nearest", groups=groups))
        return out

    materialize = lambda p: apply_plan(proto, p)[0]  # noqa: E731
    held_out = plans(range(4))
    raw = evaluate(lm, held_out, materialize, repeats=20, rounds=2)
    assert raw["plans"] == 4 and len(raw["pairs_ms"]) == 4
    # a ~4 ms model on a shared 2-core machine: single measurements jump by 30% and more, so the
    # bounds here are loose (seen: raw 12-49%, fitted 8-14% idle); bench/RESULTS.md has the
    # accuracy on real models (bench.bench_latency)
    assert raw["mape_pct"] <= 75.0, raw
    for pred, _ in raw["pairs_ms"]:
        assert pred < lm.full_ms  # every plan removes 30-50% of each layer
    # calibration on other plans (the full model re-measured now) tightens the held-out error
    cal = calibrate(lm, plans([11, 12]), materialize, repeats=20, rounds=2, full_model=proto)
    assert cal["plans"] == 2 and 0.3 < cal["scale"] < 3.0
    assert lm.predict({}) == pytest.approx(cal["offset_ms"] + cal["scale"] * lm.layers_ms({}))
    fitted = evaluate(lm, held_out, materialize, repeats=20, rounds=2)
    assert fitted["mape_pct"] <= 35.0, (raw, cal, fitted)


def test_time_onnx_and_bad_input(tmp_path) -> None:
    proto = _export(SmallCNN(width=8), (1, 1, 28, 28))
    assert time_onnx(proto, 1, repeats=5) > 0
    with pytest.raises(LatencyModelError, match="measured on that device"):
        build_latency_model(proto, "rpi5", cache=False)
    with pytest.raises(LatencyModelError, match="does not exist"):
        LatencyModel.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"schema": "something-else"}')
    with pytest.raises(LatencyModelError, match="not a fair-edge latency model"):
        LatencyModel.load(tmp_path / "bad.json")
    no_layers = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        )  # fmt: skip
    )
    with pytest.raises(LatencyModelError, match="no Conv or Gemm"):
        analyze(no_layers)


def test_profile_summary_oracle() -> None:
    """Per-node bests + the best per-run overhead, computed by hand on synthetic profiler events."""
    events = []
    # three runs (the first a warm-up to skip): node durations (us) and run walls (us)
    runs = [({"a": 900, "b": 900}, 3000), ({"a": 100, "b": 300}, 500), ({"a": 150, "b": 200}, 420)]
    t = 0
    for durs, wall in runs:
        events.append({"name": "model_run", "cat": "Session", "ts": t, "dur": wall})
        k = t + 10
        for node, d in durs.items():
            op = "Conv" if node == "a" else "ReorderOutput"
            events.append(
                {
                    "name": f"{node}_kernel_time",
                    "cat": "Node",
                    "ts": k,
                    "dur": d,
                    "args": {"op_name": op},
                }
            )
            k += d
        t += wall + 100
    run = summarize_profile(events, skip_runs=1)
    # kernels: a best 100, b best 200; overhead: min(500 - 400, 420 - 350) = 70 us
    assert run.kernels_ms == {"a": pytest.approx(0.1), "b": pytest.approx(0.2)}
    assert run.overhead_ms == pytest.approx(0.07)
    assert run.latency_ms == pytest.approx(0.37)
    assert run.wall_min_ms == pytest.approx(0.42) and run.wall_p50_ms == pytest.approx(0.46)
    skipped = summarize_profile(events, skip_runs=1, skip_ops=frozenset({"ReorderOutput"}))
    assert set(skipped.kernels_ms) == {"a"} and skipped.overhead_ms == pytest.approx(0.07)
