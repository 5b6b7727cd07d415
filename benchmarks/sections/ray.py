"""Section ``ray``: the Ray engine against the single-process engine on the
same workload (issue 16), and against per-worker limiters with the limit
divided by hand (``--no-shared-limit``, Ray Data's way), in the same rounds.

The server enforces 6,000 requests/min over a 10 s window, 50 ms an answer.
Each Ray job starts its own local Ray (``ray.init()``), as a user's first
``--engine ray`` run does: its start-up is part of the wall time, and a
10-row job shows it alone. Peak RSS is the driver's (the process ``enrich``
runs in); Ray's own processes (raylet, GCS, workers) are not counted there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from harness import Context, JobResult, Simulator, Variant, records
from tables import RSS, RUNS, WALL, Column, med, ratio, summarize

RAY_RPM: Final = 6_000
RAY_WINDOW_S: Final = 10.0
RAY_LATENCY_MS: Final = 50.0
RAY_WORKERS: Final = 2
RAY_CONCURRENCY: Final = 16
STARTUP_ROWS: Final = 10


class Counts:
    """The simulator's 429s and requests per job (jobs run one at a time)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.last = sim.stats()

    def inspect(self, output: Path, job: JobResult) -> None:
        now = self.sim.stats()
        for key in ("requests", "rate_limited"):
            job.extra[key] = int(now[key]) - int(self.last[key])
        job.extra["share_429"] = ratio(job.extra["rate_limited"], job.extra["requests"])
        self.last = now


def section_ray(ctx: Context) -> dict[str, Any]:
    rows = ctx.sizes.ray_rows
    ideal_s = rows / (RAY_RPM / 60.0)
    print(
        f"\n[ray] {rows:,} rows at {RAY_RPM:,} rpm over a {RAY_WINDOW_S:g} s window "
        f"(ideal {ideal_s:.1f} s), {RAY_WORKERS} workers x {RAY_CONCURRENCY} in flight"
    )
    ray = ("--engine", "ray", "--workers", str(RAY_WORKERS))
    rpm = ("--rpm", str(RAY_RPM))
    flags = ("--rpm", str(RAY_RPM), "--window-s", str(RAY_WINDOW_S))
    with Simulator(ctx.workdir, RAY_LATENCY_MS, *flags) as sim:
        counts = Counts(sim)
        local = RAY_WORKERS * RAY_CONCURRENCY
        variants = {
            "local, configured": Variant(ctx.enrich(local, *rpm), rows, counts.inspect),
            "ray shared, configured": Variant(
                ctx.enrich(RAY_CONCURRENCY, *rpm, *ray), rows, counts.inspect
            ),
            "ray shared, auto": Variant(ctx.enrich(RAY_CONCURRENCY, *ray), rows, counts.inspect),
            "ray split by hand": Variant(
                ctx.enrich(RAY_CONCURRENCY, *rpm, *ray, "--no-shared-limit"), rows, counts.inspect
            ),
            f"local, {STARTUP_ROWS} rows": Variant(
                ctx.enrich(local, *rpm), STARTUP_ROWS, counts.inspect
            ),
            f"ray, {STARTUP_ROWS} rows": Variant(
                ctx.enrich(RAY_CONCURRENCY, *rpm, *ray), STARTUP_ROWS, counts.inspect
            ),
        }
        jobs = ctx.measure("ray", sim, variants)
    entries = {name: summarize(runs) for name, runs in jobs.items()}
    for name, entry in entries.items():
        for key in ("requests", "rate_limited", "share_429"):
            entry[key] = med(jobs[name], key)
        job_rows = STARTUP_ROWS if name.endswith(" rows") else rows
        entry["wall_vs_ideal"] = ratio(entry["wall_s"], job_rows / (RAY_RPM / 60.0))
    ctx.table(
        f"ray: {rows:,} rows, {RAY_RPM:,} rpm over {RAY_WINDOW_S:g} s, {RAY_LATENCY_MS:g} ms an "
        f"answer; {RAY_WORKERS} Ray workers (local Ray started per job); medians; "
        f"the {STARTUP_ROWS}-row jobs are start-up",
        [
            WALL,
            Column("wall/ideal", "wall_vs_ideal", 2, "x"),
            Column("429 share", "share_429", 2, "%", 100.0),
            Column("requests", "requests", 0),
            RSS,
            RUNS,
        ],
        entries,
    )
    return {
        "rpm": RAY_RPM,
        "window_s": RAY_WINDOW_S,
        "latency_ms": RAY_LATENCY_MS,
        "rows": rows,
        "summary": entries,
        "jobs": records(jobs),
    }
