"""Readers: stable row ids, one schema per file, bounded chunks, one-line errors."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.read import Chunk, InputSource, detect_format, open_input

DATA = Path(__file__).resolve().parent.parent / "data"


def all_rows(source: InputSource, chunk_size: int = 7, start_row: int = 0) -> list[Chunk]:
    return list(source.chunks(chunk_size, start_row))


def column_values(chunks: list[Chunk], name: str) -> list[object]:
    return [v for chunk in chunks for v in chunk.table.column(name).to_pylist()]


def input_error(path: str | Path) -> InputError:
    with pytest.raises(InputError) as info:
        open_input(path)
    assert "\n" not in info.value.message
    return info.value


def write_ids_csv(path: Path, n: int) -> Path:
    path.write_text("id,text\n" + "".join(f"{i},row {i}\n" for i in range(n)))
    return path


def write_ids_parquet(path: Path, n: int) -> Path:
    table = pa.table({"id": pa.array(range(n), pa.int64()), "text": [f"row {i}" for i in range(n)]})
    pq.write_table(table, path, row_group_size=13)
    return path


def write_ids_jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(n)))
    return path


WRITERS: dict[str, Callable[[Path, int], Path]] = {
    "data.csv": write_ids_csv,
    "data.parquet": write_ids_parquet,
    "data.jsonl": write_ids_jsonl,
}


# ---------------------------------------------------------------- formats and paths


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.csv", "csv"),
        ("A.CSV", "csv"),
        ("a.csv.gz", "csv"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
        ("a.jsonl", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("a.jsonl.gz", "jsonl"),
    ],
)
def test_format_is_detected_from_the_extension(name: str, fmt: str) -> None:
    assert detect_format(Path(name)) == fmt


def test_unknown_extension_is_rejected_listing_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    message = input_error(path).message
    assert "data.xlsx" in message
    assert ".csv" in message and ".parquet" in message and ".jsonl" in message
    assert "--input" in message


def test_json_extension_suggests_renaming_to_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('{"a": 1}\n')
    assert "rename it to .jsonl" in input_error(path).message


def test_missing_file_is_rejected_naming_input_flag(tmp_path: Path) -> None:
    message = input_error(tmp_path / "nope.csv").message
    assert "nope.csv" in message and "does not exist" in message and "--input" in message


def test_directory_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "data.csv"
    folder.mkdir()
    message = input_error(folder).message
    assert "directory" in message and "--input" in message


def test_unreadable_file_is_rejected_with_permission_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_ids_csv(tmp_path / "secret.csv", 3)

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # Tests may run as root, where chmod cannot take read access away.
    monkeypatch.setattr(Path, "open", denied)
    message = input_error(path).message
    assert "secret.csv" in message and "permission denied" in message and "chmod" in message


# ---------------------------------------------------------------------------- CSV


@pytest.mark.slow
def test_csv_column_that_turns_to_text_late_keeps_one_schema(tmp_path: Path) -> None:
    # Far more than one read block of numbers, then text: a reader that infers types
    # from the first block would fail (or disagree with itself) at the last row.
    n = 300_000
    path = tmp_path / "late.csv"
    path.write_text("id,code\n" + "".join(f"{i},{i}\n" for i in range(n)) + f"{n},N/A\n")
    source = open_input(path)
    assert source.schema.field("code").type == pa.string()
    assert source.schema.field("id").type == pa.int64()
    chunks = all_rows(source, chunk_size=50_000)
    assert {c.table.schema for c in chunks} == {source.schema}
    codes = column_values(chunks, "code")
    assert codes[0] == "0" and codes[-1] == "N/A" and len(codes) == n + 1


def test_csv_types_are_inferred_from_every_row(tmp_path: Path) -> None:
    path = tmp_path / "types.csv"
    path.write_text("n,x,flag,word\n1,1,true,a\n2,2.5,False,b\n-3,,TRUE,\n")
    source = open_input(path)
    assert source.schema.types == [pa.int64(), pa.float64(), pa.bool_(), pa.string()]
    table = all_rows(source)[0].table
    assert table.to_pydict() == {
        "n": [1, 2, -3],
        "x": [1.0, 2.5, None],
        "flag": [True, False, True],
        "word": ["a", "b", None],
    }


def test_csv_numbers_that_would_lose_digits_stay_text(tmp_path: Path) -> None:
    path = tmp_path / "codes.csv"
    path.write_text("zip,big,phone\n02134,12345678901234567890123,+4930123\n90210,1,+4930124\n")
    source = open_input(path)
    assert source.schema.types == [pa.string(), pa.string(), pa.string()]
    assert all_rows(source)[0].table.column("zip").to_pylist() == ["02134", "90210"]


def test_csv_empty_field_is_null_and_quoted_empty_stays_empty(tmp_path: Path) -> None:
    path = tmp_path / "nulls.csv"
    path.write_text('id,text\n1,\n2,""\n3,NA\n')
    table = all_rows(open_input(path))[0].table
    assert table.column("text").to_pylist() == [None, "", "NA"]


def test_csv_quoted_commas_quotes_and_newlines_stay_in_one_field(tmp_path: Path) -> None:
    path = tmp_path / "quoted.csv"
    path.write_text('id,text\n1,"a, b"\n2,"say ""hi""\nthen go"\n3,ünïcødé ✓\n')
    source = open_input(path)
    assert source.count_rows() == 3
    texts = column_values(all_rows(source), "text")
    assert texts == ["a, b", 'say "hi"\nthen go', "ünïcødé ✓"]


def test_header_only_csv_is_rejected_with_fix(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("question,topic\n")
    message = input_error(path).message
    assert "header.csv" in message and "no rows" in message and "--input" in message


def test_empty_csv_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    message = input_error(path).message
    assert "empty.csv" in message and "no rows" in message


def test_non_utf8_csv_is_rejected_naming_iconv(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("question\ncafé crème?\n".encode("latin-1"))
    message = input_error(path).message
    assert "latin1.csv" in message and "UTF-8" in message and "iconv" in message


def test_non_utf8_bytes_deep_in_a_csv_are_caught_when_opening(tmp_path: Path) -> None:
    path = tmp_path / "late.csv"
    body = "".join(f"{i},fine\n" for i in range(200_000)).encode()
    path.write_bytes(b"id,text\n" + body + "1,caf\xe9\n".encode("latin-1"))
    message = input_error(path).message
    assert "UTF-8" in message and "'text'" in message and "iconv" in message


def test_non_utf8_csv_header_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_bytes("id,catégorie\n1,a\n".encode("latin-1"))
    assert "iconv" in input_error(path).message


def test_csv_row_with_extra_fields_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("id,text\n1,a\n2,b,c\n")
    message = input_error(path).message
    assert "ragged.csv" in message and "wrong number of fields" in message and "quote" in message


def test_csv_duplicate_column_names_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dupes.csv"
    path.write_text("id,text,text\n1,a,b\n")
    message = input_error(path).message
    assert "duplicate" in message and "'text'" in message


def test_csv_row_larger_than_a_read_block_is_read(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    long_text = "word " * 1_000_000
    path.write_text(f'id,text\n1,"{long_text}"\n2,short\n')
    source = open_input(path)
    assert column_values(all_rows(source), "text") == [long_text, "short"]


def test_gzipped_csv_is_read(tmp_path: Path) -> None:
    path = tmp_path / "data.csv.gz"
    path.write_bytes(gzip.compress(b"id,text\n1,a\n2,b\n"))
    assert column_values(all_rows(open_input(path)), "text") == ["a", "b"]


def test_csv_utf8_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfid,text\n1,a\n")
    assert open_input(path).columns() == ["id", "text"]


def test_csv_changed_after_opening_raises_input_error_not_pyarrow_error(tmp_path: Path) -> None:
    path = write_ids_csv(tmp_path / "data.csv", 10)
    source = open_input(path)
    path.write_bytes(b"id,text\n1,caf\xe9\n")
    with pytest.raises(InputError, match="UTF-8"):
        all_rows(source)


# ------------------------------------------------------------------------ Parquet


def test_corrupt_parquet_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    message = input_error(path).message
    assert "broken.parquet" in message and "not a valid Parquet file" in message
    assert "--input" in message


def test_truncated_parquet_is_rejected(tmp_path: Path) -> None:
    path = write_ids_parquet(tmp_path / "cut.parquet", 100)
    path.write_bytes(path.read_bytes()[:-50])
    assert "not a valid Parquet file" in input_error(path).message


def test_empty_parquet_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), path)
    assert "no rows" in input_error(path).message


def test_parquet_nulls_and_types_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "nulls.parquet"
    table = pa.table({"n": pa.array([1, None], pa.int32()), "text": ["a", None]})
    pq.write_table(table, path)
    source = open_input(path)
    assert source.schema == table.schema
    assert all_rows(source)[0].table.to_pydict() == {"n": [1, None], "text": ["a", None]}


def test_parquet_chunks_never_exceed_chunk_size_and_cover_every_row(tmp_path: Path) -> None:
    n = 200_000
    path = tmp_path / "big.parquet"
    # Row groups that do not line up with the chunk size, as real files have.
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64())}), path, row_group_size=30_001)
    source = open_input(path)
    assert source.count_rows() == n
    sizes = []
    expected_offset = 0
    for chunk in source.chunks(4096):
        assert chunk.offset == expected_offset
        assert chunk.table.num_rows <= 4096
        sizes.append(chunk.table.num_rows)
        expected_offset += chunk.table.num_rows
    assert sum(sizes) == n
    assert all(size == 4096 for size in sizes[:-1])


# -------------------------------------------------------------------------- JSONL


@pytest.mark.slow
def test_jsonl_field_that_turns_to_text_late_keeps_one_schema(tmp_path: Path) -> None:
    n = 150_000
    path = tmp_path / "late.jsonl"
    lines = [json.dumps({"id": i, "code": i}) for i in range(n)]
    path.write_text("\n".join([*lines, json.dumps({"id": n, "code": "N/A"})]) + "\n")
    source = open_input(path)
    assert pa.types.is_integer(source.schema.field("id").type)
    chunks = all_rows(source, chunk_size=40_000)
    assert {c.table.schema for c in chunks} == {source.schema}
    codes = column_values(chunks, "code")
    assert codes[0] == "0" and codes[-1] == "N/A" and len(codes) == n + 1


def test_jsonl_true_and_1_in_one_field_are_kept_apart_as_text(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"v": true}\n{"v": 1}\n{"v": null}\n')
    assert column_values(all_rows(open_input(path)), "v") == ["true", "1", None]


def test_jsonl_ints_and_floats_become_floats(tmp_path: Path) -> None:
    path = tmp_path / "nums.jsonl"
    path.write_text('{"v": 1}\n{"v": 2.5}\n')
    source = open_input(path)
    assert source.schema.field("v").type == pa.float64()
    assert column_values(all_rows(source), "v") == [1.0, 2.5]


def test_jsonl_keys_missing_from_some_lines_are_null(tmp_path: Path) -> None:
    path = tmp_path / "sparse.jsonl"
    path.write_text('{"a": "x"}\n{"b": 2}\n{}\n')
    source = open_input(path)
    assert source.columns() == ["a", "b"]
    table = all_rows(source)[0].table
    assert table.to_pydict() == {"a": ["x", None, None], "b": [None, 2, None]}


def test_jsonl_blank_lines_are_not_rows(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}')
    source = open_input(path)
    assert source.count_rows() == 2
    assert column_values(all_rows(source), "a") == [1, 2]


def test_empty_jsonl_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    message = input_error(path).message
    assert "empty.jsonl" in message and "no rows" in message


def test_invalid_json_line_is_rejected_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    message = input_error(path).message
    assert "bad.jsonl line 3" in message and "not valid JSON" in message


def test_jsonl_line_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    message = input_error(path).message
    assert "line 2" in message and "not an object" in message


def test_non_utf8_jsonl_is_rejected_naming_iconv(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"q": "café"}\n'.encode("latin-1"))
    message = input_error(path).message
    assert "latin1.jsonl line 1" in message and "UTF-8" in message and "iconv" in message


def test_gzipped_jsonl_is_read(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": "x"}\n{"a": "y"}\n'))
    assert column_values(all_rows(open_input(path)), "a") == ["x", "y"]


# --------------------------------------------------------------- all formats alike


@pytest.mark.parametrize("name", list(WRITERS))
def test_chunks_have_contiguous_stable_row_ids(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name, 100)
    first = all_rows(open_input(path), chunk_size=7)
    second = all_rows(open_input(path), chunk_size=7)
    assert [c.offset for c in first] == list(range(0, 100, 7))
    assert [c.offset for c in first] == [c.offset for c in second]
    for chunk in first:
        # The row id of each row is its position: here, its id column.
        assert chunk.table.column("id").to_pylist() == list(
            range(chunk.offset, chunk.offset + chunk.table.num_rows)
        )


@pytest.mark.parametrize("name", list(WRITERS))
def test_start_row_skips_ahead(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name, 100)
    chunks = all_rows(open_input(path), chunk_size=10, start_row=55)
    assert [c.offset for c in chunks] == [55, 65, 75, 85, 95]
    assert column_values(chunks, "id") == list(range(55, 100))


@pytest.mark.parametrize("name", list(WRITERS))
def test_start_row_past_the_end_yields_nothing(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name, 10)
    assert all_rows(open_input(path), start_row=10) == []


@pytest.mark.parametrize("name", list(WRITERS))
def test_count_rows_is_exact(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name, 1234)
    assert open_input(path).count_rows() == 1234


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_chunk_has_the_source_schema(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name, 100)
    source = open_input(path)
    assert all(c.table.schema == source.schema for c in source.chunks(9))


def test_chunk_size_must_be_positive(tmp_path: Path) -> None:
    source = open_input(write_ids_csv(tmp_path / "data.csv", 3))
    with pytest.raises(ValueError, match="chunk_size"):
        source.chunks(0)


# -------------------------------------------------------------- the committed sample


def test_sample_csv_and_parquet_hold_the_same_rows() -> None:
    csv_source = open_input(DATA / "questions.csv")
    parquet_source = open_input(DATA / "questions.parquet")
    csv_rows = all_rows(csv_source, chunk_size=1000)[0].table
    parquet_rows = all_rows(parquet_source, chunk_size=1000)[0].table
    assert csv_rows.equals(parquet_rows)
    assert 40 <= csv_rows.num_rows <= 60
    # polars reads the sample the same way.
    assert pl.read_csv(DATA / "questions.csv").height == csv_rows.num_rows
