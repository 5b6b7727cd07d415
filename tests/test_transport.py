"""Both transports over real loopback HTTP: the same answers, the same
enrich transport errors (never the SDK's or aiohttp's), the same
classification. The servers are fakes (the simulator, or a hand-written
aiohttp handler); the clients are real."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final, cast

import openai
import pytest
from aiohttp import web

from pipeline.call import CallStage, ChatRequest
from pipeline.classify import Failure, classify
from pipeline.config import DEFAULT_BASE_URL, LimitsConfig, ModelConfig
from pipeline.errors import ConfigError
from pipeline.simulate import (
    BAD_JSON,
    SPURIOUS_RETRY_AFTER_S,
    Simulator,
    expected_answer,
    expected_structured_answer,
)
from pipeline.stall import StalledRequest
from pipeline.structured import load_schema, response_format
from pipeline.transport import (
    TRANSPORT_KINDS,
    USER_AGENT,
    AiohttpTransport,
    Completion,
    Messages,
    OpenAITransport,
    StreamAssembler,
    Transport,
    make_transport,
    parse_completion,
    rejects_streaming,
    sdk_error,
)
from pipeline.transport_errors import (
    APIConnectionFailed,
    APIStatus,
    APITimeout,
    TransportError,
    UnparseableResponse,
)
from pipeline.transport_h11 import H11Transport

from conftest import MODEL, StartServer

pytestmark = pytest.mark.timeout(10)

KEY = "sk-transport-test-0123456789"
KINDS = ("h11", "aiohttp", "openai")
# The two transports that speak HTTP themselves (h11, the default, and
# aiohttp): each must behave as the SDK's client does.
FAST = ("h11", "aiohttp")


def user(content: str) -> Messages:
    return [{"role": "user", "content": content}]


def model_config(base_url: str | None, **settings: Any) -> ModelConfig:
    values: dict[str, Any] = {"name": MODEL, "base_url": base_url, "timeout_s": 5.0}
    values.update(settings)
    return ModelConfig(**values)


async def server_count(read: Callable[[], int], expected: int, timeout_s: float = 5.0) -> int:
    """The simulator's count once it reaches ``expected`` (or the timeout).
    It counts a streamed answer when its last write returns, which may be a
    loop turn after the client has read ``[DONE]``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while read() != expected and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return read()


async def ask(
    kind: str,
    base_url: str | None,
    messages: Messages,
    *,
    key: str = KEY,
    stall_s: float | None = None,
    extra_params: dict[str, Any] | None = None,
    **settings: Any,
) -> Completion:
    transport = make_transport(
        model_config(base_url, **settings), key, kind, extra_params=extra_params
    )
    try:
        return await transport.complete(messages, stall_s=stall_s)
    finally:
        await transport.aclose()


async def failure(
    kind: str, base_url: str | None, messages: Messages, *, key: str = KEY, **settings: Any
) -> Exception:
    with pytest.raises(Exception) as caught:
        await ask(kind, base_url, messages, key=key, **settings)
    assert isinstance(caught.value, Exception)
    return caught.value


def comparable(completion: Completion) -> tuple[Any, ...]:
    return (
        completion.text,
        completion.finish_reason,
        completion.model,
        completion.prompt_tokens,
        completion.completion_tokens,
    )


@pytest.fixture
def server(start_server: StartServer) -> Simulator:
    return start_server(api_key=KEY, models=(MODEL,))


# -- success ----------------------------------------------------------------


@pytest.mark.parametrize("client", FAST)
async def test_both_transports_give_the_same_completion(server: Simulator, client: str) -> None:
    messages: Messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Qu'est-ce que l'été ? ☀️"},
    ]
    fast = await ask(client, server.base_url, messages)
    sdk = await ask("openai", server.base_url, messages)

    assert comparable(fast) == comparable(sdk)
    assert fast.text == expected_answer(messages, MODEL)
    assert fast.finish_reason == "stop"
    assert fast.model == MODEL
    assert fast.prompt_tokens is not None and fast.prompt_tokens > 0
    assert fast.completion_tokens is not None and fast.completion_tokens > 0
    # Plain dict, lowercase keys: what a rate limiter reads.
    assert isinstance(fast.headers, dict)
    # Streamed by default, by both.
    assert fast.headers["content-type"].startswith("text/event-stream")
    assert sdk.headers["content-type"] == fast.headers["content-type"]
    assert fast.streamed and sdk.streamed


async def test_request_params_are_sent_by_both(server: Simulator) -> None:
    results = [
        await ask(kind, server.base_url, user("a long enough question"), max_tokens=2)
        for kind in KINDS
    ]
    assert len({comparable(result) for result in results}) == 1
    assert results[0].finish_reason == "length"
    assert results[0].completion_tokens == 2


