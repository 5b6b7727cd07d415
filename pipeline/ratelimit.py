"""Run-wide request and token budgets, and the run-wide pause after a 429.

One ``RateLimiter`` is shared by every worker of a run: a 429 slows the whole
run, not one request, because the provider's budget is shared too.
"""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter

# Providers enforce per-minute limits over sub-minute windows, so a bucket that
# holds a whole minute of capacity fires it all at t=0 and earns a 429 storm.
# Capacity is one second's worth instead: the rate is spread evenly.
BURST_SECONDS = 1.0


def spread_limiter(per_minute: float, burst_s: float = BURST_SECONDS) -> AsyncLimiter:
    """A leaky bucket that admits ``per_minute`` units per minute, in bursts of
    at most ``burst_s`` worth (never less than one unit)."""
    per_second = per_minute / 60.0
    capacity = max(1.0, per_second * burst_s)
    return AsyncLimiter(capacity, capacity / per_second)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute budgets plus a shared pause."""

    def __init__(self, rpm: int | None = None, tpm: int | None = None) -> None:
        self._requests = spread_limiter(rpm) if rpm else None
        self._tokens = spread_limiter(tpm) if tpm else None
        self._paused_until = 0.0

    async def acquire(self, tokens: int) -> None:
        """Wait until one request of about ``tokens`` tokens may be sent."""
        await self._wait_out_pause()
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is not None:
            # A request bigger than the whole bucket must still go out (alone,
            # once the bucket is empty) rather than wait forever.
            await self._tokens.acquire(min(float(tokens), self._tokens.max_rate))
        # A 429 may have paused the run while we waited for the buckets.
        await self._wait_out_pause()

    def pause_for(self, seconds: float) -> None:
        """Hold every new request for ``seconds`` (a 429's retry-after)."""
        if seconds > 0:
            loop = asyncio.get_running_loop()
            self._paused_until = max(self._paused_until, loop.time() + seconds)

    async def _wait_out_pause(self) -> None:
        loop = asyncio.get_running_loop()
        # Re-checked after each sleep: another 429 may have extended the pause.
        while (remaining := self._paused_until - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(remaining)
