"""Structured output: loading the schema, typed columns, parsing and
validating answers, and the message for servers that cannot do it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError
from pipeline.structured import (
    StructuredAnswerError,
    columns_schema,
    load_answer,
    load_schema,
    parse_answer,
    response_format,
    to_columns,
    unsupported_message,
)

REPO = Path(__file__).resolve().parent.parent

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number"},
        "stars": {"type": "integer"},
        "sarcastic": {"type": "boolean"},
        "topics": {"type": "array", "items": {"type": "string"}},
        "meta": {"type": "object", "properties": {"lang": {"type": "string"}}},
    },
    "required": ["label", "score", "stars", "sarcastic", "topics"],
    "additionalProperties": False,
}

GOOD = {"label": "positive", "score": 0.9, "stars": 5, "sarcastic": False, "topics": ["fit"]}


# ---------------------------------------------------------------------------
# Loading.


def test_schema_from_a_file_relative_to_a_base_dir(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    assert load_schema("s.json", base_dir=tmp_path) == SCHEMA
    assert load_schema(str(tmp_path / "s.json")) == SCHEMA


def test_schema_inline_as_json_text_or_as_a_table() -> None:
    assert load_schema("  " + json.dumps(SCHEMA)) == SCHEMA
    loaded = load_schema(SCHEMA)
    assert loaded == SCHEMA
    assert loaded is not SCHEMA  # a copy: the caller's table is not shared


def test_the_example_schema_loads_and_suits_openai_strict_mode() -> None:
    schema = load_schema(str(REPO / "configs" / "schemas" / "sentiment.schema.json"))
    assert set(schema["required"]) == set(schema["properties"])
    assert schema["additionalProperties"] is False
    assert columns_schema(schema).names == [
        "label",
        "score",
        "predicted_stars",
        "sarcastic",
        "topics",
    ]


def test_the_shipped_schema_and_the_shipped_reviews_work_together_without_a_prefix(
    tmp_path: Path,
) -> None:
    from pipeline.config import load_config
    from pipeline.runner import prepare

    config = load_config(
        input=REPO / "data" / "reviews.csv",
        template="Classify: {title}. {body}",
        output=tmp_path / "out.parquet",
        schema=str(REPO / "configs" / "schemas" / "sentiment.schema.json"),
    )
    assert prepare(config).schema is not None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("missing.json", r"schema file .*missing\.json not found.*--schema"),
        ('{"type": "object", "properties": ', r"inline schema .* is not valid JSON.*line 1"),
        ({"type": "array", "items": {}}, r"object at the top level.*--schema"),
        ({"type": "object"}, r"at least one property"),
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, r"not a valid JSON Schema"),
        ({"type": "object", "properties": {"at": {"default": dt.date(2024, 1, 1)}}}, r"JSON"),
    ],
)
def test_unusable_schemas_are_config_errors_naming_the_setting(
    tmp_path: Path, value: Any, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_schema(value, base_dir=tmp_path)


def test_a_schema_file_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"schema file .*bad\.json is not valid JSON"):
        load_schema("bad.json", base_dir=tmp_path)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list\.json must be a JSON object"):
        load_schema("list.json", base_dir=tmp_path)


def test_the_setting_named_in_errors_is_configurable() -> None:
    with pytest.raises(ConfigError, match=r"input\.schema"):
        load_schema({"type": "object"}, setting="input.schema")


def test_response_format_is_a_strict_json_schema() -> None:
    assert response_format(SCHEMA) == {
        "type": "json_schema",
        "json_schema": {"name": "row", "schema": SCHEMA, "strict": True},
    }
    assert response_format(SCHEMA, "sentiment")["json_schema"]["name"] == "sentiment"
    with pytest.raises(ConfigError, match="schema name"):
        response_format(SCHEMA, "has spaces")


# ---------------------------------------------------------------------------
# Column types.


def test_each_scalar_kind_gets_its_arrow_type_and_objects_are_json_text() -> None:
    schema = columns_schema(SCHEMA, prefix="llm_")
    assert schema.names == [f"llm_{name}" for name in SCHEMA["properties"]]
    assert schema.types == [
        pa.string(),
        pa.float64(),
        pa.int64(),
        pa.bool_(),
        pa.list_(pa.string()),
        pa.string(),
    ]
    assert all(field.nullable for field in schema)


@pytest.mark.parametrize(
    ("prop", "arrow_type"),
    [
        ({"enum": ["a", "b", None]}, pa.string()),
        ({"enum": [1, 2, 3]}, pa.int64()),
        ({"enum": [1, 2.5]}, pa.float64()),
        ({"const": True}, pa.bool_()),
        ({"enum": ["a", 1]}, pa.string()),
        ({"type": ["integer", "null"]}, pa.int64()),
        ({"anyOf": [{"type": "number"}, {"type": "null"}]}, pa.float64()),
        ({"type": "array", "items": {"type": "integer"}}, pa.list_(pa.int64())),
        ({"type": "array", "items": {"enum": ["x", "y"]}}, pa.list_(pa.string())),
        ({"type": "array", "items": {"type": "object"}}, pa.string()),
        ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, pa.string()),
        ({"$ref": "#/$defs/thing"}, pa.string()),
        ({"type": "string", "format": "date"}, pa.string()),
        ({}, pa.string()),
    ],
)
def test_column_type_of_each_property_shape(prop: dict[str, Any], arrow_type: pa.DataType) -> None:
    schema = columns_schema({"type": "object", "properties": {"x": prop}})
    assert schema.field("x").type == arrow_type


# ---------------------------------------------------------------------------
# Answers.


def test_a_valid_answer_parses_to_its_object() -> None:
    assert parse_answer(json.dumps(GOOD), SCHEMA) == GOOD
    # Servers that wrap the JSON in a Markdown fence are forgiven.
    assert parse_answer("```json\n" + json.dumps(GOOD) + "\n```\n", SCHEMA) == GOOD


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "empty answer"),
        ("   ", "empty answer"),
        ("Sure! Here it is", "not JSON: Expecting value at char 0"),
        ('{"label": "positive",', "not JSON: "),
        ("[1, 2]", "not a JSON object (got array)"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "label"}), "missing field 'label'"),
        (json.dumps({**GOOD, "stars": "5"}), "field 'stars' must be integer (got string)"),
        (json.dumps({**GOOD, "stars": 4.5}), "field 'stars' must be integer (got number)"),
        (json.dumps({**GOOD, "label": "meh"}), "field 'label' must be one of"),
        (json.dumps({**GOOD, "topics": ["ok", 3]}), "field 'topics[1]' must be string"),
        (json.dumps({**GOOD, "meta": {"lang": 1}}), "field 'meta.lang' must be string"),
        (json.dumps({**GOOD, "mood": "x"}), "unexpected field 'mood'"),
        (json.dumps({**GOOD, "stars": 2**70}), "field 'stars' is outside the 64-bit"),
    ],
)
def test_each_kind_of_bad_answer_has_a_short_reason(text: str | None, reason: str) -> None:
    with pytest.raises(StructuredAnswerError) as caught:
        parse_answer(text, SCHEMA)
    assert caught.value.reason.startswith(reason)
    assert str(caught.value) == caught.value.reason
    assert len(caught.value.reason) <= 200


def test_an_answer_cut_at_max_tokens_says_how_to_fix_it() -> None:
    with pytest.raises(StructuredAnswerError, match=r"cut at max_tokens.*--max-tokens"):
        parse_answer('{"label": "posi', SCHEMA, finish_reason="length")
    with pytest.raises(StructuredAnswerError, match="content_filter"):
        parse_answer(None, SCHEMA, finish_reason="content_filter")


def test_an_integral_float_is_an_integer_as_json_schema_says() -> None:
    assert parse_answer(json.dumps({**GOOD, "stars": 5.0}), SCHEMA)["stars"] == 5.0


def test_load_answer_is_lenient_for_answers_already_checked() -> None:
    assert load_answer(json.dumps(GOOD)) == GOOD
    assert load_answer(None) is None
    assert load_answer("not json") is None
    assert load_answer("[1]") is None


# ---------------------------------------------------------------------------
# Columns from answers.


def test_to_columns_types_values_and_nulls(tmp_path: Path) -> None:
    schema = columns_schema(SCHEMA, prefix="llm_")
    values: list[dict[str, Any] | None] = [
        {**GOOD, "stars": 4.0, "score": 1, "meta": {"lang": "en", "n": [1]}},
        None,
        {"label": "neutral", "topics": [], "unknown": "ignored"},
    ]
    table = to_columns(values, schema)
    assert table.schema.equals(schema)
    assert table.num_rows == 3
    assert table.to_pylist() == [
        {
            "llm_label": "positive",
            "llm_score": 1.0,
            "llm_stars": 4,
            "llm_sarcastic": False,
            "llm_topics": ["fit"],
            "llm_meta": '{"lang":"en","n":[1]}',
        },
        dict.fromkeys(schema.names),
        {
            "llm_label": "neutral",
            "llm_score": None,
            "llm_stars": None,
            "llm_sarcastic": None,
            "llm_topics": [],
            "llm_meta": None,
        },
    ]
    # The types survive a trip through Parquet.
    pq.write_table(table, tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").schema.types == schema.types


def test_to_columns_of_no_rows_is_an_empty_typed_table() -> None:
    schema = columns_schema(SCHEMA)
    table = to_columns([], schema)
    assert table.num_rows == 0
    assert table.schema.types == schema.types


def test_json_columns_keep_strings_as_json_and_values_that_do_not_fit_become_null() -> None:
    schema = columns_schema(
        {
            "type": "object",
            "properties": {
                "any": {"anyOf": [{"type": "string"}, {"type": "object"}]},
                "n": {"type": "integer"},
                "xs": {"type": "array", "items": {"type": "number"}},
            },
        }
    )
    table = to_columns([{"any": "text", "n": True, "xs": [1, "two"]}], schema)
    # JSON text, so a string and an object stay distinguishable downstream.
    assert table.to_pylist() == [{"any": '"text"', "n": None, "xs": [1.0, None]}]


# ---------------------------------------------------------------------------
# Servers without structured outputs.


@pytest.mark.parametrize(
    "server_message",
    [
        "Invalid parameter: 'response_format' of type 'json_schema' is not supported with "
        "this model. Learn more about supported models at the Structured Outputs guide",
        "response_format.type: Input should be 'text' or 'json_object'",
        'response_format type must be one of "text" or "json_object", but got: json_schema',
        "response_format value as json_schema is enabled only for api versions "
        "2024-08-01-preview and later",
    ],
)
def test_a_server_without_json_schema_gets_a_clear_message(server_message: str) -> None:
    message = unsupported_message(server_message)
    assert message is not None
    assert "does not support structured outputs" in message
    assert "remove --schema" in message
    assert "\n" not in message


def test_a_server_that_rejects_the_schema_says_how_to_fix_it() -> None:
    message = unsupported_message(
        "Invalid schema for response_format 'row': In context=(), 'additionalProperties' is "
        "required to be supplied and to be false."
    )
    assert message is not None
    assert message.startswith("the server rejected the JSON Schema")
    assert "additionalProperties" in message


def test_other_rejections_are_not_about_structured_output() -> None:
    assert unsupported_message("This model's maximum context length is 8192 tokens.") is None
