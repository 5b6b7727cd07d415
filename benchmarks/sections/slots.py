"""Section ``slots``: a self-hosted server with a fixed number of slots (issue 17).

The simulator computes N requests at once and queues the rest (``--slots``),
each for a time proportional to its answer (``--token-ms``), and computes what
a client abandons all the same. Against it: a plain synchronous loop (up to 4
slots: past that it is only N times slower), the ``asyncio.gather`` tutorial,
enrich with its defaults (no ``--concurrency``), and enrich with the in-flight
limit fixed (``--no-adaptive``) at N and at 2N, the best of which is what the
defaults are held to (target: >= 95% of its throughput, nothing computed for
nothing).

With ``--server-url`` (and ``--server-model``, ``--max-tokens``) the same
variants run against a server of yours instead, e.g. llama.cpp's with one
slot: fixed at 1 and 2, ``--slots-rows`` rows (15 by default). Its own counts
(computed, abandoned, queued) are unknown then.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from harness import (
    COLUMN,
    Build,
    Context,
    JobResult,
    Simulator,
    Variant,
    measured_module,
    measured_script,
    records,
)
from tables import ROWS_PER_S, RUNS, WALL, Column, med, ratio, summarize

SLOT_COUNTS: Final = (1, 4, 16)
# Past this many slots the plain loop is only that many times slower.
PLAIN_LOOP_MAX_SLOTS: Final = 4
# Rows against --server-url unless --slots-rows says: minutes on a small
# local model.
EXTERNAL_ROWS: Final = 15
# About 0.5 s an answer: 200 ms before the first token, 20 ms per token.
LATENCY_MS: Final = 200.0
TOKEN_MS: Final = 20.0

# What a newcomer writes first: one request after the other.
PLAIN_SCRIPT: Final = """
import sys
import openai, polars as pl

path, base_url, output, model, max_tokens = sys.argv[1:6]
extra = {"max_tokens": int(max_tokens)} if int(max_tokens) else {}
df = pl.read_parquet(path)
client = openai.OpenAI(base_url=base_url, max_retries=0)
answers = [
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], **extra
    ).choices[0].message.content
    for question in df["question"].to_list()
]
df.with_columns(pl.Series("response", answers)).write_parquet(output)
"""

# The asyncio tutorial: every prompt at once, the SDK's defaults.
GATHER_SCRIPT: Final = """
import asyncio, sys
import openai, polars as pl

async def main(path, base_url, output, model, max_tokens):
    extra = {"max_tokens": int(max_tokens)} if int(max_tokens) else {}
    df = pl.read_parquet(path)
    client = openai.AsyncOpenAI(base_url=base_url, max_retries=0)

    async def one(question):
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], **extra
        )
        return reply.choices[0].message.content

    answers = await asyncio.gather(*(one(q) for q in df["question"].to_list()))
    df.with_columns(pl.Series("response", answers)).write_parquet(output)
    await client.close()

asyncio.run(main(*sys.argv[1:6]))
"""


def script_build(ctx: Context, script: str) -> Build:
    def build(input_path: Path, output: Path, sim: Simulator) -> list[str]:
        args = (str(input_path), sim.base_url, str(output), ctx.server_model)
        return measured_script(script, *args, str(ctx.max_tokens or 0))

    return build


def enrich_run(ctx: Context, *flags: str, tree: str | None = None) -> Build:
    """enrich with ``flags``; none: the run finds the server's capacity.
    ``tree``: the code of that checkout instead of this one's."""

    def build(input_path: Path, output: Path, sim: Simulator) -> list[str]:
        limit = ("--max-tokens", str(ctx.max_tokens)) if ctx.max_tokens else ()
        # env(1) execs the child: the measured process is still enrich.
        code = ("env", f"PYTHONPATH={tree}") if tree else ()
        return [
            *code,
            *measured_module("pipeline", "run", "--quiet"),
            *("--input", str(input_path), "--column", COLUMN, "--output", str(output)),
            *("--model", ctx.server_model, "--base-url", sim.base_url, *limit),
            *flags,
            *ctx.enrich_flags,
        ]

    return build


