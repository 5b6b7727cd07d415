"""Run-wide rate limiting: request and token budgets, an adaptive in-flight
limit, and the run-wide pause after a 429.

One ``RateLimiter`` is shared by every worker of a run, because the provider's
budget is shared too: a 429 slows the whole run, not one request.

Four mechanisms, each for what the others cannot do:

* ``TokenBucket`` paces requests/min and tokens/min at the configured limits,
  or at those the server reports in ``x-ratelimit-limit-*`` headers (the
  lower wins). Rates aim a little below the limit (``RATE_HEADROOM``): the
  provider counts arrivals, and network jitter bunches what was sent evenly.
  Token reservations (prompt plus completion budget, estimated when the
  request reaches the bucket) are settled with the usage the API reports;
  a 429 names the limit it is about (``exhausted_limit``), and tokens 429s
  that keep coming make the tokens pace aim lower (``token_share``).
* ``RateEstimate`` learns the request limit of a server that reports none,
  whatever the length of the window it counts over: a log of send times read
  against each 429's retry-after shows the window and what it held. It
  probes upwards, fast back to a limit seen before a storm, and takes over
  from a reported limit that the server stops reporting.
* ``ConcurrencyGate`` bounds the requests in flight and moves that bound by
  AIMD: additive increase while the bound holds requests back, multiplicative
  decrease on a 429. It backs off from servers that limit concurrent
  requests, and shrugs off 429s that have nothing to do with our rate. With
  ``latency=True`` a ``LatencyLimit`` caps it too, at the capacity a
  self-hosted server shows by queueing (see ``pipeline.concurrency``).
* The pause: a 429's retry-after holds every new request, however long it is,
  and empties the buckets so that the end of a pause is not a burst.

Time is the event loop's clock (``loop.time()``), so the tests run all of it
on a fake clock (the ``looptime`` plugin) without sleeping.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import collections
import contextlib
import math
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from pipeline.concurrency import ConcurrencyGate, LatencyLimit, QueueClock, Sample

__all__ = [
    "RATE_HEADROOM",
    "ConcurrencyGate",
    "LatencyLimit",
    "LimitKind",
    "LimiterStats",
    "Permit",
    "Quota",
    "RateEstimate",
    "RateLimitHeaders",
    "RateLimiter",
    "TokenBucket",
    "exhausted_limit",
    "parse_count",
    "parse_duration",
    "retry_after_seconds",
]

# Aim this far below a known limit. The provider counts requests when they
# arrive, and network jitter bunches arrivals that were sent evenly; at 100%
# a sliding window would answer 429 for every request that arrives early.
RATE_HEADROOM: Final = 0.97

# The tokens a request really costs are known only when it is answered, so a
# window of requests can add up to more than their reservations said, and the
# server answers 429. A rare one costs only its short pause. Once they come
# more often than TOKEN_429_SHARE_TOLERATED of the requests sent since the
# last cut, adaptive runs aim lower at the tokens limit, by TOKEN_SHARE_CUT
# down to TOKEN_SHARE_FLOOR, and climb back towards RATE_HEADROOM by
# TOKEN_SHARE_PROBE_PER_S: the margin follows how unpredictable this job's
# answers are.
TOKEN_429_SHARE_TOLERATED: Final = 0.01
TOKEN_SHARE_CUT: Final = 0.95
TOKEN_SHARE_FLOOR: Final = 0.75
TOKEN_SHARE_PROBE_PER_S: Final = 0.005
# A sliding window stays over-full for as long as it is: the 429s that keep
# coming right after a cut are the same excess, not a reason to cut again.
TOKEN_SHARE_CUT_SPACING_S: Final = 1.0

# The shortest wait: a shorter one can fall below the clock's resolution,
# sleep zero, and spin.
MIN_SLEEP_S: Final = 1e-4

# Bucket capacities, in seconds of the rate. Providers enforce per-minute
# limits over sub-minute windows (a second, for all we know), so a bucket
# must never release a minute's budget at once. A bucket fills while
# something else holds requests back (the in-flight limit ramping up); a
# full one on top of a second at the paced rate must still fit a one-second
# window, which leaves the headroom. A request larger than the bucket still
# goes, alone, and leaves a debt (see TokenBucket).
REQUEST_BURST_S: Final = 1.0 - RATE_HEADROOM
TOKEN_BURST_S: Final = 1.0 - RATE_HEADROOM

# Learning a request limit the server does not report (see RateEstimate).
#
# Windows it can learn: below MIN_WINDOW_S, send times and retry-after are too
# coarse to tell a window from jitter; above MAX_WINDOW_S a "window" is a
# quota (hourly, daily), which a pause (and --max-pause, --max-refusal)
# answers, not pacing. The send log keeps MAX_WINDOW_S of history, and at most
# SEND_LOG_MAX sends (memory stays bounded at any rate).
MIN_WINDOW_S: Final = 0.5
MAX_WINDOW_S: Final = 120.0
SEND_LOG_MAX: Final = 500_000
# The request a window drops next was sent at least a retry-after after the
# one before it (that one has left the window already); this share of the
# retry-after allows for jitter in when requests arrive.
GAP_TOLERANCE: Final = 0.9
# A 429 points at a window only if its retry-after is at least this share of
# it. A window that refuses while nearly all of it is still to run has been
# filled by a burst, whose start stands out; one that frees within a small
# share of itself is full evenly, and then any recent gap fits.
MIN_FREE_SHARE: Final = 0.25
# Until a window is learned, 429s with a retry-after are read against one
# this long, or as long as the longest retry-after so far (a window never
# asks to wait longer than itself): a window full evenly holds about the
# limit's rate over any span of it.
PROVISIONAL_WINDOW_S: Final = 1.0
# Without retry-after, a 429 pauses the run for a row's backoff, which grows
# to seconds and more: too coarse to see when a window frees room. So the
# pause is cut to when the log says the oldest request leaves a known window,
# or, while the window is unknown, to REFUSAL_PROBE_SHARE of how long the
# refusals have lasted (MIN_WAIT_HINT_S at least), and then one request at a
# time tests the window (its 429 costs its row no attempt): when one is
# admitted, the window is dated to within a few percent.
REFUSAL_PROBE_SHARE: Final = 0.1
MIN_WAIT_HINT_S: Final = 0.05
# A window that held fewer requests than this says too little to pace by (a
# limit of a few requests a minute is left to the pauses retry-after asks).
MIN_HELD: Final = 10
# A learned window is refined only by a 429 that points at one window within
# this factor of it: a limit that changed mid-window points elsewhere.
WINDOW_TOLERANCE: Final = 1.5
# Counting the requests a window held: its edge is a send time read through
# the network's jitter, so this share of the window before it counts too.
# Without a retry-after nothing marks the edge: the span read is this much
# longer than the window, and the rate is taken over it.
EDGE_SLACK: Final = 0.005
UNMARKED_EDGE_MARGIN: Final = 0.1
# Probing upwards happens per period: the window, but at least
# MIN_PROBE_PERIOD_S (a 1 s window holds too few requests for a probe that
# collides once a second to stay under a 2% 429 share).
#
# Near the highest limit measured in the run (the ceiling), after a 429,
# probing waits `hold` periods, doubled by every 429 that finds no more
# than that limit (HOLD_MAX_PERIODS at most), back to one when a 429 finds
# a higher limit: a limit that holds still costs a 429 every ten periods or
# so. Then the estimate grows by PROBE_STEP in the first period, a step that
# doubles every period without a 429 (PROBE_STEP_MAX at most): a raised
# limit is found within a few periods, while near a known one the first
# steps are small.
#
# Below CLIMB_BELOW of the ceiling (a storm lowered the limit), recovering
# is climbing back to a rate the server admitted before: after `climb_hold`
# periods, doubled by every climb that a 429 stops (CLIMB_HOLD_MAX_PERIODS at
# most), CLIMB_GAP_LEFT of the gap to the ceiling is left after each period,
# until CLIMB_UNTIL of it, so the run is back within a few periods of the
# server. Climbs that keep failing for CEILING_MEMORY_PERIODS mean the limit
# fell for good: the ceiling comes down to it.
#
# Re-rating wakes every waiter: at most every PROBE_INTERVAL_S.
MIN_PROBE_PERIOD_S: Final = 1.0
HOLD_MAX_PERIODS: Final = 8
PROBE_STEP: Final = 0.01
PROBE_STEP_MAX: Final = 1.0
CLIMB_BELOW: Final = 0.9
CLIMB_UNTIL: Final = 0.99
CLIMB_GAP_LEFT: Final = 0.25
CLIMB_HOLD_MAX_PERIODS: Final = 4
CEILING_MEMORY_PERIODS: Final = 30
PROBE_INTERVAL_S: Final = 0.1
# A limit measured this much above the ceiling is a raised limit.
NEW_LIMIT_MARGIN: Final = 0.05
# 429s that are not about the rate (a flaky proxy) keep coming after a
# slow-down; pacing by them would ratchet the rate down for nothing. After a
# cut that slowed the run, two 429s or more in the window after it, at
# least NOISE_SHARE of the requests (and half the share before the cut),
# with a limit measured against a known window that followed the slow-down
# down (below NOISE_DRIFT of the one before), mark them as noise.
NOISE_SHARE: Final = 0.03
NOISE_DRIFT: Final = 0.9
# Once taken for noise, 429s pace the run again when they come for more than
# twice the noise's share (NOISE_SHARE_MAX at most) of the requests sent over
# NOISE_SPAN_PERIODS.
NOISE_SHARE_MAX: Final = 0.5
NOISE_SPAN_PERIODS: Final = 3.0
# A limit the server stopped reporting (its answers carry no x-ratelimit-*
# headers any more) is forgotten after this long: the estimate, seeded with
# it, takes over and probes, so a limit lowered during a storm is not kept.
STALE_REPORT_S: Final = 3.0


# ---------------------------------------------------------------------------
# Headers.

_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS: Final = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}


def parse_duration(value: str | None) -> float | None:
    """Seconds from a reset header: OpenAI's ``1h2m3s``, ``6m0s``, ``1.5s``,
    ``12ms``, ``0s``, or plain seconds (``"20"``, ``"1.5"``); None if absent
    or unusable.

    A bare ``0`` or a negative number is None, not zero: proxies that do not
    track a limit send them as placeholders, while a real "resets now" comes
    with a unit (``0s``).
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds > 0 else None
    if not text:
        return None
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total if position == len(text) and math.isfinite(total) else None


