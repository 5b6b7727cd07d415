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
* ``RateEstimate`` learns the request rate of a server that reports no limit,
  from what it admits while it answers 429.
* ``ConcurrencyGate`` bounds the requests in flight and moves that bound by
  AIMD: additive increase while the bound holds requests back, multiplicative
  decrease on a 429. It backs off from servers that limit concurrent
  requests, and shrugs off 429s that have nothing to do with our rate.
* The pause: a 429's retry-after holds every new request, however long it is,
  and empties the buckets so that the end of a pause is not a burst.

Time is the event loop's clock (``loop.time()``), so the tests run all of it
on a fake clock (the ``looptime`` plugin) without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "RATE_HEADROOM",
    "ConcurrencyGate",
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

# AIMD on the in-flight limit. Low enough a start for any provider tier; it
# doubles every round trip (slow start) until the first 429, then grows by one
# request per round trip.
START_CONCURRENCY: Final = 8
DECREASE_FACTOR: Final = 0.8

# Learning the request rate from 429s (see RateEstimate): how far back a
# measurement looks, the shortest it may be and the fewest requests it may
# count, how fast the estimate probes
# upwards (per second, speeding up by one more step every PROBE_SPEEDUP_S
# without a 429), and the share of 429s that persisting after a slow-down
# marks them as noise.
ESTIMATE_WINDOW_S: Final = 3.0
MIN_ESTIMATE_SPAN_S: Final = 0.5
MIN_ESTIMATE_REQUESTS: Final = 10
PROBE_PER_S: Final = 0.02
PROBE_SPEEDUP_S: Final = 10.0
NOISE_SHARE: Final = 0.03


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
# The adaptive in-flight limit.


class ConcurrencyGate:
    """At most ``floor(limit)`` holders at once; ``limit`` moves by AIMD
    between 1 and ``ceiling``.

    A 429 cuts the limit once per round trip, not once per 429: the answers to
    requests sent before the cut were decided by the old limit. Sequence
    numbers tell them apart, so the gate needs no clock.
    """

    def __init__(
        self,
        ceiling: int,
        start: float | None = None,
        *,
        adaptive: bool = True,
        decrease_factor: float = DECREASE_FACTOR,
    ) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling}")
        self.ceiling = ceiling
        self.adaptive = adaptive
        initial = min(ceiling, START_CONCURRENCY) if start is None else start
        self.limit = float(max(1.0, min(ceiling, initial))) if adaptive else float(ceiling)
        self.decrease_factor = decrease_factor
        self.slow_start = adaptive
        self.in_flight = 0
        self._sent = 0
        self._cut_at = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def slots(self) -> int:
        return max(1, math.floor(self.limit + 1e-9))

    async def acquire(self) -> None:
        if self.in_flight < self.slots and not self._waiters:
            self.in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Granted a slot just as it was cancelled: hand the slot on.
                self.release()
            elif waiter in self._waiters:
                # (A cancelled waiter may already have been skipped by _wake.)
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.slots:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def sent(self) -> int:
        """Number a request as it is sent (for ``decrease``)."""
        self._sent += 1
        return self._sent

    @property
    def sent_count(self) -> int:
        """The number of the latest request sent."""
        return self._sent

    def increase(self) -> None:
        """An answer to a request sent while the limit was what held requests
        back: one more slot per answer in slow start (doubling per round
        trip), else one per round trip."""
        if not self.adaptive:
            return
        step = 1.0 if self.slow_start else 1.0 / self.limit
        self.limit = min(float(self.ceiling), self.limit + step)
        self._wake()

    def decrease(self, sequence: int) -> bool:
        """A 429 for the request numbered ``sequence``; True if it cut the limit."""
        if not self.adaptive or sequence <= self._cut_at:
            return False
        self.slow_start = False
        self.limit = max(1.0, self.limit * self.decrease_factor)
        self._cut_at = self._sent
        return True


# ---------------------------------------------------------------------------
# The request rate of a server that does not say.


