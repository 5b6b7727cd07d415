"""Run events for logs: start, periodic progress, warnings, finish, error.

The library reports what happens to an ``EventSink`` and never writes to a
stream by itself; the CLI picks the sink (plain text for people, one JSON
object per line for log shippers) and owns the stream. Every sink redacts the
secrets it is given from the finished line, so whatever a caller puts in a
field (an error message echoing a header, a URL with a key in it), the API key
never reaches a log.

Event names (``event``) used by enrich:

- ``start``     the run begins: rows, rows already done, model, output
- ``progress``  every ``interval_s`` while results arrive: done, total, rows/s, eta, cost,
                and the run's live totals (requests sent, retries, 429s, rows from
                cache and dedup, tokens, in flight, limits, time paused): the
                numbers ``--metrics-port`` serves (``pipeline.timeline.Live``)
- ``metrics``   the metrics endpoint is up: url, port
- ``warning``   something a scheduler's operator should see; ``kind`` says what
                (``rate_limit_pause``, ``retrying``, ``prompt_too_long``, ``stale_lock``,
                ``unknown_price``, ``outage``, ...). ``rate_limit_pause``: a 429 holds
                every request until ``paused_until``; ``retrying``: rows wait out their
                backoff after transient failures (``rows``, ``last_error``). Both come
                at most every 30 s and carry ``waiting``, a short phrase for a bar.
                ``outage``: requests from several rows failed in a row (refused,
                reset, timed out, 5xx); new requests are held while one probe at a
                time tests the API. Fields: last_error, failures, rows, max_outage_s
- ``recovered`` (info, ``kind`` ``outage``) the API answers again after an outage;
                the run resumes. Fields: outage_s, failures, probes
- ``finish``    the summary, with the exit code
- ``error``     the run stopped; ``message`` is the one-line error, ``exit_code`` the code
- ``skip``      nothing to do (the output is up to date)
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePath
from typing import IO, TYPE_CHECKING, Any, Final, Literal, Protocol

# Re-exported: the sinks' callers name them from here.
from pipeline.redact import REDACTED as REDACTED
from pipeline.redact import redact as redact
from pipeline.redact import usable_secrets
from pipeline.tally import TallyCounter

if TYPE_CHECKING:
    # Only a type here: the lock (which imports this module) stays light
    # enough for a process to load in milliseconds.
    from pipeline.results import RowResult

Level = Literal["debug", "info", "warning", "error"]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_safe(value: Any) -> Any:
    """A JSON-safe version of a field value. NaN and infinity are not JSON
    (strict parsers such as jq reject them), so they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    return str(value)


class EventSink(Protocol):
    """Where the library reports what happens. Implementations must be safe
    to call from worker threads (checkpoint flushes run in one)."""

    def emit(self, event: str, *, level: Level = "info", message: str = "", **fields: Any) -> None:
        """Report one event; ``message`` is a one-line human summary."""
        ...


class NullEventSink:
    """For library callers that want no events (the default)."""

    def emit(self, event: str, *, level: Level = "info", message: str = "", **fields: Any) -> None:
        pass


class _StreamSink:
    """Shared by the text and JSON sinks: redaction, one lock, a flush per
    line (cron appends to a file; a shipper tails it and wants whole lines now)."""

    def __init__(self, stream: IO[str], *, secrets: Iterable[str | None] = ()) -> None:
        self._stream = stream
        self._secrets = usable_secrets(secrets)
        self._lock = threading.Lock()

    def _write(self, line: str) -> None:
        line = redact(line, self._secrets)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class JsonEventSink(_StreamSink):
    """One JSON object per line: ``{"ts", "level", "event", "message", ...fields}``."""

    def emit(self, event: str, *, level: Level = "info", message: str = "", **fields: Any) -> None:
        body: dict[str, Any] = {"ts": _now_iso(), "level": level, "event": event}
        if message:
            body["message"] = message
        for name, value in fields.items():
            # The envelope's keys win: a field named "ts" must not forge the time.
            body.setdefault(name, json_safe(value))
        self._write(json.dumps(body, ensure_ascii=False, separators=(",", ":")))


class TextEventSink(_StreamSink):
    """``2025-06-01T02:15:00.000Z INFO start: message (key=value, ...)`` lines:
    greppable in a cron log, readable in a terminal."""

    def emit(self, event: str, *, level: Level = "info", message: str = "", **fields: Any) -> None:
        head = f"{_now_iso()} {level.upper()} {event}"
        if message:
            head += f": {message}"
        shown = [f"{name}={_text_value(value)}" for name, value in fields.items()]
        if shown:
            head += f" ({', '.join(shown)})"
        self._write(" ".join(head.split()))


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "-"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(json_safe(value), ensure_ascii=False, separators=(",", ":"))
    return "-" if value is None else str(value)


@dataclass(frozen=True)
class Event:
    event: str
    level: Level
    message: str
    fields: dict[str, Any]


@dataclass
class RecordingEventSink:
    """Keeps events in memory: for tests, and for callers (an Airflow task)
    that want to inspect what happened after the run."""

    events: list[Event] = field(default_factory=list)

    def emit(self, event: str, *, level: Level = "info", message: str = "", **fields: Any) -> None:
        self.events.append(Event(event, level, message, dict(fields)))

    def named(self, event: str) -> list[Event]:
        return [e for e in self.events if e.event == event]


