"""The simulator's Files and Batches endpoints, driven by the real ``openai``
SDK (``client.files``, ``client.batches``) over loopback HTTP. The batch
timeline runs on a fake clock that the tests move by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import openai
import pytest
from openai.types import Batch

from pipeline import simulate
from pipeline.errors import ConfigError
from pipeline.simulate import Simulator, SimulatorConfig, expected_answer
from pipeline.simulate_batch import BatchConfig

pytestmark = pytest.mark.timeout(20)

PACKAGE_ROOT = Path(simulate.__file__).absolute().parents[1]
KEY = "sk-test"
TURNAROUND = 100.0
CHAT: Final = "/v1/chat/completions"


class Clock:
    """A clock the test moves: the batches' only notion of time."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def at(self, batch: Batch, share: float) -> None:
        """Move to ``share`` of the turnaround after the batch was created."""
        self.now = self.created[batch.id] + share * TURNAROUND

    created: dict[str, float]


def line(custom_id: str, content: str, model: str = "sim-1", url: str = CHAT) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def jsonl(count: int, prefix: str = "q") -> bytes:
    return "\n".join(line(f"row-{i}", f"{prefix}{i}") for i in range(count)).encode() + b"\n"


def client(sim: Simulator, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key=key, max_retries=0)


@pytest.fixture
def clock() -> Clock:
    made = Clock()
    made.created = {}
    return made


async def serve(clock: Clock, **batch: Any) -> Simulator:
    config = SimulatorConfig(batch=BatchConfig(turnaround_s=TURNAROUND, **batch))
    return Simulator(config, clock=clock)


@pytest.fixture
async def sim(clock: Clock) -> AsyncIterator[Simulator]:
    async with await serve(clock) as server:
        yield server


async def submit(c: openai.AsyncOpenAI, clock: Clock, data: bytes) -> Batch:
    uploaded = await c.files.create(file=("requests.jsonl", data), purpose="batch")
    batch = await c.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
    )
    clock.created[batch.id] = clock.now
    return batch


