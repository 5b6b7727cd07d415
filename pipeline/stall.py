"""Stuck requests: cut a request that has gone silent, never one that is
slowly answering.

A request is *stalled* when no bytes have come from the server for the stall
timeout: before the first byte (the server never started answering) or
between two chunks of a streamed answer. A long answer that streams steadily
is never silent for long, so only the total ``--timeout`` bounds it; a stuck
connection is silent from the start, so it is cut in seconds, not after the
total timeout. Without streaming (a server that cannot, or ``--no-stream``)
the whole answer arrives at once, so the silence is the request's latency and
the same rule becomes a timeout learned from recent latencies.

The stall timeout (``StallTimeout``) is, unless given (``--stall-timeout``):

    clamp(STALL_MULTIPLE x p99 of the longest silence of each of the last
          STALL_WINDOW answers, STALL_FLOOR_S, --timeout)

and ``STALL_DEFAULT_S`` (also clamped to ``--timeout``) until
``STALL_WARMUP`` answers have been seen. A row whose request was cut before
gets twice the stall timeout on each retry (up to ``--timeout``): a row whose
first byte legitimately takes longer than everyone else's (a huge prompt, a
long prefill) still gets its answer, while one stuck connection costs seconds.

``Watchdog`` is the mechanism inside a transport: the stall timeout and the
total timeout of one request, on the event loop's clock, costing one float
assignment per chunk that arrives.
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Literal

from pipeline.transport_errors import TransportError

if TYPE_CHECKING:
    # Imported by the watchdog, which runs on a loop: the CLI imports this
    # module for its help text, and `enrich --help` needs no event loop.
    import asyncio

__all__ = [
    "STALL_DEFAULT_S",
    "STALL_FLOOR_S",
    "STALL_MULTIPLE",
    "STALL_PERCENTILE",
    "STALL_WARMUP",
    "STALL_WINDOW",
    "Patience",
    "StallLimit",
    "StallTimeout",
    "StalledRequest",
    "Watchdog",
]

# Before enough answers have been seen: long enough for any sane server to
# send its first byte, still a third of the default total timeout.
STALL_DEFAULT_S: Final = 20.0
# Never cut sooner, however fast and regular the answers have been: a lost
# SYN costs 1 s, a busy server's queue a few more; a false cut costs a retry.
STALL_FLOOR_S: Final = 3.0
# How far beyond the usual worst silence a request may go before it is cut.
STALL_MULTIPLE: Final = 4.0
STALL_PERCENTILE: Final = 0.99
# Answers remembered: enough for a p99 of five samples, recent enough to
# follow a server that slows down.
STALL_WINDOW: Final = 512
# Answers seen before the learned value replaces the default.
STALL_WARMUP: Final = 32

# Timer callbacks may run a hair before their due time.
_SLACK_S: Final = 1e-3


class StalledRequest(TransportError):
    """No bytes came from the server for the stall timeout: the request was
    cut. Transient, worth a retry (with a longer stall timeout): one of
    enrich's transport errors, classified before the others by
    ``pipeline.call.classify``."""

    def __init__(self, silence_s: float, *, started: bool) -> None:
        where = "after the response began" if started else "before the first byte"
        super().__init__(f"request stalled: no data for {silence_s:.1f} s {where}")
        self.silence_s = silence_s
        self.started = started


class StallTimeout:
    """The stall timeout of the run: learned from the answers' silences, or
    fixed (``fixed``); ``ceiling`` is the total request timeout."""

    def __init__(
        self,
        fixed: float | None,
        ceiling: float,
        *,
        default: float = STALL_DEFAULT_S,
        floor: float = STALL_FLOOR_S,
        multiple: float = STALL_MULTIPLE,
        percentile: float = STALL_PERCENTILE,
        window: int = STALL_WINDOW,
        warmup: int = STALL_WARMUP,
    ) -> None:
        if ceiling <= 0:
            raise ValueError(f"ceiling must be > 0, got {ceiling}")
        self.fixed = fixed
        self.ceiling = ceiling
        self._default = default
        self._floor = floor
        self._multiple = multiple
        self._percentile = percentile
        self._warmup = max(1, warmup)
        self._window = max(1, window)
        # The window in arrival order, and the same values sorted (kept so by
        # bisection: a percentile is then one lookup).
        self._silences: collections.deque[float] = collections.deque()
        self._sorted: list[float] = []
        # Whether answers are streamed; None until the first one.
        self.streamed: bool | None = None

    @property
    def learned(self) -> bool:
        """True once the value comes from the answers (not given, not the default)."""
        return self.fixed is None and len(self._sorted) >= self._warmup

    def observe(self, silence_s: float | None, *, streamed: bool) -> None:
        """An answer arrived; ``silence_s`` is the longest time it went
        without bytes (its time to first byte, or a gap between chunks).

        The first non-streamed answer after streamed ones (the server
        stopped streaming, see the transports) starts the window afresh: a
        latency is not a silence between chunks."""
        if self.streamed and not streamed:
            self._silences.clear()
            self._sorted.clear()
        self.streamed = streamed
        if silence_s is None or not math.isfinite(silence_s) or silence_s < 0:
            return
        if len(self._silences) == self._window:
            oldest = self._silences.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._silences.append(silence_s)
        bisect.insort(self._sorted, silence_s)

    def value(self) -> float:
        """The stall timeout for a request of a row that has not stalled yet."""
        if self.fixed is not None:
            return min(self.fixed, self.ceiling)
        ordered = self._sorted
        if len(ordered) < self._warmup:
            return min(self._default, self.ceiling)
        high = ordered[max(0, math.ceil(self._percentile * len(ordered)) - 1)]
        return min(max(self._multiple * high, self._floor), self.ceiling)

    def for_attempt(self, stalls: int) -> float:
        """The stall timeout for a row whose requests were cut ``stalls``
        times before: doubled each time, up to the ceiling."""
        return min(self.value() * 2.0 ** max(0, stalls), self.ceiling)


Expiry = Literal["stall", "total"]

# A stall timeout: seconds, a function giving the current seconds (re-read
# while a request waits, so that a request sent before the timeout was
# learned gets the learned one), or None for none.
StallLimit = float | Callable[[], float] | None

# How often a watchdog with a function re-reads it while a request is silent.
_RECHECK_S: Final = 1.0


class Patience:
    """A stall limit for a request that may wait in the server's queue
    behind the run's own earlier requests (see ``pipeline.concurrency``):
    ``queued()`` gives the seconds it has waited so, which count against
    neither the stall timeout nor the total one. Waiting is not being stuck
    or slow; fewer requests in flight, not a shorter timeout, is the cure.

    ``computing()`` gives the seconds it has spent at the head of that queue
    while the server answered none of the requests behind it: the server was
    computing it, so they count against the stall timeout neither (the total
    one still bounds a slow answer)."""

    __slots__ = ("computing", "limit", "queued")

    def __init__(
        self,
        limit: Callable[[], float],
        queued: Callable[[], float],
        computing: Callable[[], float] | None = None,
    ) -> None:
        self.limit = limit
        self.queued = queued
        self.computing = computing

    def __call__(self) -> float:
        extra = self.computing() if self.computing is not None else 0.0
        return self.limit() + self.queued() + extra


class Watchdog:
    """The stall and total timeouts of one request, inside an
    ``asyncio.timeout(None)`` scope that it expires when either is reached.

    Call ``beat()`` whenever bytes arrive (headers, each chunk): one clock
    read and a comparison. A single timer checks lazily: when it fires before
    the request has been silent for the stall timeout it re-arms for the new
    due time instead of being moved on every chunk.

    Use::

        async with asyncio.timeout(None) as scope:
            watch = Watchdog(scope, stall_s, total_s)
            try:
                ...; watch.beat(); ...
            finally:
                watch.close()
        # TimeoutError out of the scope: watch.expired says which ("stall", "total")
    """

    __slots__ = (
        "_handle",
        "_limit",
        "_loop",
        "_scope",
        "beats",
        "cut_after",
        "deadline",
        "expired",
        "first",
        "last",
        "longest",
        "started",
        "total_s",
    )

    def __init__(self, scope: asyncio.Timeout, stall_s: StallLimit, total_s: float) -> None:
        import asyncio  # loaded by the loop that runs this: a dictionary lookup

        loop = asyncio.get_running_loop()
        now = loop.time()
        self._loop = loop
        self._scope = scope
        self._limit = stall_s
        self.started = now
        self.first: float | None = None  # when the first bytes came
        self.last = now
        self.longest = 0.0
        self.beats = 0
        self.total_s = total_s
        self.deadline = now + total_s
        self.expired: Expiry | None = None
        # The stall timeout that cut the request.
        self.cut_after: float | None = None
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._due(now), self._check)

    @property
    def stall_s(self) -> float | None:
        """The stall timeout now; None when there is none short of the total."""
        limit = self._limit
        value = limit() if callable(limit) else limit
        # A stall timeout at or past the total one is the total one.
        return value if value is not None and value < self.total_s + self._queued() else None

    def _queued(self) -> float:
        return self._limit.queued() if isinstance(self._limit, Patience) else 0.0

    def _deadline(self) -> float:
        return self.deadline + self._queued()

    def _due(self, now: float) -> float:
        stall_s = self.stall_s
        deadline = self._deadline()
        due = deadline if stall_s is None else min(self.last + stall_s, deadline)
        if callable(self._limit):
            due = min(due, now + _RECHECK_S)
        return due

    def beat(self) -> None:
        """Bytes arrived."""
        now = self._loop.time()
        gap = now - self.last
        if gap > self.longest:
            self.longest = gap
        if not self.beats:
            self.first = now
        self.last = now
        self.beats += 1

    @property
    def first_byte_s(self) -> float | None:
        """Seconds from the start to the first bytes (None: none yet)."""
        return None if self.first is None else self.first - self.started

    def silence(self) -> float:
        """Seconds since the last bytes (or the start)."""
        return self._loop.time() - self.last

    def _check(self) -> None:
        self._handle = None
        now = self._loop.time()
        stall_s = self.stall_s
        if now >= self._deadline() - _SLACK_S:
            self.expired = "total"
        elif stall_s is not None and now >= self.last + stall_s - _SLACK_S:
            self.expired = "stall"
            self.cut_after = stall_s
        else:
            self._handle = self._loop.call_at(self._due(now), self._check)
            return
        self._scope.reschedule(now)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
