"""How a request is sent: transports that turn a list of messages into a
``Completion`` or raise enrich's own transport errors
(``pipeline.transport_errors``), so the call stage classifies failures the
same way whichever transport is used, and whatever version of the SDK or of
aiohttp is installed.

Two transports:

``AiohttpTransport`` (kind ``"aiohttp"``, the fast path)
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

Neither client is imported with this module: each transport imports its own
when it is built, so ``enrich run`` on the default transport never loads the
SDK, and a module that only needs ``Completion`` loads neither.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, get_args

from pipeline.errors import ConfigError
from pipeline.transport_errors import (
    APIConnectionFailed,
    APIStatus,
    APITimeout,
    TransportError,
    UnparseableResponse,
    lowered_headers,
)
from pipeline.version import version

if TYPE_CHECKING:
    import ssl

    import aiohttp
    import openai
    from yarl import URL

    from pipeline.config import ModelConfig

__all__ = [
    "DEFAULT_BASE_URL",
    "TRANSPORT_KINDS",
    "APIConnectionFailed",
    "APIStatus",
    "APITimeout",
    "AiohttpTransport",
    "Completion",
    "Messages",
    "OpenAITransport",
    "Transport",
    "TransportError",
    "TransportKind",
    "UnparseableResponse",
    "make_transport",
    "sdk_error",
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
    """Sends one chat request. Raises ``TransportError`` subclasses on
    failure, so every transport shares one error classification."""

    async def complete(self, messages: Messages) -> Completion: ...

    async def aclose(self) -> None: ...


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
        # Imported here, not with the module: the SDK costs about a second of
        # imports, and only this transport uses it.
        import openai

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
        # Already loaded by __init__ (and by the SDK): a dictionary lookup.
        import openai
        import pydantic

        try:
            raw = await self._client.chat.completions.with_raw_response.create(
                model=self._model,
                messages=messages,  # type: ignore[arg-type]
                **self._params,
            )
        except openai.OpenAIError as exc:
            translated = sdk_error(exc, self._redact)
            if translated is None:
                raise
            # Not chained: the SDK's exception carries the request, and a
            # server that echoes the key puts it in the SDK's message.
            raise translated from None
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
        )

    async def aclose(self) -> None:
        await self._client.close()


def sdk_error(exc: openai.OpenAIError, redact: str | None = None) -> TransportError | None:
    """The one place the ``openai`` SDK's exceptions become enrich's, using
    only the SDK's public exception classes and attributes (the status code,
    and the response's headers and body, read as the aiohttp transport reads
    them). ``redact``: a key to blank out of the body, for a server that
    echoes it. None for an exception that is not about a request (a bug to
    surface, not a failure to classify)."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return APITimeout("request timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        return APIConnectionFailed(_scrub(f"Connection error{detail}", redact))
    if isinstance(exc, openai.APIStatusError):
        response = exc.response
        try:
            body = response.content
        except Exception:  # a streamed body that was never read
            body = b""
        return APIStatus.from_response(
            exc.status_code,
            _scrub_bytes(body, redact),
            lowered_headers(response.headers.multi_items()),
        )
    if isinstance(exc, openai.APIResponseValidationError):
        return UnparseableResponse("unparseable response body (APIResponseValidationError)")
    return None


# ---------------------------------------------------------------------------
# The fast path: aiohttp, parsing only what a Completion needs.


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


# Proxy schemes aiohttp can talk to (it cannot tunnel TLS to an https:// proxy).
_PROXY_SCHEMES: Final = ("http",)


def env_proxy(url: URL) -> tuple[URL, str | None] | None:
    """The proxy the environment names for ``url``, and the
    ``Proxy-Authorization`` value for it (None without credentials); None
    for no proxy. ``HTTP_PROXY`` / ``HTTPS_PROXY`` (any case, by the URL's
    scheme) unless ``NO_PROXY`` covers the host; credentials from the proxy
    URL, else from ``$NETRC`` or ``~/.netrc``. An ``https://`` proxy is
    ignored: aiohttp cannot use one."""
    import urllib.request

    from yarl import URL

    if url.host is not None and urllib.request.proxy_bypass(url.host):
        return None
    named = urllib.request.getproxies().get(url.scheme)
    if not named:
        return None
    proxy = URL(named)
    if proxy.scheme not in _PROXY_SCHEMES:
        return None
    if proxy.raw_user is not None or proxy.raw_password is not None:
        return proxy.with_user(None), _basic(proxy.user or "", proxy.password or "")
    entry = _netrc_entry(proxy.host) if proxy.host else None
    if entry is None:
        return proxy, None
    login, account, password = entry
    return proxy, _basic(login or account or "", password or "")


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
        import aiohttp  # only this transport uses it (the SDK's own is opt-in)

        # Parsed once: aiohttp would parse a string again on every request.
        self._url = _chat_url(resolve_base_url(model))
        self._proxy_headers: dict[str, str] | None = None
        self._model = model.name
        self._params = {**model.request_params(), **(extra_params or {})}
        self._timeout = aiohttp.ClientTimeout(total=model.timeout_s)
        self._limit = limit
        self._redact = _redactable(api_key)
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

    async def complete(self, messages: Messages) -> Completion:
        import aiohttp  # loaded by __init__: a dictionary lookup, for the except clause

        session = self._session
        if session is None:
            session = self._open()
        payload = {"model": self._model, "messages": messages, **self._params}
        data = _ENCODER.encode(payload).encode()
        try:
            async with session.post(
                self._url, data=data, headers=self._auth, proxy_headers=self._proxy_headers
            ) as response:
                body = await response.read()
                status = response.status
                if 200 <= status < 300:
                    headers = {name.lower(): value for name, value in response.headers.items()}
                    return parse_completion(body, headers)
                error_headers = lowered_headers(response.headers.items())
        except TimeoutError:
            # aiohttp's total timeout, and ServerTimeoutError (a TimeoutError too).
            raise APITimeout("request timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            # Refused, reset, dropped mid-body, bad HTTP, TLS: what the SDK
            # reports as a connection error. Not chained: aiohttp errors carry
            # the request headers, and so the key.
            raise APIConnectionFailed(
                _scrub(f"Connection error: {type(exc).__name__}: {exc}", self._redact)
            ) from None
        raise APIStatus.from_response(status, _scrub_bytes(body, self._redact), error_headers)

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
