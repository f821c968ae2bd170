"""Scoring under a memory budget and under torchrun.

The U store on disk holds the same float32 values as in memory (layout checked against the
written tensor, chunk by chunk); chunked W1 equals W1 of the whole layer; a scoring run with
U on disk equals one with U in memory bit for bit; the plan picks the largest batch that fits,
U on disk when it does not fit beside a batch, and refuses, in one line before any work, a
budget nothing fits in; torchrun with 2 gloo processes equals one process bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import cli_error
from scoring_setup import digits_cnn, digits_data

from pipeline.membudget import (
    default_budget,
    parse_size,
    peak_bytes,
    plan_memory,
    reserve,
    used_bytes,
)
from pipeline.scores import Scores, ScoringError
from pipeline.scoring import pairwise_w1_max, score
from pipeline.ustore import DiskStore, MemoryStore

GB = 10**9


def test_parse_size() -> None:
    assert parse_size("8G") == 8 * GB
    assert parse_size("8GB") == 8 * GB
    assert parse_size("7.5GiB") == int(7.5 * 2**30)
    assert parse_size("512M") == 512 * 10**6
    assert parse_size(1234) == 1234
    for bad in ("eight", "8X", "-1G", "0"):
        with pytest.raises(ScoringError, match="like 8G"):
            parse_size(bad)


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_store_reads_back_what_was_written_chunk_by_chunk(kind: str, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    rows, units, q = 23, 17, 5
    full = torch.randn(rows, units, q, generator=g)

    def chunk_units(c: int, qq: int) -> int:
        return 4  # 17 units: chunks of 4, 4, 4, 4, 1

    store = (
        DiskStore(rows, chunk_units, str(tmp_path))
        if kind == "disk"
        else MemoryStore(rows, chunk_units, torch.device("cpu"))
    )
    try:
        for s in range(0, rows, 6):  # uneven row blocks, as the last batch is
            store.write("layer", s, full[s : s + 6])
        assert store.chunks("layer") == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 17)]
        for c0, c1 in store.chunks("layer"):
            assert torch.equal(store.read("layer", c0, c1), full[:, c0:c1])
        if kind == "disk":  # anonymous files: nothing to leave behind, even when killed
            assert list(tmp_path.iterdir()) == [] and len(store._files) == 1
    finally:
        store.close()


def test_chunked_w1_equals_whole_layer_w1() -> None:
    g = torch.Generator().manual_seed(1)
    cls = torch.arange(60) % 6
    x = torch.randn(60, 37, 8, generator=g) + cls.view(-1, 1, 1) * torch.rand(37, 8, generator=g)
    whole = pairwise_w1_max(x, cls, 6)
    parts = torch.cat([pairwise_w1_max(x[:, s : s + 5], cls, 6) for s in range(0, 37, 5)])
    assert torch.equal(whole, parts)
    # shuffled rows (another process order) give the same bits: W1 sorts each class's values
    perm = torch.randperm(60, generator=g)
    assert torch.equal(whole, pairwise_w1_max(x[perm], cls[perm], 6))
    assert not torch.equal(whole, pairwise_w1_max(x, cls.roll(1), 6))  # the check can fail


def test_plan_picks_batch_and_store_from_the_budget(tmp_path: Path) -> None:
    mb = 10**6
    plan = plan_memory(8 * GB, 2 * GB, 100 * mb, 1 * GB, 64)
    assert plan.store == "memory"
    assert plan.batch_size == (8 * GB - 2 * GB - reserve(8 * GB) - 1 * GB) // (100 * mb)
    assert plan.estimated_peak <= 8 * GB
    big = plan_memory(8 * GB, 2 * GB, 100 * mb, 40 * GB, 64, store_dir=str(tmp_path))
    assert big.store == "disk"  # 40 GB of U samples cannot wait in 8 GB
    assert big.batch_size == (8 * GB - 2 * GB - reserve(8 * GB)) // (100 * mb) == 54
    assert big.estimated_peak <= 8 * GB  # 1/32 of the budget stays in reserve: 54, not 57
    small = plan_memory(64 * GB, 2 * GB, 100 * mb, 1 * GB, 16)
    assert small.batch_size == 16 and small.store == "memory"  # never above the batch asked for
    forced = plan_memory(64 * GB, 2 * GB, 100 * mb, 1 * GB, 16, store="disk")
    assert forced.store == "disk"
    with pytest.raises(ScoringError, match=r"^scoring needs at least .* raise --max-memory"):
        plan_memory(2 * GB, 2 * GB, 100 * mb, 1 * GB, 64)
    with pytest.raises(ScoringError, match="on disk .* free disk space"):
        plan_memory(8 * GB, 2 * GB, 100 * mb, 10**18, 64, store_dir=str(tmp_path))
    with pytest.raises(ScoringError, match="in memory"):
        plan_memory(8 * GB, 2 * GB, 100 * mb, 40 * GB, 64, store="memory")


def test_u_on_disk_equals_u_in_memory_bit_for_bit() -> None:
    x, y = digits_data()
    mem = score(digits_cnn(), (x, y), samples_per_class=9, batch_size=16, progress=False,
                u_store="memory")  # fmt: skip
    disk = score(digits_cnn(), (x, y), samples_per_class=9, batch_size=16, progress=False,
                 u_store="disk")  # fmt: skip
    assert mem.names() == disk.names() and len(mem.names()) == 3
    for n in mem.names():
        assert np.array_equal(mem[n].U, disk[n].U), n
        assert np.array_equal(mem[n].R, disk[n].R), n
        assert np.all(mem[n].U > 0)


def test_a_budget_below_what_is_in_use_fails_before_any_work() -> None:
    x, y = digits_data()
    budget = used_bytes(torch.device("cpu")) // 2
    with pytest.raises(ScoringError, match=r"^scoring needs at least .* raise --max-memory"):
        score(digits_cnn(), (x, y), samples_per_class=9, progress=False, max_memory=budget)
    with pytest.raises(ScoringError, match="u_store='ram' is not one of auto, memory, disk"):
        score(digits_cnn(), (x, y), samples_per_class=9, progress=False, u_store="ram")


DIGITS_MODEL = """
from torch import nn
def build():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(512, 10))
"""


def test_cli_refuses_a_bad_or_unreachable_budget(tmp_path: Path) -> None:
    out = tmp_path / "out"
    model = tmp_path / "digits_model.py"
    model.write_text(DIGITS_MODEL)
    common = ["score", "--model", f"{model}:build", "--data", "digits", "--out", str(out)]
    line = cli_error([*common, "--max-memory", "8X"])
    assert "memory size '8X' is not a size" in line
    line = cli_error([*common, "--max-memory", "1M", "--no-cache", "--quiet"])
    assert "scoring needs at least" in line and "raise --max-memory" in line
    assert not out.exists() or not any(out.iterdir())


def test_torchrun_two_processes_equal_one_process(tmp_path: Path) -> None:
    """2 gloo processes on loopback (U on disk) against 1 process (U in memory): same bits."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    script = Path(__file__).with_name("ddp_score.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    got = {}
    for name, cmd, store in (
        ("two", [torchrun, "--standalone", "--nproc_per_node", "2", str(script)], "disk"),
        ("one", [sys.executable, str(script)], "memory"),
    ):
        out = tmp_path / f"{name}.npz"
        done = subprocess.run([*cmd, str(out), store], env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert out.with_suffix(".world").read_text() == ("2" if name == "two" else "1")
        got[name] = Scores.load(out)
    one, two = got["one"], got["two"]
    assert one.names() == two.names()
    for n in one.names():
        assert np.array_equal(one[n].U, two[n].U), n
        assert np.array_equal(one[n].R, two[n].R), n
    assert one.class_counts == two.class_counts == [9] * 10


def test_torchrun_refuses_calibration_data_that_differs_between_processes(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun
    script = Path(__file__).with_name("ddp_score.py")
    out = tmp_path / "guard"
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(out), "data-differs"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert out.with_suffix(f".rank{rank}").read_text() == (
            "the calibration data differs between the torchrun processes; give every process "
            "the same data (and seed)"
        )


SEEDED_BY_RANK = """
import os
import torch
from torch import nn
def build():
    torch.manual_seed(int(os.environ.get("RANK", "0")))  # a different model in each process
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(512, 10))
"""


def test_cli_score_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 --no-python fair-edge score ...` with a factory that builds
    a different model in each process: rank 0's model is scored (equal bit for bit to a single
    process), one scores file is written, and the cache entry it leaves is hit later."""
    bindir = str(Path(sys.executable).parent)
    torchrun, fair_edge = (
        shutil.which("torchrun", path=bindir),
        shutil.which("fair-edge", path=bindir),
    )
    assert torchrun and fair_edge, "torchrun and fair-edge are installed in the environment"
    model = tmp_path / "digits_model.py"
    model.write_text(SEEDED_BY_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAIR_EDGE_CACHE": str(tmp_path / "cache")}
    env.pop("RANK", None)

    def run(cmd: list[str], out: str, *extra: str) -> tuple[Scores, str]:
        argv = ["score", "--model", f"{model}:build", "--data", "digits", "--out",
                str(tmp_path / out), "--samples-per-class", "9", "--quiet", *extra]  # fmt: skip
        done = subprocess.run([*cmd, *argv], env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return Scores.load(tmp_path / out / "build.scores.npz"), done.stdout

    two, out2 = run([torchrun, "--standalone", "--nproc_per_node", "2", "--no-python", fair_edge],
                    "two", "--json")  # fmt: skip
    one, _ = run([fair_edge], "one", "--no-cache")
    again, out_again = run([fair_edge], "again", "--json")
    assert json.loads(out2)["cached"] is False and json.loads(out_again)["cached"] is True
    assert one.names() == two.names() == again.names() and len(one.names()) == 1
    for n in one.names():
        assert np.array_equal(one[n].U, two[n].U) and np.array_equal(one[n].R, two[n].R), n
        assert np.array_equal(one[n].U, again[n].U), n


def test_progress_shows_samples_per_second_and_memory(capsys: pytest.CaptureFixture) -> None:
    x, y = digits_data()
    score(digits_cnn(), (x, y), samples_per_class=9, batch_size=30, progress=True)
    err = capsys.readouterr().err
    assert "FAIR scoring (batch 30, U in memory)" in err
    assert "sample/s" in err and "mem=" in err and " GB" in err
    assert "FAIR U (W1)" in err


def test_default_budget_is_shared_by_the_processes_of_a_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    one = default_budget(cpu) - used_bytes(cpu)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    four = default_budget(cpu) - used_bytes(cpu)
    assert one > 0 and four == pytest.approx(one / 4, rel=0.1)


def test_activation_estimate_counts_the_batch_not_the_whole_calibration_tensor() -> None:
    """The probe sees 2 rows of the selected samples: a view of a 400-sample tensor must not be
    counted as 400 samples' worth of saved activations (that halved the batch on resnet50)."""
    from pipeline.scoring import _probe

    x, _ = digits_data()
    model = digits_cnn()
    as_view = _probe(model, x[:2]).saved_per_sample
    alone = _probe(model, x[:2].clone()).saved_per_sample
    assert as_view == alone > 0
    conv_out = 96 * 8 * 8 * 4  # the BatchNorm saves the first conv's output: one sample's bytes
    assert conv_out <= alone < 20 * conv_out


def test_the_measured_peak_is_logged_beside_the_estimate(caplog: pytest.LogCaptureFixture) -> None:
    """The log says how close the plan came: its estimate, then the process's peak (VmHWM)
    before the pass, after it and after W1. A block allocated in the loss, 300 MB above any
    earlier peak, must show in the peak after the pass and not in the one before it."""
    import re

    cpu = torch.device("cpu")
    x, y = digits_data()
    extra = 300 * 2**20
    grown: list[int] = []

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not grown:
            n = peak_bytes(cpu) - used_bytes(cpu) + extra
            torch.ones(n // 4).add_(1.0)  # resident for a moment, then freed
            grown.append(n)
        return torch.nn.functional.cross_entropy(out, target)

    with caplog.at_level("INFO", logger="pipeline.scoring"):
        score(digits_cnn(), (x, y), samples_per_class=9, progress=False, max_memory="8G",
              loss=loss)  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if "process peak" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    m = re.fullmatch(
        r"memory: estimated peak ([\d.]+) GB; process peak ([\d.]+) GB before the scoring "
        r"pass, ([\d.]+) GB after it, ([\d.]+) GB after the W1 step \(budget 8\.00 GB\)",
        lines[0],
    )
    assert m, lines[0]
    _, before, after_pass, after_w1 = (float(v) * GB for v in m.groups())
    assert grown and after_pass >= before + 0.9 * extra
    assert 0 < before <= after_pass <= after_w1 <= peak_bytes(cpu) + 0.01 * GB


def test_interleaved_selection_equals_the_cat_of_classes_permuted() -> None:
    """The in-place fill against the obvious version: cat of every kept class, then permuted
    (unequal piece sizes, a class left out)."""
    from pipeline.scoring import _interleaved

    g = torch.Generator().manual_seed(0)
    sizes = {3: [2, 1], 7: [1, 1, 1], 1: [4], 9: [2]}  # class 9 is left out
    per_class = {c: [torch.randn(k, 2, 3, generator=g) for k in ks] for c, ks in sizes.items()}
    classes = [1, 3, 7]
    expected = torch.cat([torch.cat(per_class[c]) for c in classes])
    order = torch.randperm(expected.shape[0], generator=g)
    got = _interleaved({c: list(v) for c, v in per_class.items()}, classes, order)
    assert torch.equal(got, expected[order])
    one_off = order.clone()
    one_off[[0, 1]] = one_off[[1, 0]]
    assert not torch.equal(got, expected[one_off])  # the comparison sees one swapped row


SELECTION_PEAK = """
import sys
import torch
from pipeline.membudget import peak_bytes, used_bytes
from pipeline.scoring import _select
cpu = torch.device("cpu")
def batches():
    g = torch.Generator().manual_seed(0)
    for s in range(0, 1600, 64):
        yield torch.randn(64, 3, 64, 64, generator=g), torch.arange(s, s + 64) % 50
before = peak_bytes(cpu)
sel = _select(torch.nn.Identity(), batches(), 32, 50, 0, cpu, torch.float32, 64, 8 * 10**9)
print(sel.x.nbytes, before, peak_bytes(cpu))
"""


def test_selecting_the_samples_holds_them_about_once() -> None:
    """1,600 samples (79 MB) selected in a fresh process: the peak grows by about one copy of
    the samples, not the four that cat-then-permute held at once (8.2 GB at 3,200 resnet50
    samples, above the budgeted scoring pass)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", SELECTION_PEAK], capture_output=True, text=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    nbytes, before, after = (int(v) for v in done.stdout.split())
    assert nbytes == 1600 * 3 * 64 * 64 * 4
    assert after - before < 1.5 * nbytes, (after - before) / nbytes


def test_samples_past_the_budget_stop_the_reading_in_one_line() -> None:
    """A budget with about 8 MB of room beside what is in use: reading 96 MB of calibration
    samples stops at the batch that passes it, before the rest of the data is read."""
    cpu = torch.device("cpu")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(3600, 10)
    )
    read: list[int] = []

    def batches():
        g = torch.Generator().manual_seed(0)
        for s in range(0, 8000, 250):
            read.append(s)
            yield torch.randn(250, 3, 32, 32, generator=g), torch.arange(s, s + 250) % 10

    budget = int((used_bytes(cpu) + reserve(0) + 8 * 2**20) * 32 / 31)
    with pytest.raises(ScoringError) as err:
        score(model, batches(), samples_per_class=800, progress=False, max_memory=budget)
    assert str(err.value).startswith("the calibration samples alone pass the memory budget")
    assert str(err.value).endswith("raise --max-memory or lower --samples-per-class")
    assert 1 <= len(read) < 8, len(read)


def test_nccl_process_without_a_gpu_of_its_own_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine with one GPU, the second torchrun process would share it (NCCL refuses):
    init_distributed says so before joining the group (GPU count simulated; none here)."""
    from calibration.errors import FairEdgeError
    from pipeline.recovery import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(FairEdgeError, match=r"process 1 of this machine has no GPU of its own"):
        init_distributed()


def test_a_budget_with_a_dense_task_is_refused_not_ignored() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 3, 1))
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4, 8, 8))
    with pytest.raises(ScoringError, match="a memory budget covers classification scoring, not"):
        score(model, (x, t), task="segmentation", max_memory="8G", progress=False)
    score(
        model, (x, t), task="segmentation", samples_per_class=4, progress=False
    )  # no budget: runs


def test_selection_hash_sees_one_changed_value_in_any_dtype() -> None:
    """The torchrun data check's hash: equal for equal samples, different for one changed value
    (bfloat16 included, which numpy cannot hold), read in row blocks smaller than the data."""
    from pipeline.scoring import _Selection, _selection_hash

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(7, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
        y = torch.arange(7) % 2

        def sel(x: torch.Tensor, y: torch.Tensor = y) -> _Selection:
            return _Selection(x, y, y, [0, 1], [4, 3], 2)

        same = _selection_hash(sel(x.clone()), rows=3)
        assert _selection_hash(sel(x), rows=3) == same
        changed = x.clone()
        changed[6, 2, 3, 3] += 1
        assert _selection_hash(sel(changed), rows=3) != same, dtype
        assert _selection_hash(sel(x, 1 - y), rows=3) != same, dtype


def test_a_dense_task_under_torchrun_is_refused_before_any_work(tmp_path: Path) -> None:
    """Dense scoring has no shares of batches: under torchrun every process would score it all
    and race for the cache entry, so compute_scores refuses it (world size from Dist, no
    collective is reached)."""
    from calibration.data import CalibrationSet
    from fair_edge.config import Options
    from fair_edge.plan_stage import compute_scores
    from fair_edge.stage_cache import StageCache
    from pipeline.recovery import Dist

    cs = CalibrationSet(np.zeros((4, 1, 8, 8), dtype=np.float32))
    cache = StageCache(tmp_path / "stages")
    with pytest.raises(ScoringError, match=r"^scoring under torchrun covers classification, not "
                       r"--task segmentation; run it as one process$"):  # fmt: skip
        compute_scores(torch.nn.Conv2d(1, 3, 1), cs, Options(task="segmentation"), cache,
                       Dist(rank=0, world=2))  # fmt: skip
    assert not (tmp_path / "stages").exists()
