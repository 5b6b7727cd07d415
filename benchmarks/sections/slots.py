"""Section ``slots``: a self-hosted server with a fixed number of slots (issue 17).

The simulator computes N requests at once and queues the rest (``--slots``),
each for a time proportional to its answer (``--token-ms``), and computes what
a client abandons all the same. Against it: a plain synchronous loop, the
``asyncio.gather`` tutorial, enrich with its defaults (no ``--concurrency``),
and enrich with the in-flight limit fixed (``--no-adaptive``) at N and at 2N,
the best of which is what the defaults are held to (target: >= 95% of its
throughput, nothing computed for nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from harness import (
    COLUMN,
    MODEL,
    Build,
    Context,
    JobResult,
    Simulator,
    Variant,
    measured_module,
    measured_script,
    naive_build,
    records,
)
from tables import ROWS_PER_S, RUNS, WALL, Column, med, ratio, summarize

SLOT_COUNTS: Final = (1, 4)
# About 0.5 s an answer: 200 ms before the first token, 20 ms per token.
LATENCY_MS: Final = 200.0
TOKEN_MS: Final = 20.0

# What a newcomer writes first: one request after the other.
PLAIN_SCRIPT: Final = """
import sys
import openai, polars as pl

path, base_url, output, model = sys.argv[1:5]
df = pl.read_parquet(path)
client = openai.OpenAI(base_url=base_url, max_retries=0)
answers = [
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}]
    ).choices[0].message.content
    for question in df["question"].to_list()
]
df.with_columns(pl.Series("response", answers)).write_parquet(output)
"""


def plain_build(input_path: Path, output: Path, sim: Simulator) -> list[str]:
    return measured_script(PLAIN_SCRIPT, str(input_path), sim.base_url, str(output), MODEL)


def enrich_defaults(ctx: Context) -> Build:
    """enrich with no --concurrency: the run finds the server's capacity."""

    def build(input_path: Path, output: Path, sim: Simulator) -> list[str]:
        return [
            *measured_module("pipeline", "run", "--quiet"),
            *("--input", str(input_path), "--column", COLUMN, "--output", str(output)),
            *("--model", MODEL, "--base-url", sim.base_url),
            *ctx.enrich_flags,
        ]

    return build


class ServerCounts:
    """The simulator's counters, per job: the difference since the last job
    (jobs run one after the other), and what enrich's report says it settled at."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.last = sim.stats()

    def inspect(self, output: Path, job: JobResult) -> None:
        now = self.sim.stats()
        for key in ("computed", "abandoned", "answered"):
            job.extra[key] = int(now[key]) - int(self.last[key])
        job.extra["queue_wait_s"] = float(now["queue_wait_s"]) - float(self.last["queue_wait_s"])
        self.last = now
        report = output.with_name(output.name + ".report.json")
        try:
            server = json.loads(report.read_text()).get("server", {})
        except (OSError, ValueError):
            return
        if isinstance(server.get("concurrency"), int | float):
            job.extra["settled"] = float(server["concurrency"])


def section_slots(ctx: Context) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for slots in SLOT_COUNTS:
        rows = ctx.sizes.slots_rows * slots
        print(
            f"\n[slots] {slots} slot(s), {rows:,} rows, {LATENCY_MS:.0f} ms + {TOKEN_MS:.0f} ms "
            "per token an answer"
        )
        flags = ("--slots", str(slots), "--token-ms", str(TOKEN_MS))
        with Simulator(ctx.workdir, LATENCY_MS, *flags) as sim:
            counts = ServerCounts(sim)
            variants = {
                "plain loop": Variant(plain_build, rows, counts.inspect),
                "asyncio.gather": Variant(naive_build(rows), rows, counts.inspect),
                "enrich defaults": Variant(enrich_defaults(ctx), rows, counts.inspect),
                f"enrich fixed {slots}": Variant(
                    ctx.enrich(slots, "--no-adaptive"), rows, counts.inspect
                ),
                f"enrich fixed {2 * slots}": Variant(
                    ctx.enrich(2 * slots, "--no-adaptive"), rows, counts.inspect
                ),
            }
            jobs = ctx.measure(f"slots-{slots}", sim, variants)
        entries = {name: summarize(runs) for name, runs in jobs.items()}
        fixed = [name for name in entries if name.startswith("enrich fixed")]
        best = max((entries[name]["rows_per_s"] for name in fixed), default=float("nan"))
        for name, entry in entries.items():
            for key in ("computed", "abandoned", "queue_wait_s", "settled", "ok_rows"):
                entry[key] = med(jobs[name], key)
            entry["wasted_share"] = ratio(entry["abandoned"], entry["computed"])
            entry["vs_best_fixed"] = ratio(entry["rows_per_s"], best)
            entry["vs_plain"] = ratio(entry["wall_s"], entries["plain loop"]["wall_s"])
        ctx.table(
            f"slots: {slots} slot(s), {rows:,} rows, {LATENCY_MS:.0f} ms + {TOKEN_MS:.0f} ms/token "
            "an answer; medians; target: enrich defaults every row ok, nothing abandoned, "
            "rows/s >= 95% of the best fixed concurrency",
            [
                WALL,
                Column("wall vs loop", "vs_plain", 2, "x"),
                ROWS_PER_S,
                Column("vs best fixed", "vs_best_fixed", 0, "%", 100.0),
                Column("rows ok", "ok_rows", 0),
                Column("computed", "computed", 0),
                Column("abandoned", "abandoned", 0),
                Column("queue s", "queue_wait_s", 1),
                Column("settled", "settled", 1),
                RUNS,
            ],
            entries,
        )
        results[str(slots)] = {"rows": rows, "summary": entries, "jobs": records(jobs)}
    return {"latency_ms": LATENCY_MS, "token_ms": TOKEN_MS, "slots": results}
