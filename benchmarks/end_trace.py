"""``enrich`` with timestamps at the steps of a run's end, for ``short_run.py
--breakdown``: ``python benchmarks/end_trace.py TRACE.json run ...`` runs the
CLI in this process and writes, as JSON, when each step began and ended
(``time.perf_counter``, which on Linux is the system's monotonic clock, so
the caller can compare it with its own), every module imported after the
last answer (and on which thread), and when the atexit handlers ran.
Only the end is timed: the wrapping imports pyarrow at the start, which a
fresh run's head start would leave until its first requests are out.

Steps are found by name (the send stage's journal close, the assembly, the
report, the page, the checkpoint's removal, the CLI's summary); a name the
measured tree lacks is left out, so another tree can be traced too.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Final

# (module, attribute path, step name): what the end of a run goes through.
STEPS: Final = (
    ("pipeline.collect", "ResultSink.close", "journal sealed into a part"),
    ("pipeline.send", "forget", "shard journals forgotten"),
    ("pipeline.run", "assemble", "output assembled"),
    ("pipeline.finish", "build_report", "report built"),
    ("pipeline.finish", "write_report", "report written"),
    ("pipeline.finish", "read_report", "report read back"),
    ("pipeline.page", "render_page", "page drawn"),
    ("pipeline.page", "write_page", "page drawn and written"),
    ("pipeline.checkpoint", "Checkpoint.remove", "checkpoint removed"),
    ("pipeline.finish", "_emit_finish", "finish event"),
    ("pipeline.cli", "finish", "summary printed"),
)

marks: list[dict[str, Any]] = []
imports: list[dict[str, Any]] = []
answers: list[float] = []


def _wrap(owner: Any, name: str, step: str) -> None:
    function = getattr(owner, name)

    def note(began: float) -> None:
        marks.append({"step": step, "began": began, "ended": time.perf_counter()})

    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                note(began)

        setattr(owner, name, timed_async)
        return

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            note(began)

    setattr(owner, name, timed)


def _install() -> None:
    for module_name, path, step in STEPS:
        try:
            owner: Any = importlib.import_module(module_name)
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            getattr(owner, name)
        except (ImportError, AttributeError):
            continue  # not in the tree measured
        _wrap(owner, name, step)
    collect: Any = importlib.import_module("pipeline.collect")
    add = collect.Collected.add

    async def noted_add(self: Any, *args: Any, **kwargs: Any) -> Any:
        answers.append(time.perf_counter())
        return await add(self, *args, **kwargs)

    collect.Collected.add = noted_add


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "import" and args[0] not in sys.modules:
        name = args[0]
        imports.append(
            {"module": name, "at": time.perf_counter(), "thread": threading.current_thread().name}
        )


def main() -> None:
    out = sys.argv[1]
    started = time.perf_counter()
    # This imports pyarrow before the first request, which a fresh run's
    # head start would not: only the end of the traced run is timed.
    _install()
    sys.addaudithook(_audit)

    def dump() -> None:
        last = answers[-1] if answers else None
        after = [i for i in imports if last is not None and i["at"] >= last]
        record = {
            "started": started,
            "last_answer": last,
            "marks": marks,
            "imports_after_last_answer": after,
            "atexit": time.perf_counter(),
        }
        Path(out).write_text(json.dumps(record))

    atexit.register(dump)  # before the CLI's own: runs after them
    from pipeline.cli import main as cli_main

    sys.argv = ["enrich", *sys.argv[2:]]
    cli_main()


if __name__ == "__main__":
    main()
