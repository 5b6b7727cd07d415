"""How a request is sent: transports that turn a list of messages into a
``Completion`` or raise the ``openai`` SDK's exception classes, so the call
stage classifies failures the same way whichever transport is used.

Two transports:

``AiohttpTransport`` (kind ``"aiohttp"``, the fast path)
    One ``aiohttp.ClientSession`` POSTing JSON to ``{base_url}/chat/completions``
    and reading only the fields a ``Completion`` needs. On a fast local server
    (vLLM, llama.cpp) the client's CPU is the bottleneck; this path costs a
    fraction of the SDK's per request. Failures are raised as the SDK's own
    exception classes, built the way the SDK builds them (status code, error
    body, real response headers), so ``pipeline.call.classify`` is shared.

``OpenAITransport`` (kind ``"openai"``)
    The official ``openai`` client: the reference behaviour, and where
    SDK-only features belong (``openai.AsyncAzureOpenAI`` for Azure's classic
    deployment URLs, which want an ``api-key`` header and an ``api-version``
    query; workload identity...). Neither transport does those today; Azure's
    OpenAI-compatible ``/openai/v1`` endpoint works with both.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, get_args

import aiohttp
import httpx2
import openai
import pydantic
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.version import version

__all__ = [
    "DEFAULT_BASE_URL",
    "TRANSPORT_KINDS",
    "AiohttpTransport",
    "Completion",
    "Messages",
    "OpenAITransport",
    "Transport",
    "TransportKind",
    "UnparseableResponse",
    "make_transport",
]

Messages = Sequence[Mapping[str, str]]

# What the SDK talks to when neither model.base_url nor $OPENAI_BASE_URL is set.
DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"

TransportKind = Literal["aiohttp", "openai"]
TRANSPORT_KINDS: Final[tuple[str, ...]] = get_args(TransportKind)

# Built once: json.dumps with any option builds a new encoder on every call.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_DECODER: Final = json.JSONDecoder()

# Keys shorter than this are test placeholders; redacting them from error text
# would mangle it (a one-letter key would blank every such letter).
_MIN_REDACTED_KEY: Final = 8
_REDACTED: Final = "[redacted]"


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


class Transport(Protocol):
    """Sends one chat request. Raises ``openai`` exceptions on failure, so
    every transport shares one error classification."""

    async def complete(self, messages: Messages) -> Completion: ...

    async def aclose(self) -> None: ...


class UnparseableResponse(Exception):
    """A 200 whose body is not a chat completion: transient, worth a retry."""


def _redactable(api_key: str) -> str | None:
    return api_key if len(api_key) >= _MIN_REDACTED_KEY else None


def _scrub(text: str, key: str | None) -> str:
    return text.replace(key, _REDACTED) if key else text


def _scrub_bytes(body: bytes, key: str | None) -> bytes:
    return body.replace(key.encode(), _REDACTED.encode()) if key else body


def resolve_base_url(model: ModelConfig) -> str:
    """The base URL the SDK would use: config, then $OPENAI_BASE_URL, then
    OpenAI's, without a trailing slash."""
    return (model.resolved_base_url() or DEFAULT_BASE_URL).rstrip("/")


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
        self._model = model.name
        self._params = {**model.request_params(), **(extra_params or {})}
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=model.resolved_base_url(),
            timeout=model.timeout_s,
            max_retries=0,
            http_client=openai.DefaultAioHttpClient() if http_client == "aiohttp" else None,
        )
        self._redact = _redactable(api_key)

    def __repr__(self) -> str:
        return f"OpenAITransport(base_url={str(self._client.base_url)!r}, model={self._model!r})"

    async def complete(self, messages: Messages) -> Completion:
        try:
            raw = await self._client.chat.completions.with_raw_response.create(
                model=self._model,
                messages=messages,  # type: ignore[arg-type]
                **self._params,
            )
        except openai.APIStatusError as exc:
            # A server that echoes the key would put it in the row's error column.
            key = self._redact
            if key is None or key.encode() not in exc.response.content:
                raise
            raise make_status_error(
                exc.status_code,
                _scrub_bytes(exc.response.content, key),
                exc.response.headers.raw,
                httpx2.Request("POST", exc.request.url),
            ) from None
        try:
            parsed = raw.parse()
            choice = parsed.choices[0]
        except (json.JSONDecodeError, pydantic.ValidationError, IndexError, TypeError) as exc:
            raise UnparseableResponse(f"unparseable response body ({type(exc).__name__})") from None
        usage = parsed.usage
        return Completion(
            text=choice.message.content,
            finish_reason=choice.finish_reason,
            model=parsed.model,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            headers=raw.headers,
        )

    async def aclose(self) -> None:
        await self._client.close()


# ---------------------------------------------------------------------------
# The fast path: aiohttp, parsing only what a Completion needs.

