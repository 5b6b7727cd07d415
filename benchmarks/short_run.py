"""The ends of a short run: process start to first request, last answer to exit.

    python benchmarks/short_run.py                                   # this tree
    python benchmarks/short_run.py --baseline-tree /tmp/enrich-main  # and another
    python benchmarks/short_run.py --breakdown 3 --repeats 0         # the end, step by step

A short run against a one-slot server spends most of its wall time waiting
for answers; what enrich adds is at its two ends. Each job is ``enrich run``
(as ``python -m pipeline run``) over the first ``--rows`` (15) rows of
``pipeline/sample/questions.csv``, ``--no-cache``, against a fresh ``python -m
pipeline simulate --slots 1 --latency-ms 200 --token-ms 20`` (this
checkout's) reached through the start-up benchmark's relay, which notes the
first bytes of the first request and the last bytes of the last answer
(``time.perf_counter``, the system's monotonic clock). ``last answer to
exit`` is from those bytes to the process's exit (``Popen.wait``).

Variants, interleaved within each round in alternating order: this tree with
the report page (the default) and with ``--no-page``; with
``--baseline-tree DIR`` (``git archive <commit> pipeline | tar -x -C DIR``)
the same two from that tree (``PYTHONPATH=DIR``, same venv); and the plain
synchronous ``openai`` loop of ``sections/slots.py`` (reads the rows with
polars, writes Parquet at the end), as a reference. Figures are medians over
``--repeats`` (7) rounds; nothing is asserted.

``--breakdown N`` runs this tree N more times through ``end_trace.py`` and
prints, as medians, when each step of the end finished after the last answer
was collected, and the modules imported after it. ``--lag N`` measures what
the prefetch costs the answers still in flight: how late a 1 ms ticker on
the event loop runs while it imports, against the same ticker alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from startup import Relay, load
from startup import simulator as startup_simulator

REPO: Final = Path(__file__).resolve().parent.parent
SAMPLE: Final = REPO / "pipeline" / "sample" / "questions.csv"
COLUMN: Final = "question"
MODEL: Final = "sim-1"
JOB_TIMEOUT_S: Final = 300.0


@dataclass
class Job:
    wall_s: float
    first_request_s: float
    last_answer_to_exit_s: float
    report_wall_s: float | None
    rows_ok: int
    load: float


@dataclass
class Variant:
    name: str
    tree: str | None  # PYTHONPATH for the job; None: this checkout
    flags: tuple[str, ...] = ()
    loop: bool = False
    jobs: list[Job] = field(default_factory=list)


@contextlib.contextmanager
def simulator(env: dict[str, str], slots: int, latency_ms: float, token_ms: float) -> Iterator[int]:
    """A fresh one-slot simulator of this checkout (no queue left by a job before)."""
    flags = ("--slots", str(slots), "--latency-ms", str(latency_ms), "--token-ms", str(token_ms))
    with startup_simulator(env, *flags, cwd=REPO) as port:
        yield port


def job_argv(variant: Variant, workdir: Path, base_url: str) -> list[str]:
    if variant.loop:
        from sections.slots import PLAIN_SCRIPT

        output = workdir / "loop.parquet"
        script = [sys.executable, "-c", PLAIN_SCRIPT, str(workdir / "in.parquet"), base_url]
        return [*script, str(output), MODEL, "0"]
    argv = [sys.executable, "-m", "pipeline", "run", "--quiet", "--input", str(workdir / "in.csv")]
    argv += ["--column", COLUMN, "--output", str(workdir / "out.parquet"), "--model", MODEL]
    return [*argv, "--base-url", base_url, "--no-cache", *variant.flags]


def job_env(env: dict[str, str], variant: Variant) -> dict[str, str]:
    job = dict(env)
    if variant.tree is not None:
        job["PYTHONPATH"] = variant.tree
    return job


def rows_ok(variant: Variant, workdir: Path) -> tuple[int, float | None]:
    if variant.loop:
        import pyarrow.parquet as pq

        table = pq.read_table(workdir / "loop.parquet")
        return sum(1 for v in table.column("response").to_pylist() if v), None
    report = json.loads((workdir / "out.parquet.report.json").read_text())
    return int(report["counts"]["ok"]), float(report["timing"]["wall_s"])


def run_job(variant: Variant, workdir: Path, env: dict[str, str], args: argparse.Namespace) -> Job:
    for stale in workdir.glob("out.parquet*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    (workdir / "loop.parquet").unlink(missing_ok=True)
    with simulator(env, args.slots, args.latency_ms, args.token_ms) as port:
        relay = Relay(port)
        argv = job_argv(variant, workdir, f"http://127.0.0.1:{relay.address}/v1")
        started = time.perf_counter()
        # Outside the repository: `python -m` puts the working directory
        # first on the path, before PYTHONPATH's tree.
        proc = subprocess.Popen(
            argv,
            env=job_env(env, variant),
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        relay.pid = proc.pid
        _, err = proc.communicate(timeout=JOB_TIMEOUT_S)
        ended = time.perf_counter()
        relay.listener.close()
    if proc.returncode != 0 or relay.first is None or relay.last is None:
        tail = err.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{variant.name}: exit {proc.returncode}; stderr: {tail}")
    ok, report_wall = rows_ok(variant, workdir)
    return Job(
        wall_s=ended - started,
        first_request_s=relay.first - started,
        last_answer_to_exit_s=ended - relay.last,
        report_wall_s=report_wall,
        rows_ok=ok,
        load=load(),
    )


def write_inputs(workdir: Path, rows: int) -> None:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pcsv.read_csv(SAMPLE).slice(0, rows)
    pcsv.write_csv(table, workdir / "in.csv")
    pq.write_table(table, workdir / "in.parquet")


def variants(args: argparse.Namespace) -> list[Variant]:
    chosen = [Variant("this tree", None), Variant("this tree --no-page", None, ("--no-page",))]
    if args.baseline_tree:
        tree = str(Path(args.baseline_tree).resolve())
        chosen += [Variant("baseline", tree), Variant("baseline --no-page", tree, ("--no-page",))]
    if not args.no_loop:
        chosen.append(Variant("plain openai loop", None, loop=True))
    return chosen


def _med(values: Sequence[float | None]) -> str:
    present = [v for v in values if v is not None]
    return f"{statistics.median(present):7.3f}" if present else "      -"


def print_table(chosen: list[Variant]) -> None:
    if not any(variant.jobs for variant in chosen):
        return
    print(
        f"\n{'variant':<22} {'runs':>4} {'wall s':>7} {'first req s':>11} "
        f"{'last answer->exit s':>19} {'report wall s':>13} {'rows ok':>7} {'load':>5}"
    )
    for variant in chosen:
        jobs = variant.jobs
        if not jobs:
            continue
        print(
            f"{variant.name:<22} {len(jobs):>4} {_med([j.wall_s for j in jobs])} "
            f"{_med([j.first_request_s for j in jobs]):>11} "
            f"{_med([j.last_answer_to_exit_s for j in jobs]):>19} "
            f"{_med([j.report_wall_s for j in jobs]):>13} "
            f"{min(j.rows_ok for j in jobs):>7} {statistics.median(j.load for j in jobs):5.2f}"
        )


def breakdown(runs: int, workdir: Path, env: dict[str, str], args: argparse.Namespace) -> None:
    """The end of a run, step by step (``end_trace.py``), as medians: this
    tree's, and the baseline tree's when there is one (runs interleaved)."""
    trees: dict[str, str | None] = {"this tree": None}
    if args.baseline_tree:
        trees["baseline"] = str(Path(args.baseline_tree).resolve())
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for i in range(runs):
        for name, tree in trees.items():
            records[name].append(traced_run(workdir / f"trace-{i}.json", tree, workdir, env, args))
    for name, traced in records.items():
        print_breakdown(name, traced)


def traced_run(
    trace: Path, tree: str | None, workdir: Path, env: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    for stale in workdir.glob("out.parquet*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    tracer = Path(__file__).with_name("end_trace.py")
    job = dict(env, PYTHONPATH=tree) if tree else env
    with simulator(env, args.slots, args.latency_ms, args.token_ms) as port:
        argv = [sys.executable, str(tracer), str(trace), "run", "--quiet"]
        argv += ["--input", str(workdir / "in.csv"), "--column", COLUMN, "--model", MODEL]
        argv += ["--output", str(workdir / "out.parquet"), "--no-cache"]
        argv += ["--base-url", f"http://127.0.0.1:{port}/v1"]
        subprocess.run(argv, env=job, cwd=workdir, check=True, capture_output=True, timeout=300)
        exited = time.perf_counter()
    record: dict[str, Any] = json.loads(trace.read_text())
    record["exited"] = exited
    return record


def print_breakdown(name: str, records: list[dict[str, Any]]) -> None:
    ends: dict[str, list[float]] = {}
    spans: dict[str, list[float]] = {}
    for record in records:
        last = record["last_answer"]
        for mark in record["marks"]:
            if mark["ended"] >= last:
                ends.setdefault(mark["step"], []).append(mark["ended"] - last)
                spans.setdefault(mark["step"], []).append(mark["ended"] - mark["began"])
        ends.setdefault("atexit handlers", []).append(record["atexit"] - last)
        ends.setdefault("process exited", []).append(record["exited"] - last)
    print(f"\nthe end of the run, {name}: {len(records)} traced runs (medians, s)")
    print(f"  {'step':<28} {'done after last answer':>22} {'took':>7}")
    for step, values in sorted(ends.items(), key=lambda item: statistics.median(item[1])):
        took = f"{statistics.median(spans[step]):7.3f}" if step in spans else "      -"
        print(f"  {step:<28} {statistics.median(values):22.3f} {took}")
    # The audit hook sees import statements, not importlib.import_module:
    # what the prefetch thread imports does not show here.
    firsts: dict[str, tuple[float, str]] = {}
    for entry in records[-1]["imports_after_last_answer"]:
        package = entry["module"].split(".")[0]
        if package not in firsts:
            firsts[package] = (entry["at"] - records[-1]["last_answer"], entry["thread"])
    shown = ", ".join(f"{p} +{at:.3f} s ({thread})" for p, (at, thread) in firsts.items())
    print(f"  first imported after the last answer (last run): {shown or 'nothing'}")


# The event loop's lag while the prefetch imports (what answers arriving then
# are delayed by): a 1 ms ticker on the loop, the prefetch in its thread.
LAG_SCRIPT: Final = """
import asyncio, json, statistics, sys, time
from pipeline.prefetch import Prefetch, modules_for

