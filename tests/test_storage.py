"""Input and output in object storage, through pyarrow's filesystems, against
a real S3-compatible server (moto's) on 127.0.0.1; and file:// URIs.

The endpoint reaches pyarrow the way a user's would: $AWS_ENDPOINT_URL (or
``?endpoint_override=...&scheme=http`` on the URI), with dummy keys in the
standard variables. The run directory stays local, under ./enrich-runs/.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.api import enrich
from pipeline.checkpoint import JOURNAL, PARTS
from pipeline.cli import cli as enrich_cli
from pipeline.config import load_config
from pipeline.crashpoints import ENV as CRASH_ENV
from pipeline.errors import ConfigError, InputError
from pipeline.read import open_input
from pipeline.storage import ObjectUri, parse_location
from pipeline.write import AtomicParquetWriter, output_schema

from conftest import MODEL, StartServer, answer_for, make_config, write_questions

moto_server = pytest.importorskip("moto.server")

BUCKET = "enrich-test"


@dataclass(frozen=True)
class S3:
    endpoint: str
    """host:port"""
    fs: pafs.S3FileSystem

    def put(self, key: str, data: bytes) -> str:
        # compression=None: the bytes as given (pyarrow would gzip a .gz name again)
        with self.fs.open_output_stream(f"{BUCKET}/{key}", compression=None) as stream:
            stream.write(data)
        return f"s3://{BUCKET}/{key}"

    def put_questions(self, key: str, prompts: list[str], tmp_path: Path) -> str:
        local = write_questions(tmp_path / Path(key).name, prompts)
        return self.put(key, local.read_bytes())

    def exists(self, key: str) -> bool:
        return bool(self.fs.get_file_info(f"{BUCKET}/{key}").type == pafs.FileType.File)

    def read(self, key: str) -> pl.DataFrame:
        with self.fs.open_input_file(f"{BUCKET}/{key}") as handle:
            return pl.read_parquet(io.BytesIO(handle.read()))


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """moto's S3 server in a thread for the whole module, found by pyarrow
    through $AWS_ENDPOINT_URL like any self-hosted S3 (subprocesses inherit it)."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        env.setenv("AWS_ACCESS_KEY_ID", "test-key-id")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.delenv("AWS_PROFILE", raising=False)
        fs = pafs.S3FileSystem(
            endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True
        )
        fs.create_dir(BUCKET)
        try:
            yield S3(f"{host}:{port}", fs)
        finally:
            server.stop()


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(enrich_cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.slow
def test_a_run_reads_s3_and_writes_s3_with_the_run_dir_local(
    s3: S3, tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    server = start_server()
    prompts = [f"s3 question {i}" for i in range(40)]
    source = s3.put_questions("e2e/in.parquet", prompts, tmp_path)
    config = make_config(source, "s3://enrich-test/e2e/out.parquet", server.base_url)
    summary = enrich(config)

    assert (summary.ok, summary.rows) == (40, 40)
    out = s3.read("e2e/out.parquet")
    assert out["id"].to_list() == list(range(40))
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    # The report stays on the local disk, under the output's stand-in path.
    assert (tmp_path / "enrich-runs/s3/enrich-test/e2e/out.parquet.report.json").exists()
    assert not (tmp_path / "enrich-runs/s3/enrich-test/e2e/out.parquet.enrich").exists()

    # The same job again is up to date: the object's size and mtime are the report's.
    again = enrich(config)
    assert again.up_to_date
    assert server.stats.answered == 40

    # `enrich report URI` finds the local report by the same stand-in path.
    code, text = cli("report", "s3://enrich-test/e2e/out.parquet")
    assert code == 0, text
    assert (tmp_path / "enrich-runs/s3/enrich-test/e2e/out.parquet.report.html").exists()


@pytest.mark.parametrize("name", ["in.csv.gz", "in.jsonl"])
def test_csv_gz_and_jsonl_inputs_are_read_from_s3(
    s3: S3, tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    server = start_server()
    prompts = [f"{name} question {i}" for i in range(12)]
    frame = pl.DataFrame({"id": list(range(12)), "question": prompts})
    if name.endswith(".gz"):
        import gzip

        data = gzip.compress(frame.write_csv().encode())
    else:
        data = frame.write_ndjson().encode()
    source = s3.put(f"formats/{name}", data)
    output = tmp_path / f"{name}.parquet"
    enrich(make_config(source, output, server.base_url))
    assert pl.read_parquet(output)["response"].to_list() == [answer_for(p) for p in prompts]


def test_the_endpoint_may_be_given_on_the_uri_instead_of_the_environment(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put_questions("query/in.parquet", ["a", "b"], tmp_path)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    uri = f"s3://{BUCKET}/query/in.parquet?endpoint_override={s3.endpoint}&scheme=http"
    source = open_input(uri)
    assert source.count_rows() == 2
    assert next(source.chunks(10)).table.column("question").to_pylist() == ["a", "b"]


def test_a_missing_object_is_one_line_and_exit_2_with_nothing_written(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = cli(
        "run", "--input", f"s3://{BUCKET}/nowhere/in.csv", "--column", "question",
        "--output", f"s3://{BUCKET}/nowhere/out.parquet", "--base-url", "http://127.0.0.1:9/v1",
    )  # fmt: skip
    assert code == 2
    assert f"input s3://{BUCKET}/nowhere/in.csv does not exist" in output
    assert "AWS_ENDPOINT_URL" in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert not s3.exists("nowhere/out.parquet")
    assert not (tmp_path / "enrich-runs").exists()


def test_a_missing_output_bucket_stops_before_any_request(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    source = write_questions(tmp_path / "in.csv", ["a"])
    code, output = cli(
        "run", "--input", str(source), "--column", "question",
        "--output", "s3://no-such-bucket/out.parquet", "--base-url", "http://127.0.0.1:9/v1",
    )  # fmt: skip
    assert code == 2
    assert "output bucket s3://no-such-bucket does not exist" in output
    assert "Traceback" not in output


def test_an_unknown_scheme_and_keys_in_the_uri_are_refused_with_the_fix() -> None:
    with pytest.raises(InputError, match="no filesystem for foo://"):
        open_input("foo://bucket/in.csv")
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY") as caught:
        load_config(
            input="s3://b/in.csv?access_key=AKIA&secret_key=hunter2",
            column="q",
            output="out.parquet",
        )
    assert "hunter2" not in str(caught.value)


def test_a_uri_output_keeps_its_run_files_under_enrich_runs() -> None:
    config = load_config(
        input="in.csv", column="q", output="s3://lake/out/../x.parquet?scheme=http"
    )
    assert config.output.local_path == Path("enrich-runs/s3/lake/out/x.parquet")
    assert config.output.resolved_run_dir == Path("enrich-runs/s3/lake/out/x.parquet.enrich")
    assert str(config.output.path) == "s3://lake/out/../x.parquet?scheme=http"


def test_file_uris_are_local_paths(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in put.csv", ["x", "y"])
    assert parse_location(source.as_uri()) == source
    output = tmp_path / "out.parquet"
    summary = enrich(make_config(source.as_uri(), output.as_uri(), server.base_url))
    assert summary.ok == 2
    assert pl.read_parquet(output)["response"].to_list() == [answer_for("x"), answer_for("y")]
    assert (tmp_path / "out.parquet.report.json").exists()


@pytest.mark.slow
def test_status_and_estimate_take_uris(
    s3: S3, tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    server = start_server()
    source = s3.put_questions("status/in.parquet", ["a", "b", "c"], tmp_path)
    output = f"s3://{BUCKET}/status/out.parquet"
    code, text = cli(
        "estimate", "--input", source, "--column", "question", "--model", MODEL, "--json"
    )
    assert code == 0, text
    assert '"rows": 3' in text
    enrich(make_config(source, output, server.base_url))
    code, text = cli("status", "--output", output, "--json")
    assert code == 0, text
    assert '"ok": 3' in text and output in text


def test_a_write_that_fails_midway_leaves_no_object_and_no_local_temp(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    source = open_input(write_questions(tmp_path / "in.parquet", ["a", "b"]))
    schema = output_schema(source.schema)
    uri = ObjectUri(f"s3://{BUCKET}/failed/out.parquet")
    (tmp_path / "enrich-runs").mkdir()
    with pytest.raises(RuntimeError), AtomicParquetWriter(uri, schema):
        assert [p.name for p in (tmp_path / "enrich-runs").rglob(".out.parquet.tmp-*")]
        raise RuntimeError("the run stops midway")
    assert not s3.exists("failed/out.parquet")
    assert not [p for p in (tmp_path / "enrich-runs").rglob("*") if p.is_file()]


# ----------------------------------------------------------- real processes


def start_run(
    cwd: Path, source: str, output: str, base_url: str, crash_at: str | None = None
) -> subprocess.Popen[str]:
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    env.pop("OPENAI_BASE_URL", None)
    env.pop(CRASH_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen(
        [
            sys.executable, "-m", "pipeline", "run", "--input", source, "--column", "question",
            "--output", output, "--base-url", base_url, "--model", MODEL, "--quiet",
            "--concurrency", "16", "--timeout", "2", "--no-cache", "--no-page",
        ],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_sigkill_with_an_s3_input_resumes_and_writes_each_row_once(
    s3: S3, tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(latency_ms=40, jitter_ms=10, seed=3)
    rows = 600
    prompts = [f"kill question {i}" for i in range(rows)]
    source = s3.put_questions("kill/in.parquet", prompts, tmp_path)
    output = f"s3://{BUCKET}/kill/out.parquet"
    run_dir = tmp_path / "enrich-runs/s3" / BUCKET / "kill/out.parquet.enrich"

    process = start_run(tmp_path, source, output, server.base_url)
    try:
        deadline = time.monotonic() + 60
        while not [*(run_dir / PARTS).glob("part-*"), *(run_dir / JOURNAL).glob("seg-*")]:
            assert time.monotonic() < deadline, "nothing was checkpointed"
            time.sleep(0.01)
        before = server.stats.answered
        time.sleep(0.25)
        rate = (server.stats.answered - before) / 0.25
    finally:
        process.kill()
        process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    assert not s3.exists("kill/out.parquet")
    answered = server.stats.answered

    rerun = start_run(tmp_path, source, output, server.base_url)
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    out = s3.read("kill/out.parquet")
    assert out["id"].to_list() == list(range(rows))
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert answered < rows  # killed mid-run
    # Paid twice: at most the requests in flight and the last 0.25 s of answers.
    assert 0 <= server.stats.answered - rows <= 16 + 0.25 * rate
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("step", ["before-output-rename", "after-output-rename"])
def test_a_kill_around_the_upload_never_leaves_a_half_written_object(
    s3: S3, tmp_path: Path, start_server: StartServer, step: str
) -> None:
    server = start_server(latency_ms=2)
    rows = 200
    prompts = [f"upload question {i} {step}" for i in range(rows)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    key = f"upload/{step}/out.parquet"
    output = f"s3://{BUCKET}/{key}"

    crashed = start_run(tmp_path, str(source), output, server.base_url, crash_at=step)
    crashed.communicate(timeout=60)
    assert crashed.returncode == -signal.SIGKILL
    if step == "before-output-rename":
        assert not s3.exists(key)  # the file was complete locally, not yet uploaded
    else:
        assert s3.read(key).height == rows  # uploaded whole, before the kill
    assert pq.ParquetFile(source).metadata.num_rows == rows

    rerun = start_run(tmp_path, str(source), output, server.base_url)
    _, stderr = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, stderr
    assert s3.read(key)["response"].to_list() == [answer_for(p) for p in prompts]
    assert server.stats.answered == rows  # the checkpoint held every answer
    assert not list((tmp_path / "enrich-runs").rglob(".out.parquet.tmp-*"))