async def lines_of(c: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await c.files.content(file_id)
    return [json.loads(text) for text in content.text.splitlines()]


# -- the lifecycle ------------------------------------------------------------


async def test_a_batch_goes_validating_in_progress_finalizing_completed_on_its_clock(
    sim: Simulator, clock: Clock
) -> None:
    async with client(sim) as c:
        batch = await submit(c, clock, jsonl(10))
        assert batch.status == "validating"
        assert batch.request_counts is not None and batch.request_counts.total == 10
        seen = []
        for share in (0.05, 0.1, 0.5, 0.95, 1.0):
            clock.at(batch, share)
            batch = await c.batches.retrieve(batch.id)
            assert batch.request_counts is not None
            seen.append((batch.status, batch.request_counts.completed))
        assert seen == [
            ("validating", 0),
            ("in_progress", 0),
            ("in_progress", 5),
            ("finalizing", 10),
            ("completed", 10),
        ]
        assert batch.completed_at is not None and batch.in_progress_at is not None
        assert batch.completed_at - batch.created_at == TURNAROUND
        assert batch.error_file_id is None
        output = await lines_of(c, batch.output_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(f"row-{i}" for i in range(10))
    for result in output:
        assert result["error"] is None
        assert result["response"]["status_code"] == 200
        number = result["custom_id"].removeprefix("row-")
        message = result["response"]["body"]["choices"][0]["message"]
        assert message["content"] == expected_answer(
            [{"role": "user", "content": f"q{number}"}], "sim-1"
        )


async def test_a_batch_answer_and_usage_are_those_of_the_online_endpoint(
    sim: Simulator, clock: Clock
) -> None:
    async with client(sim) as c:
        online = await c.chat.completions.create(
            model="sim-1", messages=[{"role": "user", "content": "same question"}], max_tokens=3
        )
        body = {
            "model": "sim-1",
            "messages": [{"role": "user", "content": "same question"}],
            "max_tokens": 3,
        }
        request = {"custom_id": "a", "method": "POST", "url": CHAT, "body": body}
        batch = await submit(c, clock, json.dumps(request).encode())
        clock.at(batch, 1.0)
        batch = await c.batches.retrieve(batch.id)
        (result,) = await lines_of(c, batch.output_file_id)
    answer = result["response"]["body"]
    assert answer["choices"][0]["message"] == online.choices[0].message.model_dump(
        include={"role", "content"}
    )
    assert answer["choices"][0]["finish_reason"] == online.choices[0].finish_reason == "length"
    assert online.usage is not None
    assert answer["usage"] == online.usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    )
    assert batch.usage is not None and batch.usage.total_tokens == online.usage.total_tokens


async def test_output_lines_come_in_a_shuffled_order(sim: Simulator, clock: Clock) -> None:
    async with client(sim) as c:
        batch = await submit(c, clock, jsonl(40))
        clock.at(batch, 1.0)
        batch = await c.batches.retrieve(batch.id)
        output = await lines_of(c, batch.output_file_id)
    ids = [o["custom_id"] for o in output]
    in_input_order = [f"row-{i}" for i in range(40)]
    assert sorted(ids) == sorted(in_input_order)
    assert ids != in_input_order


async def test_an_expired_batch_keeps_what_completed_and_lists_the_rest_as_batch_expired(
    clock: Clock,
) -> None:
    # Expiry halfway through the requests' span (0.1 to 0.9 of the turnaround).
    async with await serve(clock, expire_after_s=0.5 * TURNAROUND) as sim, client(sim) as c:
        batch = await submit(c, clock, jsonl(20))
        clock.at(batch, 3.0)
        batch = await c.batches.retrieve(batch.id)
        assert batch.status == "expired"
        assert batch.expired_at == batch.expires_at == batch.created_at + 0.5 * TURNAROUND
        output = await lines_of(c, batch.output_file_id)
        errors = await lines_of(c, batch.error_file_id)
    assert len(output) == 10
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (10, 10)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(e["response"] is None for e in errors)
    everyone = {r["custom_id"] for r in output} | {e["custom_id"] for e in errors}
    assert everyone == {f"row-{i}" for i in range(20)}
    assert sim.batches.stats.computed == 10
    assert sim.batches.stats.unfinished == 10


async def test_a_cancelled_batch_keeps_its_completed_requests(sim: Simulator, clock: Clock) -> None:
    async with client(sim) as c:
        batch = await submit(c, clock, jsonl(8))
        clock.at(batch, 0.3)  # a quarter of the requests have run
        batch = await c.batches.cancel(batch.id)
        assert batch.status == "cancelling"
        assert batch.cancelling_at is not None
        clock.at(batch, 0.35)
        batch = await c.batches.retrieve(batch.id)
        assert batch.status == "cancelling"  # nothing more runs meanwhile
        assert batch.request_counts is not None and batch.request_counts.completed == 2
        clock.at(batch, 0.45)
        batch = await c.batches.retrieve(batch.id)
        assert batch.status == "cancelled"
        output = await lines_of(c, batch.output_file_id)
        errors = await lines_of(c, batch.error_file_id)
        with pytest.raises(openai.ConflictError):
            await c.batches.cancel(batch.id)
    assert len(output) == 2
    assert len(errors) == 6
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert sim.batches.stats.batches_cancelled == 1


# -- failures -----------------------------------------------------------------


async def test_fail_rate_puts_transient_500_and_permanent_400_in_the_error_file(
    clock: Clock,
) -> None:
    async with await serve(clock, fail_rate=0.5) as sim, client(sim) as c:
        batch = await submit(c, clock, jsonl(200))
        clock.at(batch, 1.0)
        batch = await c.batches.retrieve(batch.id)
        output = await lines_of(c, batch.output_file_id)
        errors = await lines_of(c, batch.error_file_id)
    statuses = [e["response"]["status_code"] for e in errors]
    assert set(statuses) == {400, 500}
    assert 60 < len(errors) < 140  # about half of 200, from a seeded draw
    assert len(output) + len(errors) == 200
    assert batch.request_counts is not None
    assert batch.request_counts.failed == len(errors)
    assert all("error" in e["response"]["body"] for e in errors)


async def test_directives_fail_batch_requests_as_they_fail_online(
    sim: Simulator, clock: Clock
) -> None:
    data = "\n".join(
        [line("never", "[[fault:400]] too long"), line("once", "[[fault:500:1]] flaky")]
    )
    async with client(sim) as c:
        first = await submit(c, clock, data.encode())
        clock.at(first, 1.0)
        first = await c.batches.retrieve(first.id)
        errors = {e["custom_id"]: e for e in await lines_of(c, first.error_file_id)}
        second = await submit(c, clock, line("once", "[[fault:500:1]] flaky").encode())
        clock.at(second, 1.0)
        second = await c.batches.retrieve(second.id)
        (retried,) = await lines_of(c, second.output_file_id)
    assert first.output_file_id is None  # every request failed
    assert errors["never"]["response"]["status_code"] == 400
    body = errors["never"]["response"]["body"]
    assert body["error"]["code"] == "context_length_exceeded"
    assert errors["once"]["response"]["status_code"] == 500
    assert retried["response"]["status_code"] == 200


@pytest.mark.parametrize(
    ("data", "code", "line_number"),
    [
        (b"", "empty_file", None),
        (f"{line('a', 'x')}\nnot json\n".encode(), "invalid_json_line", 2),
        (f"{line('a', 'x')}\n{line('b', 'y', model='sim-2')}".encode(), "model_mismatch", 2),
        (f"{line('a', 'x')}\n\n{line('a', 'y')}".encode(), "duplicate_custom_id", 3),
        (line("a", "x", url="/v1/embeddings").encode(), "url_mismatch", 1),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}',
         "missing_required_parameter", 1),
    ],
)  # fmt: skip
async def test_a_bad_input_file_fails_the_batch_with_errors_data(
    sim: Simulator, clock: Clock, data: bytes, code: str, line_number: int | None
) -> None:
    async with client(sim) as c:
        batch = await submit(c, clock, data)
        assert batch.status == "validating"
        clock.at(batch, 0.1)
        batch = await c.batches.retrieve(batch.id)
    assert batch.status == "failed"
    assert batch.failed_at is not None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.errors is not None and batch.errors.data
    error = batch.errors.data[0]
    assert (error.code, error.line) == (code, line_number)
    assert error.message
    assert sim.batches.stats.computed == 0


