"""Recovery after pruning: the loss and augmentation against slow oracles, accuracy recovered on
real data (labelled and label-free), determinism, resume after an interruption, the weights
written into the pruned ONNX graph, the pruned weights loaded back into the user's architecture,
torchrun with 2 processes equal to one process, and bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from recovery_setup import Prepared, digits_net, load, prepare
from safetensors.torch import load_file
from torch import nn

from calibration.data import CalibrationSet
from exporters.errors import ExportError, VerificationError
from exporters.onnx_export import export_onnx
from exporters.surgery import apply_plan
from exporters.weights import check_matches_torch, load_pruned, save_pruned_weights, write_back
from pipeline.recovery import (
    RecoveryConfig,
    RecoveryError,
    augment_batch,
    distillation_loss,
    recover,
    step_indices,
)
from pipeline.train import evaluate

FAST = RecoveryConfig(steps=60, batch_size=64, lr=2e-3, optimizer="adamw", eval_every=20)


@pytest.fixture(scope="module")
def prep(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    return prepare(tmp_path_factory.mktemp("recovery"))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ oracles


def test_distillation_loss_matches_the_textbook_formula() -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) * 3
    y = rng.integers(0, 5, 6)
    temp, w = 3.0, 0.7

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = softmax(t / temp), softmax(s / temp)
    kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)) * temp**2
    ce = np.mean(-np.log(softmax(s)[np.arange(6), y]))
    got = distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), temp, w)
    assert got.item() == pytest.approx(w * kl + (1 - w) * ce, rel=1e-9)
    alone = distillation_loss(torch.tensor(s), torch.tensor(t), None, temp, w)
    assert alone.item() == pytest.approx(kl, rel=1e-9)  # label-free: distillation only


def test_shift_and_flip_match_a_per_sample_loop() -> None:
    x = torch.arange(3 * 2 * 5 * 6, dtype=torch.float32).reshape(3, 2, 5, 6)
    for mode in ("shift", "shift+flip"):
        got = augment_batch(x, mode, torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)  # the same draws, in the same order
        dy, dx = torch.randint(-2, 3, (3,), generator=g), torch.randint(-2, 3, (3,), generator=g)
        flip = torch.rand(3, generator=g) < 0.5
        for i in range(3):
            img = x[i].numpy()
            want = np.zeros_like(img)  # shifted by (dy, dx), zeros where nothing moved in
            for r in range(5):
                for c in range(6):
                    if 0 <= r - int(dy[i]) < 5 and 0 <= c - int(dx[i]) < 6:
                        want[:, r, c] = img[:, r - int(dy[i]), c - int(dx[i])]
            if mode == "shift+flip" and flip[i]:
                want = want[:, :, ::-1]
            np.testing.assert_array_equal(got[i].numpy(), want)
    assert torch.equal(augment_batch(x, "none", torch.Generator()), x)


def test_step_batches_cover_each_epoch_once() -> None:
    n, b = 50, 8
    first_epoch = torch.cat([step_indices(n, b, 0, s) for s in range(n // b)])
    assert len(set(first_epoch.tolist())) == len(first_epoch) == 48
    assert not torch.equal(step_indices(n, b, 0, 0), step_indices(n, b, 0, n // b))  # reshuffled
    assert torch.equal(step_indices(n, b, 3, 7), step_indices(n, b, 3, 7))


# ------------------------------------------------------------------------------ recovery


def test_recovery_brings_accuracy_back_and_is_deterministic(prep: Prepared) -> None:
    before = evaluate(prep.student(), prep.test)
    teacher_acc = evaluate(prep.teacher, prep.test)
    a = recover(prep.student(), prep.teacher, prep.train, prep.heldout, FAST, progress=False)
    after = evaluate(a.model, prep.test)
    assert after > before + 0.05, (before, after)
    assert after > teacher_acc - 0.05, (teacher_acc, after)
    assert a.heldout_after is not None and a.heldout_after >= a.heldout_before
    assert a.steps == 60 and a.best_step is not None and [h["step"] for h in a.history][0] == 0
    b = recover(prep.student(), prep.teacher, prep.train, prep.heldout, FAST, progress=False)
    assert _same_weights(a.model, b.model)
    c = recover(prep.student(), prep.teacher, prep.train, prep.heldout,
                RecoveryConfig(**{**FAST.to_json(), "seed": 1}), progress=False)  # fmt: skip
    assert not _same_weights(a.model, c.model)


def test_label_free_recovery_uses_the_teacher_alone(prep: Prepared) -> None:
    unlabelled = CalibrationSet(inputs=prep.train.inputs, source="digits without labels")
    before = evaluate(prep.student(), prep.test)
    r = recover(prep.student(), prep.teacher, unlabelled, prep.heldout, FAST, progress=False)
    assert r.label_free
    assert evaluate(r.model, prep.test) > before + 0.05


def test_sgd_and_early_stop(prep: Prepared) -> None:
    cfg = RecoveryConfig(steps=200, batch_size=64, lr=0.05, optimizer="sgd", eval_every=5,
                         patience=2, schedule="constant")  # fmt: skip
    r = recover(prep.student(), prep.teacher, prep.train, prep.heldout, cfg, progress=False)
    assert r.stopped_early and r.steps < 200
    evals = [h["heldout"] for h in r.history if "heldout" in h]
    assert r.heldout_after == pytest.approx(max(evals))  # the best weights are the ones returned


def test_interrupted_run_resumes_exactly(prep: Prepared, tmp_path: Path) -> None:
    whole = recover(prep.student(), prep.teacher, prep.train, prep.heldout, FAST, progress=False)
    ckpt = tmp_path / "ckpt.safetensors"
    kw = {"plan_digest": prep.plan.digest(), "checkpoint": ckpt, "checkpoint_every": 7,
          "progress": False}  # fmt: skip
    part = recover(
        prep.student(), prep.teacher, prep.train, prep.heldout, FAST, stop_after=25, **kw
    )
    assert part.steps == 25 and part.heldout_after is None and ckpt.is_file()
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temporary left behind
    rest = recover(prep.student(), prep.teacher, prep.train, prep.heldout, FAST, **kw)
    assert rest.resumed_from == 25 and rest.steps == 60
    assert _same_weights(whole.model, rest.model)
    assert [h["step"] for h in rest.history] == [h["step"] for h in whole.history]
    again = recover(prep.student(), prep.teacher, prep.train, prep.heldout, FAST, **kw)
    assert again.resumed_from == 60 and _same_weights(whole.model, again.model)  # finished: kept


def test_checkpoint_for_another_plan_or_settings_is_refused(prep: Prepared, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.safetensors"
    recover(prep.student(), prep.teacher, prep.train, None, FAST, plan_digest="aaaa",
            checkpoint=ckpt, stop_after=3, progress=False)  # fmt: skip
    with pytest.raises(RecoveryError, match="another plan"):
        recover(prep.student(), prep.teacher, prep.train, None, FAST, plan_digest="bbbb",
                checkpoint=ckpt, progress=False)  # fmt: skip
    other = RecoveryConfig(**{**FAST.to_json(), "lr": 1e-4})
    with pytest.raises(RecoveryError, match="other recovery settings"):
        recover(prep.student(), prep.teacher, prep.train, None, other, plan_digest="aaaa",
                checkpoint=ckpt, progress=False)  # fmt: skip
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(RecoveryError, match="cannot be read"):
        recover(prep.student(), prep.teacher, prep.train, None, FAST, checkpoint=junk,
                progress=False)  # fmt: skip
    assert junk.read_bytes() == b"\x80\x04not a checkpoint"  # nothing overwritten


def test_bad_input_is_one_clear_error(prep: Prepared) -> None:
    wrong = CalibrationSet(inputs=prep.train.inputs[:40], labels=np.full(40, 12))
    with pytest.raises(RecoveryError, match="labels go up to 12"):
        recover(prep.student(), prep.teacher, wrong, None, FAST, progress=False)
    other_teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    with pytest.raises(RecoveryError, match="teacher gives"):
        recover(prep.student(), other_teacher, prep.train, None, FAST, progress=False)
    empty = CalibrationSet(inputs=prep.train.inputs[:1])
    with pytest.raises(RecoveryError, match="needs training samples"):
        recover(prep.student(), prep.teacher, empty, None, FAST, progress=False)
    with pytest.raises(RecoveryError, match="optimizer"):
        RecoveryConfig(optimizer="rmsprop").validate()
    with pytest.raises(RecoveryError, match="recover-lr"):
        RecoveryConfig(lr=0).validate()


# ------------------------------------------------------------------------------ shipping


def test_recovered_values_go_into_the_pruned_onnx_graph(prep: Prepared) -> None:
    r = recover(prep.student(), prep.teacher, prep.train, None, FAST, progress=False)
    x1 = torch.from_numpy(prep.train.inputs[:1])
    pruned_proto, _ = apply_plan(export_onnx(prep.teacher, x1, None), prep.plan,
                                 verify_inputs=prep.train.inputs[:16])  # fmt: skip
    with pytest.raises(VerificationError):  # the surgery's values are not the recovered ones
        check_matches_torch(pruned_proto, r.model, prep.test.inputs[:64], "recovery")
    proto, rep = write_back(r.model, pruned_proto, prep.test.inputs[:64])
    assert rep.max_abs_diff <= rep.bound and rep.tensors >= 6
    # the check is able to fail: one misplaced value in the written graph is caught
    bad = r.model
    with torch.no_grad():
        bad[3].weight[0, 0, 1, 1] += 0.5
    with pytest.raises(VerificationError, match="differs"):
        check_matches_torch(proto, bad, prep.test.inputs[:64], "recovery")


def test_pruned_weights_load_back_into_the_users_architecture(
    prep: Prepared, tmp_path: Path
) -> None:
    r = recover(prep.student(), prep.teacher, prep.train, None, FAST, progress=False)
    path = save_pruned_weights(r.model, prep.plan, tmp_path / "weights.safetensors")
    back = load_pruned(digits_net, prep.plan, path)
    x = torch.from_numpy(prep.test.inputs[:32])
    with torch.no_grad():
        torch.testing.assert_close(back(x), r.model(x), rtol=0, atol=0)
    assert set(load_file(path)) == set(r.model.state_dict())
    other = prep.plan.from_json(prep.plan.to_json())
    other.layers[next(iter(other.layers))].pruned = []
    with pytest.raises(ExportError, match="not written for this plan"):
        load_pruned(digits_net, other, path)


# ------------------------------------------------------------------------------ torchrun


def test_torchrun_two_processes_equal_one_process(prep: Prepared, tmp_path: Path) -> None:
    """Same global batch split across 2 gloo processes on loopback; tolerance 1e-5 on weights."""
    folder = prep.folder
    load(folder)  # the saved files read back
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    script = Path(__file__).with_name("ddp_recover.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for name, cmd in (
        ("two", [torchrun, "--standalone", "--nproc_per_node", "2", str(script)]),
        ("one", [sys.executable, str(script)]),
    ):
        out = tmp_path / f"{name}.safetensors"
        done = subprocess.run([*cmd, str(folder), str(out)], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        outs[name] = load_file(out)
        assert out.with_suffix(".world").read_text() == ("2" if name == "two" else "1")
    assert outs["one"].keys() == outs["two"].keys()
    worst = max(float((outs["one"][k] - outs["two"][k]).abs().max()) for k in outs["one"])
    assert worst <= 1e-5, worst
    start = load_file(folder / "student.safetensors")
    moved = max(float((outs["one"][k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # the runs trained: equality is not two untouched copies


def test_shipping_bad_input_is_one_clear_error(prep: Prepared, tmp_path: Path) -> None:
    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="cannot be read"):
        load_pruned(digits_net, prep.plan, junk)
    x1 = torch.from_numpy(prep.train.inputs[:1])
    pruned_proto, _ = apply_plan(export_onnx(prep.teacher, x1, None), prep.plan,
                                 verify_inputs=prep.train.inputs[:16])  # fmt: skip
    renamed = next(t for t in pruned_proto.graph.initializer if t.name == "3.weight")
    renamed.name = "folded_constant_0"  # as a constant-folding export would name it
    with pytest.raises(ExportError, match="no initializer for parameter '3.weight'"):
        write_back(prep.student(), pruned_proto, prep.test.inputs[:8])
