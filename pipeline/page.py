"""The report page: one self-contained HTML file drawn from a run report.

Charts are drawn by matplotlib as inline SVG: the page needs no script, no
font and no network, opens offline in any browser, and stays small (a few
hundred intervals per chart whatever the run's length; see
``pipeline.timeline``). Every number shown is read from the report, never
recomputed another way: a count in the page is the count in the JSON.

matplotlib is imported here only, when a page is drawn: starting a run and
sending its first request never pays for it.
"""

from __future__ import annotations

import html
import importlib.util
import io
import json
from collections.abc import Mapping, Sequence
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pipeline.durable import atomic_write_bytes
from pipeline.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Chart ids, in page order: tests and readers can find each one.
CHARTS: Final = ("throughput", "latency-distribution", "latency-over-time", "concurrency", "cost")

_WIDTH_IN: Final = 9.0
_HEIGHT_IN: Final = 2.8
_BLUE, _GREEN, _RED, _ORANGE, _GREY = "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#7f7f7f"


class PageUnavailable(UsageError):
    """matplotlib (the ``page`` extra) is not installed."""


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise PageUnavailable(
            "the report page needs matplotlib: pip install 'enrich-llm[page]' "
            "(or pass --no-page to write only the JSON report)"
        )


def write_page(path: Path, report: Mapping[str, Any]) -> None:
    """Write the page for ``report`` atomically (temp file, fsync, rename).
    Raises ``PageUnavailable`` without matplotlib."""
    require_matplotlib()
    atomic_write_bytes(path, render_page(report).encode())


# -- time axis ---------------------------------------------------------------


class _Axis:
    """The job's intervals laid end to end: resumed runs follow one another
    on one time axis (the time between runs left out), each interval at its
    start, with its own width (the last one of a run may be shorter)."""

    def __init__(self, segments: Sequence[Mapping[str, Any]]) -> None:
        self.starts: list[float] = []
        self.widths: list[float] = []
        self.boundaries: list[float] = []
        self.series: dict[str, list[float | None]] = {}
        offset = 0.0
        for index, segment in enumerate(segments):
            if index:
                self.boundaries.append(offset)
            interval = float(segment["interval_s"])
            count = len(segment["series"]["sent"])
            wall = max(float(segment.get("wall_s") or 0.0), interval * (count - 1))
            for i in range(count):
                self.starts.append(offset + i * interval)
                width = interval if i < count - 1 else wall - interval * (count - 1)
                self.widths.append(max(width, 1e-3))
            for name, values in segment["series"].items():
                self.series.setdefault(name, [None] * (len(self.starts) - count)).extend(values)
            for values in self.series.values():
                values.extend([None] * (len(self.starts) - len(values)))
            offset += max(wall, 1e-3)
        self.end = offset

    def values(self, name: str) -> list[float]:
        return [float(v or 0) for v in self.series.get(name, [])]

    def per_second(self, name: str) -> list[float]:
        return [v / w for v, w in zip(self.values(name), self.widths, strict=True)]

    def mid(self) -> list[float]:
        return [s + w / 2 for s, w in zip(self.starts, self.widths, strict=True)]


# -- charts ------------------------------------------------------------------


def _figure() -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(_WIDTH_IN, _HEIGHT_IN))
    # Fixed margins (a layout engine costs more time than the drawing), the
    # legend in the right margin, clear of the data.
    figure.subplots_adjust(left=0.08, right=0.76, bottom=0.17, top=0.96)
    axes = figure.subplots()
    axes.grid(True, color="#dddddd", linewidth=0.6)
    axes.spines[["top", "right"]].set_visible(False)
    return figure, axes


