"""Shards, the plan file, commit records and clear(), locally and on S3."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from s3util import S3Bucket
from segbatch.plan import JobStore, Shard, make_shards
from segbatch.storage import Storage, join

URIS = [f"s3://bucket/img/{i:04d}.jpg" for i in range(23)]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobStore:
    """A JobStore on a local DEST, then on an S3 DEST."""
    if request.param == "local":
        return JobStore(str(tmp_path / "dest"), Storage())
    s3: S3Bucket = request.getfixturevalue("s3")
    return JobStore(s3.url("out/dest/"), Storage(s3.storage_options))


def _data_rows(store: JobStore) -> int:
    """What a pyarrow.dataset reader of DEST/data sees."""
    fs, path = store.storage.fs(store.data)
    if not fs.exists(path):
        return 0
    fs.invalidate_cache()
    return pads.dataset(path, filesystem=fs, format="parquet").count_rows()


def test_make_shards_is_deterministic():
    shuffled = URIS[:]
    random.Random(5).shuffle(shuffled)
    shards = make_shards(shuffled + URIS[:3], 10)  # duplicates count once
    assert shards == make_shards(URIS, 10)
    assert [s.id for s in shards] == [0, 1, 2]
    assert [len(s.uris) for s in shards] == [10, 10, 3]
    assert shards[0] == Shard(0, tuple(URIS[:10]))
    assert make_shards([], 10) == []
    with pytest.raises(ValueError):
        make_shards(URIS, 0)


def test_plan_round_trip(store: JobStore):
    assert store.read_plan() is None
    store.write_plan(list(reversed(URIS)), 10)
    shards, shard_size = store.read_plan()
    assert shard_size == 10 and shards == make_shards(URIS, 10)
    table = store.storage.read_parquet(join(store.meta, "plan.parquet"))
    assert table.schema.field("uri").type == pa.string() and table.schema.field("shard").type == pa.int32()
    # a fresh store (another process: an actor) names files the same way
    again = JobStore(store.dest, store.storage)
    assert again.data_url(2) == store.data_url(2) == join(store.dest, "data", "part-00002.parquet")
    assert again.tmp_url(2, "abc") == join(store.dest, "_segbatch", "tmp", "part-00002.abc.parquet")
    assert again.commit_url(2) == join(store.dest, "_segbatch", "commits", "part-00002.json")


def test_part_numbers_grow_with_the_plan(tmp_path: Path):
    store = JobStore(str(tmp_path), Storage())
    store.write_plan([f"/x/{i:06d}.jpg" for i in range(100_000)], 1)
    assert JobStore(str(tmp_path), Storage()).data_url(7).endswith("part-000007.parquet")


def test_commit(store: JobStore):
    store.write_plan(URIS, 10)
    table = pa.table({"uri": URIS[:10], "status": ["ok"] * 10})
    tmp = store.tmp_url(0, "attempt1")
    store.storage.write_parquet(table, tmp)
    assert _data_rows(store) == 0  # written, not committed: readers of data/ see nothing
    assert store.committed() == set() and store.commit_records() == []

    store.commit(0, tmp, {"rows": 10, "errors": 1})
    assert _data_rows(store) == 10
    assert not store.storage.exists(tmp)
    assert store.committed() == {0}
    [record] = store.commit_records()
    assert record["shard"] == 0 and record["rows"] == 10 and record["errors"] == 1
    assert record["file"] == store.data_url(0)

    # a second attempt of the same shard replaces the file: still one copy of each row
    tmp2 = store.tmp_url(0, "attempt2")
    store.storage.write_parquet(table, tmp2)
    store.commit(0, tmp2, {})  # rows read from the file when not given
    assert _data_rows(store) == 10 and store.commit_records()[0]["rows"] == 10

    tmp3 = store.tmp_url(2, "a")
    store.storage.write_parquet(pa.table({"uri": URIS[20:], "status": ["ok"] * 3}), tmp3)
    store.commit(2, tmp3, {"rows": 3})
    assert store.committed() == {0, 2} and _data_rows(store) == 13


def test_small_records(store: JobStore):
    assert store.read_config() is None and store.read_summary() is None and store.read_progress() is None
    store.write_config({"result_key": "abc"})
    store.write_summary({"complete": True})
    store.write_progress({"done": 1})
    store.write_progress({"done": 2})
    assert store.read_config() == {"result_key": "abc"}
    assert store.read_summary() == {"complete": True} and store.read_progress() == {"done": 2}


def test_clear(store: JobStore):
    store.write_plan(URIS, 10)
    store.write_config({"k": 1})
    tmp = store.tmp_url(1, "x")
    store.storage.write_parquet(pa.table({"uri": URIS[10:20]}), tmp)
    store.commit(1, tmp, {"rows": 10})
    store.storage.write_parquet(pa.table({"uri": ["x"]}), store.tmp_url(2, "abandoned"))

    store.clear()
    assert store.read_plan() is None and store.read_config() is None
    assert store.committed() == set() and _data_rows(store) == 0
    assert store.storage.list_files(store.dest) == []


def test_interrupted_clear_is_finished(store: JobStore):
    store.write_plan(URIS, 10)
    tmp = store.tmp_url(0, "x")
    store.storage.write_parquet(pa.table({"uri": URIS[:10]}), tmp)
    store.commit(0, tmp, {"rows": 10})
    # clear() cut short: the marker written, data/ gone, the records still there
    store.storage.write_bytes(join(store.meta, "clearing.json"), b"{}")
    store.storage.delete(store.data)

    fresh = JobStore(store.dest, store.storage)
    assert fresh.read_config() is None and fresh.read_plan() is None
    assert fresh.committed() == set()
    assert store.storage.list_files(store.dest) == []


def test_extension_cut_short_before_plan_json_is_ignored(store: JobStore):
    store.write_plan(URIS[:20], 10)
    before = store.storage.read_bytes(join(store.meta, "plan.json"))
    store.extend_plan(URIS[20:], 10)
    # the crash: plan.parquet has the new rows, plan.json is the old one
    store.storage.write_bytes(join(store.meta, "plan.json"), before)

    fresh = JobStore(store.dest, store.storage)
    shards, _ = fresh.read_plan()
    assert shards == make_shards(URIS[:20], 10)
    # the rerun extends again: the new shard once, numbered as before
    assert fresh.extend_plan(URIS[20:], 10) == [Shard(2, tuple(URIS[20:]))]
    assert JobStore(store.dest, store.storage).read_plan()[0] == make_shards(URIS, 10)


def test_plan_shorter_than_plan_json_is_an_error(store: JobStore):
    store.write_plan(URIS, 10)
    store.storage.write_parquet(pa.table({"uri": URIS[:5], "shard": pa.array([0] * 5, pa.int32())}), join(store.meta, "plan.parquet"))
    with pytest.raises(ValueError, match="has 5 rows, plan.json says 23"):
        JobStore(store.dest, store.storage).read_plan()


def test_part_numbers_stay_put_when_an_extension_needs_more_digits(tmp_path: Path):
    store = JobStore(str(tmp_path), Storage())
    store.write_plan(URIS[:3], 1)  # part numbers of 5 digits
    store.extend_plan([f"/y/{i:06d}.jpg" for i in range(100_000)], 1)  # now 100003 shards
    driver = JobStore(str(tmp_path), Storage())
    driver.read_plan()  # a resuming driver reads the plan first
    actor = JobStore(str(tmp_path), Storage())  # an actor only names files
    assert driver.data_url(7) == actor.data_url(7) == join(str(tmp_path), "data", "part-00007.parquet")
