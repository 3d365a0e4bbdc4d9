"""One shard through the stages: fetch, decode, infer, encode, write.

Plain Python (no Ray), so it runs and is tested in one process; ``worker.py``
wraps it in an actor. Fetching and decoding run in a thread pool ahead of
the model (Pillow and socket reads release the GIL), encoding of one batch
overlaps the inference of the next, and at most ``prefetch`` decoded images
wait at any time, so memory is bounded by what is in flight.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from . import schema
from .decode import DecodeError, decode_image
from .predictor import Segmenter
from .storage import Storage

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    """An image ready for the model, or the row that says why it is not."""

    uri: str
    image: np.ndarray | None = None
    error_row: dict[str, Any] | None = None


@dataclass
class ShardStats:
    images: int = 0
    errors: int = 0
    detections: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"fetch_decode": 0.0, "infer": 0.0, "encode": 0.0})


def fetch_and_decode(uri: str, storage: Storage, max_bytes: int, max_pixels: int) -> Decoded:
    """Read and decode one image; any failure becomes an error row naming its cause."""
    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)
    except FileNotFoundError:
        return Decoded(uri, error_row=schema.error_row(uri, "not found: no such file or object"))
    except Exception as exc:  # permissions, retries exhausted, too large
        return Decoded(uri, error_row=schema.error_row(uri, f"cannot read: {type(exc).__name__}: {storage.redact(str(exc))}"))
    try:
        return Decoded(uri, image=decode_image(data, max_pixels=max_pixels))
    except DecodeError as exc:
        return Decoded(uri, error_row=schema.error_row(uri, str(exc)))


def aspect_batches(items: Iterable[Decoded], batch_size: int, window: int) -> Iterator[list[Decoded]]:
    """Group decoded images into batches of similar aspect ratio.

    torchvision pads a batch to its largest height and width, so a portrait
    image batched with a landscape one nearly doubles the pixels computed.
    The oldest waiting image always goes into the next batch (nothing
    starves); its companions are the closest in aspect among at most
    ``window`` waiting images.
    """
    waiting: list[Decoded] = []

    def take() -> list[Decoded]:
        first = waiting.pop(0)
        ratio = np.log(first.image.shape[1] / first.image.shape[0])
        waiting.sort(key=lambda d: abs(np.log(d.image.shape[1] / d.image.shape[0]) - ratio))
        batch = [first] + waiting[: batch_size - 1]
        del waiting[: batch_size - 1]
        return batch

    for item in items:
        waiting.append(item)
        if len(waiting) >= max(window, batch_size):
            yield take()
    while waiting:
        yield take()


class ShardProcessor:
    """Turns a list of URIs into the rows of one Parquet file."""

    def __init__(
        self,
        segmenter: Segmenter,
        storage: Storage,
        *,
        batch_size: int,
        max_bytes: int,
        max_pixels: int,
        io_threads: int = 4,
    ):
        self.segmenter = segmenter
        self.storage = storage
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.prefetch = max(2 * batch_size, io_threads)
        self.io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="segbatch-io")
        self.encode_pool = ThreadPoolExecutor(1, thread_name_prefix="segbatch-encode")

    def close(self) -> None:
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.encode_pool.shutdown(wait=False, cancel_futures=True)

    def _decoded(self, uris: list[str], stats: ShardStats) -> Iterator[Decoded]:
        """Decoded images in order, at most ``prefetch`` fetched ahead."""
        queue: deque[Future] = deque()
        it = iter(uris)
        for uri in it:
            queue.append(self.io_pool.submit(fetch_and_decode, uri, self.storage, self.max_bytes, self.max_pixels))
            if len(queue) >= self.prefetch:
                break
        while queue:
            t0 = time.perf_counter()
            item = queue.popleft().result()
            stats.seconds["fetch_decode"] += time.perf_counter() - t0  # time the model waited
            nxt = next(it, None)
            if nxt is not None:
                queue.append(self.io_pool.submit(fetch_and_decode, nxt, self.storage, self.max_bytes, self.max_pixels))
            yield item

    def run(self, uris: list[str]) -> tuple[list[dict[str, Any]], ShardStats]:
        """Segment ``uris``; returns their rows sorted by URI, and stats."""
        rows: list[dict[str, Any]] = []
        stats = ShardStats()
        for stats in self.stream(uris, rows):
            pass
        return rows, stats

    def stream(self, uris: list[str], rows: list[dict[str, Any]]) -> Iterator[ShardStats]:
        """Segment ``uris``, appending their rows to ``rows`` (sorted by URI at
        the end); yields the running stats after each batch."""
        stats = ShardStats()
        pending: deque[Future] = deque()

        def drain() -> Iterator[ShardStats]:
            while pending:
                batch_rows = pending.popleft().result()
                rows.extend(batch_rows)
                stats.images += len(batch_rows)
                stats.errors += sum(r["status"] == schema.STATUS_ERROR for r in batch_rows)
                stats.detections += sum(len(r["detections"]) for r in batch_rows)
                yield stats

        def decodable() -> Iterator[Decoded]:
            for item in self._decoded(uris, stats):
                if item.error_row is not None:
                    pending.append(_done([item.error_row]))
                else:
                    yield item

        for batch in aspect_batches(decodable(), self.batch_size, window=self.prefetch):
            t0 = time.perf_counter()
            raws = self.segmenter.raw_detections([d.image for d in batch])
            stats.seconds["infer"] += time.perf_counter() - t0
            yield from drain()  # the previous batch's encoding overlapped this inference
            pending.append(self.encode_pool.submit(self._encode, batch, raws, stats))
        yield from drain()
        rows.sort(key=lambda r: r["uri"])
        yield stats

    def _encode(self, batch: list[Decoded], raws: list[dict], stats: ShardStats) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        out = []
        for item, raw in zip(batch, raws):
            h, w = item.image.shape[:2]
            out.append(schema.ok_row(item.uri, w, h, self.segmenter.records(raw, (h, w))))
        stats.seconds["encode"] += time.perf_counter() - t0
        return out


def _done(rows: list[dict[str, Any]]) -> Future:
    f: Future = Future()
    f.set_result(rows)
    return f
