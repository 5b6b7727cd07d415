"""The default transport: HTTP/1.1 over asyncio streams, spoken with ``h11``.

Why not aiohttp, which the ``"aiohttp"`` transport still uses: start-up.
Importing aiohttp costs about 0.3 s on an idle machine (a quarter of it two
TLS contexts it builds at import, loading the system CA store twice), which
was over a third of a run's start to its first request; ``h11`` is a pure
Python protocol state machine (the one under httpx and uvicorn) that imports
in a few milliseconds. The TLS context is built at the first https
connection, so a run against a local http:// server never loads a CA store.

What it does is what ``AiohttpTransport`` does (see its docstring): the same
URL, headers, CA trust, proxies from the environment (an http:// proxy
forwards plain requests and tunnels https:// ones with CONNECT, carrying the
proxy's credentials and never the API key), the same streaming, stall
watchdog, total timeout and errors. Connections are kept alive and reused (a
pool without a bound: the call stage bounds the requests in flight).
Redirects are not followed: a chat completion endpoint does not redirect, and
a 3xx is reported as the status it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import SplitResult, quote, urlsplit

import h11

from pipeline.errors import ConfigError
from pipeline.redact import redact, redact_bytes
from pipeline.stall import StallLimit, Watchdog
from pipeline.transport import (
    EVENT_STREAM,
    JSON_ENCODER,
    STREAM_PARAMS,
    USER_AGENT,
    Completion,
    Messages,
    StreamAssembler,
    StreamTrial,
    body_params,
    chat_body,
    proxy_for,
    rejects_streaming,
    resolve_base_url,
    stalled_error,
    streamed_completion,
    whole_completion,
)
from pipeline.transport_errors import (
    APIConnectionFailed,
    APIStatus,
    APITimeout,
    UnparseableResponse,
    lowered_headers,
)

if TYPE_CHECKING:
    import ssl

    from pipeline.config import ModelConfig

__all__ = ["H11Transport"]

_READ_BYTES: Final = 65_536
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# Characters a request target may carry as they are (RFC 3986's pchar,
# "/" and "?", and "%" for what is already escaped).
_TARGET_SAFE: Final = "/?%:@!$&'()*+,;=-._~"


class _ProtocolFailed(Exception):
    """The connection failed in a way h11 or the proxy reported."""


@dataclasses.dataclass(slots=True, eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    http: h11.Connection

    def reusable(self) -> bool:
        return (
            self.http.our_state is h11.IDLE
            and not self.reader.at_eof()
            and not self.writer.is_closing()
        )

    def close(self) -> None:
        self.writer.close()

    async def next_event(self) -> Any:
        """The next h11 event, reading from the socket as needed (b"" at the
        end of the stream tells h11 the server closed)."""
        while True:
            event = self.http.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.http.receive_data(await self.reader.read(_READ_BYTES))


def _endpoint(base_url: str) -> SplitResult:
    """``{base_url}/chat/completions``, parsed once; a ConfigError (without
    the URL: it may carry credentials) if it is not an http(s) URL with a host."""
    try:
        url = urlsplit(f"{base_url}/chat/completions")
        _ = url.port  # a port that is not a number raises here
    except ValueError:
        url = None
    if url is None or url.scheme not in _DEFAULT_PORTS or not url.hostname:
        raise ConfigError(
            "the model base URL is not an http:// or https:// URL with a host; "
            "fix --base-url (model.base_url) or $OPENAI_BASE_URL"
        )
    return url


def _tls_context() -> ssl.SSLContext:
    """The SDK's trust on Linux: ``$SSL_CERT_FILE``, else ``$SSL_CERT_DIR``,
    else the system store."""
    import ssl

    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = None if cafile else os.environ.get("SSL_CERT_DIR") or None
    return ssl.create_default_context(cafile=cafile, capath=capath)


class H11Transport:
    """POSTs chat requests over pooled HTTP/1.1 connections (see the module
    doc); behaves as ``AiohttpTransport`` does. The connections belong to
    the event loop of the first ``complete()``."""

    def __init__(
        self,
        model: ModelConfig,
        api_key: str,
        *,
        extra_params: Mapping[str, Any] | None = None,
    ) -> None:
        url = self._url = _endpoint(resolve_base_url(model))
        self._model = model.name
        self._params = body_params(model, extra_params)
        self._total_s = model.timeout_s
        self.streaming = model.stream
        self._trial = StreamTrial()
        self.stream_fallback: str | None = None
        self._secrets = (api_key,)
        self._host = url.hostname or ""
        self._port = url.port or _DEFAULT_PORTS[url.scheme]
        netloc = url.netloc.rpartition("@")[2]
        path = quote(url.path, safe=_TARGET_SAFE) + (f"?{url.query}" if url.query else "")
        self._target = path.encode("ascii")
        headers = [
            ("Host", netloc),
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
            ("User-Agent", USER_AGENT),
            ("Authorization", f"Bearer {api_key}"),
        ]
        for header, variable in (
            ("OpenAI-Organization", "OPENAI_ORG_ID"),
            ("OpenAI-Project", "OPENAI_PROJECT_ID"),
        ):
            value = os.environ.get(variable)
            if value:
                headers.append((header, value))
        self._headers = headers
        self._proxy: tuple[SplitResult, str | None] | None = None
        self._proxy_read = False
        self._tls: ssl.SSLContext | None = None
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"H11Transport(url={self.url!r}, model={self._model!r})"

    @property
    def url(self) -> str:
        """Where requests go: ``{base_url}/chat/completions``."""
        return self._url.geturl()

    def _stop_streaming(self, reason: str) -> None:
        self.streaming = False
        if self.stream_fallback is None:
            self.stream_fallback = reason

    def _route(self) -> tuple[SplitResult, str | None] | None:
        """The proxy from the environment, read once (the URL never changes)."""
        if not self._proxy_read:
            self._proxy = proxy_for(self._url.scheme, self._url.hostname)
            if self._proxy is not None and self._url.scheme == "http":
                # Plain HTTP is forwarded: the request names the whole URL,
                # and carries the proxy's credentials itself.
                self._target = self._url.geturl().encode("ascii")
                if self._proxy[1] is not None:
                    self._headers.append(("Proxy-Authorization", self._proxy[1]))
            self._proxy_read = True
        return self._proxy

    async def _connect(self) -> _Connection:
        proxy = self._route()
        host, port = self._host, self._port
        if proxy is not None:
            host, port = proxy[0].hostname or "", proxy[0].port or 80
        tls = None
        if self._url.scheme == "https":
            if self._tls is None:
                self._tls = _tls_context()
            tls = self._tls
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=None if proxy is not None else tls,
            server_hostname=self._host if tls is not None and proxy is None else None,
        )
        connection = _Connection(reader, writer, h11.Connection(h11.CLIENT))
        self._open.add(connection)
        if proxy is not None and tls is not None:
            try:
                await self._tunnel(connection, proxy[1])
                await writer.start_tls(tls, server_hostname=self._host)
            except BaseException:
                self._discard(connection)
                raise
        return connection

    async def _tunnel(self, connection: _Connection, proxy_auth: str | None) -> None:
        """Ask the proxy for a tunnel to the API's host (CONNECT): the proxy
        sees the host and its own credentials, never the request."""
        authority = f"{self._host}:{self._port}"
        headers = [("Host", authority)]
        if proxy_auth is not None:
            headers.append(("Proxy-Authorization", proxy_auth))
        http = connection.http
        request = h11.Request(method="CONNECT", target=authority, headers=headers)
        connection.writer.write(_bytes(http, request, h11.EndOfMessage()))
        event = await connection.next_event()
        while isinstance(event, h11.InformationalResponse):
            event = await connection.next_event()
        if not isinstance(event, h11.Response) or not 200 <= event.status_code < 300:
            status = getattr(event, "status_code", None)
            raise _ProtocolFailed(f"the proxy refused the tunnel (status {status})")
        # The tunnel is open: what follows is TLS, not this HTTP exchange.
        connection.http = h11.Connection(h11.CLIENT)

    async def _connection(self) -> _Connection:
        if self._closed:
            raise RuntimeError("H11Transport is closed")
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable():
                return connection
            self._discard(connection)
        return await self._connect()

    def _discard(self, connection: _Connection) -> None:
        self._open.discard(connection)
        connection.close()

    def _release(self, connection: _Connection) -> None:
        http = connection.http
        if http.our_state is h11.DONE and http.their_state is h11.DONE and not self._closed:
            http.start_next_cycle()
            self._idle.append(connection)
        else:
            self._discard(connection)

    async def complete(self, messages: Messages, *, stall_s: StallLimit = None) -> Completion:
        return await self._trial.send(
            self.streaming, functools.partial(self._complete, messages, stall_s)
        )

    async def _complete(
        self, messages: Messages, stall_s: StallLimit, streaming: bool
    ) -> Completion:
        payload = chat_body(self._model, messages, self._params)
        if streaming:
            payload.update(STREAM_PARAMS)
        data = JSON_ENCODER.encode(payload).encode()
        watch: Watchdog | None = None
        try:
            async with asyncio.timeout(None) as scope:
                watch = Watchdog(scope, stall_s, self._total_s)
                try:
                    outcome = await self._exchange(data, watch, streaming)
                finally:
                    watch.close()
        except TimeoutError:
            if watch is not None and watch.expired == "stall":
                raise stalled_error(watch) from None
            raise APITimeout("request timed out") from None
        except UnparseableResponse as exc:
            # A stream's error event may quote the request, and so the key.
            raise type(exc)(redact(str(exc), self._secrets)) from None
        except (OSError, h11.ProtocolError, _ProtocolFailed) as exc:
            # Refused, reset, dropped mid-body, bad HTTP, TLS, a proxy's no.
            raise APIConnectionFailed(
                redact(f"Connection error: {type(exc).__name__}: {exc}", self._secrets)
            ) from None
        if isinstance(outcome, Completion):
            return outcome
        status, body, headers = outcome
        if streaming and rejects_streaming(status, body):
            self._stop_streaming("the server rejects streaming requests (400 naming stream)")
            return await self.complete(messages, stall_s=stall_s)
        raise APIStatus.from_response(status, redact_bytes(body, self._secrets), headers)

    async def _exchange(
        self, data: bytes, watch: Watchdog, streaming: bool
    ) -> Completion | tuple[int, bytes, dict[str, str]]:
        """Send one request and read its answer: a Completion, or a non-2xx
        (status, body, headers). The connection goes back to the pool only
        when the exchange ended cleanly (not when cut by the watchdog)."""
        connection = await self._connection()
        done = False
        try:
            http = connection.http
            head = h11.Request(
                method="POST",
                target=self._target,
                headers=[*self._headers, ("Content-Length", str(len(data)))],
            )
            connection.writer.write(_bytes(http, head, h11.Data(data=data), h11.EndOfMessage()))
            await connection.writer.drain()
            response = await connection.next_event()
            while isinstance(response, h11.InformationalResponse):
                response = await connection.next_event()
            if not isinstance(response, h11.Response):
                raise _ProtocolFailed(f"no response ({type(response).__name__})")
            watch.beat()
            headers = lowered_headers(
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in response.headers
            )
            status = response.status_code
            if 200 <= status < 300:
                result: Completion | tuple[int, bytes, dict[str, str]] = await self._answer(
                    connection, headers, watch, streaming
                )
            else:
                result = (status, await _body(connection, watch), headers)
            done = True
            return result
        finally:
            if done:
                self._release(connection)
            else:
                self._discard(connection)

    async def _answer(
        self,
        connection: _Connection,
        headers: Mapping[str, str],
        watch: Watchdog,
        streaming: bool,
    ) -> Completion:
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if streaming and content_type == EVENT_STREAM:
            assembler = StreamAssembler()
            try:
                while type(event := await connection.next_event()) is h11.Data:
                    watch.beat()
                    assembler.feed(event.data, watch.last)
                _ended(event)
            except (OSError, h11.ProtocolError, _ProtocolFailed):
                # After [DONE] the stream is over, whatever becomes of the
                # body's framing: llama-cpp-python's server, cutting a stream
                # short, sends [DONE] and then drops the connection. What
                # came is the answer, or a part of one (see streamed_completion).
                # (The connection, not done, is not reused.)
                if not assembler.done:
                    raise
            return streamed_completion(assembler, headers, watch, self._stop_streaming)
        body = await _body(connection, watch)
        return whole_completion(body, headers, watch, streaming, self._stop_streaming)

    async def aclose(self) -> None:
        self._closed = True
        self._idle.clear()
        connections, self._open = self._open, set()
        for connection in connections:
            connection.close()


def _bytes(http: h11.Connection, *events: Any) -> bytes:
    """What to write to send ``events``."""
    return b"".join(http.send(event) or b"" for event in events)


def _ended(event: object) -> None:
    if not isinstance(event, h11.EndOfMessage):
        raise _ProtocolFailed(f"the body ended with {type(event).__name__}")


async def _body(connection: _Connection, watch: Watchdog) -> bytes:
    parts = []
    while type(event := await connection.next_event()) is h11.Data:
        watch.beat()
        parts.append(event.data)
    _ended(event)
    return b"".join(parts)
