"""Durability benchmarks for enrich: answers paid twice per SIGKILL, and peak
memory with large answers.

    python benchmarks/durability.py [--only kills memory] [--kills N] [--repeats N]

Reuses bench.py's machinery: every job is its own process (``python -m pipeline
run ... --quiet``, through bench.py's ``MEASURED`` wrapper, which reports the
job's own peak RSS), the simulator (``python -m pipeline simulate``) runs in
another process on 127.0.0.1 on a free port, and every job gets an empty
response cache of its own (``ENRICH_CACHE_DIR``). Only CLI flags that exist in
every version being compared are used; checkpointing runs with its defaults.

kills
    Each trial: a fresh simulator (100 +- 50 ms, no faults) and a fresh
    ``--kill-rows`` input; the run (``--concurrency 64 --no-cache``) is
    SIGKILLed a random 1-4 s (seeded) after the simulator answered its first
    request, then the same command is run again to completion. The simulator
    counts the answers it delivered per prompt, so "paid twice" is exact: the
    answers beyond the first, per prompt, over both runs.
memory
    Peak RSS and wall time of one run over ``--memory-rows`` rows whose prompts,
    and therefore answers (the simulator echoes the prompt), are
    ``--prompt-kb`` KB each; zero latency, ``--concurrency 64 --no-cache``.

Nothing is asserted: tables are printed and every number is written to
``bench-results/durability-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import polars as pl

# Run as `python benchmarks/durability.py`, this folder is first on sys.path.
from harness import (
    COLUMN,
    RESULTS_DIR,
    Child,
    JobResult,
    Simulator,
    enrich_build,
    environment,
    finish_job,
    make_input,
    remove_outputs,
)
from tables import Column, render_table

SECTIONS: Final = ("kills", "memory")
CONCURRENCY: Final = 64
# Flags every run gets: the response cache would answer a resumed row for free.
RUN_FLAGS: Final = ("--no-cache",)

KILL_LATENCY_MS: Final = 100.0
KILL_JITTER_MS: Final = 50.0
# The kill comes this long after the simulator's first answer (uniform).
KILL_DELAY_S: Final = (1.0, 4.0)
# Poll period for the first answer; /_stats is small then.
FIRST_ANSWER_POLL_S: Final = 0.02
# After the SIGKILL, the server finishes the requests it was holding (at most
# latency + jitter); those that end after it saw the connection close are not
# counted as answered. Wait that out before reading the count.
SETTLE_S: Final = 0.5


# ---------------------------------------------------------------------------
# kills


@dataclass
class KillTrial:
    """One run SIGKILLed mid-way, then the same command run to completion."""

    index: int
    rows: int
    delay_s: float  # planned: from the first answer to the kill
    killed: bool = False  # False: the run had exited before the kill was due
    killed_exit_code: int | None = None
    killed_after_s: float = math.nan  # from process start
    answered_before_kill: int = 0  # /_stats just before the SIGKILL
    in_flight_before_kill: int = 0
    answered_at_kill: int = 0  # /_stats once the server settled after the kill
    answered_rate: float = math.nan  # answers/s, first answer -> just before the kill
    resume_exit_code: int | None = None
    resume_wall_s: float = math.nan
    resume_peak_rss_mb: float = math.nan
    resume_from_checkpoint: int | None = None  # the resumed run's own summary
    resume_requests: int | None = None
    answered_total: int = 0
    output_rows: int = 0
    prompts_answered: int = 0  # distinct prompts the server answered
    paid_twice: int = 0  # answers beyond the first, per prompt
    loadavg_1m: float = 0.0

    @property
    def paid_twice_by_rows(self) -> int:
        """The same figure from the totals alone: answers billed minus rows kept."""
        return self.answered_total - self.output_rows

    @property
    def saved_at_kill(self) -> int:
        """The killed run's answers that the resume did not pay again."""
        return self.answered_at_kill - self.paid_twice

    @property
    def paid_twice_s(self) -> float:
        """Paid-twice answers in seconds of the run's answering rate."""
        if not self.answered_rate or math.isnan(self.answered_rate):
            return math.nan
        return self.paid_twice / self.answered_rate

    def as_dict(self) -> dict[str, Any]:
        record = dict(vars(self))
        record.update(
            paid_twice_by_rows=self.paid_twice_by_rows,
            saved_at_kill=self.saved_at_kill,
            paid_twice_s=self.paid_twice_s,
        )
        return record


