"""enrich's own transport errors: what a request that brought back no
completion was, whichever HTTP client sent it.

Transports raise these and nothing else for a failed request (as httpx maps
the errors of the libraries under it into its own hierarchy): the aiohttp
transport raises them directly, and the openai SDK transport translates the
SDK's exceptions into them in one function (``pipeline.transport.sdk_error``).
``pipeline.call.classify`` matches only these types, so a new SDK or aiohttp
version cannot silently change how a failure is classified. A request cut
for going silent (``pipeline.stall.StalledRequest``) is one of them too.

Standard library only: importing this costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = [
    "APIConnectionFailed",
    "APIStatus",
    "APITimeout",
    "TransportError",
    "TruncatedStream",
    "UnparseableResponse",
    "lowered_headers",
]


class TransportError(Exception):
    """A request that brought back no completion."""


class APITimeout(TransportError):
    """No complete answer within ``model.timeout_s``."""


class APIConnectionFailed(TransportError):
    """No HTTP answer: connection refused, reset or dropped mid-body, a bad
    HTTP response, TLS. The message never holds the API key."""


class UnparseableResponse(TransportError):
    """A 200 whose body is not a chat completion: transient, worth a retry."""


class TruncatedStream(UnparseableResponse):
    """A streamed answer that ended, ``[DONE]`` or not, before its finish
    reason: the server cut it short (llama-cpp-python's server does so to a
    stream when another request comes, its ``interrupt_requests``). Not an
    answer: transient, retried, and the transports stop streaming."""


# An OpenAI error body is ``{"error": {"message", "type", "param", "code"}}``.
_ERROR_KEY: Final = "error"


def lowered_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Response headers as a plain dict with lowercase names (a repeated
    header keeps its last value), as ``Completion.headers`` has them."""
    return {name.lower(): value for name, value in items}


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


class APIStatus(TransportError):
    """A non-2xx answer.

    ``body`` is the ``error`` object of an OpenAI-style JSON body (the whole
    JSON value if it has no ``error`` key; the body text if it is not JSON);
    ``code``, ``type`` and ``param`` are its fields when they are strings
    (an integer ``code`` is kept as text); ``message`` is the server's message
    ("" when it gave none); ``headers`` are lowercase. ``str()`` reads
    ``Error code: <status> - <message>``, like the openai SDK's errors.
    """

    def __init__(
        self,
        status_code: int,
        *,
        headers: Mapping[str, str] | None = None,
        body: object = None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
        message: str = "",
    ) -> None:
        text = f"Error code: {status_code}" + (f" - {message}" if message else "")
        super().__init__(text)
        self.status_code = status_code
        self.headers: Mapping[str, str] = lowered_headers((headers or {}).items())
        self.body = body
        self.code = code
        self.type = type
        self.param = param
        self.message = message

    @property
    def request_id(self) -> str | None:
        """The server's ``x-request-id``, worth quoting to a provider's support."""
        return self.headers.get("x-request-id")

    @classmethod
    def from_response(cls, status_code: int, body: bytes, headers: Mapping[str, str]) -> APIStatus:
        """Read an error answer: its status, raw body and lowercase headers."""
        text = body.decode("utf-8", errors="replace").strip()
        parsed: object = text
        if text:
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
        error = parsed.get(_ERROR_KEY, parsed) if isinstance(parsed, Mapping) else parsed
        fields: Mapping[str, object] = error if isinstance(error, Mapping) else {}
        message = fields.get("message")
        code = fields.get("code")
        if isinstance(code, int) and not isinstance(code, bool):
            code = str(code)
        return cls(
            status_code,
            headers=headers,
            body=error,
            code=_optional_str(code),
            type=_optional_str(fields.get("type")),
            param=_optional_str(fields.get("param")),
            # A message that is not text (a list, an object) is still what the server said.
            message=message if isinstance(message, str) else (str(message) if message else ""),
        )
