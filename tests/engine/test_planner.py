"""The plan made while SOURCE is listed (``engine/planner.py``) and a sorted
Parquet manifest read a batch at a time (``storage/sources.stream_sources``):
shards go out before the listing ends, the driver holds a few parts, and
the parts a killed driver left are the rerun's plan. Real Parquet on disk
and on moto's S3; no Ray (the end-to-end kill is ``test_engine.py``'s)."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from segbatch.cli import main as cli
from segbatch.engine import JobStore, Progress, make_shards
from segbatch.engine import planner as planner_mod
from segbatch.engine.planner import Planner
from segbatch.storage import Storage
from segbatch.storage import sources as sources_mod
from segbatch.storage.sources import Listing, SourceError, stream_sources

URIS = [f"s3://archive/day1/{i:05d}.jpg" for i in range(100)]


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of 8 to 32 URIs, chunks of 10: many parts from a hundred URIs."""
    monkeypatch.setattr(planner_mod, "FIRST_PART_URIS", 8)
    monkeypatch.setattr(planner_mod, "PART_URIS", 32)
    monkeypatch.setattr(sources_mod, "CHUNK_URIS", 10)


def _manifest(path: Path, uris: list[str], row_group_size: int = 16) -> str:
    pq.write_table(pa.table({"uri": uris}), path, row_group_size=row_group_size)
    return str(path)


def _take_all(planner: Planner) -> list:
    shards = []
    while not planner.finished():
        planner.wait()
        while (shard := planner.take()) is not None:
            shards.append(shard)
    return shards


def test_a_sorted_parquet_manifest_is_read_a_batch_at_a_time(tmp_path: Path, small_parts):
    uris = URIS[:50] + URIS[49:]  # one URI twice, side by side
    listing = stream_sources(_manifest(tmp_path / "m.parquet", uris), Storage(), dest=str(tmp_path / "out"))
    assert listing.estimate == 101  # the manifest's rows, before reading them
    chunks = list(listing.chunks)
    assert len(chunks) == 11 and max(map(len, chunks)) == 10
    assert [u for c in chunks for u in c] == URIS  # the repeat once


def test_an_unsorted_or_relative_manifest_is_listed_whole_as_before(tmp_path: Path, small_parts):
    shuffled = URIS[50:] + URIS[:50]
    listing = stream_sources(_manifest(tmp_path / "m.parquet", shuffled), Storage())
    assert [u for c in listing.chunks for u in c] == URIS  # sorted in memory (list_sources)
    relative = stream_sources(_manifest(tmp_path / "r.parquet", ["a.jpg", "b.jpg"]), Storage())
    assert [u for c in relative.chunks for u in c] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]


def test_segbatchs_outputs_are_left_out_of_a_streamed_manifest(tmp_path: Path, small_parts):
    dest = tmp_path / "out"
    uris = sorted([str(tmp_path / f"img{i}.jpg") for i in range(12)] + [str(dest / "data" / "part-00000.parquet")])
    listing = stream_sources(_manifest(tmp_path / "m.parquet", uris), Storage(), dest=str(dest))
    assert [u for c in listing.chunks for u in c] == [u for u in uris if not u.startswith(str(dest))]


def test_shards_go_out_before_the_listing_ends(tmp_path: Path, small_parts):
    """The first part's shards are taken while the listing still waits on its source;
    plan.json says the plan is not complete until it ends."""
    store = JobStore(str(tmp_path / "dest"), Storage())
    gate = threading.Event()

    def chunks():
        yield URIS[:10]
        gate.wait(30)  # the source is slow: the rest comes later
        for i in range(10, 100, 10):
            yield URIS[i : i + 10]

    planner = Planner(store.plan, Listing("src", chunks(), None), 4, set()).start()
    assert planner.estimate is None  # a streamed listing's size is not known: the pool is not capped by it
    try:
        assert planner.wait()
        first = planner.take()
        assert first.id == 0 and first.uris == tuple(URIS[:4])
        info = store.plan_info()
        assert info["complete"] is False and info["num_uris"] == 8  # the first part: two whole shards
        shown = CliRunner().invoke(cli, ["status", store.dest]).output
        assert "0/8 images committed" in shown and "the plan is not whole yet: 8 images planned so far" in shown
        assert JobStore(store.dest, store.storage).data_url(0).endswith("part-00000.parquet")
        gate.set()
        shards = [first, *_take_all(planner)]
    finally:
        planner.close()
    assert shards == make_shards(URIS, 4)
    assert store.plan_info()["complete"] is True and store.plan_info()["num_shards"] == 25
    progress = Progress(total=0)
    planner.report(progress)
    assert progress.total == 100 and progress.shards_total == 25
    assert store.read_plan()[0] == shards


