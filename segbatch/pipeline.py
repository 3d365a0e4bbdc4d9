"""One shard through the stages: fetch, decode, infer, encode, write.

Plain Python (no Ray), so it runs and is tested in one process; ``worker.py``
wraps it in an actor. Fetching and decoding run in a thread pool ahead of
the model (Pillow and socket reads release the GIL), encoding of one batch
overlaps the inference of the next, and at most ``prefetch`` decoded images
wait at any time, so memory is bounded by what is in flight.

Beside a GPU, encoding runs in processes of its own: the model's Python
(torchvision's detection code launches thousands of small kernels an image)
needs the GIL, and encoding in a thread of the same process would take it
from the model 17 ms an image. On a CPU the model's arithmetic dominates and
a thread does. Beside a GPU, too, JPEGs are decoded there in batches
(``jpeg.py``), which frees the CPUs and the GIL of Pillow's 20 ms an image.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from . import schema
from .decode import DecodeError, decode_image
from .jpeg import JpegHeader, decode_jpegs, jpeg_header
from .postprocess import class_map, records_and_box_masks
from .predictor import Segmenter
from .storage import OpenRasters, Storage, is_transient, join, output_name
from .tiles import RasterInfo, parse_tile_item, read_tile, tile_detections

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    """An image ready for the model (decoded, or a JPEG left to the GPU to
    decode), or the row that says why it is not."""

    uri: str
    image: np.ndarray | None = None
    error_row: dict[str, Any] | None = None
    jpeg: bytes | None = None
    header: JpegHeader | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width), upright."""
        if self.image is not None:
            return self.image.shape[0], self.image.shape[1]
        return self.header.height, self.header.width


@dataclass
class ShardStats:
    images: int = 0
    errors: int = 0
    detections: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"fetch_decode": 0.0, "infer": 0.0, "encode": 0.0})


def fetch_and_decode(
    uri: str, storage: Storage, max_bytes: int, max_pixels: int, gpu_jpeg: bool = False, tiles: TileReading | None = None
) -> Decoded:
    """Read and decode one image (or one tile of a raster); a failure of the
    file becomes an error row naming its cause.

    A storage fault that outlasted the storage's retries is raised instead:
    the image is not at fault, and a failed shard is retried by the driver
    (or resumed by a rerun) where an error row would stand for good.

    gpu_jpeg: a JPEG the GPU can decode is left undecoded (its header read,
    its size checked), for ``jpeg.decode_jpegs`` to decode with its batch.
    """
    if tiles is not None:
        return _read_tile(uri, storage, tiles)
    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)
    except FileNotFoundError:
        return Decoded(uri, error_row=schema.error_row(uri, "not found: no such file or object"))
    except Exception as exc:  # denied, too large
        if is_transient(exc):
            raise
        return Decoded(uri, error_row=schema.error_row(uri, f"cannot read: {type(exc).__name__}: {storage.redact(str(exc))}"))
    if gpu_jpeg:
        header = jpeg_header(data)
        if header is not None and header.width * header.height <= max_pixels:
            return Decoded(uri, jpeg=data, header=header)
    return _decode_on_cpu(uri, data, max_pixels)


@dataclass(frozen=True)
class TileReading:
    """What reading a shard's tiles needs: its scenes' headers and the band choice.

    It also keeps each I/O thread's last scene open (``kept``), so the next
    tile of that scene skips the open, its header reads and a fresh
    read-ahead. ``close`` (or the end of a ``with`` block) closes them; so
    does the TileReading's collection, should its owner forget.
    """

    scenes: dict[str, RasterInfo]
    bands: tuple[int, ...] | None = None
    kept: OpenRasters = field(default_factory=OpenRasters, compare=False, repr=False)

    def __post_init__(self) -> None:
        weakref.finalize(self, self.kept.close)  # a kept dataset holds a file and its buffers

    def close(self) -> None:
        """Close the scenes kept open (the shard's reads are over)."""
        self.kept.close()

    def __enter__(self) -> TileReading:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _read_tile(item: str, storage: Storage, tiles: TileReading) -> Decoded:
    """One tile's pixels, or its error row when the raster is damaged or gone
    (a storage fault is raised, as in ``fetch_and_decode``)."""
    scene, window = parse_tile_item(item)
    try:
        return Decoded(item, image=read_tile(scene, window, storage, tiles.scenes[scene], tiles.bands, tiles.kept))
    except Exception as exc:
        if is_transient(exc):
            raise
        # a damaged block costs its tile, named in the scene's row
        return Decoded(item, error_row=schema.tile_row(item, error=f"cannot read tile: {type(exc).__name__}: {storage.redact(str(exc))}"))