@pytest.mark.parametrize("client", FAST)
async def test_the_sdk_over_its_aiohttp_client_gives_the_same_completion(
    server: Simulator,
    client: str,
) -> None:
    transport = OpenAITransport(model_config(server.base_url), KEY, http_client="aiohttp")
    try:
        completion = await transport.complete(user("hi"))
    finally:
        await transport.aclose()
    assert comparable(completion) == comparable(await ask(client, server.base_url, user("hi")))


async def test_base_url_from_the_environment_with_a_trailing_slash(
    server: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url + "/")
    for kind in KINDS:
        assert (await ask(kind, None, user("hi"))).text == expected_answer(user("hi"), MODEL)


@pytest.mark.parametrize("transport_class", [H11Transport, AiohttpTransport])
def test_base_url_defaults_to_openai_like_the_sdk(
    monkeypatch: pytest.MonkeyPatch, transport_class: type[H11Transport | AiohttpTransport]
) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    transport = transport_class(model_config(None), KEY)
    assert transport.url == f"{DEFAULT_BASE_URL}/chat/completions"
    assert transport_class(model_config("http://h:1/v1/"), KEY).url == (
        "http://h:1/v1/chat/completions"
    )


# -- failures: enrich's own errors, from both transports --------------------


def failure_facts(exc: Exception) -> tuple[Any, ...]:
    """What callers may look at, as comparable values."""
    facts: tuple[Any, ...] = (type(exc), str(exc))
    if isinstance(exc, APIStatus):
        facts += (exc.status_code, exc.body, exc.code, exc.param, exc.type, exc.message)
    return facts


def classified(exc: Exception) -> Failure:
    return classify(exc, model=MODEL)


async def both_fail(base_url: str, messages: Messages, **settings: Any) -> list[Exception]:
    """The failure from every transport, the SDK's last: all alike."""
    failures = [await failure(kind, base_url, messages, **settings) for kind in (*FAST, "openai")]
    sdk = failures[-1]
    for fast in failures[:-1]:
        assert failure_facts(fast) == failure_facts(sdk)
        assert classified(fast) == classified(sdk)
    return failures


@pytest.mark.parametrize(
    ("content", "status", "code", "kind"),
    [
        ("[[fault:400]] too long", 400, "context_length_exceeded", "row"),
        ("[[fault:500]]", 500, None, "retry"),
        ("[[fault:429]]", 429, "rate_limit_exceeded", "retry"),
    ],
)
async def test_status_errors_are_the_same_from_both_transports(
    server: Simulator, content: str, status: int, code: str | None, kind: str
) -> None:
    for exc in await both_fail(server.base_url, user(content)):
        assert type(exc) is APIStatus
        assert exc.status_code == status
        assert exc.code == code
        assert classified(exc).kind == kind


async def test_rate_limit_headers_reach_the_caller(server: Simulator) -> None:
    for exc in await both_fail(server.base_url, user("[[fault:429]]")):
        assert isinstance(exc, APIStatus)
        # Plain dict, lowercase keys, like Completion.headers.
        assert isinstance(exc.headers, dict)
        assert exc.headers["retry-after-ms"] == str(round(SPURIOUS_RETRY_AFTER_S * 1000))
        assert exc.headers["retry-after"] == "1"
        result = classified(exc)
        assert result.rate_limited
        assert result.retry_after == pytest.approx(SPURIOUS_RETRY_AFTER_S)


@pytest.mark.parametrize("client", FAST)
async def test_bad_key_is_an_authentication_error_without_the_key(
    server: Simulator, client: str
) -> None:
    wrong = "sk-wrong-key-987654321"
    fast = await failure(client, server.base_url, user("hi"), key=wrong)
    sdk = await failure("openai", server.base_url, user("hi"), key=wrong)
    assert failure_facts(fast) == failure_facts(sdk)
    for exc in (fast, sdk):
        assert isinstance(exc, APIStatus)
        assert exc.status_code == 401
        assert exc.code == "invalid_api_key"
        assert classified(exc).kind == "fatal"
        assert wrong not in str(exc) and wrong not in repr(exc)


async def test_unknown_model_is_not_found(server: Simulator) -> None:
    for exc in await both_fail(server.base_url, user("hi"), name="no-such-model"):
        assert isinstance(exc, APIStatus)
        assert exc.status_code == 404
        assert exc.code == "model_not_found"
        assert classified(exc).kind == "fatal"