class HeldEvents:
    """Passes events on to ``sink``, holding them while ``held``: a head
    start's call stage reports before the run has said ``start`` (a 429's
    pause, retries), and a log reads as the run's own only after it. Held
    events go out in order at ``release`` (after ``start``, or as the run
    ends without one), so none is lost."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self._held: list[Event] | None = []
        self._lock = threading.Lock()

    def emit(self, event: str, *, level: Level = "info", message: str = "", **fields: Any) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append(Event(event, level, message, dict(fields)))
                return
        self.sink.emit(event, level=level, message=message, **fields)

    def release(self) -> None:
        # Under the lock: an event emitted meanwhile waits, and follows them.
        with self._lock:
            held, self._held = self._held or [], None
            for e in held:
                self.sink.emit(e.event, level=e.level, message=e.message, **e.fields)


class ThrottledWarning:
    """One ``warning`` event per ``interval_s`` at most for a recurring
    condition, with how often it happened since the last line: a 429 storm
    is a line every 30 s saying "37 times", not 10,000 lines.

    Call ``hit()`` each time it happens (from the event loop)."""

    def __init__(
        self,
        sink: EventSink,
        kind: str,
        *,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._kind = kind
        self._interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._count = 0
        self.total = 0

    def hit(self, message: str, **fields: Any) -> bool:
        """Count one occurrence; True when a line was emitted for it."""
        self._count += 1
        self.total += 1
        now = self._clock()
        if self._last is not None and now - self._last < self._interval_s:
            return False
        self._sink.emit(
            "warning",
            level="warning",
            message=message,
            kind=self._kind,
            occurrences=self._count,
            **fields,
        )
        self._last = now
        self._count = 0
        return True


# Often enough that a log shipper's dashboard moves, rarely enough that a
# nightly run's log stays small (a 10-hour run writes 1,200 lines).
DEFAULT_PROGRESS_INTERVAL_S: Final = 30.0


class ProgressEvents:
    """A ``pipeline.progress.Progress`` that emits ``progress`` events every
    ``interval_s`` (and one at close), for logs where no bar can be drawn.

    ``cost_so_far`` (optional) returns the money spent by this run so far, so
    the running cost appears in each progress line; ``live`` (optional)
    returns more running totals to carry (the run timeline's).
    """

    def __init__(
        self,
        sink: EventSink,
        *,
        interval_s: float = DEFAULT_PROGRESS_INTERVAL_S,
        cost_so_far: Callable[[], float | None] | None = None,
        live: Callable[[], Mapping[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._live = live
        self._interval_s = interval_s
        self._cost_so_far = cost_so_far
        self._clock = clock
        self._total = 0
        self._already_done = 0
        self._ahead = 0
        self._counter = TallyCounter()
        self._started = 0.0
        self._last_emit = 0.0
        self._closed = False

    def start(self, total: int, already_done: int) -> None:
        self._total = total
        self._already_done = already_done
        self._started = self._last_emit = self._clock()

    def advance(self, result: RowResult) -> None:
        self._counter.add(result)
        now = self._clock()
        if now - self._last_emit >= self._interval_s:
            self._last_emit = now
            self._emit(now)

    def ahead(self, rows: int) -> None:
        """Rows finished where the run will collect them later (the Ray
        engine's workers): counted in ``done`` and ``ahead`` until collected."""
        self._ahead = rows

    def heartbeat(self) -> None:
        """Called on a timer (the run's timeline sampler): a progress event
        every ``interval_s`` even while no row finishes (a long 429 pause)."""
        now = self._clock()
        if not self._closed and self._total and now - self._last_emit >= self._interval_s:
            self._last_emit = now
            self._emit(now)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._emit(self._clock())

    def fields(self, now: float | None = None) -> dict[str, Any]:
        """The numbers of a progress event (also handy for a final summary)."""
        now = self._clock() if now is None else now
        counts = self._counter.by_status()
        processed = sum(counts.values()) + self._ahead
        done = self._already_done + processed
        elapsed = max(now - self._started, 1e-9)
        rate = processed / elapsed
        remaining = max(self._total - done, 0)
        values: dict[str, Any] = {
            "done": done,
            "total": self._total,
            "percent": round(100.0 * done / self._total, 1) if self._total else 100.0,
            **counts,
            # ok/error/skipped are this run's; the rest came from the checkpoint.
            "resumed": self._already_done,
            "rows_per_s": round(rate, 2),
            "eta_s": round(remaining / rate, 1) if rate > 0 else None,
        }
        if self._ahead:
            values["ahead"] = self._ahead
        if self._cost_so_far is not None:
            cost = self._cost_so_far()
            values["cost_usd"] = None if cost is None else round(cost, 6)
        if self._live is not None:
            for name, value in self._live().items():
                values.setdefault(name, value)
        return values

    def _emit(self, now: float) -> None:
        values = self.fields(now)
        message = f"{values['done']:,} of {values['total']:,} rows ({values['percent']}%)"
        self._sink.emit("progress", message=message, **values)
