"""Never pay twice: a response cache shared across runs, and in-run dedup.

Keys
    A request's key is the SHA-256 of a canonical JSON document (sorted keys,
    no whitespace, ASCII) holding everything that changes the answer: the
    endpoint (scheme and host lower-cased, trailing slashes stripped), the
    model, the sampling parameters (temperature, top_p, max_tokens, seed and
    every extra parameter; ``None`` values are dropped because they are not
    sent, and integral floats are written as integers so ``0`` and ``0.0`` are
    one key), the ``response_format`` (a changed JSON Schema is a miss) and the
    rendered messages. :func:`key_function` precomputes everything but the
    messages, so a row costs one JSON dump of its messages and one hash.

Defaults (design note "Dedup and cache defaults")
    A request that sets no temperature, or temperature 0, is *deterministic*:
    a dataset row wants an answer, not a sample, so the cache and in-run dedup
    apply to it by default. With temperature > 0 both are OFF by default: each
    row asked for its own sample, and handing every identical row the same
    sample (or last week's sample) would silently change what the user asked
    for. Either can still be turned on explicitly for such runs (e.g. to make
    a sampled run reproducible and cheap to re-run), and ``--no-cache`` /
    ``--no-dedup`` turn them off for deterministic ones. :func:`resolve_enabled`
    applies this rule to a tri-state flag.

What is stored
    Only successful answers (status ``ok`` and, for structured output, an
    answer that parsed and validated). Errors are never cached: a re-run must
    try them again. Putting only successes is the caller's job; this module
    cannot tell a good answer from a bad one.

Storage
    SQLite from the standard library, one file (default
    :func:`default_cache_path`), in WAL mode so readers never block a writer,
    ``synchronous=NORMAL`` (a power cut may lose the last answers written, which
    costs a re-send, never a corrupt file), and a 30 s busy timeout. Writes take
    the write lock up front (``BEGIN IMMEDIATE``) and are short, so two runs
    sharing one cache wait for each other briefly instead of failing with
    "database is locked". The table is ``WITHOUT ROWID`` keyed by the 32-byte
    digest: a lookup is one B-tree descent, with no second index.

Threads
    One connection per :class:`ResponseCache`, opened with
    ``check_same_thread=False`` and guarded by a lock, so the async runner can
    call it from a worker thread (``asyncio.to_thread``) and the main thread can
    still close it. Calls are serialised; SQLite work here is short.

In-run dedup
    :class:`InRunDedup` tracks requests in flight by key: the first row with a
    key is sent, later identical rows park behind it and get its outcome when
    it settles. It never blocks, so parked rows do not hold a concurrency slot.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import ConfigError

__all__ = [
    "DEFAULT_ENDPOINT",
    "Admission",
    "CacheError",
    "CacheStats",
    "CachedAnswer",
    "InRunDedup",
    "ResponseCache",
    "cache_stats",
    "clear_cache",
    "default_cache_path",
    "is_deterministic",
    "key_function",
    "request_key",
    "resolve_enabled",
]

DEFAULT_ENDPOINT: Final = "https://api.openai.com/v1"
"""What the openai client talks to when no base URL is set: pass this, not an
empty string, so a run with and without ``--base-url <that URL>`` share keys."""

KEY_VERSION: Final = 1
"""Part of every key: bump when the canonical document changes, so old entries
miss instead of answering a request they no longer describe."""

SCHEMA_VERSION: Final = 1
"""The table layout (``PRAGMA user_version``)."""

# Marks a file as an enrich cache ("ENRC"), so pointing --cache-path at some
# other SQLite database fails clearly instead of writing into it.
APPLICATION_ID: Final = 0x454E5243

BUSY_TIMEOUT_S: Final = 30.0
"""How long a write waits for another run's transaction. Ours last milliseconds,
so hitting this means a stuck process, not contention."""

# Keys per SELECT ... IN (...): well under SQLite's bound-variable limit (999 on
# old builds), large enough that per-statement overhead is negligible.
LOOKUP_BATCH: Final = 500

_FIX: Final = "choose another file with --cache-path, or run with --no-cache"


class CacheError(ConfigError):
    """The cache file cannot be used. A ``ConfigError`` (exit 2) because the fix
    is a setting: another ``--cache-path``, or ``--no-cache``."""


# ---------------------------------------------------------------------------
# Keys and defaults.


def is_deterministic(params: Mapping[str, Any]) -> bool:
    """True when the request sets no temperature or temperature 0."""
    temperature = params.get("temperature")
    return temperature is None or temperature == 0


def resolve_enabled(flag: bool | None, params: Mapping[str, Any]) -> bool:
    """Whether cache or dedup applies: an explicit flag wins; unset (``None``)
    means on for deterministic requests and off for sampled ones."""
    if flag is not None:
        return flag
    return is_deterministic(params)


def _normalise_endpoint(endpoint: str) -> str:
    # Scheme and host are case-insensitive; a trailing slash is not a new server.
    text = endpoint.strip()
    parts = urlsplit(text)
    if not parts.scheme or not parts.netloc:
        return text.rstrip("/")
    return urlunsplit(
        (parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), parts.query, "")
    )


def _canonical(value: Any) -> Any:
    """A JSON-ready copy in which equal settings are equal documents."""
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        # temperature=0 and temperature=0.0 ask for the same answer.
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    raise TypeError(f"cannot use a {type(value).__name__} in a request key")


# One encoder for every key: json.dumps with options builds a new one per call,
# which costs more than encoding a short prompt.
_ENCODER: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
_dumps: Final = _ENCODER.encode


def key_function(
    *,
    endpoint: str,
    model: str,
    params: Mapping[str, Any],
    response_format: Mapping[str, Any] | None = None,
) -> Callable[[Sequence[Mapping[str, str]]], bytes]:
    """``messages -> key`` for one run's fixed settings.

    The canonical document's keys sort as endpoint, messages, model, params,
    response_format, v; the hash state after ``{"endpoint":...,"messages":`` is
    computed once and copied per row, so each row hashes only its messages and
    a constant tail, and the digest equals :func:`request_key`'s.
    """
    sent = {k: v for k, v in params.items() if v is not None}
    head = '{"endpoint":' + _dumps(_normalise_endpoint(endpoint)) + ',"messages":'
    tail = (
        ',"model":'
        + _dumps(model)
        + ',"params":'
        + _dumps(_canonical(sent))
        + ',"response_format":'
        + _dumps(None if response_format is None else _canonical(response_format))
        + ',"v":'
        + _dumps(KEY_VERSION)
        + "}"
    ).encode()
    prefix = hashlib.sha256(head.encode())

    def key(messages: Sequence[Mapping[str, str]]) -> bytes:
        try:
            # Lists of dicts (what prompt.messages builds) encode as they are...
            text = _dumps(messages)
        except TypeError:
            # ...other mappings and sequences are copied into ones JSON knows.
            text = _dumps([dict(message) for message in messages])
        digest = prefix.copy()
        digest.update(text.encode())
        digest.update(tail)
        return digest.digest()

    return key


def request_key(
    *,
    endpoint: str,
    model: str,
    params: Mapping[str, Any],
    messages: Sequence[Mapping[str, str]],
    response_format: Mapping[str, Any] | None = None,
) -> bytes:
    """The 32-byte key of one request (see the module docstring). For many rows
    with the same settings, :func:`key_function` is faster."""
    return key_function(
        endpoint=endpoint, model=model, params=params, response_format=response_format
    )(messages)


def default_cache_path() -> Path:
    """``$ENRICH_CACHE_DIR/cache.sqlite3``, else ``$XDG_CACHE_HOME/enrich/cache.sqlite3``,
    else ``~/.cache/enrich/cache.sqlite3``: per user, outside any project, so
    every job of that user shares it."""
    explicit = os.environ.get("ENRICH_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser() / "cache.sqlite3"
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "enrich" / "cache.sqlite3"


# ---------------------------------------------------------------------------
# The persistent cache.


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A successful answer as the API gave it (its usage is what it cost then)."""

    response: str | None
    finish_reason: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True, slots=True)
