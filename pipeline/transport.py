"""How a request is sent: transports that turn a list of messages into a
``Completion`` or raise enrich's own transport errors
(``pipeline.transport_errors``), so the call stage classifies failures the
same way whichever transport is used, and whatever version of the SDK or of
aiohttp is installed.

Three transports:

``H11Transport`` (kind ``"h11"``, the default; ``pipeline.transport_h11``)
    HTTP/1.1 on asyncio streams with ``h11``: what ``AiohttpTransport`` does,
    without aiohttp's 0.3 s of imports before a run's first request.

``AiohttpTransport`` (kind ``"aiohttp"``)
    One ``aiohttp.ClientSession`` POSTing JSON to ``{base_url}/chat/completions``
    and reading only the fields a ``Completion`` needs. On a fast local server
    (vLLM, llama.cpp) the client's CPU is the bottleneck; this path costs a
    fraction of the SDK's per request. Failures are raised as enrich's
    transport errors directly (status code, error body, real response headers).

``OpenAITransport`` (kind ``"openai"``)
    The official ``openai`` client: the reference behaviour, and where
    SDK-only features belong (``openai.AsyncAzureOpenAI`` for Azure's classic
    deployment URLs, which want an ``api-key`` header and an ``api-version``
    query; workload identity...). Neither transport does those today; Azure's
    OpenAI-compatible ``/openai/v1`` endpoint works with both. The SDK's
    exceptions are translated into enrich's in one place, ``sdk_error``.

Both stream answers (``"stream": true`` with ``stream_options.include_usage``)
and assemble the same ``Completion`` from the chunks, so that a request that
is producing nothing can be told from one slowly producing a long answer:
``complete(..., stall_s=S)`` cuts a request that goes ``S`` seconds without
bytes (``pipeline.stall.StalledRequest``), while ``model.timeout_s`` bounds
the request as a whole. A server that will not stream (a 400 naming
``stream``/``stream_options``, a plain JSON body to a streaming request, or
streamed answers without their usage) gets the same request again without
streaming, and so does every later request of the run (``streaming`` turns
False, ``stream_fallback`` says why); ``model.stream = false`` never streams.
A server that cuts a stream short (no finish reason) stops streaming too,
for the next attempts: that answer is a ``TruncatedStream``, retried.

No client is imported with this module: each transport imports its own
when it is built, so ``enrich run`` on the default transport loads neither
aiohttp nor the SDK, and a module that only needs ``Completion`` loads none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, get_args

from pipeline.errors import ConfigError
from pipeline.redact import redact, redact_bytes
from pipeline.stall import StalledRequest, StallLimit, Watchdog
from pipeline.transport_errors import (
    APIConnectionFailed,
    APIStatus,
    APITimeout,
    TransportError,
    TruncatedStream,
    UnparseableResponse,
    lowered_headers,
)
from pipeline.version import version

if TYPE_CHECKING:
    import ssl
    from urllib.parse import SplitResult

    import aiohttp
    import openai
    from yarl import URL

    from pipeline.config import ModelConfig

__all__ = [
    "TRANSPORT_KINDS",
    "APIConnectionFailed",
    "APIStatus",
    "APITimeout",
    "AiohttpTransport",
    "Completion",
    "Messages",
    "OpenAITransport",
    "StreamAssembler",
    "Transport",
    "TransportError",
    "TransportKind",
    "UnparseableResponse",
    "body_params",
    "chat_body",
    "make_transport",
    "sdk_error",
    "streamed_completion",
    "whole_completion",
]

Messages = Sequence[Mapping[str, str]]


TransportKind = Literal["h11", "aiohttp", "openai"]
TRANSPORT_KINDS: Final[tuple[str, ...]] = get_args(TransportKind)

# Built once: json.dumps with any option builds a new encoder on every call.
JSON_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_DECODER: Final = json.JSONDecoder()


# Asked of every streamed request: the answer's usage in its last chunk.
STREAM_PARAMS: Final[Mapping[str, Any]] = {
    "stream": True,
    "stream_options": {"include_usage": True},
}
# A 400/422 that names these is a server that will not stream ("upstream" is
# not one of them).
_STREAM_WORD: Final = re.compile(rb"\bstream(?:_options|ing)?\b", re.IGNORECASE)
EVENT_STREAM: Final = "text/event-stream"
# Why streaming stops when a server cuts a stream short: its next answers are
# whole (llama-cpp-python interrupts streams only).
CUT_SHORT: Final = (
    "the server cut a streamed answer short, without its finish reason "
    "(llama-cpp-python's server does when another request comes: its --interrupt_requests)"
)


def body_params(
    model: ModelConfig, extra_params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The parameters every chat request of a run carries besides its model
    and messages: the sampling settings and ``extra_params`` (e.g.
    ``response_format``). Both transports and the batch route send these."""
    return {**model.request_params(), **(extra_params or {})}


def chat_body(model: str, messages: Messages, params: Mapping[str, Any]) -> dict[str, Any]:
    """A chat completion request's JSON body, not streamed: what the online
    route POSTs and what a batch file's request line holds, one builder for
    both so the two routes ask the same question."""
    return {"model": model, "messages": messages, **params}


def _user_agent() -> str:
    return f"enrich/{version()}"


USER_AGENT: Final = _user_agent()


