"""A model error costs one row, never the shard; the worker's own faults fail it (issue 12, item 2).

Real images on disk, a real (seeded, tiny) Mask R-CNN, no Ray: ``ShardProcessor`` is what a worker runs.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from segbatch.config import ModelConfig
from segbatch.engine import (
    TYPICAL_PIXELS,
    WORKER_BASE_BYTES,
    Claim,
    InFlightBytes,
    ShardProcessor,
    Withdrawn,
    fetch_and_decode,
    held_bytes,
    inflight_budget,
    photo_claim_bytes,
    worker_memory_bytes,
)
from segbatch.model import Segmenter, decode_peak_bytes, load_model
from segbatch.storage import Storage

CFG = ModelConfig(model="random", seed=1, score_threshold=0.0, max_detections=4, min_size=96, max_size=128)


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter(load_model(CFG), CFG)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """Three healthy photos of one size, and two valid strips torchvision's resize shrinks to a 0-pixel side."""
    root = tmp_path_factory.mktemp("strips")
    out = {}
    for name in ("astronaut", "chelsea", "coffee"):
        path = root / f"{name}.png"
        Image.fromarray(getattr(skdata, name)()[:300, :400]).resize((128, 96)).save(path)
        out[name] = str(path)
    rng = np.random.default_rng(0)
    for name, shape in (("b_wide_strip", (1, 2000, 3)), ("d_tall_strip", (2000, 1, 3))):
        path = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
        out[name] = str(path)
    return out


def _rows(segmenter: Segmenter, uris: list[str], batch_size: int) -> dict[str, dict]:
    proc = ShardProcessor(segmenter, Storage(), batch_size=batch_size, max_bytes=1 << 26, max_pixels=10**8)
    try:
        rows, stats = proc.run(sorted(uris))
    finally:
        proc.close()
    assert stats.images == len(uris)
    return {r["uri"]: r for r in rows}


def _same_detections(a: dict, b: dict) -> None:
    """Equal rows, up to the last bits a batch's arithmetic may change on the CPU."""
    assert (a["status"], a["width"], a["height"]) == (b["status"], b["width"], b["height"])
    assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
    np.testing.assert_allclose([d["score"] for d in a["detections"]], [d["score"] for d in b["detections"]], atol=1e-4)
    np.testing.assert_allclose([d["box"] for d in a["detections"]], [d["box"] for d in b["detections"]], atol=0.05)


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_an_image_the_model_cannot_take_costs_its_row_only(segmenter, images, batch_size) -> None:
    healthy = [images[n] for n in ("astronaut", "chelsea", "coffee")]
    strips = [images["b_wide_strip"], images["d_tall_strip"]]
    reference = _rows(segmenter, healthy, batch_size)
    rows = _rows(segmenter, healthy + strips, batch_size)

    assert len(rows) == 5
    for uri, (width, height) in zip(strips, [(2000, 1), (1, 2000)]):
        row = rows[uri]
        assert row["status"] == "error" and (row["width"], row["height"]) == (width, height)
        assert row["error"].startswith("model failed: RuntimeError: ")
        assert "sizes should be greater than 0" in row["error"]
    for uri in healthy:
        assert rows[uri]["status"] == "ok"
        if batch_size == 1:
            assert rows[uri] == reference[uri]
        else:
            _same_detections(rows[uri], reference[uri])


class OutOfMemoryOnBatches(Segmenter):
    """The GPU's behaviour, honestly simulated on the CPU: a batch of more than one image
    (or, with ``alone_limit``, one image of more pixels than that) runs out of memory."""

    def __init__(self, *args, alone_limit: int | None = None, **kw):
        super().__init__(*args, **kw)
        self.alone_limit = alone_limit
        self.batches: list[int] = []
        self.cache_emptied = 0

    def raw_detections(self, images):
        self.batches.append(len(images))
        too_large = self.alone_limit and images and images[0].shape[0] * images[0].shape[1] > self.alone_limit
        if len(images) > 1 or too_large:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().raw_detections(images)

    def free_cached_memory(self) -> None:
        self.cache_emptied += 1


def test_out_of_memory_retries_at_batch_one(images) -> None:
    healthy = [images[n] for n in ("astronaut", "chelsea", "coffee")]
    oom = OutOfMemoryOnBatches(load_model(CFG), CFG)
    rows = _rows(oom, healthy, batch_size=2)
    assert sorted(oom.batches, reverse=True)[0] == 2 and 1 in oom.batches and oom.cache_emptied >= 1
    assert rows == _rows(Segmenter(load_model(CFG), CFG), healthy, batch_size=1)  # each alone: the very same rows


