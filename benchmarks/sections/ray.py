"""Section ``ray``: the Ray engine against the single-process engine on the
same workload (issue 16), and against per-worker limiters with the limit
divided by hand (``--no-shared-limit``, Ray Data's way), in the same rounds.

The server enforces 6,000 requests/min over a 10 s window, 50 ms an answer.
Inputs come in row groups of ``RAY_SHARD_ROWS`` and the Ray jobs plan shards
of that many rows, so the Ray Data workers share several shards each.
Each Ray job starts its own local Ray (``ray.init()``), as a user's first
``--engine ray`` run does: its start-up is part of the wall time, and a
10-row job shows it alone. "peak RSS" is the driver's high-water mark (the
process ``enrich`` runs in); "tree RSS" the largest sum of resident memory
over the driver and every process it started (a local Ray's GCS, raylet,
workers), sampled every 0.5 s, and "largest" the largest single process.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Final

from harness import Context, JobResult, Simulator, Variant, records
from tables import RSS, RUNS, WALL, Column, med, ratio, summarize

from sections.rate import StatsPoller, steady_rate

RAY_RPM: Final = 6_000
RAY_WINDOW_S: Final = 10.0
RAY_LATENCY_MS: Final = 50.0
RAY_WORKERS: Final = 2
RAY_CONCURRENCY: Final = 16
RAY_SHARD_ROWS: Final = 250
STARTUP_ROWS: Final = 10
# How often the job's process tree's memory is sampled.
MEMORY_POLL_S: Final = 0.5


def _tree_rss_mb(marker: str) -> tuple[float, float, int]:
    """(total, largest, count) resident MB of the job's process tree: the
    process whose command line holds ``marker`` and all its descendants (a
    local Ray's GCS, raylet and workers are the driver's)."""
    parents: dict[int, int] = {}
    roots = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                roots.append(int(entry.name))
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    sizes = []
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        rss = next(
            (line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), "0"
        )
        sizes.append(int(rss) / 1024.0)
    return sum(sizes), max(sizes, default=0.0), len(sizes)


class TreeMemory:
    """Samples the running job's process tree every ``MEMORY_POLL_S``; each
    job's peaks are read (and reset) when it ends. Jobs run one at a time."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.peak = (0.0, 0.0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(MEMORY_POLL_S):
            total, largest, count = _tree_rss_mb(self.marker)
            old = self.peak
            self.peak = (max(old[0], total), max(old[1], largest), max(old[2], count))

    def take(self) -> tuple[float, float, int]:
        peak, self.peak = self.peak, (0.0, 0.0, 0)
        return peak

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Counts:
    """The simulator's 429s and requests per job, and the job's process tree's
    memory (jobs run one at a time)."""

    def __init__(self, sim: Simulator, memory: TreeMemory, poller: StatsPoller) -> None:
        self.sim = sim
        self.memory = memory
        self.poller = poller
        self.seen = 0
        self.last = sim.stats()

    def inspect(self, output: Path, job: JobResult) -> None:
        now = self.sim.stats()
        # The steady rate (the middle 80% of the job's requests admitted),
        # against the limit: what the ledger leaves unused, start-up apart.
        base = int(self.last["admitted"])
        samples = [
            (t, a - base, tok, rl, req) for t, a, tok, rl, req in self.poller.samples[self.seen :]
        ]
        self.seen = len(self.poller.samples)
        rate, _, _ = steady_rate(samples, job.rows, 1)
        job.extra["steady_vs_limit"] = rate / (RAY_RPM / 60.0)
        for key in ("requests", "rate_limited"):
            job.extra[key] = int(now[key]) - int(self.last[key])
        job.extra["share_429"] = ratio(job.extra["rate_limited"], job.extra["requests"])
        self.last = now
        total, largest, count = self.memory.take()
        job.extra["tree_rss_mb"] = total
        job.extra["largest_rss_mb"] = largest
        job.extra["processes"] = count


def section_ray(ctx: Context) -> dict[str, Any]:
    rows = ctx.sizes.ray_rows
    ideal_s = rows / (RAY_RPM / 60.0)
    print(
        f"\n[ray] {rows:,} rows at {RAY_RPM:,} rpm over a {RAY_WINDOW_S:g} s window "
        f"(ideal {ideal_s:.1f} s), {RAY_WORKERS} workers x {RAY_CONCURRENCY} in flight"
    )
    ray = ("--engine", "ray", "--workers", str(RAY_WORKERS), "--shard-rows", str(RAY_SHARD_ROWS))
    rpm = ("--rpm", str(RAY_RPM))
    flags = ("--rpm", str(RAY_RPM), "--window-s", str(RAY_WINDOW_S))
    output = ctx.workdir / "ray-out.parquet"  # in every job's command line (Context.measure)
    with (
        Simulator(ctx.workdir, RAY_LATENCY_MS, *flags) as sim,
        TreeMemory(str(output)) as memory,
        StatsPoller(sim) as poller,
    ):
        counts = Counts(sim, memory, poller)
        local = RAY_WORKERS * RAY_CONCURRENCY
        groups = RAY_SHARD_ROWS
        variants = {
            "local, configured": Variant(ctx.enrich(local, *rpm), rows, counts.inspect, groups),
            "ray shared, configured": Variant(
                ctx.enrich(RAY_CONCURRENCY, *rpm, *ray), rows, counts.inspect, groups
            ),
            "ray shared, auto": Variant(
                ctx.enrich(RAY_CONCURRENCY, *ray), rows, counts.inspect, groups
            ),
            "ray split by hand": Variant(
                ctx.enrich(RAY_CONCURRENCY, *rpm, *ray, "--no-shared-limit"),
                rows,
                counts.inspect,
                groups,
            ),
            f"local, {STARTUP_ROWS} rows": Variant(
                ctx.enrich(local, *rpm), STARTUP_ROWS, counts.inspect, groups
            ),
            f"ray, {STARTUP_ROWS} rows": Variant(
                ctx.enrich(RAY_CONCURRENCY, *rpm, *ray), STARTUP_ROWS, counts.inspect, groups
            ),
        }
        jobs = ctx.measure("ray", sim, variants)
    entries = {name: summarize(runs) for name, runs in jobs.items()}
    for name, entry in entries.items():
        for key in (
            "steady_vs_limit",
            "requests",
            "rate_limited",
            "share_429",
            "tree_rss_mb",
            "largest_rss_mb",
            "processes",
        ):
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
            Column("steady/limit", "steady_vs_limit", 0, "%", 100.0),
            Column("429 share", "share_429", 2, "%", 100.0),
            Column("requests", "requests", 0),
            RSS,
            Column("tree RSS MB", "tree_rss_mb", 0),
            Column("largest MB", "largest_rss_mb", 0),
            Column("procs", "processes", 0),
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
