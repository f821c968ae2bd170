"""The edge-ready bundle: `dist/<model>-<device>/` with the model files, the standalone runner,
`manifest.json` (SHA-256 of every file) and the reports.

The whole folder is assembled in a temporary sibling and renamed into place only when every
file and the manifest are written (calibration.fileio.atomic_directory), so a crash or a full
disk leaves the previous bundle or nothing, never half a bundle. The runner file is handed in
by the caller (devices owns it; exporters never import devices).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.errors import FairEdgeError
from calibration.fileio import atomic_directory

MANIFEST_SCHEMA = "fair-edge/bundle"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
TOOL_PACKAGES = (
    "fair-edge",
    "torch",
    "onnx",
    "onnxruntime",
    "onnxslim",
    "onnx_graphsurgeon",
    "ai-edge-litert",
    "litert-torch",
    "numpy",
)


class BundleError(FairEdgeError):
    """A bundle that cannot be written, or one whose files do not match its manifest."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tool_versions(packages: tuple[str, ...] = TOOL_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when absent) plus Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class BundleSpec:
    """What goes into a bundle. `files` maps a path inside the bundle to (source file, role);
    `texts` maps a path inside the bundle to text content written as is."""

    name: str
    files: dict[str, tuple[Path, str]] = field(default_factory=dict)
    texts: dict[str, tuple[str, str]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def add_file(self, inside: str, source: str | os.PathLike, role: str) -> None:
        self.files[inside] = (Path(source), role)

    def add_text(self, inside: str, text: str, role: str) -> None:
        self.texts[inside] = (text, role)


def _check_inside(rel: str) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel == MANIFEST_NAME:
        raise BundleError(
            f"bundle path {rel!r} must be relative, inside the bundle, and not the manifest"
        )


def write_bundle(root: str | os.PathLike, spec: BundleSpec) -> Path:
    """Write the bundle to `root/spec.name` atomically and return its path."""
    dest = Path(root) / spec.name
    for rel in (*spec.files, *spec.texts):
        _check_inside(rel)
    for rel, (src, _) in spec.files.items():
        if not src.is_file():
            raise BundleError(f"bundle file {rel!r}: source {str(src)!r} does not exist")
    try:
        with atomic_directory(dest) as tmp:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a bundle is for sharing
            entries: dict[str, dict[str, Any]] = {}
            for rel, (src, role) in sorted(spec.files.items()):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
                entries[rel] = {"role": role}
            for rel, (text, role) in sorted(spec.texts.items()):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "w", encoding="utf-8") as fh:
                    fh.write(text)
                entries[rel] = {"role": role}
            for rel, entry in entries.items():
                entry["sha256"] = sha256_file(tmp / rel)
                entry["size"] = (tmp / rel).stat().st_size
            manifest = {
                "schema": MANIFEST_SCHEMA,
                "version": MANIFEST_VERSION,
                "name": spec.name,
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                **spec.manifest,
                "files": dict(sorted(entries.items())),
            }
            with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(manifest, indent=1, default=_json_default) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:
        raise BundleError(
            f"writing bundle {str(dest)!r} failed ({exc.strerror or exc}); nothing was left behind "
            "- free space or pick another --out and re-run"
        ) from exc
    return dest


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} into the manifest")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bundle_dir(bundle: Path) -> Path:
    """The bundle folder, resolved; a missing path or a regular file is refused here."""
    if not bundle.exists():
        raise BundleError(
            f"bundle {str(bundle)!r} does not exist; give the folder `fair-edge deploy` wrote"
        )
    if not bundle.is_dir():
        raise BundleError(
            f"bundle {str(bundle)!r} is not a folder; give the folder `fair-edge deploy` wrote "
            "(unpack an archive first)"
        )
    return bundle.resolve()


def _read_bundle_text(bundle: Path, rel: str, missing: str) -> str:
    path = bundle / rel
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        raise BundleError(missing) from exc
    except OSError as exc:
        raise BundleError(
            f"{str(path)!r} cannot be read ({exc.strerror or exc}); check the bundle's permissions"
        ) from exc
    except UnicodeDecodeError as exc:
        raise BundleError(f"{str(path)!r} is not UTF-8 text; rebuild the bundle") from exc