def parse_count(value: str | None) -> int | None:
    """A non-negative whole count from a limit or remaining header; None for
    absent, negative (``-1`` means "not limited" to some proxies) or garbage."""
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(number) or number < 0:
        return None
    return math.floor(number)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """How long a 429 or 503 asks to wait: ``retry-after-ms`` (more precise)
    first, then ``retry-after`` in seconds, which may be fractional."""
    lowered = _lowered(headers)
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = lowered.get(name)
        if value is None:
            continue
        try:
            seconds = float(value.strip()) * scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def _lowered(headers: Mapping[str, str]) -> Mapping[str, str]:
    # HTTP header names are case-insensitive; a plain dict (tests, other
    # transports) is not.
    return {name.lower(): value for name, value in headers.items()}


@dataclass(frozen=True, slots=True)
class Quota:
    """One limit as the server reports it. ``limit`` is per minute."""

    limit: int | None = None
    remaining: int | None = None
    reset_s: float | None = None


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """The ``x-ratelimit-*`` headers of one response."""

    requests: Quota = Quota()
    tokens: Quota = Quota()

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> RateLimitHeaders:
        lowered = _lowered(headers)
        return cls(_quota(lowered, "requests"), _quota(lowered, "tokens"))


def _quota(headers: Mapping[str, str], kind: str) -> Quota:
    limit_header = headers.get(f"x-ratelimit-limit-{kind}")
    limit = parse_count(limit_header)
    if limit_header is not None and not limit:
        # "-1" or "0": the server tracks no such limit, and whatever it sends
        # as remaining or reset means nothing either.
        return Quota()
    return Quota(
        limit=limit,
        remaining=parse_count(headers.get(f"x-ratelimit-remaining-{kind}")),
        reset_s=parse_duration(headers.get(f"x-ratelimit-reset-{kind}")),
    )


LimitKind = Literal["requests", "tokens"]

# How OpenAI's 429 messages name the limit: "... on requests per min (RPM)"
# or "... on tokens per min (TPM)" ("Requested 1" is not a match).
_NAMES_REQUESTS: Final = re.compile(r"\brequests?\b|\bRP[MD]\b", re.IGNORECASE)
_NAMES_TOKENS: Final = re.compile(r"\btokens?\b|\bTP[MD]\b", re.IGNORECASE)


def exhausted_limit(
    error_type: str | None, message: str | None, headers: Mapping[str, str]
) -> LimitKind | None:
    """Which limit a 429 is about, or None if it does not say.

    OpenAI names it in the error's ``type`` (``"requests"`` or ``"tokens"``)
    and in its message; failing both, the limit whose
    ``x-ratelimit-remaining-*`` header is 0 (and only one of them).
    """
    if error_type in ("requests", "tokens"):
        return error_type  # type: ignore[return-value]
    if message:
        requests, tokens = _NAMES_REQUESTS.search(message), _NAMES_TOKENS.search(message)
        if requests and not tokens:
            return "requests"
        if tokens and not requests:
            return "tokens"
    parsed = RateLimitHeaders.parse(headers)
    requests_empty, tokens_empty = parsed.requests.remaining == 0, parsed.tokens.remaining == 0
    if requests_empty != tokens_empty:
        return "requests" if requests_empty else "tokens"
    return None


