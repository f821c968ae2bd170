"""Bad input that used to end in a traceback (or worse, pass): bundle manifests that point
outside the bundle or are malformed, ONNX models with custom-domain ops, and declared input
shapes that do not fit the verification data or memory. Each must end in one error line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cli_helpers import cli_error, run_cli
from onnx import TensorProto, helper, numpy_helper

from exporters.bundle import MANIFEST_NAME, BundleError, BundleSpec, verify_bundle, write_bundle
from exporters.errors import SurgeryError
from exporters.graph_groups import ChannelGraph
from exporters.onnx_export import onnx_fingerprint
from exporters.random_plan import random_plan
from exporters.surgery import apply_plan
from exporters.verify import masked_original
from pipeline.plan import Plan

_run, _error = run_cli, cli_error


# ------------------------------------------------------------------------------ bundles


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    """A small, valid bundle with the report files `fair-edge report` prints."""
    spec = BundleSpec(name="m-host")
    spec.add_text("labels.txt", "cat\ndog\n", "labels")
    spec.add_text("report.json", json.dumps({"summary": {"speedup": 2.0}}) + "\n", "report")
    spec.add_text("report.md", "# report\n", "report")
    out = write_bundle(tmp_path / "dist", spec)
    assert _run(["report", str(out)])[0] == 0
    return out


def _edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _list_file(bundle: Path, rel: str, data: bytes) -> None:
    def change(m: dict[str, Any]) -> None:
        m["files"][rel] = {"role": "report", "sha256": _sha(data), "size": len(data)}

    _edit_manifest(bundle, change)


def test_manifest_entries_outside_the_bundle_are_refused(bundle: Path, tmp_path: Path) -> None:
    """`../x`, an absolute path and a symlink out of the bundle, all with the right SHA-256
    (and a symlink loop, which leads nowhere inside)."""
    secret = tmp_path / "dist" / "secret.txt"
    secret.write_bytes(b"not part of the bundle\n")
    (bundle / "link.txt").symlink_to(secret)
    (bundle / "loop.txt").symlink_to("loop.txt")
    for rel in ("../secret.txt", str(secret), "link.txt", "sub/../../secret.txt", "loop.txt"):
        manifest = json.loads((bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
        _list_file(bundle, rel, secret.read_bytes())
        with pytest.raises(BundleError, match="outside the bundle") as info:
            verify_bundle(bundle)
        assert repr(rel) in str(info.value)
        line = _error(["report", str(bundle)])
        assert "outside the bundle" in line and rel in line
        (bundle / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")


def test_outside_entry_with_a_wrong_hash_is_not_reported_missing(bundle: Path) -> None:
    """`../../etc/passwd` is refused for where it points, not looked up and called missing."""
    _edit_manifest(
        bundle,
        lambda m: m["files"].__setitem__("../../etc/passwd", {"sha256": "0" * 64, "role": "x"}),
    )
    line = _error(["report", str(bundle)])
    assert "'../../etc/passwd'" in line and "outside the bundle" in line
    assert "missing" not in line


def test_symlink_that_stays_inside_the_bundle_is_accepted(bundle: Path) -> None:
    (bundle / "alias.txt").symlink_to("labels.txt")
    _list_file(bundle, "alias.txt", (bundle / "labels.txt").read_bytes())
    assert "alias.txt" in verify_bundle(bundle)["files"]


def _set_files(value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.__setitem__("files", value)


def _drop_sha(m: dict[str, Any]) -> None:
    del m["files"]["labels.txt"]["sha256"]


def _drop_report(bundle: Path) -> None:
    (bundle / "report.json").unlink()
    _edit_manifest(bundle, lambda m: m["files"].pop("report.json"))


def _report_not_json(bundle: Path) -> None:
    (bundle / "report.json").write_bytes(b"{not json")
    _list_file(bundle, "report.json", b"{not json")


def _report_a_list(bundle: Path) -> None:
    (bundle / "report.json").write_bytes(b"[1, 2]")
    _list_file(bundle, "report.json", b"[1, 2]")


MALFORMED: dict[str, tuple[Callable[[Path], Any], str]] = {
    "manifest is a JSON list": (
        lambda b: (b / MANIFEST_NAME).write_text("[1, 2]"),
        "not a fair-edge bundle manifest",
    ),
    "manifest not UTF-8": (
        lambda b: (b / MANIFEST_NAME).write_bytes(b'{"schema": "\xff\xfe"}'),
        "is not UTF-8 text",
    ),
    "manifest nested too deep": (
        lambda b: (b / MANIFEST_NAME).write_text("[" * 100_000),
        "not valid UTF-8 JSON",
    ),
    "entry without sha256": (lambda b: _edit_manifest(b, _drop_sha), "'labels.txt' has no sha256"),
    "entry not an object": (
        lambda b: _edit_manifest(b, lambda m: m["files"].__setitem__("labels.txt", "abc")),
        "'labels.txt' has no sha256",
    ),
    "files is a list": (lambda b: _edit_manifest(b, _set_files(["labels.txt"])), "'files'"),
    "files missing": (lambda b: _edit_manifest(b, lambda m: m.pop("files")), "'files'"),
    "report.json gone": (_drop_report, "report.json"),
    "report.json not JSON": (_report_not_json, "report.json"),
    "report.json a list": (_report_a_list, "report.json"),
    "report.md gone": (
        lambda b: (
            (b / "report.md").unlink(),
            _edit_manifest(b, lambda m: m["files"].pop("report.md")),
        ),
        "report.md",
    ),
    "manifest is a folder": (
        lambda b: ((b / MANIFEST_NAME).unlink(), (b / MANIFEST_NAME).mkdir()),
        "cannot be read",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bundles_give_one_line(bundle: Path, case: str) -> None:
    damage, expected = MALFORMED[case]
    damage(bundle)
    before = sorted(p.relative_to(bundle) for p in bundle.rglob("*"))
    line = _error(["report", str(bundle)])
    assert expected in line, line
    assert sorted(p.relative_to(bundle) for p in bundle.rglob("*")) == before


def test_bundle_path_that_is_a_file_or_missing(tmp_path: Path) -> None:
    a_file = tmp_path / "bundle.zip"
    a_file.write_bytes(b"PK")
    assert "is not a folder" in _error(["report", str(a_file)])
    assert "does not exist" in _error(["report", str(tmp_path / "nowhere")])


# ------------------------------------------------------------------------------ ONNX models


def _conv_model(
    input_shape: list[Any],
    custom_before: str | None = None,
    custom_after: str | None = None,
) -> onnx.ModelProto:
    """conv1 -> Relu -> conv2, optionally with a one-input op of another domain before or after."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv1.weight"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "conv2.weight"),
    ]  # fmt: skip
    nodes, x, opsets = [], "input", [helper.make_opsetid("", 17)]
    if custom_before:
        domain, op = custom_before.split("::")
        nodes.append(helper.make_node(op, [x], ["pre"], domain=domain, name="custom_pre"))
        opsets.append(helper.make_opsetid(domain, 1))
        x = "pre"
    nodes += [
        helper.make_node("Conv", [x, "conv1.weight"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Conv", ["b", "conv2.weight"], ["c"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    if custom_after:
        domain, op = custom_after.split("::")
        nodes.append(helper.make_node(op, ["c"], ["output"], domain=domain, name="custom_post"))
        if domain not in {o.domain for o in opsets}:
            opsets.append(helper.make_opsetid(domain, 1))
    else:
        nodes.append(helper.make_node("Identity", ["c"], ["output"], name="out"))
    out_shape = [input_shape[0], 4, *input_shape[2:]]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=opsets)


def _plan_for(model: onnx.ModelProto) -> Plan:
    graph = ChannelGraph(model)
    plan = random_plan(graph.channel_groups, 0.5, seed=0, fingerprint=onnx_fingerprint(model))
    assert "conv1" in plan.layers, "conv1's channels are prunable"
    return plan


def _cli_prune(tmp_path: Path, model: onnx.ModelProto, sample: tuple[int, ...]) -> str:
    """`fair-edge prune --model m.onnx --plan p.json --data x.npy`: its one error line."""
    onnx_path, plan_path, data = tmp_path / "m.onnx", tmp_path / "p.json", tmp_path / "x.npy"
    onnx.save(model, onnx_path)
    _plan_for(model).save(plan_path)
    np.save(data, np.random.default_rng(0).standard_normal((6, *sample)).astype(np.float32))
    out = tmp_path / "out"
    line = _error(
        ["prune", "--model", str(onnx_path), "--plan", str(plan_path), "--data", str(data),
         "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert not out.exists() or list(out.iterdir()) == []
    return line


@pytest.mark.parametrize("where", ["before", "after"])
def test_custom_domain_op_is_refused_in_one_line(where: str, tmp_path: Path) -> None:
    """ONNX Runtime cannot run com.example::MyOp, so no pruned model could be verified."""
    model = _conv_model(["N", 3, 8, 8], **{f"custom_{where}": "com.example::MyOp"})
    with pytest.raises(SurgeryError, match=r"com\.example::MyOp.*custom_") as info:
        apply_plan(model, _plan_for(model))
    assert "ONNX Runtime" in str(info.value)
    line = _cli_prune(tmp_path, model, (3, 8, 8))
    assert "com.example::MyOp" in line and "custom domain" in line


def test_masked_original_without_inferred_shapes() -> None:
    """A custom op ahead of the convs leaves them without inferred shapes; the mask's rank
    comes from the conv weight instead of a KeyError."""
    model = _conv_model(["N", 3, 8, 8], custom_before="com.example::MyOp")
    graph = ChannelGraph(model)
    assert "b" not in graph.shapes
    masked = masked_original(graph, graph.pruned_roots(_plan_for(model)))
    mask = next(t for t in masked.graph.initializer if "__fe_mask" in t.name)
    assert list(mask.dims) == [8, 1, 1]


def test_ops_of_a_domain_onnx_runtime_runs_are_pruned_around() -> None:
    """com.microsoft::Gelu after the last conv: frozen for analysis, run by ONNX Runtime."""
    model = _conv_model(["N", 3, 8, 8], custom_after="com.microsoft::Gelu")
    pruned, report = apply_plan(model, _plan_for(model))
    assert report.params_after < report.params_before
    assert any(n.domain == "com.microsoft" for n in pruned.graph.node)


def test_huge_declared_input_is_refused_before_allocating(tmp_path: Path) -> None:
    model = _conv_model([1, 3, 100_000, 100_000])
    with pytest.raises(SurgeryError, match=r"\[1, 3, 100000, 100000\].*elements"):
        apply_plan(model, _plan_for(model))
    x = np.zeros((4, 3, 8, 8), np.float32)
    with pytest.raises(SurgeryError, match=r"declared .*100000.* samples are \[3, 8, 8\]"):
        apply_plan(model, _plan_for(model), verify_inputs=x)
    line = _cli_prune(tmp_path, model, (3, 8, 8))
    assert "100000" in line and "[3, 8, 8]" in line


def test_symbolic_sample_dims_take_the_verification_data_shape() -> None:
    model = _conv_model(["N", 3, "H", "W"])
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with pytest.raises(SurgeryError, match="symbolic"):
        apply_plan(model, _plan_for(model))
    _, report = apply_plan(model, _plan_for(model), verify_inputs=x)
    assert report.verification["n_random"] == 1 and report.verification["n_calibration"] == 1


def test_static_batch_of_one_verifies_one_sample_at_a_time() -> None:
    """A model exported with batch 1 gets its calibration inputs one by one, not 16 at once."""
    model = _conv_model([1, 3, 8, 8])
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    _, report = apply_plan(model, _plan_for(model), verify_inputs=x)
    assert report.verification["n_calibration"] == 5