@dataclass(frozen=True, slots=True)
class Completion:
    """A successful answer, independent of the transport that fetched it."""

    text: str | None
    finish_reason: str | None
    model: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    headers: Mapping[str, str] = field(default_factory=dict)
    # The longest the request went without bytes from the server (its time
    # to first byte, or a gap between chunks), for the stall timeout to
    # learn from; and whether the answer was streamed.
    silence_s: float | None = None
    streamed: bool = False
    # Seconds to the response's first bytes (its headers; with streaming, the
    # first token at the latest), and the server's own time for the answer
    # where it says it (llama.cpp's ``timings``): the rest is waiting.
    first_byte_s: float | None = None
    server_s: float | None = None
    # Streamed answers: seconds from sending to the first content, and from
    # the first content to the last, as the client saw them arrive. The
    # server's own generation time where it says it (``predicted_ms``).
    first_token_s: float | None = None
    token_span_s: float | None = None
    server_generation_s: float | None = None

    @property
    def generation_s(self) -> float | None:
        """The model's time producing the answer: the server's own figure
        where it says it, else the span over which a stream's content came."""
        if self.server_generation_s is not None:
            return self.server_generation_s
        return self.token_span_s

    def with_timings(self, timings: object, metrics: object = None) -> Completion:
        """This answer with the server's own times from llama.cpp's
        ``timings`` object or vLLM's ``metrics``, if either is one. vLLM also
        says how long the request waited in its queue: an answer not
        streamed then gets a time to its first token, the server's."""
        parsed = llama_timings(timings)
        if parsed is not None:
            prompt_s, predicted_s = parsed
            return dataclasses.replace(
                self, server_s=prompt_s + predicted_s, server_generation_s=predicted_s
            )
        vllm = vllm_metrics(metrics)
        if vllm is None:
            return self
        prefill_s, decode_s, queue_s = vllm
        first_token_s = self.first_token_s
        if first_token_s is None and queue_s is not None:
            first_token_s = queue_s + prefill_s
        return dataclasses.replace(
            self,
            server_s=prefill_s + decode_s,
            server_generation_s=decode_s,
            first_token_s=first_token_s,
        )


class StreamTrial:
    """Whether a request streams while the server's streaming is untried.

    Until one streamed answer has come whole with its usage, one request at
    a time streams and the others go whole: a server that cannot stream as
    enrich needs (no usage in its streams; llama-cpp-python's, which cuts a
    stream short when another request comes) shows it on that one request,
    not on a burst of them, each computed in part and sent again."""

    __slots__ = ("out", "proven")

    def __init__(self) -> None:
        self.out = False
        self.proven = False

    def take(self, streaming: bool) -> tuple[bool, bool]:
        """(whether this request streams, whether it is the trial)."""
        if not streaming or self.proven:
            return streaming, False
        if self.out:
            return False, False
        self.out = True
        return True, True

    def end(self, completion: Completion | None) -> None:
        """The trial's answer (None: it failed; the next request tries)."""
        self.out = False
        if completion is not None and completion.streamed and completion.prompt_tokens is not None:
            self.proven = True

    async def send(
        self, streaming: bool, send: Callable[[bool], Awaitable[Completion]]
    ) -> Completion:
        """``send(stream)``, streaming or not as the trial decides."""
        stream, trying = self.take(streaming)
        if not trying:
            return await send(stream)
        completion = None
        try:
            completion = await send(stream)
            return completion
        finally:
            self.end(completion)


class Transport(Protocol):
    """Sends one chat request. Raises ``TransportError`` subclasses on
    failure, so every transport shares one error classification, among them
    ``pipeline.stall.StalledRequest`` when no bytes came for ``stall_s``
    seconds (a number, or a function giving the current number; None: only
    the total timeout applies)."""

    async def complete(self, messages: Messages, *, stall_s: StallLimit = None) -> Completion: ...

    async def aclose(self) -> None: ...


def rejects_streaming(status: int, body: bytes) -> bool:
    """A 400/422 whose body names ``stream``, ``stream_options`` or
    streaming: the server does not stream, or not with usage."""
    return status in (400, 422) and _STREAM_WORD.search(body) is not None


def stalled_error(watch: Watchdog) -> StalledRequest:
    return StalledRequest(watch.cut_after or watch.silence(), started=watch.beats > 0)


def resolve_base_url(model: ModelConfig) -> str:
    """The base URL the SDK would use: config, then $OPENAI_BASE_URL, then
    OpenAI's, without a trailing slash."""
    return model.endpoint().rstrip("/")


# ---------------------------------------------------------------------------
# The official SDK.


