"""Progress reporting. The runner talks to the ``Progress`` protocol; tqdm
lives behind it so the library never writes to a terminal by itself."""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Protocol

from pipeline.tally import TallyCounter

if TYPE_CHECKING:
    from tqdm import tqdm

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
    """A bar with rows/s, ETA and ok/error counts."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._bar: tqdm | None = None
        self._counter = TallyCounter()

    def start(self, total: int, already_done: int) -> None:
        from tqdm import tqdm  # only a terminal run draws a bar

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
        self._bar.update(1)
        # tqdm throttles redraws itself; the postfix only needs to be fresh when it draws.
        if self._bar.n % 50 == 0 or result.status == "error":
            self._bar.set_postfix(self._counter.by_status(), refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self._counter.by_status(), refresh=False)
            self._bar.close()
