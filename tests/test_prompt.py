"""Prompt rendering: what gets asked for each row, and what gets skipped."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from pipeline.errors import ConfigError, InputError
from pipeline.prompt import (
    PromptSpec,
    fingerprint_fields,
    messages,
    placeholders,
    render,
    validate,
)


def config_error(template: str) -> str:
    with pytest.raises(ConfigError) as info:
        placeholders(template)
    assert "\n" not in info.value.message
    assert "--template" in info.value.message
    return info.value.message


# -------------------------------------------------------------------- placeholders


def test_placeholders_are_listed_in_order_once_each() -> None:
    assert placeholders("{title}: {body} ({title})") == ["title", "body"]


def test_literal_braces_are_not_placeholders() -> None:
    assert placeholders('Return JSON like {{"label": "..."}} for: {text}') == ["text"]


@pytest.mark.parametrize("template", ["{title", "title}", "{title}}", "{ {x}"])
def test_malformed_template_is_rejected_naming_template_flag(template: str) -> None:
    assert "malformed" in config_error(template)


@pytest.mark.parametrize("template", ["Q: {}", "Q: {0}", "{1} and {2}"])
def test_positional_placeholders_are_rejected(template: str) -> None:
    message = config_error(template)
    assert "placeholder" in message and "{title}" in message


@pytest.mark.parametrize("template", ["{price:.2f}", "{name!r}", "{name!s:>10}"])
def test_format_specs_and_conversions_are_rejected_as_unsupported(template: str) -> None:
    assert "not supported" in config_error(template)


def test_column_names_with_dots_and_spaces_are_taken_literally() -> None:
    table = pa.table({"a.b": ["x"], "user name": ["y"]})
    spec = PromptSpec(template="{a.b} / {user name}")
    assert placeholders("{a.b} / {user name}") == ["a.b", "user name"]
    assert render(spec, table) == ["x / y"]


# ------------------------------------------------------------------------ validate


def test_validate_requires_column_or_template() -> None:
    with pytest.raises(ConfigError, match=r"--column .*--template"):
        validate(PromptSpec(), ["question"])


def test_validate_rejects_both_column_and_template() -> None:
    with pytest.raises(ConfigError, match="both --column and --template"):
        validate(PromptSpec(column="q", template="{q}"), ["q"])


def test_missing_column_lists_available_columns_and_names_column_flag() -> None:
    with pytest.raises(InputError) as info:
        validate(PromptSpec(column="prompt"), ["id", "question", "topic"], source="data.csv")
    message = info.value.message
    assert "'prompt'" in message and "data.csv" in message
    assert "id, question, topic" in message and "--column" in message


def test_unknown_placeholder_names_template_flag_and_suggests_close_match() -> None:
    with pytest.raises(InputError) as info:
        validate(PromptSpec(template="Q: {questoin} ({topic})"), ["question", "topic"])
    message = info.value.message
    assert "'questoin'" in message and "did you mean 'question'" in message
    assert "--template" in message


def test_long_column_lists_are_truncated() -> None:
    columns = [f"col_{i}" for i in range(500)]
    with pytest.raises(InputError) as info:
        validate(PromptSpec(column="prompt"), columns)
    assert "col_0" in info.value.message and "+480 more" in info.value.message
    assert "col_499" not in info.value.message


def test_template_without_placeholders_is_rejected() -> None:
    with pytest.raises(ConfigError, match="no \\{column\\} placeholders"):
        validate(PromptSpec(template="Tell me a joke"), ["question"])


@pytest.mark.parametrize("spec", [PromptSpec(column=""), PromptSpec(template="  ")])
def test_empty_column_or_template_is_rejected(spec: PromptSpec) -> None:
    with pytest.raises(ConfigError, match="is empty"):
        validate(spec, ["question"])


def test_valid_spec_passes() -> None:
    validate(PromptSpec(column="question"), ["id", "question"])
    validate(PromptSpec(template="{title}. {body}"), ["title", "body", "stars"])


# -------------------------------------------------------------------------- render


def test_column_mode_skips_null_and_blank_values() -> None:
    table = pa.table({"q": ["Why?", None, "", "  \n\t", " Who? "]})
    assert render(PromptSpec(column="q"), table) == ["Why?", None, None, None, " Who? "]


def test_template_mode_skips_row_only_when_every_placeholder_is_blank() -> None:
    table = pa.table({"title": ["Great", None, "", None], "body": ["Loved it", "Broke", " ", None]})
    spec = PromptSpec(template="Sentiment of: {title}. {body}")
    assert render(spec, table) == [
        "Sentiment of: Great. Loved it",
        "Sentiment of: . Broke",
        None,
        None,
    ]


def test_template_renders_literal_braces_and_repeated_placeholders() -> None:
    table = pa.table({"x": ["a"]})
    assert render(PromptSpec(template="{{{x}}} {x}"), table) == ["{a} a"]


def test_numbers_render_as_people_write_them() -> None:
    table = pa.table(
        {
            "n": pa.array([3, None, -7], pa.int64()),
            "f": pa.array([3.0, 0.1, float("nan")], pa.float64()),
        }
    )
    assert render(PromptSpec(template="{n}|{f}"), table) == ["3|3", "|0.1", "-7|"]


def test_nan_counts_as_missing_in_column_mode() -> None:
    table = pa.table({"f": pa.array([1.5, float("nan"), None])})
    assert render(PromptSpec(column="f"), table) == ["1.5", None, None]


def test_bools_dates_and_nested_values_render_readably() -> None:
    table = pa.table(
        {
            "ok": [True, False],
            "day": [dt.date(2024, 1, 2), None],
            "at": [dt.datetime(2024, 1, 2, 3, 4, 5), None],
            "tags": [["a", "b"], []],
            "meta": [{"k": "v"}, None],
        }
    )
    spec = PromptSpec(template="{ok} {day} {at} {tags} {meta}")
    assert render(spec, table) == [
        'true 2024-01-02 2024-01-02 03:04:05 ["a", "b"] {"k": "v"}',
        "false   [] ",
    ]
    maps = pa.table({"m": pa.array([[("k", 1)]], pa.map_(pa.string(), pa.int64()))})
    assert render(PromptSpec(column="m"), maps) == ['{"k": 1}']


def test_dictionary_and_large_string_columns_render() -> None:
    table = pa.table(
        {
            "d": pa.array(["x", None, "y"]).dictionary_encode(),
            "l": pa.array(["1", "2", None], pa.large_string()),
        }
    )
    assert render(PromptSpec(template="{d}{l}"), table) == ["x1", "2", "y"]
    assert render(PromptSpec(column="d"), table) == ["x", None, "y"]


def test_render_of_an_empty_chunk_is_empty() -> None:
    table = pa.table({"q": pa.array([], pa.string())})
    assert render(PromptSpec(column="q"), table) == []
    assert render(PromptSpec(template="Q: {q}"), table) == []


def test_render_on_chunked_table_matches_row_order() -> None:
    table = pa.concat_tables([pa.table({"q": ["a", "b"]}), pa.table({"q": [None, "d"]})])
    assert render(PromptSpec(template="<{q}>"), table) == ["<a>", "<b>", None, "<d>"]


# ----------------------------------------------------------- messages, fingerprint


def test_messages_put_the_system_prompt_first() -> None:
    spec = PromptSpec(column="q", system_prompt="Answer in one word.")
    assert messages(spec, "Why?") == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Why?"},
    ]


def test_messages_without_system_prompt_are_one_user_turn() -> None:
    assert messages(PromptSpec(column="q"), "Why?") == [{"role": "user", "content": "Why?"}]
    assert messages(PromptSpec(column="q", system_prompt=""), "Why?") == [
        {"role": "user", "content": "Why?"}
    ]


def test_fingerprint_changes_with_what_changes_the_answer() -> None:
    base = fingerprint_fields(PromptSpec(column="q"))
    assert base == fingerprint_fields(PromptSpec(column="q"))
    assert base != fingerprint_fields(PromptSpec(column="other"))
    assert base != fingerprint_fields(PromptSpec(column="q", system_prompt="Be brief."))
    assert fingerprint_fields(PromptSpec(template="{a}")) != fingerprint_fields(
        PromptSpec(template="{a}!")
    )
    assert {"column", "template", "system_prompt"} <= set(base)
