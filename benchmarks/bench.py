"""Benchmarks for enrich: latency overhead, throughput, checkpoint cost, memory, resume,
rate limits, hung requests.

    python benchmarks/bench.py [--quick] [--only SECTION ...] [--repeats N]

Every measured job runs in its own subprocess (``python -m pipeline run ...`` or a
naive ``asyncio.gather`` script), against the local simulator running in another
subprocess, so the numbers are the client's alone: wall time and CPU time (user +
sys, from ``os.wait4``) and peak RSS (the high-water mark the child reports at
exit, see ``MEASURED``) are those of that one child. The machine is shared
and noisy, so each figure is the median over repeats, and each section compares
against a baseline measured in the same run. Nothing is asserted; results are
printed as tables and written to ``bench-results/bench-<timestamp>.json``.

Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import polars as pl

REPO: Final = Path(__file__).resolve().parent.parent
RESULTS_DIR: Final = REPO / "bench-results"
SECTIONS: Final = ("latency", "throughput", "checkpoint", "memory", "resume", "rate", "tail")
MODEL: Final = "sim-1"
COLUMN: Final = "question"

# The effective "off" switch for checkpointing: one part, written at the end.
CHECKPOINT_OFF: Final = ("--flush-every", "1000000000", "--flush-interval", "1000000")

# Rows per hand-made checkpoint part: the default --flush-every, so the resume
# section reads as many parts as a real run with default settings leaves behind.
RESUME_PART_ROWS: Final = 5000

# Poll period for the simulator's request counter while timing the first request.
FIRST_REQUEST_POLL_S: Final = 0.01

# Job timeouts assume at least this many rows/s (about 10x below what this
# machine does), plus a fixed allowance for start-up, reading and writing.
MIN_ROWS_PER_S: Final = 20.0
JOB_BASE_TIMEOUT_S: Final = 120.0

# The "tutorial" approach the tool is compared with: gather over every prompt,
# a semaphore for concurrency, the SDK's retries off, results written at the end.
NAIVE_SCRIPT: Final = """
import asyncio, sys
import openai, polars as pl

async def main(path, base_url, concurrency, output, model):
    df = pl.read_parquet(path)
    client = openai.AsyncOpenAI(base_url=base_url, max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(question):
        async with semaphore:
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}]
            )
            return reply.choices[0].message.content

    answers = await asyncio.gather(*(one(q) for q in df["question"].to_list()))
    df.with_columns(pl.Series("response", answers)).write_parquet(output)
    await client.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
"""

# The tutorial approach against a rate-limited server: every prompt at once,
# the SDK's default retries (2, honouring retry-after), a failed row kept as a
# null. Prints how many rows it got, for the benchmark to count the lost ones.
NAIVE_RATE_SCRIPT: Final = """
import asyncio, sys
import openai, polars as pl

async def main(path, base_url, output, model):
    df = pl.read_parquet(path)
    client = openai.AsyncOpenAI(base_url=base_url)

    async def one(question):
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}]
        )
        return reply.choices[0].message.content

    results = await asyncio.gather(
        *(one(q) for q in df["question"].to_list()), return_exceptions=True
    )
    answers = [None if isinstance(r, BaseException) else r for r in results]
    df.with_columns(pl.Series("response", answers, dtype=pl.String)).write_parquet(output)
    await client.close()
    ok = sum(a is not None for a in answers)
    print(f"naive: ok {ok} lost {len(answers) - ok}")

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]))
"""


# Peak RSS as the job itself sees it: the high-water mark of its own address
# space (VmHWM), written at exit. ru_maxrss from wait4 cannot be used alone:
# Linux carries the forking process's RSS high-water mark into the child's
# maxrss at exec, so every job would report at least the benchmark's own peak
# (hundreds of MB once it has built a 1M-row checkpoint). Runs the module or the
# script as `python -m` / `python -c` would.
MEASURED: Final = """
import atexit, os, runpy, sys

def report_peak():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["BENCH_PEAK_FILE"], "w") as out:
        out.write(peak)

atexit.register(report_peak)
kind, target, *rest = sys.argv[1:]
if kind == "module":
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *rest]
    exec(compile(target, "<script>", "exec"), {"__name__": "__main__"})
"""


def measured_module(*argv: str) -> list[str]:
    return [sys.executable, "-c", MEASURED, "module", *argv]


def measured_script(script: str, *argv: str) -> list[str]:
    return [sys.executable, "-c", MEASURED, "script", script, *argv]


@dataclass(frozen=True)
class Sizes:
    """Row counts per section, and the time after which a section starts no new round."""

    latency_rows: int
    throughput_rows: int
    checkpoint_rows: int
    memory_rows: int  # the large case; the small one is a tenth
    resume_rows: int
    rate_rows: int
    # The rate section's long-window cases run this many windows at the limit.
    rate_windows: float
    tail_rows: int
    section_budget_s: float


# Chosen so the default run ends in about 20 minutes and --quick in about 4 on a
# 2-core machine where one client process sends ~100-250 requests/s (it is
# CPU-bound in the openai SDK; see benchmarks/README.md). Override per section.
FULL: Final = Sizes(
    latency_rows=3_000,
    throughput_rows=2_000,
    checkpoint_rows=3_000,
    memory_rows=20_000,
    resume_rows=1_000_000,
    rate_rows=1_500,
    rate_windows=2.5,
    tail_rows=2_000,
    section_budget_s=180.0,
)
QUICK: Final = Sizes(
    latency_rows=500,
    throughput_rows=500,
    checkpoint_rows=1_500,
    memory_rows=3_000,
    resume_rows=200_000,
    rate_rows=500,
    rate_windows=1.5,
    tail_rows=500,
    section_budget_s=45.0,
)


# ---------------------------------------------------------------------------
# Processes


@dataclass
class JobResult:
    """One measured child process."""

    name: str
    rows: int
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_mb: float  # VmHWM reported by the job; ru_maxrss if it could not report
    exit_code: int
    ok_codes: tuple[int, ...] = (0,)
    first_request_s: float | None = None
    # The machine is shared: a high load explains a slow repeat.
    loadavg_1m: float = 0.0
    # wait4's figure, inflated by the benchmark's own size (see MEASURED).
    ru_maxrss_mb: float = 0.0
    stdout_tail: str = ""
    stderr_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code in self.ok_codes

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.rows and self.wall_s > 0 else math.nan

    @property
    def cpu_ms_per_row(self) -> float:
        return 1000.0 * self.cpu_s / self.rows if self.rows else math.nan

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record.update(
            cpu_s=self.cpu_s, rows_per_s=self.rows_per_s, cpu_ms_per_row=self.cpu_ms_per_row
        )
        return record


def child_env(peak_file: Path, cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["BENCH_PEAK_FILE"] = str(peak_file)
    # An empty response cache of its own for every job: the user's cache stays
    # untouched, and no job is answered from an earlier job's requests.
    env["ENRICH_CACHE_DIR"] = str(cache_dir)
    # A proxy from the environment would route loopback traffic elsewhere.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "OPENAI_BASE_URL"):
        env.pop(name, None)
        env.pop(name.lower(), None)
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env["OPENAI_API_KEY"] = "sk-bench"
    env["ENRICH_DEBUG"] = "1"  # a failing job shows its traceback in the report
    return env


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _has_exited(pid: int) -> bool:
    # WNOWAIT: look without reaping, so the rusage is still there for wait4.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


class Child:
    """A subprocess whose own rusage we read with wait4 (Popen.wait would discard it)."""

    def __init__(
        self,
        argv: Sequence[str],
        workdir: Path,
        name: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self.peak_path = workdir / f"{name}.peak"
        self.cache_dir = workdir / f"{name}.cache"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(
                list(argv),
                cwd=workdir,
                env={**child_env(self.peak_path, self.cache_dir), **(env or {})},
                stdout=out,
                stderr=err,
            )

    def has_exited(self) -> bool:
        return _has_exited(self.proc.pid)

    def wait(self, timeout_s: float) -> tuple[float, int, Any]:
        """(wall seconds, exit code, rusage). Kills the child after ``timeout_s``."""
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            # The child is not reaped before this timer is joined, so its pid
            # cannot have been reused by another process.
            self.proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.daemon = True
        timer.start()
        try:
            os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
            wall = time.perf_counter() - self.started
        except BaseException:
            # Ctrl-C on the benchmark: leave no job running behind it.
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            timer.cancel()
            timer.join()
        _, status, usage = os.wait4(self.proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        if timed_out.is_set():
            print(f"    ! {self.name} killed after the {timeout_s:.0f} s timeout")
        return wall, code, usage

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the runner flushes and exits 130), then reap."""
        if not self.has_exited():
            self.proc.send_signal(signal.SIGTERM)
        self.wait(timeout_s)