# ---------------------------------------------------------------------------
# Buckets.


def _now() -> float:
    return asyncio.get_running_loop().time()


class TokenBucket:
    """A token bucket that can be settled afterwards and re-rated while in use.

    Written here rather than on ``aiolimiter.AsyncLimiter``, which has no way
    to give back part of a reservation, to take a request larger than its
    capacity, or to change its rate while workers wait on it; bending its
    private fields to do all three would be larger than this class.

    ``level`` may go negative: a request larger than the whole bucket goes out
    once the bucket is full and leaves a debt that later requests wait out, so
    the rate holds on average and nothing waits forever. The bucket's clock
    starts when it is first used.
    """

    def __init__(self, rate: float, capacity: float, level: float = 0.0) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"rate and capacity must be > 0, got {rate} and {capacity}")
        self._rate = rate
        self._capacity = capacity
        self._level = min(level, capacity)
        self._updated: float | None = None
        # A lock is first come, first served: a large request is not starved
        # by small ones slipping in ahead of it.
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._open = False

    @property
    def rate(self) -> float:
        """Units per second."""
        return self._rate

    @property
    def capacity(self) -> float:
        return self._capacity

    @property
    def level(self) -> float:
        self._refill()
        return self._level

    def _refill(self) -> None:
        now = _now()
        if self._updated is None:
            self._updated = now
        elif now > self._updated:
            self._level = min(self._capacity, self._level + (now - self._updated) * self._rate)
            self._updated = now

    async def acquire(self, amount: float | Callable[[], float]) -> bool:
        """Wait until ``amount`` units may be spent, then spend them. True if
        it had to wait (the bucket is what holds requests back).

        A callable amount is asked for once this request is first in line:
        an estimate made before queueing would be as old as the queue.
        """
        waited = self._lock.locked()
        async with self._lock:
            if callable(amount):
                amount = amount()
            while True:
                if self._open:
                    return waited
                self._refill()
                need = min(amount, self._capacity)
                # The tolerance absorbs float error after sleeping exactly long enough.
                if self._level >= need - 1e-9:
                    self._level -= amount
                    return waited
                waited = True
                wait = (need - self._level) / self._rate
                if self._updated is not None and self._updated > _now():
                    wait += self._updated - _now()
                wait = max(wait, MIN_SLEEP_S)
                self._changed.clear()
                # Woken early by a settlement or a new rate: they change the wait.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait)

    def settle(self, delta: float) -> None:
        """Give back ``delta`` units (a reservation larger than what the server
        counted), or take more when negative. Capped at the capacity: what a
        bucket charged the true amount would also have lost to the cap."""
        self._refill()
        self._level = min(self._capacity, self._level + delta)
        self._changed.set()

    def hold_until(self, when: float) -> None:
        """Spend nothing and refill nothing until ``when`` (a 429's retry-after):
        the end of a pause must not be a burst of what piled up during it."""
        self._refill()
        self._level = min(self._level, 0.0)
        assert self._updated is not None
        self._updated = max(self._updated, when)

    def open(self) -> None:
        """Stop limiting for good (the limiter stopped pacing by this bucket)."""
        self._open = True
        self._changed.set()

    def reconfigure(self, rate: float, capacity: float) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"rate and capacity must be > 0, got {rate} and {capacity}")
        self._refill()
        self._rate = rate
        self._capacity = capacity
        self._level = min(self._level, capacity)
        self._changed.set()


# ---------------------------------------------------------------------------
# The request limit of a server that does not say.


