"""The response cache and in-run dedup: keys, defaults, the SQLite store
(including two real processes writing one file at once)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from click.testing import CliRunner, Result

import pipeline.cache
from pipeline.cache import (
    Admission,
    BestEffortCache,
    CacheDamaged,
    CachedAnswer,
    CacheError,
    Cleared,
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
from pipeline.cli import cli
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


@pytest.mark.slow
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
    assert clear_cache(path) == Cleared(0, repaired=False)
    assert not path.parent.exists()


def test_module_level_stats_and_clear_of_an_existing_cache(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    with ResponseCache(path) as cache:
        cache.put_many([(key(), answer())])
    assert cache_stats(path).entries == 1
    assert clear_cache(path) == Cleared(1, repaired=False)
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
# Damage: bypassed with one warning by a run, repaired by `enrich cache clear`.

ENTRIES = 3000
KEYS = [i.to_bytes(32, "big") for i in range(ENTRIES)]


def fill(path: Path) -> None:
    """A real cache of some hundred pages, closed (so all of it is in the main
    file, none in the WAL)."""
    with ResponseCache(path) as cache:
        cache.put_many([(k, answer(f"answer {i} " + "x" * 100)) for i, k in enumerate(KEYS)])
    assert not path.with_name(path.name + "-wal").exists()


def page_size(path: Path) -> int:
    size = int.from_bytes(path.read_bytes()[16:18], "big")
    return 65536 if size == 1 else size


def write_garbage(path: Path) -> None:
    path.write_bytes(b"definitely not SQLite " * 200)


def cut_in_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def cut_one_byte_past_a_page(path: Path) -> None:
    pages = path.stat().st_size // page_size(path)
    os.truncate(path, pages // 2 * page_size(path) + 1)


def zero_the_header(path: Path) -> None:
    with path.open("r+b") as file:
        file.write(bytes(100))


def overwrite_middle_pages(path: Path) -> None:
    """Garbage over the middle half of the file's pages (not page 1, so the file
    still opens: the damage shows when a lookup or a write reaches it)."""
    size, page = path.stat().st_size, page_size(path)
    start = size // 4 // page * page
    with path.open("r+b") as file:
        file.seek(start)
        file.write(random.Random(0).randbytes(size // 2 // page * page))


AT_REST: dict[str, Callable[[Path], None]] = {
    "garbage": write_garbage,
    "cut-in-half": cut_in_half,
    "cut-one-byte-past-a-page": cut_one_byte_past_a_page,
    "zeroed-header": zero_the_header,
}
EVERY_KIND = {**AT_REST, "middle-pages-overwritten": overwrite_middle_pages}


def damaged_cache(path: Path, kind: str) -> Path:
    """A cache with answers in it, then damaged."""
    if kind != "garbage":
        fill(path)
    EVERY_KIND[kind](path)
    return path


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def assert_works_as_a_fresh_cache(path: Path) -> None:
    with ResponseCache(path) as cache:
        assert cache.get_many(KEYS[:10]) == {}
        cache.put_many([(key(), answer("fresh"))])
    with ResponseCache(path) as cache:
        assert cache.get_many([key()]) == {key(): answer("fresh")}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def assert_one_damage_warning(warnings: list[str], path: Path) -> None:
    assert len(warnings) == 1, warnings
    assert "\n" not in warnings[0]
    assert f"response cache {path} is damaged (" in warnings[0]
    assert "running without it" in warnings[0]
    assert "`enrich cache clear --cache-path" in warnings[0]
    assert warnings[0].endswith("repairs it")


@pytest.mark.parametrize("kind", AT_REST)
def test_a_damaged_file_is_cache_damaged_naming_the_file_and_the_fix(
    tmp_path: Path, kind: str
) -> None:
    path = damaged_cache(tmp_path / "cache.sqlite3", kind)
    for readonly in (False, True):
        with pytest.raises(CacheDamaged) as caught:
            ResponseCache(path, readonly=readonly)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"response cache {path} is damaged (")
        assert f"`enrich cache clear --cache-path {path}`" in message
        assert "--no-cache" in message
        assert isinstance(caught.value, ConfigError)  # exit 2 where nothing bypasses it


@pytest.mark.parametrize("kind", AT_REST)
def test_opening_a_damaged_cache_warns_once_answers_misses_and_drops_puts(
    tmp_path: Path, kind: str
) -> None:
    path = damaged_cache(tmp_path / "cache.sqlite3", kind)
    before = path.read_bytes()
    warnings: list[str] = []
    with BestEffortCache.open(path, warnings.append) as cache:
        assert cache.bypassed
        assert cache.get_many(KEYS) == {}
        cache.put_many([(key(), answer())])
        assert cache.get_many([key()]) == {}
    assert_one_damage_warning(warnings, path)
    assert path.read_bytes() == before  # running without it, not writing into it


@pytest.mark.parametrize("first", ["get", "put"])
def test_damage_while_open_warns_once_then_misses_and_drops_puts_without_raising(
    tmp_path: Path, first: str
) -> None:
    path = tmp_path / "cache.sqlite3"
    fill(path)
    warnings: list[str] = []
    with BestEffortCache.open(path, warnings.append) as cache:
        assert cache.get_many(KEYS[:1]) == {KEYS[0]: answer("answer 0 " + "x" * 100)}
        overwrite_middle_pages(path)
        if first == "get":
            assert cache.get_many(KEYS) == {}
        else:
            cache.put_many([(k, answer()) for k in KEYS])
        assert warnings, "the damage was not met"
        assert cache.bypassed
        cache.put_many([(k, answer()) for k in KEYS])
        assert cache.get_many(KEYS) == {}
        cache.put_many([(key(), answer())])
    assert_one_damage_warning(warnings, path)


@pytest.mark.parametrize("call", ["get", "put"])
def test_a_response_cache_raises_cache_damaged_when_a_read_or_write_meets_damage(
    tmp_path: Path, call: str
) -> None:
    path = tmp_path / "cache.sqlite3"
    fill(path)
    with ResponseCache(path) as cache:
        overwrite_middle_pages(path)
        with pytest.raises(CacheDamaged, match=r"is damaged \(database disk image is malformed\)"):
            if call == "get":
                cache.get_many(KEYS)
            else:
                cache.put_many([(k, answer()) for k in KEYS])


def test_many_threads_meeting_damage_get_one_warning_and_no_error(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    fill(path)
    warnings: list[str] = []
    errors: list[BaseException] = []
    with BestEffortCache.open(path, warnings.append) as cache:
        overwrite_middle_pages(path)
        start = threading.Barrier(8)

        def work(n: int) -> None:
            try:
                start.wait()
                for _ in range(5):
                    if n % 2:
                        cache.get_many(KEYS)
                    else:
                        cache.put_many([(k, answer()) for k in KEYS[n::8]])
            except BaseException as exc:  # collected: a thread's error would vanish
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert_one_damage_warning(warnings, path)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("response", "CAST(x'c3ff' AS TEXT)"),
        ("model", "x'00ff'"),
        ("prompt_tokens", "'many'"),
        ("completion_tokens", "3.5"),
    ],
    ids=["text-that-is-not-utf8", "a-blob", "text-for-a-count", "a-float-for-a-count"],
)
def test_an_entry_with_values_sqlite_cannot_vouch_for_is_damage(
    tmp_path: Path, column: str, value: str
) -> None:
    path = tmp_path / "cache.sqlite3"
    fill(path)
    with sqlite3.connect(path) as conn:  # what a flipped byte in a record can leave
        conn.execute(f"UPDATE answers SET {column} = {value} WHERE key = ?", (KEYS[5],))
    with ResponseCache(path) as cache, pytest.raises(CacheDamaged) as caught:
        cache.get_many(KEYS[:10])
    if column == "response":
        # Not Python's message, which quotes the damaged bytes.
        assert "(an entry's text is not UTF-8)" in str(caught.value)
    warnings: list[str] = []
    with BestEffortCache.open(path, warnings.append) as cache:
        assert cache.get_many(KEYS[:10]) == {}
    assert_one_damage_warning(warnings, path)


def test_a_file_marked_as_ours_without_its_table_is_damaged_and_clear_repairs_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cache.sqlite3"
    fill(path)
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE answers")
    with pytest.raises(CacheDamaged, match="answers table is missing"):
        ResponseCache(path)
    assert clear_cache(path) == Cleared(0, repaired=True)
    assert_works_as_a_fresh_cache(path)


def test_the_fix_names_no_cache_path_for_the_default_cache() -> None:
    path = default_cache_path()  # in this test's own directory (conftest)
    write_garbage(path)
    warnings: list[str] = []
    BestEffortCache.open(path, warnings.append).close()
    assert warnings[0].endswith("; `enrich cache clear` repairs it")


@pytest.mark.parametrize("kind", EVERY_KIND)
def test_clear_cache_repairs_a_damaged_cache(tmp_path: Path, kind: str) -> None:
    path = damaged_cache(tmp_path / "cache.sqlite3", kind)
    journal = path.with_name(path.name + "-journal")
    journal.write_bytes(b"a stale journal would be played back into the new file")
    assert clear_cache(path) == Cleared(0, repaired=True)
    assert not journal.exists()
    assert_works_as_a_fresh_cache(path)


def test_clear_cache_repairs_a_cache_damaged_while_a_run_had_it_open(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite3"
    fill(path)
    warnings: list[str] = []
    with BestEffortCache.open(path, warnings.append) as cache:
        overwrite_middle_pages(path)
        cache.put_many([(k, answer()) for k in KEYS])
        assert cache.bypassed
        assert clear_cache(path) == Cleared(0, repaired=True)
    assert_works_as_a_fresh_cache(path)
    # The next run uses it again.
    with BestEffortCache.open(path, warnings.append) as cache:
        cache.put_many([(KEYS[0], answer())])
        assert cache.get_many([KEYS[0]]) == {KEYS[0]: answer()}
    assert len(warnings) == 1


@pytest.mark.parametrize("kind", EVERY_KIND)
def test_cli_clear_repairs_a_damaged_cache_and_says_so(tmp_path: Path, kind: str) -> None:
    path = damaged_cache(tmp_path / "cache.sqlite3", kind)
    result = invoke("cache", "clear", "--cache-path", path)
    assert result.exit_code == 0, result.output
    assert result.output == f"{path}: the cache was damaged; removed and created anew\n"
    assert_works_as_a_fresh_cache(path)


@pytest.mark.parametrize("kind", EVERY_KIND)
def test_cli_stats_of_a_damaged_cache_says_damaged_with_exit_2(tmp_path: Path, kind: str) -> None:
    path = damaged_cache(tmp_path / "cache.sqlite3", kind)
    result = invoke("cache", "stats", "--cache-path", path)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"enrich: error: response cache {path} is damaged (")
    assert "enrich cache clear" in result.output
    assert "Traceback" not in result.output


def other_programs_database(path: Path, *, application_id: int) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA application_id = {application_id}")
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.executemany("INSERT INTO notes VALUES (?)", [("n" * 200,)] * 500)
    conn.close()
    return path


@pytest.mark.parametrize("application_id", [0, 0x12345678], ids=["unmarked", "marked"])
@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "damaged"])
def test_clear_refuses_another_programs_database_and_leaves_it_byte_for_byte(
    tmp_path: Path, application_id: int, damaged: bool
) -> None:
    path = other_programs_database(tmp_path / "theirs.db", application_id=application_id)
    if damaged:
        cut_in_half(path)
    before = path.read_bytes()
    result = invoke("cache", "clear", "--cache-path", path)
    assert result.exit_code == 2, result.output
    assert "is an SQLite database but not an enrich response cache" in result.output
    with pytest.raises(CacheError) as caught:
        clear_cache(path)
    assert not isinstance(caught.value, CacheDamaged)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.db"]


@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "damaged"])
def test_a_run_refuses_another_programs_database_instead_of_bypassing_it(
    tmp_path: Path, damaged: bool
) -> None:
    path = other_programs_database(tmp_path / "theirs.db", application_id=0x12345678)
    if damaged:
        cut_in_half(path)
    warnings: list[str] = []
    with pytest.raises(CacheError, match="not an enrich response cache") as caught:
        BestEffortCache.open(path, warnings.append)
    assert not isinstance(caught.value, CacheDamaged)
    assert warnings == []


def test_other_cache_errors_still_raise_from_the_best_effort_cache(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    newer = tmp_path / "newer.sqlite3"
    fill(newer)
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    warnings: list[str] = []
    with pytest.raises(CacheError, match="--cache-path"):
        BestEffortCache.open(blocker / "cache.sqlite3", warnings.append)
    with pytest.raises(CacheError, match="newer enrich"):
        BestEffortCache.open(newer, warnings.append)
    assert warnings == []


def test_an_intact_best_effort_cache_is_a_response_cache(tmp_path: Path) -> None:
    warnings: list[str] = []
    with BestEffortCache.open(tmp_path / "cache.sqlite3", warnings.append) as cache:
        cache.put_many([(key(), answer())])
        assert cache.get_many([key(), key(model="other")]) == {key(): answer()}
        assert not cache.bypassed
    assert warnings == []
    with pytest.raises(CacheError, match="closed"):
        cache.get_many([key()])


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


def test_dedup_remembers_answers_within_a_byte_bound_whatever_their_size() -> None:
    dedup: InRunDedup[str] = InRunDedup(max_remembered=100, max_bytes=250, weigh=len)
    for i in range(5):
        assert dedup.admit(bytes([i]), i) is Admission.SEND
        dedup.settle(bytes([i]), "x" * 100, ok=True)
    # Only the two newest 100-byte answers fit in 250 bytes.
    assert [dedup.admit(bytes([i]), 9) for i in (3, 4)] == ["x" * 100] * 2
    assert dedup.admit(bytes([2]), 9) is Admission.SEND


def test_cache_clear_never_removes_a_data_file_given_as_the_cache_path(tmp_path: Path) -> None:
    data = tmp_path / "questions.csv"
    data.write_text("question\nwhat is a cache?\n")
    with pytest.raises(CacheError, match="not removing it"):
        clear_cache(data)
    assert data.read_text() == "question\nwhat is a cache?\n"