class RateEstimate:
    """The request rate a server allows, learned from 429s when it reports no
    limit in headers.

    A 429 means the server's window is full; while it stays full, what the
    server admits per second *is* its limit, whatever we send. So on a 429 the
    estimate becomes the rate of admitted requests (sent and not answered
    429) over the last ``window_s`` (less while the run is younger). Counting
    at send time, not answer time, matters: answers lag by the latency, and a
    lagging count under-estimates, which nothing corrects quickly; an early
    over-estimate is corrected by the next 429s. It is re-measured at most
    once per measuring span, so one burst of 429s is one measurement. While
    requests queue for the estimated rate, it grows by ``probe_per_s`` a
    second, to find a limit that was under-estimated or has been raised.

    This is what paces a server whose answers are faster than its limit: an
    in-flight limit of one is still too fast for 20 requests a second at 5 ms
    each, and an in-flight limit moves in steps too coarse for a few requests
    per latency.
    """

    def __init__(
        self, window_s: float = ESTIMATE_WINDOW_S, probe_per_s: float = PROBE_PER_S
    ) -> None:
        self.window_s = window_s
        self.probe_per_s = probe_per_s
        self.per_second: float | None = None
        self._started: float | None = None
        self._sent: collections.deque[float] = collections.deque()
        self._refused: collections.deque[float] = collections.deque()
        self._measured = 0.0
        self._measured_at = 0.0
        self._span = 0.0
        self._probed_at = 0.0
        self._probe_after = 0.0
        self._share = 0.0
        self._lowered = False
        self._noise = 0.0

    def sent(self, now: float) -> None:
        if self._started is None:
            self._started = now
        self._sent.append(now)
        self._forget(now)

    def _forget(self, now: float) -> None:
        horizon = now - self.window_s
        for log in (self._sent, self._refused):
            while log and log[0] <= horizon:
                log.popleft()

    def rate_limited(self, now: float) -> bool:
        """A 429: re-measure if due. True if the estimate changed."""
        self._refused.append(now)
        self._forget(now)
        if self._started is None:
            return False
        if self.per_second is not None and now - self._measured_at < self._span:
            # Too soon to measure again, but the probe has gone too far: back
            # to the last measurement, and no probing until the next one.
            self._probe_after = self._measured_at + self._span
            if self.per_second > self._measured:
                self.per_second = self._measured
                return True
            return False
        # A floor on the span: the first few requests of a run say little.
        span = min(self.window_s, max(now - self._started, MIN_ESTIMATE_SPAN_S))
        horizon = now - span
        sent = sum(1 for stamp in self._sent if stamp > horizon)
        if sent < MIN_ESTIMATE_REQUESTS:
            return False
        refused = sum(1 for stamp in self._refused if stamp > horizon)
        share = refused / sent
        admitted = max(sent - refused, 1) / span
        # Only a measurement over a full span can be blamed: a shorter one,
        # early in the run, still counts the burst a fresh window lets through.
        lowered = self._lowered and self._span >= self.window_s
        self._lowered = False
        if lowered and share >= max(NOISE_SHARE, self._share / 2):
            # The last measurement slowed us down and the server refuses as
            # often as before: these 429s are not about our rate (a flaky
            # proxy, a concurrency limit), and pacing by them would ratchet
            # the rate down for nothing. The in-flight limit deals with them;
            # the rate is paced again only if 429s become clearly more common.
            self.per_second = None
            self._noise = share
        elif self.per_second is not None or share >= 2 * self._noise:
            self._lowered = self.per_second is None or admitted < self.per_second
            self.per_second = self._measured = admitted
        self._share = share
        self._measured_at = self._probed_at = now
        self._span = span
        return True

    def probe(self, now: float) -> bool:
        """Requests are queueing for the estimated rate: raise it a little."""
        if self.per_second is None or now < self._probe_after:
            return False
        elapsed = min(now - max(self._probed_at, self._probe_after), 1.0)
        self._probed_at = now
        if elapsed <= 0:
            return False
        # Faster the longer no 429 has come: an estimate taken while a long
        # server window was still releasing an early burst can be far too
        # low, and a fixed 2%/s would take minutes to climb back.
        quiet = max(0.0, now - self._measured_at)
        speedup = 1.0 + quiet / PROBE_SPEEDUP_S
        self.per_second *= 1.0 + self.probe_per_s * speedup * elapsed
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