class OpenAITransport:
    """The official ``openai`` client, with its own retries switched off so
    attempts do not multiply with ours.

    ``http_client="aiohttp"`` swaps the SDK's default HTTP stack for its
    ``openai.DefaultAioHttpClient``: about 1.5-2x less CPU a request, but
    that adapter reports refused and dropped connections as
    ``APITimeoutError`` (it maps every aiohttp connection error to a connect
    timeout), so it is an opt-in, not the default. ``AiohttpTransport`` is
    both faster and exact.
    """

    def __init__(
        self,
        model: ModelConfig,
        api_key: str,
        *,
        http_client: Literal["httpx", "aiohttp"] = "httpx",
        extra_params: Mapping[str, Any] | None = None,
    ) -> None:
        # Imported here, not with the module: the SDK costs about a second of
        # imports, and only this transport uses it.
        import openai

        self._model = model.name
        self._params = body_params(model, extra_params)
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=model.resolved_base_url(),
            timeout=model.timeout_s,
            max_retries=0,
            http_client=openai.DefaultAioHttpClient() if http_client == "aiohttp" else None,
        )
        self._secrets = (api_key,)
        # The SDK's timeout applies to each phase (connect, each read...);
        # this bounds the request as a whole, like AiohttpTransport.
        self._total_s = model.timeout_s
        self.streaming = model.stream
        self._trial = StreamTrial()
        self.stream_fallback: str | None = None

    def __repr__(self) -> str:
        return f"OpenAITransport(base_url={str(self._client.base_url)!r}, model={self._model!r})"

    def _stop_streaming(self, reason: str) -> None:
        self.streaming = False
        if self.stream_fallback is None:
            self.stream_fallback = reason

    async def complete(self, messages: Messages, *, stall_s: StallLimit = None) -> Completion:
        return await self._trial.send(
            self.streaming, functools.partial(self._complete, messages, stall_s)
        )

    async def _complete(
        self, messages: Messages, stall_s: StallLimit, streaming: bool
    ) -> Completion:
        watch: Watchdog | None = None
        try:
            async with asyncio.timeout(None) as scope:
                watch = Watchdog(scope, stall_s, self._total_s)
                try:
                    if streaming:
                        return await self._streamed(messages, watch)
                    return await self._whole(messages, watch)
                finally:
                    watch.close()
        except TimeoutError:
            if watch is not None and watch.expired == "stall":
                raise stalled_error(watch) from None
            raise APITimeout("request timed out") from None
        except _StreamingRejected:
            self._stop_streaming("the server rejects streaming requests (400 naming stream)")
            return await self.complete(messages, stall_s=stall_s)

    async def _create(self, messages: Messages, *, stream: bool) -> Any:
        # Already loaded by __init__ (and by the SDK): a dictionary lookup.
        import openai

        params = {**self._params, **STREAM_PARAMS} if stream else self._params
        try:
            return await self._client.chat.completions.with_raw_response.create(
                model=self._model,
                messages=messages,  # type: ignore[arg-type]
                **params,
            )
        except openai.OpenAIError as exc:
            if (
                stream
                and isinstance(exc, openai.APIStatusError)
                and rejects_streaming(exc.status_code, _sdk_body(exc))
            ):
                raise _StreamingRejected from None
            raise self._translated(exc) from None

    def _translated(self, exc: openai.OpenAIError) -> BaseException:
        """``sdk_error`` of ``exc``, or ``exc`` itself when it is not about
        the request (a bug, raised as it is). Raise it ``from None``: the
        SDK's exception carries the request, and a server that echoes the
        key puts it in the SDK's message."""
        translated = sdk_error(exc, self._secrets)
        return exc if translated is None else translated

    async def _streamed(self, messages: Messages, watch: Watchdog) -> Completion:
        import openai
        import pydantic

        raw = await self._create(messages, stream=True)
        watch.beat()
        response = raw.http_response
        if EVENT_STREAM not in response.headers.get("content-type", ""):
            # The server ignored "stream": one JSON body, the whole answer.
            try:
                body = await response.aread()
            except Exception as exc:
                # httpx's own errors (read timeout, dropped connection), as
                # the SDK would report them.
                raise _connection_failed(exc, self._secrets) from None
            watch.beat()
            return whole_completion(body, raw.headers, watch, True, self._stop_streaming)
        chunks = raw.parse()
        assembler = StreamAssembler()
        try:
            async for chunk in chunks:
                watch.beat()
                assembler.add_sdk_chunk(chunk, watch.last)
        except openai.OpenAIError as exc:
            # Dropped, reset or timed out mid-stream, or an error event inside
            # the stream (a bare APIError: transient, see sdk_error).
            raise self._translated(exc) from None
        except (ValueError, pydantic.ValidationError) as exc:
            raise UnparseableResponse(f"unparseable stream chunk ({type(exc).__name__})") from None
        finally:
            await chunks.close()
        return streamed_completion(assembler, raw.headers, watch, self._stop_streaming)

    async def _whole(self, messages: Messages, watch: Watchdog) -> Completion:
        import openai
        import pydantic

        raw = await self._create(messages, stream=False)
        watch.beat()
        try:
            parsed = raw.parse()
            choice = parsed.choices[0]
        except (
            openai.APIResponseValidationError,
            json.JSONDecodeError,
            pydantic.ValidationError,
            IndexError,
            TypeError,
        ) as exc:
            raise UnparseableResponse(f"unparseable response body ({type(exc).__name__})") from None
        usage = parsed.usage
        return Completion(
            text=choice.message.content,
            finish_reason=choice.finish_reason,
            model=parsed.model,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            headers=raw.headers,
            silence_s=watch.longest,
            first_byte_s=watch.first_byte_s,
        ).with_timings(  # extra fields to the SDK
            getattr(parsed, "timings", None), getattr(parsed, "metrics", None)
        )

    async def aclose(self) -> None:
        await self._client.close()


