"""enrich: enrich datasets with LLM answers, rate-limited, checkpointed, resumable.

Library use (what an Airflow task calls)::

    from pipeline import enrich, load_config
    summary = enrich("configs/example.toml", rpm=500)       # a TOML file, flags as keywords
    summary = enrich(input="reviews.csv", column="body", output="out.parquet")
    summary = await enrich_async(...)                         # in a running event loop

``enrich`` also works from a notebook cell (a running event loop) and raises
``TooManyFailedRows`` (carrying ``.summary``) when failed rows pass
``max_error_rate``, as the CLI exits 1.

Importing ``pipeline`` loads none of the heavy libraries (openai, polars,
pyarrow, aiohttp, pydantic): each name below is imported from its module the
first time it is used (a module ``__getattr__``), so ``enrich --help`` and an
Airflow DAG file that only names a task stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pipeline.api import enrich, enrich_async
    from pipeline.call import CallStage, ChatRequest
    from pipeline.config import (
        CheckpointConfig,
        InputConfig,
        LimitsConfig,
        ModelConfig,
        OutputConfig,
        RunConfig,
        load_config,
    )
    from pipeline.errors import (
        CheckpointMismatch,
        ConfigError,
        EnrichError,
        FatalAPIError,
        InputError,
        MissingSetting,
        OutputError,
        RunInterrupted,
        TooManyFailedRows,
        UsageError,
    )
    from pipeline.results import RESULT_COLUMNS, RowResult
    from pipeline.runner import RunOptions, RunSummary
    from pipeline.transport import (
        AiohttpTransport,
        Completion,
        OpenAITransport,
        Transport,
        make_transport,
    )
    from pipeline.transport_errors import (
        APIConnectionFailed,
        APIStatus,
        APITimeout,
        TransportError,
        UnparseableResponse,
    )
    from pipeline.transport_h11 import H11Transport

# Where each public name lives.
_EXPORTS: Final[dict[str, str]] = {
    "CallStage": "pipeline.call",
    "ChatRequest": "pipeline.call",
    "CheckpointConfig": "pipeline.config",
    "InputConfig": "pipeline.config",
    "LimitsConfig": "pipeline.config",
    "ModelConfig": "pipeline.config",
    "OutputConfig": "pipeline.config",
    "RunConfig": "pipeline.config",
    "load_config": "pipeline.config",
    "CheckpointMismatch": "pipeline.errors",
    "ConfigError": "pipeline.errors",
    "EnrichError": "pipeline.errors",
    "FatalAPIError": "pipeline.errors",
    "InputError": "pipeline.errors",
    "MissingSetting": "pipeline.errors",
    "TooManyFailedRows": "pipeline.errors",
    "OutputError": "pipeline.errors",
    "RunInterrupted": "pipeline.errors",
    "UsageError": "pipeline.errors",
    "RESULT_COLUMNS": "pipeline.results",
    "RowResult": "pipeline.results",
    "RunOptions": "pipeline.runner",
    "RunSummary": "pipeline.runner",
    "enrich": "pipeline.api",
    "enrich_async": "pipeline.api",
    "AiohttpTransport": "pipeline.transport",
    "Completion": "pipeline.transport",
    "OpenAITransport": "pipeline.transport",
    "Transport": "pipeline.transport",
    "make_transport": "pipeline.transport",
    "H11Transport": "pipeline.transport_h11",
    "APIConnectionFailed": "pipeline.transport_errors",
    "APIStatus": "pipeline.transport_errors",
    "APITimeout": "pipeline.transport_errors",
    "TransportError": "pipeline.transport_errors",
    "UnparseableResponse": "pipeline.transport_errors",
}

__all__ = [
    "RESULT_COLUMNS",
    "APIConnectionFailed",
    "APIStatus",
    "APITimeout",
    "AiohttpTransport",
    "CallStage",
    "ChatRequest",
    "CheckpointConfig",
    "CheckpointMismatch",
    "Completion",
    "ConfigError",
    "EnrichError",
    "FatalAPIError",
    "H11Transport",
    "InputConfig",
    "InputError",
    "LimitsConfig",
    "MissingSetting",
    "ModelConfig",
    "OpenAITransport",
    "OutputConfig",
    "OutputError",
    "RowResult",
    "RunConfig",
    "RunInterrupted",
    "RunOptions",
    "RunSummary",
    "TooManyFailedRows",
    "Transport",
    "TransportError",
    "UnparseableResponse",
    "UsageError",
    "enrich",
    "enrich_async",
    "load_config",
    "make_transport",
]


if not TYPE_CHECKING:
    # Hidden from type checkers: they see the imports above, so a misspelled
    # name is still an error for them, not an Any.

    def __getattr__(name: str) -> Any:
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # the next lookup does not come here
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
