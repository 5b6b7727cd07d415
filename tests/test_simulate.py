"""The simulator, driven by the real ``openai`` client over loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.shared_params import ResponseFormatJSONSchema

from pipeline import simulate
from pipeline.errors import ConfigError
from pipeline.simulate import (
    BAD_JSON,
    Simulator,
    SimulatorConfig,
    estimate_tokens,
    expected_answer,
    expected_structured_answer,
    format_reset,
    parse_rpm_schedule,
    run_in_thread,
)
from pipeline.structured import StructuredAnswerError, load_schema, parse_answer, response_format

pytestmark = pytest.mark.timeout(10)

# Where `pipeline` was imported from, so a subprocess imports the same code.
PACKAGE_ROOT = Path(simulate.__file__).absolute().parents[1]
KEY = "sk-test"
SENTIMENT = load_schema(str(PACKAGE_ROOT / "configs" / "schemas" / "sentiment.schema.json"))


def user(content: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": content}]


def client(sim: Simulator, *, timeout: float = 5.0, key: str = KEY) -> openai.AsyncOpenAI:
    # max_retries=0: every request the test makes is exactly one request the server sees.
    return openai.AsyncOpenAI(base_url=sim.base_url, api_key=key, max_retries=0, timeout=timeout)


async def ask(sim: Simulator, content: str, model: str = "sim-1", **kwargs: Any) -> str | None:
    async with client(sim, **kwargs) as c:
        completion = await c.chat.completions.create(model=model, messages=user(content))
    return completion.choices[0].message.content


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator() as server:
        yield server


# -- pure functions ---------------------------------------------------------


def test_estimate_tokens_is_a_quarter_of_the_utf8_bytes_and_at_least_one() -> None:
    assert estimate_tokens("") == 1
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("é" * 4) == 2  # 8 bytes


def test_expected_answer_changes_with_system_prompt_model_and_user_content() -> None:
    base = [{"role": "system", "content": "be brief"}, *user("hello")]
    other_system = [{"role": "system", "content": "be verbose"}, *user("hello")]
    answers = {
        expected_answer(base, "m1"),
        expected_answer(other_system, "m1"),
        expected_answer(base, "m2"),
        expected_answer(user("hello"), "m1"),
        expected_answer(user("bye"), "m1"),
    }
    assert len(answers) == 5
    assert expected_answer(user("hello"), "m1") == "[m1] answer to: hello"
    assert expected_answer(base, "m1") == expected_answer(list(base), "m1")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.012, "12ms"),
        (0.0001, "1ms"),
        (0.9999, "1s"),
        (1, "1s"),
        (1.5, "1.5s"),
        (20, "20s"),
        (360, "6m0s"),
        (389.714, "6m29.714s"),
        (3723, "1h2m3s"),
    ],
)
def test_format_reset_uses_openai_duration_format(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fail_rate_5xx": 1.5},
        {"drop_rate": -0.1},
        {"fail_rate_5xx": 0.6, "drop_rate": 0.6},
        {"rpm": 0},
        {"window_s": 0},
        {"latency_ms": -1},
        {"rpm_schedule": ((1.0, 100), (0.5, 100))},
        {"rpm_schedule": ((-1.0, 100),)},
        {"rpm_schedule": ((1.0, -1),)},
        {"chunk_delay_ms": -1},
        {"hang_s": 30, "hang_max_s": 10},
    ],
)
def test_invalid_config_raises_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SimulatorConfig(**kwargs)


# -- answers ------------------------------------------------------------------


async def test_answer_is_expected_answer_in_openai_shape_and_counted(sim: Simulator) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You label rows."},
        *user("row 1"),
    ]
    async with client(sim) as c:
        completion = await c.chat.completions.create(model="any-model", messages=messages)
    answer = expected_answer(messages, "any-model")
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "any-model"
    assert completion.choices[0].message.content == answer
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    prompt_tokens = estimate_tokens("You label rows.") + 4 + estimate_tokens("row 1") + 4
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.completion_tokens == estimate_tokens(answer)
    assert completion.usage.total_tokens == prompt_tokens + estimate_tokens(answer)
    assert sim.stats.requests == 1
    assert sim.stats.answered == 1
    assert sim.stats.tokens == completion.usage.total_tokens
    assert sim.stats.answered_by_content == {"row 1": 1}


async def test_max_tokens_truncates_answer_and_reports_length(sim: Simulator) -> None:
    async with client(sim) as c:
        completion = await c.chat.completions.create(
            model="sim-1", messages=user("é" * 50), max_tokens=3
        )
    content = completion.choices[0].message.content
    assert content is not None
    assert completion.choices[0].finish_reason == "length"
    assert len(content.encode()) <= 12
    assert expected_answer(user("é" * 50), "sim-1").startswith(content)
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 3


async def test_latency_delays_every_answer() -> None:
    async with Simulator(SimulatorConfig(latency_ms=150, jitter_ms=20)) as sim:
        started = time.monotonic()
        await ask(sim, "slow")
        assert time.monotonic() - started >= 0.13


async def test_models_endpoint_lists_configured_models() -> None:
    async with Simulator(SimulatorConfig(models=("a", "b"))) as sim, client(sim) as c:
        page = await c.models.list()
    assert [m.id for m in page.data] == ["a", "b"]


async def test_unknown_path_and_stats_endpoint_answer_json(sim: Simulator) -> None:
    await ask(sim, "x")
    root = sim.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{root}/nope") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "unknown_url"
        async with session.get(f"{root}/_stats") as resp:
            stats = await resp.json()
    assert stats["requests"] == 1
    assert stats["answered_by_content"] == {"x": 1}


# -- structured output --------------------------------------------------------------


async def ask_structured(
    sim: Simulator, content: str, schema: dict[str, Any] = SENTIMENT, max_tokens: int | None = None
) -> tuple[str | None, str | None]:
    """The content and finish_reason of one structured request."""
    async with client(sim) as c:
        completion = await c.chat.completions.create(
            model="sim-1",
            messages=user(content),
            response_format=cast(ResponseFormatJSONSchema, response_format(schema)),
            max_tokens=max_tokens,
        )
    choice = completion.choices[0]
    return choice.message.content, choice.finish_reason


def test_expected_structured_answer_follows_the_recipe_and_validates() -> None:
    text = "Great phone, terrible battery"
    answer = expected_structured_answer(user(text), "sim-1", SENTIMENT)
    assert list(answer) == ["label", "score", "predicted_stars", "sarcastic", "topics"]
    assert answer["label"] in ("positive", "negative", "neutral", "mixed")
    assert answer["score"] == len(text) / 10
    assert answer["predicted_stars"] == len(text)
    assert answer["sarcastic"] is (len(text) % 2 == 0)
    assert answer["topics"] == [f"topics: {text}"]
    assert parse_answer(json.dumps(answer), SENTIMENT) == answer
    labels = {
        expected_structured_answer(user(f"row {i}"), "sim-1", SENTIMENT)["label"] for i in range(20)
    }
    assert len(labels) > 1  # the enum choice depends on the text


def test_expected_structured_answer_handles_nullable_nested_and_bounded_properties() -> None:
    schema = {
        "type": "object",
        "properties": {
            "note": {"type": ["string", "null"], "maxLength": 8},
            "count": {"anyOf": [{"type": "integer", "maximum": 5}, {"type": "null"}]},
            "flags": {"type": "array", "items": {"type": "boolean"}},
            "kind": {"enum": [1, "two", None]},
            "meta": {"type": "object"},
            "inner": {
                "type": "object",
                "properties": {"x": {"type": "number", "minimum": 100}},
                "required": ["x"],
                "additionalProperties": False,
            },
        },
        "required": ["note", "count", "flags", "kind", "meta", "inner"],
        "additionalProperties": False,
    }
    answer = expected_structured_answer(user("hello"), "m", schema)
    assert answer["note"] == "note: he"
    assert answer["count"] == 5
    assert answer["flags"] == [False]
    assert answer["meta"] == {}
    assert answer["inner"] == {"x": 100}
    assert parse_answer(json.dumps(answer), load_schema(schema)) == answer
    assert expected_structured_answer(user("hello"), "m", None) == {}


async def test_structured_answer_is_the_expected_json_and_validates(sim: Simulator) -> None:
    content, finish_reason = await ask_structured(sim, "Love it, but it broke é")
    assert content is not None
    expected = expected_structured_answer(user("Love it, but it broke é"), "sim-1", SENTIMENT)
    assert content == json.dumps(expected, ensure_ascii=False)
    assert finish_reason == "stop"
    assert parse_answer(content, SENTIMENT) == expected
    assert sim.stats.answered == 1
    assert sim.stats.bad_answers == 0


async def test_structured_answer_is_cut_at_max_tokens(sim: Simulator) -> None:
    content, finish_reason = await ask_structured(sim, "a long review " * 5, max_tokens=5)
    assert finish_reason == "length"
    assert content is not None
    with pytest.raises(StructuredAnswerError, match="max_tokens"):
        parse_answer(content, SENTIMENT, finish_reason=finish_reason)


async def test_structured_false_rejects_json_schema_with_400() -> None:
    async with Simulator(SimulatorConfig(structured=False)) as sim:
        with pytest.raises(openai.BadRequestError) as err:
            await ask_structured(sim, "x")
        assert err.value.param == "response_format"
        assert err.value.type == "invalid_request_error"
        assert "'json_schema' is not supported" in err.value.message
        # Without response_format the same server answers as usual.
        assert await ask(sim, "x") == "[sim-1] answer to: x"
        assert sim.stats.requests == 2
        assert sim.stats.answered == 1


async def test_badjson_directive_answers_200_not_json_then_the_valid_answer(
    sim: Simulator,
) -> None:
    content = "review [[fault:badjson:1]]"
    first, finish_reason = await ask_structured(sim, content)
    assert first == BAD_JSON
    assert finish_reason == "stop"
    with pytest.raises(StructuredAnswerError, match="not JSON"):
        parse_answer(first, SENTIMENT)
    second, _ = await ask_structured(sim, content)
    assert second is not None
    assert parse_answer(second, SENTIMENT) == expected_structured_answer(
        user(content), "sim-1", SENTIMENT
    )
    # Bad answers are billed 200s: answered, not faults.
    assert sim.stats.requests == 2
    assert sim.stats.answered == 2
    assert sim.stats.bad_answers == 1
    assert sim.stats.faults == 0
    assert sim.stats.answered_by_content == {content: 2}


@pytest.mark.slow
async def test_badjson_count_is_not_used_up_by_a_rate_limited_request() -> None:
    # 60 rpm over 1 s: one request per window (long enough that a loaded
    # machine's second request still lands inside it).
    async with Simulator(SimulatorConfig(rpm=60, window_s=1.0)) as sim:
        await ask(sim, "fill the window")
        with pytest.raises(openai.RateLimitError) as err:
            await ask_structured(sim, "[[fault:badjson:1]]")
        await asyncio.sleep(int(err.value.response.headers["retry-after-ms"]) / 1000)
        assert (await ask_structured(sim, "[[fault:badjson:1]]"))[0] == BAD_JSON
        assert sim.stats.bad_answers == 1


@pytest.mark.slow
async def test_stats_count_admitted_requests_tokens_and_their_span_but_not_429s() -> None:
    # 60 rpm over 1 s: one request per window.
    async with Simulator(SimulatorConfig(rpm=60, window_s=1.0)) as sim, client(sim) as c:
        first = await c.chat.completions.create(model="sim-1", messages=user("one"))
        with pytest.raises(openai.RateLimitError) as err:
            await c.chat.completions.create(model="sim-1", messages=user("refused"))
        await asyncio.sleep(int(err.value.response.headers["retry-after-ms"]) / 1000)
        second = await c.chat.completions.create(model="sim-1", messages=user("two"))
        stats = sim.stats.as_dict()
    assert first.usage is not None and second.usage is not None
    assert (stats["requests"], stats["admitted"], stats["rate_limited"]) == (3, 2, 1)
    assert stats["admitted_tokens"] == first.usage.total_tokens + second.usage.total_tokens
    # The second could only be admitted once the first left the 1 s window.
    assert 0.95 <= stats["admitted_span_s"] < 10.0


async def test_invalid_directive_answers_json_that_fails_the_schema(sim: Simulator) -> None:
    content = "review [[fault:invalid]]"
    for _ in range(2):
        answer, _ = await ask_structured(sim, content)
        assert answer is not None
        expected = expected_structured_answer(user(content), "sim-1", SENTIMENT)
        del expected["label"]
        assert json.loads(answer) == expected
        with pytest.raises(StructuredAnswerError, match="missing field 'label'"):
            parse_answer(answer, SENTIMENT)
    assert await ask(sim, "plain [[fault:invalid:1]]") == "{}"
    assert sim.stats.answered == sim.stats.bad_answers == 3
    assert sim.stats.faults == 0


# -- run-level errors -----------------------------------------------------------


async def test_wrong_api_key_gets_401_invalid_api_key() -> None:
    async with Simulator(SimulatorConfig(api_key="right")) as sim:
        with pytest.raises(openai.AuthenticationError) as err:
            await ask(sim, "x", key="wrong")
        assert err.value.status_code == 401
        assert err.value.code == "invalid_api_key"
        assert "wrong" not in str(err.value)
        assert await ask(sim, "x", key="right") == "[sim-1] answer to: x"


async def test_unknown_model_gets_404_model_not_found() -> None:
    async with Simulator(SimulatorConfig(models=("known",))) as sim:
        with pytest.raises(openai.NotFoundError) as err:
            await ask(sim, "x", model="unknown")
        assert err.value.code == "model_not_found"
        assert await ask(sim, "x", model="known") == "[known] answer to: x"


async def test_insufficient_quota_is_429_without_retry_after() -> None:
    async with Simulator(SimulatorConfig(insufficient_quota=True, rpm=60)) as sim:
        with pytest.raises(openai.RateLimitError) as err:
            await ask(sim, "x")
        assert err.value.code == "insufficient_quota"
        assert err.value.type == "insufficient_quota"
        assert "retry-after" not in err.value.response.headers
        assert "retry-after-ms" not in err.value.response.headers
        assert sim.stats.rate_limited == 0


async def test_fault_400_directive_is_context_length_exceeded(sim: Simulator) -> None:
    for _ in range(2):
        with pytest.raises(openai.BadRequestError) as err:
            await ask(sim, "too long [[fault:400]]")
        assert err.value.code == "context_length_exceeded"
        assert err.value.param == "messages"
    assert sim.stats.answered == 0


# -- rate limits ----------------------------------------------------------------


async def test_rate_limited_request_gets_429_with_retry_headers() -> None:
    # 600 rpm over a 1 s window: 10 requests per window.
    config = SimulatorConfig(rpm=600, tpm=600_000, window_s=1.0)
    async with Simulator(config) as sim, client(sim) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="sim-1", messages=user("first")
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "600"
        assert raw.headers["x-ratelimit-remaining-requests"] == "9"
        assert raw.headers["x-ratelimit-limit-tokens"] == "600000"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 10_000
        # The window empties one window after this request.
        assert raw.headers["x-ratelimit-reset-requests"] in ("1s", "999ms", "998ms")
        for i in range(9):
            await c.chat.completions.create(model="sim-1", messages=user(f"row {i}"))
        with pytest.raises(openai.RateLimitError) as err:
            await c.chat.completions.create(model="sim-1", messages=user("eleventh"))
    headers = err.value.response.headers
    assert err.value.code == "rate_limit_exceeded"
    assert err.value.type == "requests"
    assert str(err.value.message).count("Rate limit reached for requests") == 1
    assert 0 < int(headers["retry-after-ms"]) <= 1000
    assert headers["retry-after"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    for name in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{name}-tokens" in headers
    assert sim.stats.requests == 11
    assert sim.stats.answered == 10
    assert sim.stats.rate_limited == 1
    assert "eleventh" not in sim.stats.answered_by_content


@pytest.mark.slow
async def test_rate_limit_admits_again_after_retry_after_ms() -> None:
    # 60 rpm over 1 s: one request per window.
    async with Simulator(SimulatorConfig(rpm=60, window_s=1.0)) as sim, client(sim) as c:
        await c.chat.completions.create(model="sim-1", messages=user("a"))
        with pytest.raises(openai.RateLimitError) as err:
            await c.chat.completions.create(model="sim-1", messages=user("b"))
        wait_ms = int(err.value.response.headers["retry-after-ms"])
        assert 0 < wait_ms <= 1000
        await asyncio.sleep(wait_ms / 1000)
        # The refused request did not use up the window.
        await c.chat.completions.create(model="sim-1", messages=user("b"))
    assert sim.stats.answered == 2
    assert sim.stats.rate_limited == 1


@pytest.mark.slow
async def test_an_rpm_schedule_lowers_then_raises_the_limit_counted_from_the_first_request() -> (
    None
):
    # 5 requests per 2 s window; from 1.2 s on, 1; from 3.6 s on, 5 again (a
    # window long enough for the steps to hold on a loaded machine).
    config = SimulatorConfig(rpm=150, window_s=2.0, rpm_schedule=((1.2, 30), (3.6, 150)))
    async with Simulator(config) as sim, client(sim) as c:
        await asyncio.sleep(0.5)  # the schedule starts with the first request, not the server
        started = time.monotonic()
        for i in range(3):
            raw = await c.chat.completions.with_raw_response.create(
                model="sim-1", messages=user(f"before {i}")
            )
            assert raw.headers["x-ratelimit-limit-requests"] == "150"
        await asyncio.sleep(max(0.0, started + 1.4 - time.monotonic()))
        # The lower limit counts what the window already holds: 3 > 1.
        with pytest.raises(openai.RateLimitError) as err:
            await c.chat.completions.create(model="sim-1", messages=user("storm"))
        headers = err.value.response.headers
        assert headers["x-ratelimit-limit-requests"] == "30"
        assert "Limit 30" in err.value.message
        # Until the last of the three leaves the window, about 0.6-0.9 s on.
        wait_s = int(headers["retry-after-ms"]) / 1000
        assert 0.2 < wait_s <= 1.0
        await asyncio.sleep(wait_s)
        await c.chat.completions.create(model="sim-1", messages=user("storm"))
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(model="sim-1", messages=user("one too many"))
        await asyncio.sleep(max(0.0, started + 3.8 - time.monotonic()))
        for i in range(4):
            raw = await c.chat.completions.with_raw_response.create(
                model="sim-1", messages=user(f"after {i}")
            )
        assert raw.headers["x-ratelimit-limit-requests"] == "150"
    assert sim.stats.rate_limited == 2


@pytest.mark.slow
async def test_an_rpm_of_zero_refuses_every_request_until_the_next_step() -> None:
    config = SimulatorConfig(rpm=600, window_s=5.0, rpm_schedule=((0.2, 0), (1.0, 600)))
    async with Simulator(config) as sim, client(sim) as c:
        started = time.monotonic()
        await c.chat.completions.create(model="sim-1", messages=user("admitted"))
        await asyncio.sleep(max(0.0, started + 0.4 - time.monotonic()))
        with pytest.raises(openai.RateLimitError) as err:
            await c.chat.completions.create(model="sim-1", messages=user("refused"))
        headers = err.value.response.headers
        assert err.value.code == "rate_limit_exceeded"  # not a quota error: nothing says so
        assert headers["x-ratelimit-limit-requests"] == "0"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        # Until the step at 1.0 s, not until the 5 s window drains (the margin
        # leaves room for a loaded machine).
        wait_s = int(headers["retry-after-ms"]) / 1000
        assert 0.0 < wait_s <= 0.8
        await asyncio.sleep(wait_s)
        await c.chat.completions.create(model="sim-1", messages=user("admitted again"))
    assert (sim.stats.answered, sim.stats.rate_limited) == (2, 1)


async def test_rate_headers_can_stop_some_time_after_the_first_request() -> None:
    config = SimulatorConfig(rpm=600, window_s=1.0, rate_headers_until_s=0.2)
    async with Simulator(config) as sim, client(sim) as c:
        await asyncio.sleep(0.3)  # counted from the first request
        raw = await c.chat.completions.with_raw_response.create(model="sim-1", messages=user("a"))
        assert raw.headers["x-ratelimit-limit-requests"] == "600"
        await asyncio.sleep(0.25)
        raw = await c.chat.completions.with_raw_response.create(model="sim-1", messages=user("b"))
        assert not any(h.startswith("x-ratelimit") for h in raw.headers)


def test_an_rpm_schedule_is_written_as_seconds_and_rpm_pairs() -> None:
    assert parse_rpm_schedule("10:600, 25:6000") == ((10.0, 600), (25.0, 6000))
    assert parse_rpm_schedule("0.5:0") == ((0.5, 0),)
    for bad in ("10-600", "10:", "x:5", "10:6.5"):
        with pytest.raises(ConfigError, match="SECONDS:RPM"):
            parse_rpm_schedule(bad)


@contextlib.contextmanager
def simulate_command(*flags: str) -> Iterator[openai.OpenAI]:
    """``python -m pipeline simulate --port 0 FLAGS`` in a process of its
    own, and a client of it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "simulate", "--port", "0", *flags],
        stderr=subprocess.PIPE,
        text=True,
        cwd=PACKAGE_ROOT,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("serving "), line
        with openai.OpenAI(base_url=line.split()[1], api_key=KEY, max_retries=0) as c:
            yield c
    finally:
        proc.terminate()
        proc.wait(timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(30)
def test_the_simulate_command_takes_an_rpm_schedule() -> None:
    with (
        simulate_command("--rpm", "600", "--window-s", "1", "--rpm-schedule", "0:0") as c,
        pytest.raises(openai.RateLimitError) as err,
    ):
        c.chat.completions.create(model="sim-1", messages=user("refused"))
    assert err.value.response.headers["x-ratelimit-limit-requests"] == "0"
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline", "simulate", "--rpm-schedule", "soon"],
        capture_output=True,
        text=True,
        cwd=PACKAGE_ROOT,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
        timeout=30,
    )
    assert bad.returncode == 2
    assert "SECONDS:RPM" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(30)
