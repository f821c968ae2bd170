"""Atomic writes: a failure leaves the old content or nothing, never half."""

from __future__ import annotations

import pytest

from calibration.fileio import atomic_directory, atomic_write_text, cache_dir


def test_atomic_write_replaces_whole(tmp_path) -> None:
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_atomic_directory_failure_keeps_old_bundle(tmp_path) -> None:
    bundle = tmp_path / "bundle"
    with atomic_directory(bundle) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_directory(bundle) as tmp:
        (tmp / "a").write_text("new")
        raise OSError(28, "disk full")
    assert (bundle / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_atomic_directory_failure_leaves_nothing_new(tmp_path) -> None:
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "b") as tmp:
        (tmp / "x").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_honours_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FAIR_EDGE_CACHE", str(tmp_path / "c"))
    assert cache_dir("models") == tmp_path / "c" / "models"
    assert (tmp_path / "c" / "models").is_dir()
    monkeypatch.delenv("FAIR_EDGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "fair-edge"
