"""Start-up costs: imports, ``enrich --help``, and process start to first request.

    python benchmarks/startup.py                  # the installed tree
    PYTHONPATH=/tmp/enrich-old python benchmarks/startup.py   # another tree, same venv

Every figure is a median over several runs (the machine may be shared; the
1-minute load average is printed with each figure). Three measurements:

- imports: ``python -X importtime -c "import X"``, the cumulative time of the
  top-level module, and which heavy libraries it pulled in;
- ``enrich --help`` (the console script) and ``python -c pass`` (the
  interpreter's own start, the floor) wall times;
- first request: ``enrich run`` over a small CSV against ``python -m pipeline
  simulate`` in its own process, timed from ``Popen`` to the simulator's first
  request (its ``/_stats`` counter polled every ``POLL_S``), then stopped with
  SIGTERM. "Beyond the interpreter" subtracts the ``python -c pass`` median.
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
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

HEAVY: Final = ("openai", "polars", "pyarrow", "aiohttp", "pydantic")
POLL_S: Final = 0.002
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
def simulator(env: dict[str, str]) -> Any:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "simulate", "--port", str(port)],
        env=env,
        stderr=subprocess.DEVNULL,
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


def first_request(enrich: str, port: int, workdir: Path, env: dict[str, str]) -> float:
    output = workdir / "out.parquet"
    argv = [enrich, "run", "--quiet", "--input", str(workdir / "in.csv"), "--column", "q"]
    argv += ["--output", str(output), "--model", "sim-1", "--no-cache", "--restart"]
    argv += ["--base-url", f"http://127.0.0.1:{port}/v1", "--concurrency", "4"]
    before = requests_seen(port)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while proc.poll() is None and time.perf_counter() - started < 60:
        if requests_seen(port) > before:
            first = time.perf_counter() - started
            break
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    output.unlink(missing_ok=True)
    shutil.rmtree(workdir / "out.parquet.enrich", ignore_errors=True)
    (workdir / "out.report.json").unlink(missing_ok=True)
    if first is None:
        raise RuntimeError(f"no request seen; stderr: {err.decode(errors='replace')[-2000:]}")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="first-request runs")
    parser.add_argument("--help-runs", type=int, default=10, help="--help and python runs")
    args = parser.parse_args()
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
        rows = "\n".join(f'"question {i}: what is {i} plus {i}?"' for i in range(ROWS))
        (workdir / "in.csv").write_text(f"q\n{rows}\n")
        first_request(enrich, port, workdir, env)  # warm the page cache
        first, first_load = median_of(args.runs, lambda: first_request(enrich, port, workdir, env))
    print(
        f"  first request: {first * 1000:.0f} ms after start, {(first - floor) * 1000:.0f} ms "
        f"beyond the interpreter (load {first_load:.2f})"
    )


if __name__ == "__main__":
    main()