def _legend(axes: Axes) -> None:
    if not axes.get_legend_handles_labels()[0]:
        return  # nothing drawn (a run that sent nothing)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _svg(figure: Figure, salt: str) -> str:
    import matplotlib

    buffer = io.StringIO()
    # Text stays text (no embedded glyph paths: smaller, and selectable);
    # the salt keeps element ids unique across the page's charts; no date,
    # so the same report gives the same page.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _mark_runs(axes: Axes, axis: _Axis) -> None:
    for boundary in axis.boundaries:
        axes.axvline(boundary, color=_GREY, linestyle="--", linewidth=1)
        axes.annotate(
            "resumed",
            (boundary, 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            color=_GREY,
            xytext=(3, -10),
            textcoords="offset points",
        )


def _time_axis(axes: Axes, axis: _Axis, ylabel: str) -> None:
    axes.set_xlim(0, axis.end or 1.0)
    axes.set_xlabel("seconds of run time (runs of the job end to end)")
    axes.set_ylabel(ylabel)
    _mark_runs(axes, axis)


def _throughput(axis: _Axis) -> Figure:
    figure, axes = _figure()
    x = [*axis.starts, axis.end] if axis.starts else []
    sent = axis.per_second("sent")
    done = [a + b for a, b in zip(axis.per_second("ok"), axis.per_second("error"), strict=True)]
    if x:
        axes.stairs(sent, x, color=_BLUE, label="requests sent /s", linewidth=1.4)
        axes.stairs(done, x, color=_GREEN, label="rows answered /s", linewidth=1.2)
        retries = axis.per_second("retries")
        if any(retries):
            axes.stairs(retries, x, color=_ORANGE, label="retries /s", linewidth=0.8)
    limit = [
        (float(v) / 60.0 if v is not None else float("nan"))
        for v in axis.series.get("limit_rpm", [])
    ]
    if any(v == v for v in limit):
        axes.stairs(limit, x, color="black", linestyle="--", linewidth=1, label="rate limit /s")
    top = max([*sent, *done, *(v for v in limit if v == v), 1.0])
    for name, colour, label in (
        ("paused_s", _ORANGE, "paused (429 retry-after)"),
        ("outage_s", _RED, "outage"),
    ):
        spans = [
            (s, w) for s, w, v in zip(axis.starts, axis.widths, axis.values(name), strict=True) if v
        ]
        for i, (start, width) in enumerate(spans):
            axes.axvspan(
                start,
                start + width,
                color=colour,
                alpha=0.12,
                lw=0,
                label=label if i == 0 else None,
            )
    marks = (
        ("rate_limited", _ORANGE, "x", "429s"),
        ("error", _RED, "v", "failed rows"),
    )
    for row, (name, colour, marker, label) in enumerate(marks):
        where = [m for m, v in zip(axis.mid(), axis.values(name), strict=True) if v]
        if where:
            y = -top * (0.06 + 0.07 * row)
            axes.plot(
                where,
                [y] * len(where),
                linestyle="none",
                marker=marker,
                color=colour,
                markersize=5,
                label=label,
            )
    axes.set_ylim(-top * 0.2, top * 1.15)
    _time_axis(axes, axis, "per second")
    _legend(axes)
    return figure


def _latency_distribution(latency: Mapping[str, Any]) -> Figure:
    figure, axes = _figure()
    edges = [float(e) for e in latency["edges_ms"]]
    counts = [int(c) for c in latency["counts"]]
    used = [i for i, c in enumerate(counts) if c]
    if used:
        low, high = used[0], used[-1] + 1
        bins = [*edges[low:high], edges[high - 1] * (edges[1] / edges[0])]
        axes.stairs(counts[low:high], bins, fill=True, color=_BLUE, alpha=0.6)
        axes.set_xscale("log")
        from matplotlib.ticker import FuncFormatter, NullFormatter

        # Plain numbers: the default 10^n labels go through mathtext, the
        # slowest part of drawing the whole page.
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(NullFormatter())
        for name, colour in (("p50", _GREEN), ("p90", _ORANGE), ("p99", _RED)):
            value = latency.get(name)
            if value is not None:
                axes.axvline(value, color=colour, linewidth=1.2, label=f"{name} {_ms(value)}")
        _legend(axes)
    else:
        axes.text(0.5, 0.5, "no answered request", transform=axes.transAxes, ha="center")
    axes.set_xlabel("latency (ms, log scale)")
    axes.set_ylabel("requests")
    return figure


def _latency_over_time(axis: _Axis) -> Figure:
    figure, axes = _figure()
    counts = axis.values("latency_count")
    sums = axis.values("latency_sum_ms")
    mid = axis.mid()
    mean = [(s / c if c else float("nan")) for s, c in zip(sums, counts, strict=True)]
    peak = [
        (v if c else float("nan"))
        for v, c in zip(axis.values("latency_max_ms"), counts, strict=True)
    ]
    axes.plot(mid, mean, color=_BLUE, label="mean", linewidth=1.2)
    axes.plot(mid, peak, color=_RED, label="slowest", linewidth=0.8, alpha=0.7)
    _time_axis(axes, axis, "latency (ms)")
    axes.set_ylim(bottom=0)
    _legend(axes)
    return figure


def _concurrency(axis: _Axis) -> Figure:
    figure, axes = _figure()
    if axis.starts:
        x = [*axis.starts, axis.end]
        axes.stairs(
            axis.values("in_flight"),
            x,
            color=_BLUE,
            label="in flight (peak)",
            fill=True,
            alpha=0.35,
        )
        axes.stairs(
            axis.values("concurrency_limit"),
            x,
            color="black",
            linestyle="--",
            label="in-flight limit",
            linewidth=1,
        )
    _time_axis(axes, axis, "requests")
    axes.set_ylim(bottom=0)
    _legend(axes)
    return figure


def _cost(axis: _Axis, cost: Mapping[str, Any]) -> Figure:
    figure, axes = _figure()
    spent = list(accumulate(axis.values("cost_usd")))
    if axis.starts:
        axes.plot(
            [0.0, *(s + w for s, w in zip(axis.starts, axis.widths, strict=True))],
            [0.0, *spent],
            color=_BLUE,
            label="spent so far",
            linewidth=1.4,
        )
    cap = cost.get("max_cost")
    if cap is not None:
        axes.axhline(cap, color=_RED, linestyle="--", linewidth=1, label=f"cap ${cap:,.4g}")
    estimate = (cost.get("estimate_before_run") or {}).get("cost_usd")
    if estimate is not None:
        axes.axhline(
            estimate,
            color=_GREY,
            linestyle=":",
            linewidth=1.2,
            label=f"estimate before the run ${estimate:,.4g}",
        )
    _time_axis(axes, axis, "USD")
    axes.set_ylim(bottom=0)
    if cost.get("price") is None:
        axes.text(
            0.5,
            0.5,
            "no price known for this model",
            transform=axes.transAxes,
            ha="center",
            color=_GREY,
        )
    _legend(axes)
    return figure


# -- page --------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def _text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.6g}"
    return str(value)


def _cell(key: str, value: Any) -> str:
    """A number with its report key and raw value, so that a reader (or a
    test) can tell which report field it shows."""
    raw = html.escape(json.dumps(value), quote=True)
    return f'<td data-key="{html.escape(key)}" data-value="{raw}">{html.escape(_text(value))}</td>'


def _get(report: Mapping[str, Any], key: str) -> Any:
    node: Any = report
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _facts(report: Mapping[str, Any], rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(label)}</th>{_cell(key, _get(report, key))}</tr>"
        for label, key in rows
    )
    return f"<table class='facts'>{body}</table>"