async def test_insufficient_quota_keeps_its_code(start_server: StartServer) -> None:
    server = start_server(insufficient_quota=True)
    for exc in await both_fail(server.base_url, user("hi")):
        assert isinstance(exc, APIStatus)
        assert exc.status_code == 429
        assert exc.code == "insufficient_quota"
        assert classified(exc).kind == "fatal"


@pytest.mark.parametrize(
    ("content", "settings", "error", "status", "kind"),
    [
        ("[[fault:400]]", {}, APIStatus, 400, "row"),
        ("hi", {"key": "sk-wrong-key-987654321"}, APIStatus, 401, "fatal"),
        ("hi", {"name": "no-such-model"}, APIStatus, 404, "fatal"),
        ("[[fault:429]]", {}, APIStatus, 429, "retry"),
        ("[[fault:500]]", {}, APIStatus, 500, "retry"),
        ("[[fault:drop]]", {}, APIConnectionFailed, None, "retry"),
        ("[[fault:hang]]", {"timeout_s": 0.5}, APITimeout, None, "retry"),
        ("[[fault:malformed]]", {}, UnparseableResponse, None, "retry"),
    ],
)
async def test_the_sdk_transport_translates_every_failure_into_enrich_errors(
    start_server: StartServer,
    content: str,
    settings: dict[str, Any],
    error: type[TransportError],
    status: int | None,
    kind: str,
) -> None:
    server = start_server(api_key=KEY, models=(MODEL,), hang_s=5)
    exc = await failure("openai", server.base_url, user(content), **settings)
    assert type(exc) is error
    assert not isinstance(exc, openai.OpenAIError)
    # Not chained: the SDK's exception (its request, its message) stays behind.
    assert exc.__cause__ is None and exc.__suppress_context__
    if status is not None:
        assert isinstance(exc, APIStatus) and exc.status_code == status
    assert classified(exc).kind == kind


@pytest.mark.parametrize("kind", KINDS)
async def test_dropped_connection_is_a_connection_error(server: Simulator, kind: str) -> None:
    exc = await failure(kind, server.base_url, user("[[fault:drop]]"))
    assert type(exc) is APIConnectionFailed
    assert classified(exc) == Failure("retry", "connection error")


@pytest.mark.parametrize("kind", KINDS)
async def test_refused_connection_is_a_connection_error(kind: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there any more.
    exc = await failure(kind, f"http://127.0.0.1:{port}/v1", user("hi"))
    assert type(exc) is APIConnectionFailed
    assert KEY not in str(exc)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
async def test_hang_times_out(start_server: StartServer, kind: str) -> None:
    server = start_server(hang_s=5)
    exc = await failure(kind, server.base_url, user("[[fault:hang]]"), timeout_s=0.5)
    assert type(exc) is APITimeout
    assert classified(exc) == Failure("retry", "request timed out", timed_out=True)


@pytest.mark.parametrize("kind", KINDS)
async def test_malformed_body_is_unparseable(server: Simulator, kind: str) -> None:
    exc = await failure(kind, server.base_url, user("[[fault:malformed]]"))
    assert isinstance(exc, UnparseableResponse)
    assert classified(exc).kind == "retry"


@pytest.mark.parametrize("client", FAST)
async def test_a_fault_that_clears_then_succeeds(server: Simulator, client: str) -> None:
    content = "[[fault:500:1]] once"
    transport = make_transport(model_config(server.base_url), KEY, client)
    try:
        with pytest.raises(APIStatus) as caught:
            await transport.complete(user(content))
        assert caught.value.status_code == 500
        # The same session goes on after an error answer.
        assert (await transport.complete(user(content))).text == expected_answer(
            user(content), MODEL
        )
    finally:
        await transport.aclose()


# -- streaming: a stuck request is cut in seconds, a long answer is not -----


@pytest.mark.parametrize("kind", KINDS)
async def test_a_streamed_answer_equals_the_plain_one(server: Simulator, kind: str) -> None:
    messages: Messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Qu'est-ce que l'été ? ☀️ " * 20},
    ]
    streamed = await ask(kind, server.base_url, messages)
    plain = await ask(kind, server.base_url, messages, stream=False)
    cut = await ask(kind, server.base_url, messages, max_tokens=3)
    cut_plain = await ask(kind, server.base_url, messages, max_tokens=3, stream=False)

    assert (streamed.streamed, plain.streamed) == (True, False)
    assert comparable(streamed) == comparable(plain)
    assert streamed.text == expected_answer(messages, MODEL)
    assert comparable(cut) == comparable(cut_plain)
    assert cut.finish_reason == "length"
    assert server.stats.streamed == 2
    # The rate headers of a streamed answer reach the limiter too.
    assert streamed.headers["content-type"].startswith("text/event-stream")
    for completion in (streamed, plain):
        assert completion.silence_s is not None and completion.silence_s >= 0


