"""One rate limit for many processes: a ledger that owns the budgets, and
worker-side limiters that lease from it in small blocks.

The provider's limit is shared by every worker of a cluster, so one
``LimitLedger`` (inside a Ray actor on that engine; plain Python here, so
it is tested without a cluster) holds the run's real ``RateLimiter``: the
request and token buckets, the limits learned from ``x-ratelimit-*``
headers, the ``RateEstimate`` of a server that reports none, and the pause
after a 429. Every worker runs the same ``CallStage`` as on one machine,
with a ``LeasedLimiter``: its own in-flight gate and latency limit (adaptive
concurrency per worker), but its request budget is leased from the ledger.

The protocol is one call, ``exchange(reports, want, tokens_each)``:

* a worker asks for ``want`` requests when it has none left; the ledger
  grants at most ``LEASE_BLOCK_S`` of the cluster's rate at once, so a worker
  never sits on budget others could use, and the ledger is off the hot path
  (one call per block, not per request);
* the same call carries what became of earlier leased requests (answered
  with their usage and headers, refused with a 429, unused): the ledger
  settles tokens, learns limits and the estimate from every worker's
  answers, and a 429's pause holds every later grant;
* each reply says how long the cluster is paused, and a worker flushes its
  reports at least every ``FLUSH_S`` (a 429 at once), so a pause reaches
  every worker within that time; at most the block a worker holds can go
  out during a pause another worker started.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from pipeline.ratelimit import LimitKind, Permit, RateLimiter, TokenBucket

__all__ = [
    "FLUSH_S",
    "LEASE_BLOCK_S",
    "Answered",
    "Grant",
    "LeaseSource",
    "LeasedLimiter",
    "LedgerSnapshot",
    "LimitLedger",
    "Refused",
    "Report",
    "Unused",
]

# A grant holds at most this long of the cluster's request rate: small enough
# that a pause reaches the requests already leased within a few of them, and
# that a slow worker does not hoard budget; large enough that a worker calls
# the ledger a few times a second, not once a request.
LEASE_BLOCK_S: Final = 0.05
# How often a worker sends what became of its leased requests (and hears of a
# pause another worker's 429 started). A 429 is sent at once.
FLUSH_S: Final = 0.1
# Reports at most this large are sent without waiting for the next flush.
FLUSH_REPORTS: Final = 64
# A leased request never reported (its worker died) is released after this:
# the ledger's in-flight count and a probe must not wait for it forever.
UNREPORTED_TTL_S: Final = 120.0
# The ledger's own in-flight bound: the workers' gates bound what is in flight.
LEDGER_CONCURRENCY: Final = 1_000_000
# The headers the ledger learns from; the rest stay in the worker.
_LIMIT_HEADERS: Final = ("x-ratelimit", "retry-after")


@dataclass(frozen=True, slots=True)
class Answered:
    number: int
    used_tokens: int | None
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Refused:
    number: int
    pause_s: float
    headers: dict[str, str]
    limit: LimitKind | None
    retry_after: bool


@dataclass(frozen=True, slots=True)
class Unused:
    number: int


Report = Answered | Refused | Unused


@dataclass(frozen=True, slots=True)
class Grant:
    numbers: tuple[int, ...]
    """The ledger's send numbers of the requests leased (possibly none)."""
    pause_s: float
    """How long the cluster is paused from now (0: not paused)."""
    epoch: int = 0
    """Bumped when the ledger cuts its rate or pauses: numbers granted
    before then are not to be sent."""


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """What the cluster's limiter settled on, for the run report."""

    learned_rpm: int | None
    learned_tpm: int | None
    estimated_rpm: float | None
    paused_s: float
    rate_limited: int
    grants: int


class LeaseSource(Protocol):
    """Where a worker leases from: the ledger itself, or a Ray actor holding it."""

    async def exchange(self, reports: Sequence[Report], want: int, tokens_each: int) -> Grant: ...


def limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a limit is learned from (the rest would only cost bytes)."""
    return {k: v for k, v in headers.items() if k.lower().startswith(_LIMIT_HEADERS)}


class LimitLedger:
    """The cluster's budgets: a real ``RateLimiter`` whose permits are leased
    to workers and held until they report what became of each request."""

    def __init__(self, rpm: int | None, tpm: int | None, *, adaptive: bool = True) -> None:
        self.limiter = RateLimiter(
            rpm, tpm, concurrency=LEDGER_CONCURRENCY, adaptive=adaptive, start_at_ceiling=True
        )
        self._held: dict[int, tuple[Permit, float]] = {}
        self._swept_at = -math.inf
        self.grants = 0
        self.epoch = 0
        self._pace = self._current_pace()

    def _current_pace(self) -> tuple[float, float]:
        requests = self.limiter.requests
        return (requests.rate if requests is not None else math.inf, self.limiter._paused_until)

    def _new_epoch(self) -> None:
        """A slower rate or a new pause voids what workers hold; a faster
        rate (probing up) does not."""
        rate, paused_until = pace = self._current_pace()
        if rate < self._pace[0] or paused_until > self._pace[1]:
            self.epoch += 1
        self._pace = pace

    async def exchange(self, reports: Sequence[Report], want: int, tokens_each: int) -> Grant:
        """Settle ``reports``, then lease up to ``want`` requests of about
        ``tokens_each`` tokens each (waiting for the budget and any pause)."""
        self.settle(reports)
        self._new_epoch()
        numbers = []
        for _ in range(self._block(want, tokens_each)):
            permit = await self.limiter.acquire(tokens_each)
            self._held[permit.number] = (permit, _now())
            numbers.append(permit.number)
        if numbers:
            self.grants += 1
        self._new_epoch()
        return Grant(tuple(numbers), self.pause_s(), self.epoch)

    def _block(self, want: int, tokens_each: int) -> int:
        block = max(0, want)
        requests, tokens = self.limiter.requests, self.limiter.tokens
        if requests is not None:
            block = min(block, max(1, int(requests.rate * LEASE_BLOCK_S)))
        if tokens is not None and tokens_each > 0:
            block = min(block, max(1, int(tokens.rate * LEASE_BLOCK_S / tokens_each)))
        return block

    def settle(self, reports: Sequence[Report]) -> None:
        limiter = self.limiter
        for report in reports:
            held = self._held.pop(report.number, None)
            if held is None:
                continue  # released already (reported too late)
            permit = held[0]
            if isinstance(report, Answered):
                limiter.succeeded(permit, report.used_tokens, report.headers)
            elif isinstance(report, Refused):
                limiter.rate_limited(
                    permit,
                    report.pause_s,
                    report.headers,
                    report.limit,
                    retry_after=report.retry_after,
                )
            else:
                limiter.estimate.refused(permit.number)
                if limiter.tokens is not None:
                    limiter.tokens.settle(permit.tokens)
            limiter.release(permit)
        self._sweep()

    def _sweep(self) -> None:
        now = _now()
        if now - self._swept_at < 1.0:
            return
        self._swept_at = now
        for number, (permit, leased_at) in list(self._held.items()):
            if now - leased_at > UNREPORTED_TTL_S:
                del self._held[number]
                self.limiter.release(permit)

    def pause_s(self) -> float:
        return max(0.0, self.limiter._paused_until - _now())

    def snapshot(self) -> LedgerSnapshot:
        limiter = self.limiter
        return LedgerSnapshot(
            learned_rpm=limiter.learned_rpm,
            learned_tpm=limiter.learned_tpm,
            estimated_rpm=limiter.estimated_rpm,
            paused_s=limiter.stats.paused_s,
            rate_limited=limiter.stats.rate_limited,
            grants=self.grants,
        )


class _LeasedBudget(TokenBucket):
    """The request bucket of a worker's limiter: numbers leased from the
    ledger instead of a rate of its own."""

    def __init__(self, leases: _Leases) -> None:
        super().__init__(1.0, 1.0)
        self._leases = leases
        self.taken: dict[asyncio.Task[object] | None, int] = {}

    async def acquire(self, amount: float | Callable[[], float]) -> bool:
        waited = False
        leases = self._leases
        while not leases.numbers:
            waited = True
            await leases.refill()
        self.taken[asyncio.current_task()] = leases.numbers.popleft()
        # The next block is asked for while this one is spent: a worker that
        # waits for a round trip to the ledger with nothing in hand leaves
        # the cluster's budget unused meanwhile.
        leases.prefetch()
        return waited

    def settle(self, delta: float) -> None:
        pass  # tokens are the ledger's

    def hold_until(self, when: float) -> None:
        pass  # the limiter's own pause holds this worker; the ledger holds grants

    def open(self) -> None:
        pass

    def reconfigure(self, rate: float, capacity: float) -> None:
        pass


@dataclass
class _Leases:
    """A worker's side of the protocol: numbers in hand, reports to send."""

    source: LeaseSource
    on_pause: Callable[[float], None]
    want: Callable[[], int]
    """How many requests the worker could send now (the ledger caps a grant)."""
    numbers: collections.deque[int] = field(default_factory=collections.deque)
    outbox: list[Report] = field(default_factory=list)
    tokens_each: int = 1
    waiting: int = 0
    block: int = 1
    """The size of the latest grant: the next is asked for below it."""
    epoch: int = 0
    _refill: asyncio.Task[None] | None = None
    _flusher: asyncio.Task[None] | None = None
    _sends: set[asyncio.Task[None]] = field(default_factory=set)

    async def refill(self) -> None:
        """Lease more (one request to the ledger at a time; waiters share it)."""
        self.waiting += 1
        try:
            await asyncio.shield(self._ask())
        finally:
            self.waiting -= 1

    def prefetch(self) -> None:
        """Ask for the next block once fewer than a block is left in hand,
        unless a request is on its way already."""
        if len(self.numbers) >= self.block:
            return
        task = self._ask()
        # Its failure is raised to whoever waits on it next, if anyone does.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _ask(self) -> asyncio.Task[None]:
        self._start_flusher()
        if self._refill is None or self._refill.done():
            want = max(1, self.waiting, self.want())
            self._refill = asyncio.create_task(self._exchange(want))
        return self._refill

    async def _exchange(self, want: int) -> None:
        reports, self.outbox = self.outbox, []
        grant = await self.source.exchange(reports, want, self.tokens_each)
        if grant.epoch != self.epoch:
            # The ledger cut its rate or paused since these were granted:
            # sending them would break the new pace. They go back unused.
            self.epoch = grant.epoch
            self.outbox.extend(Unused(number) for number in self.numbers)
            self.numbers.clear()
        if grant.numbers:
            self.block = len(grant.numbers)
        self.numbers.extend(grant.numbers)
        if grant.pause_s > 0:
            self.on_pause(grant.pause_s)

    def report(self, item: Report, *, urgent: bool = False) -> None:
        self.outbox.append(item)
        if urgent or len(self.outbox) >= FLUSH_REPORTS:
            self.flush()

    def flush(self) -> None:
        if not self.outbox:
            return
        send = asyncio.get_running_loop().create_task(self._exchange(0))
        self._sends.add(send)
        send.add_done_callback(self._sends.discard)

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_every())

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            # An empty report still asks whether another worker's 429 paused
            # us. A failed one is retried next time (a lease that fails
            # stops the worker's requests, and says why).
            with contextlib.suppress(Exception):
                await self._exchange(0)

    async def close(self) -> None:
        """Report everything, the numbers never used included."""
        if self._flusher is not None:
            self._flusher.cancel()
        self.outbox.extend(Unused(number) for number in self.numbers)
        self.numbers.clear()
        await asyncio.gather(*self._sends, return_exceptions=True)
        if self.outbox:
            await self._exchange(0)


