"""Commit records folded into block files (issue 18): a rerun or ``segbatch status`` learns what
is done from a listing and a few Parquet files, not one object per shard; and every promise holds
across the fold: each shard counted once, a crash between the block and the deletes harmless,
blocks a killed run left whole folded by the next.

Blocks of 4 shards here (``commits.BLOCK_SHARDS`` is 1024), locally and on moto's S3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from segbatch.engine import CommitRecord, JobStore, commits
from segbatch.storage import Storage, join

from s3util import S3Bucket

URIS = [f"s3://bucket/img/{i:04d}.jpg" for i in range(10)]  # shards of 1: ids 0-9, blocks 0-3 and 4-7 full


@pytest.fixture(autouse=True)
def blocks_of_four(monkeypatch) -> None:
    monkeypatch.setattr(commits, "BLOCK_SHARDS", 4)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    if request.param == "local":
        store = JobStore(str(tmp_path / "dest"), Storage())
    else:
        s3: S3Bucket = request.getfixturevalue("s3")
        store = JobStore(s3.url("out/dest/"), Storage(s3.storage_options))
    store.write_plan(URIS, 1)
    return store


def _commit(store: JobStore, sid: int) -> CommitRecord:
    return store.commit(sid, pa.table({"uri": [URIS[sid]]}), CommitRecord(rows=1, errors=sid % 2, detections=sid))


def _names(store: JobStore) -> list[str]:
    return store.storage.listdir_names(join(store.meta, "commits"))


def test_a_full_block_becomes_one_file_as_its_last_shard_commits(store: JobStore) -> None:
    compactor = store.compactor(len(URIS), set())
    for sid in (1, 0, 3, 2, 9, 5):  # out of order, as workers finish
        compactor.committed(_commit(store, sid))
    assert _names(store) == ["block-00000000-00000003.parquet", "part-00005.json", "part-00009.json"]
    assert store.committed() == {0, 1, 2, 3, 5, 9}
    records = store.commit_records()
    assert [r.shard for r in records] == [0, 1, 2, 3, 5, 9]
    assert [r.detections for r in records] == [0, 1, 2, 3, 5, 9] and sum(r.errors for r in records) == 4
    assert records[0].file == store.data_url(0)  # the record as written, whole
    # the last, partial block (8-9) never folds: a nightly run may extend the plan there
    for sid in (4, 6, 7, 8):
        compactor.committed(_commit(store, sid))
    assert _names(store) == [
        "block-00000000-00000003.parquet",
        "block-00000004-00000007.parquet",
        "part-00008.json",
        "part-00009.json",
    ]
    assert store.committed() == set(range(10)) and len(store.commit_records()) == 10


def test_a_crash_between_the_block_and_the_deletes_counts_each_shard_once(store: JobStore) -> None:
    compactor = store.compactor(len(URIS), set())
    for sid in range(4):
        compactor.committed(_commit(store, sid))
    # as if the driver died after publishing the block: the JSON records are back beside it
    for sid in range(4):
        _commit(store, sid)
    assert "part-00000.json" in _names(store) and "block-00000000-00000003.parquet" in _names(store)
    assert store.committed() == {0, 1, 2, 3}
    assert [r.shard for r in store.commit_records()] == [0, 1, 2, 3]


def test_the_next_run_folds_what_a_killed_run_committed_whole(store: JobStore) -> None:
    for sid in range(6):  # no compactor: the driver was killed before it folded anything
        _commit(store, sid)
    resumed = store.compactor(len(URIS), store.committed())
    resumed.catch_up()  # reads the block's four JSON records, once
    assert _names(store) == ["block-00000000-00000003.parquet", "part-00004.json", "part-00005.json"]
    for sid in (6, 7):  # 4 and 5 were committed before: read back when the block fills
        resumed.committed(_commit(store, sid))
    assert "block-00000004-00000007.parquet" in _names(store)
    assert [r.shard for r in store.commit_records()] == list(range(8))


def test_a_block_file_holds_each_record_as_its_json() -> None:
    record = CommitRecord(rows=3, errors=1, detections=7, stage_seconds={"infer": 0.5}, node="n", pid=9, shard=2)
    assert CommitRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


@pytest.mark.slow
def test_a_job_folds_its_records_and_status_and_resume_read_them(ray_local, tmp_path) -> None:
    from runutil import FAST_MODEL, _png

    from segbatch.cli import main
    from segbatch.config import JobConfig, ModelConfig
    from segbatch.engine import run_job

    (tmp_path / "in").mkdir()
    images = [tmp_path / "in" / f"{i:02d}.png" for i in range(10)]
    for i, path in enumerate(images):
        path.write_bytes(_png(i))
    cfg = JobConfig(
        source=str(tmp_path / "in"),
        dest=str(tmp_path / "dest"),
        shard_size=1,
        workers=1,
        cpus_per_worker=1,
        model=ModelConfig(**FAST_MODEL),
        progress="none",
    )
    first = run_job(cfg)
    assert first.complete and first.summary.shards_committed == 10 and first.summary.rows == len(images)
    names = sorted(p.name for p in (tmp_path / "dest" / "_segbatch" / "commits").iterdir())
    assert names == [
        "block-00000000-00000003.parquet",
        "block-00000004-00000007.parquet",
        "part-00008.json",
        "part-00009.json",
    ]
    assert pq.read_table(tmp_path / "dest" / "data").num_rows == len(images)
    again = run_job(cfg)
    assert again.complete and again.summary.images_this_run == 0 and again.summary.shards_committed == 10
    status = CliRunner().invoke(main, ["status", str(tmp_path / "dest"), "--json"])
    assert status.exit_code == 0, status.output
    state = json.loads(status.output)
    assert state["shards_committed"] == 10 and state["images_committed"] == len(images)
