"""Artifact directories that appear whole or not at all (their manifest: exporter.artifact.manifest)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from exporter.errors import ExporterError


def check_target(target: Path, force: bool) -> None:
    """Fail early (before minutes of work) when the output cannot be written; creates nothing."""
    target = Path(target)
    if target.exists() and not force:
        raise ExporterError(f"{target} already exists; pass --force to replace it")
    if target.exists() and not target.is_dir():
        raise ExporterError(f"{target} exists and is not a directory")
    ancestor = target.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExporterError(f"cannot create {target}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise ExporterError(f"cannot create {target}: {ancestor} is not writable")


@contextmanager
def staging_dir(target: Path, force: bool = False):
    """Yield a temp dir beside `target`; rename it to `target` only if the block succeeds.

    Any exception (Ctrl-C included) removes the temp dir, so no half-written artifact remains;
    with --force the old artifact stays in place until the new one is complete.
    """
    target = Path(target)
    check_target(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExporterError(f"cannot create {target.parent}: {exc.strerror}") from None
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary directory
    try:
        yield tmp
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old / "artifact")
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / "artifact", target)  # put the previous artifact back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
