"""The final file: right columns, input order, and never half-written under its name."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError, OutputError
from pipeline.result_table import RESULT_SCHEMA, results_to_table
from pipeline.results import RESULT_COLUMNS, ROW_ID, RowResult
from pipeline.write import (
    AtomicParquetWriter,
    check_output_path,
    enriched_chunk,
    output_column_names,
    output_schema,
)

INPUT_SCHEMA = pa.schema([pa.field("id", pa.int64()), pa.field("question", pa.string())])


def input_chunk(offset: int, n: int) -> pa.Table:
    ids = list(range(offset, offset + n))
    return pa.table({"id": ids, "question": [f"q{i}?" for i in ids]}, schema=INPUT_SCHEMA)


def results_for(offset: int, n: int) -> pa.Table:
    return results_to_table(
        [
            RowResult(row_id=i, status="ok", response=f"a{i}", attempts=1, latency_ms=1.5)
            if i % 3
            else RowResult.skipped(i)
            for i in range(offset, offset + n)
        ]
    )


def output_error(output: Path, input_path: Path) -> str:
    with pytest.raises(OutputError) as info:
        check_output_path(output, input_path)
    assert "\n" not in info.value.message
    return info.value.message


class Boom(Exception):
    pass


# ------------------------------------------------------------------ column names


def test_output_column_names_are_the_result_columns() -> None:
    assert output_column_names(["id", "question"]) == list(RESULT_COLUMNS)


def test_the_result_columns_named_without_pyarrow_are_the_schemas() -> None:
    # pipeline.results names them without pyarrow (a request's result needs none).
    assert tuple(RESULT_SCHEMA.names) == RESULT_COLUMNS


def test_prefix_is_added_to_every_result_column() -> None:
    names = output_column_names(["id", "question"], prefix="llm_")
    assert names == [f"llm_{name}" for name in RESULT_COLUMNS]


def test_result_column_collision_names_prefix_flag() -> None:
    with pytest.raises(ConfigError) as info:
        output_column_names(["question", "status", "model"])
    message = info.value.message
    assert "status" in message and "model" in message
    assert "--column-prefix" in message and "llm_" in message


def test_suggested_prefix_does_not_collide_itself() -> None:
    taken = ["question", *[f"llm_{name}" for name in RESULT_COLUMNS]]
    with pytest.raises(ConfigError) as info:
        output_column_names(taken, prefix="llm_")
    assert "--column-prefix enrich_" in info.value.message


def test_prefix_resolves_a_collision() -> None:
    assert "llm_status" in output_column_names(["question", "status"], prefix="llm_")


def test_output_schema_is_input_fields_then_prefixed_result_fields() -> None:
    schema = output_schema(INPUT_SCHEMA.with_metadata({b"pandas": b"{}"}), prefix="x_")
    assert schema.names == ["id", "question", *[f"x_{n}" for n in RESULT_COLUMNS]]
    assert schema.types == [*INPUT_SCHEMA.types, *RESULT_SCHEMA.types]
    # pandas metadata about the input's columns would misdescribe the output.
    assert not schema.metadata


def test_output_schema_rejects_collisions() -> None:
    with pytest.raises(ConfigError, match="--column-prefix"):
        output_schema(pa.schema([pa.field("response", pa.string())]))


# ------------------------------------------------------------------- output path


def test_output_same_as_input_is_rejected(tmp_path: Path) -> None:
    source = tmp_path / "data.parquet"
    source.write_bytes(b"x")
    message = output_error(source, source)
    assert "data.parquet" in message and "--output" in message


def test_output_reaching_the_input_through_a_symlink_is_rejected(tmp_path: Path) -> None:
    source = tmp_path / "data.parquet"
    source.write_bytes(b"x")
    link = tmp_path / "link.parquet"
    link.symlink_to(source)
    assert "is the input" in output_error(link, source)


def test_output_same_as_input_by_relative_path_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data.parquet").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert "is the input" in output_error(Path("./data.parquet"), tmp_path / "data.parquet")


def test_output_missing_directory_is_rejected_naming_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    message = output_error(missing / "out.parquet", tmp_path / "in.csv")
    assert str(missing) in message and "mkdir -p" in message and "--output" in message


def test_output_directory_not_writable_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod cannot take write access away from root, so ask the same question os.access answers.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    message = output_error(tmp_path / "out.parquet", tmp_path / "in.csv")
    assert str(tmp_path) in message and "not writable" in message and "--output" in message


def test_output_that_is_a_directory_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "out.parquet"
    folder.mkdir()
    message = output_error(folder, tmp_path / "in.csv")
    assert "is a directory" in message and "--output" in message


def test_output_without_parquet_extension_is_rejected_with_suggestion(tmp_path: Path) -> None:
    message = output_error(tmp_path / "out.csv", tmp_path / "in.csv")
    assert ".parquet" in message and f"--output {tmp_path / 'out.parquet'}" in message


def test_output_parent_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert "not a directory" in output_error(tmp_path / "file" / "out.parquet", tmp_path / "a.csv")


def test_writable_output_path_passes_even_if_the_file_exists(tmp_path: Path) -> None:
    check_output_path(tmp_path / "out.parquet", tmp_path / "in.csv")
    (tmp_path / "out.parquet").write_bytes(b"old")
    check_output_path(tmp_path / "out.parquet", tmp_path / "in.csv")


# ---------------------------------------------------------------- enriched chunk


def test_enriched_chunk_appends_results_to_their_rows() -> None:
    schema = output_schema(INPUT_SCHEMA, prefix="llm_")
    table = enriched_chunk(input_chunk(10, 5), results_for(10, 5), schema)
    assert table.schema == schema
    assert table.column("id").to_pylist() == [10, 11, 12, 13, 14]
    assert table.column("llm_response").to_pylist() == ["a10", "a11", None, "a13", "a14"]
    assert table.column("llm_status").to_pylist() == ["ok", "ok", "skipped", "ok", "ok"]
    assert ROW_ID not in table.column_names


def test_enriched_chunk_rejects_results_that_do_not_align() -> None:
    schema = output_schema(INPUT_SCHEMA)
    with pytest.raises(ValueError, match="align"):
        enriched_chunk(input_chunk(0, 5), results_for(0, 4), schema)
    gap = pa.concat_tables([results_for(0, 2), results_for(3, 3)])
    with pytest.raises(ValueError, match="contiguous"):
        enriched_chunk(input_chunk(0, 5), gap, schema)


# ---------------------------------------------------------------- atomic writer


def write_output(path: Path, chunks: int = 3, rows: int = 4) -> pa.Schema:
    schema = output_schema(INPUT_SCHEMA)
    with AtomicParquetWriter(path, schema) as writer:
        for i in range(chunks):
            writer.write(
                enriched_chunk(input_chunk(i * rows, rows), results_for(i * rows, rows), schema)
            )
    return schema


def test_written_file_is_readable_by_polars_and_pyarrow_in_input_order(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    schema = write_output(out, chunks=3, rows=4)
    table = pq.read_table(out)
    assert table.schema == schema
    assert table.column("id").to_pylist() == list(range(12))
    frame = pl.read_parquet(out)
    assert frame.columns == schema.names
    assert frame["id"].to_list() == list(range(12))
    # One row group per chunk written: no buffering of the whole output.
    assert pq.ParquetFile(out).metadata.num_row_groups == 3


def test_failed_write_leaves_no_file_under_final_name(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    schema = output_schema(INPUT_SCHEMA)
    with pytest.raises(Boom), AtomicParquetWriter(out, schema) as writer:
        writer.write(enriched_chunk(input_chunk(0, 4), results_for(0, 4), schema))
        raise Boom
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_untouched_when_write_fails(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    write_output(out, chunks=2)
    before = out.read_bytes()
    schema = output_schema(INPUT_SCHEMA)
    with pytest.raises(Boom), AtomicParquetWriter(out, schema) as writer:
        writer.write(enriched_chunk(input_chunk(0, 4), results_for(0, 4), schema))
        raise Boom
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_interrupt_while_writing_leaves_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous run")
    schema = output_schema(INPUT_SCHEMA)
    with pytest.raises(KeyboardInterrupt), AtomicParquetWriter(out, schema):
        raise KeyboardInterrupt
    assert out.read_bytes() == b"previous run"
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_output_appears_only_when_complete_from_a_temp_file_beside_it(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    schema = output_schema(INPUT_SCHEMA)
    with AtomicParquetWriter(out, schema) as writer:
        writer.write(enriched_chunk(input_chunk(0, 4), results_for(0, 4), schema))
        assert not out.exists()
        # Same directory, so the final rename cannot cross filesystems.
        temps = list(tmp_path.iterdir())
        assert len(temps) == 1 and temps[0].name.startswith(".out.parquet.tmp-")
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_successful_write_replaces_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous run")
    write_output(out, chunks=1)
    assert pq.read_table(out).num_rows == 4


def test_writer_with_no_rows_writes_a_valid_empty_file(tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    schema = output_schema(INPUT_SCHEMA)
    with AtomicParquetWriter(out, schema):
        pass
    assert pq.read_table(out).schema == schema
    assert pl.read_parquet(out).height == 0


def test_writer_in_a_missing_directory_raises_output_error(tmp_path: Path) -> None:
    out = tmp_path / "gone" / "out.parquet"
    with (
        pytest.raises(OutputError, match="--output"),
        AtomicParquetWriter(out, output_schema(INPUT_SCHEMA)),
    ):
        pass
    assert not out.parent.exists()


def test_unknown_compression_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="compression"):
        AtomicParquetWriter(tmp_path / "out.parquet", INPUT_SCHEMA, compression="zip")


def test_write_outside_the_with_block_is_an_error(tmp_path: Path) -> None:
    writer = AtomicParquetWriter(tmp_path / "out.parquet", INPUT_SCHEMA)
    with pytest.raises(RuntimeError, match="with-block"):
        writer.write(input_chunk(0, 1))
