"""What one run did: the value ``enrich`` returns and the report records.

Built once, when the run ends, from what its stages returned (the plan, the
resume point, what was collected, the call stage's statistics, the output's
tally); frozen, so no stage writes into it and nothing reads it back.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.storage import Location


@dataclass(frozen=True)
class RunSummary:
    output: Location
    run_dir: Path
    rows: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    pending: int = 0
    """Errors whose last failure was transient: the next run sends them again."""
    resumed_rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    wall_s: float = 0.0
    bad_answers: int = 0
    """Answers that failed the structured-output schema and were asked again."""
    outages: int = 0
    """Times the API stopped answering and the run waited, probing."""
    outage_s: float = 0.0
    stalled: int = 0
    """Requests cut because no byte came for the stall timeout (then retried)."""
    stall_timeout_s: float | None = None
    """The stall timeout the run ended with (learned unless --stall-timeout)."""
    streamed: bool | None = None
    """Whether answers were streamed (None: no request was answered)."""
    concurrency_limit: float = 0.0
    """The in-flight limit the limiter ended with (AIMD; the configured
    concurrency when not adaptive)."""
    learned_rpm: int | None = None
    """Requests/min the server reported in x-ratelimit-* headers (None: none)."""
    learned_tpm: int | None = None
    """Tokens/min the server reported in x-ratelimit-* headers (None: none)."""
    estimated_rpm: float | None = None
    """Requests/min learned from 429s of a server that reports no limits."""
    paused_s: float = 0.0
    """Time the whole run spent paused by 429 retry-after."""
    cache_hits: int = 0
    """Rows answered from the response cache (no request)."""
    deduplicated: int = 0
    """Rows that shared an identical request's answer in this run (no request)."""
    cost_usd: float | None = None
    """Estimated spend of this run (None when the model has no known price)."""
    server: Mapping[str, Any] = field(default_factory=dict)
    """What the server did: the concurrency settled at and why, requests
    abandoned, where the latency went (``CallStats.server_report``)."""
    error_reasons: tuple[tuple[str, int], ...] = ()
    """The most common reasons rows failed, with their counts, read from the
    finished output (empty for a stopped run): what the summary lists."""
    up_to_date: bool = False
    """True when nothing was done because the output was already complete."""
    latencies_ms: array[float] = field(default_factory=lambda: array("d"), repr=False)

    @property
    def processed_rows(self) -> int:
        """Rows finished by this run (not carried over from a checkpoint)."""
        return self.rows - self.resumed_rows

    @property
    def rows_per_s(self) -> float:
        return self.processed_rows / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def error_rate(self) -> float:
        attempted = self.ok + self.error
        return self.error / attempted if attempted else 0.0

    def latency_percentile(self, percent: int) -> float | None:
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0] if self.latencies_ms else None
        import statistics  # for the end of a run: see report.latency_percentiles

        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[percent - 1]