async def ticks(until):
    gaps, last = [], time.perf_counter()
    while not until():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return gaps

async def main(page):
    import pyarrow  # imported by then in a run
    quiet_end = time.perf_counter() + 0.5
    quiet = await ticks(lambda: time.perf_counter() > quiet_end)
    prefetch = Prefetch(modules_for(page))
    started = time.perf_counter()
    prefetch.start()
    busy = await ticks(lambda: not prefetch._thread.is_alive())
    took = time.perf_counter() - started
    await prefetch.finished()
    print(json.dumps({"quiet": quiet, "busy": busy, "took": took}))

asyncio.run(main(sys.argv[1] == "page"))
"""


def lag(runs: int, env: dict[str, str]) -> None:
    """How late a 1 ms ticker on the event loop runs while the prefetch
    imports (page on), against the same ticker with nothing else going on."""
    quiet: list[float] = []
    busy: list[float] = []
    took: list[float] = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", LAG_SCRIPT, "page"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        record = json.loads(done.stdout)
        quiet += record["quiet"]
        busy += record["busy"]
        took.append(record["took"])

    def summary(gaps: list[float]) -> str:
        gaps = sorted(g * 1000 for g in gaps)
        p99 = gaps[int(len(gaps) * 0.99)]
        late = sum(g > 10 for g in gaps)
        return (
            f"p50 {statistics.median(gaps):.1f} ms, p99 {p99:.1f} ms, max {gaps[-1]:.1f} ms, "
            f"{late} of {len(gaps)} over 10 ms"
        )

    print(f"\nevent-loop ticks (1 ms sleeps), {runs} runs (load {load():.2f}):")
    print(f"  nothing else running:    {summary(quiet)}")
    print(f"  while the prefetch runs: {summary(busy)}")
    print(f"  the prefetch took {statistics.median(took):.3f} s (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="rounds of every variant")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--baseline-tree", help="another checkout's tree (PYTHONPATH)")
    parser.add_argument("--no-loop", action="store_true", help="leave the plain loop out")
    parser.add_argument("--breakdown", type=int, default=0, help="traced runs of this tree")
    parser.add_argument("--lag", type=int, default=0, help="runs of the event-loop lag probe")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--token-ms", type=float, default=20.0)
    args = parser.parse_args()
    # An installed package has its bytecode compiled (see startup.py).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    env = dict(os.environ, OPENAI_API_KEY="sk-short-run-bench", NO_PROXY="127.0.0.1,localhost")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "OPENAI_BASE_URL", "PYTHONPATH"):
        env.pop(name, None)
        env.pop(name.lower(), None)
    chosen = variants(args)
    print(f"load {load():.2f}; variants: {', '.join(v.name for v in chosen)}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        env["ENRICH_CACHE_DIR"] = str(workdir / "cache")
        write_inputs(workdir, args.rows)
        for round_ in range(args.repeats):
            order = chosen if round_ % 2 == 0 else chosen[::-1]
            for variant in order:
                variant.jobs.append(run_job(variant, workdir, env, args))
            print(f"round {round_ + 1}/{args.repeats} done (load {load():.2f})", flush=True)
        print_table(chosen)
        if args.breakdown:
            breakdown(args.breakdown, workdir, env, args)
    if args.lag:
        lag(args.lag, env)


if __name__ == "__main__":
    main()
