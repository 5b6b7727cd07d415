"""Event sinks: JSON lines that parse, readable text, and no secret ever written."""

from __future__ import annotations

import io
import json
import math
import threading
from pathlib import Path

import pytest

from pipeline.events import (
    REDACTED,
    HeldEvents,
    JsonEventSink,
    NullEventSink,
    ProgressEvents,
    RecordingEventSink,
    TextEventSink,
    ThrottledWarning,
    redact,
)
from pipeline.progress import TqdmProgress
from pipeline.results import RowResult

SECRET = "sk-proj-THIS-IS-THE-KEY-0123456789"


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_sink_writes_one_parseable_object_per_line() -> None:
    stream = io.StringIO()
    sink = JsonEventSink(stream)
    sink.emit("start", message="starting", rows=50, output=Path("out.parquet"), model="sim-1")
    sink.emit("warning", level="warning", kind="rate_limit_pause", pause_s=2.5)
    sink.emit("finish", ok=49, error=1, latency_p95=float("nan"), counts={"ok": 49}, ids=(1, 2))
    lines = json_lines(stream)
    assert [line["event"] for line in lines] == ["start", "warning", "finish"]
    start, warning, finish = lines
    assert start["level"] == "info" and start["message"] == "starting"
    assert start["rows"] == 50 and start["output"] == "out.parquet"
    assert str(start["ts"]).endswith("Z")
    assert warning["level"] == "warning" and warning["pause_s"] == 2.5
    assert "message" not in warning
    # NaN is not JSON: strict parsers (jq, shippers) would reject the line.
    assert finish["latency_p95"] is None
    assert finish["counts"] == {"ok": 49} and finish["ids"] == [1, 2]
    assert "NaN" not in stream.getvalue()


def test_envelope_keys_cannot_be_forged_by_fields() -> None:
    stream = io.StringIO()
    JsonEventSink(stream).emit("start", ts="1999-01-01", level_name="x", event_id=3)
    line = json_lines(stream)[0]
    assert line["ts"] != "1999-01-01" and line["event"] == "start"


def test_text_sink_is_one_readable_line() -> None:
    stream = io.StringIO()
    sink = TextEventSink(stream)
    sink.emit(
        "warning",
        level="warning",
        message="rate limited;\n pausing all requests",
        pause_s=2.25,
        eta_s=None,
        counts={"ok": 1},
    )
    (line,) = stream.getvalue().splitlines()
    assert " WARNING warning: rate limited; pausing all requests (" in line
    assert "pause_s=2.25" in line and "eta_s=-" in line and 'counts={"ok":1}' in line


@pytest.mark.parametrize("sink_class", [JsonEventSink, TextEventSink])
def test_no_sink_ever_writes_the_key(sink_class: type[JsonEventSink | TextEventSink]) -> None:
    stream = io.StringIO()
    sink = sink_class(stream, secrets=[SECRET, None, ""])
    sink.emit("error", level="error", message=f"401 for key {SECRET}", header=f"Bearer {SECRET}")
    sink.emit("start", nested={"deep": [f"x{SECRET}y"]}, url=f"http://h/v1?api-key={SECRET}")
    text = stream.getvalue()
    assert SECRET not in text
    assert text.count(REDACTED) == 4
    if sink_class is JsonEventSink:
        json_lines(stream)  # still valid JSON after redaction


def test_redact_covers_json_escaped_forms_and_ignores_placeholders() -> None:
    odd = 'sk-with"quote\\and-backslash'
    assert odd not in redact(json.dumps({"k": odd}), [odd])
    assert json.dumps(odd)[1:-1] not in redact(json.dumps({"k": odd}), [odd])
    # A local server's placeholder key ("x") is not worth destroying every log line for.
    assert redact("x marks the spot", ["x"]) == "x marks the spot"
    assert redact("a-secret-key and a-secret-key-2", ["a-secret-key", "a-secret-key-2"]) == (
        f"{REDACTED} and {REDACTED}"
    )


def test_lines_from_many_threads_stay_whole() -> None:
    stream = io.StringIO()
    sink = JsonEventSink(stream)

    def burst(worker: int) -> None:
        for i in range(200):
            sink.emit("progress", worker=worker, i=i, text="x" * 100)

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(json_lines(stream)) == 800


