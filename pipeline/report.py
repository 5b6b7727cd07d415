"""The run report: one JSON file beside the output, for people and for the
next scheduled run.

``OUTPUT.report.json`` says how the run went (counts by status, tokens, cost,
wall time, rows/s, latency percentiles, requests, retries and 429s), with
what settings (secrets removed) and on what input. Because it pins the input
(content hash), the settings fingerprint and the output file it describes, it
is also what makes a rerun idempotent: ``check_up_to_date`` tells whether the
output is already the complete answer to this input and these settings.

Decoupled from the runner: ``build_report`` takes anything shaped like
``pipeline.runner.RunSummary`` (see ``SummaryLike``). For a run that stopped
before writing the output (spend cap, interrupt, fatal API error) the counts
and tokens should be the checkpoint's (``pipeline.status.checkpoint_status``),
since the runner only tallies them while assembling the output.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pipeline.checkpoint import InputIdentity, settings_hash
from pipeline.costs import Price, cost, unknown_price_message
from pipeline.durable import atomic_write_bytes
from pipeline.errors import ExitCode
from pipeline.events import REDACTED, json_safe, redact
from pipeline.version import version

REPORT_SUFFIX: Final = ".report.json"
REPORT_VERSION: Final = 1

# Key names whose string values are credentials. Numbers under such names
# (max_tokens, tpm, prompt_tokens) are counts and limits, never secrets.
_SECRET_NAME: Final = re.compile(
    r"key|token|secret|passw|credential|auth|bearer|cookie|signature", re.IGNORECASE
)


def _outcome(exit_code: int) -> str:
    try:
        return ExitCode(exit_code).outcome
    except ValueError:
        return "error"


def report_path_for(output: Path) -> Path:
    """``data/out/x.parquet`` -> ``data/out/x.parquet.report.json``."""
    return output.with_name(output.name + REPORT_SUFFIX)


class SummaryLike(Protocol):
    """What the report needs from a run; ``pipeline.runner.RunSummary`` fits."""

    @property
    def rows(self) -> int: ...
    @property
    def ok(self) -> int: ...
    @property
    def error(self) -> int: ...
    @property
    def skipped(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def resumed_rows(self) -> int: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def requests(self) -> int: ...
    @property
    def retries(self) -> int: ...
    @property
    def rate_limited(self) -> int: ...
    @property
    def wall_s(self) -> float: ...
    @property
    def latencies_ms(self) -> Sequence[float]: ...


def fingerprint(settings: Mapping[str, Any]) -> str:
    """sha256 of the settings that change an answer: the same hash as the
    checkpoint manifest's ``settings_sha256``, so the two can be compared."""
    return settings_hash(settings)


def latency_percentiles(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 in ms (None without data), like ``RunSummary.latency_percentile``."""
    if not latencies_ms:
        return {"p50": None, "p95": None, "p99": None}
    if len(latencies_ms) == 1:
        only = round(float(latencies_ms[0]), 3)
        return {"p50": only, "p95": only, "p99": only}
    cuts = statistics.quantiles(latencies_ms, n=100, method="inclusive")
    return {f"p{p}": round(cuts[p - 1], 3) for p in (50, 95, 99)}


def _scrub_url(text: str, secrets: Sequence[str | None]) -> str:
    """A URL without a password in its userinfo or secret-looking query
    parameters (``?api-key=...``); other text unchanged."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    netloc = parts.netloc
    if parts.password is not None:
        host = netloc.rsplit("@", 1)[1]
        netloc = f"{parts.username}:{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_NAME.search(name) for name, _ in pairs):
            query = urlencode(
                [(n, REDACTED if _SECRET_NAME.search(n) else v) for n, v in pairs], safe="[]"
            )
    if (netloc, query) == (parts.netloc, parts.query):
        return text
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_settings(value: Any, secrets: Iterable[str | None] = ()) -> Any:
    """Settings safe to write down: string values under secret-looking key
    names become ``[redacted]`` (names ending in ``_env`` only *name* an
    environment variable and are kept), any occurrence of a secret in a string
    is replaced, and URLs lose passwords and secret query parameters."""
    kept = list(secrets)

    def walk(node: Any, name: str | None) -> Any:
        if isinstance(node, Mapping):
            return {str(k): walk(v, str(k)) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v, name) for v in node]
        if isinstance(node, str):
            if name is not None and _SECRET_NAME.search(name) and not name.endswith("_env"):
                return REDACTED
            return redact(_scrub_url(node, kept), kept)
        return json_safe(node)

    return walk(value, None)


def _file_facts(path: Path) -> dict[str, Any] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _tool_version() -> str:
    return version()


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat(timespec="seconds")


def _error_reasons(
    output: Path, output_settings: Mapping[str, Any] | None, failed: int
) -> list[dict[str, Any]]:
    """The most common reasons rows failed, read from the finished output:
    what the summary lists under the counts."""
    if not failed:
        return []
    from pipeline.status import error_reasons  # polars: only when rows failed

    prefix = str((output_settings or {}).get("column_prefix") or "")
    return [{"reason": reason, "rows": rows} for reason, rows in error_reasons(output, prefix)]