@pytest.mark.parametrize("kind", KINDS)
async def test_a_hang_is_cut_after_the_stall_timeout_not_the_total_timeout(
    start_server: StartServer, kind: str
) -> None:
    server = start_server(hang_s=30)
    # A total timeout the test's own 10 s limit would not survive.
    exc = await failure(kind, server.base_url, user("[[fault:hang]]"), stall_s=0.3, timeout_s=30)

    assert isinstance(exc, StalledRequest)
    assert not exc.started
    failure_ = classified(exc)
    assert (failure_.kind, failure_.stalled) == ("retry", True)
    assert server.stats.hangs == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_that_goes_silent_midway_is_cut(
    start_server: StartServer, kind: str
) -> None:
    server = start_server(hang_s=30)
    exc = await failure(kind, server.base_url, user("[[fault:stall]]"), stall_s=0.3, timeout_s=30)

    assert isinstance(exc, StalledRequest)
    assert exc.started  # the first chunk came, then nothing


@pytest.mark.parametrize("kind", KINDS)
async def test_a_hung_row_is_cut_and_retried_by_the_call_stage(
    start_server: StartServer, kind: str
) -> None:
    server = start_server(hang_s=30)
    config = model_config(server.base_url, stall_timeout_s=0.3, timeout_s=30)
    transport = make_transport(config, KEY, kind)
    limits = LimitsConfig(concurrency=1, backoff_base_s=0.01, backoff_max_s=0.05)
    stage = CallStage(config, limits, transport)
    messages = user("[[fault:hang:1]] then fine")
    try:
        result = await stage.call(ChatRequest(0, messages))
    finally:
        await transport.aclose()

    assert (result.status, result.attempts) == ("ok", 2)
    assert result.response == expected_answer(messages, MODEL)
    assert stage.stats.stalled == 1
    assert stage.stats.requests == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
async def test_a_slowly_streaming_long_answer_is_not_cut(
    start_server: StartServer, kind: str
) -> None:
    # About 90 chunks 20 ms apart: some 2 s in all, against a stall timeout of
    # 0.5 s. Without streaming the same answer would be silent for 2 s.
    server = start_server(chunk_delay_ms=20)
    messages = user("a long question " * 20)

    completion = await ask(kind, server.base_url, messages, stall_s=0.5, timeout_s=30)

    assert completion.text == expected_answer(messages, MODEL)
    assert completion.streamed
    assert completion.silence_s is not None and completion.silence_s < 0.5
    assert await server_count(lambda: server.stats.answered, 1) == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_a_server_that_cannot_stream_gets_plain_requests_for_the_rest_of_the_run(
    start_server: StartServer, kind: str
) -> None:
    server = start_server(streaming=False)
    transport = make_transport(model_config(server.base_url), KEY, kind)
    try:
        first = await transport.complete(user("one"), stall_s=5.0)
        requests_for_first = server.stats.requests
        second = await transport.complete(user("two"), stall_s=5.0)
    finally:
        await transport.aclose()

    assert first.text == expected_answer(user("one"), MODEL)
    assert second.text == expected_answer(user("two"), MODEL)
    assert not first.streamed and not second.streamed
    assert requests_for_first == 2  # the refused streaming request, then the plain one
    assert server.stats.requests == 3  # no second try at streaming
    assert getattr(transport, "streaming", None) is False
    assert "400" in str(getattr(transport, "stream_fallback", ""))


@pytest.mark.parametrize("kind", KINDS)
async def test_fault_directives_work_when_streaming(server: Simulator, kind: str) -> None:
    url = server.base_url
    for content, error, status in (
        ("[[fault:500]]", APIStatus, 500),
        ("[[fault:429]]", APIStatus, 429),
        ("[[fault:400]]", APIStatus, 400),
        ("[[fault:drop]]", APIConnectionFailed, None),  # dropped mid-stream
        ("[[fault:malformed]]", UnparseableResponse, None),  # a chunk cut short
    ):
        exc = await failure(kind, url, user(content))
        assert type(exc) is error, content
        if status is not None:
            assert isinstance(exc, APIStatus) and exc.status_code == status, content
        assert classified(exc).kind == ("row" if status == 400 else "retry")
    bad = await ask(kind, url, user("[[fault:badjson:1]] x"))
    good = await ask(kind, url, user("[[fault:badjson:1]] x"))
    assert (bad.text, bad.streamed) == (BAD_JSON, True)
    assert good.text == expected_answer(user("[[fault:badjson:1]] x"), MODEL)
    assert await server_count(lambda: server.stats.streamed, 2) == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_structured_output_works_when_streaming(server: Simulator, kind: str) -> None:
    schema = load_schema(
        '{"type": "object", "properties": {"label": {"enum": ["a", "b"]}, '
        '"score": {"type": "integer"}}, "required": ["label", "score"]}'
    )
    fmt = response_format(schema, "row")
    messages = user("rate this")

    completion = await ask(kind, server.base_url, messages, extra_params={"response_format": fmt})

    assert completion.streamed
    assert completion.text is not None
    assert json.loads(completion.text) == expected_structured_answer(messages, MODEL, schema)