async def test_a_file_past_max_requests_fails_with_too_many_tasks(clock: Clock) -> None:
    async with await serve(clock, max_requests=3) as sim, client(sim) as c:
        batch = await submit(c, clock, jsonl(4))
        clock.at(batch, 0.1)
        batch = await c.batches.retrieve(batch.id)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == "too_many_tasks"


async def test_the_enqueued_token_limit_fails_a_batch_with_token_limit_exceeded(
    clock: Clock,
) -> None:
    one_file = jsonl(5)
    # Each request of jsonl(5) is 1 token of content + 4: 25 tokens a file.
    async with await serve(clock, enqueued_tokens=40) as sim, client(sim) as c:
        first = await submit(c, clock, one_file)
        refused = await submit(c, clock, one_file)
        clock.at(refused, 0.1)
        refused = await c.batches.retrieve(refused.id)
        clock.at(first, 1.0)  # the first one is done: its tokens leave the queue
        accepted = await submit(c, clock, one_file)
        clock.at(accepted, 0.5)
        accepted = await c.batches.retrieve(accepted.id)
    assert refused.status == "failed"
    assert refused.errors is not None and refused.errors.data
    error = refused.errors.data[0]
    assert error.code == "token_limit_exceeded"
    assert error.message is not None and "Limit: 40 enqueued tokens" in error.message
    assert accepted.status == "in_progress"


# -- files --------------------------------------------------------------------


