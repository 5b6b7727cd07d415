"""Durable file replacement: temp file in the same directory, fsync, rename.

A reader (or a resumed run after SIGKILL or power loss) sees the old content
or the new content, never a torn mix.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

TEMP_MARKER = ".tmp-"


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