def test_an_image_out_of_memory_alone_is_its_own_error_row(images, tmp_path) -> None:
    big = tmp_path / "big.png"
    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(big)
    healthy = [images[n] for n in ("astronaut", "chelsea", "coffee")]
    oom = OutOfMemoryOnBatches(load_model(CFG), CFG, alone_limit=200 * 200)
    rows = _rows(oom, healthy + [str(big)], batch_size=2)
    assert rows[str(big)]["status"] == "error"
    assert rows[str(big)]["error"].startswith("model failed: OutOfMemoryError: CUDA out of memory")
    assert (rows[str(big)]["width"], rows[str(big)]["height"]) == (400, 300)
    assert all(rows[u]["status"] == "ok" for u in healthy)


class LostContext(Segmenter):
    """A worker whose CUDA context is lost after its first batch: every later call fails (sticky)."""

    calls = 0

    def raw_detections(self, images):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().raw_detections(images)


def test_a_fault_of_the_worker_fails_the_shard_and_writes_no_error_rows(images) -> None:
    healthy = [images[n] for n in ("astronaut", "chelsea", "coffee")]
    lost = LostContext(load_model(CFG), CFG)
    proc = ShardProcessor(lost, Storage(), batch_size=1, max_bytes=1 << 26, max_pixels=10**8)
    rows: list[dict] = []
    try:
        with pytest.raises(RuntimeError, match="the worker is at fault") as raised:
            for _ in proc.stream(sorted(healthy), rows):
                pass
    finally:
        proc.close()
    assert "CUDA error: an illegal memory access" in str(raised.value.__cause__)
    assert not any(r["status"] == "error" for r in rows)


# -- memory bounded in bytes (issue 12, "Also") ---------------------------------------------------------------


def test_in_flight_bytes_grant_what_fits_and_one_claim_per_shard_over_the_budget() -> None:
    """The policy alone, by explicit calls: no threads, no timing."""
    ledger = InFlightBytes(budget=100)
    a, b = ledger.open_shard(), ledger.open_shard()
    c1, c2, c3 = Claim(a), Claim(a), Claim(b)
    assert ledger.try_reserve(c1, 60) and ledger.try_reserve(c2, 40)  # 100: fits exactly
    assert not ledger.try_reserve(c3, 1) and c3.nbytes == 0  # full: it waits
    ledger.settle(c1, 20)  # decoded: its claim shrinks to what the image holds
    assert ledger.held == 60 and ledger.try_reserve(c3, 40)

    big = Claim(a)
    assert not ledger.try_reserve(big, 500)  # over the budget: not unless its consumer let it
    ledger.let_exceed(big)
    assert ledger.try_reserve(big, 500) and a.over is big  # its shard's one claim over the budget
    later = Claim(a)
    ledger.let_exceed(later)
    assert not ledger.try_reserve(later, 10)  # one per shard at a time
    other = Claim(b)
    ledger.let_exceed(other)
    assert ledger.try_reserve(other, 300)  # the other shard has its own
    assert ledger.held == ledger.peak == 100 + 500 + 300  # = budget + one claim per shard over it

    ledger.settle(big, 0)  # its decode failed: released, and its shard may go over again
    assert a.over is None and ledger.held == 400 and ledger.try_reserve(later, 10) and a.over is later
    assert ledger.held - 10 - 300 <= ledger.budget  # held - the claims over the budget never exceeds it

    ledger.settle(c2, 30)
    ledger.settle(c3, 40)
    ledger.close_shard(a)  # a stops early: what it holds decoded is released; `later` still decodes
    assert ledger.held == 40 + 300 + 10
    ledger.settle(later, 5)  # its decode ended: nobody's, released
    assert ledger.held == 340
    with pytest.raises(Withdrawn):
        ledger.try_reserve(Claim(a), 1)  # a stopped: its fetches give up
    ledger.release(c3)
    ledger.release(other)  # still decoding in b: no effect until settled
    assert ledger.held == 300
    ledger.settle(other, 200)
    ledger.release(other)
    ledger.release(other)  # twice: once only
    ledger.close_shard(b)
    assert ledger.held == 0 and ledger.peak == 900


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never met"
        time.sleep(0.001)