# openai/_client.py ``_make_status_error``: the class for each status code.
_STATUS_ERRORS: Final[Mapping[int, type[openai.APIStatusError]]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


def make_status_error(
    status: int,
    body: bytes,
    raw_headers: Sequence[tuple[bytes, bytes]],
    request: httpx2.Request,
) -> openai.APIStatusError:
    """The exception the SDK raises for a non-2xx answer, built the same way
    (``_make_status_error_from_response`` then ``_make_status_error``): the
    message is ``Error code: N - <server message>``, ``.body`` the ``error``
    object of a JSON body (else the body text), ``.response`` an
    ``httpx2.Response`` with the real headers and body."""
    response = httpx2.Response(status, headers=list(raw_headers), content=body, request=request)
    err_msg = f"Error code: {status}"
    err_text = response.text.strip()
    parsed: object = err_text
    try:
        parsed = json.loads(err_text)
    except ValueError:
        pass
    else:
        error = parsed.get("error", parsed) if isinstance(parsed, Mapping) else None
        message = error.get("message") if isinstance(error, Mapping) else None
        if isinstance(message, str) and message:
            err_msg += f" - {message}"
    data = parsed.get("error", parsed) if isinstance(parsed, Mapping) else parsed
    cls = _STATUS_ERRORS.get(status)
    if cls is None:
        cls = openai.InternalServerError if status >= 500 else openai.APIStatusError
    return cls(err_msg, response=response, body=data)


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _optional_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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
    )


def _chat_url(base_url: str) -> URL:
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


class AiohttpTransport:
    """POSTs chat requests with one pooled ``aiohttp.ClientSession``.

    Behaves like the SDK where it matters: the same base URL resolution
    (``model.base_url``, ``$OPENAI_BASE_URL``, then OpenAI's), the same auth
    and content headers (plus ``OpenAI-Organization`` / ``OpenAI-Project`` from
    ``$OPENAI_ORG_ID`` / ``$OPENAI_PROJECT_ID`` like the SDK), the same CA
    trust (``$SSL_CERT_FILE``/``$SSL_CERT_DIR``, then the system store),
    proxies from the environment (``HTTPS_PROXY``, ``NO_PROXY``...), redirects
    followed, and the same exception classes. ``model.timeout_s`` bounds each
    request as a whole (the SDK applies it to each phase).

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
        # Parsed once: aiohttp would parse a string again on every request.
        self._url = _chat_url(resolve_base_url(model))
        self._proxy_headers: dict[str, str] | None = None
        self._model = model.name
        self._params = {**model.request_params(), **(extra_params or {})}
        self._timeout = aiohttp.ClientTimeout(total=model.timeout_s)
        self._limit = limit
        self._redact = _redactable(api_key)
        headers = {
            "Authorization": f"Bearer {api_key}",
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
        if self._closed:
            raise RuntimeError("AiohttpTransport is closed")
        ssl: Any = True
        if self._url.scheme == "https":
            # The SDK's trust: $SSL_CERT_FILE / $SSL_CERT_DIR, else the system store.
            ssl = httpx2.create_ssl_context()
        proxy: URL | None = None
        proxy_auth: aiohttp.BasicAuth | None = None
        # Resolved once (the URL never changes), not on every request in a
        # thread as trust_env=True would do; NO_PROXY is honoured.
        with contextlib.suppress(LookupError):
            proxy, proxy_auth = get_env_proxy_for_url(self._url)
        if proxy_auth is not None:
            self._proxy_headers = {"Proxy-Authorization": proxy_auth.encode()}
        connector = aiohttp.TCPConnector(limit=self._limit, ssl=ssl)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=self._timeout,
            proxy=proxy,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self._session

    async def complete(self, messages: Messages) -> Completion:
        session = self._session
        if session is None:
            session = self._open()
        payload = {"model": self._model, "messages": messages, **self._params}
        data = _ENCODER.encode(payload).encode()
        try:
            async with session.post(
                self._url, data=data, proxy_headers=self._proxy_headers
            ) as response:
                body = await response.read()
                status = response.status
                if 200 <= status < 300:
                    headers = {name.lower(): value for name, value in response.headers.items()}
                    return parse_completion(body, headers)
                raw_headers = response.raw_headers
        except TimeoutError:
            # aiohttp's total timeout, and ServerTimeoutError (a TimeoutError too).
            raise openai.APITimeoutError(request=self._request()) from None
        except (aiohttp.ClientError, OSError) as exc:
            # Refused, reset, dropped mid-body, bad HTTP, TLS: what the SDK
            # reports as a connection error. Not chained: aiohttp errors carry
            # the request headers, and so the key.
            raise openai.APIConnectionError(
                message=_scrub(f"Connection error: {type(exc).__name__}: {exc}", self._redact),
                request=self._request(),
            ) from None
        raise make_status_error(
            status, _scrub_bytes(body, self._redact), raw_headers, self._request()
        )

    def _request(self) -> httpx2.Request:
        # What the SDK's exceptions carry as ``.request``, without the key.
        return httpx2.Request("POST", str(self._url))

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def make_transport(
    model: ModelConfig,
    api_key: str,
    kind: str = "aiohttp",
    *,
    extra_params: Mapping[str, Any] | None = None,
) -> Transport:
    """The transport for ``kind``: ``"aiohttp"`` (fast, the default) or
    ``"openai"`` (the official SDK client). ``extra_params`` are sent with
    every request too (e.g. ``response_format``)."""
    if kind == "aiohttp":
        return AiohttpTransport(model, api_key, extra_params=extra_params)
    if kind == "openai":
        return OpenAITransport(model, api_key, extra_params=extra_params)
    raise ConfigError(f"unknown transport '{kind}'; use one of: {', '.join(TRANSPORT_KINDS)}")
