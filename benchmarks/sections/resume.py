"""Section ``resume``: a 99%-done job, time to its first request and its wall time."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Final

import polars as pl
from harness import (
    COLUMN,
    MODEL,
    Context,
    JobResult,
    Simulator,
    records,
    remove_outputs,
    timed_first_request,
)
from tables import RSS, RUNS, Column, med, ratio, summarize

# Rows per hand-made checkpoint part: the default --flush-every, so the resume
# section reads as many parts as a real run with default settings leaves behind.
RESUME_PART_ROWS: Final = 5000


def build_resume_checkpoint(input_path: Path, run_dir: Path, done_rows: int) -> int:
    """The run directory a run leaves when it dies at 99%: a manifest for this
    input and these settings, and default-sized parts for the first
    ``done_rows`` rows. Made with the pipeline's own Checkpoint, so its layout
    is exactly what a run writes. Returns the number of parts."""
    from pipeline.checkpoint import Checkpoint
    from pipeline.config import load_config
    from pipeline.results import RowResult
    from pipeline.runner import answer_settings

    questions = pl.read_parquet(input_path, columns=[COLUMN])[COLUMN]
    # The settings the CLI builds from enrich_build's flags (the output path and
    # the base URL are not part of the fingerprint).
    config = load_config(
        None,
        {
            "input.path": input_path,
            "input.column": COLUMN,
            "output.path": run_dir.with_suffix(".parquet"),
            "model.name": MODEL,
        },
    )
    checkpoint = Checkpoint.open(
        run_dir, input_path, answer_settings(config), input_rows=len(questions)
    )
    parts = 0
    writer = checkpoint.writer(RESUME_PART_ROWS)
    for start in range(0, done_rows, RESUME_PART_ROWS):
        texts = questions.slice(start, min(RESUME_PART_ROWS, done_rows - start)).to_list()
        batch = [
            RowResult(
                row_id=row_id,
                status="ok",
                response=f"[{MODEL}] answer to: {text}",
                latency_ms=1.0,
                attempts=1,
                prompt_tokens=len(text) // 4 + 4,
                completion_tokens=len(text) // 4 + 5,
                finish_reason="stop",
                model=MODEL,
            )
            for row_id, text in enumerate(texts, start=start)
        ]
        writer.append(batch)
        parts += 1
    writer.close()
    return parts


def section_resume(ctx: Context) -> dict[str, Any]:
    """Resuming a run that died at 99%: how long until the first new request."""
    rows, concurrency = ctx.sizes.resume_rows, 64
    done = rows - rows // 100
    print(f"\n[resume] {rows:,} rows, {done:,} already done, concurrency {concurrency}")
    started = time.perf_counter()
    input_path = ctx.fresh_input(rows)
    pristine = ctx.workdir / "resume-pristine.enrich"
    parts = build_resume_checkpoint(input_path, pristine, done)
    print(
        f"  made the input and {parts:,} checkpoint parts in {time.perf_counter() - started:.1f} s"
    )
    jobs: dict[str, list[JobResult]] = {"fresh start": [], "resume at 99%": []}
    for index in ctx.rounds("resume"):
        # The baseline: a fresh run over a same-sized input (start-up, hashing,
        # counting), stopped at its first request.
        fresh_input = ctx.fresh_input(rows)
        output = ctx.workdir / f"resume-fresh-{index}.parquet"
        with Simulator(ctx.workdir, 0.0) as sim:
            argv = ctx.enrich(concurrency)(fresh_input, output, sim)
            job = timed_first_request(f"resume-fresh-{index}", argv, 0, ctx.workdir, sim, stop=True)
            jobs["fresh start"].append(job)
        remove_outputs(output)
        fresh_input.unlink()
        # A copy per round: a finished resume leaves a complete checkpoint behind.
        output = ctx.workdir / f"resume-{index}.parquet"
        run_dir = ctx.workdir / f"resume-{index}.enrich"
        shutil.copytree(pristine, run_dir)
        with Simulator(ctx.workdir, 0.0) as sim:
            argv = ctx.enrich(concurrency, "--run-dir", str(run_dir))(input_path, output, sim)
            job = timed_first_request(
                f"resume-{index}", argv, rows - done, ctx.workdir, sim, stop=False
            )
            job.extra["requests_sent"] = sim.requests()
            jobs["resume at 99%"].append(job)
        remove_outputs(output)
        shutil.rmtree(run_dir, ignore_errors=True)
    entries = {name: summarize(runs) for name, runs in jobs.items()}
    fresh_first = entries["fresh start"]["first_request_s"]
    for name, entry in entries.items():
        entry["first_vs_fresh"] = ratio(entry["first_request_s"], fresh_first)
        entry["first_minus_fresh"] = entry["first_request_s"] - fresh_first
        entry["requests_sent"] = med(jobs[name], "requests_sent")
    # The fresh run was stopped on purpose: its wall time is not a run time.
    entries["fresh start"].update(wall_s=math.nan, rows_per_s=math.nan)
    ctx.table(
        f"resume: {rows:,}-row input, {done:,} rows done in {parts:,} parts; medians; "
        "first request = from process start to the simulator's first request",
        [
            Column("first request s", "first_request_s", 3),
            Column("vs fresh", "first_vs_fresh", 2, "x"),
            Column("extra s", "first_minus_fresh", 3),
            Column("total wall s", "wall_s"),
            Column("requests", "requests_sent", 0),
            RSS,
            RUNS,
        ],
        entries,
    )
    shutil.rmtree(pristine, ignore_errors=True)
    input_path.unlink()
    return {"rows": rows, "done_rows": done, "summary": entries, "jobs": records(jobs)}