def test_a_fetch_waits_for_room_then_gets_it_or_gives_up_when_its_shard_stops() -> None:
    ledger = InFlightBytes(budget=100)
    shard = ledger.open_shard()
    first, waiter = Claim(shard), Claim(shard)
    ledger.reserve(first, 100)
    outcome: list[object] = []
    fetch: Future = Future()

    def fetch_in_a_thread() -> None:
        try:
            ledger.reserve(waiter, 50)
            outcome.append("granted")
        except Withdrawn as exc:
            outcome.append(exc)
        fetch.set_result(None)
        ledger.poke()

    t = threading.Thread(target=fetch_in_a_thread, daemon=True)
    t.start()
    assert ledger.wait_for(waiter, fetch)  # its consumer learns it waits for room
    ledger.settle(first, 60)  # 60 + 50 > 100: still waits
    _until(lambda: ledger.waiting == 1)
    assert not outcome
    ledger.settle(first, 50)  # now it fits
    t.join(10)
    assert not t.is_alive() and outcome == ["granted"] and ledger.held == 100
    assert not ledger.wait_for(waiter, fetch)  # ended, not waiting

    stuck = Claim(shard)
    t = threading.Thread(target=lambda: outcome.append(_raises(ledger.reserve, stuck, 1)), daemon=True)
    t.start()
    _until(lambda: ledger.waiting == 1)
    ledger.close_shard(shard)  # the shard stopped: the waiting fetch wakes and gives up
    t.join(10)
    assert not t.is_alive() and isinstance(outcome[-1], Withdrawn)
    assert ledger.held == 50 and ledger.waiting == 0  # `waiter` still decodes, its bytes counted until it ends
    ledger.settle(waiter, 30)
    assert ledger.held == 0


