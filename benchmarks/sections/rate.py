"""Section ``rate``: servers enforcing request and token limits, configured,
reported in headers or not, over short and long windows, and through a storm."""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from harness import (
    JOB_BASE_TIMEOUT_S,
    MODEL,
    Build,
    Child,
    Context,
    JobResult,
    Simulator,
    finish_job,
    job_timeout,
    measured_script,
    records,
    remove_outputs,
)
from tables import CPU_PER_ROW, RUNS, WALL, Column, med, ratio, summarize

# The tutorial approach against a rate-limited server: every prompt at once,
# the SDK's default retries (2, honouring retry-after), a failed row kept as a
# null. Prints how many rows it got, for the benchmark to count the lost ones.
NAIVE_RATE_SCRIPT: Final = """
import asyncio, sys
import openai, polars as pl

async def main(path, base_url, output, model):
    df = pl.read_parquet(path)
    client = openai.AsyncOpenAI(base_url=base_url)

    async def one(question):
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}]
        )
        return reply.choices[0].message.content

    results = await asyncio.gather(
        *(one(q) for q in df["question"].to_list()), return_exceptions=True
    )
    answers = [None if isinstance(r, BaseException) else r for r in results]
    df.with_columns(pl.Series("response", answers, dtype=pl.String)).write_parquet(output)
    await client.close()
    ok = sum(a is not None for a in answers)
    print(f"naive: ok {ok} lost {len(answers) - ok}")

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]))
"""


def naive_rate_build() -> Build:
    def build(input_path: Path, output: Path, sim: Simulator) -> list[str]:
        return measured_script(NAIVE_RATE_SCRIPT, str(input_path), sim.base_url, str(output), MODEL)

    return build


# The rate section's server: a limit enforced over a 1 s sliding window (as
# providers enforce per-minute limits over sub-minute windows), 200 +- 100 ms
# per answer. 100 requests/s is well within what one client process sends, so
# the limit, not the client, bounds every enrich run.
RATE_RPM: Final = 6_000
# About 100 requests/s of the benchmark's prompts (about 70 tokens a request).
RATE_TPM: Final = 400_000
RATE_WINDOW_S: Final = 1.0
RATE_LATENCY_MS: Final = 200.0
RATE_JITTER_MS: Final = 100.0
RATE_CONCURRENCY: Final = 64

# Limits the server does not report (no x-ratelimit-* headers; retry-after is
# still sent), counted over longer windows: (window, rpm). The 60 s one is
# 1,200 rpm so that its first window (a burst of 1,200 requests) is within
# what one client sends in a few seconds. Each runs Sizes.rate_windows windows
# of rows at the limit (at least the section's rows): about 2.5 minutes for
# the 60 s window (1.5 with --quick).
RATE_LONG_WINDOWS: Final = ((6.0, 6_000), (60.0, 1_200))
# A storm on the 1 s window's 6,000 rpm: 600 rpm from RATE_STORM_FROM_S to
# RATE_STORM_UNTIL_S after the first request, then 6,000 again, for
# RATE_STORM_AFTER_S of rows (3,150 rows, 45 s at the limits). Without
# headers, and with headers that stop when the storm ends (the server
# reported 600 during it, then nothing).
RATE_STORM_LOW_RPM: Final = 600
RATE_STORM_FROM_S: Final = 10.0
RATE_STORM_UNTIL_S: Final = 25.0
RATE_STORM_AFTER_S: Final = 20.0
RATE_TIMEOUT_IDEALS: Final = 8.0


# How often the rate section samples the simulator's counters during a job.
RATE_POLL_S: Final = 0.25
# The steady-state rate is measured between these shares of the requests
# admitted: past the ramp-up at the start, before the stragglers at the end.
STEADY_FROM: Final = 0.1
STEADY_TO: Final = 0.9

# A sample of the simulator's counters: (bench clock, admitted, admitted
# tokens, 429s, requests).
Sample = tuple[float, int, int, int, int]