def sdk_error(exc: openai.OpenAIError, secrets: Sequence[str | None] = ()) -> TransportError | None:
    """The one place the ``openai`` SDK's exceptions become enrich's, using
    only the SDK's public exception classes and attributes (the status code,
    and the response's headers and body, read as the aiohttp transport reads
    them). ``secrets``: keys to blank out of the body, for a server that
    echoes it. A bare ``APIError`` is an error event inside a streamed
    answer: transient, like the aiohttp transport's. None for an exception
    that is not about a request (a bug to surface, not a failure to
    classify)."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return APITimeout("request timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        return APIConnectionFailed(redact(f"Connection error{detail}", secrets))
    if isinstance(exc, openai.APIStatusError):
        return APIStatus.from_response(
            exc.status_code,
            redact_bytes(_sdk_body(exc), secrets),
            lowered_headers(exc.response.headers.multi_items()),
        )
    if isinstance(exc, openai.APIResponseValidationError):
        return UnparseableResponse("unparseable response body (APIResponseValidationError)")
    if isinstance(exc, openai.APIError):
        return UnparseableResponse(
            redact(f"the stream carried an error: {_shorten(exc.message)}", secrets)
        )
    return None


def _sdk_body(exc: openai.APIStatusError) -> bytes:
    """The body of an SDK status error's response (b"" if never read)."""
    try:
        return exc.response.content
    except Exception:  # a streamed body that was never read
        return b""


def _connection_failed(exc: Exception, secrets: Sequence[str | None]) -> APIConnectionFailed:
    """An error of the SDK's HTTP client outside the SDK's own handling (a
    body read after the SDK returned), as the SDK reports a connection error."""
    return APIConnectionFailed(redact(f"Connection error: {type(exc).__name__}: {exc}", secrets))


class _StreamingRejected(Exception):
    """The server answered a streaming request with a 400 naming streaming."""


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------
# Streamed answers: server-sent events of chat.completion.chunk objects.


