"""The run's timeline: what happened, interval by interval, for the report page
and for live metrics.

A ``Timeline`` hears every finished row (``observe``, through the progress
hook) and, at each tick of its sampler, reads the call stage's running
counters (requests sent, retries, 429s, time paused) and gauges (requests in
flight, the in-flight limit, the request rate in force). Each tick closes one
interval of per-interval counts.

Bounded whatever the run's length: past ``max_buckets`` intervals, neighbours
are merged pairwise and the interval doubles, so a ten-hour run keeps a few
hundred intervals of a couple of minutes each. The report keeps one segment
per invocation; a run that resumes a job appends its segment to the previous
report's (``merge``), coarsening old segments so that the whole job stays
within ``MAX_JOB_BUCKETS``.

Counters are plain ints and floats updated on the event loop; ``totals()``
reads them from any thread (the metrics server's), which the GIL makes safe.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pipeline.costs import Price, cost

if TYPE_CHECKING:
    from pipeline.call import CallStage
    from pipeline.progress import Progress
    from pipeline.results import RowResult

TIMELINE_VERSION: Final = 1

# Base sampling interval; long runs coarsen it by powers of two.
DEFAULT_INTERVAL_S: Final = 1.0
# Intervals kept per segment, and for a whole job across its resumed runs.
DEFAULT_MAX_BUCKETS: Final = 300
MAX_JOB_BUCKETS: Final = 600

# Error kinds kept apart; more become "other" (the error text is free-form
# server text, so its variety is unbounded).
MAX_ERROR_KINDS: Final = 12
EXAMPLE_ROWS: Final = 5
OTHER_KIND: Final = "other"

# Counters add up when intervals merge; gauges keep their peak or last value.
COUNTERS: Final = (
    "sent",
    "ok",
    "error",
    "skipped",
    "rate_limited",
    "retries",
    "cache_hits",
    "deduplicated",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "paused_s",
    "outage_s",
    "latency_count",
    "latency_sum_ms",
)
PEAK_GAUGES: Final = ("in_flight", "latency_max_ms")
LAST_GAUGES: Final = ("concurrency_limit", "limit_rpm")
SERIES: Final = COUNTERS + PEAK_GAUGES + LAST_GAUGES

# Latency histogram: log-spaced edges, 10 per decade from 1 ms to 1000 s
# (anything longer lands in the last bin). Fixed edges so that the histograms
# of resumed runs add up bin by bin.
_BINS_PER_DECADE: Final = 10
LATENCY_EDGES_MS: Final = tuple(
    round(10 ** (i / _BINS_PER_DECADE), 6) for i in range(6 * _BINS_PER_DECADE + 1)
)

# "server error (503): Service Unavailable (gave up after 8 attempts; ...)"
# -> "server error (503)": the reason without the server's free text.
_KIND_END: Final = re.compile(r":| \(gave up")


def error_kind(error: str | None) -> str:
    """The reason of a row's error, without its variable details."""
    if not error:
        return "unknown"
    head = _KIND_END.split(error, maxsplit=1)[0].strip()
    return head[:60] or "unknown"


@dataclass
class Live:
    """The run's running totals at one instant (``Timeline.totals``): the
    numbers of the progress event and of the metrics endpoint."""

    sent: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    rate_limited: int = 0
    retries: int = 0
    cache_hits: int = 0
    deduplicated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    paused_s: float = 0.0
    outage_s: float = 0.0
    in_flight: int = 0
    concurrency_limit: float = 0.0
    limit_rpm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        values = dict(self.__dict__)
        if self.cost_usd is not None:
            values["cost_usd"] = round(self.cost_usd, 6)
        values["paused_s"] = round(self.paused_s, 3)
        values["outage_s"] = round(self.outage_s, 3)
        if self.limit_rpm is not None:
            values["limit_rpm"] = round(self.limit_rpm, 1)
        return values


