"""Shards, the plan file, commit records and clear(), locally and on S3."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from segbatch.engine import CommitRecord, JobStore, JobSummary, Shard, make_shards
from segbatch.storage import Storage, join

from faultproxy import FaultProxy
from s3util import S3Bucket

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
    table = store.storage.read_parquet(join(store.meta, "plan", "shards-00000.parquet"))
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
    assert store.committed() == set() and store.commit_records() == []

    store.commit(0, table, CommitRecord(rows=10, errors=1))
    assert _data_rows(store) == 10
    assert store.committed() == {0}
    [record] = store.commit_records()
    assert record.shard == 0 and record.rows == 10 and record.errors == 1
    assert record.file == store.data_url(0)

    # a second attempt of the same shard replaces the file: still one copy of each row
    store.commit(0, table, CommitRecord())  # rows counted from the table when not given
    assert _data_rows(store) == 10 and store.commit_records()[0].rows == 10

    store.commit(2, pa.table({"uri": URIS[20:], "status": ["ok"] * 3}), CommitRecord(rows=3))
    assert store.committed() == {0, 2} and _data_rows(store) == 13
    # nothing left beside the files: no temporary object or hidden file under data/ or tmp/
    assert store.storage.list_files(store.data) == [store.data_url(0), store.data_url(2)]
    assert store.storage.list_files(join(store.meta, "tmp")) == []


def test_commit_records_keep_their_json(store: JobStore):
    """A shard's record and a scene's are written as the dicts they replaced were: same keys, same order."""
    store.write_plan(URIS, 10)
    shard = CommitRecord(rows=10, errors=1, detections=4, seconds=0.5, stage_seconds={"infer": 0.25}, node="n", pid=7)
    store.commit(0, pa.table({"uri": URIS[:10]}), shard)
    written = json.loads(store.storage.read_bytes(store.commit_url(0)))
    shard_keys = ["rows", "errors", "detections", "seconds", "stage_seconds", "node", "pid", "shard", "file"]
    shard_keys.append("committed")
    assert list(written) == shard_keys
    assert CommitRecord.from_json(written) == store.commit_records()[0]
    scene = CommitRecord(rows=1, tiles=4, errors=0, detections=2, pieces_merged=1, seconds=0.5)
    table = pa.table({"uri": ["s3://b/scene.tif"]})
    store.commit_scene("s3://b/scene.tif", table, table, scene)
    [written] = [r.to_json() for r in store.scene_records()]
    scene_keys = ["rows", "tiles", "errors", "detections", "pieces_merged", "seconds", "scene", "file", "committed"]
    assert list(written) == scene_keys


def test_summary_json_keys():
    """summary.json: a tiled job's summary alone has tiles, scenes and failed_scenes."""
    plain = JobSummary(complete=True, images=3, rows=3, failed_shards={}, segbatch_version="0").to_json()
    assert "tiles" not in plain and "failed_scenes" not in plain and plain["failed_shards"] == {}
    tiled = JobSummary(images=1, tiles=9, scenes=1, failed_scenes={"s": "why"}).to_json()
    assert tiled["tiles"] == 9 and tiled["failed_scenes"] == {"s": "why"}
    assert JobSummary.from_json(tiled) == JobSummary(images=1, tiles=9, scenes=1, failed_scenes={"s": "why"})


def test_a_shard_commit_on_s3_is_two_puts(s3: S3Bucket, s3_server: str):
    """One PUT of the data file at its final key, one of its record: 9 requests before
    (the temporary object's PUT, HEADs, a copy, listings and a delete, then the record)."""
    with FaultProxy(s3_server, rate=0.0) as proxy:
        store = JobStore(s3.url("out/dest/"), Storage(s3.options_via(proxy.endpoint)))
        store.write_plan(URIS, 10)
        table = pa.table({"uri": URIS[:10], "status": ["ok"] * 10})
        before = proxy.counts["forwarded"]
        store.commit(0, table, CommitRecord(rows=10))
        assert proxy.counts["forwarded"] - before == 2
    names = ["_segbatch/commits/part-00000.json", "_segbatch/plan.json", "_segbatch/plan/shards-00000.parquet"]
    names.append("data/part-00000.parquet")
    assert s3.keys("out/dest/") == [f"out/dest/{n}" for n in names]
    assert _data_rows(store) == 10


def test_readers_never_see_a_part_of_a_data_file(store: JobStore):
    """A reader of data/ while shards are committed, again and again: every file it
    lists reads whole (the local temporary file is in tmp/, renamed into place)."""
    import threading

    store.write_plan(URIS, 10)
    big = pa.table({"uri": [f"s3://b/{i:07d}.jpg" for i in range(100_000)], "status": ["ok"] * 100_000})
    stop, seen, errors = threading.Event(), [], []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(_data_rows(store))
            except Exception as exc:  # a part of a file would fail here
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(5):
            store.commit(0, big, CommitRecord())
    finally:
        stop.set()
        reader.join()
    assert not errors and set(seen) <= {0, 100_000} and _data_rows(store) == 100_000


def test_small_records(store: JobStore):
    assert store.read_config() is None and store.read_summary() is None and store.read_progress() is None
    store.write_config({"result_key": "abc"})
    store.write_summary(JobSummary(complete=True))
    store.write_progress({"done": 1})
    store.write_progress({"done": 2})
    assert store.read_config() == {"result_key": "abc"}
    assert store.read_summary() == JobSummary(complete=True) and store.read_progress() == {"done": 2}


