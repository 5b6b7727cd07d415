"""Section ``memory``: peak RSS over a 10x larger input."""

from __future__ import annotations

from typing import Any

from harness import Context, Simulator, Variant, records
from tables import ROWS_PER_S, RSS, RUNS, WALL, Column, ratio, summarize


def section_memory(ctx: Context) -> dict[str, Any]:
    """(c) Peak RSS must follow chunk size and concurrency, not the input's size."""
    big = ctx.sizes.memory_rows
    small = max(1, big // 10)
    floor = min(100, small)
    concurrency = 256
    print(f"\n[memory] {floor:,} / {small:,} / {big:,} rows, zero latency, concurrency 256")
    names = (f"{floor:,} rows (floor)", f"{small:,} rows", f"{big:,} rows")
    variants = {
        name: Variant(ctx.enrich(concurrency), rows)
        for name, rows in zip(names, (floor, small, big), strict=True)
    }
    with Simulator(ctx.workdir, 0.0) as sim:
        jobs = ctx.measure("memory", sim, variants)
    entries = {name: summarize(runs) for name, runs in jobs.items()}
    floor_rss, small_rss, big_rss = (entries[name]["max_rss_mb"] for name in names)
    growth = ratio(big_rss, small_rss)
    # Interpreter, imports and thread pools cost the same at any size; what is
    # above that floor is what could scale with the input.
    growth_above_floor = ratio(big_rss - floor_rss, small_rss - floor_rss)
    for entry in entries.values():
        entry["rss_vs_small"] = ratio(entry["max_rss_mb"], small_rss)
    ctx.table(
        f"memory: zero latency, concurrency {concurrency}; medians; input grows "
        f"{big / small:.0f}x, peak RSS grows {growth:.2f}x ({growth_above_floor:.2f}x above "
        f"the {floor}-row floor); target < 400 MB at 1,000,000 rows",
        [RSS, Column("RSS vs small", "rss_vs_small", 2, "x"), WALL, ROWS_PER_S, RUNS],
        entries,
    )
    return {
        "rows": dict(zip(names, (floor, small, big), strict=True)),
        "rss_growth": growth,
        "rss_growth_above_floor": growth_above_floor,
        "input_growth": big / small,
        "summary": entries,
        "jobs": records(jobs),
    }