class _SendLog:
    """When each request was sent, and which of them the server refused: the
    record a 429 is read against. Send times only grow, so a span is found by
    bisection; refusals are kept as the sorted numbers of refused sends."""

    def __init__(self, horizon_s: float = MAX_WINDOW_S, max_sends: int = SEND_LOG_MAX) -> None:
        self.horizon_s = horizon_s
        self.max_sends = max_sends
        # 8 bytes a send: a minute at 1,000 requests/s is under 0.5 MB.
        self._times = array.array("d")
        self._first = 0  # the number of the send at _times[0]
        self.started: float | None = None  # the run's first send
        self._refused: list[int] = []

    @property
    def count(self) -> int:
        """Sends logged so far, trimmed ones included."""
        return self._first + len(self._times)

    def append(self, now: float) -> int:
        """Log a send; its number (counting from 0 for the run's first)."""
        if self.started is None:
            self.started = now
        self._times.append(now)
        self._trim(now)
        return self._first + len(self._times) - 1

    def _trim(self, now: float) -> None:
        times = self._times
        excess = len(times) - self.max_sends
        if excess <= 0 and times[0] > now - self.horizon_s:
            return
        stale = bisect.bisect_right(times, now - self.horizon_s)
        # In batches: dropping the front of an array costs its whole length.
        if excess > 0:
            drop = max(stale, excess + self.max_sends // 8)
        elif stale >= max(1024, len(times) // 8):
            drop = stale
        else:
            return
        del times[:drop]
        self._first += drop
        del self._refused[: bisect.bisect_left(self._refused, self._first)]

    def refuse(self, number: int) -> None:
        if number >= self._first:
            bisect.insort(self._refused, number)

    def _span(self, start: float, end: float) -> tuple[int, int]:
        return bisect.bisect_left(self._times, start), bisect.bisect_right(self._times, end)

    def _refused_in(self, lo: int, hi: int) -> int:
        refused, first = self._refused, self._first
        return bisect.bisect_left(refused, first + hi) - bisect.bisect_left(refused, first + lo)

    def admitted(self, start: float, end: float) -> int:
        """Requests sent in [start, end] and not refused (yet)."""
        lo, hi = self._span(start, end)
        return max(0, hi - lo - self._refused_in(lo, hi))

    def first_admitted_after(self, start: float) -> float | None:
        """When the first request sent after ``start`` and not refused was sent."""
        times, refused, first = self._times, self._refused, self._first
        i = bisect.bisect_right(times, start)
        r = bisect.bisect_left(refused, first + i)
        while i < len(times):
            if r < len(refused) and refused[r] == first + i:
                r += 1
                i += 1
                continue
            return times[i]
        return None

    def last_refused_before(self, end: float) -> float | None:
        """When the last refused request sent before ``end`` was sent."""
        hi = bisect.bisect_left(self._times, end)
        k = bisect.bisect_left(self._refused, self._first + hi) - 1
        return self._times[self._refused[k] - self._first] if k >= 0 else None

    def counts(self, start: float, end: float) -> tuple[int, int]:
        """(sent, refused) among the requests sent in [start, end]."""
        lo, hi = self._span(start, end)
        return hi - lo, self._refused_in(lo, hi)

    def edges(self, start: float, end: float, min_gap: float) -> Iterator[tuple[float, float]]:
        """(send time, gap) of the admitted sends in [start, end] that came at
        least ``min_gap`` after the admitted send before them: those a
        window can have as its oldest. The run's first send has an infinite
        gap; the first one logged after a trim, an unknown one (skipped)."""
        times, refused, first = self._times, self._refused, self._first
        lo, hi = self._span(start, end)
        r = bisect.bisect_left(refused, first + lo)
        previous: float | None = None
        k = r - 1
        for j in range(lo - 1, -1, -1):
            if k >= 0 and refused[k] == first + j:
                k -= 1
                continue
            previous = times[j]
            break
        for i in range(lo, hi):
            if r < len(refused) and refused[r] == first + i:
                r += 1
                continue
            sent = times[i]
            if previous is not None:
                if sent - previous >= min_gap:
                    yield sent, sent - previous
            elif first + i == 0:
                yield sent, math.inf
            previous = sent


class RateEstimate:
    """The request limit of a server that reports none, learned from its 429s.

    Providers count requests in a sliding window of some length ``W`` and
    refuse the one that would make it hold more than ``N``; the retry-after
    of that 429 is the time until the oldest request still counted leaves
    the window. So a 429 at ``t`` with retry-after ``R`` says: capacity frees
    at ``t + R``, and the request that frees it was sent at ``t + R - W``.
    The estimate keeps a log of its send times (``_SendLog``) and reads
    every 429 against it:

    * The window. The request a window drops next has a gap of at least
      ``R`` before it among the admitted ones (the one before it has left
      already), and the run's first request has an infinite one. A 429
      whose ``R`` is a good share of the window (``MIN_FREE_SHARE``: the
      window was filled by a burst) points at the clearest such edge, at a
      run's first 429 nearly always its first request: ``W = t + R - its
      send time``. A 429 from a window full evenly (short ``R``) fits any
      recent gap and says nothing about ``W``. Later, a long ``R`` pointing
      at one window near the learned one refines it.
    * The limit. With ``W`` known, ``N`` is what the log admitted in
      ``[t + R - W, t]``: exactly the limit, however far back a burst was,
      and however long the run paused (a window over-full after the limit
      fell included). The estimate is ``N / W`` per second, paced evenly with
      the limiter's headroom. (A rate measured over a lookback shorter than
      the window is not the limit: it counts a burst, or a pause, as the
      rate.) Before ``W`` is known, a provisional window is read instead.
    * Without a retry-after, the window is learned when a run of 429s ends:
      one request at a time tests it (see ``RateLimiter``), and the first
      admitted was sent about when capacity freed. With ``W`` known, a 429
      without one reads a span a little longer than the window, ending at
      ``t``. Such a run spends its first window on more 429s, and dates the
      window within a few percent rather than exactly.
    * Probing. A 429 only lowers the estimate. Without one, after a hold,
      it grows (see the PROBE_* and CLIMB_* constants): fast back up to the
      highest limit measured before (the ceiling: a storm passed), carefully
      beyond it, so a limit that rose is found again.
    * Noise. 429s that keep coming at the same share after a slow-down are
      not about the rate (a flaky proxy); the estimate stops pacing rather
      than ratchet down, until 429s become clearly more common.

    Two 429s for requests sent before the same cut are one excess, read
    twice: only the first changes the hold or counts for noise.
    """

    def __init__(self) -> None:
        self.per_second: float | None = None
        self.window_s: float | None = None
        # The highest limit measured (or reported) in this run, per second.
        self.ceiling: float | None = None
        self.hold = 1.0  # periods without probing after a cut
        self.climb_hold = 1.0  # periods without climbing after a cut
        self._climbs_failing_since: float | None = None
        self._climbed = False  # climbed towards the ceiling since the latest cut
        self._longest_wait = 0.0
        self._log = _SendLog()
        self._cut_number = -1  # the last send before the latest cut
        self._probe_from = math.inf
        self._probed_at = -math.inf
        self._probing_s = 0.0  # probed beyond the ceiling since the latest cut
        self._resumed_at = -math.inf  # when the latest cut's pause ended
        self._lowered = False  # the latest cut lowered the rate
        self._measured: float | None = None
        self._share = 0.0
        self._noise = 0.0
        # Without retry-after and window: when the current run of 429s began.
        self._refusing_since: float | None = None

    @property
    def refusing(self) -> bool:
        """429s without retry-after are coming, and no window is known yet."""
        return self._refusing_since is not None

    @property
    def period_s(self) -> float:
        """How often probing steps: the window, at least MIN_PROBE_PERIOD_S."""
        return max(self.window_s or 0.0, MIN_PROBE_PERIOD_S)

    def sent(self, now: float) -> int:
        """Log a request as it is sent; its number, for ``rate_limited``."""
        return self._log.append(now)

    def seed(self, per_second: float, ceiling: float, now: float) -> None:
        """Start from a limit the server reported and no longer does; probe
        from there at once (towards ``ceiling``, the highest it reported)."""
        self.per_second = per_second
        self.ceiling = max(self.ceiling or 0.0, ceiling)
        self._probe_from = self._probed_at = now
        self._probing_s = 0.0
        self._noise = 0.0

    def refused(self, number: int) -> None:
        """A 429 that is not about the request rate: logged, nothing learned."""
        self._log.refuse(number)

    def rate_limited(
        self, number: int, now: float, wait: float | None, *, exact: bool = True
    ) -> bool:
        """A 429 for the request numbered ``number``, received at ``now``.
        ``wait`` is its retry-after (None without one); not ``exact`` when
        it is whole seconds rounded up. True if the estimate changed."""
        self._log.refuse(number)
        freed_at: float | None = None
        if wait is not None:
            # A rounded retry-after is half a second out, on average.
            freed_at = now + (wait if exact else max(0.0, wait - 0.5))
            if freed_at - now <= MAX_WINDOW_S:
                self._longest_wait = max(self._longest_wait, freed_at - now)
            self._learn_window(now, freed_at)
        elif self.window_s is None:
            # Nothing to read this 429 against yet: the end of this run of
            # refusals will show when capacity freed (see ``admitted``).
            if self._refusing_since is None:
                self._refusing_since = now
            return False
        measured = self._measure(now, freed_at if exact else None)
        if measured is None:
            return False
        if number <= self._cut_number:
            # Sent before the latest cut: the same excess, read again. It can
            # only correct the limit downwards.
            if self.per_second is not None and measured < self.per_second:
                self.per_second = measured
                return True
            return False
        resume = now + wait if wait is not None else now
        return self._cut(now, measured, exact=wait is not None and exact, resume_at=resume)

    def admitted(self, sent_at: float, now: float) -> bool:
        """An answer to a request sent at ``sent_at``. The first after a run of
        429s without retry-after shows when capacity freed: then the window
        and the limit are learned as a retry-after would have told them."""
        since = self._refusing_since
        if since is None or sent_at <= since:
            return False
        self._refusing_since = None
        # Capacity freed between the last refused send and this one.
        last_refused = self._log.last_refused_before(sent_at)
        freed_at = sent_at if last_refused is None else (last_refused + sent_at) / 2
        if self.window_s is None:
            self._learn_window(since, freed_at)
        window = self.window_s
        if window is None:
            # A window full evenly: read against the provisional one.
            measured = self._measure(now, None)
        else:
            held = self._log.admitted(freed_at - window * (1.0 + EDGE_SLACK), since)
            measured = held / window if held >= MIN_HELD else None
        if measured is None:
            return False
        # Dated to within the spacing of the probes (a few percent, either
        # way) rather than exactly: probing starts at once, not after a hold.
        return self._cut(now, measured, exact=False, resume_at=now, hold=False)

    def wait_hint(self, now: float) -> float | None:
        """How long a 429 without retry-after should pause the run, if the log
        can tell: until the oldest request in a known window leaves it, or,
        while a window is still unknown, a share of the refusals so far, so
        that the moment they end (which dates the window) is seen closely."""
        if self.per_second is None and self._noise:
            return None
        if self.window_s is not None:
            oldest = self._log.first_admitted_after(now - self.window_s)
            if oldest is None:
                return None
            return max(MIN_WAIT_HINT_S, oldest + self.window_s - now)
        if self._refusing_since is not None:
            return max(MIN_WAIT_HINT_S, REFUSAL_PROBE_SHARE * (now - self._refusing_since))
        return None

    def _learn_window(self, now: float, freed_at: float) -> None:
        wait = freed_at - now
        known = self.window_s
        if known is not None and wait < known * MIN_FREE_SHARE:
            return
        best: tuple[float, float] | None = None  # (window, gap)
        near: list[float] = []
        earliest = freed_at - min(MAX_WINDOW_S, wait / MIN_FREE_SHARE)
        for sent, gap in self._log.edges(earliest, now, GAP_TOLERANCE * wait):
            window = freed_at - sent
            if window < MIN_WINDOW_S:
                continue
            if known is None:
                # The clearest edge: the run's first request, or the one after
                # the longest quiet spell.
                if best is None or gap > best[1]:
                    best = (window, gap)
            elif known / WINDOW_TOLERANCE <= window <= known * WINDOW_TOLERANCE:
                near.append(window)
        if known is None:
            if best is not None:
                self.window_s = best[0]
        elif len(near) == 1:
            self.window_s = near[0]

    def _measure(self, now: float, freed_at: float | None) -> float | None:
        """The limit per second, from what the log admitted in the window
        that ends at ``freed_at`` (or at ``now``, without a retry-after);
        None if that is too few requests to tell."""
        end = now if freed_at is None else freed_at
        window = self.window_s
        if window is None:
            # A run younger than the provisional window has not filled it.
            started = self._log.started if self._log.started is not None else now
            window = max(PROVISIONAL_WINDOW_S, self._longest_wait)
            window = min(window, max(MIN_WINDOW_S, end - started))
        if freed_at is None:
            # Without a retry-after, nothing marks where the window begins:
            # read a span a little longer than it and take the rate over it.
            # A window full evenly reads the same over any span; one that
            # began with a burst, which an edge a little off would cut in
            # two, is read whole.
            window *= 1.0 + UNMARKED_EDGE_MARGIN
            held = self._log.admitted(now - window, now)
        else:
            held = self._log.admitted(freed_at - window * (1.0 + EDGE_SLACK), now)
        return held / window if held >= MIN_HELD else None

    def _cut(
        self, now: float, measured: float, *, exact: bool, resume_at: float, hold: bool = True
    ) -> bool:
        """A 429 for a request sent since the latest cut: pace at most at the
        limit ``measured``, unless these 429s are noise."""
        period = self.period_s
        previous = self.per_second
        # The 429s once a window has turned over since the latest cut's pause
        # ended: what that cut bought. (Within the window, a limit that was
        # exceeded still refuses what was sent before the cut.)
        sent, refused = self._log.counts(self._resumed_at + period, now)
        share = refused / sent if sent else 0.0
        if previous is None and self._noise:
            # Not pacing because 429s came whatever the rate: pace again only
            # if they have become clearly more common.
            sent, refused = self._log.counts(now - NOISE_SPAN_PERIODS * period, now)
            if refused < min(2.0 * self._noise, NOISE_SHARE_MAX) * sent:
                return False
        elif self._is_noise(previous, refused, share, measured, exact=exact):
            # The in-flight limit deals with such 429s.
            self.per_second = None
            self._noise = share
            self._lowered = False
            self._share = share
            self._cut_number = self._log.count - 1
            self._resumed_at = max(resume_at, now)
            return True
        rate = measured if previous is None else min(previous, measured)
        self._lowered = previous is None or rate < 0.99 * previous
        self._update_holds(now, measured, previous)
        self.ceiling = max(self.ceiling or 0.0, measured)
        self.per_second = rate
        self._measured = measured
        self._share = share
        self._noise = 0.0
        self._cut_number = self._log.count - 1
        self._resumed_at = max(resume_at, now)
        climbing = rate < CLIMB_BELOW * self.ceiling
        periods = (self.climb_hold if climbing else self.hold) if hold else 0.0
        self._probe_from = self._probed_at = self._resumed_at + periods * period
        self._probing_s = 0.0
        self._climbed = False
        return True

    def _is_noise(
        self, previous: float | None, refused: int, share: float, measured: float, *, exact: bool
    ) -> bool:
        """The latest cut slowed us down, and the server refused as often after
        it as before, and (read against a known window) its limit followed us
        down: not a rate limit."""
        return (
            previous is not None
            and self._lowered
            # One 429 is not a share: a probe that went too far draws one.
            and refused >= 2
            and share >= max(NOISE_SHARE, self._share / 2)
            and (
                self.window_s is None
                or not exact
                or self._measured is None
                or measured < NOISE_DRIFT * self._measured
            )
        )

    def _update_holds(self, now: float, measured: float, previous: float | None) -> None:
        """How long the next probe (or climb) waits after this cut."""
        ceiling = self.ceiling
        if self._climbed:
            # A climb back towards the ceiling that the server stopped.
            self.climb_hold = min(2.0 * self.climb_hold, CLIMB_HOLD_MAX_PERIODS)
            if self._climbs_failing_since is None:
                self._climbs_failing_since = now
            elif now - self._climbs_failing_since > CEILING_MEMORY_PERIODS * self.period_s:
                self.ceiling = measured  # the limit fell for good
                self._climbs_failing_since = None
        elif ceiling is not None and previous is not None and previous < CLIMB_BELOW * ceiling:
            # Still below a limit that fell, and no climb since: the excess of
            # the fall, read again. It tells nothing about probing.
            pass
        else:
            raised = ceiling is None or measured > ceiling * (1.0 + NEW_LIMIT_MARGIN)
            self.hold = 1.0 if raised else min(2.0 * self.hold, HOLD_MAX_PERIODS)
            self.climb_hold = 1.0
            self._climbs_failing_since = None

    def probe(self, now: float) -> bool:
        """Requests are queueing for the estimated rate: raise it if due."""
        rate = self.per_second
        if rate is None or now < self._probe_from:
            return False
        elapsed = now - self._probed_at
        if elapsed < PROBE_INTERVAL_S:
            return False
        period = self.period_s
        # Answers that stopped for a while (nothing left to send, an outage)
        # are no proof that a higher rate would pass.
        elapsed = min(elapsed, period)
        self._probed_at = now
        ceiling = self.ceiling
        if ceiling is not None and rate < CLIMB_UNTIL * ceiling:
            self.per_second = ceiling - (ceiling - rate) * CLIMB_GAP_LEFT ** (elapsed / period)
            self._climbed = True
        else:
            step = min(PROBE_STEP * 2.0 ** (self._probing_s / period), PROBE_STEP_MAX)
            self._probing_s += elapsed
            self.per_second = rate * (1.0 + step * elapsed / period)
        return True


# ---------------------------------------------------------------------------
# The run-wide limiter.


@dataclass(slots=True)
class Permit:
    """One request on its way: what it reserved, to settle it afterwards."""

    sequence: int
    tokens: int
    # Sent while the in-flight limit was full: its answer may raise the limit.
    gate_bound: bool
    # Waited for the request rate: its answer may raise an estimated rate.
    rate_bound: bool
    # Waited for the tokens budget.
    token_bound: bool = False
    # Its number in the estimate's send log, and when it was sent.
    number: int = -1
    sent_at: float = 0.0
    # Sent alone, to test whether a window with no retry-after has room.
    probe: bool = False
    # Requests in flight when it was sent, itself included, and the run's
    # in-flight integral then (see RateLimiter._in_flight_area).
    in_flight: int = 1
    area: float = 0.0
    # Cut for silence and taken for stuck, not queued (see QueueClock.done).
    stuck: bool = False
    # Sent while no other request of the run was in flight (nor the ghost of
    # one abandoned): nothing of ours was ahead of it in the server's queue.
    alone: bool = False


@dataclass
class LimiterStats:
    """What the limiter did: 429s seen, in-flight limit cuts, time paused."""

    rate_limited: int = 0
    decreases: int = 0
    paused_s: float = 0.0
    # Requests that timed out queued behind the run's own (see ``saturated``).
    saturated: int = 0


class RateLimiter:
    """Requests/min and tokens/min budgets, the adaptive in-flight limit and
    the run-wide pause, for every worker of a run.

    ``rpm`` and ``tpm`` are ceilings the user set. ``adaptive`` (the default)
    also learns: the limits a server reports in ``x-ratelimit-*`` headers
    (the lower of configured and reported wins), the request rate of a server
    that reports none (``RateEstimate``), and the in-flight limit by AIMD
    between 1 and ``concurrency``. With ``adaptive=False`` the configured
    figures are used as they are and only retry-after is honoured.

    Use::

        async with limiter.request(tokens) as permit:
            ...send...
            limiter.succeeded(permit, used_tokens, headers)   # or
            limiter.rate_limited(permit, pause_s, headers)
    """

    def __init__(
        self,
        rpm: int | None = None,
        tpm: int | None = None,
        *,
        concurrency: int = 32,
        adaptive: bool = True,
        start_concurrency: float | None = None,
        latency: bool = False,
        start_at_ceiling: bool = False,
    ) -> None:
        self.configured_rpm = rpm
        self.configured_tpm = tpm
        self.adaptive = adaptive
        self.learned_rpm: int | None = None
        self.learned_tpm: int | None = None
        self.estimate = RateEstimate()
        if start_concurrency is None and (start_at_ceiling or (latency and adaptive)):
            # The latency limit does the ramp (or none is wanted): AIMD only
            # answers 429s, from where the run is.
            start_concurrency = concurrency
        self.gate = ConcurrencyGate(concurrency, start_concurrency, adaptive=adaptive)
        self.latency = (
            LatencyLimit(self.gate, start_at_ceiling=start_at_ceiling)
            if latency and adaptive
            else None
        )
        self.queue = QueueClock()
        # The integral of requests in flight over time: between a request's
        # send and its answer, its growth over the latency is the mean number
        # in flight meanwhile (what Little's law wants; the number at the
        # send is low for requests sent in a burst).
        self._area = 0.0
        self._area_at = _now()
        # When the server should be done with the last request abandoned in
        # its queue (see saturated).
        self._ghosts_until = -math.inf
        # When the latest answers came: the server's pace.
        self._answered_at: collections.deque[float] = collections.deque(maxlen=32)
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.stats = LimiterStats()
        self.token_share = RATE_HEADROOM
        self._token_cut_at = 0
        self._token_429s = 0  # since the last cut
        self._token_cut_time = -math.inf
        self._token_probed_at: float | None = None
        self._sending = 0
        self._paused_until = 0.0
        self._probe_out = False
        self._probe_waiters: collections.deque[asyncio.Future[bool]] = collections.deque()
        # When the server last reported a requests limit, and the highest.
        self._reported_at = -math.inf
        self._reported_rpm_max = 0
        self._pace_requests(level=1.0)
        self._pace_tokens()

    @property
    def rpm(self) -> int | None:
        """The requests/min limit known: the lower of configured and reported."""
        return _lower(self.configured_rpm, self.learned_rpm)

    @property
    def tpm(self) -> int | None:
        return _lower(self.configured_tpm, self.learned_tpm)

    @property
    def estimated_rpm(self) -> float | None:
        """The requests/min learned from 429s, for a server that reports none."""
        rate = self.estimate.per_second
        return None if rate is None else rate * 60.0

    def _estimate_in_use(self) -> bool:
        return self.adaptive and self.learned_rpm is None and self.estimate.per_second is not None

    def _pace_requests(self, level: float = 0.0) -> None:
        """(Re)rate the request bucket from what is known. ``level`` is where a
        new bucket starts: one request may go at once at the start of a run,
        none when it is learned mid-run with requests already in flight."""
        per_minute: float | None = self.rpm
        if self._estimate_in_use():
            per_minute = _lower_f(per_minute, self.estimated_rpm)
        if per_minute is None:
            if self.requests is not None:
                # No longer paced: let anyone waiting on the old rate go.
                self.requests.open()
                self.requests = None
            return
        rate = per_minute * RATE_HEADROOM / 60.0
        capacity = max(1.0, rate * REQUEST_BURST_S)
        if self.requests is None:
            self.requests = TokenBucket(rate, capacity, level)
        else:
            self.requests.reconfigure(rate, capacity)

    def _pace_tokens(self) -> None:
        per_minute = self.tpm
        if per_minute is None:
            return
        rate = per_minute * self.token_share / 60.0
        capacity = max(1.0, rate * TOKEN_BURST_S)
        if self.tokens is None:
            # Empty at first: the budget ramps up instead of firing at t=0.
            self.tokens = TokenBucket(rate, capacity, 0.0)
        else:
            self.tokens.reconfigure(rate, capacity)

    @contextlib.asynccontextmanager
    async def request(self, tokens: int | Callable[[], int]) -> AsyncIterator[Permit]:
        """Hold a place for one request of about ``tokens`` tokens (prompt plus
        the completion budget) for as long as the request runs.

        Pass a callable when the estimate improves as answers come in: it is
        asked when the request reaches the tokens budget, not before it
        queues (at the start of a run, every worker queues at once, before a
        single answer has shown what requests cost).
        """
        permit = await self.acquire(tokens)
        try:
            yield permit
        finally:
            self.release(permit)

    async def acquire(self, tokens: int | Callable[[], int]) -> Permit:
        """``request`` without the context: the permit is held until
        ``release`` (the cluster limiter holds a leased request's permit
        until its worker reports the answer)."""
        return await self._acquire(tokens)

    def release(self, permit: Permit) -> None:
        """The request of ``permit`` is over (answered, refused or given up)."""
        self._in_flight_area()
        self._sending -= 1
        self.queue.done(permit.sequence, _now(), stuck=permit.stuck)
        self.gate.release()
        if permit.probe:
            self._release_probe()

    async def _acquire(self, tokens: int | Callable[[], int]) -> Permit:
        # Before the buckets: when the probing ends, those who waited for it
        # are paced by what it learned.
        probe = await self._one_probe_at_a_time()
        try:
            await self._wait_out_pause()
            # The gate first: workers queue for a slot and then, holding it,
            # for the buckets, so a slot that frees up is not a burst of saved
            # tokens.
            await self.gate.acquire()
        except BaseException:
            if probe:
                self._release_probe()
            raise
        try:
            rate_bound = token_bound = False
            reserved = 0

            def reserve() -> float:
                nonlocal reserved
                reserved = tokens() if callable(tokens) else tokens
                return reserved

            if self.requests is not None:
                rate_bound = await self.requests.acquire(1)
            if self.tokens is not None:
                token_bound = await self.tokens.acquire(reserve)
            else:
                reserve()
            # Buckets honour a pause themselves; this covers a run without any.
            await self._wait_out_pause()
        except BaseException:
            self.gate.release(sent=False)
            if probe:
                self._release_probe()
            raise
        self._in_flight_area()
        self._sending += 1
        now = _now()
        permit = Permit(
            sequence=self.gate.sent(),
            tokens=reserved,
            gate_bound=self._sending >= self.gate.slots,
            rate_bound=rate_bound,
            token_bound=token_bound,
            number=self.estimate.sent(now),
            sent_at=now,
            probe=probe,
            in_flight=self._sending,
            area=self._area,
            alone=self._sending == 1 and now >= self._ghosts_until,
        )
        self.queue.sent(permit.sequence, now)
        if self.latency is not None:
            self.latency.sent(permit.sequence, alone=permit.alone)
        return permit

    async def _one_probe_at_a_time(self) -> bool:
        """While 429s without retry-after come and no window is known yet, one
        request at a time tests whether the window has room again; the others
        wait for its answer rather than each spend a quarter attempt on a 429
        (as the outage gate probes a server that is down). The role passes to
        the longest waiter, so no one row takes every 429. True for the probe."""
        while self._probing():
            if not self._probe_out:
                self._probe_out = True
                return True
            waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._probe_waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.result():
                    self._release_probe()  # handed the role as it was cancelled: pass it on
                elif waiter in self._probe_waiters:
                    self._probe_waiters.remove(waiter)
                raise
            if handed:
                if self._probing():
                    return True
                self._release_probe()
        return False

    def _probing(self) -> bool:
        return self.adaptive and self.estimate.refusing

    def _release_probe(self) -> None:
        """The probe has its answer: while refusals go on, the longest waiter
        probes next; else every waiter goes."""
        while self._probe_waiters:
            waiter = self._probe_waiters.popleft()
            if waiter.done():
                continue
            if self._probing():
                waiter.set_result(True)
                return
            waiter.set_result(False)
        self._probe_out = False

    def succeeded(
        self,
        permit: Permit,
        used_tokens: int | None,
        headers: Mapping[str, str],
        *,
        server_s: float | None = None,
        generation_s: float | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """An answer: settle the token reservation and learn from the headers
        and the latency (``server_s``: the server's own time, if it said;
        ``generation_s``: a stream's first token to its last)."""
        if self.tokens is not None and used_tokens is not None:
            self.tokens.settle(permit.tokens - used_tokens)
        self.learn(headers)
        if not self.adaptive:
            return
        now = _now()
        if self.latency is not None:
            self._answered_at.append(now)
            latency = now - permit.sent_at
            mean = (self._in_flight_area() - permit.area) / latency if latency > 0 else 0.0
            self.latency.observe(
                permit.sequence,
                Sample(
                    latency,
                    max(mean, permit.in_flight),
                    server_s,
                    alone=permit.alone,
                    generation_s=generation_s,
                    completion_tokens=completion_tokens,
                ),
            )
        if permit.gate_bound:
            self.gate.increase()
        changed = self.learned_rpm is None and self.estimate.admitted(permit.sent_at, now)
        if permit.rate_bound and self._estimate_in_use() and self.estimate.probe(now):
            changed = True
        if changed:
            self._pace_requests()
        self._probe_token_share(now)

    def _probe_token_share(self, now: float) -> None:
        if self.tokens is None or self.token_share >= RATE_HEADROOM:
            self._token_probed_at = now
            return
        if self._token_probed_at is None:
            self._token_probed_at = now
        elapsed = now - self._token_probed_at
        # Re-rating wakes every waiter: a few times a second is plenty.
        if elapsed < 0.25:
            return
        self._token_probed_at = now
        self.token_share = min(RATE_HEADROOM, self.token_share + TOKEN_SHARE_PROBE_PER_S * elapsed)
        self._pace_tokens()

    def _cut_token_share(self, sequence: int) -> None:
        # The 429s of requests sent before the last cut, or within a window
        # of it, were decided by the old rate: they do not count.
        now = _now()
        if sequence <= self._token_cut_at or now < self._token_cut_time + TOKEN_SHARE_CUT_SPACING_S:
            return
        self._token_429s += 1
        sent = self.gate.sent_count - self._token_cut_at
        # Two at least: one 429 is not a share.
        if self._token_429s < 2 or self._token_429s < TOKEN_429_SHARE_TOLERATED * sent:
            return
        self._token_429s = 0
        self._token_cut_at = self.gate.sent_count
        self._token_cut_time = now
        self.token_share = max(TOKEN_SHARE_FLOOR, self.token_share * TOKEN_SHARE_CUT)
        self._token_probed_at = now
        self._pace_tokens()

    def rate_limited(
        self,
        permit: Permit,
        pause_s: float,
        headers: Mapping[str, str],
        limit: LimitKind | None = None,
        *,
        retry_after: bool = True,
    ) -> None:
        """A 429: the server counted nothing, so the reservation comes back;
        everyone waits ``pause_s``; the in-flight limit comes down, and
        without a reported limit the request limit is re-measured.

        ``limit`` is the limit the 429 names (``exhausted_limit``), if any.
        ``retry_after``: ``pause_s`` is the server's retry-after (what the
        window needs), not a backoff chosen without one.
        """
        self.stats.rate_limited += 1
        if self.tokens is not None:
            self.tokens.settle(permit.tokens)
        self.learn(headers)
        # A tokens 429 is the token bucket's to answer once a tokens limit is
        # known: measuring a request rate from it would pace requests by how
        # long this job's prompts happen to be, and hold the token budget back.
        paced_by_tokens = limit == "tokens" and self.tpm is not None
        if self.adaptive:
            # Read even while a reported limit paces the run: the window it
            # shows is known if the server stops reporting.
            if paced_by_tokens:
                self.estimate.refused(permit.number)
            elif (
                self.estimate.rate_limited(
                    permit.number,
                    _now(),
                    pause_s if retry_after else None,
                    exact=not _whole_seconds(headers),
                )
                and self.learned_rpm is None
            ):
                self._pace_requests()
        # Only the limit that was holding this request back comes down: a
        # request that waited for a rate was sent as fast as that rate
        # allows, so its 429 is the rate's to answer, and cutting an in-flight
        # limit that was not reached would change nothing now and slow the
        # run later.
        held_by_a_rate = permit.rate_bound or permit.token_bound or paced_by_tokens
        if permit.gate_bound and not held_by_a_rate and self.gate.decrease(permit.sequence):
            self.stats.decreases += 1
        if paced_by_tokens and self.adaptive:
            self._cut_token_share(permit.sequence)
        if self.adaptive and not retry_after:
            hint = self.estimate.wait_hint(_now())
            if hint is not None:
                pause_s = min(pause_s, hint)
        self.pause_for(pause_s)

    def _in_flight_area(self) -> float:
        now = _now()
        self._area += self._sending * (now - self._area_at)
        self._area_at = now
        return self._area

    def behind_s(self, permit: Permit) -> float:
        """Seconds this request has waited behind the run's own earlier
        requests (in the server's queue, as far as the client can tell)."""
        return self.queue.behind_s(permit.sequence, _now())

    def head_s(self, permit: Permit) -> float:
        """Seconds this request has been the oldest of the run's in flight
        with others behind it, while the server answered none of them."""
        return self.queue.head_s(permit.sequence, _now())

    def saturated(self, permit: Permit) -> None:
        """The request timed out queued behind the run's own requests: the
        server has more than it computes at once. The in-flight cap comes
        down; and since the server still computes what was abandoned, a
        place stays taken (a ghost) until it should be done with it, so that
        no retry queues behind its own ghost: the requests ahead of it, and
        the ghosts before it, each take one answer's time over the server's
        capacity."""
        self.stats.saturated += 1
        latency = self.latency
        if latency is None:
            return
        now = _now()
        service_s = latency.service_s()
        answers = self._answered_at
        capacity = None
        if service_s and len(answers) >= 2 and answers[-1] > answers[0]:
            capacity = max(1.0, (len(answers) - 1) / (answers[-1] - answers[0]) * service_s)
        latency.saturated(permit.in_flight, capacity)
        if not service_s:
            return
        per_s = service_s / max(1.0, latency.capacity or float(self.gate.slots))
        ahead = self.queue.ahead(permit.sequence)
        until = max(now + (ahead + 1) * per_s, self._ghosts_until + per_s)
        self._ghosts_until = until
        self.gate.in_flight += 1
        asyncio.get_running_loop().call_at(until, self.gate.release)

    def learn(self, headers: Mapping[str, str]) -> None:
        """Take the limits a server reports in its ``x-ratelimit-*`` headers.

        With a limit known, ``remaining`` is not used to hold the buckets
        back: pacing just below the limit keeps a sliding window nearly full,
        so "0 remaining" is the normal state, and the answer that says so is
        a latency old. A 429 (someone else spending the same budget) pauses
        the run instead.
        """
        if not self.adaptive:
            return
        parsed = RateLimitHeaders.parse(headers) if headers else RateLimitHeaders()
        requests, tokens = parsed.requests, parsed.tokens
        now = _now()
        if requests.limit is not None:
            self._reported_at = now
            self._reported_rpm_max = max(self._reported_rpm_max, requests.limit)
            if requests.limit != self.learned_rpm:
                self.learned_rpm = requests.limit
                self._pace_requests()
        else:
            if self.learned_rpm is not None and now - self._reported_at > STALE_REPORT_S:
                self._forget_reported_rpm(now)
            self._pause_on_empty(requests)
        if tokens.limit is not None:
            if tokens.limit != self.learned_tpm:
                self.learned_tpm = tokens.limit
                self._pace_tokens()
        else:
            self._pause_on_empty(tokens)

    def _forget_reported_rpm(self, now: float) -> None:
        # The server stopped reporting its limit (a proxy in front of it
        # changed, a storm ended): the last figure it sent may be one it
        # lowered for a while. The estimate takes over from it and probes
        # back up towards the highest limit it reported.
        assert self.learned_rpm is not None
        self.estimate.seed(self.learned_rpm / 60.0, self._reported_rpm_max / 60.0, now)
        self.learned_rpm = None
        self._pace_requests()

    def _pause_on_empty(self, quota: Quota) -> None:
        # No limit to pace by, but the server says nothing is left until the
        # reset: believe it rather than collect a 429 per worker.
        if quota.remaining == 0 and quota.reset_s:
            self.pause_for(quota.reset_s)

    def pause_for(self, seconds: float) -> None:
        """Hold every new request for ``seconds``, however long (a 429's
        retry-after is a pause, never a reason to fail a row)."""
        if seconds <= 0:
            return
        now = _now()
        until = now + seconds
        if until <= self._paused_until:
            return
        self.stats.paused_s += until - max(now, self._paused_until)
        self._paused_until = until
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.hold_until(until)

    async def _wait_out_pause(self) -> None:
        # Re-checked after each sleep: another 429 may have extended the pause.
        while (remaining := self._paused_until - _now()) > 0:  # noqa: ASYNC110
            # At least a clock tick: a remainder below the clock's resolution
            # would sleep zero and spin.
            await asyncio.sleep(max(remaining, MIN_SLEEP_S))


def _whole_seconds(headers: Mapping[str, str]) -> bool:
    """A retry-after in whole seconds only (no ``retry-after-ms``): rounded,
    so up to a second longer than what the window needs."""
    if not headers:
        return False
    lowered = _lowered(headers)
    if "retry-after-ms" in lowered:
        return False
    value = lowered.get("retry-after")
    if value is None:
        return False
    try:
        return float(value.strip()).is_integer()
    except ValueError:
        return False


def _lower(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _lower_f(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
