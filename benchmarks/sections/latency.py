"""Section ``latency``: many slow requests; wall time against N x latency / concurrency."""

from __future__ import annotations

from typing import Any

from harness import ENRICH_STARTUP, NAIVE_STARTUP, Context, Simulator, Variant, naive_build, records
from tables import (
    CPU_SHARE,
    ROWS_PER_S,
    RSS,
    RUNS,
    WALL,
    Column,
    ratio,
    subtract_startup,
    summarize,
)


def section_latency(ctx: Context) -> dict[str, Any]:
    """(a) Many slow requests: wall time against the ideal N x latency / concurrency."""
    rows, latency_ms, concurrency = ctx.sizes.latency_rows, 100.0, 100
    ideal_s = rows * latency_ms / 1000.0 / concurrency
    print(f"\n[latency] {rows:,} rows, {latency_ms:.0f} ms latency, concurrency {concurrency}")
    variants = {
        "enrich": Variant(ctx.enrich(concurrency), rows),
        "naive gather": Variant(naive_build(concurrency), rows),
        "enrich start-up": Variant(ENRICH_STARTUP, 0),
        "naive start-up": Variant(NAIVE_STARTUP, 0),
    }
    with Simulator(ctx.workdir, latency_ms) as sim:
        jobs = ctx.measure("latency", sim, variants)
    entries = {name: summarize(runs) for name, runs in jobs.items()}
    for name in ("enrich", "naive gather"):
        entry = entries[name]
        subtract_startup(entry, entries[f"{name.split()[0]} start-up"], rows)
        entry["ideal_s"] = ideal_s
        entry["wall_over_ideal"] = ratio(entry["wall_s"], ideal_s)
        entry["net_wall_over_ideal"] = ratio(entry["net_wall_s"], ideal_s)
        entry["wall_vs_naive"] = ratio(entry["wall_s"], entries["naive gather"]["wall_s"])
    ctx.table(
        f"latency: {rows:,} rows x {latency_ms:.0f} ms server latency / concurrency "
        f"{concurrency} = ideal {ideal_s:.1f} s; medians; target: enrich wall/ideal <= 1.15x; "
        "net = minus the start-up row",
        [
            WALL,
            Column("wall/ideal", "wall_over_ideal", 2, "x"),
            Column("net wall/ideal", "net_wall_over_ideal", 2, "x"),
            Column("wall vs naive", "wall_vs_naive", 2, "x"),
            ROWS_PER_S,
            Column("net CPU ms/row", "net_cpu_ms_per_row"),
            CPU_SHARE,
            RSS,
            RUNS,
        ],
        entries,
    )
    return {"rows": rows, "latency_ms": latency_ms, "summary": entries, "jobs": records(jobs)}
