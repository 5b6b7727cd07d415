"""Shared fixtures: a real local OpenAI-compatible server on 127.0.0.1 and
small datasets. Nothing here mocks our own code: the client is the real
``openai`` SDK over real HTTP."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.config import RunConfig, load_config
from pipeline.simulate import Simulator, SimulatorConfig, expected_answer

MODEL = "sim-1"

StartServer = Callable[..., Simulator]


@pytest.fixture(autouse=True)
def isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Each test gets its own response cache (subprocesses inherit the variable)."""
    directory = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("ENRICH_CACHE_DIR", str(directory))
    return directory


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Start simulators in background threads; all are stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(**settings: Any) -> Simulator:
            return stack.enter_context(Simulator.run_in_thread(SimulatorConfig(**settings)))

        yield start


def make_config(
    input_path: Path | str, output: Path | str, base_url: str, **overrides: Any
) -> RunConfig:
    """A run config for tests: fast backoff, prompts from the 'question' column."""
    values: dict[str, Any] = {
        "input.path": input_path,
        "input.column": "question",
        "output.path": output,
        "model.name": MODEL,
        "model.base_url": base_url,
        "model.timeout_s": 2.0,
        "limits.concurrency": 16,
        "limits.backoff_base_s": 0.01,
        "limits.backoff_max_s": 0.2,
        "limits.max_attempts": 8,
        # Drawing the page costs most of a second; the tests of the page ask for it.
        "output.page": False,
    }
    values.update(overrides)
    if "input.template" in overrides:
        values.pop("input.column")
    return load_config(None, values)


def write_questions(path: Path, prompts: Sequence[str | None], **extra: Sequence[Any]) -> Path:
    """A dataset with an 'id' column, the prompts in 'question', and extra columns."""
    frame = pl.DataFrame({"id": list(range(len(prompts))), "question": prompts, **extra})
    if path.suffix == ".csv":
        frame.write_csv(path)
    elif path.suffix == ".jsonl":
        frame.write_ndjson(path)
    else:
        frame.write_parquet(path)
    return path


def answer_for(prompt: str, system_prompt: str | None = None) -> str:
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return expected_answer(messages, MODEL)


def report_value(report: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of a run report (``"counts.ok"``): how the
    page and the metrics name the report's numbers."""
    node: Any = report
    for part in key.split("."):
        node = node[part]
    return node
