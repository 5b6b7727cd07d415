"""Section ``tail``: 1% of requests hang; wall time against the same run without hangs."""

from __future__ import annotations

import re
from typing import Any, Final

from harness import (
    REPO,
    Child,
    Context,
    JobResult,
    Simulator,
    finish_job,
    records,
    remove_outputs,
)
from tables import RUNS, WALL, Column, med, ratio, summarize

from sections.rate import RATE_CONCURRENCY, RATE_JITTER_MS, RATE_LATENCY_MS, RATE_RPM, RATE_WINDOW_S

# The tail section: the rate section's server and client (6,000 requests/min
# over a 1 s window, 200 +- 100 ms, concurrency 64, --rpm configured), with 1%
# of requests hanging: stuck connections that send nothing for 30-60 s and
# then answer (a client that waited gets its answer then; one that cut the
# request has retried it long before).
TAIL_HANG_RATE: Final = 0.01
TAIL_HANG_S: Final = 30.0
TAIL_HANG_MAX_S: Final = 60.0


def section_tail(ctx: Context) -> dict[str, Any]:
    """Issue: hung requests must not hold the run: with 1% of requests hanging
    30-60 s, the run's wall time against the same run without hangs (target
    <= 1.3x). Uses only flags every version has, so it measures the code
    before the change too; the simulator is always this checkout's."""
    rows = ctx.sizes.tail_rows
    ideal_s = rows / (RATE_RPM / 60.0)
    print(
        f"\n[tail] {rows:,} rows; {RATE_RPM:,} requests/min (server over {RATE_WINDOW_S:g} s "
        f"and --rpm), {RATE_LATENCY_MS:.0f} +- {RATE_JITTER_MS:.0f} ms, concurrency "
        f"{RATE_CONCURRENCY}; {TAIL_HANG_RATE:.0%} of requests hang "
        f"{TAIL_HANG_S:g}-{TAIL_HANG_MAX_S:g} s, then answer"
    )
    server = ["--jitter-ms", str(RATE_JITTER_MS), "--window-s", str(RATE_WINDOW_S)]
    server += ["--rpm", str(RATE_RPM)]
    hangs: tuple[str, ...] = ("--hang-rate", str(TAIL_HANG_RATE), "--hang-s", str(TAIL_HANG_S))
    hangs += ("--hang-max-s", str(TAIL_HANG_MAX_S), "--hang-answers")
    variants: dict[str, tuple[str, ...]] = {"no hangs": (), f"{TAIL_HANG_RATE:.0%} hangs": hangs}
    build = ctx.enrich(RATE_CONCURRENCY, "--rpm", str(RATE_RPM))
    jobs: dict[str, list[JobResult]] = {name: [] for name in (*variants, "enrich start-up")}
    output = ctx.workdir / "tail-out.parquet"
    for index in ctx.rounds("tail"):
        order = list(variants.items())
        if index % 2:
            order.reverse()
        for name, flags in order:
            input_path = ctx.fresh_input(rows)
            # A fresh server per job: no window, count or held request carried over.
            with Simulator(ctx.workdir, RATE_LATENCY_MS, *server, *flags) as sim:
                label = re.sub(r"[^\w.]+", "-", f"tail-{name}-{index}")
                job = finish_job(Child(build(input_path, output, sim), ctx.workdir, label), rows)
                stats = sim.stats()
            stalled = job.extra.get("stalled")  # from the run report
            job.extra.update(
                server_requests=stats["requests"],
                hangs=stats.get("hangs"),
                answered_429=stats["rate_limited"],
                ideal_s=ideal_s,
                wall_over_ideal=ratio(job.wall_s, ideal_s),
            )
            print(
                f"    {job.name}: {job.wall_s:.1f} s ({job.extra['wall_over_ideal']:.2f}x ideal), "
                f"{stats['requests']:,} requests, {stats.get('hangs', '?')} hangs, "
                f"stalled {'-' if stalled is None else stalled}, "
                f"{job.extra.get('error_rows', 0):,} rows in error"
                + ("" if job.ok else f"  FAILED (exit {job.exit_code})")
            )
            jobs[name].append(job)
            remove_outputs(output)
            input_path.unlink()
        jobs["enrich start-up"].append(ctx.startup_job("tail", index))
    startup_wall = med(jobs["enrich start-up"], "wall_s")
    entries: dict[str, dict[str, Any]] = {}
    for name in variants:
        entry = summarize(jobs[name])
        for key in ("server_requests", "hangs", "stalled", "answered_429", "error_rows"):
            entry[key] = med(jobs[name], key)
        entry["ideal_s"] = ideal_s
        entry["wall_over_ideal"] = ratio(entry["wall_s"], ideal_s)
        entry["net_wall_over_ideal"] = ratio(entry["wall_s"] - startup_wall, ideal_s)
        entries[name] = entry
    calm = entries["no hangs"]["wall_s"]
    for entry in entries.values():
        entry["wall_vs_no_hangs"] = ratio(entry["wall_s"], calm)
        entry["net_wall_vs_no_hangs"] = ratio(entry["wall_s"] - startup_wall, calm - startup_wall)
    ctx.table(
        f"tail: {rows:,} rows at {RATE_RPM:,} rpm = ideal {ideal_s:.0f} s; "
        f"{TAIL_HANG_RATE:.0%} of requests hang {TAIL_HANG_S:g}-{TAIL_HANG_MAX_S:g} s; medians; "
        "target: wall with hangs <= 1.3x without; "
        f"net = minus {startup_wall:.1f} s start-up",
        [
            WALL,
            Column("vs no hangs", "wall_vs_no_hangs", 2, "x"),
            Column("net vs no hangs", "net_wall_vs_no_hangs", 2, "x"),
            Column("wall/ideal", "wall_over_ideal", 2, "x"),
            Column("hangs", "hangs", 0),
            Column("stalled", "stalled", 0),
            Column("requests", "server_requests", 0),
            Column("429s", "answered_429", 0),
            Column("error rows", "error_rows", 0),
            RUNS,
        ],
        entries,
    )
    return {
        "rows": rows,
        "server": {
            "rpm": RATE_RPM,
            "window_s": RATE_WINDOW_S,
            "latency_ms": RATE_LATENCY_MS,
            "jitter_ms": RATE_JITTER_MS,
            "hang_rate": TAIL_HANG_RATE,
            "hang_s": [TAIL_HANG_S, TAIL_HANG_MAX_S],
            "code": str(REPO),
        },
        "concurrency": RATE_CONCURRENCY,
        "summary": entries,
        "jobs": records(jobs),
    }
