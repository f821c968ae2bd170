"""The board runner refuses manifest paths that leave the bundle, before it opens any listed file."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devices.board import runner
from devices.runspec import RUNNER_PATH

WRONG = "0" * 64


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    """A bundle folder with one real file, next to a secret file outside it."""
    root = tmp_path / "bundle"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"abc")
    (tmp_path / "secret.txt").write_bytes(b"not yours")
    return root


def _manifest(root: Path, files: dict[str, str], form: str = "json") -> str:
    path = root / ("manifest.json" if form == "json" else "SHA256SUMS")
    if form == "json":
        path.write_text(json.dumps({"files": files}))
    else:
        path.write_text("".join(f"{h}  {name}\n" for name, h in files.items()))
    return str(path)


def _refused(root: Path, name: str, form: str = "json") -> str:
    """The refusal message for `name`; a.bin carries a wrong hash, so hashing it first would fail
    differently: the message proves no listed file was read before the paths were checked."""
    manifest = _manifest(root, {"a.bin": WRONG, name: WRONG}, form)
    with pytest.raises(runner.RunnerFailure) as info:
        runner.verify_hashes(manifest, str(root))
    assert info.value.code == "bad_manifest" and info.value.exit_code == runner.EXIT_HASH
    assert "a bundle manifest may name only files inside the bundle folder" in info.value.message
    return info.value.message


@pytest.mark.parametrize("form", ["json", "sums"])
def test_absolute_paths_are_refused(bundle: Path, form: str) -> None:
    secret = str(bundle.parent / "secret.txt")
    assert f"names an absolute path {secret}" in _refused(bundle, secret, form)
    assert "absolute path" in _refused(bundle, "C:/Windows/win.ini", form)
    assert "absolute path" in _refused(bundle, "\\\\server\\share\\x", form)


@pytest.mark.parametrize(
    "name", ["../secret.txt", "sub/../../secret.txt", "sub/../a.bin", "..", "sub\\..\\..\\x"]
)
def test_dot_dot_is_refused_even_when_it_stays_inside(bundle: Path, name: str) -> None:
    assert f"names {name}, whose '..' could lead outside the bundle" in _refused(bundle, name)


def test_symlinks_out_of_the_bundle_are_refused(bundle: Path) -> None:
    (bundle / "zlink").symlink_to(bundle.parent / "secret.txt")
    message = _refused(bundle, "zlink")
    assert "which a symlink resolves outside the bundle" in message
    assert str((bundle.parent / "secret.txt").resolve()) in message
    (bundle / "zdir").symlink_to(bundle.parent, target_is_directory=True)
    assert "resolves outside the bundle" in _refused(bundle, "zdir/secret.txt")
    (bundle / "sub" / "up").symlink_to("..", target_is_directory=True)
    (bundle / "sub" / "upup").symlink_to("../..", target_is_directory=True)
    assert "resolves outside the bundle" in _refused(bundle, "sub/upup/secret.txt")


def test_paths_inside_the_bundle_still_verify(bundle: Path, tmp_path: Path) -> None:
    """Symlinks that stay inside, nested files and a bundle reached through a symlink are fine."""
    (bundle / "sub" / "b.bin").write_bytes(b"bee")
    (bundle / "alias.bin").symlink_to("a.bin")
    (bundle / "sub" / "up").symlink_to("..", target_is_directory=True)
    files = {
        "a.bin": _digest(b"abc"),
        "sub/b.bin": _digest(b"bee"),
        "./alias.bin": _digest(b"abc"),
        "sub/up/a.bin": _digest(b"abc"),
    }
    assert runner.verify_hashes(_manifest(bundle, files), str(bundle)) == 4
    via = tmp_path / "via"
    via.symlink_to(bundle, target_is_directory=True)
    assert runner.verify_hashes(_manifest(via, files, "sums"), str(via)) == 4
    (bundle / "a.bin").write_bytes(b"abd")
    with pytest.raises(runner.RunnerFailure, match="a.bin does not match its hash"):
        runner.verify_hashes(_manifest(bundle, {"a.bin": _digest(b"abc")}), str(bundle))


def test_the_runner_process_reports_the_refusal_as_json(bundle: Path) -> None:
    manifest = _manifest(bundle, {"a.bin": _digest(b"abc"), "../secret.txt": WRONG})
    proc = subprocess.run(
        [sys.executable, str(RUNNER_PATH), "a.bin", "--hashes", manifest, "--bundle-dir", "."],
        capture_output=True,
        text=True,
        cwd=bundle,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == runner.EXIT_HASH and not result["ok"]
    assert (
        result["error"]["code"] == "bad_manifest" and "../secret.txt" in result["error"]["message"]
    )
    assert not proc.stderr.strip()


def _python36() -> str | None:
    """A Python 3.6 interpreter (JetPack 4's), if this machine has one."""
    found = sorted(Path.home().glob(".pyenv/versions/3.6*/bin/python3.6"))
    candidates = [str(p) for p in found] + [shutil.which("python3.6") or ""]
    for exe in filter(None, candidates):
        check = [exe, "-c", "import sys; assert sys.version_info[:2] == (3, 6)"]
        if subprocess.run(check, capture_output=True).returncode == 0:
            return exe
    return None


def test_the_check_runs_on_python_3_6(bundle: Path) -> None:
    """The runner travels to boards with Python 3.6; its path check must run there too."""
    exe = _python36()
    if exe is None:
        pytest.skip("no Python 3.6 interpreter on this machine")
    manifest = _manifest(bundle, {"a.bin": _digest(b"abc"), "/etc/passwd": WRONG}, "sums")
    proc = subprocess.run(
        [exe, str(RUNNER_PATH), "a.bin", "--hashes", manifest, "--bundle-dir", "."],
        capture_output=True,
        text=True,
        cwd=bundle,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == runner.EXIT_HASH, proc.stderr
    assert "names an absolute path /etc/passwd" in result["error"]["message"]