def build_report(
    summary: SummaryLike,
    *,
    output: Path,
    settings: Mapping[str, Any],
    fingerprint: str,
    exit_code: int,
    message: str | None = None,
    input_identity: InputIdentity | None = None,
    input_rows: int | None = None,
    output_settings: Mapping[str, Any] | None = None,
    price: Price | None = None,
    model: str | None = None,
    cost_this_run: float | None = None,
    max_cost: float | None = None,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    secrets: Iterable[str | None] = (),
) -> dict[str, Any]:
    """The report as a JSON-ready dict.

    Call it after the output file is in place (its size and mtime are
    recorded so a later run can tell it is untouched). ``settings`` is the
    full config (``config.model_dump(mode="json")``), redacted here;
    ``fingerprint`` the sha256 of the settings that change answers;
    ``output_settings`` what else shapes the output file (column prefix), so
    a change there is not mistaken for an up-to-date output. ``price`` gives
    the estimated cost of every row in the output (resumed ones included);
    ``cost_this_run`` what this invocation itself spent.
    """
    secrets = list(secrets)
    finished_at = finished_at or datetime.now(UTC)
    # Clamped: a caller that stopped before assembling may not have counted
    # the output rows yet (see the module docs on stopped runs).
    processed = max(summary.rows - summary.resumed_rows, 0)
    attempted = summary.ok + summary.error
    total_cost = (
        cost(summary.prompt_tokens, summary.completion_tokens, price) if price is not None else None
    )
    output_facts = _file_facts(output) if exit_code in (0, 1) else None
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "tool": {"name": "enrich", "version": _tool_version()},
        "outcome": _outcome(exit_code),
        "exit_code": exit_code,
        "message": message,
        "started_at": _iso(started_at),
        "finished_at": _iso(finished_at),
        "input": {
            **({} if input_identity is None else asdict(input_identity)),
            "rows": input_rows,
        },
        "output": {
            "path": str(output),
            # Only a finished run describes a complete file; after a stop the
            # path may hold an older output that this report says nothing about.
            **(output_facts or {"size": None, "mtime_ns": None}),
            "rows": summary.rows,
        },
        "counts": {
            "rows": summary.rows,
            "ok": summary.ok,
            "error": summary.error,
            "skipped": summary.skipped,
            # Errors whose last failure was transient: the next run sends them again.
            "pending": summary.pending,
            "resumed_rows": summary.resumed_rows,
            "processed_rows": processed,
            "error_rate": round(summary.error / attempted, 6) if attempted else 0.0,
            "error_reasons": _error_reasons(
                output, output_settings, summary.error if output_facts else 0
            ),
        },
        "tokens": {
            "prompt": summary.prompt_tokens,
            "completion": summary.completion_tokens,
            "total": summary.prompt_tokens + summary.completion_tokens,
        },
        "cost": {
            "currency": "USD",
            "estimated_total": None if total_cost is None else round(total_cost, 6),
            "this_run": None if cost_this_run is None else round(cost_this_run, 6),
            "max_cost": max_cost,
            "price": None if price is None else price.to_dict(),
            "note": (
                "estimate from the API's token usage and the price table; check your invoice"
                if price is not None
                else unknown_price_message(model or "?")
            ),
        },
        "timing": {
            "wall_s": round(summary.wall_s, 3),
            "rows_per_s": round(processed / summary.wall_s, 3) if summary.wall_s > 0 else 0.0,
            "latency_ms": {
                **latency_percentiles(summary.latencies_ms),
                "count": len(summary.latencies_ms),
            },
        },
        "requests": {
            "sent": summary.requests,
            "retries": summary.retries,
            "rate_limited_429": summary.rate_limited,
        },
        "fingerprint": fingerprint,
        "output_settings": redact_settings(dict(output_settings or {}), secrets),
        "settings": redact_settings(settings, secrets),
    }
    return report


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
    output: Path,
    input_path: Path,
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
    try:
        known = InputIdentity(
            path=str(recorded_input["path"]),
            size=int(recorded_input["size"]),
            mtime_ns=int(recorded_input["mtime_ns"]),
            sha256=str(recorded_input["sha256"]),
            inode=int(recorded_input.get("inode", 0)),
            ctime_ns=int(recorded_input.get("ctime_ns", 0)),
        )
    except (KeyError, TypeError, ValueError):
        return Freshness(False, "the run report does not identify the input")
    try:
        current = InputIdentity.of(input_path, known)
    except OSError:
        return Freshness(False, f"the input {input_path} cannot be read")
    if not current.same_content(known):
        return Freshness(False, f"the input {input_path} changed since the last run")
    return Freshness(
        True,
        f"{output} is up to date: same input, same settings, finished "
        f"{report.get('finished_at') or 'earlier'}",
        report,
    )
