"""Artifact directories that appear whole or not at all, and their manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import ExporterError

MANIFEST = "manifest.json"


def check_target(target: Path, force: bool) -> None:
    """Fail early (before minutes of work) when the output cannot be written."""
    if target.exists() and not force:
        raise ExporterError(f"{target} already exists; pass --force to replace it")
    if target.exists() and not target.is_dir():
        raise ExporterError(f"{target} exists and is not a directory")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExporterError(f"cannot create output directory {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise ExporterError(f"output directory {parent} is not writable")


@contextmanager
def staging_dir(target: Path, force: bool = False):
    """Yield a temp dir beside `target`; rename it to `target` only if the block succeeds.

    Any exception (Ctrl-C included) removes the temp dir, so no half-written artifact remains.
    """
    target = Path(target)
    check_target(target, force)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary directory
    try:
        yield tmp
        if target.exists():  # --force: swap in the new one, then drop the old one
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / "artifact")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_table(directory: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} for every file but the manifest itself."""
    table = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            table[path.relative_to(directory).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def write_manifest(directory: Path, manifest: dict) -> None:
    manifest = {**manifest, "files": file_table(directory)}
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ExporterError(f"{directory} is not an artifact (no {MANIFEST})") from None
    except json.JSONDecodeError as exc:
        raise ExporterError(f"{path} is not valid JSON: {exc.msg}") from None
