"""--engine ray with the input and the output in object storage: Ray Data
workers read their shards' row groups straight from S3 (moto's real server
on 127.0.0.1), the driver never reads the rows, and the output is uploaded
as one object. The cluster starts after the endpoint is in the environment,
as a user's workers get theirs from the nodes they run on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_storage import BUCKET, S3, s3

from pipeline.runner import enrich

from conftest import StartServer, answer_for, make_config

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

__all__ = ["s3"]  # the module-scoped S3 server fixture, shared with test_storage


@pytest.fixture(scope="module")
def cluster_seeing_s3(s3: S3) -> Iterator[S3]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield s3
    finally:
        ray.shutdown()


def test_ray_workers_read_their_shards_from_s3_and_the_output_is_one_object(
    cluster_seeing_s3: S3,
    start_server: StartServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    store = cluster_seeing_s3
    rows = 600
    prompts = [f"question {i}" for i in range(rows)]
    local = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": range(rows), "question": prompts}), local, row_group_size=100)
    source = store.put("ray/in.parquet", local.read_bytes())
    sim = start_server(latency_ms=20.0)
    config = make_config(
        source,
        f"s3://{BUCKET}/ray/out.parquet",
        sim.base_url,
        **{"run.engine": "ray", "ray.workers": 2, "ray.shard_rows": 200, "cache.enabled": False},
    )

    summary = enrich(config)

    assert (summary.ok, summary.rows) == (rows, rows)
    out = store.read("ray/out.parquet")
    assert out["id"].to_list() == list(range(rows))
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert sim.stats.answered == rows
