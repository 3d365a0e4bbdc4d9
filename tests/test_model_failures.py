"""A model error costs one row, never the shard; the worker's own faults fail it (issue 12, item 2).

Real images on disk, a real (seeded, tiny) Mask R-CNN, no Ray: ``ShardProcessor`` is what a worker runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from segbatch.config import ModelConfig
from segbatch.model import load_model
from segbatch.pipeline import InFlightBytes, ShardProcessor, worker_memory_bytes
from segbatch.predictor import Segmenter
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



def test_in_flight_bytes_admit_what_fits_and_one_image_alone() -> None:
    ledger = InFlightBytes(budget=100, io_threads=4)
    assert ledger.try_start() and ledger.try_start()  # nothing seen yet: fetches count 1 byte each
    ledger.fetched(60)
    ledger.fetched(30)
    assert ledger.held == 90 and not ledger.try_start()  # 90 + one more of the largest (60) does not fit
    assert ledger.try_start(alone=True)  # a shard with nothing in flight always gets one: no starving
    ledger.fetched(500)  # larger than the budget: it went alone
    ledger.release(590)
    assert ledger.held == 0 and not ledger.try_start()  # 500 is now the estimate of a fetch, over the budget


class RecordingLedger(InFlightBytes):
    peak = 0

    def fetched(self, nbytes: int) -> None:
        super().fetched(nbytes)
        self.peak = max(self.peak, self.held)


def test_a_shard_holds_no_more_decoded_bytes_than_its_budget(segmenter, tmp_path) -> None:
    """Large and small images mixed: what waits decoded stays within the budget plus one image, and
    an image larger than the whole budget still gets its row."""
    rng = np.random.default_rng(1)
    uris = []
    for i, side in enumerate([40, 300, 60, 300, 50, 500, 40, 300, 70, 60, 300, 40]):
        path = tmp_path / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
        uris.append(str(path))
    largest = 500 * 500 * 3
    budget = 2 * 300 * 300 * 3  # two of the large ones; the 500 px one exceeds it alone
    proc = ShardProcessor(
        segmenter, Storage(), batch_size=4, max_bytes=1 << 26, max_pixels=10**8, inflight_bytes=budget, shards=1
    )
    proc.inflight = ledger = RecordingLedger(budget, 4)
    try:
        rows, stats = proc.run(uris)
    finally:
        proc.close()
    assert len(rows) == len(uris) and stats.errors == 0
    assert budget < ledger.peak <= budget + largest  # the bound held, and was reached (the test measured something)
    assert ledger.held == 0 and ledger.fetching == 0  # every byte released


def test_a_worker_reserves_its_model_and_budget() -> None:
    small = worker_memory_bytes(batch_size=2, io_threads=4, max_pixels=10**6)
    default = worker_memory_bytes(batch_size=2, io_threads=4, max_pixels=178_956_970)
    assert 2 << 30 < small < default < 8 << 30
