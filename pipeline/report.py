"""The run report: one JSON file beside the output, for people and for the
next scheduled run.

``OUTPUT.report.json`` says how the run went (counts by status, tokens, cost,
wall time, rows/s, latency percentiles, requests, retries and 429s), with
what settings (secrets removed) and on what input. Because it pins the input
(content hash), the settings fingerprint and the output file it describes, it
is also what makes a rerun idempotent: ``check_up_to_date`` tells whether the
output is already the complete answer to this input and these settings.

``build_report`` takes one ``RunRecord``: the job's facts, the run's
``RunSummary`` and how it ended. For a run that stopped before writing the
output (spend cap, interrupt, fatal API error) the summary's counts are what
its checkpoint holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pipeline.costs import Price, cost, unknown_price_message
from pipeline.durable import atomic_write_bytes
from pipeline.errors import EnrichError, ExitCode
from pipeline.events import json_safe

# file_facts: the output's size and mtime, local or in object storage.
from pipeline.identity import InputIdentity, file_facts, settings_hash
from pipeline.redact import redact
from pipeline.redact import redact_settings as redact_settings
from pipeline.timeline import job_timeline, segment_facts
from pipeline.version import version

if TYPE_CHECKING:
    from pipeline.costs import Estimate
    from pipeline.storage import Location
    from pipeline.summary import RunSummary
    from pipeline.timeline import Timeline

REPORT_SUFFIX: Final = ".report.json"
PAGE_SUFFIX: Final = ".html"
REPORT_VERSION: Final = 1
PERCENTILES: Final = ("p50", "p90", "p95", "p99")


def _outcome(exit_code: int) -> str:
    try:
        return ExitCode(exit_code).outcome
    except ValueError:
        return "error"


def report_path_for(output: Path) -> Path:
    """``data/out/x.parquet`` -> ``data/out/x.parquet.report.json``."""
    return output.with_name(output.name + REPORT_SUFFIX)


def page_path_for(report: Path) -> Path:
    """The report page beside a report: ``x.report.json`` -> ``x.report.html``."""
    name = report.name.removesuffix(".json")
    return report.with_name(name + PAGE_SUFFIX)


def fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 of the settings that change an answer: the same hash as the
    checkpoint manifest's ``settings_sha256``, so the two can be compared."""
    return settings_hash(settings)


def latency_percentiles(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p95/p99 in ms (None without data), like ``RunSummary.latency_percentile``."""
    if not latencies_ms:
        return dict.fromkeys(PERCENTILES, None)
    if len(latencies_ms) == 1:
        only = round(float(latencies_ms[0]), 3)
        return dict.fromkeys(PERCENTILES, only)
    # Imported here: statistics (with fractions, random) is for the end of
    # a run, and a run's first request does not wait for it.
    import statistics

    cuts = statistics.quantiles(latencies_ms, n=100, method="inclusive")
    return {f"p{p}": round(cuts[p - 1], 3) for p in (50, 90, 95, 99)}


def _file_facts(path: Location) -> dict[str, Any] | None:
    facts = file_facts(path)
    if facts is None:
        return None
    return {"size": facts[0], "mtime_ns": facts[1]}


def _tool_version() -> str:
    return version()


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class JobFacts:
    """What a report says about the job, as opposed to how the run went:
    fixed before the first request."""

    output: Location
    settings: Mapping[str, Any]
    """The full config (``config.to_dict()``), redacted when written."""
    fingerprint: str
    """sha256 of the settings that change answers."""
    input_identity: InputIdentity | None = None
    input_rows: int | None = None
    output_settings: Mapping[str, Any] = field(default_factory=dict)
    """What else shapes the output file (column prefix), so a change there is
    not mistaken for an up-to-date output."""
    price: Price | None = None
    model: str | None = None
    max_cost: float | None = None
    secrets: tuple[str | None, ...] = ()
    estimate_before_run: Estimate | None = None
    """What the run expected (rows, tokens, cost, time) from its first rows,
    made before the first request: the page sets the cost against it."""
    earlier_segments: tuple[dict[str, Any], ...] = ()
    """The timeline segments of the job's earlier runs (same settings, same
    input), from the last report: a resumed job's report covers every run."""


@dataclass(frozen=True)
class RunRecord:
    """One report: the job, what the run did, and how it ended."""

    job: JobFacts
    summary: RunSummary
    exit_code: int
    message: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    timeline: Timeline | None = None
    """This run's intervals; the report's ``timeline`` is the job's earlier
    segments and this run's. Its segment is closed by ``build_report``."""