class ExternalServer(Simulator):
    """A server of the user's at ``url``: nothing to start, no counts."""

    def __init__(self, workdir: Path, url: str) -> None:
        super().__init__(workdir, 0.0)
        self.url = url.rstrip("/")

    @property
    def base_url(self) -> str:
        return self.url

    def stats(self) -> dict[str, Any]:
        return {}

    def __enter__(self) -> ExternalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class ServerCounts:
    """The simulator's counters, per job: the difference since the last job
    (jobs run one after the other), and what enrich's report says it settled at."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.last = sim.stats()

    def inspect(self, output: Path, job: JobResult) -> None:
        now = self.sim.stats()
        if now:
            for key in ("computed", "abandoned", "answered"):
                job.extra[key] = int(now[key]) - int(self.last[key])
            queued = float(now["queue_wait_s"]) - float(self.last["queue_wait_s"])
            job.extra["queue_wait_s"] = queued
        self.last = now
        report = output.with_name(output.name + ".report.json")
        try:
            server = json.loads(report.read_text()).get("server", {})
        except (OSError, ValueError):
            return
        finally:
            # The next job writes to the same path: a script writes no report,
            # and must not be credited with this one.
            report.unlink(missing_ok=True)
        if isinstance(server.get("concurrency"), int | float):
            job.extra["settled"] = float(server["concurrency"])


def section_slots(ctx: Context) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for slots in (1,) if ctx.server_url else ctx.slot_counts or SLOT_COUNTS:
        rows = ctx.sizes.slots_rows * slots
        if ctx.server_url:
            print(f"\n[slots] {ctx.server_url}, {rows:,} rows, taken as {slots} slot(s)")
            server: Simulator = ExternalServer(ctx.workdir, ctx.server_url)
        else:
            print(
                f"\n[slots] {slots} slot(s), {rows:,} rows, {LATENCY_MS:.0f} ms + "
                f"{TOKEN_MS:.0f} ms per token an answer {' '.join(ctx.slot_server_flags)}"
            )
            flags = ("--slots", str(slots), "--token-ms", str(TOKEN_MS), *ctx.slot_server_flags)
            server = Simulator(ctx.workdir, LATENCY_MS, *flags)
        with server as sim:
            jobs = ctx.measure(f"slots-{slots}", sim, variants(ctx, sim, slots, rows))
        entries = summaries(jobs)
        where = ctx.server_url or " ".join(
            (f"{LATENCY_MS:.0f} ms + {TOKEN_MS:.0f} ms/token an answer", *ctx.slot_server_flags)
        )
        ctx.table(
            f"slots: {slots} slot(s), {rows:,} rows, {where}; medians; target: enrich "
            "defaults every row ok, nothing abandoned, rows/s >= 95% of the best fixed "
            "concurrency",
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
    return {
        "server_url": ctx.server_url,
        "latency_ms": LATENCY_MS,
        "token_ms": TOKEN_MS,
        "server_flags": list(ctx.slot_server_flags),
        "slots": results,
    }


def variants(ctx: Context, sim: Simulator, slots: int, rows: int) -> dict[str, Variant]:
    counts = ServerCounts(sim)
    chosen: dict[str, Variant] = {}
    if slots <= PLAIN_LOOP_MAX_SLOTS:
        chosen["plain loop"] = Variant(script_build(ctx, PLAIN_SCRIPT), rows, counts.inspect)
    chosen["asyncio.gather"] = Variant(script_build(ctx, GATHER_SCRIPT), rows, counts.inspect)
    chosen["enrich defaults"] = Variant(enrich_run(ctx), rows, counts.inspect)
    if ctx.baseline_tree:
        build = enrich_run(ctx, tree=ctx.baseline_tree)
        chosen["enrich defaults, baseline"] = Variant(build, rows, counts.inspect)
    for fixed in (slots, 2 * slots):
        build = enrich_run(ctx, "--concurrency", str(fixed), "--no-adaptive")
        chosen[f"enrich fixed {fixed}"] = Variant(build, rows, counts.inspect)
    return chosen


def summaries(jobs: dict[str, list[JobResult]]) -> dict[str, dict[str, Any]]:
    entries = {name: summarize(runs) for name, runs in jobs.items()}
    fixed = [name for name in entries if name.startswith("enrich fixed")]
    best = max((entries[name]["rows_per_s"] for name in fixed), default=float("nan"))
    baseline = entries.get("plain loop", entries["asyncio.gather"])
    for name, entry in entries.items():
        for key in ("computed", "abandoned", "queue_wait_s", "settled", "ok_rows"):
            entry[key] = med(jobs[name], key)
        entry["wasted_share"] = ratio(entry["abandoned"], entry["computed"])
        entry["vs_best_fixed"] = ratio(entry["rows_per_s"], best)
        entry["vs_plain"] = ratio(entry["wall_s"], baseline["wall_s"])
    return entries