@pytest.mark.parametrize("timings", ["llama.cpp", "none"])
def test_the_simulate_command_serves_slots_as_llama_cpp_python_does(timings: str) -> None:
    flags = ("--slots", "1", "--slot-order", "any", "--timings", timings)
    with simulate_command(*flags) as c:
        answer = c.chat.completions.create(model="sim-1", messages=user("hi"))
    assert ("timings" in (answer.model_extra or {})) == (timings == "llama.cpp")


async def test_token_limit_answers_429_of_type_tokens() -> None:
    # 60 tokens per 1 s window; each request is well over 30 tokens.
    async with Simulator(SimulatorConfig(tpm=3600, window_s=1.0)) as sim, client(sim) as c:
        prompt = "x" * 120  # 30 prompt tokens + 4, plus the answer
        await c.chat.completions.create(model="sim-1", messages=user(prompt))
        with pytest.raises(openai.RateLimitError) as err:
            await c.chat.completions.create(model="sim-1", messages=user(prompt))
    assert err.value.type == "tokens"
    assert "Rate limit reached for tokens" in err.value.message
    assert "retry-after-ms" in err.value.response.headers
    assert "x-ratelimit-limit-requests" not in err.value.response.headers


async def test_rate_headers_and_retry_after_can_be_turned_off() -> None:
    config = SimulatorConfig(rpm=60, window_s=1.0, rate_headers=False, retry_after=False)
    async with Simulator(config) as sim, client(sim) as c:
        raw = await c.chat.completions.with_raw_response.create(model="sim-1", messages=user("a"))
        assert not any(h.startswith("x-ratelimit") for h in raw.headers)
        with pytest.raises(openai.RateLimitError) as err:
            await c.chat.completions.create(model="sim-1", messages=user("b"))
    assert not any(h.startswith(("x-ratelimit", "retry-after")) for h in err.value.response.headers)


