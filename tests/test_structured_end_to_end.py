"""Structured output over real HTTP: answers validated, re-asked when bad,
and their fields as typed columns."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline import FatalAPIError, enrich
from pipeline.simulate import expected_structured_answer

from conftest import StartServer, make_config, write_questions

SCHEMA = Path(__file__).parent.parent / "configs" / "schemas" / "sentiment.schema.json"


def test_fields_become_typed_columns_beside_the_raw_response(
    tmp_path: Path, start_server: StartServer
) -> None:
    import json

    server = start_server()
    prompts = ["great product", "awful service, never again"]
    source = write_questions(tmp_path / "in.parquet", prompts)

    enrich(
        make_config(
            source, tmp_path / "out.parquet", server.base_url, **{"structured.schema": str(SCHEMA)}
        )
    )

    out = pl.read_parquet(tmp_path / "out.parquet")
    schema = json.loads(SCHEMA.read_text())
    assert out.schema["label"] == pl.String
    assert out.schema["score"] == pl.Float64
    assert out.schema["predicted_stars"] == pl.Int64
    assert out.schema["sarcastic"] == pl.Boolean
    assert out.schema["topics"] == pl.List(pl.String)
    for row, text in zip(out.iter_rows(named=True), prompts, strict=True):
        expected = expected_structured_answer([{"role": "user", "content": text}], "sim-1", schema)
        assert json.loads(row["response"]) == expected
        assert row["predicted_stars"] == expected["predicted_stars"]
        assert row["label"] == expected["label"]


def test_a_bad_answer_is_asked_again_then_reported(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = ["fine", "flaky [[fault:badjson:1]]", "broken [[fault:invalid]]"]
    source = write_questions(tmp_path / "in.parquet", prompts)

    summary = enrich(
        make_config(
            source,
            tmp_path / "out.parquet",
            server.base_url,
            **{"structured.schema": str(SCHEMA), "structured.max_attempts": 3},
        )
    )

    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "ok", "error"]
    assert out["attempts"].to_list() == [1, 2, 3]
    assert "invalid structured answer" in out["error"][2]
    assert "--schema-attempts" in out["error"][2]
    assert out["label"][2] is None
    assert server.stats.requests == 6
    assert summary.bad_answers == 4


def test_a_server_without_json_schema_support_stops_the_run_with_the_fix(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(structured=False)
    source = write_questions(tmp_path / "in.parquet", [f"q{i}" for i in range(40)])
    config = make_config(
        source, tmp_path / "out.parquet", server.base_url, **{"structured.schema": str(SCHEMA)}
    )

    with pytest.raises(FatalAPIError, match="schema"):
        enrich(config)

    assert server.stats.requests <= config.limits.concurrency
