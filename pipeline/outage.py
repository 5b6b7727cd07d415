"""Run-level outages: when the API stops answering everyone, the run holds
its rows and probes, instead of spending every row's attempts on a server
that is down and calling the result a success.

``OutageGate`` is told the outcome of every attempt. Transient failures
(connections refused or reset, timeouts, 5xx: a ``classify`` kind "retry"
that is not a 429) from several rows with no answer in between trip it into
an outage; while it lasts, workers wait before sending and one request at a
time goes out as a probe, spaced by exponential backoff with jitter. Any
answer from the server (a 200, a row-level 4xx, a 429) proves it is up, ends
the outage and lets every worker go. Past ``max_outage_s``, counted from the
first failure of the streak that tripped it, the gate fails with
``APIUnreachable``.

Time is the event loop's clock (``loop.time()``), so the tests run all of it
on a fake clock (the ``looptime`` plugin) without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from pipeline.errors import APIUnreachable
from pipeline.events import EventSink, NullEventSink

__all__ = [
    "DEFAULT_MAX_OUTAGE_S",
    "PROBE_BASE_S",
    "PROBE_MAX_S",
    "TRIP_FAILURES",
    "TRIP_ROWS",
    "Attempt",
    "OutageGate",
]

# A cron-friendly bound: ten minutes covers a restart or a failover, and a
# nightly job that cannot reach its API for longer should say so and free its
# lock for the next try rather than sit on it.
DEFAULT_MAX_OUTAGE_S: Final = 600.0

# Consecutive transient failures, with no answer in between, that make an
# outage. A server that died fails every request in flight at once, so five
# come within milliseconds; a live server's random faults rarely line up five
# in a row, because the answers to the other requests in flight reset the
# count (at a 17% fault rate, about once in 7,000 attempts, and a false trip
# costs only the first probe's wait).
TRIP_FAILURES: Final = 5
# ...coming from at least this many rows: one row whose content makes the
# server answer 500 must not hold the run.
TRIP_ROWS: Final = 2

# Probe spacing: the n-th probe after a trip waits up to PROBE_BASE_S * 2**n,
# capped at PROBE_MAX_S, jittered down to half of that (a fleet of jobs
# behind one gateway should not come back in lockstep). 30 s is also the
# longest a run sits idle after the API is back.
PROBE_BASE_S: Final = 1.0
PROBE_MAX_S: Final = 30.0


def _now() -> float:
    return asyncio.get_running_loop().time()


@dataclass(slots=True)
class Attempt:
    """One request's passage through the gate. Report its outcome once, with
    ``OutageGate.answered`` or ``OutageGate.failed``."""

    # The outage this request probes for (None: not a probe).
    probe_of: int | None = None
    reported: bool = False
    run_failure: bool = False
    """The failure was the run's (during an outage, or the one that tripped
    it): it costs the row no attempt, and the gate, not the row's own
    backoff, decides when the row is sent again."""


class OutageGate:
    """Holds every worker of a run while the API is down; see the module doc.

    Use::

        async with gate.attempt() as attempt:
            ...send...
            gate.answered(attempt)                       # or
            gate.failed(attempt, row_id, failure.reason)  # True: the run's failure
    """

    def __init__(
        self,
        max_outage_s: float = DEFAULT_MAX_OUTAGE_S,
        *,
        events: EventSink | None = None,
        rng: random.Random | None = None,
        trip_failures: int = TRIP_FAILURES,
        trip_rows: int = TRIP_ROWS,
        probe_base_s: float = PROBE_BASE_S,
        probe_max_s: float = PROBE_MAX_S,
    ) -> None:
        if max_outage_s <= 0:
            raise ValueError(f"max_outage_s must be > 0, got {max_outage_s}")
        self.max_outage_s = max_outage_s
        self._events = events or NullEventSink()
        self._rng = rng or random.Random()
        self._trip_failures = trip_failures
        self._trip_rows = trip_rows
        self._probe_base_s = probe_base_s
        self._probe_max_s = probe_max_s
        # The streak of transient failures since the last answer.
        self._streak = 0
        self._streak_rows: set[int] = set()
        self._streak_started = 0.0
        self.last_error: str | None = None
        # The outage, if one is on. Each gets a number, so the outcome of a
        # probe sent for an earlier one is not mistaken for this one's.
        self.active = False
        self._outage = 0
        self._started = 0.0
        self._failures = 0
        self._probing = False
        self._probes_failed = 0
        self._probes_sent = 0
        self._next_probe = 0.0
        # Workers waiting to send, first come first served: the row whose
        # probe just failed goes to the back, so a row the server chokes on
        # cannot be the only one that ever probes.
        self._waiters: collections.deque[asyncio.Future[int | None]] = collections.deque()
        self._probe_timer: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._expired = asyncio.Event()
        self.error: APIUnreachable | None = None
        # What happened, for the stats.
        self.outages = 0
        self.outage_s = 0.0
        self.probes = 0

    # -- sending ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def attempt(self) -> AsyncIterator[Attempt]:
        """Wait until a request may go (at once, unless an outage is on)."""
        attempt = Attempt(probe_of=await self._admit())
        try:
            yield attempt
        finally:
            if attempt.probe_of == self._outage and not attempt.reported and self._probing:
                # Cancelled (or a bug) before any outcome: the next one may probe.
                self._probing = False
                self._schedule()

    async def _admit(self) -> int | None:
        if self.error is not None:
            raise self.error
        if not self.active:
            return None
        waiter: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._schedule()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                if waiter.result() == self._outage and self.active:
                    # Picked as the probe just as it was cancelled.
                    self._probing = False
                    self._schedule()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _schedule(self) -> None:
        """Let waiters go: all of them when no outage is on, else the first
        one as a probe once the probe is due."""
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        if not self.active:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
            return
        if self._probing or self.error is not None:
            return
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()
        if not self._waiters:
            return
        if _now() >= self._next_probe:
            self._probing = True
            self.probes += 1
            self._probes_sent += 1
            self._waiters.popleft().set_result(self._outage)
        else:
            self._probe_timer = asyncio.get_running_loop().call_at(self._next_probe, self._schedule)

    # -- outcomes ----------------------------------------------------------------

    def answered(self, attempt: Attempt) -> None:
        """The server answered (a 200, a row-level 4xx, a 429): it is up."""
        attempt.reported = True
        self._streak = 0
        self._streak_rows.clear()
        if self.active and self.error is None:
            self._end()

    def failed(self, attempt: Attempt, row_id: int, reason: str) -> bool:
        """A transient failure of the transport or the server (not a 429).
        True when it is the run's failure (``attempt.run_failure``)."""
        attempt.reported = True
        self.last_error = reason
        now = _now()
        if self.active:
            self._failures += 1
            if attempt.probe_of == self._outage and self._probing:
                self._probing = False
                self._probes_failed += 1
                self._next_probe = now + self._probe_delay(self._probes_failed)
                self._schedule()
            attempt.run_failure = True
            return True
        if self._streak == 0:
            self._streak_started = now
        self._streak += 1
        self._streak_rows.add(row_id)
        if self._streak >= self._trip_failures and len(self._streak_rows) >= self._trip_rows:
            self._trip(now)
            attempt.run_failure = True
            return True
        return False

    def _probe_delay(self, failed_probes: int) -> float:
        ceiling = min(self._probe_max_s, self._probe_base_s * 2.0**failed_probes)
        return ceiling * (0.5 + 0.5 * self._rng.random())

    def _trip(self, now: float) -> None:
        loop = asyncio.get_running_loop()
        self.active = True
        self._outage += 1
        self.outages += 1
        self._started = self._streak_started
        self._failures = self._streak
        rows = len(self._streak_rows)
        self._streak = 0
        self._streak_rows.clear()
        self._probing = False
        self._probes_failed = 0
        self._probes_sent = 0
        self._next_probe = now + self._probe_delay(0)
        # A deadline already past (failures that took long to come, such as
        # timeouts) ends the run at once.
        self._deadline_timer = loop.call_at(self._started + self.max_outage_s, self._expire)
        self._events.emit(
            "warning",
            level="warning",
            kind="outage",
            message=(
                f"the API is not answering ({self._failures} requests from {rows} rows "
                f"failed in a row, last: {self.last_error}); holding new requests and "
                f"probing with backoff; the run ends (exit 75, checkpoint kept) if this "
                f"lasts {self.max_outage_s:g} s (--max-outage)"
            ),
            last_error=self.last_error,
            failures=self._failures,
            rows=rows,
            max_outage_s=self.max_outage_s,
        )

    def _end(self) -> None:
        lasted = _now() - self._started
        self.outage_s += lasted
        self.active = False
        self._probing = False
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._schedule()
        self._events.emit(
            "recovered",
            kind="outage",
            message=f"the API answers again after {lasted:,.1f} s out; resuming",
            outage_s=round(lasted, 3),
            failures=self._failures,
            probes=self._probes_sent,
        )

    def _expire(self) -> None:
        self._deadline_timer = None
        if not self.active or self.error is not None:
            return
        lasted = _now() - self._started
        self.outage_s += lasted
        self.error = APIUnreachable(
            f"the API was unreachable for {lasted:,.1f} s (last error: {self.last_error}; "
            f"{self._failures} failed requests, {self._probes_failed} failed probes), "
            f"longer than --max-outage {self.max_outage_s:g} s; the checkpoint is kept: "
            "rerun the same command once the API is back (or raise --max-outage)"
        )
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self.error)
        self._expired.set()

    async def unreachable(self) -> APIUnreachable:
        """Returns once the outage has outlasted ``max_outage_s``: for a
        caller that must stop even when no worker is waiting (a lone probe
        hanging until its timeout)."""
        await self._expired.wait()
        assert self.error is not None
        return self.error

    def close(self) -> None:
        """Cancel the timers (the run is over)."""
        for timer in (self._probe_timer, self._deadline_timer):
            if timer is not None:
                timer.cancel()
        self._probe_timer = self._deadline_timer = None