# -- faults ---------------------------------------------------------------------


async def test_fault_500_directive_fails_exactly_twice_then_succeeds(sim: Simulator) -> None:
    content = "flaky [[fault:500:2]]"
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as err:
            await ask(sim, content)
        assert err.value.type == "server_error"
    assert await ask(sim, content) == expected_answer(user(content), "sim-1")
    assert await ask(sim, content) == expected_answer(user(content), "sim-1")
    # Counts are per exact content: another row with the same directive fails afresh.
    with pytest.raises(openai.InternalServerError):
        await ask(sim, "other [[fault:500:2]]")
    assert sim.stats.faults == 3
    assert sim.stats.answered_by_content == {content: 2}


async def test_fault_429_directive_is_a_rate_limit_error_with_retry_after(sim: Simulator) -> None:
    with pytest.raises(openai.RateLimitError) as err:
        await ask(sim, "busy [[fault:429:1]]")
    assert err.value.code == "rate_limit_exceeded"
    assert int(err.value.response.headers["retry-after-ms"]) > 0
    assert await ask(sim, "busy [[fault:429:1]]") is not None
    assert sim.stats.rate_limited == 1
    assert sim.stats.faults == 0


async def test_malformed_body_makes_client_raise(sim: Simulator) -> None:
    # The openai client does not wrap this one: it surfaces as json's ValueError.
    with pytest.raises(ValueError, match="line 1"):
        await ask(sim, "[[fault:malformed:1]]")
    assert sim.stats.faults == 1
    assert sim.stats.answered == 0
    assert await ask(sim, "[[fault:malformed:1]]") is not None