def test_progress_events_are_periodic_and_final() -> None:
    now = [100.0]
    sink = RecordingEventSink()
    spent = [0.0]
    progress = ProgressEvents(
        sink, interval_s=10.0, cost_so_far=lambda: spent[0], clock=lambda: now[0]
    )
    progress.start(total=10, already_done=2)
    for step in range(6):
        now[0] += 3.0
        spent[0] += 0.5
        progress.advance(RowResult(step, "error" if step == 5 else "ok"))
    # Emitted once the 10 s interval passed (at 12 s), then at close.
    progress.close()
    progress.close()  # idempotent: one final line
    events = sink.named("progress")
    assert len(events) == 2
    first, last = (event.fields for event in events)
    assert first["done"] == 6 and first["total"] == 10 and first["percent"] == 60.0
    assert first["rows_per_s"] == pytest.approx(4 / 12, abs=0.01)
    assert first["cost_usd"] == pytest.approx(2.0)
    assert last["done"] == 8 and last["ok"] == 5 and last["error"] == 1
    assert last["eta_s"] == pytest.approx(2 / (6 / 18), abs=0.1)
    assert events[-1].message == "8 of 10 rows (80.0%)"


def test_progress_counts_rows_finished_by_workers_before_they_are_gathered() -> None:
    progress = ProgressEvents(NullEventSink(), clock=lambda: 10.0)
    progress.start(total=100, already_done=10)
    assert "ahead" not in progress.fields()  # a run on one machine: nothing ahead
    progress.ahead(30)  # the Ray workers' rows, from the board
    assert (progress.fields()["done"], progress.fields()["ahead"]) == (40, 30)
    # A shard gathered: its rows come off what was ahead as they are collected.
    progress.ahead(10)
    for row in range(20):
        progress.advance(RowResult(row, "ok"))
    fields = progress.fields()
    assert (fields["done"], fields["ok"], fields["ahead"]) == (40, 20, 10)


def test_the_progress_bar_moves_with_rows_finished_by_workers() -> None:
    stream = io.StringIO()
    bar = TqdmProgress(stream)
    bar.start(total=100, already_done=0)
    bar.ahead(30)
    bar.ahead(10)
    for row in range(20):
        bar.advance(RowResult(row, "ok"))
    bar.close()
    assert stream.getvalue().rstrip().split("\r")[-1].lstrip().startswith("30%")


def test_progress_fields_without_rows_or_cost() -> None:
    progress = ProgressEvents(NullEventSink(), clock=lambda: 5.0)
    progress.start(total=0, already_done=0)
    fields = progress.fields()
    assert fields["percent"] == 100.0 and fields["eta_s"] is None and "cost_usd" not in fields
    assert not math.isnan(fields["rows_per_s"])


def test_a_recurring_warning_is_throttled_with_a_count() -> None:
    now = [0.0]
    sink = RecordingEventSink()
    pauses = ThrottledWarning(sink, "rate_limit_pause", interval_s=30.0, clock=lambda: now[0])
    emitted = []
    for second in range(0, 65, 5):  # a 429 every 5 s for a minute
        now[0] = float(second)
        emitted.append(pauses.hit("rate limited; pausing all requests", pause_s=2.0))
    assert emitted.count(True) == 3  # at 0 s, 30 s and 60 s
    lines = sink.named("warning")
    assert [e.fields["occurrences"] for e in lines] == [1, 6, 6]
    assert all(e.level == "warning" and e.fields["kind"] == "rate_limit_pause" for e in lines)
    assert lines[0].fields["pause_s"] == 2.0
    assert pauses.total == 13


def test_events_held_during_a_head_start_go_out_after_start_in_order() -> None:
    # A head start's requests may meet a 429 before the scan lets the run
    # say `start`: a log shipper still reads `start` first, and loses nothing.
    sink = RecordingEventSink()
    held = HeldEvents(sink)
    held.emit("warning", level="warning", message="paused", kind="rate_limit_pause")
    held.emit("warning", level="warning", message="retrying", kind="retrying")
    assert sink.events == []

    sink.emit("start", message="enriching")
    held.release()
    held.emit("progress", message="after")

    assert [e.event for e in sink.events] == ["start", "warning", "warning", "progress"]
    assert [e.fields.get("kind") for e in sink.events[1:3]] == ["rate_limit_pause", "retrying"]
    held.release()  # again, as the head ends: nothing twice
    assert len(sink.events) == 4