def job_timeout(rows: int) -> float:
    return JOB_BASE_TIMEOUT_S + rows / MIN_ROWS_PER_S


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Loopback only: never let a proxy from the environment see these requests.
_LOCAL: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Simulator:
    """``python -m pipeline simulate`` in its own process, so its CPU is not
    the client's; always this checkout's simulator, so that an older client
    (``PYTHONPATH``) meets the same server as the current one."""

    def __init__(self, workdir: Path, latency_ms: float, *flags: str) -> None:
        self.workdir = workdir
        self.latency_ms = latency_ms
        self.flags = flags  # more `simulate` options: limits, jitter, headers
        self.port = 0
        self.child: Child | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, Any]:
        with _LOCAL.open(f"http://127.0.0.1:{self.port}/_stats", timeout=5) as response:
            stats: dict[str, Any] = json.load(response)
        return stats

    def requests(self) -> int:
        return int(self.stats()["requests"])

    def __enter__(self) -> Simulator:
        for _attempt in range(3):  # the free port can be taken before the server binds it
            self.port = free_port()
            argv = [sys.executable, "-m", "pipeline", "simulate", "--port", str(self.port)]
            argv += ["--latency-ms", str(self.latency_ms), *self.flags]
            # The server is the benchmark's own, whatever code PYTHONPATH
            # points the measured jobs at: the yardstick stays the same.
            env = {"PYTHONPATH": str(REPO)}
            self.child = Child(argv, self.workdir, f"simulator-{self.port}", env)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not self.child.has_exited():
                with contextlib.suppress(OSError):
                    self.requests()
                    return self
                time.sleep(0.05)
            self.child.stop()
        raise RuntimeError(f"the simulator did not start; see {self.workdir}/simulator-*.stderr")

    def __exit__(self, *exc: object) -> None:
        if self.child is not None:
            self.child.stop()


# Builds a job's command line from (input, output, simulator).
Build = Callable[[Path, Path, Simulator], list[str]]


def enrich_build(concurrency: int, *flags: str) -> Build:
    def build(input_path: Path, output: Path, sim: Simulator) -> list[str]:
        return [
            *measured_module("pipeline", "run", "--quiet"),
            *("--input", str(input_path), "--column", COLUMN, "--output", str(output)),
            *("--model", MODEL, "--base-url", sim.base_url, "--concurrency", str(concurrency)),
            *flags,
        ]

    return build


def startup_build(argv: list[str]) -> Build:
    """A process that only starts up (imports, CLI parsing) and exits: the fixed
    cost inside every job's wall and CPU time."""

    def build(input_path: Path, output: Path, sim: Simulator) -> list[str]:
        return argv

    return build


ENRICH_STARTUP_ARGV: Final = measured_module("pipeline", "run", "--help")
ENRICH_STARTUP: Final = startup_build(ENRICH_STARTUP_ARGV)
NAIVE_STARTUP: Final = startup_build(measured_script("import asyncio, openai, polars"))


def naive_build(concurrency: int) -> Build:
    def build(input_path: Path, output: Path, sim: Simulator) -> list[str]:
        args = [str(input_path), sim.base_url, str(concurrency), str(output), MODEL]
        return measured_script(NAIVE_SCRIPT, *args)

    return build


def naive_rate_build() -> Build:
    def build(input_path: Path, output: Path, sim: Simulator) -> list[str]:
        return measured_script(NAIVE_RATE_SCRIPT, str(input_path), sim.base_url, str(output), MODEL)

    return build


def finish_job(
    child: Child,
    rows: int,
    first_request_s: float | None = None,
    ok_codes: tuple[int, ...] = (0,),
    timeout_s: float | None = None,
) -> JobResult:
    wall, code, usage = child.wait(timeout_s or job_timeout(rows))
    result = JobResult(
        name=child.name,
        rows=rows,
        wall_s=wall,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        max_rss_mb=_reported_peak_mb(child.peak_path) or usage.ru_maxrss / 1024.0,
        ru_maxrss_mb=usage.ru_maxrss / 1024.0,  # KiB on Linux
        exit_code=code,
        ok_codes=ok_codes,
        first_request_s=first_request_s,
        loadavg_1m=os.getloadavg()[0],
        stdout_tail=_tail(child.stdout_path),
        stderr_tail=_tail(child.stderr_path),
    )
    if result.ok:
        read_summary(result)
    else:
        print(f"    ! {child.name} exited {code}:\n{indent(result.stderr_tail[-800:])}")
    return result