async def test_dropped_connection_raises_api_connection_error(sim: Simulator) -> None:
    with pytest.raises(openai.APIConnectionError) as err:
        await ask(sim, "[[fault:drop:1]]")
    assert not isinstance(err.value, openai.APITimeoutError)
    assert sim.stats.faults == 1
    assert await ask(sim, "[[fault:drop:1]]") is not None


@pytest.mark.slow
async def test_hanging_request_times_out_client_and_does_not_block_stop() -> None:
    sim = Simulator(SimulatorConfig(hang_s=30))
    await sim.start()
    try:
        with pytest.raises(openai.APITimeoutError):
            await ask(sim, "[[fault:hang:1]]", timeout=0.5)
        assert sim.stats.faults == 1
        assert await ask(sim, "[[fault:hang:1]]") is not None
    finally:
        started = time.monotonic()
        await sim.stop()
        # Not the 30 s the hang would take (a bound loose enough for a loaded machine).
        assert time.monotonic() - started < 10.0


async def test_random_faults_are_reproducible_with_the_same_seed() -> None:
    config = SimulatorConfig(fail_rate_5xx=0.2, fail_rate_429=0.2, malformed_rate=0.2, seed=7)

    async def statuses() -> list[int]:
        async with Simulator(config) as sim, aiohttp.ClientSession() as session:
            seen = []
            for i in range(40):
                body = {"model": "m", "messages": user(f"row {i}")}
                async with session.post(f"{sim.base_url}/chat/completions", json=body) as resp:
                    await resp.read()
                    seen.append(resp.status)
            assert sim.stats.faults + sim.stats.rate_limited + sim.stats.answered == 40
            return seen

    first, second = await statuses(), await statuses()
    assert first == second
    assert {200, 429} <= set(first)
    assert set(first) & {500, 502, 503}


