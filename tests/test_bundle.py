"""The bundle writer: hashes that recompute, tamper and stray-file detection, and a full disk
mid-way (fault injection) leaving no partial bundle and the previous bundle intact."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devices.runspec import RUNNER_PATH
from exporters import bundle as bundle_mod
from exporters.bundle import BundleError, BundleSpec, read_manifest, verify_bundle, write_bundle


def _spec(src: Path, name: str = "m-host") -> BundleSpec:
    src.mkdir(parents=True, exist_ok=True)
    (src / "a.bin").write_bytes(b"\x00\x01" * 1000)
    (src / "b.bin").write_bytes(b"weights" * 300)
    spec = BundleSpec(name=name)
    spec.add_file("model.onnx", src / "a.bin", "model")
    spec.add_file("reference/original.onnx", src / "b.bin", "reference")
    spec.add_file("runner.py", RUNNER_PATH, "runner")
    spec.add_text("labels.txt", "cat\ndog\n", "labels")
    spec.manifest = {"input": {"name": "input", "shape": ["batch", 1, 4, 4]}}
    return spec


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_manifest_hashes_recompute(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "dist", _spec(tmp_path / "src"))
    manifest = read_manifest(out)
    assert manifest["schema"] == "fair-edge/bundle" and manifest["version"] == 1
    files = manifest["files"]
    assert set(files) == {"model.onnx", "reference/original.onnx", "runner.py", "labels.txt"}
    for rel, entry in files.items():
        data = (out / rel).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["size"] == len(data)
    assert files["runner.py"]["role"] == "runner"
    assert (out / "runner.py").read_bytes() == RUNNER_PATH.read_bytes()
    assert manifest["input"]["shape"] == ["batch", 1, 4, 4]
    assert verify_bundle(out)["name"] == "m-host"
    assert _leftovers(tmp_path / "dist") == []


def test_the_board_runner_accepts_the_manifest(tmp_path: Path) -> None:
    """The runner shipped in the bundle verifies the bundle's own manifest (exit 3 on a change)."""
    out = write_bundle(tmp_path / "dist", _spec(tmp_path / "src"))
    sys.path.insert(0, str(RUNNER_PATH.parent))
    try:
        import runner  # the standalone board runner
    finally:
        sys.path.pop(0)
    assert runner.read_hash_list(str(out / "manifest.json")) == {
        rel: e["sha256"] for rel, e in read_manifest(out)["files"].items()
    }
    runner.verify_hashes(str(out / "manifest.json"), str(out))
    (out / "labels.txt").write_text("tampered\n")
    with pytest.raises(runner.RunnerFailure) as info:
        runner.verify_hashes(str(out / "manifest.json"), str(out))
    assert info.value.code == "hash_mismatch"


def test_tampered_missing_and_stray_files_are_caught(tmp_path: Path) -> None:
    out = write_bundle(tmp_path / "dist", _spec(tmp_path / "src"))
    (out / "model.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match="model.onnx.*SHA-256"):
        verify_bundle(out)
    out = write_bundle(tmp_path / "dist", _spec(tmp_path / "src"))
    (out / "extra.txt").write_text("x")
    with pytest.raises(BundleError, match="extra.txt"):
        verify_bundle(out)
    (out / "extra.txt").unlink()
    (out / "labels.txt").unlink()
    with pytest.raises(BundleError, match="labels.txt.*missing"):
        verify_bundle(out)
    with pytest.raises(BundleError, match="not a fair-edge bundle"):
        verify_bundle(tmp_path)


def test_disk_full_mid_way_leaves_no_partial_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on the second file copy: an error line, no new folder, no temp folder, and the
    previous bundle of that name still whole."""
    root = tmp_path / "dist"
    first = write_bundle(root, _spec(tmp_path / "src"))
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    real_copy = shutil.copyfile
    calls = {"n": 0}

    def full_disk(src, dst, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real_copy(src, dst, *args, **kwargs)  # half-written: the file exists, then no space
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(bundle_mod.shutil, "copyfile", full_disk)
    spec = _spec(tmp_path / "src2")
    (tmp_path / "src2" / "a.bin").write_bytes(b"new model")
    with pytest.raises(BundleError, match="No space left on device.*nothing was left behind"):
        write_bundle(root, spec)
    assert calls["n"] == 2
    assert sorted(p.name for p in root.iterdir()) == ["m-host"]
    after = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert after == before
    verify_bundle(first)

    monkeypatch.setattr(bundle_mod.shutil, "copyfile", full_disk)
    calls["n"] = 0
    with pytest.raises(BundleError):
        write_bundle(root, _spec(tmp_path / "src3", name="fresh-host"))
    assert not (root / "fresh-host").exists() and _leftovers(root) == []


def test_disk_full_while_writing_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC from os.fsync of the manifest (the last write) still leaves nothing behind."""
    root = tmp_path / "dist"

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle_mod.os, "fsync", no_space)
    with pytest.raises(BundleError, match="No space left"):
        write_bundle(root, _spec(tmp_path / "src"))
    assert list(root.iterdir()) == []


def test_paths_outside_the_bundle_are_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path / "src")
    spec.add_text("../escape.txt", "x", "report")
    with pytest.raises(BundleError, match="inside the bundle"):
        write_bundle(tmp_path / "dist", spec)
    spec = _spec(tmp_path / "src")
    spec.add_file("x.onnx", tmp_path / "missing.onnx", "model")
    with pytest.raises(BundleError, match="does not exist"):
        write_bundle(tmp_path / "dist", spec)
    assert not (tmp_path / "dist" / "m-host").exists()


def test_runner_verifies_a_bundle_in_its_own_process(tmp_path: Path) -> None:
    """`runner.py --hashes manifest.json` as the board would call it, on a tampered bundle."""
    out = write_bundle(tmp_path / "dist", _spec(tmp_path / "src"))
    (out / "reference" / "original.onnx").write_bytes(b"x")
    proc = subprocess.run(
        [sys.executable, str(out / "runner.py"), str(out / "model.onnx"), "--hashes",
         str(out / "manifest.json"), "--bundle-dir", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is False and result["error"]["code"] == "hash_mismatch"