_SUMMARY: Final = (
    ("rows in the output", "counts.rows"),
    ("ok", "counts.ok"),
    ("failed", "counts.error"),
    ("failed, retried by the next run (transient)", "counts.pending"),
    ("skipped (empty prompt)", "counts.skipped"),
    ("done by earlier runs", "counts.resumed_rows"),
    ("requests sent", "requests.sent"),
    ("retries", "requests.retries"),
    ("429 answers", "requests.rate_limited_429"),
    ("rows from the cache", "reuse.cache_hits"),
    ("rows shared by identical requests", "reuse.deduplicated"),
    ("prompt tokens", "tokens.prompt"),
    ("completion tokens", "tokens.completion"),
    ("cost of this run (USD)", "cost.this_run"),
    ("cost of every row in the output (USD)", "cost.estimated_total"),
    ("spend cap (USD)", "cost.max_cost"),
    ("estimate before the run (USD)", "cost.estimate_before_run.cost_usd"),
    ("wall time (s)", "timing.wall_s"),
    ("rows/s", "timing.rows_per_s"),
    ("latency p50 (ms)", "timing.latency_ms.p50"),
    ("latency p90 (ms)", "timing.latency_ms.p90"),
    ("latency p99 (ms)", "timing.latency_ms.p99"),
)