class StreamAssembler:
    """Builds a ``Completion`` from a streamed answer: ``feed`` it the raw
    bytes of a ``text/event-stream`` body (``AiohttpTransport``), or
    ``add_sdk_chunk`` the SDK's parsed chunks (``OpenAITransport``); then
    ``completion()``. The result equals the non-streamed answer's: the text
    is the content deltas of choice 0 joined (None if none had content), the
    finish reason the last one given, the model the first one named, the
    usage that of the chunk that carries it (the last, with
    ``include_usage``).

    A chunk that is not JSON, an error event, content that is not a string,
    or a stream that ends before a finish reason (``[DONE]`` or not: a
    ``TruncatedStream``) is an ``UnparseableResponse``: transient, the
    request is worth a retry.
    """

    __slots__ = (
        "_at",
        "_choices",
        "_data",
        "_lines",
        "_parts",
        "_pending",
        "completion_tokens",
        "done",
        "finish_reason",
        "first_token_at",
        "last_token_at",
        "model",
        "prompt_tokens",
        "server_generation_s",
        "server_s",
    )

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []
        # Parse line by line: set once a CR shows up (CRLF line ends).
        self._lines = False
        self._parts: list[str] = []
        self._choices = 0
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.server_s: float | None = None
        self.server_generation_s: float | None = None
        # When the bytes being parsed came (the caller's clock), and when the
        # first and the last content did: the stream's own pace.
        self._at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.done = False

    def feed(self, data: bytes, at: float | None = None) -> None:
        """Raw bytes of the body, cut anywhere; ``at``: when they came."""
        self._at = at
        if self._pending:
            data = self._pending + data
        if self._lines or b"\r" in data:
            self._lines = True
            self._pending = self._feed_lines(data)
            return
        # The usual stream: events of one "data: " line each, a blank line
        # after each. Anything else in an event goes through the line parser.
        events = data.split(b"\n\n")
        self._pending = events.pop()
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                self._event(event[6:])
            else:
                self._feed_lines(event + b"\n\n")

    def _feed_lines(self, data: bytes) -> bytes:
        """Parse ``data`` line by line; returns what follows its last newline."""
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    self._event(b"\n".join(self._data))
                    self._data.clear()
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            # Comments (": keep-alive") and other fields (event:, id:) carry no answer.
        return rest

    def _event(self, data: bytes) -> None:
        """One event's data: the hot path of a stream, so plain type checks
        (JSON gives dicts and lists) and no work for absent fields."""
        if data == b"[DONE]":
            self.done = True
            return
        try:
            text = data.decode("utf-8")
            chunk, end = _DECODER.raw_decode(text)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise UnparseableResponse(f"unparseable stream chunk ({type(exc).__name__})") from None
        if end != len(text) and text[end:].strip():
            raise UnparseableResponse("unparseable stream chunk (extra data)")
        if type(chunk) is not dict:
            raise UnparseableResponse("a stream chunk is not a JSON object")
        error = chunk.get("error")
        if error is not None:
            message = error.get("message") if type(error) is dict else error
            raise UnparseableResponse(f"the stream carried an error: {_shorten(str(message))}")
        if self.model is None:
            model = chunk.get("model")
            if type(model) is str:
                self.model = model
        choices = chunk.get("choices")
        if choices:
            if type(choices) is not list:
                raise UnparseableResponse("a stream chunk's choices are not a list")
            choice = choices[0]
            if type(choice) is not dict or choice.get("index", 0) != 0:
                choice = next(
                    (c for c in choices if type(c) is dict and c.get("index", 0) == 0), None
                )
            if choice is not None:
                self._choices += 1
                delta = choice.get("delta")
                if type(delta) is dict:
                    content = delta.get("content")
                    if content is not None:
                        if type(content) is not str:
                            raise UnparseableResponse(
                                f"response message content is a {type(content).__name__}, "
                                "not a string"
                            )
                        self._parts.append(content)
                        if content:
                            self._content_came()
                finish_reason = choice.get("finish_reason")
                if type(finish_reason) is str:
                    self.finish_reason = finish_reason
        elif choices is not None and type(choices) is not list:
            raise UnparseableResponse("a stream chunk's choices are not a list")
        usage = chunk.get("usage")
        if usage and type(usage) is dict:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.add(None, False, None, None, prompt, completion)
        timings, metrics = chunk.get("timings"), chunk.get("metrics")
        if timings is not None or metrics is not None:
            self._timings(timings, metrics)

    def _timings(self, timings: object, metrics: object = None) -> None:
        parsed = llama_timings(timings)
        if parsed is None:
            vllm = vllm_metrics(metrics)
            parsed = None if vllm is None else vllm[:2]
        if parsed is not None:
            prompt_s, predicted_s = parsed
            self.server_s = prompt_s + predicted_s
            self.server_generation_s = predicted_s

    def _content_came(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = self._at
        self.last_token_at = self._at

    def add_sdk_chunk(self, chunk: Any, at: float | None = None) -> None:
        """One ``ChatCompletionChunk`` as the SDK parsed it (without
        validation: any attribute may be missing); ``at``: when it came."""
        self._at = at
        timings = getattr(chunk, "timings", None)
        metrics = getattr(chunk, "metrics", None)
        if timings is not None or metrics is not None:
            self._timings(timings, metrics)
        choice = None
        for candidate in getattr(chunk, "choices", None) or ():
            if getattr(candidate, "index", 0) == 0:
                choice = candidate
                break
        usage = getattr(chunk, "usage", None)
        self.add(
            getattr(chunk, "model", None),
            choice is not None,
            getattr(getattr(choice, "delta", None), "content", None),
            getattr(choice, "finish_reason", None),
            getattr(usage, "prompt_tokens", None),
            getattr(usage, "completion_tokens", None),
        )

    def add(
        self,
        model: object,
        has_choice: bool,
        content: object,
        finish_reason: object,
        prompt_tokens: object,
        completion_tokens: object,
    ) -> None:
        if self.model is None and isinstance(model, str):
            self.model = model
        if has_choice:
            self._choices += 1
        if content is not None:
            if not isinstance(content, str):
                raise UnparseableResponse(
                    f"response message content is a {type(content).__name__}, not a string"
                )
            self._parts.append(content)
            if content:
                self._content_came()
        if isinstance(finish_reason, str):
            self.finish_reason = finish_reason
        prompt = _optional_int(prompt_tokens)
        if prompt is not None:
            self.prompt_tokens = prompt
        completion = _optional_int(completion_tokens)
        if completion is not None:
            self.completion_tokens = completion

    def completion(
        self,
        headers: Mapping[str, str],
        *,
        silence_s: float | None = None,
        first_byte_s: float | None = None,
        started: float | None = None,
    ) -> Completion:
        """The answer, once the body has ended; ``started``: when the request
        was sent, on the clock of the ``at`` given with the chunks."""
        if self._pending or self._data:
            self._feed_lines(self._pending + b"\n\n")  # a last event without its blank line
            self._pending = b""
        if not self._choices:
            raise UnparseableResponse("the stream carried no answer")
        if self.finish_reason is None:
            # [DONE] without a finish reason is an answer cut short too.
            raise TruncatedStream(
                "the stream ended before the answer did (no finish reason"
                + (", then [DONE])" if self.done else ")")
            )
        return Completion(
            text="".join(self._parts) if self._parts else None,
            finish_reason=self.finish_reason,
            model=self.model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            headers=headers,
            silence_s=silence_s,
            streamed=True,
            first_byte_s=first_byte_s,
            server_s=self.server_s,
            first_token_s=_span(started, self.first_token_at),
            token_span_s=_span(self.first_token_at, self.last_token_at),
            server_generation_s=self.server_generation_s,
        )


def _span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)


# ---------------------------------------------------------------------------
# The fast path: aiohttp, parsing only what a Completion needs.


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def llama_timings(timings: object) -> tuple[float, float] | None:
    """The server's own time for an answer from llama.cpp's ``timings``:
    seconds on the prompt (``prompt_ms``) and generating (``predicted_ms``);
    None if absent or odd."""
    if not isinstance(timings, Mapping):
        return None
    prompt_s, predicted_s = (
        _seconds(timings.get("prompt_ms")),
        _seconds(timings.get("predicted_ms")),
    )
    if prompt_s is None or predicted_s is None:
        return None
    return prompt_s, predicted_s


def _seconds(milliseconds: object) -> float | None:
    """A server's duration in milliseconds, in seconds (None if odd)."""
    if not isinstance(milliseconds, int | float) or isinstance(milliseconds, bool):
        return None
    value = float(milliseconds) / 1000.0
    return value if math.isfinite(value) and value >= 0 else None