@dataclass
class LimiterStats:
    """What the limiter did: 429s seen, in-flight limit cuts, time paused."""

    rate_limited: int = 0
    decreases: int = 0
    paused_s: float = 0.0


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
    ) -> None:
        self.configured_rpm = rpm
        self.configured_tpm = tpm
        self.adaptive = adaptive
        self.learned_rpm: int | None = None
        self.learned_tpm: int | None = None
        self.estimate = RateEstimate()
        self.gate = ConcurrencyGate(concurrency, start_concurrency, adaptive=adaptive)
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
        permit = await self._acquire(tokens)
        try:
            yield permit
        finally:
            self._sending -= 1
            self.gate.release()

    async def _acquire(self, tokens: int | Callable[[], int]) -> Permit:
        await self._wait_out_pause()
        # The gate first: workers queue for a slot and then, holding it, for
        # the buckets, so a slot that frees up is not a burst of saved tokens.
        await self.gate.acquire()
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
            self.gate.release()
            raise
        self._sending += 1
        self.estimate.sent(_now())
        return Permit(
            sequence=self.gate.sent(),
            tokens=reserved,
            gate_bound=self._sending >= self.gate.slots,
            rate_bound=rate_bound,
            token_bound=token_bound,
        )

    def succeeded(
        self, permit: Permit, used_tokens: int | None, headers: Mapping[str, str]
    ) -> None:
        """An answer: settle the token reservation and learn from the headers."""
        if self.tokens is not None and used_tokens is not None:
            self.tokens.settle(permit.tokens - used_tokens)
        self.learn(headers)
        if not self.adaptive:
            return
        now = _now()
        if permit.gate_bound:
            self.gate.increase()
        if permit.rate_bound and self._estimate_in_use() and self.estimate.probe(now):
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
    ) -> None:
        """A 429: the server counted nothing, so the reservation comes back;
        everyone waits ``pause_s``; the in-flight limit comes down, and
        without a reported limit the request rate is re-measured.

        ``limit`` is the limit the 429 names (``exhausted_limit``), if any.
        """
        self.stats.rate_limited += 1
        if self.tokens is not None:
            self.tokens.settle(permit.tokens)
        self.learn(headers)
        # A tokens 429 is the token bucket's to answer once a tokens limit is
        # known: measuring a request rate from it would pace requests by how
        # long this job's prompts happen to be, and hold the token budget back.
        paced_by_tokens = limit == "tokens" and self.tpm is not None
        if (
            self.adaptive
            and self.learned_rpm is None
            and not paced_by_tokens
            and self.estimate.rate_limited(_now())
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
        self.pause_for(pause_s)

    def learn(self, headers: Mapping[str, str]) -> None:
        """Take the limits a server reports in its ``x-ratelimit-*`` headers.

        With a limit known, ``remaining`` is not used to hold the buckets
        back: pacing just below the limit keeps a sliding window nearly full,
        so "0 remaining" is the normal state, and the answer that says so is
        a latency old. A 429 (someone else spending the same budget) pauses
        the run instead.
        """
        if not self.adaptive or not headers:
            return
        parsed = RateLimitHeaders.parse(headers)
        requests, tokens = parsed.requests, parsed.tokens
        if requests.limit is not None:
            if requests.limit != self.learned_rpm:
                self.learned_rpm = requests.limit
                self._pace_requests()
        else:
            self._pause_on_empty(requests)
        if tokens.limit is not None:
            if tokens.limit != self.learned_tpm:
                self.learned_tpm = tokens.limit
                self._pace_tokens()
        else:
            self._pause_on_empty(tokens)

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