_IDENTITY: Final = (
    ("input", "input.path"),
    ("input rows", "input.rows"),
    ("input size (bytes)", "input.size"),
    ("input sha256", "input.sha256"),
    ("output", "output.path"),
    ("output size (bytes)", "output.size"),
    ("settings fingerprint", "fingerprint"),
    ("enrich version", "tool.version"),
)


def _next_steps(report: Mapping[str, Any]) -> list[str]:
    counts = report.get("counts", {})
    steps: list[str] = []
    code = report.get("exit_code")
    if code not in (0, 1):
        steps.append(
            "The run stopped before the end: run the same command again to resume "
            "(finished rows are kept and not paid again)."
        )
    if counts.get("pending"):
        steps.append(
            f"{counts['pending']:,} rows failed for transient reasons (timeouts, 5xx, 429s): "
            "run the same command again to send them again."
        )
    permanent = (counts.get("error") or 0) - (counts.get("pending") or 0)
    if permanent > 0:
        steps.append(
            f"{permanent:,} rows were refused for good (4xx, invalid answers): fix the cause, "
            "then run the same command with --retry-failed."
        )
    return steps or ["Nothing to do: every row is answered."]


def _errors_table(timeline: Mapping[str, Any]) -> str:
    errors: Mapping[str, Mapping[str, Any]] = timeline.get("errors", {})
    if not errors:
        return "<p>No row failed.</p>"
    rows = "".join(
        "<tr>"
        f"<td>{html.escape(kind)}</td>"
        f"{_cell(f'timeline.errors.{kind}.count', entry['count'])}"
        f"<td>{'transient: the next run retries' if entry.get('transient') else 'permanent'}</td>"
        f"<td>{html.escape(', '.join(str(r) for r in entry.get('rows', [])))}</td>"
        f"<td class='example'>{html.escape(str(entry.get('example') or ''))}</td>"
        "</tr>"
        for kind, entry in errors.items()
    )
    return (
        "<table class='errors'><tr><th>reason</th><th>rows</th><th>kind</th>"
        "<th>example rows (input row numbers, from 0)</th><th>example message</th></tr>"
        f"{rows}</table>"
    )


def _segments_table(timeline: Mapping[str, Any]) -> str:
    rows = "".join(
        "<tr>"
        f"<td>{i + 1}</td><td>{html.escape(_text(s.get('started_at')))}</td>"
        f"<td>{html.escape(_text(s.get('finished_at')))}</td>"
        f"<td>{html.escape(_text(s.get('outcome')))} "
        f"({html.escape(_text(s.get('exit_code')))})</td>"
        f"<td>{html.escape(_text(s.get('processed_rows')))}</td>"
        f"<td>{html.escape(_text(s.get('resumed_rows')))}</td>"
        f"<td>{html.escape(_text(s.get('wall_s')))}</td>"
        f"<td>{html.escape(_text(s.get('interval_s')))}</td>"
        "</tr>"
        for i, s in enumerate(timeline.get("segments", []))
    )
    return (
        "<table class='segments'><tr><th>run</th><th>started</th><th>finished</th>"
        "<th>outcome</th><th>rows done</th><th>rows done before</th><th>wall (s)</th>"
        f"<th>interval (s)</th></tr>{rows}</table>"
    )