class LeasedLimiter(RateLimiter):
    """A worker's limiter: its in-flight gate (adaptive, per worker) as on one
    machine, its request and token budget leased from a ``LimitLedger``,
    which also hears every answer's headers and every 429."""

    def __init__(
        self,
        source: LeaseSource,
        *,
        concurrency: int = 32,
        adaptive: bool = True,
        latency: bool = False,
        start_at_ceiling: bool = False,
    ) -> None:
        self.leases = _Leases(source, self.pause_for, lambda: self.gate.slots)
        self._budget = _LeasedBudget(self.leases)
        # Limits and learning are the ledger's: this limiter paces nothing itself.
        super().__init__(
            None,
            None,
            concurrency=concurrency,
            adaptive=adaptive,
            latency=latency,
            start_at_ceiling=start_at_ceiling,
        )

    def _pace_requests(self, level: float = 0.0) -> None:
        self.requests = self._budget

    def _pace_tokens(self) -> None:
        self.tokens = None

    async def _acquire(self, tokens: int | Callable[[], int]) -> Permit:
        self.leases.tokens_each = tokens() if callable(tokens) else tokens
        task = asyncio.current_task()
        try:
            permit = await super()._acquire(tokens)
        except BaseException:
            number = self._budget.taken.pop(task, None)
            if number is not None:
                self.leases.numbers.appendleft(number)  # never sent: the next request uses it
            raise
        permit.number = self._budget.taken.pop(task)
        return permit

    def learn(self, headers: Mapping[str, str]) -> None:
        pass  # the ledger learns, from every worker's answers

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
        super().succeeded(
            permit,
            used_tokens,
            headers,
            server_s=server_s,
            generation_s=generation_s,
            completion_tokens=completion_tokens,
        )
        self.leases.report(Answered(permit.number, used_tokens, limit_headers(headers)))

    def rate_limited(
        self,
        permit: Permit,
        pause_s: float,
        headers: Mapping[str, str],
        limit: LimitKind | None = None,
        *,
        retry_after: bool = True,
    ) -> None:
        self.stats.rate_limited += 1
        refused = Refused(permit.number, pause_s, limit_headers(headers), limit, retry_after)
        self.leases.report(refused, urgent=True)
        # This worker's in-flight limit answers a 429 as on one machine; the
        # ledger paces the rate, and its reply brings the cluster's pause.
        if permit.gate_bound and not permit.rate_bound and self.gate.decrease(permit.sequence):
            self.stats.decreases += 1
        if retry_after:
            self.pause_for(pause_s)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.leases.close()


def _now() -> float:
    return asyncio.get_running_loop().time()