def build_report(record: RunRecord) -> dict[str, Any]:
    """The report as a JSON-ready dict.

    Call it after the output file is in place (its size and mtime are
    recorded so a later run can tell it is untouched). The price gives the
    estimated cost of every row in the output (resumed ones included);
    ``summary.cost_usd`` is what this invocation itself spent.
    """
    job, summary, exit_code = record.job, record.summary, record.exit_code
    secrets = list(job.secrets)
    output_facts = _file_facts(job.output) if exit_code in (0, 1) else None
    body = {
        "report_version": REPORT_VERSION,
        "tool": {"name": "enrich", "version": _tool_version()},
        "outcome": _outcome(exit_code),
        "exit_code": exit_code,
        "message": record.message,
        "started_at": _iso(record.started_at),
        "finished_at": _iso(record.finished_at or datetime.now(UTC)),
        "input": {
            **({} if job.input_identity is None else asdict(job.input_identity)),
            "rows": job.input_rows,
        },
        "output": {
            "path": str(job.output),
            # Only a finished run describes a complete file; after a stop the
            # path may hold an older output that this report says nothing about.
            **(output_facts or {"size": None, "mtime_ns": None}),
            "rows": summary.rows,
        },
        "counts": _counts(summary),
        "tokens": {
            "prompt": summary.prompt_tokens,
            "completion": summary.completion_tokens,
            "total": summary.prompt_tokens + summary.completion_tokens,
        },
        "cost": _cost(job, summary),
        "timing": _timing(summary),
        "requests": _requests(summary),
        "limits": _limits(summary),
        "server": dict(summary.server),
        "reuse": {
            "cache_hits": summary.cache_hits,
            "deduplicated": summary.deduplicated,
            "requests_saved": summary.cache_hits + summary.deduplicated,
        },
        "fingerprint": job.fingerprint,
        "output_settings": redact_settings(dict(job.output_settings), secrets),
        "settings": redact_settings(job.settings, secrets),
    }
    if record.timeline is None:
        return body
    return {**body, "timeline": _timeline(job, record.timeline, body)}


def _timeline(job: JobFacts, timeline: Timeline, body: Mapping[str, Any]) -> dict[str, Any]:
    # The segment says how its run ended in the report's own words (outcome,
    # times, rows), so the page's list of runs matches the reports.
    segment = timeline.segment(**segment_facts(body))
    return job_timeline([*job.earlier_segments, segment])


def _processed(summary: RunSummary) -> int:
    # Clamped: a run that stopped before assembling counts what its
    # checkpoint held, which may be fewer rows than it resumed with.
    return max(summary.rows - summary.resumed_rows, 0)


def _counts(summary: RunSummary) -> dict[str, Any]:
    attempted = summary.ok + summary.error
    return {
        "rows": summary.rows,
        "ok": summary.ok,
        "error": summary.error,
        "skipped": summary.skipped,
        # Errors whose last failure was transient: the next run sends them again.
        "pending": summary.pending,
        "resumed_rows": summary.resumed_rows,
        "processed_rows": _processed(summary),
        "error_rate": round(summary.error / attempted, 6) if attempted else 0.0,
        "error_reasons": [
            {"reason": reason, "rows": rows} for reason, rows in summary.error_reasons
        ],
    }


def _cost(job: JobFacts, summary: RunSummary) -> dict[str, Any]:
    price = job.price
    total = (
        cost(summary.prompt_tokens, summary.completion_tokens, price) if price is not None else None
    )
    return {
        "currency": "USD",
        "estimated_total": None if total is None else round(total, 6),
        "this_run": None if summary.cost_usd is None else round(summary.cost_usd, 6),
        "max_cost": job.max_cost,
        "price": None if price is None else price.to_dict(),
        "estimate_before_run": (
            None if job.estimate_before_run is None else job.estimate_before_run.to_dict()
        ),
        "note": (
            "estimate from the API's token usage and the price table; check your invoice"
            if price is not None
            else unknown_price_message(job.model or "?")
        ),
    }


def _timing(summary: RunSummary) -> dict[str, Any]:
    wall_s = summary.wall_s
    return {
        "wall_s": round(wall_s, 3),
        "rows_per_s": round(_processed(summary) / wall_s, 3) if wall_s > 0 else 0.0,
        "latency_ms": {
            **latency_percentiles(summary.latencies_ms),
            "count": len(summary.latencies_ms),
        },
    }


def _requests(summary: RunSummary) -> dict[str, Any]:
    return {
        "sent": summary.requests,
        "retries": summary.retries,
        "rate_limited_429": summary.rate_limited,
        "bad_structured_answers": summary.bad_answers,
        "outages": summary.outages,
        "outage_s": round(summary.outage_s, 3),
        "stalled": summary.stalled,
        "stall_timeout_s": _rounded(summary.stall_timeout_s),
        "streamed": summary.streamed,
    }


