"""One run per output at a time: an exclusive lock file beside the output.

The lock is a ``fcntl.flock`` held on an open file for the whole run. The
kernel drops it when the holder exits *for any reason*, SIGKILL and OOM kill
included, so a dead run can never keep the next night's run out, and there is
no pid guessing (pids are reused; a pid file cannot tell a dead run from a
new process with the same number). The file also holds who took the lock
(pid, host, start time, command), only so the second run can name the holder.

A lock file found with a holder written in it but no flock on it was left by
a run that died: it is taken over, and ``RunLock.stale_holder`` says whose it
was so the caller can warn.

Scope: ``flock`` is advisory and per host; on NFS, Linux emulates it with
NFS byte-range locks, which work across hosts on NFSv4. Two runs on machines
that share the output through a filesystem without locking are not protected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from pipeline.durable import disk_full_error
from pipeline.errors import EnrichError, ExitCode, UsageError
from pipeline.events import redact

LOCK_SUFFIX: Final = ".enrich.lock"

# A holder file is a few hundred bytes; the cap only guards against reading a
# huge file someone put under the lock's name.
_MAX_HOLDER_BYTES: Final = 64 * 1024

# Acquiring races with a holder that unlinks the file on release (see
# ``_lock_current_file``); a few retries always settle it.
_ACQUIRE_ATTEMPTS: Final = 10


def lock_path_for(output: Path) -> Path:
    """``data/out/x.parquet`` -> ``data/out/x.parquet.enrich.lock``: beside the
    output, so every run that writes that output meets the same lock."""
    return output.with_name(output.name + LOCK_SUFFIX)


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a lock, as written in the lock file."""

    pid: int
    host: str
    started_at: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started_at}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LockHolder | None:
        """None for an empty or unreadable file (a holder that died between
        creating the file and writing it, or something else entirely)."""
        try:
            body = json.loads(data)
            return cls(
                pid=int(body["pid"]),
                host=str(body["host"]),
                started_at=str(body["started_at"]),
                command=str(body.get("command", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None


class LockHeld(EnrichError):
    """Another live run holds the lock on this output."""

    exit_code = ExitCode.LOCK_HELD

    def __init__(self, path: Path, holder: LockHolder | None) -> None:
        who = holder.describe() if holder is not None else "another process (not yet identified)"
        command = f" ({holder.command})" if holder is not None and holder.command else ""
        super().__init__(
            f"another enrich run is writing this output: {who}{command}; wait for it to "
            f"finish, or, if you are sure it is not running, delete {path} and rerun"
        )
        self.path = path
        self.holder = holder


def takeover_message(path: Path, holder: LockHolder) -> str:
    """The warning for a stale lock taken over (the CLI or a sink shows it)."""
    return (
        f"took over the lock {path} left by a run that is gone ({holder.describe()}); "
        "its finished rows are in the checkpoint and are not sent again"
    )


class LockError(UsageError):
    """The lock file cannot be created or locked (missing directory, no
    permission, a filesystem without locks)."""


def read_holder(path: Path) -> LockHolder | None:
    """The holder written in a lock file, or None (absent, empty, unreadable)."""
    try:
        with path.open("rb") as handle:
            return LockHolder.from_json(handle.read(_MAX_HOLDER_BYTES))
    except OSError:
        return None


_WOULD_BLOCK: Final = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
# `enrich status` holds a shared lock for an instant to see whether a run is
# alive; a run starting in that instant waits these few moments, not exits 4.
_SHARED_LOCK_WAITS_S: Final = (0.01, 0.05, 0.1)


def _flock_exclusive(fd: int) -> None:
    for wait in _SHARED_LOCK_WAITS_S:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in _WOULD_BLOCK:
                raise
        time.sleep(wait)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def live_holder(path: Path) -> LockHolder | None:
    """The holder of a run that is alive now, or None: no lock file, or one a
    dead run left behind (the kernel dropped its flock). Reads the lock with a
    shared, non-blocking flock released at once (a run starting in that
    instant waits for it, see ``_flock_exclusive``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _WOULD_BLOCK:
                return read_holder(path) or LockHolder(pid=0, host="?", started_at="?", command="?")
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def default_command(secrets: Iterable[str | None] = ()) -> str:
    # argv can carry anything a user typed; scrub secrets before it is written to disk.
    return redact(shlex.join(sys.argv), secrets)


class RunLock:
    """``with RunLock(lock_path_for(output)) as lock: ...`` holds the lock for
    the block. Raises ``LockHeld`` (exit 4) when another live process holds
    it, ``LockError`` (exit 2) when the file cannot be locked at all.

    After acquiring, ``stale_holder`` is the holder a dead run left in the
    file (taken over silently; the caller may warn), else None.

    Two ``RunLock`` objects on one path conflict even inside one process
    (flock locks belong to the open file, not to the process), so a library
    caller cannot accidentally run the same output twice concurrently.
    """

    def __init__(
        self,
        path: Path,
        *,
        command: str | None = None,
        secrets: Iterable[str | None] = (),
    ) -> None:
        self.path = path
        self.holder = LockHolder(
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=_now(),
            command=redact(command, secrets) if command is not None else default_command(secrets),
        )
        self.stale_holder: LockHolder | None = None
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def acquire(self) -> Self:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this RunLock")
        for _ in range(_ACQUIRE_ATTEMPTS):
            fd = self._lock_current_file()
            if fd is not None:
                break
        else:  # pragma: no cover - needs a holder releasing ten times in a row
            raise LockHeld(self.path, read_holder(self.path))
        self.holder = replace(self.holder, started_at=_now())
        try:
            previous = os.read(fd, _MAX_HOLDER_BYTES)
            # Anything written there is from a run that is gone: a live one would
            # still hold the flock, and a clean exit deletes the file.
            self.stale_holder = LockHolder.from_json(previous) if previous else None
            os.ftruncate(fd, 0)
            os.pwrite(fd, self.holder.to_json() + b"\n", 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise disk_full_error(exc, self.path) or LockError(
                f"cannot write the lock file {self.path} ({exc.strerror}); "
                "check the permissions of the output directory"
            ) from None
        self._fd = fd
        return self

    def _lock_current_file(self) -> int | None:
        """Open and flock the file now at ``path``. None when the file was
        replaced between open and flock (a holder released it and a third run
        created a new one): the caller retries on the new file."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise disk_full_error(exc, self.path) or LockError(
                f"cannot create the lock file {self.path} ({exc.strerror}); make sure the "
                "output directory exists and is writable, or choose another --output"
            ) from None
        try:
            _flock_exclusive(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _WOULD_BLOCK:
                raise LockHeld(self.path, read_holder(self.path)) from None
            raise LockError(
                f"cannot lock {self.path} ({exc.strerror}); the filesystem may not support "
                "locks: write the output to a local disk"
            ) from None
        # The holder we waited on may have unlinked the file just before we
        # locked our (now nameless) copy; only a lock on the file that is at
        # the path protects anything.
        try:
            same = os.path.samestat(os.fstat(fd), self.path.stat())
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def release(self) -> None:
        """Delete the file, then drop the flock (in that order: a waiting run
        that locks the old file sees it is gone and retries on a new one)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        finally:
            os.close(fd)

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
