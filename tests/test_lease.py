"""The cluster's limit without a cluster: a ``LimitLedger`` and several
``LeasedLimiter`` workers in one event loop, on a fake clock (``looptime``).
The workers call the ledger directly, which is what the Ray actor holding it
does for them."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest
from test_ratelimit import SlidingWindowAPI, enrich_rows

from pipeline.call import CallStage
from pipeline.config import LimitsConfig, ModelConfig
from pipeline.lease import FLUSH_S, Grant, LeasedLimiter, LimitLedger, Report
from pipeline.ratelimit import RATE_HEADROOM


def now() -> float:
    return asyncio.get_running_loop().time()


class CountingLedger(LimitLedger):
    """The real ledger, counting the calls made to it."""

    calls = 0

    async def exchange(self, reports: Sequence[Report], want: int, tokens_each: int) -> Grant:
        self.calls += 1
        return await super().exchange(reports, want, tokens_each)


async def send_for(
    limiter: LeasedLimiter, seconds: float, sent: list[float], headers: dict[str, str]
) -> None:
    """One worker's request loop: every request answered at once."""
    end = now() + seconds
    while now() < end:
        async with limiter.request(10) as permit:
            sent.append(now())
            limiter.succeeded(permit, 10, headers)


@pytest.mark.slow
@pytest.mark.looptime
async def test_workers_share_one_request_budget_leased_in_blocks() -> None:
    ledger = CountingLedger(rpm=6000, tpm=None)
    workers = [LeasedLimiter(ledger, concurrency=8) for _ in range(3)]
    sent: list[float] = []

    await asyncio.gather(*(send_for(w, 10.0, sent, {}) for w in workers))
    for worker in workers:
        await worker.aclose()

    # 100/s for the cluster, not for each worker.
    assert len(sent) == pytest.approx(100 * RATE_HEADROOM * 10, rel=0.03)
    # One ledger call per block of requests (plus the flushes), not per request.
    grants = ledger.snapshot().grants
    assert grants < len(sent) / 3
    # The rest of the calls are the flushes, every FLUSH_S per worker.
    assert ledger.calls <= grants + 3 * (10.0 / FLUSH_S) + 10


@pytest.mark.looptime
async def test_a_429_from_one_worker_pauses_every_worker() -> None:
    ledger = LimitLedger(rpm=None, tpm=None)
    first, second = LeasedLimiter(ledger), LeasedLimiter(ledger)
    async with first.request(1) as permit:
        first.rate_limited(permit, 5.0, {"retry-after": "5"})
    await asyncio.sleep(0)  # the 429 is on its way to the ledger
    start = now()

    async with second.request(1):
        waited = now() - start

    assert waited == pytest.approx(5.0, abs=FLUSH_S)
    assert ledger.snapshot().rate_limited == 1
    await first.aclose()
    await second.aclose()


@pytest.mark.looptime
async def test_a_limit_one_worker_reads_in_headers_paces_the_whole_cluster() -> None:
    ledger = LimitLedger(rpm=None, tpm=None)
    workers = [LeasedLimiter(ledger, concurrency=4) for _ in range(2)]
    headers = {"x-ratelimit-limit-requests": "1200", "x-ratelimit-remaining-requests": "1000"}
    sent: list[float] = []

    await asyncio.gather(
        send_for(workers[0], 10.0, sent, headers), send_for(workers[1], 10.0, sent, {})
    )
    for worker in workers:
        await worker.aclose()

    assert ledger.snapshot().learned_rpm == 1200
    settled = [t for t in sent if t >= 1.0]  # after the first answers taught the ledger
    assert len(settled) == pytest.approx(20 * RATE_HEADROOM * 9, rel=0.05)


@pytest.mark.looptime
async def test_a_closing_worker_reports_every_request_it_leased() -> None:
    ledger = LimitLedger(rpm=None, tpm=None)
    worker = LeasedLimiter(ledger, concurrency=4)
    async with worker.request(1) as permit:
        worker.succeeded(permit, 1, {})
    # The answer waits in the worker's outbox for the next flush.
    held_before = len(ledger._held)
    await worker.aclose()

    assert held_before >= 1
    assert ledger._held == {}


def leased_stage(api: SlidingWindowAPI, ledger: LimitLedger, seed: int) -> CallStage:
    """A worker: the single-machine call stage with a limiter leasing from ``ledger``."""
    limits = LimitsConfig(concurrency=16)
    limiter = LeasedLimiter(ledger, concurrency=16, latency=True)
    return CallStage(ModelConfig(name="m"), limits, api, rng=random.Random(seed), limiter=limiter)


@pytest.mark.slow
@pytest.mark.looptime
async def test_auto_mode_learns_a_limit_without_headers_from_every_workers_429s() -> None:
    # 6,000 rpm over a 10 s window, no x-ratelimit-* headers: only the
    # 429s' retry-after, reported by whichever worker got them, teach the
    # ledger's estimate.
    api = SlidingWindowAPI(6000, 10.0)
    ledger = LimitLedger(rpm=None, tpm=None)
    stages = [leased_stage(api, ledger, seed) for seed in range(3)]

    runs = await asyncio.gather(*(enrich_rows(stage, 1200) for stage in stages))
    for stage in stages:
        assert isinstance(stage.limiter, LeasedLimiter)
        await stage.limiter.aclose()

    assert all(r.status == "ok" for results in runs for r in results)
    assert ledger.snapshot().estimated_rpm is not None
    # After the first window (a burst, then the pause its retry-after asks
    # for), the cluster keeps to the limit.
    end = api.admitted[-1]
    assert api.rate(10.0, end) >= 0.90 * 6000
    assert api.share_429(10.0, end) < 0.02