def _limits(summary: RunSummary) -> dict[str, Any]:
    """What the rate limiter settled on, for tuning the next run's flags."""
    return {
        "concurrency": round(summary.concurrency_limit, 3),
        "learned_rpm": summary.learned_rpm,
        "learned_tpm": summary.learned_tpm,
        "estimated_rpm": _rounded(summary.estimated_rpm),
        "paused_s": round(summary.paused_s, 3),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def dumps_report(report: Mapping[str, Any], secrets: Iterable[str | None] = ()) -> bytes:
    # The last line of defence: whatever a caller put in, the key is scrubbed
    # from the final text too.
    text = json.dumps(json_safe(report), indent=2, ensure_ascii=False, allow_nan=False)
    return (redact(text, secrets) + "\n").encode()


def write_report(path: Path, report: Mapping[str, Any], secrets: Iterable[str | None] = ()) -> None:
    """Write atomically (temp file, fsync, rename): a reader never sees half a report."""
    atomic_write_bytes(path, dumps_report(report, secrets))


def read_report(path: Path) -> dict[str, Any] | None:
    """The report at ``path``, or None when absent or unreadable (an
    unreadable report only means the next run does the work again)."""
    try:
        body = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


@dataclass(frozen=True)
class Freshness:
    """Whether the output is already the complete answer for this input and
    these settings. ``reason`` says why (not), in words for a log line."""

    up_to_date: bool
    reason: str
    report: dict[str, Any] | None = None


def check_up_to_date(
    report_path: Path,
    *,
    output: Location,
    input_path: Location,
    fingerprint: str,
    output_settings: Mapping[str, Any] | None = None,
) -> Freshness:
    """Up to date when the last report says the run finished (exit 0 or 1,
    every input row in the output), the output file is the one it describes
    (same size and mtime), the input has the same content (hashed again only
    when its size or mtime changed) and the settings fingerprint matches.

    Reads only; sends nothing. The caller decides what an up-to-date output
    whose last run had too many failed rows means (``report["counts"]``).
    """
    report = read_report(report_path)
    if report is None:
        return Freshness(False, f"no readable run report at {report_path}")
    if report.get("report_version") != REPORT_VERSION:
        return Freshness(False, "the run report was written by another version of enrich")
    if report.get("exit_code") not in (0, 1):
        return Freshness(False, f"the last run did not finish ({report.get('outcome')})")
    facts = _file_facts(output)
    recorded = report.get("output", {})
    if facts is None:
        return Freshness(False, f"the output {output} does not exist")
    pending = report.get("counts", {}).get("pending", 0)
    if pending:
        return Freshness(
            False, f"{pending:,} rows failed for transient reasons last time; sending them again"
        )
    if (recorded.get("size"), recorded.get("mtime_ns")) != (facts["size"], facts["mtime_ns"]):
        return Freshness(False, f"the output {output} changed since the last run")
    recorded_input = report.get("input", {})
    if recorded.get("rows") is None or recorded.get("rows") != recorded_input.get("rows"):
        return Freshness(False, "the last run's output does not cover every input row")
    if report.get("fingerprint") != fingerprint:
        return Freshness(False, "the model, prompt or sampling settings changed")
    if report.get("output_settings") != redact_settings(dict(output_settings or {})):
        return Freshness(False, "the output settings (column prefix) changed")
    changed = _input_change(recorded_input, input_path)
    if changed is not None:
        return Freshness(False, changed)
    return Freshness(
        True,
        f"{output} is up to date: same input, same settings, finished "
        f"{report.get('finished_at') or 'earlier'}",
        report,
    )


def _input_change(recorded: Mapping[str, Any], input_path: Location) -> str | None:
    """Why the input is not the one the report recorded (None: it is)."""
    try:
        known = InputIdentity(
            path=str(recorded["path"]),
            size=int(recorded["size"]),
            mtime_ns=int(recorded["mtime_ns"]),
            sha256=str(recorded["sha256"]),
            inode=int(recorded.get("inode", 0)),
            ctime_ns=int(recorded.get("ctime_ns", 0)),
        )
    except (KeyError, TypeError, ValueError):
        return "the run report does not identify the input"
    try:
        current = InputIdentity.of(input_path, known)
    except (OSError, EnrichError):
        return f"the input {input_path} cannot be read"
    if not current.same_content(known):
        return f"the input {input_path} changed since the last run"
    return None