async def test_files_can_be_read_listed_and_deleted(sim: Simulator) -> None:
    data = jsonl(3)
    async with client(sim) as c:
        uploaded = await c.files.create(file=("mine.jsonl", data), purpose="batch")
        assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (
            len(data),
            "mine.jsonl",
            "batch",
        )
        assert (await c.files.retrieve(uploaded.id)).id == uploaded.id
        assert (await c.files.content(uploaded.id)).content == data
        listed = [f.id async for f in c.files.list(purpose="batch")]
        assert listed == [uploaded.id]
        deleted = await c.files.delete(uploaded.id)
        assert deleted.deleted
        with pytest.raises(openai.NotFoundError):
            await c.files.retrieve(uploaded.id)
    stats = sim.batches.stats
    assert (stats.files_uploaded, stats.bytes_uploaded, stats.files_deleted) == (1, len(data), 1)
    assert stats.downloads_by_file == {uploaded.id: 1}


async def test_an_upload_past_the_max_bytes_is_a_413(clock: Clock) -> None:
    async with await serve(clock, max_file_bytes=100) as sim, client(sim) as c:
        with pytest.raises(openai.APIStatusError) as refused:
            await c.files.create(file=("big.jsonl", b"x" * 5_000), purpose="batch")
        small = await c.files.create(file=("small.jsonl", b"x" * 100), purpose="batch")
    assert refused.value.status_code == 413
    assert "100" in refused.value.message
    assert small.bytes == 100
    assert sim.batches.stats.files_uploaded == 1


async def test_an_upload_must_be_a_jsonl_file_for_purpose_batch(sim: Simulator) -> None:
    async with client(sim) as c:
        with pytest.raises(openai.BadRequestError, match=r"Must be \.jsonl"):
            await c.files.create(file=("requests.csv", b"a,b\n"), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            await c.files.create(file=("requests.jsonl", b"{}\n"), purpose="fine-tune")


async def test_the_store_refuses_uploads_past_max_stored_bytes_until_a_delete(
    clock: Clock,
) -> None:
    async with await serve(clock, max_stored_bytes=150) as sim, client(sim) as c:
        first = await c.files.create(file=("a.jsonl", b"x" * 100), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="delete files"):
            await c.files.create(file=("b.jsonl", b"x" * 100), purpose="batch")
        await c.files.delete(first.id)
        again = await c.files.create(file=("b.jsonl", b"x" * 100), purpose="batch")
    assert again.bytes == 100


# -- the API around it ----------------------------------------------------------


async def test_batches_are_listed_newest_first_a_page_at_a_time(
    sim: Simulator, clock: Clock
) -> None:
    async with client(sim) as c:
        made = [(await submit(c, clock, jsonl(1, prefix=f"b{n}-"))).id for n in range(3)]
        page = await c.batches.list(limit=2)
        assert [b.id for b in page.data] == made[::-1][:2]
        assert page.has_more
        every = [b.id async for b in c.batches.list(limit=2)]
    assert every == made[::-1]


async def test_a_batch_create_checks_its_file_endpoint_and_window(sim: Simulator) -> None:
    async with client(sim) as c:
        uploaded = await c.files.create(file=("r.jsonl", jsonl(1)), purpose="batch")
        with pytest.raises(openai.NotFoundError):
            await c.batches.create(
                input_file_id="file-nope", endpoint=CHAT, completion_window="24h"
            )
        with pytest.raises(openai.BadRequestError, match="batches only"):
            await c.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h"
            )
        with pytest.raises(openai.BadRequestError, match="24h"):
            await c.post(
                "/batches",
                cast_to=Batch,
                body={"input_file_id": uploaded.id, "endpoint": CHAT, "completion_window": "1h"},
            )
        with pytest.raises(openai.NotFoundError):
            await c.batches.retrieve("batch_nope")
        batch = await c.batches.create(
            input_file_id=uploaded.id,
            endpoint=CHAT,
            completion_window="24h",
            metadata={"run": "nightly"},
        )
    assert batch.metadata == {"run": "nightly"}
    assert batch.model == "sim-1"


