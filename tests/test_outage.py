"""Outages on a fake clock (``looptime``): the call stage against a fake API
that goes down and comes back at given times. An outage is the run's
business: rows are held, one probe at a time tests the API, and past
``--max-outage`` the run ends with ``APIUnreachable``."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from pipeline.call import CallStage, ChatRequest
from pipeline.config import LimitsConfig, ModelConfig
from pipeline.errors import APIUnreachable, ExitCode
from pipeline.events import RecordingEventSink
from pipeline.outage import PROBE_MAX_S, Attempt, OutageGate
from pipeline.results import RowResult
from pipeline.stall import StallLimit
from pipeline.transport import Completion, Messages
from pipeline.transport_errors import APIConnectionFailed, APIStatus

POISON = "poison"
"""A prompt the fake API always answers 500, whether it is up or not."""


def now() -> float:
    return asyncio.get_running_loop().time()


def connection_error() -> APIConnectionFailed:
    return APIConnectionFailed("Connection error: ClientConnectorError: refused")


def status_error(status: int) -> APIStatus:
    body = {"message": f"status {status}", "type": "x", "code": None, "param": None}
    return APIStatus(status, body=body, type="x", message=f"status {status}")


@dataclass
class Call:
    text: str
    start: float
    end: float = 0.0
    ok: bool = False


class FakeAPI:
    """Answers after ``latency_s`` unless the request started while the API
    was down (``down``: (from, until) spans of loop time, relative to when
    the fake was made), in which case the connection fails. Prompts with
    ``POISON`` in them always get a 500."""

    def __init__(
        self,
        down: Sequence[tuple[float, float]] = (),
        *,
        latency_s: float = 0.05,
        hang_after: int | None = None,
    ) -> None:
        self.origin = now()
        self.down = list(down)
        self.latency_s = latency_s
        # From this many calls on, every call hangs (a black-holed server).
        self.hang_after = hang_after
        self.calls: list[Call] = []
        self.in_flight = 0

    def is_down(self, at: float) -> bool:
        return any(start <= at - self.origin < end for start, end in self.down)

    async def complete(self, messages: Messages, *, stall_s: StallLimit = None) -> Completion:
        text = str(messages[-1]["content"])
        call = Call(text, now())
        self.calls.append(call)
        self.in_flight += 1
        try:
            if self.hang_after is not None and len(self.calls) > self.hang_after:
                await asyncio.sleep(3600)
            await asyncio.sleep(self.latency_s)
            if self.is_down(call.start):
                raise connection_error()
            if POISON in text:
                raise status_error(500)
            call.ok = True
            return Completion(
                text=f"answer to {text}",
                finish_reason="stop",
                model="m",
                prompt_tokens=10,
                completion_tokens=5,
                headers={},
            )
        finally:
            call.end = now()
            self.in_flight -= 1

    async def aclose(self) -> None:
        return None


def stage(transport: FakeAPI, events: RecordingEventSink | None = None, **limits: Any) -> CallStage:
    settings: dict[str, Any] = {
        "concurrency": 4,
        "max_attempts": 3,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.1,
        "max_outage_s": 600.0,
    }
    settings.update(limits)
    return CallStage(
        ModelConfig(name="m"),
        LimitsConfig(**settings),
        transport,
        rng=random.Random(7),
        events=events,
    )


async def collect(call_stage: CallStage, texts: Sequence[str]) -> list[RowResult]:
    async def requests() -> AsyncIterator[ChatRequest]:
        for row_id, text in enumerate(texts):
            yield ChatRequest(row_id, [{"role": "user", "content": text}])

    return [result async for result in call_stage.results(requests())]


def rows(count: int) -> list[str]:
    return [f"row {i}" for i in range(count)]


def outage_warnings(events: RecordingEventSink) -> list[Any]:
    return [e for e in events.named("warning") if e.fields.get("kind") == "outage"]


# -- the trip rule ------------------------------------------------------------------


@pytest.mark.looptime
async def test_transient_failures_from_one_row_alone_never_trip_the_gate() -> None:
    gate = OutageGate(60.0)
    for _ in range(20):
        assert not gate.failed(Attempt(), 0, "server error (500)")
    assert not gate.active

    # The same count split over two rows is the API, not the row.
    gate = OutageGate(60.0)
    for attempt in range(4):
        assert not gate.failed(Attempt(), attempt % 2, "connection error")
    assert gate.failed(Attempt(), 1, "connection error")
    assert gate.active
    gate.close()


@pytest.mark.looptime
async def test_one_row_the_server_always_answers_500_does_not_trip_an_outage() -> None:
    events = RecordingEventSink()
    api = FakeAPI()
    call_stage = stage(api, events, concurrency=1, max_attempts=8)
    start = now()

    [result] = await collect(call_stage, [f"a {POISON} row"])

    assert (result.status, result.attempts, result.transient) == ("error", 8, True)
    assert result.error is not None and "--max-attempts" in result.error
    assert outage_warnings(events) == []
    assert call_stage.stats.outages == 0
    # Only the row's own short backoff: nothing held it for a probe.
    assert now() - start < 2.0


@pytest.mark.looptime
async def test_a_poison_row_among_healthy_ones_does_not_trip_an_outage() -> None:
    events = RecordingEventSink()
    texts = rows(30)
    texts[3] = f"row 3 {POISON}"
    call_stage = stage(FakeAPI(), events, max_attempts=6)

    results = {r.row_id: r for r in await collect(call_stage, texts)}

    assert results[3].status == "error"
    assert all(r.status == "ok" for row_id, r in results.items() if row_id != 3)
    assert outage_warnings(events) == []


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("answer_between", "trips"), [(None, True), (429, False), (400, False), (200, False)]
)
async def test_any_answer_from_the_server_resets_the_failure_streak(
    answer_between: int | None, trips: bool
) -> None:
    gate = OutageGate(60.0)
    for _ in range(3):
        for row in range(4):
            gate.failed(Attempt(), row, "connection error")
        if answer_between is not None:
            gate.answered(Attempt())  # a 429, a row's 400 or a 200 alike
    assert gate.active is trips
    gate.close()


# -- holding, probing, resuming ---------------------------------------------------------


@pytest.mark.looptime
async def test_an_outage_holds_every_row_instead_of_spending_their_attempts() -> None:
    # Down for 100 s from the start. Before: each of 20 rows was retried
    # max_attempts times and ended in error. Now the rows wait, a handful of
    # probes test the API, and every row is answered once it is back.
    events = RecordingEventSink()
    api = FakeAPI(down=[(0.0, 100.0)])
    call_stage = stage(api, events, concurrency=4, max_attempts=3)

    results = await collect(call_stage, rows(20))

    assert sorted(r.row_id for r in results) == list(range(20))
    assert all(r.status == "ok" for r in results)
    failed = [c for c in api.calls if not c.ok]
    # The requests in flight when it went down and their first retries (the
    # fifth failure trips it), then the probes (1, 2, 4... doubling to 30 s,
    # jittered: at most 11 in 100 s), not 20 rows x 3 attempts.
    assert len(failed) <= 2 * 4 + 11
    [warning] = outage_warnings(events)
    assert warning.level == "warning"
    assert warning.fields["last_error"] == "connection error"
    assert warning.fields["max_outage_s"] == 600.0
    [recovered] = events.named("recovered")
    assert recovered.level == "info"
    assert 100.0 <= recovered.fields["outage_s"] <= 100.0 + PROBE_MAX_S + 1.0
    assert call_stage.stats.outages == 1


@pytest.mark.looptime
async def test_failures_during_an_outage_cost_the_row_no_attempt() -> None:
    # Two rows in flight fail twice each (charged: nothing says yet that it
    # is the API), the fifth failure trips the outage, and from then on a
    # failure is free: 2 minutes of probes, and every row still has its third
    # attempt when the API is back.
    api = FakeAPI(down=[(0.0, 120.0)])
    call_stage = stage(api, concurrency=2, max_attempts=3)

    results = await collect(call_stage, rows(4))

    assert [r.status for r in results] == ["ok"] * 4
    assert max(r.attempts for r in results) > 3


@pytest.mark.looptime
async def test_probes_go_one_at_a_time_spaced_by_exponential_backoff() -> None:
    events = RecordingEventSink()
    api = FakeAPI(down=[(0.0, 200.0)], latency_s=0.05)
    call_stage = stage(api, events, concurrency=8, max_attempts=3)

    await collect(call_stage, rows(8))

    tripped_at = api.calls[4].end  # the fifth failure trips it
    recovered_at = next(c.start for c in api.calls if c.ok)
    probes = [c for c in api.calls if tripped_at < c.start <= recovered_at]
    # One at a time: each probe starts after the last one ended.
    for before, after in itertools.pairwise(probes):
        assert after.start >= before.end
    # The waits between them double from 1 s up to 30 s, jittered down to half.
    waits = [probes[0].start - tripped_at] + [
        after.start - before.end for before, after in itertools.pairwise(probes)
    ]
    for n, wait in enumerate(waits):
        ceiling = min(PROBE_MAX_S, 2.0**n)
        assert 0.5 * ceiling - 1e-6 <= wait <= ceiling + 1e-6, (n, waits)
    assert len(probes) >= 8
    assert waits[-1] >= 0.5 * PROBE_MAX_S


@pytest.mark.looptime
async def test_a_probe_that_gets_an_answer_reopens_and_every_worker_resumes() -> None:
    events = RecordingEventSink()
    api = FakeAPI(down=[(0.0, 10.0)], latency_s=0.5)
    call_stage = stage(api, events, concurrency=4, max_attempts=3)

    results = await collect(call_stage, rows(40))

    assert [r.status for r in results].count("ok") == 40
    first_answer = next(c for c in api.calls if c.ok)
    # Right after the probe's answer the run is back to 4 requests in flight.
    after = [c for c in api.calls if c.start >= first_answer.end]
    assert len([c for c in after if c.start < first_answer.end + 0.01]) == 4
    [recovered] = events.named("recovered")
    assert recovered.fields["probes"] >= 2
    assert 10.0 <= recovered.fields["outage_s"] <= 30.0


@pytest.mark.looptime
async def test_an_answer_from_a_request_sent_before_the_trip_also_ends_the_outage() -> None:
    # Proof that the API is up need not come from the probe.
    gate = OutageGate(60.0)
    for row in range(5):
        gate.failed(Attempt(), row, "connection error")
    tripped = gate.active
    gate.answered(Attempt())
    assert tripped and not gate.active
    async with gate.attempt() as attempt:
        assert attempt.probe_of is None  # not held


# -- the bound -----------------------------------------------------------------------


@pytest.mark.looptime
async def test_an_outage_longer_than_max_outage_ends_the_run_after_the_finished_rows() -> None:
    # Up for 2 s, then down for good.
    api = FakeAPI(down=[(2.0, 1e9)], latency_s=0.05)
    call_stage = stage(api, concurrency=4, max_attempts=3, max_outage_s=20.0)
    yielded: list[RowResult] = []

    async def requests() -> AsyncIterator[ChatRequest]:
        for row_id, text in enumerate(rows(1000)):
            yield ChatRequest(row_id, [{"role": "user", "content": text}])

    with pytest.raises(APIUnreachable) as raised:
        async for result in call_stage.results(requests()):
            yielded.append(result)

    # Every answered row was yielded before the error; none ended in error.
    assert len(yielded) == sum(c.ok for c in api.calls) > 0
    assert all(r.status == "ok" for r in yielded)
    first_failure = min(c.end for c in api.calls if not c.ok)
    assert now() - first_failure == pytest.approx(20.0, abs=0.1)
    message = str(raised.value)
    assert raised.value.exit_code == ExitCode.API_UNREACHABLE
    assert "connection error" in message
    assert "--max-outage 20 s" in message
    assert "checkpoint is kept" in message
    assert "rerun the same command once the API is back (or raise --max-outage)" in message
    assert "\n" not in message


@pytest.mark.looptime
async def test_a_probe_hanging_past_the_bound_does_not_hold_the_run() -> None:
    # One worker: row 0 fails fast until its attempts run out, row 1's
    # failures trip the outage, and its probe then hangs for an hour.
    api = FakeAPI(down=[(0.0, 1e9)], hang_after=5)
    call_stage = stage(api, concurrency=1, max_attempts=3, max_outage_s=30.0)
    start = now()

    with pytest.raises(APIUnreachable):
        await collect(call_stage, rows(3))

    assert now() - start < 31.0


# -- what a failed row says -----------------------------------------------------------


@pytest.mark.looptime
async def test_a_row_failing_transiently_outside_an_outage_is_marked_transient() -> None:
    texts = rows(10)
    texts[0] = f"row 0 {POISON}"
    results = {r.row_id: r for r in await collect(stage(FakeAPI(), max_attempts=3), texts)}

    assert (results[0].status, results[0].transient) == ("error", True)
    assert not any(r.transient for r in results.values() if r.row_id != 0)


@pytest.mark.looptime
async def test_a_row_the_server_rejects_is_a_permanent_failure() -> None:
    class Rejecting(FakeAPI):
        async def complete(self, messages: Messages, *, stall_s: StallLimit = None) -> Completion:
            raise status_error(400)

    [result] = await collect(stage(Rejecting()), ["too long"])

    assert (result.status, result.attempts, result.transient) == ("error", 1, False)