def test_the_listing_runs_at_most_a_few_parts_ahead_of_the_workers(tmp_path: Path, small_parts):
    """Nothing taken: the planner stops listing once PARTS_AHEAD parts wait (the driver's memory bound)."""
    store = JobStore(str(tmp_path / "dest"), Storage())
    read = []

    def chunks():
        for i in range(0, 100, 10):
            read.append(i)
            yield URIS[i : i + 10]

    planner = Planner(store.plan, Listing("src", chunks(), 100), 2, set()).start()
    assert planner.estimate == 50  # shards, at most: sizes the pool
    try:
        deadline = threading.Event()
        deadline.wait(1.0)
        held = planner.waiting()
        assert len(read) < 10 and held <= (planner_mod.PARTS_AHEAD + 1) * 32 // 2
        assert store.plan_info()["complete"] is False
        assert len(_take_all(planner)) == 50
    finally:
        planner.close()
    assert len(read) == 10


def test_a_rerun_hands_out_only_shards_without_a_record_then_the_new_uris(tmp_path: Path, small_parts):
    store = JobStore(str(tmp_path / "dest"), Storage())
    store.write_plan(URIS[::2], 5)  # 50 URIs, 10 shards, in several parts
    assert len(store.plan.parts(store.plan_info())) > 1
    committed = {0, 1, 2, 7}
    planner = Planner(store.plan, Listing.of("src", URIS), 5, committed).start()  # the prefix grew
    try:
        shards = _take_all(planner)
    finally:
        planner.close()
    old = [s for s in make_shards(URIS[::2], 5) if s.id not in committed]
    assert shards[: len(old)] == old
    assert [u for s in shards[len(old) :] for u in s.uris] == URIS[1::2]  # the new ones, once, after
    assert shards[len(old)].id == 10
    progress = Progress(total=0)
    planner.report(progress)
    assert progress.done_at_start == progress.done == 20 and progress.shards_done == 4 and progress.total == 100
    assert sorted(u for s in store.read_plan()[0] for u in s.uris) == URIS


def test_a_listing_that_fails_mid_way_raises_in_the_driver_and_keeps_its_parts(tmp_path: Path, small_parts):
    store = JobStore(str(tmp_path / "dest"), Storage())

    def chunks():
        yield URIS[:40]
        raise PermissionError("AccessDenied listing s3://archive/day1/")

    planner = Planner(store.plan, Listing("src", chunks(), None), 4, set()).start()
    taken = []
    with pytest.raises(PermissionError, match="AccessDenied"):
        while True:
            planner.wait()
            shard = planner.take()
            if shard is not None:
                taken.append(shard)
    planner.close()
    assert [u for s in taken for u in s.uris] == URIS[:40]
    assert store.plan_info()["complete"] is False
    assert store.write_plan(URIS, 4) == make_shards(URIS, 4)[10:]  # the rerun plans the rest only


def test_a_manifest_of_only_segbatchs_outputs_is_refused(tmp_path: Path, small_parts):
    dest = tmp_path / "out"
    manifest = _manifest(tmp_path / "m.parquet", [str(dest / "data" / f"part-{i:05d}.parquet") for i in range(3)])
    store = JobStore(str(dest), Storage())
    listing = stream_sources(manifest, Storage(), dest=str(dest))
    with pytest.raises(SourceError, match="no images found under .* but segbatch's own outputs"):
        Planner(store.plan, listing, 4, set()).plan_all()


def test_a_manifest_on_s3_is_streamed(s3, s3_server, small_parts, tmp_path: Path):
    local = _manifest(tmp_path / "m.parquet", URIS)
    s3.put("lists/m.parquet", Path(local).read_bytes())
    storage = Storage(s3.storage_options)
    listing = stream_sources(s3.url("lists/m.parquet"), storage, dest=s3.url("out"))
    assert listing.estimate == 100
    store = JobStore(s3.url("out"), storage)
    shards = Planner(store.plan, listing, 8, set()).plan_all()
    assert shards == make_shards(URIS, 8)
    assert JobStore(s3.url("out"), storage).read_plan() == (shards, 8)