async def test_a_wrong_key_gets_401_on_the_batch_endpoints(clock: Clock) -> None:
    config = SimulatorConfig(api_key=KEY, batch=BatchConfig(turnaround_s=TURNAROUND))
    async with Simulator(config, clock=clock) as sim, client(sim, key="sk-wrong") as c:
        with pytest.raises(openai.AuthenticationError):
            await c.files.create(file=("r.jsonl", jsonl(1)), purpose="batch")
        with pytest.raises(openai.AuthenticationError):
            await c.batches.list()


async def test_a_slow_poll_delays_the_batch_retrieval(clock: Clock) -> None:
    async with await serve(clock, poll_delay_ms=300) as sim, client(sim) as c:
        batch = await submit(c, clock, jsonl(1))
        started = time.monotonic()
        await c.batches.retrieve(batch.id)
        # A lower bound only: a sleep never ends early, however busy the machine.
        assert time.monotonic() - started >= 0.3
    assert sim.batches.stats.polls == 1


async def test_advancing_the_clock_skips_a_long_turnaround() -> None:
    config = SimulatorConfig(batch=BatchConfig(turnaround_s=3_600))
    async with Simulator(config) as sim, client(sim) as c:
        uploaded = await c.files.create(file=("r.jsonl", jsonl(2)), purpose="batch")
        batch = await c.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
        )
        root = sim.base_url.removesuffix("/v1")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{root}/_batches/advance?seconds=soon") as refused:
                assert refused.status == 400
            async with session.post(f"{root}/_batches/advance?seconds=3600") as skipped:
                assert (await skipped.json()) == {"skipped_s": 3600.0}
        batch = await c.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert batch.completed_at is not None and batch.completed_at - batch.created_at == 3_600


async def test_the_stats_count_uploads_batches_and_requests_per_custom_id(
    sim: Simulator, clock: Clock
) -> None:
    async with client(sim) as c:
        batch = await submit(c, clock, jsonl(3))
        clock.at(batch, 1.0)
        batch = await c.batches.retrieve(batch.id)
        await c.batches.retrieve(batch.id)  # looking again computes nothing again
    root = sim.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session, session.get(f"{root}/_stats") as resp:
        stats = (await resp.json())["batch"]
    assert stats["files_uploaded"] == 1
    assert stats["batches_created"] == 1
    assert stats["computed_by_custom_id"] == {"row-0": 1, "row-1": 1, "row-2": 1}
    assert stats["answered_by_content"] == {"q0": 1, "q1": 1, "q2": 1}
    assert stats["polls"] == 2
    sim.reset_stats()
    assert sim.batches.stats.batches_created == 0
    assert sim.batches.stats.computed_by_custom_id == {}


@pytest.mark.parametrize(
    "settings",
    [
        {"turnaround_s": -1},
        {"expire_after_s": 0},
        {"fail_rate": 1.5},
        {"max_file_bytes": 0},
        {"enqueued_tokens": 0},
    ],
)
def test_invalid_batch_settings_raise_config_error(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="simulator batch"):
        BatchConfig(**settings)


def _start_simulate(args: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "simulate", "--port", "0", *args],
        stderr=subprocess.PIPE,
        text=True,
        cwd=PACKAGE_ROOT,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_simulate_command_takes_the_batch_flags() -> None:
    proc = _start_simulate(
        ["--batch-turnaround", "0", "--batch-max-file-bytes", "1000", "--batch-fail-rate", "0"]
    )
    try:
        assert proc.stderr is not None
        ready = proc.stderr.readline()
        assert ready.startswith("serving "), ready
        with openai.OpenAI(base_url=ready.split()[1], api_key=KEY, max_retries=0) as c:
            with pytest.raises(openai.APIStatusError) as refused:
                c.files.create(file=("big.jsonl", b"x" * 2_000), purpose="batch")
            uploaded = c.files.create(file=("r.jsonl", jsonl(2)), purpose="batch")
            batch = c.batches.create(
                input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
            )
            # A turnaround of 0: done as soon as it is looked at.
            batch = c.batches.retrieve(batch.id)
        assert refused.value.status_code == 413
        assert batch.status == "completed"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
