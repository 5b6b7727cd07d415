"""Start-up costs: imports, ``enrich --help``, and process start to first request.

    python benchmarks/startup.py                  # the installed tree
    PYTHONPATH=/tmp/enrich-old python benchmarks/startup.py   # another tree, same venv

Every figure is a median over several runs (the machine may be shared; the
1-minute load average is printed with each figure). Three measurements:

- imports: ``python -X importtime -c "import X"``, the cumulative time of the
  top-level module, and which heavy libraries it pulled in;
- ``enrich --help`` (the console script) and ``python -c pass`` (the
  interpreter's own start, the floor) wall times;
- first request: ``enrich run`` over a small CSV, then JSONL, against ``python -m pipeline
  simulate`` in its own process, timed from ``Popen`` to the first bytes of
  its first request, then stopped with SIGTERM. The run talks to the
  simulator through a relay in this process that notes when the first bytes
  arrive (polling the simulator's counter every few milliseconds would load
  a 2-core machine as much as the run itself). "Beyond the interpreter"
  subtracts the ``python -c pass`` median. The CPU time the run had used by
  then (``/proc/<pid>/stat``, 10 ms ticks) is printed too: on a shared
  machine it moves much less with the load than the wall time does. So is
  its main thread's share: work on other threads (the HTTP client's import,
  pyarrow's readers) overlaps it on a second core, so on an idle machine the
  main thread's CPU time is about the least the wall time can be.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from pathlib import Path
from typing import Any, Final

HEAVY: Final = ("openai", "polars", "pyarrow", "aiohttp", "pydantic")
ROWS: Final = 2_000
# Loopback only: a proxy from the environment must not see these requests.
_LOCAL: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def load() -> float:
    return os.getloadavg()[0]


def median_of(runs: int, measure: Callable[[], float]) -> tuple[float, float]:
    """(median seconds, load average at the end)."""
    values = [measure() for _ in range(runs)]
    return statistics.median(values), load()


def wall(argv: Sequence[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def import_time(statement: str) -> tuple[float, list[str]]:
    """Cumulative import seconds of the top-level modules, and the heavy ones imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        check=True,
        capture_output=True,
        text=True,
    )
    total_us = 0
    names: set[str] = set()
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, indented = line.split("|")
        name = indented.removeprefix(" ")
        names.add(name.strip().split(".")[0])
        if not name.startswith(" "):  # a top-level import: its cumulative time counts once
            total_us += int(cumulative)
    return total_us / 1e6, sorted(m for m in HEAVY if m in names)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def requests_seen(port: int) -> int:
    with _LOCAL.open(f"http://127.0.0.1:{port}/_stats", timeout=5) as response:
        stats: dict[str, Any] = json.load(response)
    return int(stats["requests"])


