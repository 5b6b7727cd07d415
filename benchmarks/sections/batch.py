"""Section ``batch``: the batch route (issue 15) over a 100,000-row input.

Each round, per variant, two enrich processes against one simulator whose
batches take an hour (``--batch-turnaround 3600``), which the benchmark skips
(``POST /_batches/advance``) between the two, so that what is timed is the
client's work, not a simulated wait:

1. ``enrich run --route batch --no-wait``: prepare the files, upload them,
   create the batches, exit 6 (batches pending). Its wall time is the time to
   prepare and upload; its peak RSS what preparing costs.
2. the same command without ``--no-wait``: poll, download, map the results
   back by ``custom_id``, write the output.

Between the two, the benchmark skips the hour and lists the batches itself,
which makes the simulator compute their answers (it does so when a batch is
looked at): the collecting run's time is then the client's alone.

The simulator's counters (``/_stats`` -> ``batch``) give the files and bytes
each job uploaded and the requests it had computed. The variants set the file
size (``--batch-max-requests``) and the input size apart: peak memory should
follow the file, not the dataset. Then ``enrich estimate --route batch`` on the
same input (``gpt-4o-mini``'s list price) gives the online and batch cost and
the number of files.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Final

from harness import (
    COLUMN,
    MODEL,
    Child,
    Context,
    JobResult,
    Simulator,
    child_env,
    finish_job,
    measured_module,
    records,
    remove_outputs,
    report_job,
)
from tables import RSS, RUNS, WALL, Column, med, ratio

# --no-wait ends with batches pending: ExitCode.BATCHES_PENDING.
PENDING_EXIT: Final = 6
# A priced model for the estimate (the simulator's sim-1 has no price).
PRICED_MODEL: Final = "gpt-4o-mini"
# The simulator's turnaround: longer than any submitting run, skipped afterwards.
TURNAROUND_S: Final = 3600
# The collecting run polls at most this often (seconds).
POLL_INTERVAL_S: Final = "1"

# Loopback only: never let a proxy from the environment see these requests.
_LOCAL: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def settle(sim: Simulator) -> None:
    """Skip the turnaround and list the newest batches: that completes them,
    answers computed, before the collecting run starts."""
    root = sim.base_url.removesuffix("/v1")
    skip = urllib.request.Request(f"{root}/_batches/advance?seconds={TURNAROUND_S}", b"")
    with _LOCAL.open(skip, timeout=30) as response:
        response.read()
    listing = urllib.request.Request(
        f"{sim.base_url}/batches?limit=100", headers={"Authorization": "Bearer sk-bench"}
    )
    with _LOCAL.open(listing, timeout=600) as response:
        response.read()


def batch_argv(input_path: Path, output: Path, sim: Simulator, per_file: int) -> list[str]:
    return [
        *measured_module("pipeline", "run", "--quiet", "--route", "batch"),
        *("--input", str(input_path), "--column", COLUMN, "--output", str(output)),
        *("--model", MODEL, "--base-url", sim.base_url),
        *("--batch-max-requests", str(per_file), "--batch-poll-interval", POLL_INTERVAL_S),
    ]


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return int(after[key]) - int(before[key])


def one_round(
    ctx: Context, sim: Simulator, name: str, rows: int, per_file: int, index: int
) -> tuple[JobResult, JobResult]:
    """Submit (--no-wait), then collect, one variant once; the counters of
    the server go into the submit job's ``extra``."""
    input_path = ctx.fresh_input(rows)
    output = ctx.workdir / "batch-out.parquet"
    label = re.sub(r"[^\w.]+", "-", f"batch-{name}-{index}")
    argv = batch_argv(input_path, output, sim, per_file)
    before = sim.stats()["batch"]
    submit = finish_job(
        Child([*argv, "--no-wait"], ctx.workdir, f"{label}-submit"),
        rows,
        ok_codes=(PENDING_EXIT,),
    )
    uploaded = sim.stats()["batch"]
    settle(sim)
    collect = finish_job(Child(argv, ctx.workdir, f"{label}-collect"), rows)
    after = sim.stats()["batch"]
    files = _delta(before, uploaded, "files_uploaded")
    submit.extra.update(
        files=files,
        bytes=_delta(before, uploaded, "bytes_uploaded"),
        batches=_delta(before, uploaded, "batches_created"),
        requests_per_file=ratio(rows, files),
        bytes_per_file=ratio(_delta(before, uploaded, "bytes_uploaded"), files),
    )
    collect.extra.update(
        computed=_delta(before, after, "computed"),
        downloads=sum(after["downloads_by_file"].values())
        - sum(before["downloads_by_file"].values()),
    )
    for job in (submit, collect):
        report_job(job)
    remove_outputs(output)
    input_path.unlink()
    return submit, collect