# -- a hand-written server for what the simulator never does --------------

EchoServer = Callable[[Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[str]]


@pytest.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    """Serve one handler for ``/v1/chat/completions``; yields a starter that
    returns the base URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()


def chat_body(content: str) -> dict[str, Any]:
    return {
        "model": MODEL,
        "choices": [
            {"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }


@pytest.mark.parametrize("client", FAST)
async def test_sends_the_headers_servers_look_at(
    echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        seen["headers"] = dict(request.headers)
        seen["body"] = await request.json()
        return web.json_response(chat_body("ok"), headers={"X-RateLimit-Remaining-Requests": "9"})

    monkeypatch.setenv("OPENAI_ORG_ID", "org-1")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-1")
    base_url = await echo_server(handler)
    completion = await ask(client, base_url, user("hi"), temperature=0, seed=7)

    assert completion.headers["x-ratelimit-remaining-requests"] == "9"
    headers = seen["headers"]
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert headers["Content-Type"] == "application/json"
    assert headers["Accept"] == "application/json"
    assert headers["User-Agent"] == USER_AGENT
    assert headers["OpenAI-Organization"] == "org-1"
    assert headers["OpenAI-Project"] == "proj-1"
    assert seen["body"] == {
        "model": MODEL,
        "messages": user("hi"),
        "temperature": 0,
        "seed": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize(
    "body",
    [
        {"object": "list", "data": []},
        {"choices": []},
        {"choices": [{"finish_reason": "stop"}]},
        {"choices": [{"message": {"content": ["not", "text"]}}]},
        ["not", "an", "object"],
    ],
)
@pytest.mark.parametrize("client", FAST)
async def test_a_200_that_is_not_a_chat_completion_is_unparseable(
    echo_server: EchoServer, body: Any, client: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(body)

    exc = await failure(client, await echo_server(handler), user("hi"))
    assert isinstance(exc, UnparseableResponse)
    assert classified(exc).kind == "retry"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_server_that_echoes_the_key_does_not_leak_it(
    echo_server: EchoServer, kind: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        message = f"model not found for {request.headers['Authorization']}"
        return web.json_response({"error": {"message": message, "code": "nope"}}, status=404)

    exc = await failure(kind, await echo_server(handler), user("hi"))
    assert isinstance(exc, APIStatus)
    assert exc.status_code == 404
    assert exc.code == "nope"
    result = classified(exc)
    for text in (str(exc), repr(exc), repr(exc.body), exc.message, result.reason):
        assert KEY not in text
        assert "[redacted]" in text


def sse(*chunks: Any, done: bool = True) -> bytes:
    events = [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks]
    return b"".join(events) + (b"data: [DONE]\n\n" if done else b"")


def delta_chunk(content: str | None, finish_reason: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


USAGE_CHUNK: Final = {"model": MODEL, "choices": [], "usage": chat_body("")["usage"]}


async def stream_response(request: web.Request, body: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(body)
    await response.write_eof()
    return response


@pytest.mark.parametrize("kind", KINDS)
async def test_a_server_that_rejects_stream_options_gets_plain_requests(
    echo_server: EchoServer, kind: str
) -> None:
    bodies: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        bodies.append(body)
        if "stream_options" in body:
            error = {
                "message": "Unrecognized request argument supplied: stream_options",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
            return web.json_response({"error": error}, status=400)
        return web.json_response(chat_body("plain"))

    completion = await ask(kind, await echo_server(handler), user("hi"), stall_s=5.0)

    assert (completion.text, completion.streamed) == ("plain", False)
    assert [("stream" in body) for body in bodies] == [True, False]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_server_that_ignores_stream_is_read_as_a_plain_answer(
    echo_server: EchoServer, kind: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(chat_body("whole"))

    base_url = await echo_server(handler)
    transport = make_transport(model_config(base_url), KEY, kind)
    try:
        completion = await transport.complete(user("hi"), stall_s=5.0)
    finally:
        await transport.aclose()

    assert (completion.text, completion.streamed) == ("whole", False)
    assert getattr(transport, "streaming", None) is False


@pytest.mark.parametrize("kind", KINDS)
async def test_a_server_that_streams_without_usage_gets_plain_requests_after(
    echo_server: EchoServer, kind: str
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if (await request.json()).get("stream"):
            return await stream_response(
                request, sse(delta_chunk("str"), delta_chunk("eamed", "stop"))
            )
        return web.json_response(chat_body("plain"))

    base_url = await echo_server(handler)
    transport = make_transport(model_config(base_url), KEY, kind)
    try:
        first = await transport.complete(user("hi"))
        second = await transport.complete(user("hi"))
    finally:
        await transport.aclose()

    # The answer is kept (its tokens unknown); later ones carry their usage.
    assert (first.text, first.prompt_tokens, first.streamed) == ("streamed", None, True)
    assert (second.text, second.prompt_tokens, second.streamed) == ("plain", 1, False)


@pytest.mark.parametrize("kind", KINDS)
async def test_an_error_event_inside_a_stream_is_transient_and_keeps_the_key_out(
    echo_server: EchoServer, kind: str
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        error = {"error": {"message": f"overloaded for {request.headers['Authorization']}"}}
        return await stream_response(request, sse(delta_chunk("par"), error))

    exc = await failure(kind, await echo_server(handler), user("hi"))

    assert isinstance(exc, UnparseableResponse)
    assert "the stream carried an error: overloaded" in str(exc)
    assert KEY not in str(exc)
    assert classified(exc).kind == "retry"


def test_a_400_names_streaming_only_in_so_many_words() -> None:
    assert rejects_streaming(400, b'{"error": {"param": "stream_options"}}')
    assert rejects_streaming(422, b"streaming is not supported for this model")
    assert rejects_streaming(400, b"The simulator does not support stream=true.")
    assert not rejects_streaming(400, b"the upstream model rejected the prompt")
    assert not rejects_streaming(500, b"stream broke")


def assembled(body: bytes, cuts: int = 1) -> Completion:
    assembler = StreamAssembler()
    step = max(1, len(body) // cuts)
    for start in range(0, len(body), step):
        assembler.feed(body[start : start + step])
    return assembler.completion({})


def test_a_stream_cut_anywhere_assembles_to_the_same_answer() -> None:
    body = sse(
        {"model": MODEL, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        delta_chunk("l'été "),
        delta_chunk("☀️"),
        delta_chunk(None, "stop"),
        USAGE_CHUNK,
    )
    whole = assembled(body)
    assert whole == Completion("l'été ☀️", "stop", MODEL, 1, 1, {}, streamed=True)
    for cuts in (2, 3, 7, len(body)):  # down to one byte at a time
        assert assembled(body, cuts) == whole
    crlf = body.replace(b"\n", b"\r\n")
    assert assembled(b": keep-alive\r\n\r\n" + crlf, 5) == whole
    # An event whose data spans two lines (joined by a newline: still JSON).
    multiline = body.replace(b'"model": ', b'"model":\ndata: ', 1)
    assert multiline != body
    assert assembled(multiline, 3) == whole


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (sse(delta_chunk("cut off"), done=False), "ended before"),
        (sse(done=True), "no answer"),
        (b'data: {"choices": [{"delta": \n\n', "unparseable stream chunk"),
        (sse({"choices": "nope"}), "not a list"),
        (sse({"choices": [{"index": 0, "delta": {"content": 3}}]}), "not a string"),
    ],
)
def test_a_broken_stream_is_unparseable(body: bytes, problem: str) -> None:
    with pytest.raises(UnparseableResponse, match=problem):
        assembled(body)


# What an error body may be: OpenAI's shape, another JSON shape, text, nothing.
ERROR_BODIES: dict[str, tuple[bytes, dict[str, Any]]] = {
    "openai": (
        b'{"error": {"message": "nope", "type": "t", "param": "p", "code": "c"}}',
        {
            "body": {"message": "nope", "type": "t", "param": "p", "code": "c"},
            "code": "c",
            "type": "t",
            "param": "p",
            "message": "nope",
        },
    ),
    "other json": (
        b'{"detail": "not an OpenAI error object", "code": 7}',
        {
            "body": {"detail": "not an OpenAI error object", "code": 7},
            "code": "7",
            "type": None,
            "message": "",
        },
    ),
    "html": (b"<html>Bad Gateway</html>", {"body": "<html>Bad Gateway</html>", "code": None}),
    "empty": (b"", {"body": "", "code": None, "message": ""}),
}


@pytest.mark.slow
@pytest.mark.parametrize("status", [400, 401, 403, 404, 408, 409, 418, 422, 429, 500, 503])
@pytest.mark.parametrize("body_kind", list(ERROR_BODIES))
async def test_every_status_and_body_reads_the_same_from_both_transports(
    echo_server: EchoServer, status: int, body_kind: str
) -> None:
    body, expected = ERROR_BODIES[body_kind]

    async def handler(request: web.Request) -> web.Response:
        headers = {"Retry-After": "2", "X-Request-ID": "req-1", "Content-Type": "application/json"}
        return web.Response(status=status, body=body, headers=headers)

    failures = await both_fail(await echo_server(handler), user("hi"))
    for exc in failures:
        assert type(exc) is APIStatus
        assert exc.status_code == status
        for name, value in expected.items():
            assert getattr(exc, name) == value, name
        assert exc.request_id == "req-1"
        assert exc.headers["retry-after"] == "2"
        message = expected.get("message")
        assert str(exc) == f"Error code: {status}" + (f" - {message}" if message else "")
    expected_kind = {401: "fatal", 403: "fatal", 404: "fatal", 418: "row", 400: "row"}
    kind = "retry" if status in (408, 409, 429) or status >= 500 else expected_kind.get(status)
    assert classified(failures[0]).kind == (kind or "row")


# -- proxies from the environment ----------------------------------------------


def clear_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


PROXY_USER_SECRET = "Basic dXNlcjpzZWNyZXQ="  # user:secret


@pytest.mark.parametrize("client", FAST)
async def test_requests_go_through_the_proxy_the_environment_names(
    echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    seen: dict[str, Any] = {}

    async def proxy(request: web.Request) -> web.Response:
        # A forward proxy sees the absolute URL, its own credentials, and the
        # request it forwards.
        seen["url"] = str(request.url)
        seen["headers"] = dict(request.headers)
        return web.json_response(chat_body("via the proxy"))

    proxy_url = (await echo_server(proxy)).removesuffix("/v1")
    clear_proxies(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", proxy_url.replace("http://", "http://user:secret@"))
    completion = await ask(client, "http://api.example.invalid/v1", user("hi"))
    assert completion.text == "via the proxy"
    assert seen["url"] == "http://api.example.invalid/v1/chat/completions"
    assert seen["headers"]["Proxy-Authorization"] == PROXY_USER_SECRET
    assert seen["headers"]["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("client", FAST)
async def test_the_key_never_reaches_the_proxy_of_an_https_api(
    monkeypatch: pytest.MonkeyPatch,
    client: str,
) -> None:
    heads: list[bytes] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # What a proxy sees of an https:// request: the CONNECT, never the request.
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clear_proxies(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", f"http://user:secret@127.0.0.1:{port}")
    try:
        exc = await failure(client, "https://api.example.invalid/v1", user("hi"))
    finally:
        server.close()
        await server.wait_closed()
    assert type(exc) is APIConnectionFailed
    head = heads[0].decode("latin-1")
    assert head.startswith("CONNECT api.example.invalid:443 ")
    assert f"Proxy-Authorization: {PROXY_USER_SECRET}\r\n" in head
    assert KEY not in head


@pytest.mark.parametrize("client", FAST)
async def test_no_proxy_sends_directly(
    echo_server: EchoServer, monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    async def direct(request: web.Request) -> web.Response:
        return web.json_response(chat_body("direct"))

    base_url = await echo_server(direct)
    clear_proxies(monkeypatch)
    # A proxy that is not there: going through it would fail.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert (await ask(client, base_url, user("hi"))).text == "direct"
    monkeypatch.delenv("NO_PROXY")
    exc = await failure(client, base_url, user("hi"))
    assert type(exc) is APIConnectionFailed


# -- TLS trust -------------------------------------------------------------------


@pytest.fixture
async def tls_base_url(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """An https echo server with a self-signed certificate: (base URL, its cert)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    argv += ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [*argv, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(chat_body("over tls"))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    yield f"https://127.0.0.1:{runner.addresses[0][1]}/v1", cert
    await runner.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
@pytest.mark.parametrize("client", FAST)
async def test_tls_trusts_what_the_environment_names_and_nothing_else(
    tls_base_url: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, variable: str, client: str
) -> None:
    base_url, cert = tls_base_url
    clear_proxies(monkeypatch)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    # The system store does not know a self-signed certificate.
    exc = await failure(client, base_url, user("hi"))
    assert type(exc) is APIConnectionFailed
    assert "certificate" in str(exc).lower()
    if variable == "SSL_CERT_DIR":
        # A CA directory holds certificates under their subject hash.
        digest = subprocess.run(
            ["openssl", "x509", "-hash", "-noout", "-in", str(cert)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        shutil.copy(cert, cert.parent / f"{digest}.0")
        monkeypatch.setenv(variable, str(cert.parent))
    else:
        monkeypatch.setenv(variable, str(cert))
    assert (await ask(client, base_url, user("hi"))).text == "over tls"


async def tunnelling_proxy(heads: list[bytes]) -> asyncio.Server:
    """A forward proxy that answers CONNECT with a tunnel (and notes each
    CONNECT it is sent): what an https:// API behind a company proxy needs."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        host, _, port = head.split(b" ")[1].decode().rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    return await asyncio.start_server(tunnel, "127.0.0.1", 0)


@pytest.mark.slow
@pytest.mark.parametrize("client", FAST)
async def test_an_https_api_behind_a_proxy_is_reached_through_its_tunnel(
    tls_base_url: tuple[str, Path], monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    base_url, cert = tls_base_url
    heads: list[bytes] = []
    proxy = await tunnelling_proxy(heads)
    clear_proxies(monkeypatch)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}")
    try:
        completion = await ask(client, base_url, user("hi"))
    finally:
        proxy.close()
    assert completion.text == "over tls"
    # The proxy saw the CONNECT (the host and port), never the request or the key.
    authority = base_url.removeprefix("https://").removesuffix("/v1")
    assert heads[0].startswith(f"CONNECT {authority} ".encode())
    assert KEY.encode() not in b"".join(heads)


# -- pure parts --------------------------------------------------------------


def test_a_bare_sdk_api_error_is_a_transient_failure_without_the_key() -> None:
    # What the SDK raises for an error event inside a stream: not a bug.
    raw = openai.APIError(f"overloaded for Bearer {KEY}", cast(Any, None), body=None)
    exc = sdk_error(raw, [KEY])
    assert isinstance(exc, UnparseableResponse)
    assert "the stream carried an error: overloaded" in str(exc)
    assert KEY not in str(exc)
    assert classified(exc).kind == "retry"


def test_a_stall_is_a_transport_error_classified_as_a_stall() -> None:
    exc = StalledRequest(3.0, started=False)
    assert isinstance(exc, TransportError)
    failure_ = classified(exc)
    assert (failure_.kind, failure_.stalled) == ("retry", True)


def test_parse_completion_tolerates_missing_extras() -> None:
    parsed = parse_completion(b'{"choices": [{"message": {"content": null}}]}', {})
    assert parsed == Completion(None, None, None, None, None, {})
    with pytest.raises(UnparseableResponse):
        parse_completion(b"\xff\xfe not utf-8", {})
    odd = {"model": 3, "usage": {"prompt_tokens": "7", "completion_tokens": True}}
    body = json.dumps({**chat_body("x"), **odd}).encode()
    assert parse_completion(body, {}) == Completion("x", "stop", None, None, None, {})


# -- construction and lifecycle ---------------------------------------------


@pytest.mark.parametrize("transport_class", [H11Transport, AiohttpTransport])
@pytest.mark.parametrize(
    "base_url", ["localhost:8000/v1", "ftp://h/v1", "http://[::1/v1", "http://h:port/v1"]
)
def test_a_base_url_that_is_not_http_is_a_config_error(
    base_url: str,
    monkeypatch: pytest.MonkeyPatch,
    transport_class: type[H11Transport | AiohttpTransport],
) -> None:
    # One given in the config is refused when the config is built (see
    # test_config); one from the environment when it is first resolved.
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        transport_class(model_config(None), KEY)


def test_make_transport_kinds() -> None:
    config = model_config("http://h/v1")
    assert TRANSPORT_KINDS == KINDS
    assert isinstance(make_transport(config, KEY), H11Transport)
    assert isinstance(make_transport(config, KEY, "aiohttp"), AiohttpTransport)
    assert isinstance(make_transport(config, KEY, "openai"), OpenAITransport)
    with pytest.raises(ConfigError, match="unknown transport 'curl'"):
        make_transport(config, KEY, "curl")


async def test_reprs_never_show_the_key() -> None:
    config = model_config("http://h/v1")
    transports: list[Transport] = [make_transport(config, KEY, kind) for kind in KINDS]
    for transport in transports:
        assert KEY not in repr(transport)
        await transport.aclose()


@pytest.mark.parametrize("client", FAST)
async def test_aclose_is_idempotent_and_final(server: Simulator, client: str) -> None:
    transport = make_transport(model_config(server.base_url), KEY, client)
    await transport.complete(user("hi"))
    await transport.aclose()
    await transport.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await transport.complete(user("hi"))