def _load_json(bundle: Path, rel: str, missing: str) -> Any:
    text = _read_bundle_text(bundle, rel, missing)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BundleError(
            f"{str(bundle / rel)!r} is not valid UTF-8 JSON ({_first_line(exc)}); rebuild the bundle"
        ) from exc


def _entry_path(root: Path, rel: str) -> Path:
    """Where manifest entry `rel` lives in the bundle folder `root` (already resolved).

    A manifest is input like any other: an absolute path, a `..` or a symlink leading out of the
    bundle would make `report` hash (and name) files anywhere on the machine, so all are refused.
    """
    inside = isinstance(rel, str) and rel not in ("", ".") and "\x00" not in rel
    if inside:
        p = Path(rel)
        inside = not p.is_absolute() and ".." not in p.parts
    if inside:
        try:
            path = (root / rel).resolve()
        except (OSError, RuntimeError):  # a symlink loop: it leads nowhere inside either
            inside = False
        else:
            inside = path != root and path.is_relative_to(root)
    if not inside:
        raise BundleError(
            f"manifest entry {rel!r} is not a relative path inside the bundle (absolute, '..' or "
            "a symlink leading outside the bundle); refusing it - rebuild the bundle"
        )
    return path


def read_manifest(bundle: str | os.PathLike) -> dict[str, Any]:
    """The bundle's manifest, checked so that readers can index it: a `files` object whose
    entries are paths inside the bundle, each with a SHA-256."""
    bundle = Path(bundle)
    root = _bundle_dir(bundle)
    path = bundle / MANIFEST_NAME
    data = _load_json(
        bundle, MANIFEST_NAME, f"{str(bundle)!r} is not a fair-edge bundle (no {MANIFEST_NAME})"
    )
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        raise BundleError(f"{str(path)!r} is not a fair-edge bundle manifest")
    if data.get("version") != MANIFEST_VERSION:
        raise BundleError(
            f"bundle manifest version {data.get('version')} is not {MANIFEST_VERSION}; rebuild the bundle"
        )
    files = data.get("files")
    if not isinstance(files, dict):
        raise BundleError(
            f"{str(path)!r} has no 'files' object (path -> sha256 and role); rebuild the bundle"
        )
    for rel, entry in files.items():
        _entry_path(root, rel)
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise BundleError(
                f"manifest entry {rel!r} has no sha256 (64 hex digits); rebuild the bundle"
            )
    return data


def verify_bundle(bundle: str | os.PathLike) -> dict[str, Any]:
    """Recompute every file's SHA-256; raise BundleError naming the first mismatch or stray file."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    root = bundle.resolve()
    files: Mapping[str, Any] = manifest["files"]
    try:
        for rel, entry in files.items():
            path = _entry_path(root, rel)
            if not path.is_file():
                raise BundleError(f"bundle file {rel!r} listed in the manifest is missing")
            if sha256_file(path) != entry["sha256"].lower():
                raise BundleError(
                    f"bundle file {rel!r} does not match its SHA-256; rebuild the bundle"
                )
        on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    except OSError as exc:
        raise BundleError(
            f"bundle {str(bundle)!r} cannot be read ({exc.strerror or exc}); check its permissions"
        ) from exc
    stray = sorted(on_disk - {MANIFEST_NAME} - set(files))
    if stray:
        raise BundleError(f"bundle holds files the manifest does not list: {', '.join(stray)}")
    return manifest


def read_report(bundle: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """report.json (an object) and report.md of a bundle, as `fair-edge report` prints them."""
    bundle = Path(bundle)
    _bundle_dir(bundle)

    def missing(rel: str) -> str:
        return f"bundle {str(bundle)!r} has no {rel}; rebuild it with `fair-edge deploy`"

    data = _load_json(bundle, "report.json", missing("report.json"))
    if not isinstance(data, dict):
        raise BundleError(
            f"{str(bundle / 'report.json')!r} is not a JSON object; rebuild the bundle"
        )
    return data, _read_bundle_text(bundle, "report.md", missing("report.md"))
