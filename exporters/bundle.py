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


def read_manifest(bundle: str | os.PathLike) -> dict[str, Any]:
    path = Path(bundle) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(
            f"{str(bundle)!r} is not a fair-edge bundle (no {MANIFEST_NAME})"
        ) from exc
    except json.JSONDecodeError as exc:
        raise BundleError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if data.get("schema") != MANIFEST_SCHEMA:
        raise BundleError(f"{str(path)!r} is not a fair-edge bundle manifest")
    if data.get("version") != MANIFEST_VERSION:
        raise BundleError(
            f"bundle manifest version {data.get('version')} is not {MANIFEST_VERSION}; rebuild the bundle"
        )
    return data


def verify_bundle(bundle: str | os.PathLike) -> dict[str, Any]:
    """Recompute every file's SHA-256; raise BundleError naming the first mismatch or stray file."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    files: Mapping[str, Any] = manifest["files"]
    for rel, entry in files.items():
        path = bundle / rel
        if not path.is_file():
            raise BundleError(f"bundle file {rel!r} listed in the manifest is missing")
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"bundle file {rel!r} does not match its SHA-256; rebuild the bundle")
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {
        MANIFEST_NAME
    }
    stray = sorted(on_disk - set(files))
    if stray:
        raise BundleError(f"bundle holds files the manifest does not list: {', '.join(stray)}")
    return manifest