_STYLE: Final = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;
max-width:70em;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{padding:.2em .6em;text-align:left;
vertical-align:top;border-bottom:1px solid #eee}.facts td{text-align:right;
font-variant-numeric:tabular-nums}.example{font-family:monospace;font-size:.85em}
figure{margin:.5em 0}figcaption{font-size:.9em;color:#555}svg{max-width:100%;height:auto}
.outcome{display:inline-block;padding:.1em .5em;border-radius:.3em;background:#eee}
pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.85em}
.cols{display:flex;flex-wrap:wrap;gap:2em}
"""


def _charts(report: Mapping[str, Any], timeline: Mapping[str, Any]) -> str:
    """Every chart of the page, in ``CHARTS`` order, each with its caption."""
    axis = _Axis(timeline.get("segments", []))
    figures = {
        "throughput": (
            _throughput(axis),
            "Throughput against the rate limit in force (configured, reported by the "
            "server, or learned from 429s), with 429s, failed rows and pauses marked",
        ),
        "latency-distribution": (
            _latency_distribution(timeline["latency"]),
            "Latency of answered requests over the whole job, with p50/p90/p99",
        ),
        "latency-over-time": (_latency_over_time(axis), "Latency over time, per interval"),
        "concurrency": (
            _concurrency(axis),
            "Requests in flight (peak per interval) and the in-flight limit",
        ),
        "cost": (
            _cost(axis, report.get("cost", {})),
            "Cost so far against the spend cap and the estimate made before the run",
        ),
    }
    return "".join(
        f"<figure id='chart-{name}'>{_svg(figure, name)}"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, (figure, caption) in figures.items()
    )


def render_page(report: Mapping[str, Any]) -> str:
    """The page's HTML for a run report (a dict as written by the runner)."""
    timeline: Mapping[str, Any] = report.get("timeline") or {
        "segments": [],
        "errors": {},
        "latency": {"edges_ms": [1.0, 10.0], "counts": [0, 0]},
    }
    charts = _charts(report, timeline)
    latency = timeline["latency"]
    job_latency = " · ".join(f"{name} {_ms(latency.get(name))}" for name in ("p50", "p90", "p99"))
    settings = json.dumps(report.get("settings", {}), indent=2, ensure_ascii=False)
    steps = "".join(f"<li>{html.escape(step)}</li>" for step in _next_steps(report))
    title = f"enrich report: {report.get('output', {}).get('path', '')}"
    message = report.get("message")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        # No script, no request: the page is all there is.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p><span class='outcome' data-key='outcome'>{html.escape(_text(report.get('outcome')))}"
        f"</span> exit code {html.escape(_text(report.get('exit_code')))} · started "
        f"{html.escape(_text(report.get('started_at')))} · finished "
        f"{html.escape(_text(report.get('finished_at')))}"
        f"{' · ' + html.escape(str(message)) if message else ''}</p>"
        f"<h2>What to do next</h2><ul class='next'>{steps}</ul>"
        f"<div class='cols'><div><h2>This run</h2>{_facts(report, _SUMMARY)}</div>"
        f"<div><h2>Input and output</h2>{_facts(report, _IDENTITY)}</div></div>"
        f"<h2>Over time</h2><p>Latency over the whole job: {html.escape(job_latency)} "
        "(from the job's latency histogram).</p>"
        f"{charts}"
        f"<h2>Why rows failed</h2>{_errors_table(timeline)}"
        f"<h2>Runs of this job</h2>{_segments_table(timeline)}"
        f"<h2>Settings</h2><pre>{html.escape(settings)}</pre>"
        "</body></html>\n"
    )
