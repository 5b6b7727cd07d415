"""Section ``checkpoint``: what default checkpointing costs against one part at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from harness import Context, JobResult, Simulator, Variant, records
from tables import CPU_PER_ROW, ROWS_PER_S, RSS, RUNS, WALL, Column, med, ratio, summarize

# The effective "off" switch for checkpointing: one part, written at the end.
CHECKPOINT_OFF: Final = ("--flush-every", "1000000000", "--flush-interval", "1000000")


def count_parts(output: Path, job: JobResult) -> None:
    parts = output.with_name(output.name + ".enrich") / "parts"
    job.extra["parts"] = len(list(parts.glob("part-*.parquet")))


def section_checkpoint(ctx: Context) -> dict[str, Any]:
    """The price of durable progress: default flushing against one part at the end."""
    rows, concurrency = ctx.sizes.checkpoint_rows, 64
    print(f"\n[checkpoint] {rows:,} rows, zero latency, concurrency {concurrency}")
    # --keep-checkpoint on both, so the parts can be counted.
    keep = "--keep-checkpoint"
    variants = {
        "default flushing": Variant(ctx.enrich(concurrency, keep), rows, count_parts),
        "one part at the end": Variant(
            ctx.enrich(concurrency, keep, *CHECKPOINT_OFF), rows, count_parts
        ),
    }
    with Simulator(ctx.workdir, 0.0) as sim:
        jobs = ctx.measure("checkpoint", sim, variants)
    entries = {name: summarize(runs) for name, runs in jobs.items()}
    for name, entry in entries.items():
        entry["vs_off"] = ratio(entry["rows_per_s"], entries["one part at the end"]["rows_per_s"])
        entry["parts"] = med(jobs[name], "parts")
    ctx.table(
        f"checkpoint: {rows:,} rows, zero latency, concurrency {concurrency}; medians; "
        "target: default within 5% of off",
        [
            ROWS_PER_S,
            Column("rows/s vs off", "vs_off", 3, "x"),
            WALL,
            CPU_PER_ROW,
            Column("parts", "parts", 0),
            RSS,
            RUNS,
        ],
        entries,
    )
    return {"rows": rows, "concurrency": concurrency, "summary": entries, "jobs": records(jobs)}
