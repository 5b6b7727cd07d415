"""What a batch's output and error files mean for their rows.

Each line is ``{"id", "custom_id", "response": {"status_code", "body"},
"error"}``, in any order. A 200 is an answer, read as the online route reads
one (``parse_completion``, and the structured-answer check). Any other status
is a failed request, classified as the online route classifies it
(``classify``): transient (5xx, 429) or permanent (400, content filter). A
line with no response (``batch_expired``, ``batch_cancelled``) is a request
that never ran: its row gets no result and goes into a later batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from pipeline.batch_files import row_of
from pipeline.batch_ledger import Asked
from pipeline.classify import classify
from pipeline.results import RowResult, reused
from pipeline.transport import Completion, parse_completion
from pipeline.transport_errors import APIStatus, UnparseableResponse

AnswerCheck = Callable[[Completion], str | None]


@dataclass(frozen=True)
class LineResult:
    """One line of a batch's files: the row it answers, and its result
    (None: the request never ran, send it again)."""

    row: int
    result: RowResult | None


def read_lines(
    data: bytes,
    *,
    model: str,
    latency_ms: float | None,
    check_answer: AnswerCheck | None = None,
) -> Iterator[LineResult]:
    """The rows answered by an output or error file's lines. Lines with an id
    this tool did not write, or that are not JSON, are passed over: their
    rows have no result and are sent again."""
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        row = row_of(line.get("custom_id")) if isinstance(line, dict) else None
        if row is None:
            continue
        result = _result(row, line, model, latency_ms, check_answer)
        yield LineResult(row, result)


def _result(
    row: int,
    line: dict[str, object],
    model: str,
    latency_ms: float | None,
    check_answer: AnswerCheck | None,
) -> RowResult | None:
    response = line.get("response")
    if not isinstance(response, dict):
        return None  # expired, cancelled, or never run: no result yet
    status = response.get("status_code")
    if not isinstance(status, int):
        return None
    body = json.dumps(response.get("body")).encode()
    if status != 200:
        failure = classify(APIStatus.from_response(status, body, {}), model=model)
        return RowResult(
            row_id=row,
            status="error",
            error=failure.reason,
            attempts=1,
            transient=failure.kind == "retry",
            route="batch",
        )
    try:
        completion = parse_completion(body, {})
    except UnparseableResponse as exc:
        return RowResult(row, "error", error=str(exc), attempts=1, transient=True, route="batch")
    problem = check_answer(completion) if check_answer is not None else None
    return RowResult(
        row_id=row,
        status="ok" if problem is None else "error",
        response=completion.text if problem is None else None,
        error=problem,
        latency_ms=latency_ms,
        attempts=1,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        finish_reason=completion.finish_reason,
        model=completion.model,
        # An answer that does not follow the schema is asked again, as online.
        transient=problem is not None,
        route="batch",
    )


@dataclass
class FileAnswers:
    """What one file's output and error lines give its rows: results (each
    with its request key) and the rows left without one (to send again)."""

    results: list[tuple[RowResult, bytes | None]] = field(default_factory=list)
    unanswered: list[int] = field(default_factory=list)


def file_answers(asked: Sequence[Asked], lines: Iterable[LineResult]) -> FileAnswers:
    """Map a file's lines back to its rows: each row gets the result of the
    line that asked for it (rows that shared an identical request get a copy,
    as in-run dedup gives one: ``cached``, no attempts of their own)."""
    by_row: dict[int, RowResult] = {}
    for line in lines:
        if line.result is not None:
            by_row[line.row] = line.result
    answers = FileAnswers()
    for item in asked:
        key = bytes.fromhex(item.key) if item.key else None
        result = by_row.get(item.asked)
        if result is None or (result.transient and item.asked != item.row):
            # A transient failure is asked again; a row that shared the
            # request goes with it.
            answers.unanswered.append(item.row)
        elif item.asked == item.row:
            answers.results.append((result, key))
        else:
            copy = reused(item.row, result)
            copy.route, copy.latency_ms = "batch", None
            answers.results.append((copy, key))
    return answers


def not_run(row: int, how: str) -> RowResult:
    """A row no batch of this run ran (each one ``how``: expired, cancelled):
    a pending error, which the next run sends again."""
    return RowResult(
        row,
        "error",
        error=f"no batch ran this request (the last one {how}); the next run sends it again",
        transient=True,
        route="batch",
    )
