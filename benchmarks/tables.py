"""Medians over a variant's repeats, and the text tables they are printed in."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from harness import JobResult


def med(jobs: Sequence[JobResult], key: str) -> float:
    """Median of a measurement (or of a count in ``extra``) over the successful jobs."""
    values = [job.extra.get(key, getattr(job, key, None)) for job in jobs if job.ok]
    numbers = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.median(numbers) if numbers else math.nan


def ratio(numerator: float, denominator: float) -> float:
    if denominator == 0 or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def summarize(jobs: Sequence[JobResult]) -> dict[str, Any]:
    """Medians over the successful repeats of one variant."""
    wall = med(jobs, "wall_s")
    return {
        "runs": sum(job.ok for job in jobs),
        "wall_s": wall,
        "rows_per_s": med(jobs, "rows_per_s"),
        "cpu_ms_per_row": med(jobs, "cpu_ms_per_row"),
        # Near 100%: the client is CPU-bound; the server's latency is not what limits it.
        "cpu_s": med(jobs, "cpu_s"),
        "cpu_share": ratio(med(jobs, "cpu_s"), wall),
        "max_rss_mb": med(jobs, "max_rss_mb"),
        "first_request_s": med(jobs, "first_request_s"),
    }


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    digits: int = 2
    suffix: str = ""
    scale: float = 1.0

    def cell(self, entry: dict[str, Any]) -> str:
        value = entry.get(self.key, math.nan)
        number = float(value) * self.scale
        if math.isnan(number):
            return "-"
        return f"{number:,.{self.digits}f}{self.suffix}"


RUNS: Final = Column("n", "runs", 0)
ROWS_PER_S: Final = Column("rows/s", "rows_per_s", 0)
WALL: Final = Column("wall s", "wall_s")
CPU_PER_ROW: Final = Column("CPU ms/row", "cpu_ms_per_row")
CPU_SHARE: Final = Column("CPU/wall", "cpu_share", 0, "%", 100.0)
RSS: Final = Column("peak RSS MB", "max_rss_mb", 0)


def render_table(title: str, columns: Sequence[Column], entries: dict[str, dict[str, Any]]) -> str:
    header = ["variant", *(column.header for column in columns)]
    rows = [[name, *(column.cell(entry) for column in columns)] for name, entry in entries.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [cells[0].ljust(widths[0])]
        padded += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  " + "  ".join(padded)

    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


STARTUP_COLUMNS: Final = (
    Column("net rows/s", "net_rows_per_s", 0),
    Column("net CPU ms/row", "net_cpu_ms_per_row"),
)


def subtract_startup(entry: dict[str, Any], startup: dict[str, Any], rows: int) -> None:
    """Figures net of the process start-up (imports), which small inputs cannot
    amortise: what a long run converges to."""
    net_wall = entry["wall_s"] - startup["wall_s"]
    net_cpu = entry["cpu_s"] - startup["cpu_s"]
    entry["net_wall_s"] = net_wall
    entry["net_rows_per_s"] = ratio(rows, net_wall)
    entry["net_cpu_ms_per_row"] = ratio(1000.0 * net_cpu, rows)
