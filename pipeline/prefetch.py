"""The end of a run, made ready while its last answers are awaited.

After the last answer, a run seals its journal into a part and assembles
the output (polars, ``pyarrow.parquet``, ``pyarrow.dataset``), then draws
the report page (matplotlib). Imported only then, these took about a
second on a 2-core machine, most of what a short run adds after its last
answer. So once every request still to be answered is in flight, with
nothing more to send, one thread imports them: the run is only waiting
then, and the import overlaps the wait.

Not sooner: an import holds the GIL in slices (``sys.getswitchinterval``)
and delays the event loop by a few milliseconds at a time (tens at most,
while a large extension is loaded), which the latency of answers arriving
meanwhile includes. At the start of a run the first burst's latency is what
the in-flight limit is judged against; at the end nothing more is sent,
so nothing is judged by the answers left.

A failed import here changes nothing: what it left half-imported is
forgotten, the module is imported again where the run needs it, and fails
or succeeds there as it would have without this thread (without
matplotlib, the page's warning says what to install). The thread is joined
before the run imports any of these itself, so no module is imported by
two threads at once.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Final

# What sealing the last part and assembling the output import.
ASSEMBLY_MODULES: Final = ("polars", "pyarrow.parquet", "pyarrow.dataset")
# What drawing the report page imports (pipeline.page itself is light).
PAGE_MODULES: Final = (
    "matplotlib.figure",
    "matplotlib.ticker",
    "matplotlib.backends.backend_svg",
)
# How often the wait for the last request to go out looks again: a fraction
# of any answer worth overlapping, and no load on an idle loop.
POLL_S: Final = 0.05


def modules_for(page: bool) -> tuple[str, ...]:
    """What the end of a run imports: the page's modules only when it is
    drawn and matplotlib is installed."""
    if page and _installed("matplotlib"):
        return (*ASSEMBLY_MODULES, *PAGE_MODULES)
    return ASSEMBLY_MODULES


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken install, a module set to None
        return False


def _import_all(modules: Sequence[str]) -> None:
    for name in modules:
        before = set(sys.modules)
        try:
            importlib.import_module(name)
        except Exception:
            _forget_partial(name, before)


def _forget_partial(name: str, before: set[str]) -> None:
    """Drop what a failed import of ``name`` left of its package: the
    submodules it did import stay bound to a parent module that no longer
    exists (``module 'matplotlib' has no attribute ...``). The run's own
    import then starts afresh and fails or succeeds as it would have
    without this thread. Only this package's modules: nothing else of the
    run imports them meanwhile."""
    package = name.partition(".")[0]
    for added in set(sys.modules) - before:
        if added == package or added.startswith(f"{package}."):
            sys.modules.pop(added, None)


class Prefetch:
    """``modules`` imported in one thread, started by ``start`` (once)."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = tuple(modules)
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None or not self.modules:
            return
        self._thread = threading.Thread(
            target=_import_all, args=(self.modules,), name="enrich-prefetch"
        )
        self._thread.start()

    async def finished(self) -> None:
        """Wait (off the event loop) until the imports are done, if started."""
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def start_when_all_sent(
        self,
        sent_all: asyncio.Event,
        outstanding: Callable[[], int],
        in_flight: Callable[[], int],
    ) -> None:
        """Start once nothing is left to send (``sent_all``) and every row
        still to be answered (``outstanding``) is in flight: none waits for
        a place, a retry or a pause."""
        await sent_all.wait()
        # Polled: the in-flight count moves on the call stage's own terms
        # (places granted and given back), with nothing to wait on.
        while outstanding() > in_flight():  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)
        self.start()
