"""Whether a run takes a head start (``pipeline.head``), decided from the
config and the first rows of its input alone, before pyarrow is imported:
``plan_head`` checks what the full path would refuse before sending and
reads the rows; ``HeadPlan.fresh``, asked under the output's lock, says
whether there is nothing to resume and nothing up to date."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pipeline import prompt
from pipeline.costs import PriceTable
from pipeline.head_read import Format, HeadRows, read_head
from pipeline.storage import ObjectUri, check_output_path

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.transport import Completion
    from pipeline.wiring import RunOptions

__all__ = ["HeadPlan", "plan_head"]

_FORMATS: Final[dict[str, Format]] = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson": "jsonl",
    ".ndjson.gz": "jsonl",
}


@dataclass(frozen=True)
class HeadPlan:
    """A head start decided on: the config, this invocation's options and
    the first rows (what ``pipeline.stage`` needs of a plan, too)."""

    config: RunConfig
    options: RunOptions
    rows: HeadRows
    extra_params: dict[str, Any] | None = None
    check_answer: Callable[[Completion], str | None] | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_s: float = field(default_factory=time.perf_counter)

    def fresh(self) -> bool:
        """Whether the run starts from nothing: no checkpoint to resume, and
        no output that the last run's report says is up to date (a nightly
        job rewriting the same output over a new input is fresh). Asked with
        the output's lock held (an overlapping run may have made one
        meanwhile)."""
        config = self.config
        output = config.output
        run_dir = output.resolved_run_dir
        if run_dir.exists() and any(run_dir.iterdir()):
            return False
        if self.options.restart or self.options.force or not output.resolved_report.exists():
            return True
        from pipeline.identity import answer_settings
        from pipeline.report import check_up_to_date, fingerprint

        # The full path's check (pipeline.resume.up_to_date): up to date, the
        # run has nothing to send, and the full path says so.
        last = check_up_to_date(
            output.resolved_report,
            output=output.path,
            input_path=config.input.path,
            fingerprint=fingerprint(answer_settings(config)),
            output_settings={"column_prefix": output.column_prefix},
        )
        return not last.up_to_date


def _format(config: RunConfig) -> Format | None:
    """The input's format when the run can take a head start."""
    if config.run.engine != "local" or config.route != "online":
        return None
    if config.structured.json_schema is not None or config.max_cost is not None:
        return None  # answer columns and the spend cap are settled by the full path
    path, output = config.input.path, config.output.path
    if isinstance(path, ObjectUri) or isinstance(output, ObjectUri):
        return None
    name = path.name.lower()
    for ext in sorted(_FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return _FORMATS[ext]
    return None


def plan_head(config: RunConfig, options: RunOptions) -> HeadPlan | None:
    """The head start this run can take, or None (the full path). Raises
    the full path's typed errors for what it checks: the base URL, the prompt
    source, the output path and a prompt column the CSV header lacks."""
    fmt = _format(config)
    if fmt is None:
        return None
    config.model.resolved_base_url()  # a bad $OPENAI_BASE_URL stops here, before any write
    spec = prompt.prompt_spec(config)
    prompt.needed_columns(spec)
    if config.price_file is not None:
        PriceTable.load(config.price_file)  # a bad --price-file stops here, as on the full path
    check_output_path(config.output.path, config.input.path)
    assert isinstance(config.input.path, Path)
    rows = read_head(config.input.path.expanduser(), fmt, spec, config.limits.concurrency)
    if rows is None:
        return None
    bound = config.input.max_prompt_tokens
    if bound is not None:
        # A prompt over the bound is refused by the feed, with its warning.
        prompts = [
            (row_id, text)
            for row_id, text in rows.prompts
            if prompt.estimate_prompt_tokens(prompt.messages(spec, text)) <= bound
        ]
        rows = HeadRows(rows.columns, prompts)
    if not rows.prompts:
        return None
    config.output.local_path.parent.mkdir(parents=True, exist_ok=True)
    return HeadPlan(config, options, rows)