def estimate_both_routes(ctx: Context, rows: int) -> dict[str, Any]:
    """``enrich estimate --route batch --json`` on an input of ``rows``."""
    input_path = ctx.fresh_input(rows)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pipeline", "estimate", "--json", "--route", "batch"),
            *("--input", str(input_path), "--column", COLUMN, "--model", PRICED_MODEL),
        ],
        capture_output=True,
        text=True,
        cwd=ctx.workdir,
        env=child_env(ctx.workdir / "estimate.peak", ctx.workdir / "estimate.cache"),
        timeout=600,
        check=False,
    )
    input_path.unlink()
    if done.returncode != 0:
        print(f"    ! estimate exited {done.returncode}: {done.stderr[-500:]}")
        return {"exit_code": done.returncode, "stderr": done.stderr[-2000:]}
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def summarize_pair(submits: list[JobResult], collects: list[JobResult]) -> dict[str, Any]:
    return {
        "runs": sum(job.ok for job in submits),
        "files": med(submits, "files"),
        "requests_per_file": med(submits, "requests_per_file"),
        "mb_per_file": med(submits, "bytes_per_file") / 1e6,
        "wall_s": med(submits, "wall_s"),
        "max_rss_mb": med(submits, "max_rss_mb"),
        "collect_s": med(collects, "wall_s"),
        "collect_rss_mb": med(collects, "max_rss_mb"),
        "computed": med(collects, "computed"),
    }


def section_batch(ctx: Context) -> dict[str, Any]:
    """The closing note's figures for the batch route."""
    rows = ctx.sizes.batch_rows
    small = max(1, rows // 5)
    variants = {
        f"{rows:,} rows, 50,000/file": (rows, 50_000),
        f"{rows:,} rows, 10,000/file": (rows, 10_000),
        f"{small:,} rows, 10,000/file": (small, 10_000),
    }
    print(f"\n[batch] {rows:,} and {small:,} rows; files of 50,000 and 10,000 requests")
    submits: dict[str, list[JobResult]] = {name: [] for name in variants}
    collects: dict[str, list[JobResult]] = {name: [] for name in variants}
    with Simulator(ctx.workdir, 0.0, "--batch-turnaround", str(TURNAROUND_S)) as sim:
        for index in ctx.rounds("batch"):
            order = list(variants.items())
            if index % 2:
                order.reverse()
            for name, (count, per_file) in order:
                submit, collect = one_round(ctx, sim, name, count, per_file, index)
                submits[name].append(submit)
                collects[name].append(collect)
    entries = {name: summarize_pair(submits[name], collects[name]) for name in variants}
    estimate = estimate_both_routes(ctx, rows)
    ctx.table(
        f"batch route: prepare + upload + submit (--no-wait), then collect; medians; "
        f"turnaround skipped; estimate for {rows:,} rows ({PRICED_MODEL}): "
        f"{_estimate_line(estimate)}",
        [
            Column("files", "files", 0),
            Column("req/file", "requests_per_file", 0),
            Column("MB/file", "mb_per_file", 1),
            WALL,
            RSS,
            Column("collect s", "collect_s"),
            Column("collect MB", "collect_rss_mb", 0),
            Column("computed", "computed", 0),
            RUNS,
        ],
        entries,
    )
    return {
        "variants": {name: {"rows": r, "per_file": p} for name, (r, p) in variants.items()},
        "summary": entries,
        "estimate": estimate,
        "submit_jobs": records(submits),
        "collect_jobs": records(collects),
    }


def _estimate_line(estimate: dict[str, Any]) -> str:
    batch = estimate.get("batch")
    if not isinstance(batch, dict):
        return "not available"
    online, cheaper = estimate.get("cost_usd"), batch.get("cost_usd")
    if online is None or cheaper is None:
        return f"{batch.get('files')} files, no price"
    return f"online ${online:,.2f}, batch ${cheaper:,.2f} in {batch.get('files')} files"
