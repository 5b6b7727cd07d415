"""Bad input: one line naming the problem and the fix, exit 2, no traceback,
nothing written under the output name, and no request sent."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import cli

# Nothing listens on the discard port: a bug that sends a request fails loudly
# instead of reaching any real service.
NOWHERE = "http://127.0.0.1:9/v1"


def run_cli(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["run", "--base-url", NOWHERE, *map(str, args)])


def assert_clean_usage_error(result: Result, output: Path, *needles: str) -> None:
    assert result.exit_code == 2, result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("enrich: error: ")
    assert "Traceback" not in result.output + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not output.exists()
    assert not output.with_name(output.name + ".enrich").exists()


@pytest.fixture
def questions(tmp_path: Path) -> Path:
    path = tmp_path / "questions.csv"
    pl.DataFrame({"question": ["a?", "b?"], "topic": ["x", "y"]}).write_csv(path)
    return path


def test_missing_input_file(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    result = run_cli("--input", tmp_path / "nope.csv", "--column", "q", "--output", out)
    assert_clean_usage_error(result, out, "nope.csv", "--input")


def test_unknown_input_extension(tmp_path: Path) -> None:
    source = tmp_path / "data.xlsx"
    source.write_text("question\na\n")
    out = tmp_path / "out.parquet"
    result = run_cli("--input", source, "--column", "question", "--output", out)
    assert_clean_usage_error(result, out, "data.xlsx", ".csv")


def test_missing_prompt_column_lists_the_columns(questions: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    result = run_cli("--input", questions, "--column", "prompt", "--output", out)
    assert_clean_usage_error(result, out, "prompt", "question", "--column")


def test_template_placeholder_naming_no_column(questions: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    result = run_cli("--input", questions, "--template", "Q: {questoin}", "--output", out)
    assert_clean_usage_error(result, out, "questoin", "--template")


def test_empty_input_file(tmp_path: Path) -> None:
    source = tmp_path / "empty.csv"
    source.write_bytes(b"")
    out = tmp_path / "out.parquet"
    result = run_cli("--input", source, "--column", "question", "--output", out)
    assert_clean_usage_error(result, out, "empty.csv")


def test_header_only_csv(tmp_path: Path) -> None:
    source = tmp_path / "header.csv"
    source.write_text("question,topic\n")
    out = tmp_path / "out.parquet"
    result = run_cli("--input", source, "--column", "question", "--output", out)
    assert_clean_usage_error(result, out, "header.csv", "no rows")


def test_non_utf8_csv_names_the_reencoding_fix(tmp_path: Path) -> None:
    source = tmp_path / "latin1.csv"
    source.write_bytes("question\ncaf\xe9 cr\xe8me?\n".encode("latin-1"))
    out = tmp_path / "out.parquet"
    result = run_cli("--input", source, "--column", "question", "--output", out)
    assert_clean_usage_error(result, out, "latin1.csv", "UTF-8")


def test_corrupt_parquet(tmp_path: Path) -> None:
    source = tmp_path / "broken.parquet"
    source.write_bytes(b"PAR1 this is not really parquet")
    out = tmp_path / "out.parquet"
    result = run_cli("--input", source, "--column", "question", "--output", out)
    assert_clean_usage_error(result, out, "broken.parquet", "Parquet")


def test_output_path_equal_to_input(tmp_path: Path) -> None:
    source = tmp_path / "same.parquet"
    pl.DataFrame({"question": ["a"]}).write_parquet(source)
    before = source.read_bytes()
    result = run_cli("--input", source, "--column", "question", "--output", source)
    assert result.exit_code == 2
    assert "--output" in result.stderr
    assert source.read_bytes() == before


def test_output_directory_missing(questions: Path, tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "dir" / "out.parquet"
    result = run_cli("--input", questions, "--column", "question", "--output", out)
    assert_clean_usage_error(result, out, "--output")


def test_unknown_config_key_is_named(questions: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    config = tmp_path / "job.toml"
    config.write_text(
        f'[input]\npath = "{questions}"\ncolumn = "question"\n'
        f'[output]\npath = "{out}"\n[limits]\nconcurency = 8\n'
    )
    result = run_cli(config)
    assert_clean_usage_error(result, out, "limits.concurency")


@pytest.mark.parametrize(
    "flag", ["--rpm", "--tpm", "--concurrency", "--max-attempts", "--max-pause"]
)
def test_negative_limits_are_rejected_naming_the_flag(
    questions: Path, tmp_path: Path, flag: str
) -> None:
    out = tmp_path / "out.parquet"
    result = run_cli("--input", questions, "--column", "question", "--output", out, flag, "-5")
    assert_clean_usage_error(result, out, flag)


def test_result_column_colliding_with_input_column_names_the_prefix_flag(
    tmp_path: Path,
) -> None:
    source = tmp_path / "in.parquet"
    pl.DataFrame({"question": ["a"], "status": ["draft"]}).write_parquet(source)
    out = tmp_path / "out.parquet"
    result = run_cli("--input", source, "--column", "question", "--output", out)
    assert_clean_usage_error(result, out, "status", "--column-prefix")


def test_config_file_not_toml(tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text("[input\npath=")
    result = run_cli(config)
    assert result.exit_code == 2
    assert "job.toml" in result.stderr
