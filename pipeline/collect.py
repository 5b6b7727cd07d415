"""The collect stage: every result reaches durable storage (the checkpoint's
journal, and the response cache for successful answers) within a fraction of
a second of its arrival, without the event loop ever touching the disk.

Group commit: results gather in memory while the previous commit is being
written; every ``interval_s`` (and whenever a commit finishes late) everything
gathered goes out as one journal record and one cache transaction, from one
worker thread. A commit's cost (an fsync) is paid per group, not per row, so
the run keeps its speed; a SIGKILL loses at most the answers of the last
``interval_s`` plus the commit in progress.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from pipeline.checkpoint import CheckpointWriter
from pipeline.crashpoints import crash_point
from pipeline.durable import disk_full_error
from pipeline.errors import EnrichError, WriteFailed
from pipeline.progress import Progress
from pipeline.results import RowResult
from pipeline.reuse import cached_answer
from pipeline.tally import TallyCounter

if TYPE_CHECKING:
    from pipeline.cache import CachedAnswer

# Results held while a slow commit (a part being sealed, a busy disk) is in
# progress, beyond which arriving results wait for it: memory stays bounded
# whatever the disk does.
MAX_PENDING_RESULTS: Final = 50_000


class AnswerStore(Protocol):
    """Where successful answers go besides the checkpoint (the response cache)."""

    def put_many(self, items: list[tuple[bytes, CachedAnswer]]) -> None: ...


class ResultSink:
    """Collects results on the event loop and commits them in groups from a
    worker thread. The first commit that fails (a full disk) is kept in
    ``failure`` and reported to ``on_failure``, so the run stops sending; its
    results stay in memory and ``close`` tries them once more."""

    def __init__(
        self,
        writer: CheckpointWriter,
        interval_s: float,
        cache: AnswerStore | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._writer = writer
        self._cache = cache
        self._interval_s = interval_s
        self._on_failure = on_failure
        self._buffer: list[RowResult] = []
        self._unwritten: list[RowResult] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enrich-commit")
        self._commit: asyncio.Future[None] | None = None
        self._flushing = asyncio.Lock()
        self.failure: BaseException | None = None

    async def add(self, result: RowResult) -> None:
        self._buffer.append(result)
        if len(self._buffer) >= MAX_PENDING_RESULTS:
            await self.flush()

    async def flush(self) -> None:
        """Commit what is gathered; waits for the commit in progress first,
        which is what groups the results that arrive meanwhile."""
        async with self._flushing:
            await self._finished_commit()
            if not self._buffer or self.failure is not None:
                return
            batch, self._buffer = self._buffer, []
            loop = asyncio.get_running_loop()
            self._commit = loop.run_in_executor(self._executor, self._try_append, batch, loop)

    async def _finished_commit(self) -> None:
        if self._commit is not None:
            # Shielded: cancelling the waiter (the committer task, at the end
            # of the run) must not cancel the commit itself.
            await asyncio.shield(self._commit)

    def _append(self, batch: list[RowResult]) -> None:
        # The checkpoint first: it is what resume trusts; the cache is a bonus.
        self._writer.append(batch)
        if self._cache is not None:
            answers = [
                (result.request_key, cached_answer(result))
                for result in batch
                if result.status == "ok" and result.request_key is not None and not result.cached
            ]
            if answers:
                self._cache.put_many(answers)
        crash_point("after-commit")

    def _try_append(self, batch: list[RowResult], loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._append(batch)
        except Exception as exc:
            self._unwritten = batch
            self.failure = exc
            if self._on_failure is not None:
                # This is the commit thread: what stops the sending lives on the loop.
                loop.call_soon_threadsafe(self._on_failure, exc)

    async def run(self) -> None:
        """Commit every ``interval_s`` until cancelled or a commit fails."""
        while self.failure is None:
            await asyncio.sleep(self._interval_s)
            await self.flush()

    async def close(self) -> None:
        """Commit everything left (a failed commit's results included: space
        may have been freed) and seal the journal into a part. Raises the
        error of this last commit, if any, as ``commit_error`` names it."""
        await self._finished_commit()
        batch = [*self._unwritten, *self._buffer]
        self._unwritten, self._buffer = [], []
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._append_and_seal, batch)
        except Exception as exc:
            raise commit_error(exc, self._writer.checkpoint.run_dir) from None
        finally:
            self._executor.shutdown(wait=True)

    def _append_and_seal(self, batch: list[RowResult]) -> None:
        if batch:
            self._append(batch)
        self._writer.close()


def commit_error(exc: BaseException, run_dir: Path) -> EnrichError:
    """A failed commit as the error the run stops with: a full disk named by
    its device, or the way forward for any other write failure."""
    if isinstance(exc, EnrichError):
        return exc
    return disk_full_error(exc, run_dir) or WriteFailed(
        f"cannot write the checkpoint in {run_dir} ({exc}); what was finished before is "
        "kept: fix the disk or choose another --run-dir, then rerun the same command"
    )


class Collected:
    """This pass's results as they reach the sink, counted on the way: what
    the run's summary is built from when it stops before the output exists
    (nothing is read back from the checkpoint)."""

    def __init__(self, progress: Progress, total_rows: int) -> None:
        self._sink: ResultSink | None = None
        self._progress = progress
        self.answered = bytearray(total_rows)
        """A byte per input row, 1 once this pass collected its result."""
        self.counter = TallyCounter()
        self.latencies_ms: array[float] = array("d")
        self.cache_hits = 0
        self.deduplicated = 0
        self.route = "online"
        self.batch_requests = 0
        """Requests batches ran for this pass's rows (the online ones are the call stage's)."""
        """The route this pass sends by: what its rows' ``route`` says."""

    def attach(self, sink: ResultSink) -> None:
        """Where results go from now on (the send stage makes the sink)."""
        self._sink = sink

    def ahead(self, rows: int) -> None:
        """Rows finished where this pass will collect them later (the Ray
        engine's workers, until their shard is gathered): shown by a
        progress that can (one with an ``ahead`` method) on top of those
        collected. Rows gathered come off it first."""
        show = getattr(self._progress, "ahead", None)
        if show is not None:
            show(rows)

    async def add(self, result: RowResult, key: bytes | None = None) -> None:
        assert self._sink is not None, "attach a sink first"
        result.request_key = key
        if result.route is None and result.status != "skipped":
            result.route = self.route
        self.answered[result.row_id] = 1
        self.counter.add(result)
        if result.latency_ms is not None:
            self.latencies_ms.append(result.latency_ms)
        await self._sink.add(result)
        self._progress.advance(result)
