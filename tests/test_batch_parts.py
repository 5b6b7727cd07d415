"""The batch route's pure parts: what output and error lines mean for their
rows, the ledger's states and durability rules, and the batch object read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.batch_ledger import (
    Asked,
    FileEntry,
    Ledger,
    batch_summary,
    in_flight,
    kind_of,
    read_ledger,
)
from pipeline.batch_openai import BatchInfo
from pipeline.batch_results import file_answers, not_run, read_lines
from pipeline.errors import CheckpointMismatch


def chat(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "sim-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }  # fmt: skip


def line(custom_id: str, status: int | None, body: Any = None, error: Any = None) -> bytes:
    response = None if status is None else {"status_code": status, "body": body}
    item = {"id": "batch_req_1", "custom_id": custom_id, "response": response, "error": error}
    return json.dumps(item).encode() + b"\n"


def test_an_answer_line_is_an_ok_row_with_the_batch_turnaround() -> None:
    [got] = list(read_lines(line("row-4", 200, chat("hi")), model="sim-1", latency_ms=5000.0))
    result = got.result
    assert got.row == 4 and result is not None
    assert (result.status, result.response, result.route) == ("ok", "hi", "batch")
    assert (result.prompt_tokens, result.completion_tokens, result.latency_ms) == (7, 3, 5000.0)


def test_error_lines_are_transient_or_permanent_as_online() -> None:
    server_error = {"error": {"message": "boom", "type": "server_error"}}
    rejected = {"error": {"message": "too long", "code": "context_length_exceeded"}}
    data = line("row-0", 500, server_error) + line("row-1", 400, rejected)
    first, second = (got.result for got in read_lines(data, model="m", latency_ms=None))
    assert first is not None and first.status == "error" and first.transient
    assert second is not None and second.status == "error" and not second.transient
    assert "request rejected (400)" in (second.error or "")


def test_expired_and_foreign_lines_give_no_result() -> None:
    expired = {"code": "batch_expired", "message": "window expired"}
    data = line("row-2", None, error=expired) + line("other-9", 200, chat("x")) + b"not json\n"
    assert [(got.row, got.result) for got in read_lines(data, model="m", latency_ms=None)] == [
        (2, None)
    ]


def test_an_answer_the_schema_refuses_is_asked_again() -> None:
    lines = read_lines(
        line("row-0", 200, chat("nope")), model="m", latency_ms=None, check_answer=lambda c: "bad"
    )
    [got] = list(lines)
    assert got.result is not None and got.result.status == "error" and got.result.transient


def test_rows_sharing_a_request_get_a_copy_and_unanswered_rows_are_named() -> None:
    asked = [Asked(0, 0, "aa"), Asked(1, 0, "aa"), Asked(2, 2, "bb")]
    answers = file_answers(asked, read_lines(line("row-0", 200, chat("hi")), model="m",
                                             latency_ms=1.0))  # fmt: skip
    assert [(r.row_id, r.cached, r.route, k) for r, k in answers.results] == [
        (0, False, "batch", b"\xaa"),
        (1, True, "batch", b"\xaa"),
    ]
    assert answers.unanswered == [2]
    pending = not_run(2, "expired")
    assert pending.transient and "expired" in (pending.error or "")


def entry(name: str, **changes: Any) -> FileEntry:
    return FileEntry(name=name, requests=2, rows=3, size=10, cost_usd=None, **changes)


def test_the_ledger_is_durable_and_names_each_files_kind(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path, "http://127.0.0.1:1/v1", "OPENAI_API_KEY", "sha-a")
    ledger.add(entry("file-00001"), b"{}\n", [Asked(0, 0, None), Asked(5, 0, None)])
    ledger.update("file-00001", state="submitted", batch_id="b1", status="in_progress")
    ledger.add(entry("file-00002"), b"{}\n", [Asked(7, 7, "ff")])
    again = read_ledger(tmp_path)
    assert again is not None and again.files == ledger.files
    assert sorted(again.live_rows()) == [0, 5, 7]
    assert [kind_of(e) for e in again.files] == ["in_progress", "queued"]
    summary = batch_summary(tmp_path)
    assert summary is not None and in_flight(summary)
    assert summary["in_progress"] == (1, 3) and summary["queued"] == (1, 3)
    for status, kind in (("completed", "done"), ("expired", "expired"), ("cancelled", "cancelled")):
        assert kind_of(entry("x", state="collected", status=status)) == kind
    assert kind_of(entry("x", state="failed")) == "failed"


def test_an_earlier_inputs_ledger_in_flight_refuses_and_a_finished_one_is_dropped(
    tmp_path: Path,
) -> None:
    ledger = Ledger.open(tmp_path, "http://127.0.0.1:1/v1", "K", "sha-a")
    ledger.add(entry("file-00001", state="submitted", batch_id="b"), b"", [Asked(0, 0, None)])
    with pytest.raises(CheckpointMismatch, match="enrich cancel"):
        Ledger.open(tmp_path, "http://127.0.0.1:1/v1", "K", "sha-b")
    ledger.update("file-00001", state="collected")
    assert Ledger.open(tmp_path, "http://127.0.0.1:1/v1", "K", "sha-b").files == []


def test_a_batch_object_is_read_with_its_turnaround_and_errors() -> None:
    info = BatchInfo.parse(
        {
            "id": "batch_1",
            "status": "failed",
            "input_file_id": "file-1",
            "created_at": 100,
            "failed_at": 103,
            "request_counts": {"total": 4, "completed": 0, "failed": 0},
            "errors": {"data": [{"code": "token_limit_exceeded", "message": "queue full"}]},
        }
    )
    assert info.done and info.queue_full and info.turnaround_ms == 3000.0
    assert info.reason() == "token_limit_exceeded: queue full"
    running = BatchInfo.parse({"id": "b", "status": "in_progress", "created_at": 1})
    assert not running.done and running.turnaround_ms is None