class CacheStats:
    path: Path
    entries: int
    size_bytes: int
    """The database file plus its WAL and shared-memory files: what it takes on disk."""
    oldest: float | None
    """``created_at`` (Unix seconds) of the oldest entry; None when empty."""
    newest: float | None


_CREATE: Final = """
CREATE TABLE IF NOT EXISTS answers (
    key BLOB PRIMARY KEY,
    response TEXT,
    finish_reason TEXT,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    created_at REAL NOT NULL
) WITHOUT ROWID
"""


def _size_on_disk(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += path.with_name(path.name + suffix).stat().st_size
        except OSError:
            continue
    return total


class ResponseCache:
    """Successful answers by request key, in one SQLite file shared by runs.

    Use as a context manager, or call :meth:`close`. Every method may be called
    from any thread (see the module docstring). Errors are :class:`CacheError`
    with one line naming the file and the fix.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.readonly = readonly
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if readonly and not self.path.is_file():
            raise CacheError(f"no response cache at {self.path}; check --cache-path")
        try:
            if not readonly:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = self._connect()
            self._initialise(self._conn)
        except CacheError:
            self.close()
            raise
        except sqlite3.DatabaseError as exc:
            self.close()
            if "not a database" in str(exc):
                raise CacheError(
                    f"response cache {self.path} is not an SQLite file; {_FIX}"
                ) from None
            raise self._error("cannot be opened", exc) from None
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise self._error("cannot be opened", exc) from None

    # -- setup ---------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            target, uri = f"{self.path.resolve().as_uri()}?mode=ro", True
        else:
            target, uri = str(self.path), False
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a writer
        # takes the lock before reading and never has to upgrade (an upgrade that
        # collides with another writer fails at once, busy timeout or not).
        return sqlite3.connect(
            target,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
            uri=uri,
        )

    def _initialise(self, conn: sqlite3.Connection) -> None:
        # The first statements that read the file: one that is not SQLite fails here.
        if not self._is_ours(conn):
            if self.readonly:
                raise CacheError(f"{self.path} is not an enrich response cache; {_FIX}")
            # Another run may be creating the same new file right now: decide
            # under the write lock, and create the table and mark the file in one
            # transaction, so nobody ever sees a half-initialised cache.
            with self._write(conn):
                if not self._is_ours(conn):
                    conn.execute(_CREATE)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if not self.readonly:
            # Only once the file is known to be ours: switching someone else's
            # database to WAL would change it behind their back.
            self._set_pragmas(conn)

    def _is_ours(self, conn: sqlite3.Connection) -> bool:
        """True for an enrich cache, False for an empty database; raises for
        anything else (a database of another program, or a newer schema)."""
        # One statement, so one snapshot: read apart, the three could straddle
        # the commit of another run creating this same file (id 0, yet a table).
        application_id, version, tables = conn.execute(
            "SELECT (SELECT application_id FROM pragma_application_id()),"
            " (SELECT user_version FROM pragma_user_version()),"
            " (SELECT count(*) FROM sqlite_master)"
        ).fetchone()
        if application_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise CacheError(
                    f"response cache {self.path} was written by a newer enrich "
                    f"(schema {version}); upgrade enrich, or {_FIX}"
                )
            return True
        if application_id != 0 or tables:
            raise CacheError(
                f"{self.path} is an SQLite database but not an enrich response cache; {_FIX}"
            )
        return False

    @staticmethod
    def _set_pragmas(conn: sqlite3.Connection) -> None:
        # WAL is persistent in the file; asking again is a no-op once set.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        # 32 MiB of page cache instead of 2: lookups of a large run's chunks hit
        # random leaves all over the file.
        conn.execute("PRAGMA cache_size = -32768")

    @staticmethod
    @contextmanager
    def _write(conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            # Also when COMMIT itself failed: a transaction left open would make
            # every later write fail with "cannot start a transaction within a transaction".
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _error(self, what: str, exc: BaseException) -> CacheError:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return CacheError(f"response cache {self.path} {what} ({detail}); {_FIX}")

    @contextmanager
    def _connection(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise CacheError(f"response cache {self.path} is closed; open it again")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise self._error(what, exc) from None

    # -- use -----------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, CachedAnswer]:
        """The cached answers among ``keys`` (misses are absent from the result)."""
        # Sorted, so each batch probes a narrow range of the B-tree: neighbouring
        # leaves are then in the page cache (measured ~25% faster than input order).
        unique = sorted(set(keys))
        found: dict[bytes, CachedAnswer] = {}
        with self._connection("cannot be read") as conn:
            for start in range(0, len(unique), LOOKUP_BATCH):
                batch = unique[start : start + LOOKUP_BATCH]
                marks = ",".join("?" * len(batch))
                rows = conn.execute(
                    "SELECT key, response, finish_reason, model, prompt_tokens, "
                    f"completion_tokens FROM answers WHERE key IN ({marks})",
                    batch,
                ).fetchall()
                found.update({r[0]: CachedAnswer(r[1], r[2], r[3], r[4], r[5]) for r in rows})
        return found

    def put_many(self, items: Sequence[tuple[bytes, CachedAnswer]]) -> None:
        """Store answers in one transaction (a later put of a key replaces it).
        Only successful answers belong here: the caller must not put failures."""
        if not items:
            return
        if self.readonly:
            raise CacheError(f"response cache {self.path} was opened read-only")
        now = time.time()
        rows = [
            (
                key,
                a.response,
                a.finish_reason,
                a.model,
                a.prompt_tokens,
                a.completion_tokens,
                now,
            )
            for key, a in items
        ]
        with self._connection("cannot be written") as conn, self._write(conn):
            conn.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def stats(self) -> CacheStats:
        with self._connection("cannot be read") as conn:
            entries, oldest, newest = conn.execute(
                "SELECT count(*), min(created_at), max(created_at) FROM answers"
            ).fetchone()
        return CacheStats(self.path, entries, _size_on_disk(self.path), oldest, newest)

    def clear(self) -> int:
        """Delete every entry and give the space back; returns how many there were."""
        if self.readonly:
            raise CacheError(f"response cache {self.path} was opened read-only")
        with self._connection("cannot be cleared") as conn:
            with self._write(conn):
                count: int = conn.execute("SELECT count(*) FROM answers").fetchone()[0]
                conn.execute("DELETE FROM answers")
            conn.execute("VACUUM")
            # VACUUM goes through the WAL; fold it back so the files really shrink.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return count

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def cache_stats(path: Path) -> CacheStats:
    """Stats for ``enrich cache stats``: a cache never written to is empty, and
    looking does not create it."""
    if not Path(path).expanduser().exists():
        return CacheStats(Path(path).expanduser(), 0, 0, None, None)
    with ResponseCache(path, readonly=True) as cache:
        return cache.stats()


def clear_cache(path: Path) -> int:
    """``enrich cache clear``: entries deleted (0, and nothing created, when absent)."""
    if not Path(path).expanduser().exists():
        return 0
    with ResponseCache(path) as cache:
        return cache.clear()


# ---------------------------------------------------------------------------
# In-run dedup.

T = TypeVar("T")


class Admission(Enum):
    """What :meth:`InRunDedup.admit` tells the feeder to do with a row."""

    SEND = "send"
    """The first row with this key: send it."""
    PARKED = "parked"
    """An identical request is in flight: its outcome will come from ``settle``."""


# Remembered outcomes for rows whose leader already settled. Bounded, because
# memory must not grow with the input; with the persistent cache on, an answer
# forgotten here is still found there.
DEFAULT_REMEMBERED: Final = 100_000


class InRunDedup(Generic[T]):
    """Send each distinct request once per run; fan its outcome out to every
    row that asked the same.

    Non-blocking, for a feeder that yields requests and a consumer that reads
    outcomes::

        admitted = dedup.admit(key, row_id)
        if admitted is Admission.SEND:      # first of its key: send it
            ...
        elif admitted is Admission.PARKED:  # an identical request is in flight
            ...
        else:                               # an identical request already succeeded
            use(admitted)

        # when the sent request's outcome arrives:
        for follower in dedup.settle(key, outcome, ok=outcome.status == "ok"):
            use(outcome for follower)

    A failed outcome is fanned out to the rows parked at that moment (they asked
    the identical question; re-sending would most likely fail alike and cost
    money) but not remembered: a later identical row is sent again, just as the
    cache only keeps successes. A leader that never settles (the run stopped)
    leaves its followers undone, and a resume sends them.

    Not thread-safe: call it from the event loop that feeds and reads the call
    stage (both sides run there, so no lock is needed).
    """

    def __init__(self, max_remembered: int = DEFAULT_REMEMBERED) -> None:
        self._in_flight: dict[bytes, list[int]] = {}
        self._settled: OrderedDict[bytes, T] = OrderedDict()
        self._max_remembered = max_remembered
        self.sent = 0
        """Distinct requests admitted as SEND."""
        self.shared = 0
        """Rows that got another row's outcome (parked or remembered)."""

    def admit(self, key: bytes, row_id: int) -> Admission | T:
        """``Admission.SEND``, ``Admission.PARKED``, or the remembered outcome of an
        identical request that succeeded."""
        followers = self._in_flight.get(key)
        if followers is not None:
            followers.append(row_id)
            self.shared += 1
            return Admission.PARKED
        if key in self._settled:
            self._settled.move_to_end(key)
            self.shared += 1
            return self._settled[key]
        self._in_flight[key] = []
        self.sent += 1
        return Admission.SEND

    def settle(self, key: bytes, outcome: T, *, ok: bool) -> list[int]:
        """The sent request's outcome is in: the parked rows that share it."""
        followers = self._in_flight.pop(key, [])
        if ok and self._max_remembered > 0:
            self._settled[key] = outcome
            self._settled.move_to_end(key)
            while len(self._settled) > self._max_remembered:
                self._settled.popitem(last=False)
        return followers

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)
