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

Damage
    A file that is not (or no longer) a readable SQLite database, whether
    garbage, truncated, zeroed or corrupted while in use, is
    :class:`CacheDamaged`, at open or on any later read or write. It is ours
    to repair: :func:`clear_cache` removes it and creates an empty cache.
    :class:`BestEffortCache` is what a run uses: it turns damage into one
    warning and carries on without the cache, because a cache only saves
    money and must never cost a run. Every other :class:`CacheError` (another
    program's database, a newer schema, permission denied) still stops the
    run before anything is sent: their fix is a flag, and the file is not
    ours to remove.

In-run dedup
    :class:`InRunDedup` tracks requests in flight by key: the first row with a
    key is sent, later identical rows park behind it and get its outcome when
    it settles. It never blocks, so parked rows do not hold a concurrency slot.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
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
    "Admission",
    "BestEffortCache",
    "CacheDamaged",
    "CacheError",
    "CacheStats",
    "CachedAnswer",
    "Cleared",
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


class CacheDamaged(CacheError):
    """The file is not a readable SQLite database (any more): garbage, truncated,
    a zeroed header, pages corrupted while in use, an unreadable WAL. Unlike
    other :class:`CacheError` s the file is ours, so ``enrich cache clear``
    repairs it, and a run bypasses it (see :class:`BestEffortCache`)."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(
            f"response cache {path} is damaged ({detail}); "
            f"run {_clear_command(path)} to repair it, or run with --no-cache"
        )
        self.path = path
        self.detail = detail


def _clear_command(path: Path) -> str:
    """The command that repairs ``path``: the flag is needed unless it is the
    default file, or the user would clear a different cache."""
    if path == default_cache_path():
        return "`enrich cache clear`"
    return f"`enrich cache clear --cache-path {shlex.quote(str(path))}`"


def _damage(exc: BaseException) -> str | None:
    """What is wrong with the file when an error means its bytes are bad; None
    for other errors (a lock, a permission, a full disk: problems of the system,
    not of the file)."""
    if not isinstance(exc, sqlite3.Error):
        return None
    # Names rather than sqlite3.SQLITE_* constants: which constants exist depends
    # on the SQLite Python was built against.
    name: str | None = getattr(exc, "sqlite_errorname", None)
    if name is not None:
        return str(exc) if name.startswith("SQLITE_CORRUPT") or name in _DAMAGE_ERRORS else None
    # Raised by Python, not SQLite, for a TEXT value that is not UTF-8: we only
    # ever store str, so those bytes were damaged on disk. Not its message: it
    # quotes the damaged text, which may be long and may not even print.
    if str(exc).startswith("Could not decode to UTF-8"):
        return "an entry's text is not UTF-8"
    return None


_DAMAGE_ERRORS: Final = frozenset(
    {
        "SQLITE_NOTADB",  # garbage, or a header that is no longer SQLite's
        "SQLITE_IOERR_READ",  # the OS cannot read the bytes (a bad block)
        "SQLITE_IOERR_SHORT_READ",
        "SQLITE_IOERR_CORRUPTFS",  # the file system says the file is corrupt
        "SQLITE_IOERR_DATA",  # a checksum VFS found a bad page
    }
)

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"


def _foreign_sqlite(path: Path) -> bool:
    """True when the file's header is an intact SQLite header not marked as an
    enrich cache: another program's database, damaged or not, is never ours to
    bypass as "damaged" or to remove. Reads the header directly, because
    SQLite refuses to read anything of a damaged file."""
    try:
        with path.open("rb") as file:
            header = file.read(72)
    except OSError:
        return False
    # The application id is the big-endian int at offset 68. A shorter file, or
    # one without the magic, is no working database of anyone's.
    return (
        len(header) == 72
        and header.startswith(_SQLITE_MAGIC)
        and int.from_bytes(header[68:72], "big") != APPLICATION_ID
    )


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


# The last column says whether the entry's values have the types we store.
# SQLite checks the structure of pages, not values: a damaged record can come
# back with another type, and would then fail far from here (writing the output)
# instead of being bypassed as damage. Checked in SQL, because per-row type
# checks in Python cost ~10% of a large lookup.
_SELECT: Final = """
SELECT key, response, finish_reason, model, prompt_tokens, completion_tokens,
    typeof(response) IN ('text', 'null')
    AND typeof(finish_reason) IN ('text', 'null')
    AND typeof(model) IN ('text', 'null')
    AND typeof(prompt_tokens) IN ('integer', 'null')
    AND typeof(completion_tokens) IN ('integer', 'null')
FROM answers"""

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
    with one line naming the file and the fix; :class:`CacheDamaged` when the
    file is damaged, at open or in any later call.
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
        except (OSError, sqlite3.Error) as exc:
            self.close()
            error = self._error("cannot be opened", exc)
            if isinstance(error, CacheDamaged) and _foreign_sqlite(self.path):
                raise self._not_ours() from None
            raise error from None

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
        application_id, version, tables, answers = conn.execute(
            "SELECT (SELECT application_id FROM pragma_application_id()),"
            " (SELECT user_version FROM pragma_user_version()),"
            " (SELECT count(*) FROM sqlite_master),"
            " (SELECT count(*) FROM sqlite_master WHERE name = 'answers')"
        ).fetchone()
        if application_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise CacheError(
                    f"response cache {self.path} was written by a newer enrich "
                    f"(schema {version}); upgrade enrich, or {_FIX}"
                )
            if not answers:
                # Marked in the same transaction that created the table, so a
                # marked file without it lost its schema page.
                raise CacheDamaged(self.path, "its answers table is missing")
            return True
        if application_id != 0 or tables:
            raise self._not_ours()
        return False

    def _not_ours(self) -> CacheError:
        return CacheError(
            f"{self.path} is an SQLite database but not an enrich response cache; {_FIX}"
        )

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
        damage = _damage(exc)
        if damage is not None:
            return CacheDamaged(self.path, damage)
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
                rows = conn.execute(f"{_SELECT} WHERE key IN ({marks})", batch).fetchall()
                if not all(r[6] for r in rows):
                    raise CacheDamaged(self.path, "an entry has values of the wrong type")
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


class BestEffortCache:
    """A run's response cache: :class:`ResponseCache` that a damaged file cannot stop.

    Open with :meth:`open`. ``get_many`` and ``put_many`` behave like
    :class:`ResponseCache`'s until :class:`CacheDamaged` is raised, at open or by
    any later call; then ``on_warning`` is called once with a one-line message,
    the connection is closed, and from then on every lookup misses and every
    put is dropped. Damage costs money (answers are asked for again), never the
    run. Once open, any other :class:`CacheError` of a lookup or a put (a full
    disk, a lock held past the busy timeout) is bypassed the same way; at open
    it still raises (its fix is a setting, and nothing has been sent yet).

    Thread-safe like :class:`ResponseCache`: ``on_warning`` is called from
    whichever thread met the damage (the flush thread, for a put), outside the
    lock, and must not raise.
    """

    def __init__(
        self,
        path: Path,
        cache: ResponseCache | None,
        on_warning: Callable[[str], None],
    ) -> None:
        """Prefer :meth:`open`. ``cache=None`` is a cache already bypassed."""
        self.path = Path(path).expanduser()
        self._cache = cache
        self._on_warning = on_warning
        self._lock = threading.Lock()
        self._damaged = cache is None
        self._closed = False

    @classmethod
    def open(cls, path: Path, on_warning: Callable[[str], None]) -> BestEffortCache:
        """Open (creating it if needed) the cache at ``path``; a damaged file gives
        a bypassed cache and one call of ``on_warning``. Raises :class:`CacheError`
        for a file that is not ours or cannot be used for other reasons."""
        try:
            cache = ResponseCache(path)
        except CacheDamaged as exc:
            on_warning(cls._warning(exc))
            return cls(path, None, on_warning)
        return cls(path, cache, on_warning)

    @property
    def bypassed(self) -> bool:
        """True once damage was met: lookups miss and puts are dropped."""
        return self._damaged

    @staticmethod
    def _warning(exc: CacheError) -> str:
        if not isinstance(exc, CacheDamaged):
            # Mid-run, any cache failure (a full disk, a lock held too long)
            # costs the cache, not the run: the checkpoint has every answer.
            return f"{exc.message}; running without the response cache from here on"
        return " ".join(
            f"response cache {exc.path} is damaged ({exc.detail}); running without it; "
            f"{_clear_command(exc.path)} repairs it".split()
        )

    def _bypass(self) -> None:
        """Stop using the damaged cache; the caller holds the lock."""
        self._damaged = True
        cache, self._cache = self._cache, None
        if cache is not None:
            cache.close()

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, CachedAnswer]:
        """Like :meth:`ResponseCache.get_many`; all misses once bypassed."""
        with self._lock:
            cache = self._usable()
            if cache is None:
                return {}
            try:
                return cache.get_many(keys)
            except CacheError as exc:
                self._bypass()
                warning = self._warning(exc)
        # Outside the lock: the callback may log, or even look at this cache.
        self._on_warning(warning)
        return {}

    def put_many(self, items: Sequence[tuple[bytes, CachedAnswer]]) -> None:
        """Like :meth:`ResponseCache.put_many`; dropped once bypassed."""
        with self._lock:
            cache = self._usable()
            if cache is None:
                return
            try:
                cache.put_many(items)
                return
            except CacheError as exc:
                self._bypass()
                warning = self._warning(exc)
        self._on_warning(warning)

    def _usable(self) -> ResponseCache | None:
        if self._closed:
            # As ResponseCache: a call after close is a bug of the caller, and
            # answering misses would hide it.
            raise CacheError(f"response cache {self.path} is closed; open it again")
        return self._cache

    def close(self) -> None:
        with self._lock:
            self._closed = True
            cache, self._cache = self._cache, None
        if cache is not None:
            cache.close()

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


@dataclass(frozen=True, slots=True)
class Cleared:
    """What :func:`clear_cache` did."""

    entries: int
    """Answers deleted (0 when the file was damaged: they could not be counted)."""
    repaired: bool
    """The file was damaged, so it was removed and an empty cache created."""


_CACHE_SUFFIXES: Final = (".sqlite3", ".sqlite", ".db")


def _may_be_ours(path: Path) -> bool:
    """A damaged file that enrich may remove: one that starts as SQLite files
    do (or was zeroed or cut before its header), or is named like a cache."""
    try:
        with path.open("rb") as handle:
            header = handle.read(16)
    except OSError:
        return False
    sqlite_like = header.startswith(b"SQLite format 3") or not header.strip(b"\0")
    return sqlite_like or path.suffix.lower() in _CACHE_SUFFIXES


def clear_cache(path: Path) -> Cleared:
    """``enrich cache clear``: delete every entry (nothing is created when the
    file is absent). A damaged file is removed with its WAL, shared-memory and
    journal files and created anew; another program's database is refused
    (:class:`CacheError`) and left untouched."""
    path = Path(path).expanduser()
    if not path.exists():
        return Cleared(0, repaired=False)
    try:
        with ResponseCache(path) as cache:
            return Cleared(cache.clear(), repaired=False)
    except CacheDamaged:
        pass
    # Checked again from the header, whatever said "damaged": removing someone
    # else's database is the one thing this command must never do.
    if _foreign_sqlite(path):
        raise CacheError(
            f"{path} is an SQLite database but not an enrich response cache; "
            "not removing it; choose another file with --cache-path"
        )
    if not _may_be_ours(path):
        # A data file given as --cache-path by mistake (a CSV, say) is not
        # ours to delete, however much it fails to be a cache.
        raise CacheError(
            f"{path} is neither an SQLite file nor named like a cache (.sqlite3, .sqlite, .db); "
            "not removing it: check --cache-path, or delete the file yourself"
        )
    # The siblings too: a stale WAL or hot journal beside a new file would be
    # replayed into it.
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        except OSError as exc:
            raise CacheError(
                f"response cache {path} is damaged and cannot be removed "
                f"({exc.strerror or exc}); remove {path.name}{suffix} by hand"
            ) from None
    # Created now rather than by the next run, so a problem with the new file
    # (permissions, space) shows here, where the user asked for the repair.
    ResponseCache(path).close()
    return Cleared(0, repaired=True)


# ---------------------------------------------------------------------------
# In-run dedup.

T = TypeVar("T")


class Admission(Enum):
    """What :meth:`InRunDedup.admit` tells the feeder to do with a row."""

    SEND = "send"
    """The first row with this key: send it."""
    PARKED = "parked"
    """An identical request is in flight: its outcome will come from ``settle``."""


# Remembered outcomes for rows whose leader already settled. Bounded in count
# and in bytes, because memory must grow neither with the input nor with the
# size of the answers (100,000 answers of 100 KB are 10 GB); with the
# persistent cache on, an answer forgotten here is still found there.
DEFAULT_REMEMBERED: Final = 100_000
DEFAULT_REMEMBERED_BYTES: Final = 64 << 20


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

    def __init__(
        self,
        max_remembered: int = DEFAULT_REMEMBERED,
        *,
        max_bytes: int = DEFAULT_REMEMBERED_BYTES,
        weigh: Callable[[T], int] = lambda _outcome: 0,
    ) -> None:
        """``weigh`` says how many bytes an outcome holds (its answer's text):
        remembered outcomes stay within ``max_bytes`` as well as ``max_remembered``."""
        self._in_flight: dict[bytes, list[int]] = {}
        self._settled: OrderedDict[bytes, T] = OrderedDict()
        self._max_remembered = max_remembered
        self._max_bytes = max_bytes
        self._weigh = weigh
        self._bytes = 0
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
            previous = self._settled.pop(key, None)
            if previous is not None:
                self._bytes -= self._weigh(previous)
            self._settled[key] = outcome
            self._bytes += self._weigh(outcome)
            while self._settled and (
                len(self._settled) > self._max_remembered or self._bytes > self._max_bytes
            ):
                _, forgotten = self._settled.popitem(last=False)
                self._bytes -= self._weigh(forgotten)
        return followers

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)