def _raises(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


class CheckedLedger(InFlightBytes):
    """Checks, at every claim granted, that held - the claims over the budget <= budget (the
    invariant behind the bound), and that no claim grows once decoded (it was claimed whole)."""

    grown = 0

    def _grant(self, claim, nbytes):
        granted = super()._grant(claim, nbytes)
        over = sum(s.over.nbytes for s in self._open if s.over is not None)
        assert self.held - over <= self.budget
        return granted

    def settle(self, claim, nbytes):
        if claim.state == "decoding" and nbytes > claim.nbytes:
            self.grown += 1
        super().settle(claim, nbytes)


def _noise_pngs(root, sides: list[int]) -> tuple[list[str], int]:
    """PNGs of noise (as large as PNG gets) of these sides; and the largest claim among them."""
    rng = np.random.default_rng(1)
    uris, largest = [], 0
    for i, side in enumerate(sides):
        path = root / f"img{i:02d}_{side}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
        largest = max(largest, path.stat().st_size + decode_peak_bytes(side, side, "RGB", "PNG"))
    return uris, largest


ORDERS = {
    "small first, then large": [40, 50, 60, 70, 40, 60, 300, 300, 500, 300, 300],
    "largest in the middle": [40, 300, 60, 300, 50, 500, 40, 300, 70, 60, 300, 40],
    "large first": [500, 300, 300, 300, 60, 50, 40, 70, 40],
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shards", [1, 2])
def test_a_worker_holds_no_more_bytes_than_its_budget_plus_one_image_per_shard(
    segmenter, tmp_path, order, shards
) -> None:
    """Large and small images in several orders, one shard or two streaming at once from threads: held
    bytes stay within the budget plus one claim per shard, whatever the timing (checked at every grant),
    and an image larger than the whole budget still gets its row."""
    uris, largest = _noise_pngs(tmp_path, ORDERS[order])
    cut = tmp_path / "zz_cut.png"  # a header that parses, a body that does not: its claim is released
    whole = Path(next(u for u in uris if u.endswith("_300.png"))).read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    uris.append(str(cut))
    budget = 2 * (
        300 * 300 * 3 + decode_peak_bytes(300, 300, "RGB", "PNG")
    )  # two of the 300 px; the 500 px alone exceeds it
    assert largest > budget
    proc = ShardProcessor(
        segmenter,
        Storage(),
        batch_size=2,
        max_bytes=1 << 26,
        max_pixels=10**8,
        io_threads=4,
        inflight_bytes=budget,
        shards=shards,
    )
    proc.inflight = ledger = CheckedLedger(budget)
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = proc.run(uris)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(shards)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a shard never finished"
    finally:
        proc.close()
    assert not errors
    for rows, stats in results.values():
        assert len(rows) == len(uris) and stats.errors == 1
        assert next(r for r in rows if r["uri"] == str(cut))["error"].startswith("truncated PNG")
    assert budget < ledger.peak <= budget + shards * largest  # the bound held, and was reached
    assert ledger.grown == 0  # no image held more than its fetch claimed
    assert ledger.held == 0 and ledger.waiting == 0  # every byte released, no fetch left waiting


class StopsAtSecondBatch(Segmenter):
    """A worker fault (sticky, as a lost CUDA context is) from the second batch on, raised once
    ``ledger`` has a fetch blocked for room."""

    calls = 0
    ledger: InFlightBytes | None = None

    def raw_detections(self, images):
        self.calls += 1
        if self.calls >= 2:
            _until(lambda: self.ledger.waiting >= 1)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().raw_detections(images)


def test_a_shard_stopped_early_releases_everything_and_leaves_no_fetch_waiting(tmp_path) -> None:
    """A fault mid-stream, while fetches wait for room (a budget smaller than any image: every fetch
    but the one the consumer waits for must wait): the shard's claims all end, no I/O thread stays blocked."""
    uris, _ = _noise_pngs(tmp_path, [120] * 16)
    faulty = StopsAtSecondBatch(load_model(CFG), CFG)
    proc = ShardProcessor(
        faulty,
        Storage(),
        batch_size=1,
        max_bytes=1 << 26,
        max_pixels=10**8,
        io_threads=4,
        inflight_bytes=1000,
        shards=1,
    )
    proc.inflight = faulty.ledger = ledger = CheckedLedger(1000)
    try:
        with pytest.raises(RuntimeError, match="the worker is at fault"):
            for _ in proc.stream(uris, []):
                pass
        drained = threading.Thread(target=proc.io_pool.shutdown, kwargs={"wait": True}, daemon=True)
        drained.start()
        drained.join(30)
        assert not drained.is_alive(), "an I/O thread stayed blocked"
    finally:
        proc.close()
    assert ledger.held == 0 and ledger.waiting == 0 and ledger.peak > ledger.budget
    assert not ledger._open


def test_a_jpeg_left_to_the_gpu_claims_its_file_and_a_tile_its_window(tmp_path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
    claimed: list[int] = []
    deferred = fetch_and_decode(str(path), Storage(), 1 << 26, 10**8, gpu_jpeg=True, reserve=claimed.append)
    assert deferred.jpeg is not None and claimed == [len(deferred.jpeg)] == [held_bytes(deferred)]
    claimed.clear()
    decoded = fetch_and_decode(str(path), Storage(), 1 << 26, 10**8, reserve=claimed.append)
    assert claimed == [path.stat().st_size + decode_peak_bytes(120, 90, "RGB", "JPEG")]
    assert claimed[0] >= held_bytes(decoded) == 90 * 120 * 3
    claimed.clear()
    assert fetch_and_decode(str(path), Storage(), 1 << 26, 100, reserve=claimed.append).error_row is not None
    assert claimed == []  # refused from its header: nothing claimed

    import rasterio

    from segbatch.engine import TileReading
    from segbatch.geo import RasterInfo, Window, tile_item, tile_peak_bytes

    scene = tmp_path / "scene.tif"
    from affine import Affine

    geo = {"crs": "EPSG:3857", "transform": Affine(1, 0, 0, 0, -1, 150)}
    with rasterio.open(scene, "w", driver="GTiff", width=200, height=150, count=3, dtype="uint16", **geo) as ds:
        ds.write(rng.integers(0, 4000, (3, 150, 200), dtype=np.uint16))
    info = RasterInfo(200, 150, 3, "uint16", None, (1, 0, 0, 0, 1, 0), ((0, 4000),) * 3)
    w = Window(10, 20, 64, 48)
    with TileReading({str(scene): info}) as tiles:
        tile = fetch_and_decode(
            tile_item(str(scene), w), Storage(), 1 << 26, 10**8, tiles=tiles, reserve=claimed.append
        )
    assert tile.image.shape == (48, 64, 3)
    assert claimed == [tile_peak_bytes(w, info)] == [64 * 48 * (3 * 2 + 3 + 1 + 16)]


def test_a_worker_reserves_its_model_budget_and_one_claim_over_it_per_shard() -> None:
    small = worker_memory_bytes(batch_size=2, io_threads=4, max_pixels=10**6)
    default = worker_memory_bytes(batch_size=2, io_threads=4, max_pixels=178_956_970)
    assert 2 << 30 < small < default < 8 << 30
    budget = inflight_budget(2, 4)
    assert default == WORKER_BASE_BYTES + budget + 2 * photo_claim_bytes() + 3 * TYPICAL_PIXELS * 12