class StatsPoller:
    """Samples the simulator's counters while a job runs (see ``Sample``)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(RATE_POLL_S):
            with contextlib.suppress(OSError):
                stats = self.sim.stats()
                self.samples.append(
                    (
                        time.monotonic(),
                        int(stats["admitted"]),
                        int(stats["admitted_tokens"]),
                        int(stats["rate_limited"]),
                        int(stats["requests"]),
                    )
                )

    def __enter__(self) -> StatsPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class RateVariant:
    """One client against one server set-up; ``limit`` says which limit binds.
    ``schedule`` is the server's ``--rpm-schedule`` ((seconds since the first
    request, rpm) steps after ``rpm``); ``rows`` None means the section's."""

    build: Build
    server_flags: tuple[str, ...]
    limit: str  # "requests" or "tokens"
    window_s: float = RATE_WINDOW_S
    rpm: int = RATE_RPM
    rows: int | None = None
    schedule: tuple[tuple[float, int], ...] = ()

    def flags(self) -> tuple[str, ...]:
        flags: tuple[str, ...] = (
            "--jitter-ms",
            str(RATE_JITTER_MS),
            "--window-s",
            str(self.window_s),
        )
        if self.schedule:
            steps = ",".join(f"{at:g}:{rpm}" for at, rpm in self.schedule)
            flags += ("--rpm-schedule", steps)
        return (*flags, *self.server_flags)

    def admits(self, start: float, end: float) -> float:
        """Requests the limit admits between two times since the first request."""
        steps = [(0.0, self.rpm), *self.schedule, (math.inf, 0)]
        total = 0.0
        for (at, rpm), (until, _) in itertools.pairwise(steps):
            overlap = min(end, until) - max(start, at)
            if overlap > 0:
                total += overlap * rpm / 60.0
        return total

    def ideal_s(self, requests: float) -> float:
        """Time for ``requests`` at exactly the limit (as scheduled)."""
        steps = [(0.0, self.rpm), *self.schedule, (math.inf, 0)]
        left = requests
        for (at, rpm), (until, _) in itertools.pairwise(steps):
            can = (until - at) * rpm / 60.0
            if left <= can:
                return at + left / (rpm / 60.0)
            left -= can
        return math.inf


def rate_timeout(variant: RateVariant, rows: int) -> float:
    """Long enough for a client far below the limit (code from before a
    fix, say) to finish: RATE_TIMEOUT_IDEALS times the ideal time."""
    ideal = variant.ideal_s(rows) if variant.limit == "requests" else 0.0
    return max(job_timeout(rows), JOB_BASE_TIMEOUT_S + RATE_TIMEOUT_IDEALS * ideal)


def rate_variants(ctx: Context) -> dict[str, RateVariant]:
    rpm, tpm = str(RATE_RPM), str(RATE_TPM)
    requests_server = ("--rpm", rpm)
    tokens_server = ("--tpm", tpm)
    no_headers = ("--no-rate-headers",)
    c = RATE_CONCURRENCY
    variants = {
        "rpm: configured": RateVariant(ctx.enrich(c, "--rpm", rpm), requests_server, "requests"),
        "rpm: auto, headers": RateVariant(ctx.enrich(c), requests_server, "requests"),
        "rpm: auto, no headers": RateVariant(
            ctx.enrich(c), (*requests_server, *no_headers), "requests"
        ),
        "rpm: naive gather": RateVariant(naive_rate_build(), requests_server, "requests"),
        "tpm: configured": RateVariant(ctx.enrich(c, "--tpm", tpm), tokens_server, "tokens"),
        "tpm: auto, headers": RateVariant(ctx.enrich(c), tokens_server, "tokens"),
        "tpm: auto, no headers": RateVariant(
            ctx.enrich(c), (*tokens_server, *no_headers), "tokens"
        ),
    }
    for window_s, window_rpm in RATE_LONG_WINDOWS:
        per_window = window_rpm / 60.0 * window_s
        variants[f"rpm: auto, no headers, {window_s:g} s window"] = RateVariant(
            ctx.enrich(c),
            ("--rpm", str(window_rpm), *no_headers),
            "requests",
            window_s=window_s,
            rpm=window_rpm,
            rows=max(ctx.sizes.rate_rows, round(per_window * ctx.sizes.rate_windows)),
        )
    schedule = ((RATE_STORM_FROM_S, RATE_STORM_LOW_RPM), (RATE_STORM_UNTIL_S, RATE_RPM))
    storm = RateVariant(ctx.enrich(c), requests_server, "requests", schedule=schedule)
    storm = replace(storm, rows=round(storm.admits(0.0, RATE_STORM_UNTIL_S + RATE_STORM_AFTER_S)))
    variants["storm: auto, no headers"] = replace(
        storm, server_flags=(*requests_server, *no_headers)
    )
    variants["storm: auto, headers stop"] = replace(
        storm,
        server_flags=(*requests_server, "--rate-headers-until", f"{RATE_STORM_UNTIL_S:g}"),
    )
    if ctx.rate_variants:
        variants = {
            name: variant
            for name, variant in variants.items()
            if any(part in name for part in ctx.rate_variants)
        }
    return variants


def steady_rate(samples: Sequence[Sample], total: int, column: int) -> tuple[float, float, float]:
    """(per second, start, end) between the samples where STEADY_FROM and
    STEADY_TO of the ``total`` requests had been admitted; ``column`` 1 for
    requests, 2 for tokens. Times are on the bench clock."""
    start = next((s for s in samples if s[1] >= STEADY_FROM * total), None)
    end = next((s for s in reversed(samples) if s[1] <= STEADY_TO * total), None)
    if start is None or end is None or end[0] - start[0] < 4 * RATE_POLL_S:
        return math.nan, math.nan, math.nan  # too short a run to tell
    return (end[column] - start[column]) / (end[0] - start[0]), start[0], end[0]