@pytest.mark.slow
async def test_max_in_flight_counts_concurrent_requests() -> None:
    async with Simulator(SimulatorConfig(latency_ms=200)) as sim, client(sim) as c:
        await asyncio.gather(
            *(c.chat.completions.create(model="sim-1", messages=user(f"r{i}")) for i in range(8))
        )
        assert sim.stats.max_in_flight == 8
        sim.reset_stats()
        assert sim.stats.max_in_flight == 0
        assert sim.stats.answered_by_content == {}
        await c.chat.completions.create(model="sim-1", messages=user("alone"))
        assert sim.stats.max_in_flight == 1
        assert sim.stats.requests == 1


# -- streaming ------------------------------------------------------------------


async def stream_chunks(
    sim: Simulator, content: str, *, timeout: float = 5.0, **kwargs: Any
) -> list[Any]:
    async with client(sim, timeout=timeout) as c:
        stream = await c.chat.completions.create(
            model="sim-1", messages=user(content), stream=True, **kwargs
        )
        return [chunk async for chunk in stream]


@pytest.mark.slow
async def test_a_streamed_answer_is_openai_chunks_with_the_usage_last(sim: Simulator) -> None:
    async with client(sim) as c:
        whole = await c.chat.completions.create(model="sim-1", messages=user("row 1 " * 10))
    chunks = await stream_chunks(sim, "row 1 " * 10, stream_options={"include_usage": True})

    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len(chunks) > 10  # in pieces, not one chunk
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage
    assert (sim.stats.answered, sim.stats.streamed) == (2, 1)
    # Without include_usage there is no usage chunk.
    plain = await stream_chunks(sim, "row 1")
    assert all(chunk.usage is None for chunk in plain)
    assert plain[-1].choices[0].finish_reason == "stop"


