"""Durable file replacement: temp file in the same directory, fsync, rename.

A reader (or a resumed run after SIGKILL or power loss) sees the old content
or the new content, never a torn mix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from pathlib import Path

from pipeline.errors import DiskFull

TEMP_MARKER = ".tmp-"
TRASH_MARKER = ".trash-"
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def temp_path_for(path: Path) -> Path:
    """A sibling temp name; the rename must stay on one filesystem to be atomic."""
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}")


def is_temp_path(path: Path) -> bool:
    return path.name.startswith(".") and TEMP_MARKER in path.name


def remove_stale_temps(path: Path) -> None:
    """Delete temp files a killed writer of ``path`` left behind. Only one run
    writes a given output at a time, so any such file is dead."""
    for stale in path.parent.glob(f".{path.name}{TEMP_MARKER}*"):
        stale.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    with contextlib.suppress(OSError):  # some filesystems refuse to fsync directories
        fsync_path(directory)


def commit_temp(temp: Path, final: Path) -> None:
    """fsync ``temp`` and atomically move it to ``final``."""
    fsync_path(temp)
    temp.replace(final)
    fsync_dir(final.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    temp = temp_path_for(path)
    try:
        temp.write_bytes(data)
        commit_temp(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def move_to_trash(directory: Path) -> Path | None:
    """Rename ``directory`` to a hidden sibling (atomic), so that deleting it
    can never leave it half-deleted under its own name; returns the new path
    (None if there was no such directory). ``remove_trash`` finishes it off."""
    trash = directory.with_name(f".{directory.name}{TRASH_MARKER}{time.time_ns()}")
    try:
        directory.rename(trash)
    except FileNotFoundError:
        return None
    fsync_dir(directory.parent)
    return trash


def remove_tree(directory: Path) -> None:
    """Delete a directory; a kill at any instant leaves it whole or gone."""
    trash = move_to_trash(directory)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def remove_trash(directory: Path) -> None:
    """Finish the removals of ``directory`` that a killed process left halfway."""
    for trash in directory.parent.glob(f".{directory.name}{TRASH_MARKER}*"):
        shutil.rmtree(trash, ignore_errors=True)


def _is_no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    # Arrow's IO errors are OSErrors without an errno; the message carries it.
    text = str(exc)
    return any(os.strerror(code) in text for code in _NO_SPACE)


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest
    existing parent): what a user must free space on."""
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    device = current.stat().st_dev
    while current != current.parent and current.parent.stat().st_dev == device:
        current = current.parent
    return current


def disk_full_error(exc: BaseException, path: Path) -> DiskFull | None:
    """``DiskFull`` naming the device when ``exc`` says the disk (or quota) is
    full; None for any other error."""
    if not _is_no_space(exc):
        return None
    try:
        device = str(mount_point(path))
    except OSError:
        device = str(path.parent)
    return DiskFull(
        f"no space left on {device} (writing {path}); what was finished is checkpointed: "
        "free space and rerun the same command to resume"
    )
