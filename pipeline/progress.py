"""Progress reporting. The runner talks to the ``Progress`` protocol; tqdm
lives behind it so the library never writes to a terminal by itself."""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Any, Protocol

from pipeline.tally import TallyCounter

if TYPE_CHECKING:
    from tqdm import tqdm

    from pipeline.events import EventSink, Level
    from pipeline.results import RowResult


class Progress(Protocol):
    def start(self, total: int, already_done: int) -> None: ...

    def advance(self, result: RowResult) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    """For --quiet, non-terminals, and library callers."""

    def start(self, total: int, already_done: int) -> None:
        pass

    def advance(self, result: RowResult) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress:
    """A bar with rows/s, ETA and ok/error counts. The counts are this run's;
    rows carried over from the checkpoint show as ``resumed`` (the bar's
    position counts both). ``note`` puts what the run waits for in front."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._bar: tqdm | None = None
        self._counter = TallyCounter()
        self._resumed = 0
        self._ahead = 0

    def note(self, waiting: str | None) -> None:
        """What the run waits for (a 429 pause, retries); None: nothing."""
        if self._bar is not None:
            self._bar.set_description_str(waiting or "", refresh=True)

    def start(self, total: int, already_done: int) -> None:
        from tqdm import tqdm  # only a terminal run draws a bar

        self._resumed = already_done
        self._bar = tqdm(
            total=total,
            initial=already_done,
            unit="row",
            dynamic_ncols=True,
            file=self._stream,
            smoothing=0.05,
            mininterval=0.25,
        )

    def advance(self, result: RowResult) -> None:
        self._counter.add(result)
        if self._bar is None:
            return
        if self._bar.desc:
            self._bar.set_description_str("", refresh=False)  # rows move again
        self._bar.update(1)
        # tqdm throttles redraws itself; the postfix only needs to be fresh when it draws.
        if self._bar.n % 50 == 0 or result.status == "error":
            self._bar.set_postfix(self._postfix(), refresh=False)

    def ahead(self, rows: int) -> None:
        """Rows finished where the run will collect them later (the Ray
        engine's workers): the bar moves with them, and collecting them
        moves it no further."""
        if self._bar is None or rows == self._ahead:
            return
        self._bar.update(rows - self._ahead)
        self._ahead = rows

    def _postfix(self) -> dict[str, int]:
        counts = self._counter.by_status()
        return {"resumed": self._resumed, **counts} if self._resumed else counts

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self._postfix(), refresh=False)
            self._bar.close()


class WaitingNotes:
    """An event sink that forwards everything, and hands the ``waiting``
    field of warnings (a 429 pause, rows retrying) to the progress bar, so a
    terminal run that only waits says so on the bar too."""

    def __init__(self, sink: EventSink, progress: TqdmProgress) -> None:
        self._sink = sink
        self._progress = progress

    def emit(self, event: str, *, level: Level = "info", message: str = "", **fields: Any) -> None:
        self._sink.emit(event, level=level, message=message, **fields)
        waiting = fields.get("waiting")
        if event == "warning" and isinstance(waiting, str):
            self._progress.note(waiting)