async def test_chunk_delay_spreads_a_streamed_answer_over_time() -> None:
    async with Simulator(SimulatorConfig(chunk_delay_ms=30)) as sim:
        arrivals = []
        async with client(sim) as c:
            stream = await c.chat.completions.create(
                model="sim-1", messages=user("a question"), stream=True
            )
            async for _chunk in stream:
                arrivals.append(time.monotonic())
    # Each chunk after the first waited its delay (a lower bound: never flaky).
    assert len(arrivals) > 5
    assert arrivals[-1] - arrivals[0] >= 0.9 * 0.03 * (len(arrivals) - 1)


@pytest.mark.slow
async def test_a_hang_sends_a_streaming_request_nothing_either() -> None:
    async with Simulator(SimulatorConfig(hang_s=30)) as sim:
        with pytest.raises(openai.APITimeoutError):
            await stream_chunks(sim, "[[fault:hang:1]]", timeout=0.5)
        assert (sim.stats.hangs, sim.stats.faults, sim.stats.answered) == (1, 1, 0)
        assert len(await stream_chunks(sim, "[[fault:hang:1]]")) > 1


async def test_a_hang_that_answers_gives_the_answer_after_the_hang() -> None:
    config = SimulatorConfig(hang_rate=1.0, hang_s=0.1, hang_max_s=0.2, hang_answers=True)
    async with Simulator(config) as sim:
        assert await ask(sim, "late") == expected_answer(user("late"), "sim-1")
        chunks = await stream_chunks(sim, "late too")
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            expected_answer(user("late too"), "sim-1")
        )
        assert (sim.stats.hangs, sim.stats.faults, sim.stats.answered) == (2, 2, 2)


