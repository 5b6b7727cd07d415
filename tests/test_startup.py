"""Start-up stays light: what each entry point imports, checked in a fresh
interpreter (never timed: the machine may be shared). The heavy libraries
(openai, polars, pyarrow, aiohttp, pydantic) cost about a second of imports;
each is imported where it is used, and not before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import click
import pytest

import pipeline
from pipeline.cli import cli

from conftest import MODEL, StartServer, write_questions

pytestmark = pytest.mark.timeout(60)

# matplotlib draws the report page at the end of a run; prometheus_client serves
# --metrics-port: neither may load before the first request.
HEAVY: Final = (
    "openai",
    "polars",
    "pyarrow",
    "aiohttp",
    "pydantic",
    "matplotlib",
    "prometheus_client",
    "pandas",
)

# Not needed for an online run's first request, so loaded after it if at
# all: the aiohttp transport's URL type, the batch route, what the report
# computes at the end (statistics).
DEFERRED: Final = ("yarl", "pipeline.batch_route", "statistics")

# Runs the CLI as the console script does, and prints (as its last line) the
# heavy modules loaded when the first request went out and at exit.
PROBE: Final = """
import atexit, json, sys
HEAVY = {heavy!r}
DEFERRED = {deferred!r}

def loaded():
    return sorted(m for m in HEAVY if m in sys.modules)

from pipeline import transport  # light: neither HTTP client comes with it

seen = {{}}
from pipeline import transport_h11

for cls in (transport_h11.H11Transport, transport.AiohttpTransport, transport.OpenAITransport):
    def patched(original):
        async def complete(self, messages, **options):
            seen.setdefault("first_request", loaded())
            seen.setdefault("parquet_at_first_request", "pyarrow.parquet" in sys.modules)
            seen.setdefault("numpy_at_first_request", "numpy" in sys.modules)
            seen.setdefault("metadata_at_first_request", "importlib.metadata" in sys.modules)
            seen.setdefault(
                "deferred_at_first_request",
                sorted(m for m in DEFERRED if m in sys.modules),
            )
            return await original(self, messages, **options)
        return complete
    cls.complete = patched(cls.complete)
atexit.register(lambda: print("\\nPROBE " + json.dumps({{**seen, "exit": loaded()}})))
from pipeline.cli import main
sys.argv = ["enrich", *sys.argv[1:]]
main()
"""


def probe(*args: str, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], Any]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY, deferred=DEFERRED), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "OPENAI_API_KEY": "sk-startup-test", "NO_PROXY": "127.0.0.1"},
        timeout=50,
    )
    last = done.stdout.rstrip().rsplit("\n", 1)[-1]
    assert last.startswith("PROBE "), (done.stdout, done.stderr)
    return done, json.loads(last.removeprefix("PROBE "))


def heavy_after(statement: str) -> list[str]:
    code = f"{statement}\nimport json, sys\n"
    code += f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=50
    )
    loaded: list[str] = json.loads(done.stdout)
    return loaded


def test_import_pipeline_loads_no_heavy_library() -> None:
    assert heavy_after("import pipeline") == []


def test_the_errors_and_the_transport_errors_load_no_heavy_library() -> None:
    # What an Airflow DAG file or a caller's except clause imports.
    statement = "from pipeline import EnrichError, FatalAPIError, TransportError, APIStatus"
    assert heavy_after(statement) == []


def test_the_default_transport_loads_no_heavy_library() -> None:
    # aiohttp cost about 0.3 s before the first request; h11 a few ms.
    statement = (
        "from pipeline.config import ModelConfig\n"
        "from pipeline.transport import make_transport\n"
        "make_transport(ModelConfig(name='m', base_url='https://example.invalid/v1'), 'k')\n"
        "import sys\n"
        "assert 'yarl' not in sys.modules and 'urllib.request' not in sys.modules"
    )
    assert heavy_after(statement) == []


def test_a_restart_looks_for_batches_where_the_batch_route_keeps_them() -> None:
    # --restart looks for batches in flight without loading the batch route.
    from pipeline import batch_ledger, send

    assert send.BATCH_DIR == batch_ledger.BATCH_DIR


def test_building_and_checking_the_config_loads_no_heavy_library() -> None:
    # pydantic cost 110-140 ms before the first request; the config needs none of it.
    statement = (
        "from pipeline import load_config\n"
        "load_config(input='in.csv', column='q', output='out.parquet', rpm=60)"
    )
    assert heavy_after(statement) == []


def test_the_public_names_are_there_when_used() -> None:
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
    assert set(pipeline.__all__) <= set(dir(pipeline))
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = pipeline.no_such_name  # type: ignore[attr-defined]


def help_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path, the group itself first: (), ("run",), ("cache", "stats")..."""
    paths = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += help_commands(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("command", help_commands(cli), ids=lambda path: " ".join(path) or "enrich")
def test_help_loads_no_heavy_library(command: tuple[str, ...]) -> None:
    done, loaded = probe(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert "Usage: enrich" in done.stdout
    assert loaded["exit"] == []


def help_imports() -> set[str]:
    """Every module ``python -m pipeline --help`` imports, from the import log."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=50,
    )
    return {
        line.split("|")[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "cumulative" not in line
    }


def test_python_m_pipeline_help_imports_no_heavy_library() -> None:
    imported = {name.split(".")[0] for name in help_imports()}
    assert "pipeline" in imported and "click" in imported
    assert imported.isdisjoint(HEAVY)


def test_help_loads_no_event_loop_and_no_package_metadata() -> None:
    # Each costs `enrich --help` about a fifth of its start; the help text
    # needs neither (the version is pipeline.version.VERSION).
    imported = help_imports()
    assert "pipeline.stall" in imported  # the help text's stall defaults come from it
    assert "asyncio" not in imported
    assert "importlib.metadata" not in imported


def run_args(source: Path, output: Path, base_url: str, *more: str) -> list[str]:
    return [
        "run",
        "--quiet",
        "--input",
        str(source),
        "--column",
        "question",
        "--output",
        str(output),
        "--model",
        MODEL,
        "--base-url",
        base_url,
        *more,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_fresh_run_sends_its_first_request_before_any_heavy_library(
    tmp_path: Path, start_server: StartServer, suffix: str
) -> None:
    server = start_server()
    source = write_questions(tmp_path / f"in{suffix}", [f"question {i}" for i in range(20)])
    output = tmp_path / "out.parquet"

    done, loaded = probe(*run_args(source, output, server.base_url))

    assert done.returncode == 0, done.stderr
    assert output.exists()
    # A CSV or JSONL run's first rows go out before the input is read in full
    # (pipeline.head): no pyarrow, numpy or polars yet. A Parquet input needs
    # pyarrow to be read at all.
    assert loaded["first_request"] == ([] if suffix != ".parquet" else ["pyarrow"])
    assert loaded["numpy_at_first_request"] is False or suffix == ".parquet"
    # Parquet support loads for Parquet input; checkpoint parts and the output wait.
    assert loaded["parquet_at_first_request"] == (suffix == ".parquet")
    # The User-Agent's version is the code's own: no search of the installed metadata.
    assert loaded["metadata_at_first_request"] is False
    assert loaded["deferred_at_first_request"] == []
    # Assembling the output may use polars; nothing ever loads the SDK.
    assert "openai" not in loaded["exit"]


@pytest.mark.slow
def test_a_local_run_loads_no_pandas_where_it_is_installed(
    tmp_path: Path, start_server: StartServer
) -> None:
    # pyarrow would import it at its first conversion of Python values, to
    # tell pandas objects apart: 0.3-0.4 s of CPU and some 30 MB a run.
    pytest.importorskip("pandas")  # the [ray] extra brings it, as CI installs
    server = start_server()
    source = write_questions(tmp_path / "in.csv", [f"question {i}" for i in range(20)])
    output = tmp_path / "out.parquet"

    done, loaded = probe(*run_args(source, output, server.base_url))

    assert done.returncode == 0, done.stderr
    assert "pyarrow" in loaded["exit"]  # it made the checkpoint parts and the output
    assert "pandas" not in loaded["exit"]


@pytest.mark.slow
def test_a_resumed_run_never_loads_the_sdk_either(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = [f"question {i}" for i in range(20)] + ["[[fault:500]] fails"]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    first, _ = probe(*run_args(source, output, server.base_url, "--max-attempts", "1"))
    assert first.returncode == 0, first.stderr  # one failed row: the checkpoint is kept

    again = run_args(source, output, server.base_url, "--retry-failed", "--max-attempts", "1")
    done, loaded = probe(*again)

    assert done.returncode == 0, done.stderr
    assert "first_request" in loaded  # the failed row was sent again
    # A resumed run takes the full path: the checkpoint is read first.
    assert "pyarrow" in loaded["first_request"]
    assert "openai" not in loaded["exit"]


@pytest.mark.slow
def test_an_up_to_date_run_loads_no_http_client(tmp_path: Path, start_server: StartServer) -> None:
    # Nothing is sent, so nothing may be loaded to send it: a cron job that
    # finds its output complete pays no client import.
    server = start_server()
    source = write_questions(tmp_path / "in.csv", [f"question {i}" for i in range(5)])
    output = tmp_path / "out.parquet"
    first, _ = probe(*run_args(source, output, server.base_url))
    assert first.returncode == 0, first.stderr

    done, loaded = probe(*run_args(source, output, server.base_url))

    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stdout
    assert "first_request" not in loaded
    assert "aiohttp" not in loaded["exit"]


@pytest.mark.slow
def test_the_openai_transport_loads_the_sdk_when_chosen(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["one question"])
    output = tmp_path / "out.parquet"

    done, loaded = probe(*run_args(source, output, server.base_url, "--transport", "openai"))

    assert done.returncode == 0, done.stderr
    assert "openai" in loaded["first_request"]
    assert "polars" not in loaded["first_request"]