def _reported_peak_mb(path: Path) -> float | None:
    try:
        return int(path.read_text()) / 1024.0
    except (OSError, ValueError):
        return None  # killed by a signal, or failed before it could report


def _count(pattern: str, text: str) -> int | None:
    match = re.search(pattern, text)
    return None if match is None else int(match.group(1).replace(",", ""))


def read_summary(result: JobResult) -> None:
    """Counts from the CLI's summary. A run that failed its rows, or answered
    them from a cache, would otherwise pass for a fast one."""
    text = result.stdout_tail
    for key, pattern in (
        ("ok_rows", r"ok ([\d,]+) ·"),
        ("error_rows", r"error ([\d,]+) ·"),
        ("resumed_rows", r"from checkpoint ([\d,]+)"),
        ("requests", r"requests ([\d,]+)"),
    ):
        value = _count(pattern, text)
        if value is not None:
            result.extra[key] = value
    if result.extra.get("error_rows"):
        print(f"    ! {result.name}: {result.extra['error_rows']:,} rows ended in error")
    expected = result.rows - result.extra.get("resumed_rows", 0)
    if "requests" in result.extra and result.rows and result.extra["requests"] < expected:
        print(
            f"    ! {result.name}: only {result.extra['requests']:,} requests for "
            f"{expected:,} rows (a cache or dedup answered the rest?)"
        )


def indent(text: str) -> str:
    return "\n".join(f"      {line}" for line in text.strip().splitlines())


def report_job(result: JobResult) -> None:
    status = "" if result.ok else f"  FAILED (exit {result.exit_code})"
    first = ""
    if result.first_request_s is not None:
        first = f", first request after {result.first_request_s:.3f} s"
    if result.rows:
        print(
            f"    {result.name}: {result.wall_s:.2f} s, {result.rows_per_s:,.0f} rows/s, "
            f"{result.cpu_ms_per_row:.2f} CPU ms/row, {result.max_rss_mb:,.0f} MB{first}{status}"
        )
    else:
        print(f"    {result.name}: {result.wall_s:.2f} s{first}{status}")


def timed_first_request(
    name: str, argv: list[str], rows: int, workdir: Path, sim: Simulator, *, stop: bool
) -> JobResult:
    """Run a job while polling the simulator's request counter, for the time from
    process start to the first request the server sees. ``stop``: SIGTERM the
    job once that is known (the runner then saves and exits 130)."""
    before = sim.requests()
    child = Child(argv, workdir, name)
    first: float | None = None
    deadline = child.started + job_timeout(rows)
    while not child.has_exited() and time.perf_counter() < deadline:
        if sim.requests() > before:
            first = time.perf_counter() - child.started
            break
        time.sleep(FIRST_REQUEST_POLL_S)
    if stop and not child.has_exited():
        child.proc.send_signal(signal.SIGTERM)
    result = finish_job(child, rows, first, ok_codes=(0, 130) if stop else (0,))
    report_job(result)
    return result


def remove_outputs(output: Path) -> None:
    output.unlink(missing_ok=True)
    shutil.rmtree(output.with_name(output.name + ".enrich"), ignore_errors=True)


# ---------------------------------------------------------------------------
# Inputs

_OPENERS: Final = (
    "Explain",
    "Summarize",
    "What is",
    "How does",
    "Compare",
    "Give three facts about",
    "Why would someone use",
    "Translate into French:",
    "Classify the sentiment of",
    "Write a haiku about",
)
_VOCABULARY: Final = (
    "the data pipeline streaming parquet arrow checkpoint latency throughput model async "
    "request response token budget retry backoff cluster schema column row chunk buffer "
    "memory disk network server client queue worker thread event loop scheduler airflow "
    "review product customer order invoice weather river mountain city history music "
    "science physics chemistry biology market price energy solar battery engine garden"
)
_WORDS: Final = tuple(_VOCABULARY.split())
_POOL_SIZE: Final = 4096


def _phrases(seed: int) -> list[str]:
    """Sentence-like phrases of 31-181 characters (the row prefix adds the rest)."""
    rng = random.Random(seed)
    phrases = []
    for _ in range(_POOL_SIZE):
        target = rng.randint(31, 181)
        text = rng.choice(_OPENERS)
        while len(text) < target:
            text += " " + rng.choice(_WORDS)
        phrases.append(text[: target - 1].rstrip() + "?")
    return phrases


def make_input(directory: Path, rows: int, salt: int) -> Path:
    """A Parquet file with a ``question`` column of about 50-200 characters.

    Every prompt is unique (``Q<salt>-<row>:`` prefix), and so is every file:
    in-run dedup or a response cache, within a run or across repeats, can never
    answer a row without a request and flatter the numbers.
    """
    path = directory / f"questions-{rows}-{salt}.parquet"
    pool = pl.Series(_phrases(seed=salt), dtype=pl.String)
    index = pl.int_range(0, rows, dtype=pl.Int64, eager=True)
    # A multiplicative hash, so that neighbouring rows get different phrases.
    picks = pool.gather((index * 2_654_435_761) % _POOL_SIZE)
    question = pl.concat_str(
        pl.lit(f"Q{salt:04d}-"), pl.col("id").cast(pl.String), pl.lit(": "), "phrase"
    )
    frame = pl.DataFrame({"id": index, "phrase": picks}).select("id", question.alias(COLUMN))
    frame.write_parquet(path)
    return path


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


# ---------------------------------------------------------------------------
# Statistics and tables


def med(jobs: Sequence[JobResult], key: str) -> float:
    """Median of a measurement (or of a count in ``extra``) over the successful jobs."""
    values = [job.extra.get(key, getattr(job, key, None)) for job in jobs if job.ok]
    numbers = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.median(numbers) if numbers else math.nan


def ratio(numerator: float, denominator: float) -> float:
    if denominator == 0 or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def summarize(jobs: Sequence[JobResult]) -> dict[str, Any]:
    """Medians over the successful repeats of one variant."""
    wall = med(jobs, "wall_s")
    return {
        "runs": sum(job.ok for job in jobs),
        "wall_s": wall,
        "rows_per_s": med(jobs, "rows_per_s"),
        "cpu_ms_per_row": med(jobs, "cpu_ms_per_row"),
        # Near 100%: the client is CPU-bound; the server's latency is not what limits it.
        "cpu_s": med(jobs, "cpu_s"),
        "cpu_share": ratio(med(jobs, "cpu_s"), wall),
        "max_rss_mb": med(jobs, "max_rss_mb"),
        "first_request_s": med(jobs, "first_request_s"),
    }


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    digits: int = 2
    suffix: str = ""
    scale: float = 1.0

    def cell(self, entry: dict[str, Any]) -> str:
        value = entry.get(self.key, math.nan)
        number = float(value) * self.scale
        if math.isnan(number):
            return "-"
        return f"{number:,.{self.digits}f}{self.suffix}"