def test_an_s3_prefix_is_listed_a_page_at_a_time_in_key_order(s3, small_parts):
    """1,000 keys a LIST page: sub-prefixes of two pages and more, their images in key order (odd
    names included), a non-image and a folder marker left out, DEST's outputs too."""
    from concurrent.futures import ThreadPoolExecutor

    names = [f"in/day{d}/img {i:04d}.jpg" for d in (1, 2) for i in range(1100)] + ["in/day1/café ü.png"]
    with ThreadPoolExecutor(16) as pool:
        images = sorted(pool.map(lambda k: s3.put(k, b"x"), names))
    s3.put("in/notes.txt", b"x")
    s3.put("in/empty-folder/", b"")
    s3.put("in/out/data/part-00000.png", b"x")  # a DEST under SOURCE: its files are never input
    storage = Storage(s3.storage_options)
    pages = list(storage.list_pages(s3.url("in/")))
    found = [u for u in storage.list_files(s3.url("in/")) if not u.endswith("/")]  # fsspec's find, less the marker
    assert [u for p in pages for u in p] == found
    assert len(pages) > 1 and sum(map(len, pages)) == len(names) + 2  # every file, the marker not
    listing = stream_sources(s3.url("in"), storage, dest=s3.url("in/out"))
    assert listing.estimate is None  # not known before the listing ends
    chunks = list(listing.chunks)
    assert [u for c in chunks for u in c] == images and len(chunks) > 1
    assert images == sorted(images, key=lambda u: u.encode())  # S3's order (UTF-8 bytes) is Python's


def test_an_s3_prefix_without_images_is_refused_as_before(s3, small_parts):
    s3.put("docs/readme.txt", b"x")
    storage = Storage(s3.storage_options)
    with pytest.raises(SourceError, match="no images found under"):
        stream_sources(s3.url("docs/"), storage)
    with pytest.raises(SourceError, match="does not exist"):
        stream_sources(s3.url("nothing-here/"), storage)


def test_chunks_out_of_order_are_planned_each_uri_once(tmp_path: Path, small_parts):
    """An inventory's data files list keys in any order, a key maybe in two: each URI is planned
    once, in parts whose ranges say what they hold, and listing the same again plans nothing."""
    store = JobStore(str(tmp_path / "dest"), Storage())
    chunks = [URIS[60:], URIS[:30] + URIS[70:75], URIS[25:60], list(reversed(URIS[10:20]))]
    shards = Planner(store.plan, Listing("inventory", iter(chunks), None), 4, set()).plan_all()
    planned = [u for s in shards for u in s.uris]
    assert sorted(planned) == URIS and len(planned) == len(set(planned))
    for part in store.plan.parts(store.plan_info()):
        uris = store.plan.part_uris(part).to_pylist()
        assert (part.min_uri, part.max_uri) == (min(uris), max(uris))
    again = Planner(store.plan, Listing("inventory", iter(chunks), None), 4, set()).plan_all()
    assert again == [] and store.plan_info()["num_uris"] == 100


def test_sub_prefixes_are_listed_several_at_once_and_handed_on_in_key_order(s3, monkeypatch):
    """Files beside sub-prefixes whose names sort around them (a.jpg, a/, a0.jpg), a sub-prefix
    of several tasks' pages: the flat listing's keys in its order, with listings running at once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from segbatch.storage import listing

    monkeypatch.setattr(listing, "PAGES_A_TASK", 1)  # the 1,200-key sub-prefix takes two tasks
    names = ["p/a.jpg", "p/a0.jpg", "p/z.jpg"] + [f"p/a/{i:04d}.jpg" for i in range(1200)]
    names += [f"p/{c}/x{i}.jpg" for c in "bcdefgh" for i in range(3)] + ["p/b/deep/er/y.jpg"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put(k, b"x"), names))
    fs, _ = Storage(s3.storage_options).fs(s3.url("p/"))
    lock, running, most = threading.Lock(), [0], [0]

    def call(request):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            threading.Event().wait(0.05)  # a round trip, as S3's
            return fs.call_s3("list_objects_v2", **request)
        finally:
            with lock:
                running[0] -= 1

    keys = [k for batch in listing.prefix_pages(call, s3.bucket, "p/", lookahead=4) for k in batch]
    assert keys == sorted(names) and most[0] > 1
    most[0] = 0
    assert [k for b in listing.prefix_pages(call, s3.bucket, "p/", lookahead=1) for k in b] == sorted(names)
    assert most[0] == 1  # one at a time: a flat listing's pace


def test_a_sub_prefix_that_refuses_its_listing_is_listed_through_its_parent(s3, targeted_proxy):
    """Listing p/b/ is refused (a policy on the prefix), listing p/ is not: p/b/'s keys are still
    listed, in order, as the flat listing of p/ would have listed them."""
    names = [f"p/{c}/x{i}.jpg" for c in "abc" for i in range(3)]
    for name in names:
        s3.put(name, b"x")
    targeted_proxy.deny(f"/{s3.bucket}/p/b/", code="AccessDenied")
    storage = Storage(s3.options_via(targeted_proxy.endpoint))
    assert [u for page in storage.list_pages(s3.url("p/")) for u in page] == [s3.url(n) for n in names]
    assert targeted_proxy.counts["denied:AccessDenied"] >= 1  # the sub-prefix's own listing was refused