class Timeline:
    """Records one invocation's intervals. ``bind`` it to the call stage
    before the run, ``observe`` every finished row, ``tick`` (or ``run``)
    at the sampling interval, ``segment`` at the end."""

    def __init__(
        self,
        *,
        price: Price | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        max_buckets: int = DEFAULT_MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_buckets < 2:
            raise ValueError("max_buckets must be at least 2")
        self.price = price
        self.base_interval_s = interval_s
        self.max_buckets = max_buckets
        self._clock = clock
        self._started = clock()
        self._stage: CallStage | None = None
        self._reused: Callable[[], tuple[int, int]] = lambda: (0, 0)
        # What rows told us (observe); the stage's counters are read at ticks.
        self.ok = self.error = self.skipped = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.cost_usd = 0.0
        self._latency_count = 0
        self._latency_sum_ms = 0.0
        self._latency_max_ms = 0.0
        self.latency_histogram = [0] * len(LATENCY_EDGES_MS)
        self.errors: dict[str, dict[str, Any]] = {}
        # Cumulative values at the last tick, to turn totals into per-interval counts.
        self._at_last_tick: dict[str, float] = dict.fromkeys(COUNTERS, 0.0)
        self.series: dict[str, list[float | None]] = {name: [] for name in SERIES}
        self.error_series: dict[str, list[int]] = {}
        self._error_counts: dict[str, int] = {}
        # Ticks per interval (doubles on coarsening) and ticks in the open interval.
        self._width = 1
        self._pending: dict[str, float | None] | None = None
        self._pending_errors: dict[str, int] = {}
        self._pending_ticks = 0
        self._peak_in_flight = 0
        self._heartbeat: Callable[[], None] | None = None

    # -- inputs -------------------------------------------------------------

    def bind(self, stage: CallStage, reused: Callable[[], tuple[int, int]]) -> None:
        """Read the stage's counters and gauges at each tick; ``reused`` says
        how many rows came from the cache and from in-run dedup so far."""
        self._stage = stage
        self._reused = reused

    def observe(self, result: RowResult) -> None:
        """One finished row (called for every row: keep it cheap)."""
        status = result.status
        if status == "ok":
            self.ok += 1
        elif status == "skipped":
            self.skipped += 1
            return
        else:
            self.error += 1
            self._record_error(result)
        if result.cached:
            return  # answered without a request: nothing paid, no latency
        prompt_tokens = result.prompt_tokens or 0
        completion_tokens = result.completion_tokens or 0
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if self.price is not None:
            self.cost_usd += cost(prompt_tokens, completion_tokens, self.price)
        latency = result.latency_ms
        if latency is not None:
            self._latency_count += 1
            self._latency_sum_ms += latency
            if latency > self._latency_max_ms:
                self._latency_max_ms = latency
            index = bisect.bisect_right(LATENCY_EDGES_MS, latency) - 1
            self.latency_histogram[min(max(index, 0), len(LATENCY_EDGES_MS) - 1)] += 1

    def _record_error(self, result: RowResult) -> None:
        kind = error_kind(result.error)
        if kind not in self.errors and len(self.errors) >= MAX_ERROR_KINDS:
            kind = OTHER_KIND
        entry = self.errors.get(kind)
        if entry is None:
            entry = self.errors[kind] = {
                "count": 0,
                "transient": bool(result.transient),
                "example": result.error,
                "rows": [],
            }
        entry["count"] += 1
        if len(entry["rows"]) < EXAMPLE_ROWS:
            entry["rows"].append(result.row_id)
        self._error_counts[kind] = self._error_counts.get(kind, 0) + 1

    def watching(self, progress: Progress) -> Progress:
        """``progress`` that also feeds this timeline every finished row. A
        progress with a ``heartbeat()`` (``ProgressEvents``) gets it at every
        tick, so that its events come at a fixed interval."""
        self._heartbeat = getattr(progress, "heartbeat", None)
        return _Watching(self, progress)

    # -- live totals --------------------------------------------------------

    def totals(self) -> Live:
        live = Live(
            ok=self.ok,
            error=self.error,
            skipped=self.skipped,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost_usd=self.cost_usd if self.price is not None else None,
        )
        live.cache_hits, live.deduplicated = self._reused()
        stage = self._stage
        if stage is not None:
            limiter = stage.limiter
            live.sent = stage.stats.requests
            live.retries = stage.stats.retries
            live.rate_limited = stage.stats.rate_limited
            live.paused_s = limiter.stats.paused_s
            live.outage_s = stage.outage.outage_s
            live.in_flight = limiter.gate.in_flight
            live.concurrency_limit = limiter.gate.limit
            rpm: float | None = limiter.rpm
            live.limit_rpm = rpm if rpm is not None else limiter.estimated_rpm
        return live

    # -- sampling -----------------------------------------------------------

    def sample_in_flight(self) -> None:
        """Note the requests in flight now (the tick keeps the peak)."""
        if self._stage is not None:
            self._peak_in_flight = max(self._peak_in_flight, self._stage.limiter.gate.in_flight)

    def tick(self) -> None:
        """Close one base interval."""
        live = self.totals()
        cumulative = {
            "sent": live.sent,
            "ok": live.ok,
            "error": live.error,
            "skipped": live.skipped,
            "rate_limited": live.rate_limited,
            "retries": live.retries,
            "cache_hits": live.cache_hits,
            "deduplicated": live.deduplicated,
            "prompt_tokens": live.prompt_tokens,
            "completion_tokens": live.completion_tokens,
            "cost_usd": self.cost_usd,
            "paused_s": live.paused_s,
            "outage_s": live.outage_s,
            "latency_count": self._latency_count,
            "latency_sum_ms": self._latency_sum_ms,
        }
        row: dict[str, float | None] = {
            name: value - self._at_last_tick[name] for name, value in cumulative.items()
        }
        self._at_last_tick = {name: float(value) for name, value in cumulative.items()}
        row["in_flight"] = max(self._peak_in_flight, live.in_flight)
        row["latency_max_ms"] = self._latency_max_ms
        row["concurrency_limit"] = live.concurrency_limit
        row["limit_rpm"] = live.limit_rpm
        self._peak_in_flight = live.in_flight
        self._latency_max_ms = 0.0
        errors, self._error_counts = self._error_counts, {}
        self._add(row, errors)

    def _add(self, row: dict[str, float | None], errors: dict[str, int]) -> None:
        if self._pending is None:
            self._pending, self._pending_errors = row, errors
        else:
            self._pending = _merge_rows(self._pending, row)
            self._pending_errors = _add_counts(self._pending_errors, errors)
        self._pending_ticks += 1
        if self._pending_ticks >= self._width:
            self._flush()

    def _flush(self) -> None:
        # Cleared first: appending may coarsen, which reopens the last interval.
        row, errors = self._pending, self._pending_errors
        self._pending, self._pending_errors, self._pending_ticks = None, {}, 0
        if row is not None:
            self._append(row, errors)

    def _append(self, row: Mapping[str, float | None], errors: Mapping[str, int]) -> None:
        length = len(self.series["sent"])
        for name in SERIES:
            self.series[name].append(row[name])
        for kind in errors.keys() - self.error_series.keys():
            self.error_series[kind] = [0] * length
        for kind, counts in self.error_series.items():
            counts.append(errors.get(kind, 0))
        if length + 1 > self.max_buckets:
            self._coarsen()

    def _coarsen(self) -> None:
        odd = len(self.series["sent"]) % 2 == 1
        if odd:
            # The unpaired last interval becomes the open one, half full.
            last = {name: values.pop() for name, values in self.series.items()}
            last_errors = {kind: counts.pop() for kind, counts in self.error_series.items()}
        self.series = coarsen_series(self.series)
        self.error_series = {k: _pairwise_sum(v) for k, v in self.error_series.items()}
        self._width *= 2
        if odd:
            self._pending = last
            self._pending_errors = {k: v for k, v in last_errors.items() if v}
            self._pending_ticks = self._width // 2

    async def run(self) -> None:
        """Tick every base interval until cancelled (the runner's sampler)."""
        # In-flight peaks are sampled a few times per interval: a tick alone
        # would only see the instant it runs.
        step = self.base_interval_s / 4
        while True:
            for _ in range(4):
                await asyncio.sleep(step)
                self.sample_in_flight()
            self.tick()
            if self._heartbeat is not None:
                self._heartbeat()

    # -- output -------------------------------------------------------------

    @property
    def interval_s(self) -> float:
        return self.base_interval_s * self._width

    def segment(self, **facts: Any) -> dict[str, Any]:
        """This invocation's part of the report: its intervals and totals.
        Closes the open interval (call once, at the end of the run)."""
        self.tick()
        while self._pending is not None:
            self._flush()
        wall_s = self._clock() - self._started
        return {
            **facts,
            "wall_s": round(wall_s, 3),
            "interval_s": self.interval_s,
            "series": {name: [_rounded(v) for v in values] for name, values in self.series.items()},
            "errors_by_kind": {kind: list(counts) for kind, counts in self.error_series.items()},
            "totals": self.totals().to_dict(),
            "errors": {kind: dict(entry) for kind, entry in self.errors.items()},
            "latency_histogram": list(self.latency_histogram),
        }


class _Watching:
    """A Progress that also feeds a Timeline."""

    def __init__(self, timeline: Timeline, inner: Progress) -> None:
        self._timeline = timeline
        self._inner = inner

    def start(self, total: int, already_done: int) -> None:
        self._inner.start(total, already_done)

    def advance(self, result: RowResult) -> None:
        self._timeline.observe(result)
        self._inner.advance(result)

    def ahead(self, rows: int) -> None:
        show = getattr(self._inner, "ahead", None)
        if show is not None:
            show(rows)

    def close(self) -> None:
        self._inner.close()


def _rounded(value: float | None) -> float | int | None:
    if value is None:
        return None
    if float(value).is_integer():
        return int(value)
    return round(value, 6)


def _merge_rows(
    first: Mapping[str, float | None], second: Mapping[str, float | None]
) -> dict[str, float | None]:
    merged: dict[str, float | None] = {}
    for name in COUNTERS:
        merged[name] = (first[name] or 0) + (second[name] or 0)
    for name in PEAK_GAUGES:
        merged[name] = max(first[name] or 0, second[name] or 0)
    for name in LAST_GAUGES:
        merged[name] = second[name] if second[name] is not None else first[name]
    return merged


def _add_counts(first: Mapping[str, int], second: Mapping[str, int]) -> dict[str, int]:
    merged = dict(first)
    for kind, count in second.items():
        merged[kind] = merged.get(kind, 0) + count
    return merged


def _pairwise_sum(values: Sequence[int]) -> list[int]:
    return [sum(values[i : i + 2]) for i in range(0, len(values), 2)]


def coarsen_series(series: Mapping[str, Sequence[float | None]]) -> dict[str, list[float | None]]:
    """Neighbouring intervals merged pairwise (half as many, twice as long)."""
    out: dict[str, list[float | None]] = {}
    for name, values in series.items():
        pairs = [values[i : i + 2] for i in range(0, len(values), 2)]
        if name in PEAK_GAUGES:
            out[name] = [max((v or 0) for v in pair) for pair in pairs]
        elif name in LAST_GAUGES:
            out[name] = [next((v for v in reversed(pair) if v is not None), None) for pair in pairs]
        else:
            out[name] = [sum((v or 0) for v in pair) for pair in pairs]
    return out


def _coarsen_segment(segment: dict[str, Any]) -> dict[str, Any]:
    series = {k: list(v) for k, v in segment["series"].items()}
    return {
        **segment,
        "interval_s": segment["interval_s"] * 2,
        "series": {
            name: [_rounded(v) for v in values] for name, values in coarsen_series(series).items()
        },
        "errors_by_kind": {
            kind: _pairwise_sum(counts) for kind, counts in segment["errors_by_kind"].items()
        },
    }


def _buckets(segment: Mapping[str, Any]) -> int:
    return len(segment["series"]["sent"])


def job_timeline(segments: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The report's ``timeline``: every segment of the job (bounded in all to
    ``MAX_JOB_BUCKETS`` intervals, the longest segments coarsened first),
    with the job's totals, error reasons and latency distribution."""
    kept = list(segments)
    while sum(_buckets(s) for s in kept) > MAX_JOB_BUCKETS:
        longest = max(range(len(kept)), key=lambda i: _buckets(kept[i]))
        if _buckets(kept[longest]) <= 1:
            break
        kept[longest] = _coarsen_segment(kept[longest])
    totals: dict[str, Any] = {}
    for segment in kept:
        for name, value in segment["totals"].items():
            if name in COUNTERS:
                totals[name] = _rounded((totals.get(name) or 0) + (value or 0))
    errors: dict[str, dict[str, Any]] = {}
    for segment in kept:
        for kind, entry in segment["errors"].items():
            merged = errors.setdefault(
                kind, {"count": 0, "transient": entry["transient"], "example": entry["example"]}
            )
            merged["count"] += entry["count"]
            rows = merged.setdefault("rows", [])
            rows.extend(r for r in entry["rows"] if r not in rows)
            del rows[EXAMPLE_ROWS:]
    histogram = [0] * len(LATENCY_EDGES_MS)
    for segment in kept:
        for i, count in enumerate(segment["latency_histogram"][: len(histogram)]):
            histogram[i] += count
    return {
        "version": TIMELINE_VERSION,
        "segments": kept,
        "totals": totals,
        "errors": dict(sorted(errors.items(), key=lambda item: -item[1]["count"])),
        "latency": {
            "edges_ms": list(LATENCY_EDGES_MS),
            "counts": histogram,
            **histogram_percentiles(histogram),
        },
    }


def segment_facts(report: Mapping[str, Any]) -> dict[str, Any]:
    """What a segment says of its run, from that run's report."""
    counts = report.get("counts", {})
    return {
        "started_at": report.get("started_at"),
        "finished_at": report.get("finished_at"),
        "exit_code": report.get("exit_code"),
        "outcome": report.get("outcome"),
        "resumed_rows": counts.get("resumed_rows"),
        "processed_rows": counts.get("processed_rows"),
    }


def previous_segments(
    report: Mapping[str, Any] | None, *, fingerprint: str, input_sha256: str | None
) -> list[dict[str, Any]]:
    """The segments of earlier runs of the same job (same settings, same
    input) from its last report; none when that report is another job's."""
    if not report or report.get("fingerprint") != fingerprint:
        return []
    if input_sha256 is not None and report.get("input", {}).get("sha256") != input_sha256:
        return []
    timeline = report.get("timeline")
    if not isinstance(timeline, dict) or timeline.get("version") != TIMELINE_VERSION:
        return []
    segments = timeline.get("segments")
    return [s for s in segments if isinstance(s, dict)] if isinstance(segments, list) else []


def histogram_percentiles(counts: Sequence[int]) -> dict[str, float | None]:
    """p50/p90/p99 in ms from the fixed-edge histogram, interpolated on a log
    scale within the bin (a tenth of a decade wide: within about 12%)."""
    total = sum(counts)
    out: dict[str, float | None] = {}
    for percent in (50, 90, 99):
        if total == 0:
            out[f"p{percent}"] = None
            continue
        target = total * percent / 100.0
        seen = 0
        value = LATENCY_EDGES_MS[-1]
        for i, count in enumerate(counts):
            if count and seen + count >= target:
                low = LATENCY_EDGES_MS[i]
                high = LATENCY_EDGES_MS[i] * 10 ** (1 / _BINS_PER_DECADE)
                share = (target - seen) / count
                value = math.exp(math.log(low) + share * (math.log(high) - math.log(low)))
                break
            seen += count
        out[f"p{percent}"] = round(value, 3)
    return out
