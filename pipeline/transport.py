"""How a request is sent: transports that turn a list of messages into a
``Completion`` or raise the ``openai`` SDK's exception classes, so the call
stage classifies failures the same way whichever transport is used."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import openai
import pydantic

from pipeline.config import ModelConfig

Messages = Sequence[Mapping[str, str]]


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


class OpenAITransport:
    """The official ``openai`` client, with its own retries switched off so
    attempts do not multiply with ours."""

    def __init__(self, model: ModelConfig, api_key: str) -> None:
        self._model = model.name
        self._params = model.request_params()
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=model.resolved_base_url(),
            timeout=model.timeout_s,
            max_retries=0,
        )

    async def complete(self, messages: Messages) -> Completion:
        raw = await self._client.chat.completions.with_raw_response.create(
            model=self._model,
            messages=messages,  # type: ignore[arg-type]
            **self._params,
        )
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
