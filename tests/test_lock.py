"""The run lock with real processes: a live holder keeps a second run out
(exit code 4, naming the holder); a SIGKILLed holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import lock as lock_module
from pipeline.lock import (
    LockError,
    LockHeld,
    LockHolder,
    RunLock,
    lock_path_for,
    read_holder,
    takeover_message,
)

PACKAGE_DIR = Path(lock_module.__file__).parent

# A child process that takes the lock, says so on stdout, then waits to be
# killed (or for stdin to close, so a failed test never leaves it behind).
# It loads pipeline.lock without the package's __init__, which imports the
# whole stack (openai alone takes seconds) that the lock does not need.
HOLDER = textwrap.dedent(
    """
    import sys, types
    from pathlib import Path

    package = types.ModuleType("pipeline")
    package.__path__ = [sys.argv[2]]
    sys.modules["pipeline"] = package
    from pipeline.lock import RunLock

    lock = RunLock(Path(sys.argv[1]), command="enrich run nightly.toml").acquire()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def holder_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    path = tmp_path / "out.parquet.enrich.lock"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(PACKAGE_DIR)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "locked"
        yield process, path
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


def test_lock_path_is_beside_the_output() -> None:
    assert lock_path_for(Path("data/out/x.parquet")) == Path("data/out/x.parquet.enrich.lock")


def test_holder_info_is_written_and_the_file_removed_on_release(tmp_path: Path) -> None:
    path = tmp_path / "out.lock"
    with RunLock(path, command="enrich run nightly.toml") as lock:
        held_inside = lock.locked
        assert lock.stale_holder is None
        body = json.loads(path.read_text())
        assert body["pid"] == os.getpid()
        assert body["host"] == socket.gethostname()
        assert body["command"] == "enrich run nightly.toml"
        assert body["started_at"]
    assert held_inside and not lock.locked
    assert not path.exists()


def test_a_live_holder_in_another_process_keeps_the_second_run_out(
    holder_process: tuple[subprocess.Popen[str], Path],
) -> None:
    process, path = holder_process
    with pytest.raises(LockHeld) as caught:
        RunLock(path).acquire()
    error = caught.value
    assert error.exit_code == 4
    assert error.holder is not None and error.holder.pid == process.pid
    message = error.message
    assert "\n" not in message
    assert f"pid {process.pid} on {socket.gethostname()}" in message
    assert "enrich run nightly.toml" in message
    assert str(path) in message and "wait" in message
    # The refused run must not have touched the holder's file.
    holder = read_holder(path)
    assert holder is not None and holder.pid == process.pid


def test_a_sigkilled_holders_lock_is_taken_over(
    holder_process: tuple[subprocess.Popen[str], Path],
) -> None:
    process, path = holder_process
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    # SIGKILL runs no cleanup: the file and the dead holder's info are still there.
    left = read_holder(path)
    assert left is not None and left.pid == process.pid

    with RunLock(path) as lock:
        assert lock.stale_holder is not None
        assert lock.stale_holder.pid == process.pid
        holder = read_holder(path)
        assert holder is not None and holder.pid == os.getpid()
        warning = takeover_message(path, lock.stale_holder)
        assert f"pid {process.pid}" in warning and str(path) in warning


def test_the_lock_is_free_again_after_a_clean_exit(
    holder_process: tuple[subprocess.Popen[str], Path],
) -> None:
    process, path = holder_process
    assert process.stdin is not None
    process.stdin.close()  # the holder returns normally
    assert process.wait(timeout=10) == 0
    with RunLock(path) as lock:
        # The kernel dropped the flock at exit; the file (never unlinked by
        # this holder, which did not release) names a run that is gone.
        assert lock.stale_holder is not None and lock.stale_holder.pid == process.pid


def test_two_locks_in_one_process_conflict(tmp_path: Path) -> None:
    path = tmp_path / "out.lock"
    with RunLock(path), pytest.raises(LockHeld):
        RunLock(path).acquire()
    with RunLock(path) as again:
        assert again.stale_holder is None


def test_an_empty_lock_file_held_by_nobody_is_taken_without_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "out.lock"
    path.write_text("")
    with RunLock(path) as lock:
        assert lock.stale_holder is None


def test_unwritable_place_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(LockError) as caught:
        RunLock(tmp_path / "missing-dir" / "out.lock").acquire()
    assert caught.value.exit_code == 2
    assert "missing-dir" in caught.value.message


def test_the_command_written_to_disk_has_no_secret(tmp_path: Path) -> None:
    secret = "sk-live-0123456789abcdef"
    path = tmp_path / "out.lock"
    with RunLock(path, command=f"enrich run --header {secret}", secrets=[secret]):
        assert secret not in path.read_text()


def test_holder_parsing_tolerates_garbage() -> None:
    assert LockHolder.from_json(b"not json") is None
    assert LockHolder.from_json(b'{"pid": "x"}') is None
    holder = LockHolder(1, "h", "2025-01-01T00:00:00+00:00", "enrich run")
    assert LockHolder.from_json(holder.to_json()) == holder