def vllm_metrics(metrics: object) -> tuple[float, float, float | None] | None:
    """The server's own time for an answer from vLLM's per-request
    ``metrics`` (``--enable-per-request-metrics``): seconds from being
    scheduled to the first token (``time_to_first_token_ms``: the prompt),
    generating (``generation_time_ms``), and queued (``queue_time_ms``, None
    if absent); None if absent or odd."""
    if not isinstance(metrics, Mapping):
        return None
    prefill_s = _seconds(metrics.get("time_to_first_token_ms"))
    decode_s = _seconds(metrics.get("generation_time_ms"))
    if prefill_s is None or decode_s is None:
        return None
    return prefill_s, decode_s, _seconds(metrics.get("queue_time_ms"))


def streamed_completion(
    assembler: StreamAssembler,
    headers: Mapping[str, str],
    watch: Watchdog,
    stop_streaming: Callable[[str], None],
) -> Completion:
    """The answer a finished stream carried (every transport's last step of
    a streamed request). A stream cut short, or one without its usage, turns
    streaming off for the rest of the run."""
    try:
        completion = assembler.completion(
            headers,
            silence_s=watch.longest,
            first_byte_s=watch.first_byte_s,
            started=watch.started,
        )
    except TruncatedStream:
        stop_streaming(CUT_SHORT)
        raise
    if completion.prompt_tokens is None:
        stop_streaming("the server streams answers without their token usage")
    return completion


def whole_completion(
    body: bytes,
    headers: Mapping[str, str],
    watch: Watchdog,
    streaming: bool,
    stop_streaming: Callable[[str], None],
) -> Completion:
    """The answer in one JSON body; sent for a streaming request, it means
    the server ignored "stream", and the rest of the run stops asking."""
    if streaming:
        stop_streaming("the server answers streaming requests with one JSON body")
    return dataclasses.replace(
        parse_completion(body, headers),
        silence_s=watch.longest,
        first_byte_s=watch.first_byte_s,
    )