def after_first_window(
    samples: Sequence[Sample], variant: RateVariant, column: int
) -> tuple[float, float, float, float]:
    """From one window after the first admitted request to the last: (per
    second, 429 share, start, end), times since the first admitted request
    (read off the samples, to within a poll period)."""
    first = next((s for s in samples if s[1] > 0), None)
    if first is None:
        return math.nan, math.nan, math.nan, math.nan
    origin = first[0] - RATE_POLL_S / 2
    final = samples[-1][1]
    start = next((s for s in samples if s[0] >= origin + variant.window_s), None)
    end = next((s for s in samples if s[1] >= final), None)
    if start is None or end is None or end[0] - start[0] < 4 * RATE_POLL_S:
        return math.nan, math.nan, math.nan, math.nan
    per_s = (end[column] - start[column]) / (end[0] - start[0])
    share = ratio(end[3] - start[3], end[4] - start[4])
    return per_s, share, start[0] - origin, end[0] - origin


def _naive_ok_rows(stdout: str) -> int | None:
    """The naive script's own count (it writes no run report)."""
    match = re.search(r"naive: ok (\d+)", stdout)
    return None if match is None else int(match.group(1))


def rate_measurements(
    job: JobResult,
    stats: dict[str, Any],
    samples: Sequence[Sample],
    variant: RateVariant,
) -> None:
    """What the server saw of one job, in ``job.extra``.

    The achieved rate is measured by the server, over the span from the first
    to the last request it admitted: process start-up is not the limiter's to
    answer for (wall time vs ideal covers it), while the ramp to the limit and
    every slow-down after a 429 are in it. The steady rate leaves out the
    ramp and the end (see ``steady_rate``): what a long run sustains. "After
    the first window" leaves out the window a limit that is not reported is
    found in. Under a schedule, the limit is what it admits over the span.
    """
    naive_ok = _naive_ok_rows(job.stdout_tail)
    ok_rows = naive_ok if naive_ok is not None else job.extra.get("ok_rows", 0)
    span = float(stats["admitted_span_s"])
    column = 1 if variant.limit == "requests" else 2
    if variant.limit == "requests":
        per_s, limit_per_s = ratio(stats["admitted"], span), ratio(variant.admits(0.0, span), span)
        ideal_s = variant.ideal_s(job.rows)
    else:
        per_s, limit_per_s = ratio(stats["admitted_tokens"], span), RATE_TPM / 60.0
        # The rows' tokens, from the mean of those answered.
        ideal_s = ratio(stats["tokens"], stats["answered"]) * job.rows / limit_per_s
    steady, steady_start, steady_end = steady_rate(samples, stats["admitted"], column)
    after, after_429, after_start, after_end = after_first_window(samples, variant, column)
    if variant.limit == "requests":
        first = next((s[0] for s in samples if s[1] > 0), math.nan) - RATE_POLL_S / 2
        steady_limit = ratio(
            variant.admits(steady_start - first, steady_end - first), steady_end - steady_start
        )
        after_limit = ratio(variant.admits(after_start, after_end), after_end - after_start)
    else:
        steady_limit = after_limit = limit_per_s
    job.extra.update(
        server_requests=stats["requests"],
        answered_429=stats["rate_limited"],
        share_429=ratio(stats["rate_limited"], stats["requests"]),
        rate_share=ratio(per_s, limit_per_s),
        steady_share=ratio(steady, steady_limit),
        after_window_share=ratio(after, after_limit),
        after_window_429=after_429,
        lost_rows=job.rows - ok_rows if job.ok else job.rows,
        ideal_s=ideal_s,
        wall_over_ideal=ratio(job.wall_s, ideal_s),
    )