def test_clear(store: JobStore):
    store.write_plan(URIS, 10)
    store.write_config({"k": 1})
    store.commit(1, pa.table({"uri": URIS[10:20]}), CommitRecord(rows=10))
    store.storage.write_parquet(pa.table({"uri": ["x"]}), store.tmp_url(2, "abandoned"))
    lease = join(store.meta, "lease.json")  # the driver clearing DEST holds it, and keeps it
    store.storage.write_bytes(lease, b"{}")

    store.clear()
    assert store.read_plan() is None and store.read_config() is None
    assert store.committed() == set() and _data_rows(store) == 0
    assert store.storage.list_files(store.dest) == [lease]


def _listing(store: JobStore) -> dict[str, tuple[int, object]]:
    """Every file under DEST with its size and modification time."""
    fs, path = store.storage.fs(store.dest)
    fs.invalidate_cache()
    found = fs.find(path, detail=True)
    return {p: (info["size"], info.get("mtime") or info.get("LastModified")) for p, info in found.items()}


def test_reads_leave_an_interrupted_clear_to_the_driver(store: JobStore):
    store.write_plan(URIS, 10)
    store.write_config({"result_key": "abc"})
    store.commit(0, pa.table({"uri": URIS[:10]}), CommitRecord(rows=10))
    # clear() cut short (or under way in another process): the marker written, data/ gone, the records still there
    store.storage.write_bytes(join(store.meta, "clearing.json"), b"{}")
    store.storage.delete(store.data)
    before = _listing(store)

    reader = JobStore(store.dest, store.storage)  # `segbatch status`, or an actor
    assert reader.read_config() is None and reader.read_plan() is None  # a job being cleared is no job
    assert reader.clearing() and reader.read_summary() is None and reader.commit_records()
    assert _listing(store) == before  # nothing deleted by a reader

    driver = JobStore(store.dest, store.storage)  # the next driver, holding the lease
    driver.finish_clear()
    assert not driver.clearing() and driver.committed() == set()
    assert store.storage.list_files(store.dest) == []


def test_a_part_written_before_plan_json_named_it_is_the_plans(store: JobStore):
    """A driver killed between a part and plan.json: the part is the plan's (its shards may be
    running already), and the rerun plans none of its URIs again."""
    store.write_plan(URIS[:20], 10)
    before = store.storage.read_bytes(join(store.meta, "plan.json"))
    store.write_plan(URIS[20:], 10)
    store.storage.write_bytes(join(store.meta, "plan.json"), before)  # the crash: plan.json is the old one

    fresh = JobStore(store.dest, store.storage)
    assert fresh.read_plan()[0] == make_shards(URIS, 10)
    assert fresh.write_plan(URIS, 10) == []  # the rerun lists all again: nothing new
    assert JobStore(store.dest, store.storage).read_plan()[0] == make_shards(URIS, 10)


def _legacy_plan(store: JobStore, uris: list[str], shard_size: int, rows: int | None = None) -> None:
    """A plan as segbatch wrote it before parts: one plan.parquet, then plan.json."""
    ids = pa.array([i // shard_size for i in range(len(uris))], pa.int32())
    store.storage.write_parquet(pa.table({"uri": uris, "shard": ids}), join(store.meta, "plan.parquet"))
    count = len(uris) if rows is None else rows
    info = {"shard_size": shard_size, "num_shards": -(-count // shard_size), "num_uris": count, "width": 5}
    store.storage.write_bytes(join(store.meta, "plan.json"), json.dumps(info).encode())


def test_a_plan_made_before_parts_resumes_and_extends(store: JobStore):
    _legacy_plan(store, URIS[:20], 10)
    assert store.read_plan() == (make_shards(URIS[:20], 10), 10)
    assert store.write_plan(URIS, 10) == [Shard(2, tuple(URIS[20:]))]  # a nightly run: the new images only
    again = JobStore(store.dest, store.storage)
    assert again.read_plan()[0] == make_shards(URIS, 10)
    assert again.write_plan(URIS, 10) == [] and again.plan_info()["num_uris"] == len(URIS)


def test_a_plan_made_before_parts_ignores_rows_of_an_extension_cut_short(store: JobStore):
    _legacy_plan(store, URIS, 10, rows=20)  # the old extension appended rows, then was killed
    assert store.read_plan()[0] == make_shards(URIS[:20], 10)
    assert store.write_plan(URIS, 10) == [Shard(2, tuple(URIS[20:]))]


def test_plan_shorter_than_plan_json_is_an_error(store: JobStore):
    _legacy_plan(store, URIS[:5], 10, rows=23)
    with pytest.raises(ValueError, match="has 5 rows, plan.json says 23"):
        JobStore(store.dest, store.storage).read_plan()


def test_part_numbers_stay_put_when_an_extension_needs_more_digits(tmp_path: Path):
    store = JobStore(str(tmp_path), Storage())
    store.write_plan(URIS[:3], 1)  # part numbers of 5 digits
    store.write_plan([f"/y/{i:06d}.jpg" for i in range(100_000)], 1)  # now 100003 shards
    driver = JobStore(str(tmp_path), Storage())
    driver.read_plan()  # a resuming driver reads the plan first
    actor = JobStore(str(tmp_path), Storage())  # an actor only names files
    assert driver.data_url(7) == actor.data_url(7) == join(str(tmp_path), "data", "part-00007.parquet")