def parse_completion(body: bytes, headers: Mapping[str, str]) -> Completion:
    """Read a chat completion body: only the fields a ``Completion`` needs.

    A body that is not JSON, has no ``choices[0].message``, or whose content
    is neither a string nor null is a ``UnparseableResponse``. Token counts,
    model and finish reason are informational: a missing or odd value is None.
    """
    try:
        # JSON over HTTP is UTF-8 (RFC 8259); -sig also accepts a leading BOM.
        data = _DECODER.decode(body.decode("utf-8-sig"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise UnparseableResponse(f"unparseable response body ({type(exc).__name__})") from None
    try:
        choice = data["choices"][0]
        message = choice["message"]
        text = message.get("content")
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise UnparseableResponse(
            f"response body is not a chat completion ({type(exc).__name__})"
        ) from None
    if text is not None and not isinstance(text, str):
        raise UnparseableResponse(
            f"response message content is a {type(text).__name__}, not a string"
        )
    usage = data.get("usage")
    if not isinstance(usage, Mapping):
        usage = {}
    return Completion(
        text=text,
        finish_reason=_optional_str(choice.get("finish_reason")),
        model=_optional_str(data.get("model")),
        prompt_tokens=_optional_int(usage.get("prompt_tokens")),
        completion_tokens=_optional_int(usage.get("completion_tokens")),
        headers=headers,
    ).with_timings(data.get("timings"), data.get("metrics"))


async def _read_body(content: aiohttp.StreamReader, watch: Watchdog) -> bytes:
    parts = []
    async for data in content.iter_any():
        watch.beat()
        parts.append(data)
    return b"".join(parts)


def _chat_url(base_url: str) -> URL:
    from yarl import URL  # aiohttp's URL type (and dependency): parsed once, not per request

    try:
        url = URL(f"{base_url}/chat/completions")
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        # Not echoed: a base URL may carry credentials.
        raise ConfigError(
            "the model base URL is not an http:// or https:// URL with a host; "
            "fix --base-url (model.base_url) or $OPENAI_BASE_URL"
        )
    return url


def _ssl_context() -> ssl.SSLContext | bool:
    """The SDK's trust on Linux: ``$SSL_CERT_FILE``, else ``$SSL_CERT_DIR``,
    else the system store (OpenSSL's default paths): True, aiohttp's default
    context, which it built at import (loading the store again costs tens of
    milliseconds before the first request)."""
    import ssl

    cafile = os.environ.get("SSL_CERT_FILE")
    if cafile:
        return ssl.create_default_context(cafile=cafile)
    capath = os.environ.get("SSL_CERT_DIR")
    if capath:
        return ssl.create_default_context(capath=capath)
    return True


# Proxy schemes the HTTP transports can talk to (neither tunnels TLS in TLS).
_PROXY_SCHEMES: Final = ("http",)


def env_proxy(url: URL) -> tuple[URL, str | None] | None:
    """``proxy_for`` the URL, as yarl URLs (the aiohttp transport's type)."""
    from yarl import URL

    found = proxy_for(url.scheme, url.host)
    return None if found is None else (URL(found[0].geturl()), found[1])


def proxy_for(scheme: str, host: str | None) -> tuple[SplitResult, str | None] | None:
    """The proxy the environment names for a URL of ``scheme`` on ``host``
    (without its credentials), and the ``Proxy-Authorization`` value for it
    (None without credentials); None for no proxy. ``HTTP_PROXY`` /
    ``HTTPS_PROXY`` (any case, by the URL's scheme) unless ``NO_PROXY``
    covers the host; credentials from the proxy URL, else from ``$NETRC`` or
    ``~/.netrc``. An ``https://`` proxy is ignored: neither HTTP transport
    can tunnel TLS inside TLS."""
    if not any(_names_a_proxy(name) for name in os.environ):
        # urllib.request reads only these variables on Linux, and loading it
        # (http.client, email...) costs milliseconds before the first request.
        return None
    import urllib.parse
    import urllib.request

    if host is not None and urllib.request.proxy_bypass(host):
        return None
    named = urllib.request.getproxies().get(scheme)
    if not named:
        return None
    proxy = urllib.parse.urlsplit(named)
    if proxy.scheme not in _PROXY_SCHEMES:
        return None
    bare = proxy._replace(netloc=proxy.netloc.rpartition("@")[2])
    if proxy.username is not None or proxy.password is not None:
        user = urllib.parse.unquote(proxy.username or "")
        return bare, _basic(user, urllib.parse.unquote(proxy.password or ""))
    entry = _netrc_entry(proxy.hostname) if proxy.hostname else None
    if entry is None:
        return bare, None
    login, account, password = entry
    return bare, _basic(login or account or "", password or "")


def _names_a_proxy(variable: str) -> bool:
    name = variable.lower()
    return name.endswith("_proxy") and name != "no_proxy"


def _basic(user: str, password: str) -> str:
    import base64

    # latin-1, as aiohttp and httpx encode Basic credentials.
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("latin-1")).decode("ascii")


def _netrc_entry(host: str) -> tuple[str, str | None, str | None] | None:
    import netrc

    path = os.environ.get("NETRC")
    try:
        found = netrc.netrc(path or str(Path.home() / ".netrc")).authenticators(host)
    except (OSError, RuntimeError, netrc.NetrcParseError):
        return None  # no file, no home, or not a netrc file: no credentials
    return found


class AiohttpTransport:
    """POSTs chat requests with one pooled ``aiohttp.ClientSession``.

    Behaves like the SDK where it matters: the same base URL resolution
    (``model.base_url``, ``$OPENAI_BASE_URL``, then OpenAI's), the same auth
    and content headers (plus ``OpenAI-Organization`` / ``OpenAI-Project`` from
    ``$OPENAI_ORG_ID`` / ``$OPENAI_PROJECT_ID`` like the SDK), the same CA
    trust (``$SSL_CERT_FILE``/``$SSL_CERT_DIR``, then the system store),
    proxies from the environment (``HTTPS_PROXY``, ``NO_PROXY``...), redirects
    followed, and the same transport errors as the SDK transport translates
    its exceptions into (same types and fields). ``model.timeout_s`` bounds each
    request as a whole (the SDK applies it to each phase; ``OpenAITransport``
    adds the same bound), ``stall_s`` its silences (see the module doc).

    Not implemented: Azure OpenAI's classic deployment URLs (``api-key``
    header and ``api-version`` query) and the SDK's telemetry headers
    (``X-Stainless-*``); cookies are not kept between requests. The session
    belongs to the event loop of the first ``complete()``.
    """

    def __init__(
        self,
        model: ModelConfig,
        api_key: str,
        *,
        limit: int = 0,
        extra_params: Mapping[str, Any] | None = None,
    ) -> None:
        import aiohttp  # only this transport uses it (the SDK's own is opt-in)

        # Parsed once: aiohttp would parse a string again on every request.
        self._url = _chat_url(resolve_base_url(model))
        self._proxy_headers: dict[str, str] | None = None
        self._model = model.name
        self._params = body_params(model, extra_params)
        # The Watchdog of each request bounds it (total and stall), not aiohttp.
        self._timeout = aiohttp.ClientTimeout(total=None)
        self._total_s = model.timeout_s
        self.streaming = model.stream
        self._trial = StreamTrial()
        self.stream_fallback: str | None = None
        self._limit = limit
        self._secrets = (api_key,)
        # Sent with each request, not as a session default: aiohttp copies a
        # session's default headers into what it sends a proxy, and turns an
        # Authorization among them into Proxy-Authorization, which would give
        # the key to the proxy (in the CONNECT of an https:// API, too).
        self._auth = {"Authorization": f"Bearer {api_key}"}
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        for header, variable in (
            ("OpenAI-Organization", "OPENAI_ORG_ID"),
            ("OpenAI-Project", "OPENAI_PROJECT_ID"),
        ):
            value = os.environ.get(variable)
            if value:
                headers[header] = value
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"AiohttpTransport(url={self.url!r}, model={self._model!r})"

    @property
    def url(self) -> str:
        """Where requests go: ``{base_url}/chat/completions``."""
        return str(self._url)

    def _open(self) -> aiohttp.ClientSession:
        """The session, created on first use: aiohttp wants a running loop."""
        import aiohttp

        if self._closed:
            raise RuntimeError("AiohttpTransport is closed")
        ssl: Any = True
        if self._url.scheme == "https":
            # The SDK's trust: $SSL_CERT_FILE / $SSL_CERT_DIR, else the system store.
            ssl = _ssl_context()
        proxy: URL | None = None
        # Resolved once (the URL never changes), not on every request in a
        # thread as trust_env=True would do; NO_PROXY is honoured.
        found = env_proxy(self._url)
        if found is not None:
            proxy, proxy_auth = found
            if proxy_auth is not None and self._url.scheme == "https":
                # Sent with the CONNECT that opens the tunnel.
                self._proxy_headers = {"Proxy-Authorization": proxy_auth}
            elif proxy_auth is not None:
                # Plain HTTP is forwarded, not tunnelled: aiohttp sends no
                # proxy_headers then, so the request itself carries them.
                self._auth["Proxy-Authorization"] = proxy_auth
        connector = aiohttp.TCPConnector(limit=self._limit, ssl=ssl)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=self._timeout,
            proxy=proxy,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._session

    def _stop_streaming(self, reason: str) -> None:
        self.streaming = False
        if self.stream_fallback is None:
            self.stream_fallback = reason

    async def complete(self, messages: Messages, *, stall_s: StallLimit = None) -> Completion:
        return await self._trial.send(
            self.streaming, functools.partial(self._complete, messages, stall_s)
        )

    async def _complete(
        self, messages: Messages, stall_s: StallLimit, streaming: bool
    ) -> Completion:
        import aiohttp  # loaded by __init__: a dictionary lookup, for the except clause

        session = self._session
        if session is None:
            session = self._open()
        payload = chat_body(self._model, messages, self._params)
        if streaming:
            payload.update(STREAM_PARAMS)
        data = JSON_ENCODER.encode(payload).encode()
        watch: Watchdog | None = None
        try:
            async with asyncio.timeout(None) as scope:
                watch = Watchdog(scope, stall_s, self._total_s)
                try:
                    async with session.post(
                        self._url,
                        data=data,
                        headers=self._auth,
                        proxy_headers=self._proxy_headers,
                    ) as response:
                        watch.beat()
                        status = response.status
                        if 200 <= status < 300:
                            headers = {k.lower(): v for k, v in response.headers.items()}
                            return await self._answer(response, headers, watch, streaming)
                        body = await _read_body(response.content, watch)
                        error_headers = lowered_headers(response.headers.items())
                finally:
                    watch.close()
        except TimeoutError:
            if watch is not None and watch.expired == "stall":
                raise stalled_error(watch) from None
            # The total timeout, and aiohttp's ServerTimeoutError (a TimeoutError too).
            raise APITimeout("request timed out") from None
        except UnparseableResponse as exc:
            # A stream's error event may quote the request, and so the key.
            raise type(exc)(redact(str(exc), self._secrets)) from None
        except (aiohttp.ClientError, OSError) as exc:
            # Refused, reset, dropped mid-body, bad HTTP, TLS: what the SDK
            # reports as a connection error. Not chained: aiohttp errors carry
            # the request headers, and so the key.
            raise APIConnectionFailed(
                redact(f"Connection error: {type(exc).__name__}: {exc}", self._secrets)
            ) from None
        if streaming and rejects_streaming(status, body):
            self._stop_streaming("the server rejects streaming requests (400 naming stream)")
            return await self.complete(messages, stall_s=stall_s)
        raise APIStatus.from_response(status, redact_bytes(body, self._secrets), error_headers)

    async def _answer(
        self,
        response: aiohttp.ClientResponse,
        headers: Mapping[str, str],
        watch: Watchdog,
        streaming: bool,
    ) -> Completion:
        import aiohttp  # loaded by __init__: a dictionary lookup, for the except clause

        if streaming and response.content_type == EVENT_STREAM:
            assembler = StreamAssembler()
            try:
                async for data in response.content.iter_any():
                    watch.beat()
                    assembler.feed(data, watch.last)
            except (aiohttp.ClientError, OSError):
                # After [DONE] the stream is over, whatever becomes of the
                # body's framing (llama-cpp-python's server drops the
                # connection after the [DONE] of a stream it cuts short).
                if not assembler.done:
                    raise
            return streamed_completion(assembler, headers, watch, self._stop_streaming)
        body = await _read_body(response.content, watch)
        return whole_completion(body, headers, watch, streaming, self._stop_streaming)

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def make_transport(
    model: ModelConfig,
    api_key: str,
    kind: str = "h11",
    *,
    extra_params: Mapping[str, Any] | None = None,
) -> Transport:
    """The transport for ``kind``: ``"h11"`` (the default: light to import,
    ``pipeline.transport_h11``), ``"aiohttp"`` or ``"openai"`` (the official
    SDK client). ``extra_params`` are sent with every request too (e.g.
    ``response_format``)."""
    if kind == "h11":
        from pipeline.transport_h11 import H11Transport

        return H11Transport(model, api_key, extra_params=extra_params)
    if kind == "aiohttp":
        return AiohttpTransport(model, api_key, extra_params=extra_params)
    if kind == "openai":
        return OpenAITransport(model, api_key, extra_params=extra_params)
    raise ConfigError(f"unknown transport '{kind}'; use one of: {', '.join(TRANSPORT_KINDS)}")
