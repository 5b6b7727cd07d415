"""The one redaction: what keeps the API key (and other credentials) out of
logs, error messages, reports and checkpoints.

Text and bytes lose every occurrence of the secrets they are given
(``redact``, ``redact_bytes``); settings written down lose, besides, string
values under secret-looking key names, URL passwords and secret query
parameters (``redact_settings``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED: Final = "[redacted]"

# Shorter "keys" are placeholders for local servers that accept anything
# (OPENAI_API_KEY=x for llama.cpp); scrubbing every "x" from the logs would
# destroy them and protect nothing. Real provider keys are 20+ characters.
MIN_SECRET_LENGTH: Final = 8

# Key names whose string values are credentials. Numbers under such names
# (max_tokens, tpm, prompt_tokens) are counts and limits, never secrets.
_SECRET_NAME: Final = re.compile(
    r"key|token|secret|passw|credential|auth|bearer|cookie|signature", re.IGNORECASE
)


def usable_secrets(secrets: Iterable[str | None]) -> tuple[str, ...]:
    """The secrets worth scrubbing, longest first (so a secret that contains
    another is replaced whole)."""
    kept = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
    return tuple(sorted(kept, key=len, reverse=True))


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every occurrence of each secret replaced by ``[redacted]``.

    JSON-escaped forms are covered too, since a key with a quote or a
    backslash is written differently inside a JSON string."""
    for secret in usable_secrets(secrets):
        text = text.replace(secret, REDACTED)
        escaped = json.dumps(secret)[1:-1]
        if escaped != secret:
            text = text.replace(escaped, REDACTED)
    return text


def redact_bytes(body: bytes, secrets: Iterable[str | None]) -> bytes:
    """``redact`` for a response body that has not been decoded (and may not be text)."""
    for secret in usable_secrets(secrets):
        for form in {secret, json.dumps(secret)[1:-1]}:
            body = body.replace(form.encode(), REDACTED.encode())
    return body


def _scrub_url(text: str) -> str:
    """A URL without a password in its userinfo or secret-looking query
    parameters (``?api-key=...``); other text unchanged."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    netloc = parts.netloc
    if parts.password is not None:
        host = netloc.rsplit("@", 1)[1]
        netloc = f"{parts.username}:{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_NAME.search(name) for name, _ in pairs):
            query = urlencode(
                [(n, REDACTED if _SECRET_NAME.search(n) else v) for n, v in pairs], safe="[]"
            )
    if (netloc, query) == (parts.netloc, parts.query):
        return text
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_settings(value: Any, secrets: Sequence[str | None] = ()) -> Any:
    """Settings safe to write down: string values under secret-looking key
    names become ``[redacted]`` (names ending in ``_env`` only *name* an
    environment variable and are kept), any occurrence of a secret in a string
    is replaced, and URLs lose passwords and secret query parameters. Other
    values are returned as they are."""

    def walk(node: Any, name: str | None) -> Any:
        if isinstance(node, Mapping):
            return {str(k): walk(v, str(k)) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [walk(v, name) for v in node]
        if isinstance(node, str):
            if name is not None and _SECRET_NAME.search(name) and not name.endswith("_env"):
                return REDACTED
            return redact(_scrub_url(node), secrets)
        return node

    return walk(value, None)
