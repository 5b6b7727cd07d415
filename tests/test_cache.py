"""The response cache and in-run dedup: keys, defaults, the SQLite store
(including two real processes writing one file at once)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

import pipeline.cache
from pipeline.cache import (
    Admission,
    CachedAnswer,
    CacheError,
    InRunDedup,
    ResponseCache,
    cache_stats,
    clear_cache,
    default_cache_path,
    is_deterministic,
    key_function,
    request_key,
    resolve_enabled,
)
from pipeline.errors import ConfigError

ENDPOINT = "http://127.0.0.1:8000/v1"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "row", "schema": {"type": "object"}}}


def key(**changes: Any) -> bytes:
    settings: dict[str, Any] = {
        "endpoint": ENDPOINT,
        "model": "sim-1",
        "params": {"temperature": 0, "max_tokens": 64},
        "messages": MESSAGES,
        "response_format": None,
    }
    settings.update(changes)
    return request_key(**settings)


def answer(text: str = "an answer") -> CachedAnswer:
    return CachedAnswer(text, "stop", "sim-1", 12, 3)


# ---------------------------------------------------------------------------
# Keys.


def test_key_is_the_sha256_of_the_canonical_json() -> None:
    document = {
        "endpoint": ENDPOINT,
        "messages": MESSAGES,
        "model": "sim-1",
        "params": {"max_tokens": 64, "temperature": 0},
        "response_format": FORMAT,
        "v": 1,
    }
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    got = key(response_format=FORMAT)
    assert got == hashlib.sha256(canonical.encode()).digest()
    assert len(got) == 32


def test_key_is_stable_across_equivalent_spellings() -> None:
    assert key() == key()
    assert key(endpoint=ENDPOINT + "/") == key(endpoint="HTTP://127.0.0.1:8000/v1//")
    assert key(params={"max_tokens": 64, "temperature": 0.0}) == key()
    # Unset parameters are not sent, so they are not part of the question either.
    assert key(params={"temperature": 0, "max_tokens": 64, "seed": None}) == key()


@pytest.mark.parametrize(
    "change",
    [
        {"endpoint": "http://127.0.0.1:8001/v1"},
        {"model": "sim-2"},
        {"params": {"temperature": 0.5, "max_tokens": 64}},
        {"params": {"temperature": 0, "max_tokens": 65}},
        {"params": {"temperature": 0, "max_tokens": 64, "top_p": 0.9}},
        {"params": {"temperature": 0, "max_tokens": 64, "seed": 1}},
        {"params": {"temperature": 0, "max_tokens": 64, "presence_penalty": 0.5}},
        {"messages": [MESSAGES[0], {"role": "user", "content": "Hi!"}]},
        {"messages": [MESSAGES[1]]},
        {"messages": [{"role": "developer", "content": "Be brief."}, MESSAGES[1]]},
        {"response_format": FORMAT},
    ],
)
def test_key_changes_with_everything_that_changes_the_answer(change: dict[str, Any]) -> None:
    assert key(**change) != key()


def test_key_function_gives_the_same_keys_as_request_key() -> None:
    make = key_function(
        endpoint=ENDPOINT, model="sim-1", params={"temperature": 0, "max_tokens": 64}
    )
    assert make(MESSAGES) == key()
    # Any mappings and sequences: what matters is the content, not the containers.
    assert make(tuple(MappingProxyType(m) for m in MESSAGES)) == key()
    assert make([{"role": "user", "content": "other"}]) == key(
        messages=[{"role": "user", "content": "other"}]
    )


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, True),
        ({"temperature": None}, True),
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "seed": 3}, True),
        ({"temperature": 0.7}, False),
        ({"temperature": 2}, False),
    ],
)
def test_deterministic_means_no_temperature_or_zero(params: dict[str, Any], expected: bool) -> None:
    assert is_deterministic(params) is expected


def test_explicit_flags_win_over_the_deterministic_default() -> None:
    assert resolve_enabled(None, {}) is True
    assert resolve_enabled(None, {"temperature": 0.7}) is False
    assert resolve_enabled(True, {"temperature": 0.7}) is True
    assert resolve_enabled(False, {}) is False


def test_default_cache_path_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ENRICH_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_path() == tmp_path / "mine" / "cache.sqlite3"
    monkeypatch.delenv("ENRICH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "enrich" / "cache.sqlite3"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / ".cache" / "enrich" / "cache.sqlite3"


# ---------------------------------------------------------------------------
# The store.


def test_put_many_then_get_many_round_trips_and_misses_are_absent(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "cache.sqlite3"
    empty = CachedAnswer(None, None, None, None, None)
    with ResponseCache(path) as cache:
        cache.put_many([(key(), answer()), (key(model="m2"), empty)])
        got = cache.get_many([key(), key(model="m2"), key(model="missing"), key()])
    assert got == {key(): answer(), key(model="m2"): empty}


def test_answers_outlive_the_process_and_a_later_put_replaces(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    with ResponseCache(path) as cache:
        cache.put_many([(key(), answer("first"))])
    with ResponseCache(path) as cache:
        assert cache.get_many([key()])[key()].response == "first"
        cache.put_many([(key(), answer("second"))])
        assert cache.get_many([key()])[key()].response == "second"
        assert cache.stats().entries == 1


def test_put_many_is_one_transaction_and_a_failed_one_leaves_the_cache_usable(
    tmp_path: Path,
) -> None:
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        unbindable: Any = ["not", "bytes"]
        with pytest.raises(CacheError, match="cannot be written"):
            cache.put_many([(key(), answer()), (unbindable, answer())])
        assert cache.get_many([key()]) == {}  # all or nothing
        cache.put_many([(key(), answer())])
        assert cache.get_many([key()]) == {key(): answer()}


def test_a_hundred_thousand_keys_put_then_found(tmp_path: Path) -> None:
    keys = [i.to_bytes(32, "big") for i in range(100_000)]
    shared = answer()
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        cache.put_many([(k, shared) for k in keys])
        found = cache.get_many(keys)
    assert len(found) == len(keys)
    assert found[keys[-1]] == shared


def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    path.write_bytes(b"definitely not SQLite " * 200)
    with pytest.raises(ConfigError, match=r"cache\.sqlite3.*--cache-path.*--no-cache"):
        ResponseCache(path)


def test_another_programs_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(CacheError, match="not an enrich response cache"):
        ResponseCache(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_an_unusable_path_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"a-file.*--cache-path.*--no-cache"):
        ResponseCache(blocker / "cache.sqlite3")


def test_the_store_is_wal_with_a_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    ResponseCache(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


_WRITER = textwrap.dedent(
    """
    import sys, time, types
    from pathlib import Path

    # The package's __init__ imports openai and polars (seconds); the writers
    # need only the cache module, so they get a bare package to import it from.
    package = types.ModuleType("pipeline")
    package.__path__ = [sys.argv[5]]
    sys.modules["pipeline"] = package
    from pipeline.cache import CachedAnswer, ResponseCache

    path, tag, other, count = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])

    def wait_for(name):
        deadline = time.monotonic() + 60
        while not path.with_name(name).exists():
            assert time.monotonic() < deadline, name
            time.sleep(0.005)

    def k(t, i):
        return f"{t}:{i}".encode().ljust(32, b".")

    path.with_name("ready-" + tag).touch()
    wait_for("go")
    with ResponseCache(path) as cache:
        # Many small transactions, so the two writers really interleave.
        for start in range(0, count, 100):
            rows = range(start, start + 100)
            answers = [CachedAnswer(tag + str(i), "stop", "m", i, 1) for i in rows]
            cache.put_many([(k(tag, i), a) for i, a in zip(rows, answers)])
            cache.get_many([k(other, i) for i in rows])
        path.with_name("done-" + tag).touch()
        wait_for("done-" + other)
        print(len(cache.get_many([k(other, i) for i in range(count)])))
    """
)


def test_two_processes_writing_one_cache_at_once_do_not_corrupt_it(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"  # created by the writers themselves, concurrently
    count = 3000
    package_dir = str(Path(pipeline.cache.__file__).parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), tag, other, str(count), package_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag, other in (("a", "b"), ("b", "a"))
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{t}").exists() for t in "ab"):
        assert time.monotonic() < deadline, "writers did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outputs = [proc.communicate(timeout=60) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    # Each writer reads every answer the other wrote.
    assert [int(out) for out, _ in outputs] == [count, count]
    with ResponseCache(path) as cache:
        assert cache.stats().entries == 2 * count
        got = cache.get_many([f"{t}:{i}".encode().ljust(32, b".") for t in "ab" for i in (0, 2999)])
        assert sorted(a.response or "" for a in got.values()) == ["a0", "a2999", "b0", "b2999"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_stats_and_clear(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    before = time.time()
    with ResponseCache(path) as cache:
        assert cache.stats().entries == 0
        assert cache.stats().oldest is None
        cache.put_many([(key(model=f"m{i}"), answer()) for i in range(10)])
        stats = cache.stats()
        assert stats.path == path
        assert stats.entries == 10
        assert stats.size_bytes > 0
        assert stats.oldest is not None and stats.newest is not None
        assert before - 1 <= stats.oldest <= stats.newest <= time.time() + 1
        assert cache.clear() == 10
        assert cache.stats().entries == 0
        assert cache.get_many([key(model="m1")]) == {}


def test_stats_and_clear_of_a_missing_cache_create_nothing(tmp_path: Path) -> None:
    path = tmp_path / "never" / "cache.sqlite3"
    assert cache_stats(path).entries == 0
    assert clear_cache(path) == 0
    assert not path.parent.exists()


def test_module_level_stats_and_clear_of_an_existing_cache(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    with ResponseCache(path) as cache:
        cache.put_many([(key(), answer())])
    assert cache_stats(path).entries == 1
    assert clear_cache(path) == 1
    assert cache_stats(path).entries == 0


def test_a_readonly_cache_reads_but_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    with ResponseCache(path) as cache:
        cache.put_many([(key(), answer())])
    with ResponseCache(path, readonly=True) as cache:
        assert cache.get_many([key()]) == {key(): answer()}
        with pytest.raises(CacheError, match="read-only"):
            cache.put_many([(key(model="x"), answer())])
    with pytest.raises(CacheError, match="no response cache"):
        ResponseCache(tmp_path / "missing.sqlite3", readonly=True)


def test_a_closed_cache_says_so(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache.sqlite3")
    cache.close()
    cache.close()  # idempotent
    with pytest.raises(CacheError, match="closed"):
        cache.get_many([key()])


def test_the_cache_can_be_used_from_a_worker_thread(tmp_path: Path) -> None:
    import asyncio

    async def main() -> dict[bytes, CachedAnswer]:
        with ResponseCache(tmp_path / "cache.sqlite3") as cache:
            await asyncio.to_thread(cache.put_many, [(key(), answer())])
            return await asyncio.to_thread(cache.get_many, [key()])

    assert asyncio.run(main()) == {key(): answer()}


# ---------------------------------------------------------------------------
# In-run dedup.


def test_dedup_sends_the_first_parks_the_rest_and_fans_out() -> None:
    dedup: InRunDedup[str] = InRunDedup()
    assert dedup.admit(b"k", 0) is Admission.SEND
    assert dedup.admit(b"k", 1) is Admission.PARKED
    assert dedup.admit(b"other", 2) is Admission.SEND
    assert dedup.admit(b"k", 3) is Admission.PARKED
    assert dedup.in_flight == 2
    assert dedup.settle(b"k", "answer", ok=True) == [1, 3]
    # Rows arriving after the answer get it at once.
    assert dedup.admit(b"k", 4) == "answer"
    assert (dedup.sent, dedup.shared) == (2, 3)


def test_dedup_fans_a_failure_out_but_does_not_remember_it() -> None:
    dedup: InRunDedup[str] = InRunDedup()
    assert dedup.admit(b"k", 0) is Admission.SEND
    assert dedup.admit(b"k", 1) is Admission.PARKED
    assert dedup.settle(b"k", "error", ok=False) == [1]
    assert dedup.admit(b"k", 2) is Admission.SEND


def test_dedup_remembers_a_bounded_number_of_answers() -> None:
    dedup: InRunDedup[int] = InRunDedup(max_remembered=2)
    for i in range(3):
        assert dedup.admit(bytes([i]), i) is Admission.SEND
        dedup.settle(bytes([i]), i, ok=True)
    assert dedup.admit(bytes([0]), 9) is Admission.SEND  # the oldest was forgotten
    assert dedup.admit(bytes([2]), 9) == 2
