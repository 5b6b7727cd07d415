"""The plan stage: everything a run decides once, before it touches the
checkpoint or sends a request: the input, prompt and output validated, the
settings that change an answer and their fingerprint, the response format
and answer check of structured output, and where the report goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import prompt, structured, write
from pipeline.costs import Estimate, estimate_from_sample
from pipeline.errors import ConfigError
from pipeline.identity import answer_settings as answer_settings
from pipeline.prompt import prompt_spec as prompt_spec
from pipeline.read import InputSource, open_input
from pipeline.report import JobFacts, fingerprint, report_path_for

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pipeline.checkpoint import InputIdentity
    from pipeline.config import RunConfig
    from pipeline.costs import Price
    from pipeline.transport import Completion


@dataclass(frozen=True)
class PreparedRun:
    """Everything validated before the first request."""

    config: RunConfig
    source: InputSource
    spec: prompt.PromptSpec
    total_rows: int
    schema: dict[str, Any] | None = None
    """The JSON Schema answers must follow (structured output), if any."""

    @property
    def response_format(self) -> dict[str, Any] | None:
        if self.schema is None:
            return None
        return structured.response_format(self.schema, self.config.structured.name)

    @property
    def settings(self) -> dict[str, Any]:
        return answer_settings(self.config, self.response_format)


def prepare(config: RunConfig, *, check_output: bool = True) -> PreparedRun:
    """Validate input, prompt and output; raises typed errors, sends nothing.
    ``check_output=False`` for commands that write nothing (estimate)."""
    config.model.resolved_base_url()  # a bad $OPENAI_BASE_URL stops here, before any write
    source = open_input(config.input.path)
    spec = prompt_spec(config)
    prompt.validate(spec, source.columns(), source=str(source.path))
    prompt.check_types(spec, source.schema, source=str(source.path))
    if check_output:
        write.check_output_path(config.output.path, config.input.path)
        # A remote output's run directory, lock and report live locally
        # under its stand-in path: its folder must exist before the lock.
        config.output.local_path.parent.mkdir(parents=True, exist_ok=True)
    taken = [
        *source.columns(),
        *write.output_column_names(source.columns(), config.output.column_prefix),
    ]
    schema = None
    if config.structured.json_schema is not None:
        schema = structured.load_schema(config.structured.json_schema)
        fields = structured.columns_schema(schema, config.output.column_prefix).names
        clashes = sorted(set(fields) & set(taken))
        if clashes:
            raise ConfigError(
                f"the schema's fields {', '.join(clashes)} clash with input or result columns; "
                "rename them in the schema or set --column-prefix"
            )
    return PreparedRun(config, source, spec, source.count_rows(), schema)


@dataclass(frozen=True)
class Plan:
    """A prepared run and what follows from it, made once."""

    prepared: PreparedRun
    settings: dict[str, Any]
    fingerprint: str
    """sha256 of ``settings``: the checkpoint manifest's and the report's."""
    response_format: dict[str, Any] | None
    run_dir: Path
    report_path: Path
    secrets: tuple[str | None, ...]
    check_answer: Callable[[Completion], str | None] | None = field(repr=False)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_s: float = field(default_factory=time.perf_counter)
    """When the run started, for the report and for its wall time."""

    @property
    def config(self) -> RunConfig:
        return self.prepared.config

    @property
    def total_rows(self) -> int:
        return self.prepared.total_rows

    @property
    def extra_params(self) -> dict[str, Any] | None:
        """What every request carries besides the model's settings (the
        structured output's ``response_format``), whichever route sends it."""
        if self.response_format is None:
            return None
        return {"response_format": self.response_format}

    def job(
        self,
        input_identity: InputIdentity | None,
        price: Price | None,
        *,
        estimate: Estimate | None = None,
        earlier_segments: Sequence[dict[str, Any]] = (),
    ) -> JobFacts:
        """What every report of this run says about the job."""
        config = self.config
        return JobFacts(
            output=config.output.path,
            settings=config.to_dict(),
            fingerprint=self.fingerprint,
            input_identity=input_identity,
            input_rows=self.total_rows,
            output_settings={"column_prefix": config.output.column_prefix},
            price=price,
            model=config.model.name,
            max_cost=config.max_cost,
            secrets=self.secrets,
            estimate_before_run=estimate,
            earlier_segments=tuple(earlier_segments),
        )

    def estimate(self, price: Price | None) -> Estimate:
        """What ``enrich estimate`` would say, from the first rows scaled to
        the input: the report keeps it so that the page can set the run's
        cost against it. Reads up to 1,000 rows (call it in a thread)."""
        config = self.config
        return estimate_from_sample(
            self.prepared.source,
            self.prepared.spec,
            self.total_rows,
            model=config.model.name,
            price=price,
            max_tokens=config.model.max_tokens,
            concurrency=config.limits.concurrency,
            rpm=config.limits.rpm,
            tpm=config.limits.tpm,
        )


def make_plan(prepared: PreparedRun) -> Plan:
    config = prepared.config
    settings = prepared.settings
    return Plan(
        prepared=prepared,
        settings=settings,
        fingerprint=fingerprint(settings),
        response_format=prepared.response_format,
        run_dir=config.output.resolved_run_dir,
        report_path=config.output.report or report_path_for(config.output.local_path),
        secrets=(config.api_key(),),
        check_answer=answer_check(prepared.schema),
    )


def answer_check(schema: dict[str, Any] | None) -> Callable[[Completion], str | None] | None:
    """With a schema, what is wrong with an answer (None when it validates)."""
    if schema is None:
        return None

    def problem(completion: Completion) -> str | None:
        try:
            structured.parse_answer(completion.text, schema, finish_reason=completion.finish_reason)
        except structured.StructuredAnswerError as exc:
            return exc.reason
        return None

    return problem