def _decode_on_cpu(uri: str, data: bytes, max_pixels: int) -> Decoded:
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
        ratio = np.log(first.size[1] / first.size[0])
        closest = sorted(waiting, key=lambda d: abs(np.log(d.size[1] / d.size[0]) - ratio))
        companions = closest[: batch_size - 1]
        taken = {id(d) for d in companions}
        waiting[:] = [d for d in waiting if id(d) not in taken]  # the rest keep their arrival order
        return [first] + companions

    for item in items:
        waiting.append(item)
        if len(waiting) >= max(window, batch_size):
            yield take()
    while waiting:
        yield take()


class ShardProcessor:
    """Turns a list of URIs into the rows of one Parquet file.

    Thread-safe: several shards may stream at once (the actor runs two, so
    one shard's last encodings and its write overlap the next one's first
    reads); the model takes one batch at a time, whoever sent it.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        storage: Storage,
        *,
        batch_size: int,
        max_bytes: int,
        max_pixels: int,
        io_threads: int = 4,
        encode_processes: int | None = None,
        gpu_jpeg: bool | None = None,
        cpus: float | None = None,
        semantic_out: str | None = None,
    ):
        self.segmenter = segmenter
        self.storage = storage
        self.semantic_out = semantic_out
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.prefetch = max(2 * batch_size, io_threads)
        self.io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="segbatch-io")
        on_gpu = segmenter.device.type == "cuda"
        self.gpu_jpeg = on_gpu if gpu_jpeg is None else gpu_jpeg
        if encode_processes is None:  # auto: see the module docstring
            # beside a GPU, the CPUs the worker has, less one for the model's thread and one for reads
            encode_processes = min(8, max(2, int(cpus or 0) - 2)) if on_gpu else 0
        self.encode_processes = encode_processes
        self.encode_pool: Executor = (
            # spawn, not fork: the actor has threads and a CUDA context that a forked child must not inherit
            ProcessPoolExecutor(
                encode_processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_encoder, initargs=(os.getpid(),),
            )  # fmt: skip
            if encode_processes > 0
            else ThreadPoolExecutor(1, thread_name_prefix="segbatch-encode")
        )
        # Processes start on demand and each imports torch (seconds): start them all now,
        # while the model loads, rather than one by one in the middle of the first shards.
        # (Here, too, so that the thread that spawns them is the constructor's: see _die_with_parent.)
        for _ in range(encode_processes):
            self.encode_pool.submit(os.getpid)
        # at most this many batches encode at once; more would only queue up raw masks
        self.encode_depth = max(1, encode_processes)
        self._model_lock = threading.Lock()

    def close(self) -> None:
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.encode_pool.shutdown(wait=False, cancel_futures=True)

    def _decoded(self, uris: list[str], stats: ShardStats, tiles: TileReading | None) -> Iterator[Decoded]:
        """Decoded images in order, at most ``prefetch`` fetched ahead."""
        queue: deque[Future] = deque()
        it = iter(uris)
        for uri in it:
            queue.append(self._fetch(uri, tiles))
            if len(queue) >= self.prefetch:
                break
        while queue:
            t0 = time.perf_counter()
            item = queue.popleft().result()
            stats.seconds["fetch_decode"] += time.perf_counter() - t0  # time the model waited
            nxt = next(it, None)
            if nxt is not None:
                queue.append(self._fetch(nxt, tiles))
            yield item

    def _fetch(self, uri: str, tiles: TileReading | None) -> Future:
        return self.io_pool.submit(fetch_and_decode, uri, self.storage, self.max_bytes, self.max_pixels, self.gpu_jpeg, tiles)

    def _pixels(self, batch: list[Decoded]) -> tuple[list[Decoded], list[Any], list[dict[str, Any]]]:
        """The batch's images for the model: JPEGs left undecoded are decoded
        together on the GPU, or, when that fails, one by one by Pillow.

        Returns the images that decoded, their pixels, and error rows for the others.
        """
        deferred = [d for d in batch if d.jpeg is not None]
        gpu, refused = self._gpu_decoded(deferred)
        kept, pixels, errors = [], [], []
        for d in batch:
            if d.image is not None or id(d) in gpu:
                kept.append(d)
                pixels.append(d.image if d.image is not None else gpu[id(d)])
                continue
            redo = _decode_on_cpu(d.uri, d.jpeg, self.max_pixels)
            if redo.error_row is not None:
                errors.append(redo.error_row)
            else:
                kept.append(redo)
                pixels.append(redo.image)
        if refused is not None and not errors:
            self._stop_gpu_jpeg(refused)
        return kept, pixels, errors

    def _gpu_decoded(self, deferred: list[Decoded]) -> tuple[dict[int, Any], Exception | None]:
        """The deferred JPEGs decoded together on the GPU ([3, H, W] uint8 tensors by
        ``id`` of their ``Decoded``), or nothing and why the decoder refused them."""
        if not deferred or not self.gpu_jpeg:
            return {}, None
        try:
            decoded = decode_jpegs([d.jpeg for d in deferred], [d.header for d in deferred], self.segmenter.device)
        except Exception as exc:  # one bad file fails the whole call: find it with Pillow
            log.info("GPU JPEG decoding of a batch failed (%s); decoding its %d JPEGs with Pillow", exc, len(deferred))
            return {}, exc
        return {id(d): img for d, img in zip(deferred, decoded)}, None

    def _stop_gpu_jpeg(self, cause: Exception) -> None:
        """Pillow decoded every JPEG the GPU decoder refused: the decoder is at
        fault, not a file, and would fail every batch. Pillow from now on."""
        self.gpu_jpeg = False
        log.warning(
            "GPU JPEG decoding turned off for this worker: the decoder refused a batch that Pillow "
            "decoded whole (%s: %s); JPEGs are decoded by Pillow from now on", type(cause).__name__, cause,
        )  # fmt: skip

    def run(self, uris: list[str], tiles: TileReading | None = None) -> tuple[list[dict[str, Any]], ShardStats]:
        """Segment ``uris``; returns their rows sorted by URI, and stats."""
        rows: list[dict[str, Any]] = []
        stats = ShardStats()
        for stats in self.stream(uris, rows, tiles):
            pass
        return rows, stats

    def stream(self, uris: list[str], rows: list[dict[str, Any]], tiles: TileReading | None = None) -> Iterator[ShardStats]:
        """Segment ``uris``, appending their rows to ``rows`` (sorted by URI at
        the end); yields the running stats after each batch.

        tiles: the URIs are tiles of rasters (``tiles.tile_item``); their rows
        are ``schema.TILE_SCHEMA``'s, detections in scene pixels.
        """
        stats = ShardStats()
        pending: deque[Future] = deque()

        def drain(keep: int = 0) -> Iterator[ShardStats]:
            while len(pending) > keep:
                batch_rows = pending.popleft().result()
                rows.extend(batch_rows)
                stats.images += len(batch_rows)
                stats.errors += sum(r["status"] == schema.STATUS_ERROR for r in batch_rows)
                stats.detections += sum(len(r["detections"]) for r in batch_rows)
                yield stats

        def decodable() -> Iterator[Decoded]:
            for item in self._decoded(uris, stats, tiles):
                if item.error_row is not None:
                    pending.append(_done([item.error_row]))
                else:
                    yield item

        for batch in aspect_batches(decodable(), self.batch_size, window=self.prefetch):
            with self._model_lock:
                t0 = time.perf_counter()
                batch, pixels, errors = self._pixels(batch)
                raws = self.segmenter.raw_detections(pixels)
                items = [(d.uri, *d.size, _to_numpy(raw)) for d, raw in zip(batch, raws)]
                stats.seconds["infer"] += time.perf_counter() - t0
            if errors:
                pending.append(_done(errors))
            # the encodings still running overlapped this inference
            yield from drain(keep=self.encode_depth - 1)
            encoding = self.encode_pool.submit(
                encode_rows, items, self.segmenter.cfg.mask_threshold, self.segmenter.loaded.classes, tiles is not None,
                None if tiles is not None or not self.semantic_out else (self.storage, self.semantic_out),
            )  # fmt: skip
            pending.append(_timed(encoding, stats))
        yield from drain()
        rows.sort(key=lambda r: r["uri"])
        yield stats


def encode_rows(
    items: list[tuple[str, int, int, dict[str, np.ndarray]]], mask_threshold: float, classes: list[str],
    tiled: bool = False, semantic: tuple[Storage, str] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """A batch's rows from its raw detections: ``(uri, height, width, raw)``
    each, raw as ``Segmenter.raw_detections`` gives it, in numpy arrays.
    tiled: the URIs are tiles, their rows ``schema.tile_row``s. semantic:
    (storage, folder) to write each image's class map to, as a PNG.

    Returns the rows and the seconds spent; runs in a thread or another process.
    """
    import torch

    t0 = time.perf_counter()
    rows = []
    for uri, height, width, raw in items:
        if tiled:
            _, window = parse_tile_item(uri)
            rows.append(schema.tile_row(uri, tile_detections(raw, window, mask_threshold, classes)))
            continue
        t = {k: torch.from_numpy(v) for k, v in raw.items()}
        records, box_masks = records_and_box_masks(
            t["boxes"], t["labels"], t["scores"], t["masks"], (height, width), mask_threshold, classes
        )
        rows.append(schema.ok_row(uri, width, height, records))
        if semantic is not None:  # painted from the box masks: no full-image mask per detection
            _write_class_map_png(semantic[0], semantic[1], uri, class_map(records, box_masks, height, width))
    return rows, time.perf_counter() - t0


def _write_class_map_png(storage: Storage, folder: str, uri: str, classes: np.ndarray) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(classes).save(buf, format="PNG")
    storage.write_bytes(join(folder, output_name(uri, ".png")), buf.getvalue())


def _to_numpy(raw: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.cpu().numpy() for k, v in raw.items()}


def _start_encoder(parent: int) -> None:
    """An encoding process's initializer: it dies with its actor (pid ``parent``),
    and runs one thread, so N processes use N cores."""
    _die_with_parent(parent)
    import torch

    torch.set_num_threads(1)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Have Linux SIGKILL this process when its parent dies: a SIGKILLed or
    OOM-killed actor runs no cleanup, and its encoders would run on.

    The signal follows the parent's spawning *thread*: the pool's processes
    are all spawned by ``ShardProcessor``'s constructor, in Ray the actor's
    main thread, which lives as long as the actor.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    args = (ctypes.c_ulong(signal.SIGKILL),) + (ctypes.c_ulong(0),) * 3  # unsigned longs: prctl is variadic
    if libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), *args) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): encoding processes may outlive their worker", ctypes.get_errno())
    elif os.getppid() != parent:  # it died before the prctl: no signal will come
        os._exit(1)


def _timed(encoding: Future, stats: ShardStats) -> Future:
    """The rows of an encoding, its seconds added to ``stats`` when read."""
    out: Future = Future()

    def done(f: Future) -> None:
        try:
            rows, seconds = f.result()
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            out.set_exception(exc)
            return
        stats.seconds["encode"] += seconds
        out.set_result(rows)

    encoding.add_done_callback(done)
    return out


def _done(rows: list[dict[str, Any]]) -> Future:
    f: Future = Future()
    f.set_result(rows)
    return f