@contextlib.contextmanager
def simulator(env: dict[str, str], *flags: str, cwd: Path | None = None) -> Iterator[int]:
    """A simulator process (``flags``: its options), its port once it answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "simulate", "--port", str(port), *flags],
        env=env,
        stderr=subprocess.DEVNULL,
        cwd=cwd,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests_seen(port)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the simulator did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of a running process, or of one of its threads."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Relay:
    """Forwards TCP connections to ``port`` and notes when the first bytes of
    the first connection arrive (``perf_counter``), and the CPU time process
    ``pid`` and its main thread had used by then; and when the server's
    latest bytes went back (``last``: the end of the last answer, once the
    run has no request left)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.first: float | None = None
        self.last: float | None = None
        self.pid = 0
        self.cpu: tuple[float, float] | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        self.first = self.last = self.cpu = None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        except OSError:
            client.close()  # the run sees a refused connection and retries
            return
        server.settimeout(None)
        threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()
        self._pipe(client, server, True)

    def _pipe(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if upstream and self.first is None:
                    first = time.perf_counter()
                    with contextlib.suppress(OSError):
                        # A process's main thread has the process's id.
                        self.cpu = (cpu_seconds(self.pid), cpu_seconds(self.pid, self.pid))
                    # Set last: the caller stops waiting when it sees it.
                    self.first = first
                sink.sendall(data)
                if not upstream:
                    self.last = time.perf_counter()
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def first_request(
    enrich: str, relay: Relay, workdir: Path, env: dict[str, str], source: str = "in.csv"
) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, main thread's CPU seconds) from start to
    the first request, for the input ``source`` in ``workdir``."""
    output = workdir / "out.parquet"
    argv = [enrich, "run", "--quiet", "--input", str(workdir / source), "--column", "q"]
    argv += ["--output", str(output), "--model", "sim-1", "--no-cache", "--restart"]
    argv += ["--base-url", f"http://127.0.0.1:{relay.address}/v1", "--concurrency", "4"]
    relay.reset()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    relay.pid = proc.pid
    while proc.poll() is None and relay.first is None and time.perf_counter() - started < 60:
        time.sleep(0.05)  # the relay notes the time; this only waits for it
    first = None if relay.first is None else relay.first - started
    cpu = relay.cpu
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    output.unlink(missing_ok=True)
    shutil.rmtree(workdir / "out.parquet.enrich", ignore_errors=True)
    (workdir / "out.report.json").unlink(missing_ok=True)
    if first is None or cpu is None:
        raise RuntimeError(f"no request seen; stderr: {err.decode(errors='replace')[-2000:]}")
    return first, *cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="first-request runs")
    parser.add_argument("--help-runs", type=int, default=10, help="--help and python runs")
    args = parser.parse_args()
    # An installed package has its bytecode compiled; without the cache every
    # start would compile enrich's own modules again (about 0.1 s).
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    enrich = shutil.which("enrich", path=str(Path(sys.executable).parent))
    if enrich is None:
        sys.exit("no enrich console script beside this Python; pip install -e .")
    import pipeline

    print(f"pipeline from {Path(pipeline.__file__).parent}; load {load():.2f}")
    for statement in ("import pipeline", "import pipeline.cli"):
        seconds = [import_time(statement) for _ in range(3)]
        heavy = seconds[0][1]
        value = statistics.median(s for s, _ in seconds)
        print(f"  {statement!r}: {value * 1000:.0f} ms of imports; heavy: {heavy or 'none'}")
    floor, floor_load = median_of(args.help_runs, lambda: wall([sys.executable, "-c", "pass"]))
    print(f"  python -c pass: {floor * 1000:.0f} ms (load {floor_load:.2f})")
    helps, help_load = median_of(args.help_runs, lambda: wall([enrich, "--help"]))
    print(f"  enrich --help: {helps * 1000:.0f} ms (load {help_load:.2f})")
    env = dict(os.environ, OPENAI_API_KEY="sk-startup-bench", NO_PROXY="127.0.0.1,localhost")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "OPENAI_BASE_URL"):
        env.pop(name, None)
        env.pop(name.lower(), None)
    with tempfile.TemporaryDirectory() as tmp, simulator(env) as port:
        workdir = Path(tmp)
        env["ENRICH_CACHE_DIR"] = str(workdir / "cache")
        questions = [f"question {i}: what is {i} plus {i}?" for i in range(ROWS)]
        rows = "\n".join(f'"{q}"' for q in questions)
        (workdir / "in.csv").write_text(f"q\n{rows}\n")
        lines = "".join(json.dumps({"q": q}) + "\n" for q in questions)
        (workdir / "in.jsonl").write_text(lines)
        relay = Relay(port)
        for source in ("in.csv", "in.jsonl"):
            first_request(enrich, relay, workdir, env, source)  # warm the caches
            runs = [first_request(enrich, relay, workdir, env, source) for _ in range(args.runs)]
            report(source, runs, floor)


def report(source: str, runs: list[tuple[float, float, float]], floor: float) -> None:
    first = statistics.median(wall for wall, _, _ in runs)
    cpu = statistics.median(cpu for _, cpu, _ in runs)
    main_cpu = statistics.median(main for _, _, main in runs)
    print(
        f"  first request ({source}): {first * 1000:.0f} ms after start, "
        f"{(first - floor) * 1000:.0f} ms beyond the interpreter; {cpu * 1000:.0f} ms of CPU, "
        f"{main_cpu * 1000:.0f} ms of it on the main thread (load {load():.2f})"
    )


if __name__ == "__main__":
    main()