def wait_for_first_answer(sim: Simulator, child: Child, timeout_s: float) -> tuple[float, int]:
    """(monotonic time, answered count) at the first answered request seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not child.has_exited():
        answered = int(sim.stats()["answered"])
        if answered:
            return time.monotonic(), answered
        time.sleep(FIRST_ANSWER_POLL_S)
    raise RuntimeError(f"{child.name}: no answer within {timeout_s:.0f} s (or it exited)")


def sleep_unless_exited(child: Child, until: float) -> None:
    while time.monotonic() < until and not child.has_exited():
        time.sleep(min(0.05, max(0.0, until - time.monotonic())))


def output_row_count(output: Path) -> int:
    if not output.exists():
        return 0
    return int(pl.scan_parquet(output).select(pl.len()).collect().item())


def kill_trial(
    workdir: Path, index: int, rows: int, salt: int, rng: random.Random
) -> tuple[KillTrial, JobResult, JobResult]:
    input_path = make_input(workdir, rows, salt)
    output = workdir / f"kill-{index}.parquet"
    trial = KillTrial(index=index, rows=rows, delay_s=rng.uniform(*KILL_DELAY_S))
    flags = ("--jitter-ms", str(KILL_JITTER_MS))
    # A fresh server per trial: its counters cover this trial alone.
    with Simulator(workdir, KILL_LATENCY_MS, *flags) as sim:
        argv = enrich_build(CONCURRENCY, *RUN_FLAGS)(input_path, output, sim)
        child = Child(argv, workdir, f"kill-{index}-run")
        try:
            first_at, first_answered = wait_for_first_answer(sim, child, timeout_s=120.0)
            sleep_unless_exited(child, first_at + trial.delay_s)
            if not child.has_exited():
                before = sim.stats()
                snapshot_at = time.monotonic()
                child.proc.send_signal(signal.SIGKILL)
                trial.killed = True
                trial.killed_after_s = time.perf_counter() - child.started
                trial.answered_before_kill = int(before["answered"])
                trial.in_flight_before_kill = int(before["in_flight"])
                trial.answered_rate = (trial.answered_before_kill - first_answered) / (
                    snapshot_at - first_at
                )
        except BaseException:
            # Leave no job running behind the benchmark (not yet reaped: the pid is ours).
            child.proc.kill()
            child.wait(30.0)
            raise
        killed = finish_job(child, rows, ok_codes=(-signal.SIGKILL, 0))
        trial.killed_exit_code = killed.exit_code
        time.sleep(SETTLE_S)
        trial.answered_at_kill = int(sim.stats()["answered"])
        # The resume: exactly the same command, run to completion.
        resumed = finish_job(Child(argv, workdir, f"kill-{index}-resume"), rows)
        final = sim.stats()
    counts: dict[str, int] = final["answered_by_content"]
    trial.answered_total = int(final["answered"])
    trial.prompts_answered = len(counts)
    trial.paid_twice = sum(count - 1 for count in counts.values() if count > 1)
    trial.output_rows = output_row_count(output)
    trial.resume_exit_code = resumed.exit_code
    trial.resume_wall_s = resumed.wall_s
    trial.resume_peak_rss_mb = resumed.max_rss_mb
    trial.resume_from_checkpoint = resumed.extra.get("resumed_rows")
    trial.resume_requests = resumed.extra.get("requests")
    trial.loadavg_1m = os.getloadavg()[0]
    remove_outputs(output)
    input_path.unlink()
    return trial, killed, resumed


def report_trial(trial: KillTrial) -> None:
    notes = []
    if not trial.killed:
        notes.append("FINISHED BEFORE THE KILL")
    if trial.resume_exit_code != 0:
        notes.append(f"RESUME EXITED {trial.resume_exit_code}")
    if trial.output_rows != trial.rows:
        notes.append(f"OUTPUT HAS {trial.output_rows:,} ROWS")
    if trial.prompts_answered != trial.rows:
        notes.append(f"{trial.rows - trial.prompts_answered:,} PROMPTS NEVER ANSWERED")
    print(
        f"    kill {trial.index + 1}: killed {trial.delay_s:.2f} s after the first answer "
        f"at {trial.answered_at_kill:,} answered ({trial.in_flight_before_kill} in flight, "
        f"{trial.answered_rate:,.0f} answers/s); resume {trial.resume_wall_s:.1f} s, "
        f"from checkpoint {trial.resume_from_checkpoint}; paid twice {trial.paid_twice:,} "
        f"({trial.paid_twice_s:.2f} s of answers){'; ' + ', '.join(notes) if notes else ''}"
    )


def median_of(values: Sequence[float]) -> float:
    numbers = [v for v in values if not math.isnan(v)]
    return statistics.median(numbers) if numbers else math.nan


def section_kills(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    rows, kills = args.kill_rows, args.kills
    print(
        f"\n[kills] {kills} trials of {rows:,} rows, {KILL_LATENCY_MS:.0f} +- "
        f"{KILL_JITTER_MS:.0f} ms, concurrency {CONCURRENCY}; SIGKILL "
        f"{KILL_DELAY_S[0]:g}-{KILL_DELAY_S[1]:g} s after the first answer, then resume"
    )
    rng = random.Random(args.seed)
    trials: list[KillTrial] = []
    jobs: list[dict[str, Any]] = []
    for index in range(kills):
        trial, killed, resumed = kill_trial(workdir, index, rows, salt=1000 + index, rng=rng)
        report_trial(trial)
        trials.append(trial)
        jobs += [killed.as_dict(), resumed.as_dict()]
    paid = [t.paid_twice for t in trials if t.killed]
    summary: dict[str, Any] = {
        "trials": len(trials),
        "killed": sum(t.killed for t in trials),
        "paid_twice": [t.paid_twice for t in trials],
        "paid_twice_median": median_of([float(p) for p in paid]),
        "paid_twice_max": max(paid) if paid else math.nan,
        "paid_twice_total": sum(paid),
        "answered_rate_median": median_of([t.answered_rate for t in trials]),
        "paid_twice_s": [t.paid_twice_s for t in trials],
        "paid_twice_s_median": median_of([t.paid_twice_s for t in trials]),
        "paid_twice_s_max": max((t.paid_twice_s for t in trials), default=math.nan),
        "in_flight_before_kill": [t.in_flight_before_kill for t in trials],
        "in_flight_median": median_of([float(t.in_flight_before_kill) for t in trials]),
        "answered_at_kill_median": median_of([float(t.answered_at_kill) for t in trials]),
        "saved_at_kill_median": median_of([float(t.saved_at_kill) for t in trials]),
        "resume_exit_codes": [t.resume_exit_code for t in trials],
        "resume_wall_s_median": median_of([t.resume_wall_s for t in trials]),
        "incomplete_outputs": sum(t.output_rows != t.rows for t in trials),
    }
    entries = {
        f"kill {t.index + 1}": {
            "delay_s": t.delay_s,
            "answered_at_kill": t.answered_at_kill,
            "in_flight": t.in_flight_before_kill,
            "saved": t.saved_at_kill,
            "paid_twice": t.paid_twice,
            "rate": t.answered_rate,
            "paid_twice_s": t.paid_twice_s,
            "resume_exit": t.resume_exit_code,
        }
        for t in trials
    }
    entries["median"] = {
        "answered_at_kill": summary["answered_at_kill_median"],
        "in_flight": summary["in_flight_median"],
        "saved": summary["saved_at_kill_median"],
        "paid_twice": summary["paid_twice_median"],
        "rate": summary["answered_rate_median"],
        "paid_twice_s": summary["paid_twice_s_median"],
    }
    entries["max"] = {"paid_twice": summary["paid_twice_max"]}
    table = render_table(
        f"kills: {rows:,} rows per trial, {KILL_LATENCY_MS:.0f} +- {KILL_JITTER_MS:.0f} ms, "
        f"concurrency {CONCURRENCY}, --no-cache, default checkpointing; SIGKILL "
        f"{KILL_DELAY_S[0]:g}-{KILL_DELAY_S[1]:g} s after the first answer (seed {args.seed}), "
        "then the same command to completion; paid twice = answers beyond the first per "
        "prompt (server count); s = paid twice / answers per s before the kill",
        [
            Column("delay s", "delay_s", 2),
            Column("answered", "answered_at_kill", 0),
            Column("in flight", "in_flight", 0),
            Column("saved", "saved", 0),
            Column("paid twice", "paid_twice", 0),
            Column("answers/s", "rate", 0),
            Column("paid twice s", "paid_twice_s", 2),
            Column("resume exit", "resume_exit", 0),
        ],
        entries,
    )
    print("\n" + table)
    result = {
        "rows": rows,
        "concurrency": CONCURRENCY,
        "latency_ms": KILL_LATENCY_MS,
        "jitter_ms": KILL_JITTER_MS,
        "kill_delay_s": KILL_DELAY_S,
        "seed": args.seed,
        "summary": summary,
        "trials": [t.as_dict() for t in trials],
        "jobs": jobs,
    }
    return result, table


# ---------------------------------------------------------------------------
# memory


def make_large_input(directory: Path, rows: int, prompt_bytes: int, salt: int) -> Path:
    """Unique ASCII prompts of exactly ``prompt_bytes`` bytes: a ``Q<salt>-<row>:``
    prefix, then text cut from a shared block at a row-dependent offset."""
    rng = random.Random(salt)
    words = ("the", "data", "pipeline", "parquet", "checkpoint", "latency", "model", "answer")
    block = " ".join(rng.choice(words) for _ in range(2 * prompt_bytes // 5))
    while len(block) < 2 * prompt_bytes:
        block += " " + block
    prompts = []
    for row in range(rows):
        prefix = f"Q{salt:04d}-{row}: "
        offset = (row * 7919) % prompt_bytes
        prompts.append(prefix + block[offset : offset + prompt_bytes - len(prefix)])
    path = directory / f"large-{rows}-{prompt_bytes}-{salt}.parquet"
    pl.DataFrame({"id": range(rows), COLUMN: prompts}).write_parquet(path)
    return path


def section_memory(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], str]:
    rows, prompt_bytes = args.memory_rows, args.prompt_kb * 1000
    print(
        f"\n[memory] {rows:,} rows of {prompt_bytes:,}-byte prompts (answers about as "
        f"large), zero latency, concurrency {CONCURRENCY}, {args.repeats} repeats"
    )
    input_path = make_large_input(workdir, rows, prompt_bytes, salt=7)
    output = workdir / "memory-out.parquet"
    jobs: list[JobResult] = []
    for index in range(args.repeats):
        # A fresh server per repeat (it keeps every answered prompt in its
        # counters); the same input is fine: no cache, no server state carried over.
        with Simulator(workdir, 0.0) as sim:
            argv = enrich_build(CONCURRENCY, *RUN_FLAGS)(input_path, output, sim)
            job = finish_job(Child(argv, workdir, f"memory-{index}"), rows)
        job.extra["output_rows"] = output_row_count(output)
        status = "" if job.ok else f"  FAILED (exit {job.exit_code})"
        print(
            f"    memory-{index}: {job.max_rss_mb:,.0f} MB peak RSS, {job.wall_s:.1f} s, "
            f"{job.extra['output_rows']:,} rows out, load {job.loadavg_1m:.2f}{status}"
        )
        jobs.append(job)
        remove_outputs(output)
    input_path.unlink()
    ok = [job for job in jobs if job.ok]
    summary: dict[str, Any] = {
        "runs": len(ok),
        "peak_rss_mb": [job.max_rss_mb for job in jobs],
        "peak_rss_mb_median": median_of([job.max_rss_mb for job in ok]),
        "wall_s": [job.wall_s for job in jobs],
        "wall_s_median": median_of([job.wall_s for job in ok]),
        "exit_codes": [job.exit_code for job in jobs],
    }
    entries = {
        **{
            f"repeat {i + 1}": {"rss": job.max_rss_mb, "wall": job.wall_s, "exit": job.exit_code}
            for i, job in enumerate(jobs)
        },
        "median": {"rss": summary["peak_rss_mb_median"], "wall": summary["wall_s_median"]},
    }
    table = render_table(
        f"memory: {rows:,} rows, {prompt_bytes:,}-byte prompts and about as large answers, "
        f"zero latency, concurrency {CONCURRENCY}, --no-cache; peak RSS = the job's VmHWM",
        [Column("peak RSS MB", "rss", 0), Column("wall s", "wall", 1), Column("exit", "exit", 0)],
        entries,
    )
    print("\n" + table)
    result = {
        "rows": rows,
        "prompt_bytes": prompt_bytes,
        "concurrency": CONCURRENCY,
        "summary": summary,
        "jobs": [job.as_dict() for job in jobs],
    }
    return result, table


SECTION_FUNCTIONS: Final[
    dict[str, Callable[[argparse.Namespace, Path], tuple[dict[str, Any], str]]]
] = {"kills": section_kills, "memory": section_memory}


# ---------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="enrich durability benchmarks: answers paid twice per SIGKILL, "
        "peak memory with large answers. See benchmarks/README.md.",
    )
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, metavar="SECTION", help="kills and/or memory"
    )
    parser.add_argument("--kills", type=int, default=12, help="kill trials [12]")
    parser.add_argument("--kill-rows", type=int, default=6_000, help="rows per kill trial [6000]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays [0]")
    parser.add_argument("--repeats", type=int, default=3, help="memory runs [3]")
    parser.add_argument("--memory-rows", type=int, default=3_000, help="memory rows [3000]")
    parser.add_argument("--prompt-kb", type=int, default=100, help="memory prompt size [100]")
    parser.add_argument("--keep-temp", action="store_true", help="keep inputs and child logs")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.repeats < 1:
        parser.error("--kills and --repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: jobs and simulators are stopped, numbers saved.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    chosen = [name for name in SECTIONS if not args.only or name in args.only]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="enrich-durability-"))
    report: dict[str, Any] = {
        "started": stamp,
        "argv": sys.argv,
        "args": vars(args),
        "environment": environment(),
        "sections": {},
    }
    tables: list[str] = []
    print(f"enrich durability benchmarks: {', '.join(chosen)}; work dir {workdir}")
    started = time.perf_counter()
    try:
        for name in chosen:
            section_started = time.perf_counter()
            result, table = SECTION_FUNCTIONS[name](args, workdir)
            result["section_s"] = time.perf_counter() - section_started
            result["loadavg_end"] = os.getloadavg()
            report["sections"][name] = result
            tables.append(table)
    finally:
        report["total_s"] = time.perf_counter() - started
        report["environment"]["loadavg_end"] = os.getloadavg()
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"durability-{stamp}.json"
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        if args.keep_temp:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + "=" * 34 + " results " + "=" * 34)
    for text in tables:
        print("\n" + text)
    env = report["environment"]
    print(
        f"\n{env['cpus']} CPUs, load average {env['loadavg_start'][0]:.2f} at start, "
        f"{env['loadavg_end'][0]:.2f} at end"
    )
    shown = path.relative_to(RESULTS_DIR.parent)
    print(f"total {report['total_s']:.0f} s; every number is in {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