RUNS: Final = Column("n", "runs", 0)
ROWS_PER_S: Final = Column("rows/s", "rows_per_s", 0)
WALL: Final = Column("wall s", "wall_s")
CPU_PER_ROW: Final = Column("CPU ms/row", "cpu_ms_per_row")
CPU_SHARE: Final = Column("CPU/wall", "cpu_share", 0, "%", 100.0)
RSS: Final = Column("peak RSS MB", "max_rss_mb", 0)


def render_table(title: str, columns: Sequence[Column], entries: dict[str, dict[str, Any]]) -> str:
    header = ["variant", *(column.header for column in columns)]
    rows = [[name, *(column.cell(entry) for column in columns)] for name, entry in entries.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [cells[0].ljust(widths[0])]
        padded += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  " + "  ".join(padded)

    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ---------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class Variant:
    """One thing to measure: how to launch it, on how many rows, and what to
    look at in its output before it is deleted."""

    build: Build
    rows: int
    inspect: Callable[[Path, JobResult], None] | None = None


@dataclass
class Context:
    workdir: Path
    sizes: Sizes
    repeats: int
    enrich_flags: tuple[str, ...] = ()
    # Only the rate variants whose name contains one of these (all if empty).
    rate_variants: tuple[str, ...] = ()
    tables: list[str] = field(default_factory=list)
    _salt: int = 0

    def enrich(self, concurrency: int, *flags: str) -> Build:
        """An enrich run, with the flags given to the benchmark by --enrich-args."""
        return enrich_build(concurrency, *flags, *self.enrich_flags)

    def fresh_input(self, rows: int) -> Path:
        self._salt += 1
        return make_input(self.workdir, rows, self._salt)

    def rounds(self, section: str) -> Iterator[int]:
        """Repeat indices; stops early when another round would overrun the
        section's budget (the first round always runs), so every section is
        bounded in time."""
        budget = self.sizes.section_budget_s
        started = time.perf_counter()
        for index in range(self.repeats):
            if index:
                elapsed = time.perf_counter() - started
                if elapsed + elapsed / index > budget:
                    print(f"  ({section}: stopped after {index} of {self.repeats} rounds: budget)")
                    return
            print(f"  round {index + 1}/{self.repeats}")
            yield index

    def measure(
        self, section: str, sim: Simulator, variants: dict[str, Variant]
    ) -> dict[str, list[JobResult]]:
        """Every variant once per round, interleaved, so that drift on a shared
        machine hits all variants alike; each job gets an input of its own."""
        output = self.workdir / f"{section}-out.parquet"
        jobs: dict[str, list[JobResult]] = {name: [] for name in variants}
        for index in self.rounds(section):
            # Alternate the order, so "runs second" (a warmer disk cache, a
            # neighbour's load spike) does not always favour the same variant.
            order = list(variants.items())
            if index % 2:
                order.reverse()
            for name, variant in order:
                # A start-up variant (0 rows) reads no input.
                input_path = self.fresh_input(variant.rows) if variant.rows else self.workdir
                label = re.sub(r"[^\w.]+", "-", f"{section}-{name}-{index}")
                job = finish_job(
                    Child(variant.build(input_path, output, sim), self.workdir, label),
                    variant.rows,
                )
                report_job(job)
                if variant.inspect is not None:
                    variant.inspect(output, job)
                jobs[name].append(job)
                remove_outputs(output)
                if variant.rows:
                    input_path.unlink()
        return jobs

    def table(
        self, title: str, columns: Sequence[Column], entries: dict[str, dict[str, Any]]
    ) -> None:
        text = render_table(title, columns, entries)
        self.tables.append(text)
        print("\n" + text)


def records(jobs: dict[str, list[JobResult]]) -> dict[str, list[dict[str, Any]]]:
    return {name: [job.as_dict() for job in runs] for name, runs in jobs.items()}


STARTUP_COLUMNS: Final = (
    Column("net rows/s", "net_rows_per_s", 0),
    Column("net CPU ms/row", "net_cpu_ms_per_row"),
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


def section_throughput(ctx: Context) -> dict[str, Any]:
    """(b) Zero latency: the client's own speed, end to end (start-up included)."""
    rows = ctx.sizes.throughput_rows
    print(f"\n[throughput] {rows:,} rows, zero latency, concurrency 256 and 16")
    variants: dict[str, Variant] = {}
    for concurrency in (256, 16):
        variants[f"enrich c={concurrency}"] = Variant(ctx.enrich(concurrency), rows)
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
    ctx.table(
        f"throughput: {rows:,} rows, zero latency; medians; rows/s is end to end incl. "
        "process start-up, net = minus the start-up row",
        [
            ROWS_PER_S,
            Column("rows/s vs naive", "rows_per_s_vs_naive", 2, "x"),
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


def subtract_startup(entry: dict[str, Any], startup: dict[str, Any], rows: int) -> None:
    """Figures net of the process start-up (imports), which small inputs cannot
    amortise: what a long run converges to."""
    net_wall = entry["wall_s"] - startup["wall_s"]
    net_cpu = entry["cpu_s"] - startup["cpu_s"]
    entry["net_wall_s"] = net_wall
    entry["net_rows_per_s"] = ratio(rows, net_wall)
    entry["net_cpu_ms_per_row"] = ratio(1000.0 * net_cpu, rows)


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


# The rate section's server: a limit enforced over a 1 s sliding window (as
# providers enforce per-minute limits over sub-minute windows), 200 +- 100 ms
# per answer. 100 requests/s is well within what one client process sends, so
# the limit, not the client, bounds every enrich run.
RATE_RPM: Final = 6_000
# About 100 requests/s of the benchmark's prompts (about 70 tokens a request).
RATE_TPM: Final = 400_000
RATE_WINDOW_S: Final = 1.0
RATE_LATENCY_MS: Final = 200.0
RATE_JITTER_MS: Final = 100.0
RATE_CONCURRENCY: Final = 64

# Limits the server does not report (no x-ratelimit-* headers; retry-after is
# still sent), counted over longer windows: (window, rpm). The 60 s one is
# 1,200 rpm so that its first window (a burst of 1,200 requests) is within
# what one client sends in a few seconds. Each runs Sizes.rate_windows windows
# of rows at the limit (at least the section's rows): about 2.5 minutes for
# the 60 s window (1.5 with --quick).
RATE_LONG_WINDOWS: Final = ((6.0, 6_000), (60.0, 1_200))
# A storm on the 1 s window's 6,000 rpm: 600 rpm from RATE_STORM_FROM_S to
# RATE_STORM_UNTIL_S after the first request, then 6,000 again, for
# RATE_STORM_AFTER_S of rows (3,150 rows, 45 s at the limits). Without
# headers, and with headers that stop when the storm ends (the server
# reported 600 during it, then nothing).
RATE_STORM_LOW_RPM: Final = 600
RATE_STORM_FROM_S: Final = 10.0
RATE_STORM_UNTIL_S: Final = 25.0
RATE_STORM_AFTER_S: Final = 20.0
RATE_TIMEOUT_IDEALS: Final = 8.0


# How often the rate section samples the simulator's counters during a job.
RATE_POLL_S: Final = 0.25
# The steady-state rate is measured between these shares of the requests
# admitted: past the ramp-up at the start, before the stragglers at the end.
STEADY_FROM: Final = 0.1
STEADY_TO: Final = 0.9

# A sample of the simulator's counters: (bench clock, admitted, admitted
# tokens, 429s, requests).
Sample = tuple[float, int, int, int, int]


class StatsPoller:
    """Samples the simulator's counters while a job runs (see ``Sample``)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(RATE_POLL_S):
            with contextlib.suppress(OSError):
                stats = self.sim.stats()
                self.samples.append(
                    (
                        time.monotonic(),
                        int(stats["admitted"]),
                        int(stats["admitted_tokens"]),
                        int(stats["rate_limited"]),
                        int(stats["requests"]),
                    )
                )

    def __enter__(self) -> StatsPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class RateVariant:
    """One client against one server set-up; ``limit`` says which limit binds.
    ``schedule`` is the server's ``--rpm-schedule`` ((seconds since the first
    request, rpm) steps after ``rpm``); ``rows`` None means the section's."""

    build: Build
    server_flags: tuple[str, ...]
    limit: str  # "requests" or "tokens"
    window_s: float = RATE_WINDOW_S
    rpm: int = RATE_RPM
    rows: int | None = None
    schedule: tuple[tuple[float, int], ...] = ()

    def flags(self) -> tuple[str, ...]:
        flags: tuple[str, ...] = (
            "--jitter-ms",
            str(RATE_JITTER_MS),
            "--window-s",
            str(self.window_s),
        )
        if self.schedule:
            steps = ",".join(f"{at:g}:{rpm}" for at, rpm in self.schedule)
            flags += ("--rpm-schedule", steps)
        return (*flags, *self.server_flags)

    def admits(self, start: float, end: float) -> float:
        """Requests the limit admits between two times since the first request."""
        steps = [(0.0, self.rpm), *self.schedule, (math.inf, 0)]
        total = 0.0
        for (at, rpm), (until, _) in itertools.pairwise(steps):
            overlap = min(end, until) - max(start, at)
            if overlap > 0:
                total += overlap * rpm / 60.0
        return total

    def ideal_s(self, requests: float) -> float:
        """Time for ``requests`` at exactly the limit (as scheduled)."""
        steps = [(0.0, self.rpm), *self.schedule, (math.inf, 0)]
        left = requests
        for (at, rpm), (until, _) in itertools.pairwise(steps):
            can = (until - at) * rpm / 60.0
            if left <= can:
                return at + left / (rpm / 60.0)
            left -= can
        return math.inf


def rate_timeout(variant: RateVariant, rows: int) -> float:
    """Long enough for a client far below the limit (code from before a
    fix, say) to finish: RATE_TIMEOUT_IDEALS times the ideal time."""
    ideal = variant.ideal_s(rows) if variant.limit == "requests" else 0.0
    return max(job_timeout(rows), JOB_BASE_TIMEOUT_S + RATE_TIMEOUT_IDEALS * ideal)


def rate_variants(ctx: Context) -> dict[str, RateVariant]:
    rpm, tpm = str(RATE_RPM), str(RATE_TPM)
    requests_server = ("--rpm", rpm)
    tokens_server = ("--tpm", tpm)
    no_headers = ("--no-rate-headers",)
    c = RATE_CONCURRENCY
    variants = {
        "rpm: configured": RateVariant(ctx.enrich(c, "--rpm", rpm), requests_server, "requests"),
        "rpm: auto, headers": RateVariant(ctx.enrich(c), requests_server, "requests"),
        "rpm: auto, no headers": RateVariant(
            ctx.enrich(c), (*requests_server, *no_headers), "requests"
        ),
        "rpm: naive gather": RateVariant(naive_rate_build(), requests_server, "requests"),
        "tpm: configured": RateVariant(ctx.enrich(c, "--tpm", tpm), tokens_server, "tokens"),
        "tpm: auto, headers": RateVariant(ctx.enrich(c), tokens_server, "tokens"),
        "tpm: auto, no headers": RateVariant(
            ctx.enrich(c), (*tokens_server, *no_headers), "tokens"
        ),
    }
    for window_s, window_rpm in RATE_LONG_WINDOWS:
        per_window = window_rpm / 60.0 * window_s
        variants[f"rpm: auto, no headers, {window_s:g} s window"] = RateVariant(
            ctx.enrich(c),
            ("--rpm", str(window_rpm), *no_headers),
            "requests",
            window_s=window_s,
            rpm=window_rpm,
            rows=max(ctx.sizes.rate_rows, round(per_window * ctx.sizes.rate_windows)),
        )
    schedule = ((RATE_STORM_FROM_S, RATE_STORM_LOW_RPM), (RATE_STORM_UNTIL_S, RATE_RPM))
    storm = RateVariant(ctx.enrich(c), requests_server, "requests", schedule=schedule)
    storm = replace(storm, rows=round(storm.admits(0.0, RATE_STORM_UNTIL_S + RATE_STORM_AFTER_S)))
    variants["storm: auto, no headers"] = replace(
        storm, server_flags=(*requests_server, *no_headers)
    )
    variants["storm: auto, headers stop"] = replace(
        storm,
        server_flags=(*requests_server, "--rate-headers-until", f"{RATE_STORM_UNTIL_S:g}"),
    )
    if ctx.rate_variants:
        variants = {
            name: variant
            for name, variant in variants.items()
            if any(part in name for part in ctx.rate_variants)
        }
    return variants


def steady_rate(samples: Sequence[Sample], total: int, column: int) -> tuple[float, float, float]:
    """(per second, start, end) between the samples where STEADY_FROM and
    STEADY_TO of the ``total`` requests had been admitted; ``column`` 1 for
    requests, 2 for tokens. Times are on the bench clock."""
    start = next((s for s in samples if s[1] >= STEADY_FROM * total), None)
    end = next((s for s in reversed(samples) if s[1] <= STEADY_TO * total), None)
    if start is None or end is None or end[0] - start[0] < 4 * RATE_POLL_S:
        return math.nan, math.nan, math.nan  # too short a run to tell
    return (end[column] - start[column]) / (end[0] - start[0]), start[0], end[0]


def after_first_window(
    samples: Sequence[Sample], variant: RateVariant, column: int
) -> tuple[float, float, float, float]:
    """From one window after the first admitted request to the last: (per
    second, 429 share, start, end), times since the first admitted request
    (read off the samples, to within a poll period)."""
    first = next((s for s in samples if s[1] > 0), None)
    if first is None:
        return math.nan, math.nan, math.nan, math.nan
    origin = first[0] - RATE_POLL_S / 2
    final = samples[-1][1]
    start = next((s for s in samples if s[0] >= origin + variant.window_s), None)
    end = next((s for s in samples if s[1] >= final), None)
    if start is None or end is None or end[0] - start[0] < 4 * RATE_POLL_S:
        return math.nan, math.nan, math.nan, math.nan
    per_s = (end[column] - start[column]) / (end[0] - start[0])
    share = ratio(end[3] - start[3], end[4] - start[4])
    return per_s, share, start[0] - origin, end[0] - origin


def rate_measurements(
    job: JobResult,
    stats: dict[str, Any],
    samples: Sequence[Sample],
    variant: RateVariant,
) -> None:
    """What the server saw of one job, in ``job.extra``.

    The achieved rate is measured by the server, over the span from the first
    to the last request it admitted: process start-up is not the limiter's to
    answer for (wall time vs ideal covers it), while the ramp to the limit and
    every slow-down after a 429 are in it. The steady rate leaves out the
    ramp and the end (see ``steady_rate``): what a long run sustains. "After
    the first window" leaves out the window a limit that is not reported is
    found in. Under a schedule, the limit is what it admits over the span.
    """
    naive_ok = _count(r"naive: ok (\d+)", job.stdout_tail)
    ok_rows = naive_ok if naive_ok is not None else job.extra.get("ok_rows", 0)
    span = float(stats["admitted_span_s"])
    column = 1 if variant.limit == "requests" else 2
    if variant.limit == "requests":
        per_s, limit_per_s = ratio(stats["admitted"], span), ratio(variant.admits(0.0, span), span)
        ideal_s = variant.ideal_s(job.rows)
    else:
        per_s, limit_per_s = ratio(stats["admitted_tokens"], span), RATE_TPM / 60.0
        # The rows' tokens, from the mean of those answered.
        ideal_s = ratio(stats["tokens"], stats["answered"]) * job.rows / limit_per_s
    steady, steady_start, steady_end = steady_rate(samples, stats["admitted"], column)
    after, after_429, after_start, after_end = after_first_window(samples, variant, column)
    if variant.limit == "requests":
        first = next((s[0] for s in samples if s[1] > 0), math.nan) - RATE_POLL_S / 2
        steady_limit = ratio(
            variant.admits(steady_start - first, steady_end - first), steady_end - steady_start
        )
        after_limit = ratio(variant.admits(after_start, after_end), after_end - after_start)
    else:
        steady_limit = after_limit = limit_per_s
    job.extra.update(
        server_requests=stats["requests"],
        answered_429=stats["rate_limited"],
        share_429=ratio(stats["rate_limited"], stats["requests"]),
        rate_share=ratio(per_s, limit_per_s),
        steady_share=ratio(steady, steady_limit),
        after_window_share=ratio(after, after_limit),
        after_window_429=after_429,
        lost_rows=job.rows - ok_rows if job.ok else job.rows,
        ideal_s=ideal_s,
        wall_over_ideal=ratio(job.wall_s, ideal_s),
    )


def section_rate(ctx: Context) -> dict[str, Any]:
    """Issue 4: how close to the server's real limit each mode runs, and at what
    429 cost; the tutorial approach on the same workload for comparison."""
    rows = ctx.sizes.rate_rows
    print(
        f"\n[rate] {rows:,} rows; server limit {RATE_RPM:,} requests/min or {RATE_TPM:,} "
        f"tokens/min over a {RATE_WINDOW_S:g} s window, {RATE_LATENCY_MS:.0f} +- "
        f"{RATE_JITTER_MS:.0f} ms; enrich concurrency {RATE_CONCURRENCY}"
    )
    variants = rate_variants(ctx)
    jobs: dict[str, list[JobResult]] = {name: [] for name in (*variants, "enrich start-up")}
    output = ctx.workdir / "rate-out.parquet"
    for index in ctx.rounds("rate"):
        order = list(variants.items())
        if index % 2:
            order.reverse()
        for name, variant in order:
            variant_rows = variant.rows or rows
            input_path = ctx.fresh_input(variant_rows)
            # A fresh server per job: no window, and no count, carried over.
            with Simulator(ctx.workdir, RATE_LATENCY_MS, *variant.flags()) as sim:
                label = re.sub(r"[^\w.]+", "-", f"rate-{name}-{index}")
                with StatsPoller(sim) as poller:
                    child = Child(variant.build(input_path, output, sim), ctx.workdir, label)
                    job = finish_job(
                        child, variant_rows, timeout_s=rate_timeout(variant, variant_rows)
                    )
                rate_measurements(job, sim.stats(), poller.samples, variant)
            report_rate_job(job)
            jobs[name].append(job)
            remove_outputs(output)
            input_path.unlink()
        startup = Child(ENRICH_STARTUP_ARGV, ctx.workdir, f"rate-start-up-{index}")
        jobs["enrich start-up"].append(finish_job(startup, 0))
    startup_wall = med(jobs["enrich start-up"], "wall_s")
    entries: dict[str, dict[str, Any]] = {}
    for name in variants:
        entry = summarize(jobs[name])
        keys = (
            "rate_share",
            "steady_share",
            "after_window_share",
            "after_window_429",
            "share_429",
            "lost_rows",
            "ideal_s",
            "wall_over_ideal",
        )
        for key in keys:
            entry[key] = med(jobs[name], key)
        entry["answered_429"] = med(jobs[name], "answered_429")
        entry["net_wall_over_ideal"] = ratio(entry["wall_s"] - startup_wall, entry["ideal_s"])
        entry["rows"] = variants[name].rows or rows
        entries[name] = entry
    ctx.table(
        f"rate: {rows:,} rows; limit {RATE_RPM:,} rpm or {RATE_TPM:,} tpm over "
        f"{RATE_WINDOW_S:g} s, {RATE_LATENCY_MS:.0f} +- {RATE_JITTER_MS:.0f} ms (long windows: "
        + ", ".join(f"{r:,} rpm over {w:g} s" for w, r in RATE_LONG_WINDOWS)
        + f"; storm: {RATE_STORM_LOW_RPM:,} rpm from {RATE_STORM_FROM_S:g} s to "
        f"{RATE_STORM_UNTIL_S:g} s); medians; "
        "rate/limit measured by the server from its first to last admitted request, "
        f"steady from {STEADY_FROM:.0%} to {STEADY_TO:.0%} of them, after 1st window from "
        "one window after the first; "
        "targets: configured >= 95% with < 1% 429s, auto >= 90% with < 2%; "
        f"net = minus {startup_wall:.1f} s start-up",
        [
            Column("rows", "rows", 0),
            Column("rate/limit", "rate_share", 1, "%", 100.0),
            Column("steady", "steady_share", 1, "%", 100.0),
            Column("after 1st window", "after_window_share", 1, "%", 100.0),
            Column("429s after", "after_window_429", 2, "%", 100.0),
            Column("429 share", "share_429", 2, "%", 100.0),
            Column("429s", "answered_429", 0),
            Column("lost rows", "lost_rows", 0),
            WALL,
            Column("ideal s", "ideal_s", 1),
            Column("wall/ideal", "wall_over_ideal", 2, "x"),
            Column("net wall/ideal", "net_wall_over_ideal", 2, "x"),
            CPU_PER_ROW,
            RUNS,
        ],
        entries,
    )
    return {
        "rows": rows,
        "server": {
            "rpm": RATE_RPM,
            "tpm": RATE_TPM,
            "window_s": RATE_WINDOW_S,
            "latency_ms": RATE_LATENCY_MS,
            "jitter_ms": RATE_JITTER_MS,
            "long_windows": RATE_LONG_WINDOWS,
            "storm": {
                "low_rpm": RATE_STORM_LOW_RPM,
                "from_s": RATE_STORM_FROM_S,
                "until_s": RATE_STORM_UNTIL_S,
                "after_s": RATE_STORM_AFTER_S,
            },
        },
        "concurrency": RATE_CONCURRENCY,
        "summary": entries,
        "jobs": records(jobs),
    }


def report_rate_job(job: JobResult) -> None:
    extra = job.extra
    status = "" if job.ok else f"  FAILED (exit {job.exit_code})"
    print(
        f"    {job.name}: {job.wall_s:.1f} s ({extra['wall_over_ideal']:.2f}x ideal), "
        f"{100 * extra['rate_share']:.1f}% of the limit ({100 * extra['steady_share']:.1f}% "
        f"steady, {100 * extra['after_window_share']:.1f}% after the first window), "
        f"{extra['answered_429']:,} x 429 "
        f"({100 * extra['share_429']:.2f}%), {extra['lost_rows']:,} rows lost{status}"
    )


# The tail section: the rate section's server and client (6,000 requests/min
# over a 1 s window, 200 +- 100 ms, concurrency 64, --rpm configured), with 1%
# of requests hanging: stuck connections that send nothing for 30-60 s and
# then answer (a client that waited gets its answer then; one that cut the
# request has retried it long before).
TAIL_HANG_RATE: Final = 0.01
TAIL_HANG_S: Final = 30.0
TAIL_HANG_MAX_S: Final = 60.0


def section_tail(ctx: Context) -> dict[str, Any]:
    """Issue: hung requests must not hold the run: with 1% of requests hanging
    30-60 s, the run's wall time against the same run without hangs (target
    <= 1.3x). Uses only flags every version has, so it measures the code
    before the change too; the simulator is always this checkout's."""
    rows = ctx.sizes.tail_rows
    ideal_s = rows / (RATE_RPM / 60.0)
    print(
        f"\n[tail] {rows:,} rows; {RATE_RPM:,} requests/min (server over {RATE_WINDOW_S:g} s "
        f"and --rpm), {RATE_LATENCY_MS:.0f} +- {RATE_JITTER_MS:.0f} ms, concurrency "
        f"{RATE_CONCURRENCY}; {TAIL_HANG_RATE:.0%} of requests hang "
        f"{TAIL_HANG_S:g}-{TAIL_HANG_MAX_S:g} s, then answer"
    )
    server = ["--jitter-ms", str(RATE_JITTER_MS), "--window-s", str(RATE_WINDOW_S)]
    server += ["--rpm", str(RATE_RPM)]
    hangs: tuple[str, ...] = ("--hang-rate", str(TAIL_HANG_RATE), "--hang-s", str(TAIL_HANG_S))
    hangs += ("--hang-max-s", str(TAIL_HANG_MAX_S), "--hang-answers")
    variants: dict[str, tuple[str, ...]] = {"no hangs": (), f"{TAIL_HANG_RATE:.0%} hangs": hangs}
    build = ctx.enrich(RATE_CONCURRENCY, "--rpm", str(RATE_RPM))
    jobs: dict[str, list[JobResult]] = {name: [] for name in (*variants, "enrich start-up")}
    output = ctx.workdir / "tail-out.parquet"
    for index in ctx.rounds("tail"):
        order = list(variants.items())
        if index % 2:
            order.reverse()
        for name, flags in order:
            input_path = ctx.fresh_input(rows)
            # A fresh server per job: no window, count or held request carried over.
            with Simulator(ctx.workdir, RATE_LATENCY_MS, *server, *flags) as sim:
                label = re.sub(r"[^\w.]+", "-", f"tail-{name}-{index}")
                job = finish_job(Child(build(input_path, output, sim), ctx.workdir, label), rows)
                stats = sim.stats()
            stalled = _count(r"stalled ([\d,]+)", job.stdout_tail)
            job.extra.update(
                server_requests=stats["requests"],
                hangs=stats.get("hangs"),
                answered_429=stats["rate_limited"],
                ideal_s=ideal_s,
                wall_over_ideal=ratio(job.wall_s, ideal_s),
                **({} if stalled is None else {"stalled": stalled}),
            )
            print(
                f"    {job.name}: {job.wall_s:.1f} s ({job.extra['wall_over_ideal']:.2f}x ideal), "
                f"{stats['requests']:,} requests, {stats.get('hangs', '?')} hangs, "
                f"stalled {'-' if stalled is None else stalled}, "
                f"{job.extra.get('error_rows', 0):,} rows in error"
                + ("" if job.ok else f"  FAILED (exit {job.exit_code})")
            )
            jobs[name].append(job)
            remove_outputs(output)
            input_path.unlink()
        startup = Child(ENRICH_STARTUP_ARGV, ctx.workdir, f"tail-start-up-{index}")
        jobs["enrich start-up"].append(finish_job(startup, 0))
    startup_wall = med(jobs["enrich start-up"], "wall_s")
    entries: dict[str, dict[str, Any]] = {}
    for name in variants:
        entry = summarize(jobs[name])
        for key in ("server_requests", "hangs", "stalled", "answered_429", "error_rows"):
            entry[key] = med(jobs[name], key)
        entry["ideal_s"] = ideal_s
        entry["wall_over_ideal"] = ratio(entry["wall_s"], ideal_s)
        entry["net_wall_over_ideal"] = ratio(entry["wall_s"] - startup_wall, ideal_s)
        entries[name] = entry
    calm = entries["no hangs"]["wall_s"]
    for entry in entries.values():
        entry["wall_vs_no_hangs"] = ratio(entry["wall_s"], calm)
        entry["net_wall_vs_no_hangs"] = ratio(entry["wall_s"] - startup_wall, calm - startup_wall)
    ctx.table(
        f"tail: {rows:,} rows at {RATE_RPM:,} rpm = ideal {ideal_s:.0f} s; "
        f"{TAIL_HANG_RATE:.0%} of requests hang {TAIL_HANG_S:g}-{TAIL_HANG_MAX_S:g} s; medians; "
        "target: wall with hangs <= 1.3x without; "
        f"net = minus {startup_wall:.1f} s start-up",
        [
            WALL,
            Column("vs no hangs", "wall_vs_no_hangs", 2, "x"),
            Column("net vs no hangs", "net_wall_vs_no_hangs", 2, "x"),
            Column("wall/ideal", "wall_over_ideal", 2, "x"),
            Column("hangs", "hangs", 0),
            Column("stalled", "stalled", 0),
            Column("requests", "server_requests", 0),
            Column("429s", "answered_429", 0),
            Column("error rows", "error_rows", 0),
            RUNS,
        ],
        entries,
    )
    return {
        "rows": rows,
        "server": {
            "rpm": RATE_RPM,
            "window_s": RATE_WINDOW_S,
            "latency_ms": RATE_LATENCY_MS,
            "jitter_ms": RATE_JITTER_MS,
            "hang_rate": TAIL_HANG_RATE,
            "hang_s": [TAIL_HANG_S, TAIL_HANG_MAX_S],
            "code": str(REPO),
        },
        "concurrency": RATE_CONCURRENCY,
        "summary": entries,
        "jobs": records(jobs),
    }


SECTION_FUNCTIONS: Final[dict[str, Callable[[Context], dict[str, Any]]]] = {
    "latency": section_latency,
    "throughput": section_throughput,
    "checkpoint": section_checkpoint,
    "memory": section_memory,
    "resume": section_resume,
    "rate": section_rate,
    "tail": section_tail,
}


# ---------------------------------------------------------------------------
# Main


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def environment() -> dict[str, Any]:
    versions = {}
    for package in ("enrich-llm", "openai", "httpx2", "httpcore2", "aiohttp", "polars", "pyarrow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    spec = importlib.util.find_spec("pipeline")
    return {
        # PYTHONPATH may point the children at another checkout (e.g. a
        # `git archive` of some commit): this is the code that was measured.
        "pipeline_source": spec.origin if spec is not None else None,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain")),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "packages": versions,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark enrich against the local simulator; prints medians.",
        epilog=f"sections: {', '.join(SECTIONS)}. See benchmarks/README.md.",
    )
    parser.add_argument("--quick", action="store_true", help="small inputs (about 4 minutes)")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, metavar="SECTION", help="run only these sections"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds per section [3]")
    parser.add_argument(
        "--budget",
        type=float,
        metavar="S",
        help="seconds after which a section starts no new round",
    )
    for name in SECTIONS:
        parser.add_argument(f"--{name}-rows", type=int, metavar="N", help=f"rows for {name}")
    parser.add_argument(
        "--enrich-args",
        default="",
        metavar="FLAGS",
        help='extra flags for every enrich run, e.g. "--chunk-size 5000"',
    )
    parser.add_argument(
        "--rate-variants",
        nargs="+",
        default=(),
        metavar="TEXT",
        help='only the rate variants whose name contains one of these, e.g. "window" "storm"',
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep inputs and child logs")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    for name in SECTIONS:
        rows = getattr(args, f"{name}_rows")
        if rows is not None:
            sizes = replace(sizes, **{f"{name}_rows": rows})
    if args.budget is not None:
        sizes = replace(sizes, section_budget_s=args.budget)
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the running job and the simulator are
    # stopped, the numbers so far are saved and the work dir is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sizes = sizes_from(args)
    chosen = [name for name in SECTIONS if not args.only or name in args.only]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="enrich-bench-"))
    ctx = Context(
        workdir,
        sizes,
        args.repeats,
        tuple(shlex.split(args.enrich_args)),
        rate_variants=tuple(args.rate_variants),
    )
    report: dict[str, Any] = {
        "started": stamp,
        "args": vars(args),
        "sizes": asdict(sizes),
        "environment": environment(),
        "sections": {},
    }
    print(f"enrich benchmarks: {', '.join(chosen)}; {args.repeats} repeats; work dir {workdir}")
    started = time.perf_counter()
    try:
        for name in chosen:
            section_started = time.perf_counter()
            report["sections"][name] = SECTION_FUNCTIONS[name](ctx)
            report["sections"][name]["section_s"] = time.perf_counter() - section_started
    finally:
        report["total_s"] = time.perf_counter() - started
        report["environment"]["loadavg_end"] = os.getloadavg()
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"bench-{stamp}.json"
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        if args.keep_temp:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + "=" * 34 + " results " + "=" * 34)
    for text in ctx.tables:
        print("\n" + text)
    env = report["environment"]
    load = (
        f"load average {env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end"
    )
    print(f"\n{env['cpus']} CPUs, {load} (a busy machine slows every variant alike)")
    print(f"total {report['total_s']:.0f} s; every number is in {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