def section_rate(ctx: Context) -> dict[str, Any]:
    """Issue 4: how close to the server's real limit each mode runs, and at what
    429 cost; the tutorial approach on the same workload for comparison."""
    rows = ctx.sizes.rate_rows
    print(
        f"\n[rate] {rows:,} rows; server limit {RATE_RPM:,} requests/min or {RATE_TPM:,} "
        f"tokens/min over a {RATE_WINDOW_S:g} s window, {RATE_LATENCY_MS:.0f} +- "
        f"{RATE_JITTER_MS:.0f} ms; enrich concurrency {RATE_CONCURRENCY}"
    )
    variants = rate_variants(ctx)
    jobs: dict[str, list[JobResult]] = {name: [] for name in (*variants, "enrich start-up")}
    output = ctx.workdir / "rate-out.parquet"
    for index in ctx.rounds("rate"):
        order = list(variants.items())
        if index % 2:
            order.reverse()
        for name, variant in order:
            variant_rows = variant.rows or rows
            input_path = ctx.fresh_input(variant_rows)
            # A fresh server per job: no window, and no count, carried over.
            with Simulator(ctx.workdir, RATE_LATENCY_MS, *variant.flags()) as sim:
                label = re.sub(r"[^\w.]+", "-", f"rate-{name}-{index}")
                with StatsPoller(sim) as poller:
                    child = Child(variant.build(input_path, output, sim), ctx.workdir, label)
                    job = finish_job(
                        child, variant_rows, timeout_s=rate_timeout(variant, variant_rows)
                    )
                rate_measurements(job, sim.stats(), poller.samples, variant)
            report_rate_job(job)
            jobs[name].append(job)
            remove_outputs(output)
            input_path.unlink()
        jobs["enrich start-up"].append(ctx.startup_job("rate", index))
    startup_wall = med(jobs["enrich start-up"], "wall_s")
    entries: dict[str, dict[str, Any]] = {}
    for name in variants:
        entry = summarize(jobs[name])
        keys = (
            "rate_share",
            "steady_share",
            "after_window_share",
            "after_window_429",
            "share_429",
            "lost_rows",
            "ideal_s",
            "wall_over_ideal",
        )
        for key in keys:
            entry[key] = med(jobs[name], key)
        entry["answered_429"] = med(jobs[name], "answered_429")
        entry["net_wall_over_ideal"] = ratio(entry["wall_s"] - startup_wall, entry["ideal_s"])
        entry["rows"] = variants[name].rows or rows
        entries[name] = entry
    ctx.table(
        f"rate: {rows:,} rows; limit {RATE_RPM:,} rpm or {RATE_TPM:,} tpm over "
        f"{RATE_WINDOW_S:g} s, {RATE_LATENCY_MS:.0f} +- {RATE_JITTER_MS:.0f} ms (long windows: "
        + ", ".join(f"{r:,} rpm over {w:g} s" for w, r in RATE_LONG_WINDOWS)
        + f"; storm: {RATE_STORM_LOW_RPM:,} rpm from {RATE_STORM_FROM_S:g} s to "
        f"{RATE_STORM_UNTIL_S:g} s); medians; "
        "rate/limit measured by the server from its first to last admitted request, "
        f"steady from {STEADY_FROM:.0%} to {STEADY_TO:.0%} of them, after 1st window from "
        "one window after the first; "
        "targets: configured >= 95% with < 1% 429s, auto >= 90% with < 2%; "
        f"net = minus {startup_wall:.1f} s start-up",
        [
            Column("rows", "rows", 0),
            Column("rate/limit", "rate_share", 1, "%", 100.0),
            Column("steady", "steady_share", 1, "%", 100.0),
            Column("after 1st window", "after_window_share", 1, "%", 100.0),
            Column("429s after", "after_window_429", 2, "%", 100.0),
            Column("429 share", "share_429", 2, "%", 100.0),
            Column("429s", "answered_429", 0),
            Column("lost rows", "lost_rows", 0),
            WALL,
            Column("ideal s", "ideal_s", 1),
            Column("wall/ideal", "wall_over_ideal", 2, "x"),
            Column("net wall/ideal", "net_wall_over_ideal", 2, "x"),
            CPU_PER_ROW,
            RUNS,
        ],
        entries,
    )
    return {
        "rows": rows,
        "server": {
            "rpm": RATE_RPM,
            "tpm": RATE_TPM,
            "window_s": RATE_WINDOW_S,
            "latency_ms": RATE_LATENCY_MS,
            "jitter_ms": RATE_JITTER_MS,
            "long_windows": RATE_LONG_WINDOWS,
            "storm": {
                "low_rpm": RATE_STORM_LOW_RPM,
                "from_s": RATE_STORM_FROM_S,
                "until_s": RATE_STORM_UNTIL_S,
                "after_s": RATE_STORM_AFTER_S,
            },
        },
        "concurrency": RATE_CONCURRENCY,
        "summary": entries,
        "jobs": records(jobs),
    }


def report_rate_job(job: JobResult) -> None:
    extra = job.extra
    status = "" if job.ok else f"  FAILED (exit {job.exit_code})"
    print(
        f"    {job.name}: {job.wall_s:.1f} s ({extra['wall_over_ideal']:.2f}x ideal), "
        f"{100 * extra['rate_share']:.1f}% of the limit ({100 * extra['steady_share']:.1f}% "
        f"steady, {100 * extra['after_window_share']:.1f}% after the first window), "
        f"{extra['answered_429']:,} x 429 "
        f"({100 * extra['share_429']:.2f}%), {extra['lost_rows']:,} rows lost{status}"
    )
