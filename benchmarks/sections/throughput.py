"""Section ``throughput``: a zero-latency server, so the client's own CPU is the bound."""

from __future__ import annotations

from typing import Any

from harness import ENRICH_STARTUP, NAIVE_STARTUP, Context, Simulator, Variant, naive_build, records
from tables import (
    CPU_PER_ROW,
    CPU_SHARE,
    ROWS_PER_S,
    RSS,
    RUNS,
    STARTUP_COLUMNS,
    WALL,
    Column,
    ratio,
    subtract_startup,
    summarize,
)


def section_throughput(ctx: Context) -> dict[str, Any]:
    """(b) Zero latency: the client's own speed, end to end (start-up included)."""
    rows = ctx.sizes.throughput_rows
    print(f"\n[throughput] {rows:,} rows, zero latency, concurrency 256 and 16")
    variants: dict[str, Variant] = {}
    for concurrency in (256, 16):
        variants[f"enrich c={concurrency}"] = Variant(ctx.enrich(concurrency), rows)
        # The default transport (h11) against the aiohttp one, in the same rounds.
        aiohttp = ctx.enrich(concurrency, "--transport", "aiohttp")
        variants[f"enrich aiohttp c={concurrency}"] = Variant(aiohttp, rows)
        variants[f"naive gather c={concurrency}"] = Variant(naive_build(concurrency), rows)
    variants["enrich start-up"] = Variant(ENRICH_STARTUP, 0)
    variants["naive start-up"] = Variant(NAIVE_STARTUP, 0)
    with Simulator(ctx.workdir, 0.0) as sim:
        jobs = ctx.measure("throughput", sim, variants)
    entries = {name: summarize(runs) for name, runs in jobs.items()}
    for name, entry in entries.items():
        tool, _, setting = name.rpartition(" ")
        if setting.startswith("c="):
            naive = entries[f"naive gather {setting}"]
            subtract_startup(entry, entries[f"{tool.split()[0]} start-up"], rows)
            entry["rows_per_s_vs_naive"] = ratio(entry["rows_per_s"], naive["rows_per_s"])
    for concurrency in (256, 16):
        default, baseline = (
            entries[f"enrich c={concurrency}"],
            entries[f"enrich aiohttp c={concurrency}"],
        )
        for key in ("rows_per_s", "net_rows_per_s", "net_cpu_ms_per_row"):
            if key in default and key in baseline:
                default[f"{key}_vs_aiohttp"] = ratio(default[key], baseline[key])
    ctx.table(
        f"throughput: {rows:,} rows, zero latency; medians; rows/s is end to end incl. "
        "process start-up, net = minus the start-up row",
        [
            ROWS_PER_S,
            Column("rows/s vs naive", "rows_per_s_vs_naive", 2, "x"),
            Column("net rows/s vs aiohttp", "net_rows_per_s_vs_aiohttp", 2, "x"),
            Column("net CPU/row vs aiohttp", "net_cpu_ms_per_row_vs_aiohttp", 2, "x"),
            WALL,
            CPU_PER_ROW,
            *STARTUP_COLUMNS,
            CPU_SHARE,
            RSS,
            RUNS,
        ],
        entries,
    )
    return {"rows": rows, "summary": entries, "jobs": records(jobs)}
