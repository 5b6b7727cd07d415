"""The run's ways of not paying twice: answers carried over from a run over
an earlier version of the input, the response cache across runs, and in-run
dedup of identical requests. Opened from the config alone, so that a fresh
run's first rows are looked up before the input is read in full."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.cache import Admission as Admission
from pipeline.cache import (
    BestEffortCache,
    CachedAnswer,
    InRunDedup,
    ResponseCache,
    default_cache_path,
    key_function,
    resolve_enabled,
)
from pipeline.results import RowResult

if TYPE_CHECKING:
    from pipeline.config import RunConfig

# A request's chat messages, as ``prompt.messages`` makes them.
Messages = list[dict[str, str]]


@dataclass
class Reuse:
    """The run's ways of not paying twice, all keyed on the full request: the
    answers carried over from a run over an earlier version of the input, the
    response cache across runs, and in-run dedup of identical requests."""

    make_key: Callable[[Messages], bytes]
    cache: BestEffortCache | None = None
    dedup: InRunDedup[RowResult] | None = None
    carried: ResponseCache | None = None

    @property
    def lookups(self) -> list[ResponseCache | BestEffortCache]:
        return [store for store in (self.carried, self.cache) if store is not None]

    async def answers_for(self, keys: list[bytes]) -> dict[bytes, CachedAnswer]:
        hits: dict[bytes, CachedAnswer] = {}
        for store in self.lookups:
            missing = [key for key in keys if key not in hits]
            if missing:
                hits.update(await asyncio.to_thread(store.get_many, missing))
        return hits

    def close(self) -> None:
        for store in self.lookups:
            store.close()


def open_reuse(
    config: RunConfig,
    response_format: dict[str, Any] | None,
    carried: ResponseCache | None,
    on_warning: Callable[[str], None],
) -> Reuse:
    """``carried``: the answers a run over an earlier version of the input
    left (``Checkpoint.carried``); ``on_warning`` hears about a damaged cache."""
    params = config.model.request_params()
    use_cache = resolve_enabled(config.cache.enabled, params)
    use_dedup = resolve_enabled(config.cache.dedup, params)
    # Keys are made even with cache and dedup off: the checkpoint keeps them,
    # so a run over a changed input can reuse what did not change.
    make_key = key_function(
        endpoint=config.model.endpoint(),
        model=config.model.name,
        params=params,
        response_format=response_format,
    )
    cache = None
    if use_cache:
        cache = BestEffortCache.open(config.cache.path or default_cache_path(), on_warning)
    # With the cache on, it finds answers dedup has forgotten: remember few.
    dedup = None
    if use_dedup:
        dedup = InRunDedup[RowResult](10_000 if use_cache else 100_000, weigh=_answer_bytes)
    return Reuse(make_key, cache, dedup, carried)


def _answer_bytes(result: RowResult) -> int:
    return len(result.response or "")


def cached_answer(result: RowResult) -> CachedAnswer:
    return CachedAnswer(
        response=result.response,
        finish_reason=result.finish_reason,
        model=result.model,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )
