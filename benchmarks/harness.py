"""The benchmark harness: every measured job is a child process whose CPU time
and memory are its own (``wait4``), against the local simulator in another
process; inputs are generated, and a job's counts are read from the JSON run
report it writes. ``Context`` runs a section's variants in interleaved rounds
within its time budget."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import polars as pl
from tables import Column, render_table

REPO: Final = Path(__file__).resolve().parent.parent
RESULTS_DIR: Final = REPO / "bench-results"
MODEL: Final = "sim-1"
COLUMN: Final = "question"

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
    # Rows per slot of the slots section's server (1 and 4 slots).
    slots_rows: int
    # The ray section: rows at 6,000 rpm (100 a second) per job.
    ray_rows: int
    # The batch route's input (the closing note's 100,000 rows); a fifth of it too.
    batch_rows: int
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
    slots_rows=30,
    ray_rows=1_500,
    batch_rows=100_000,
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
    slots_rows=12,
    ray_rows=600,
    batch_rows=20_000,
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
        self.report_path = report_path_of(argv)
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
        if child.report_path is not None:
            read_report(result, child.report_path)
    else:
        print(f"    ! {child.name} exited {code}:\n{indent(result.stderr_tail[-800:])}")
    return result


def _reported_peak_mb(path: Path) -> float | None:
    try:
        return int(path.read_text()) / 1024.0
    except (OSError, ValueError):
        return None  # killed by a signal, or failed before it could report


def report_path_of(argv: Sequence[str]) -> Path | None:
    """Where an enrich job writes its JSON run report (``OUTPUT.report.json``);
    None for a job without ``--output`` (a naive script, a start-up probe)."""
    if "--output" not in argv:
        return None
    output = Path(argv[list(argv).index("--output") + 1])
    return output.with_name(output.name + ".report.json")


def read_report(result: JobResult, path: Path) -> None:
    """Counts from the job's JSON run report. A run that failed its rows, or
    answered them from a cache, would otherwise pass for a fast one."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"    ! {result.name}: no readable run report at {path}")
        return
    counts, requests = report.get("counts", {}), report.get("requests", {})
    for key, value in (
        ("ok_rows", counts.get("ok")),
        ("error_rows", counts.get("error")),
        ("resumed_rows", counts.get("resumed_rows")),
        ("requests", requests.get("sent")),
        ("stalled", requests.get("stalled")),  # absent before streaming came
    ):
        if isinstance(value, int):
            result.extra[key] = value
    if result.extra.get("error_rows"):
        print(f"    ! {result.name}: {result.extra['error_rows']:,} rows ended in error")
    # The batch route sends its requests in files: the run counts none one by one.
    if report.get("settings", {}).get("route") == "batch":
        return
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
    """Sentence-like phrases of 31-181 characters (the row prefix adds the rest).

    Their words change with ``seed``, their lengths do not: the simulator's
    answers (and their service time, per token) follow a prompt's length, so
    inputs of the same size made with different seeds are the same work.
    Drawn per job, the lengths made the total work of 30 rows differ by 10%
    from one job to the next, which read as one variant being slower."""
    rng = random.Random(seed)
    lengths = random.Random(0)
    phrases = []
    for _ in range(_POOL_SIZE):
        target = lengths.randint(31, 181)
        text = rng.choice(_OPENERS)
        while len(text) < target:
            text += " " + rng.choice(_WORDS)
        phrases.append(text[: target - 1] + "?")
    return phrases


def make_input(directory: Path, rows: int, salt: int, row_group_rows: int | None = None) -> Path:
    """A Parquet file with a ``question`` column of about 50-200 characters,
    in row groups of ``row_group_rows`` (None: polars' default, one group
    for any input here).

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
    frame.write_parquet(path, row_group_size=row_group_rows)
    return path


# ---------------------------------------------------------------------------
# Rounds of variants


@dataclass(frozen=True)
class Variant:
    """One thing to measure: how to launch it, on how many rows, and what to
    look at in its output before it is deleted."""

    build: Build
    rows: int
    inspect: Callable[[Path, JobResult], None] | None = None
    row_group_rows: int | None = None
    """Row groups of the job's input (the Ray engine's shards are whole groups)."""


@dataclass
class Context:
    workdir: Path
    sizes: Sizes
    repeats: int
    enrich_flags: tuple[str, ...] = ()
    # Only the rate variants whose name contains one of these (all if empty).
    rate_variants: tuple[str, ...] = ()
    # The slots section against a server of the user's (llama.cpp...) rather
    # than the simulator: its base URL, the model to ask for, and a cap on
    # answer tokens (None: the server's default).
    server_url: str | None = None
    server_model: str = MODEL
    max_tokens: int | None = None
    # The slots section's slot counts (None: all), and another checkout whose
    # enrich defaults run beside this one's (before/after in one run).
    slot_counts: tuple[int, ...] | None = None
    baseline_tree: str | None = None
    # The slots section's simulator flags beyond its slots (--slot-order,
    # --timings).
    slot_server_flags: tuple[str, ...] = ()
    tables: list[str] = field(default_factory=list)
    _salt: int = 0

    def enrich(self, concurrency: int, *flags: str) -> Build:
        """An enrich run, with the flags given to the benchmark by --enrich-args."""
        return enrich_build(concurrency, *flags, *self.enrich_flags)

    def fresh_input(self, rows: int, row_group_rows: int | None = None) -> Path:
        self._salt += 1
        return make_input(self.workdir, rows, self._salt, row_group_rows)

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
                input_path = (
                    self.fresh_input(variant.rows, variant.row_group_rows)
                    if variant.rows
                    else self.workdir
                )
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

    def startup_job(self, section: str, index: int) -> JobResult:
        """One ``enrich run --help``: the start-up a section subtracts for its
        net figures, measured in every round beside the jobs it is taken from."""
        child = Child(ENRICH_STARTUP_ARGV, self.workdir, f"{section}-start-up-{index}")
        return finish_job(child, 0)

    def table(
        self, title: str, columns: Sequence[Column], entries: dict[str, dict[str, Any]]
    ) -> None:
        text = render_table(title, columns, entries)
        self.tables.append(text)
        print("\n" + text)


def records(jobs: dict[str, list[JobResult]]) -> dict[str, list[dict[str, Any]]]:
    return {name: [job.as_dict() for job in runs] for name, runs in jobs.items()}


# ---------------------------------------------------------------------------
# Where the numbers come from


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