async def test_a_server_without_streaming_answers_stream_with_a_400() -> None:
    async with Simulator(SimulatorConfig(streaming=False)) as sim:
        with pytest.raises(openai.BadRequestError) as caught:
            await stream_chunks(sim, "hi")
        assert caught.value.param == "stream"
        assert await ask(sim, "hi") is not None  # plain requests are answered


async def test_stream_options_without_stream_is_a_400(sim: Simulator) -> None:
    async with client(sim) as c:
        with pytest.raises(openai.BadRequestError) as caught:
            await c.chat.completions.create(
                model="sim-1", messages=user("hi"), stream_options={"include_usage": True}
            )
    assert caught.value.param == "stream_options"


# -- running outside the test's event loop --------------------------------------


def test_run_in_thread_serves_a_sync_client_and_stops_cleanly() -> None:
    with run_in_thread(SimulatorConfig(api_key=KEY)) as sim:
        with openai.OpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0) as c:
            completion = c.chat.completions.create(model="sim-1", messages=user("sync"))
        assert completion.choices[0].message.content == "[sim-1] answer to: sync"
        assert sim.stats.answered_by_content["sync"] == 1
        base_url = sim.base_url
    with (
        openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=1) as c,
        pytest.raises(openai.APIConnectionError),
    ):
        c.chat.completions.create(model="sim-1", messages=user("after stop"))


def test_run_in_thread_classmethod_is_the_same_helper() -> None:
    with Simulator.run_in_thread() as sim:
        assert sim.base_url.startswith("http://127.0.0.1:")


# A fresh interpreter importing the server: seconds on a loaded machine.
@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_forever_calls_ready_and_stops_cleanly_on_signal(sig: signal.Signals) -> None:
    script = (
        "from pipeline.simulate import SimulatorConfig, serve_forever\n"
        "serve_forever(SimulatorConfig(), '127.0.0.1', 0, lambda url: print(url, flush=True))\n"
        "print('stopped', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=PACKAGE_ROOT,
        env={**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)},
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:"), proc.communicate(timeout=30)
        with openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0) as c:
            completion = c.chat.completions.create(model="sim-1", messages=user("cli"))
        assert completion.choices[0].message.content == "[sim-1] answer to: cli"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == "stopped"
    assert err == ""
