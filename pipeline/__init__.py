"""enrich: enrich datasets with LLM answers, rate-limited, checkpointed, resumable.

Library use (what an Airflow task calls)::

    from pipeline import enrich, load_config
    summary = enrich(load_config(Path("configs/example.toml")))
"""

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
    OutputError,
    RunInterrupted,
    UsageError,
)
from pipeline.results import RESULT_COLUMNS, RowResult
from pipeline.runner import RunOptions, RunSummary, enrich, enrich_async
from pipeline.transport import (
    AiohttpTransport,
    Completion,
    OpenAITransport,
    Transport,
    make_transport,
)

__all__ = [
    "RESULT_COLUMNS",
    "AiohttpTransport",
    "CallStage",
    "ChatRequest",
    "CheckpointConfig",
    "CheckpointMismatch",
    "Completion",
    "ConfigError",
    "EnrichError",
    "FatalAPIError",
    "InputConfig",
    "InputError",
    "LimitsConfig",
    "ModelConfig",
    "OpenAITransport",
    "OutputConfig",
    "OutputError",
    "RowResult",
    "RunConfig",
    "RunInterrupted",
    "RunOptions",
    "RunSummary",
    "Transport",
    "UsageError",
    "enrich",
    "enrich_async",
    "load_config",
    "make_transport",
]
