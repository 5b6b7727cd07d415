"""The end of a run: what sealing, assembling and drawing the page import is
imported while the last answers are awaited (``pipeline.prefetch``), never
before every request left is in flight, and a failure there changes
nothing; the CLI's process leaves the interpreter no heap to walk at exit.

The end-to-end tests run the real CLI in a child process (the test process
has every module imported already) against the simulator with one slot."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.page import CHARTS
from pipeline.prefetch import ASSEMBLY_MODULES, PAGE_MODULES, Prefetch, modules_for

from conftest import MODEL, StartServer, write_questions

# Which thread first imported each module the end of a run needs, written
# by the child at exit; with ENRICH_TEST_FAIL_PREFETCH, the prefetch
# thread's imports of them fail (a broken install seen from that thread only).
CHILD = """
import atexit, json, sys, threading
from importlib.abc import MetaPathFinder
from pathlib import Path

WATCHED = {watched!r}
first = {{}}

class Watch(MetaPathFinder):
    # Asked first for every module not imported yet (importlib.import_module
    # raises no audit event: a finder sees both kinds of import).
    def find_spec(self, name, path=None, target=None):
        thread = threading.current_thread().name
        if name in WATCHED:
            if {fail!r} and thread == "enrich-prefetch":
                raise ImportError(f"{{name}}: refused on the prefetch thread")
            first.setdefault(name, thread)
        return None

sys.meta_path.insert(0, Watch())
atexit.register(lambda: Path({record!r}).write_text(json.dumps(first)))
from pipeline.cli import main
sys.argv = ["enrich", *sys.argv[1:]]
main()
"""


def run_child(
    tmp_path: Path, base_url: str, *, fail_prefetch: bool = False
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    source = write_questions(tmp_path / "in.csv", [f"end question {i}" for i in range(6)])
    record = tmp_path / "imports.json"
    watched = [*ASSEMBLY_MODULES, *PAGE_MODULES]
    code = CHILD.format(watched=watched, fail=fail_prefetch, record=str(record))
    argv = ["run", "--input", str(source), "--column", "question", "--model", MODEL]
    argv += ["--output", str(tmp_path / "out.parquet"), "--base-url", base_url, "--quiet"]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OPENAI_API_KEY": "sk-end-test"},
    )
    first: dict[str, str] = json.loads(record.read_text()) if record.exists() else {}
    return done, first


def assert_written_whole(tmp_path: Path) -> None:
    import polars as pl

    assert pl.read_parquet(tmp_path / "out.parquet")["response"].null_count() == 0
    report = json.loads((tmp_path / "out.parquet.report.json").read_text())
    assert report["counts"]["ok"] == 6
    page = (tmp_path / "out.parquet.report.html").read_text()
    for chart in CHARTS:
        assert f"id='chart-{chart}'" in page
    assert page.rstrip().endswith("</html>")
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


@pytest.mark.slow
def test_a_run_imports_its_assembly_and_page_while_its_last_answers_are_awaited(
    tmp_path: Path, start_server: StartServer
) -> None:
    # One slot, 0.3 s an answer: the last requests wait in flight long
    # enough for the thread to import everything before they are answered.
    server = start_server(slots=1, latency_ms=300)
    done, first = run_child(tmp_path, server.base_url)
    assert done.returncode == 0, done.stderr
    assert_written_whole(tmp_path)
    for name in ("polars", "pyarrow.parquet", "matplotlib.figure"):
        assert first.get(name) == "enrich-prefetch", first


@pytest.mark.slow
def test_the_page_is_written_whole_when_the_prefetch_fails(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(slots=1, latency_ms=300)
    done, first = run_child(tmp_path, server.base_url, fail_prefetch=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert_written_whole(tmp_path)
    # Imported where the run needs them, after the prefetch's attempt failed.
    for name in ("polars", "matplotlib.figure"):
        assert first.get(name) not in (None, "enrich-prefetch"), first


@pytest.mark.looptime
async def test_the_prefetch_waits_until_nothing_is_left_to_send_and_all_is_in_flight() -> None:
    prefetch = Prefetch(["json"])
    sent_all = asyncio.Event()
    left = {"outstanding": 5, "in_flight": 5}
    watcher = asyncio.create_task(
        prefetch.start_when_all_sent(
            sent_all, lambda: left["outstanding"], lambda: left["in_flight"]
        )
    )
    started = []
    for sent, outstanding, in_flight in (
        (False, 5, 5),  # the input may hold more rows: more requests to come
        (True, 4, 3),  # one waits for a place, a retry or a pause
        (True, 3, 3),
    ):
        if sent:
            sent_all.set()
        left.update(outstanding=outstanding, in_flight=in_flight)
        await asyncio.sleep(10)
        started.append(prefetch.started)
    assert started == [False, False, True]
    await watcher
    await prefetch.finished()


async def test_a_prefetch_whose_imports_fail_ends_quietly() -> None:
    prefetch = Prefetch(["pipeline_no_such_module", "json"])
    prefetch.start()
    prefetch.start()  # once
    await prefetch.finished()
    assert prefetch.started
    assert "pipeline_no_such_module" not in sys.modules


def test_the_page_modules_are_prefetched_only_when_the_page_is_drawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert modules_for(page=False) == ASSEMBLY_MODULES
    assert modules_for(page=True) == (*ASSEMBLY_MODULES, *PAGE_MODULES)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert modules_for(page=True) == ASSEMBLY_MODULES


def test_the_cli_freezes_the_heap_before_the_interpreter_exits(tmp_path: Path) -> None:
    # Registered before main, so it runs after main's own exit handler.
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
        "from pipeline.cli import main\n"
        "main(['--version'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "frozen True"
