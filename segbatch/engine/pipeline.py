"""One shard through the stages: fetch, decode, infer, encode, write.

Plain Python (no Ray), so it runs and is tested in one process; ``worker.py``
wraps it in an actor. Fetching and decoding run in a thread pool ahead of
the model (Pillow and socket reads release the GIL), and encoding of one batch
overlaps the inference of the next. Memory is bounded in bytes, not in images:
each fetch claims its image's bytes from the worker's ``InFlightBytes`` once
its header is read and before any pixel is decoded, and waits while they do
not fit (``inflight.py``: the ledger, its bound, and ``worker_memory_bytes``
for what the worker reserves in Ray).

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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segbatch import schema
from segbatch.errors import StorageFault
from segbatch.geo import DATA_MASK, RasterInfo, parse_tile_item, read_tile_data, tile_detections, tile_peak_bytes
from segbatch.model import (
    DecodeError,
    DecodeInterrupted,
    JpegHeader,
    Segmenter,
    class_map,
    decode_image,
    decode_jpegs,
    is_out_of_memory,
    jpeg_header,
    keypoint_detection_records,
    records_and_box_masks,
)
from segbatch.storage import OpenRasters, Storage, join, output_name

from .inflight import Claim, InFlightBytes, ShardClaims, held_bytes, inflight_budget, prefetch_depth

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
    claim: Claim | None = field(default=None, repr=False, compare=False)  # its bytes in the worker's ledger
    valid: np.ndarray | None = None  # a tile's data mask (False: nodata), for a raster with nodata

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
    uri: str,
    storage: Storage,
    max_bytes: int,
    max_pixels: int,
    gpu_jpeg: bool = False,
    tiles: TileReading | None = None,
    reserve: Callable[[int], None] | None = None,
) -> Decoded:
    """Read and decode one image (or one tile of a raster); a failure of the
    file's own (gone, a folder, too large, undecodable) becomes an error row
    naming its cause.

    Any other fault (``StorageFault``: access refused, a missing bucket,
    throttling that outlasted the storage's retries) is raised instead: the
    image is not at fault, and a failed shard is retried by the driver (or
    resumed by a rerun) where an error row would stand for good.

    gpu_jpeg: a JPEG the GPU can decode is left undecoded (its header read,
    its size checked), for ``jpeg.decode_jpegs`` to decode with its batch.

    reserve: called, once the image's size is known and before any pixel is
    decoded, with the host bytes this fetch will hold at its peak: the file and
    what decoding allocates (``decode.decode_peak_bytes``), a JPEG left to the
    GPU its file alone, a tile what reading it allocates (``tiles.tile_peak_bytes``).
    It may block (``InFlightBytes.reserve``) or raise ``DecodeInterrupted``,
    which passes through. A fetch that fails before its size is known calls it not at all.
    """
    if tiles is not None:
        return _read_tile(uri, storage, tiles, reserve)
    try:
        data = storage.read_bytes(uri, max_bytes=max_bytes)
    except StorageFault:
        raise  # not the image's fault: never its row
    except FileNotFoundError:
        return Decoded(uri, error_row=schema.error_row(uri, "not found: no such file or object"))
    except Exception as exc:  # the file's own: too large, a folder, a malformed URI
        return Decoded(
            uri, error_row=schema.error_row(uri, f"cannot read: {type(exc).__name__}: {storage.redact(str(exc))}")
        )
    if gpu_jpeg:
        header = jpeg_header(data)
        if header is not None and header.width * header.height <= max_pixels:
            if reserve is not None:
                reserve(len(data))  # what it holds until its batch decodes on the GPU
            return Decoded(uri, jpeg=data, header=header)
    return _decode_on_cpu(uri, data, max_pixels, reserve)


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


def _read_tile(
    item: str, storage: Storage, tiles: TileReading, reserve: Callable[[int], None] | None = None
) -> Decoded:
    """One tile's pixels, or its error row when the raster is damaged or gone
    (a ``StorageFault`` is raised, as in ``fetch_and_decode``)."""
    scene, window = parse_tile_item(item)
    try:
        info = tiles.scenes[scene]
        if reserve is not None:  # the window's size is known before any byte is read
            reserve(tile_peak_bytes(window, info))
        image, valid = read_tile_data(scene, window, storage, info, tiles.bands, tiles.kept)
        return Decoded(item, image=image, valid=valid)
    except (StorageFault, DecodeInterrupted):
        raise
    except Exception as exc:
        # a damaged block costs its tile, named in the scene's row
        return Decoded(
            item,
            error_row=schema.tile_row(
                item, error=f"cannot read tile: {type(exc).__name__}: {storage.redact(str(exc))}"
            ),
        )


def _decode_on_cpu(uri: str, data: bytes, max_pixels: int, reserve: Callable[[int], None] | None = None) -> Decoded:
    claim_file = (
        None if reserve is None else (lambda peak: reserve(len(data) + peak))
    )  # the file is held while it decodes
    try:
        return Decoded(uri, image=decode_image(data, max_pixels=max_pixels, reserve=claim_file))
    except DecodeError as exc:
        return Decoded(uri, error_row=schema.error_row(uri, str(exc)))


class _Flush:
    def __repr__(self) -> str:
        return "FLUSH"


# In a stream of decoded images: nothing more comes until the consumer frees what it holds
# (``aspect_batches`` then batches every image it keeps waiting).
FLUSH: Any = _Flush()


def aspect_batches(
    items: Iterable[Decoded], batch_size: int, window: int, window_bytes: int | None = None
) -> Iterator[list[Decoded]]:
    """Group decoded images into batches of similar aspect ratio.

    torchvision pads a batch to its largest height and width, so a portrait
    image batched with a landscape one nearly doubles the pixels computed.
    The oldest waiting image always goes into the next batch (nothing
    starves); its companions are the closest in aspect among at most
    ``window`` waiting images, or fewer when they hold ``window_bytes``
    (``held_bytes``) or more: large images wait in smaller numbers. A ``FLUSH``
    among the items batches every image waiting.
    """
    waiting: list[Decoded] = []
    waiting_bytes = 0

    def take() -> list[Decoded]:
        nonlocal waiting_bytes
        first = waiting.pop(0)
        ratio = np.log(first.size[1] / first.size[0])
        closest = sorted(waiting, key=lambda d: abs(np.log(d.size[1] / d.size[0]) - ratio))
        companions = closest[: batch_size - 1]
        taken = {id(d) for d in companions}
        waiting[:] = [d for d in waiting if id(d) not in taken]  # the rest keep their arrival order
        batch = [first] + companions
        waiting_bytes -= sum(held_bytes(d) for d in batch)
        return batch

    for item in items:
        flush = item is FLUSH
        if not flush:
            waiting.append(item)
            waiting_bytes += held_bytes(item)
        del item  # only ``waiting`` keeps it: a batch the caller releases is freed
        if flush:
            while waiting:
                yield take()
        elif len(waiting) >= max(window, batch_size) or (window_bytes is not None and waiting_bytes >= window_bytes):
            yield take()
    while waiting:
        yield take()


@dataclass(frozen=True)
class ModelFailure:
    """An image the model failed on alone, while it took others: the image's
    fault, written as its error row."""

    message: str


def segment_isolating(segmenter: Segmenter, images: list[Any]) -> list[dict[str, Any] | ModelFailure]:
    """The model's raw detections for a batch, each image's (numpy), or the
    ``ModelFailure`` of an image the model cannot take.

    The policy, in one place. A batch the model fails on is retried one image
    at a time (after an out-of-memory error, with the GPU's cache emptied
    first), so that one image the model cannot take (a 1 x 2000 px strip that
    its resize shrinks to 0 pixels, one too large for the GPU even alone) costs
    its own row and its neighbours get theirs. But the worker's own faults
    must never be written as the images' (a lost CUDA context fails every
    image): when the last image tried alone failed, the model must still take
    a small plain probe image, or the first error is raised, failing the shard
    (the driver retries it elsewhere). Data errors never raise.
    """
    try:
        return [_to_numpy(raw) for raw in segmenter.raw_detections(images)]
    except Exception as exc:  # noqa: BLE001 - sorted below: the image's fault or the worker's
        first = exc
    log.info("the model failed on a batch of %d (%s); retrying its images one at a time", len(images), _short(first))
    if is_out_of_memory(first):
        segmenter.free_cached_memory()
    out: list[dict[str, Any] | ModelFailure] = []
    last_failed = False
    for image in images:
        try:
            out.append(_to_numpy(segmenter.raw_detections([image])[0]))
            last_failed = False
        except Exception as exc:  # noqa: BLE001
            out.append(ModelFailure(f"model failed: {type(exc).__name__}: {_short(exc)}"))
            last_failed = True
            if is_out_of_memory(exc):
                segmenter.free_cached_memory()
    if last_failed:
        try:
            segmenter.raw_detections([np.full((64, 64, 3), 128, np.uint8)])
        except Exception as probe:  # noqa: BLE001
            raise RuntimeError(
                f"the model fails on any image, not on this shard's: {type(probe).__name__}: {_short(probe)}; "
                "the worker is at fault (a lost CUDA context, a broken device), and its shard is retried"
            ) from first
    return out


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _GpuJpegs:
    """A batch's JPEGs that their fetch left undecoded (``fetch_and_decode``'s
    ``gpu_jpeg``), decoded together on the GPU (``jpeg.py``). When the decoder
    refuses a batch, Pillow decodes its JPEGs one by one; when Pillow decodes
    them all, the decoder is at fault, not a file, and is turned off (``on``)."""

    def __init__(self, on: bool, device: Any, max_pixels: int):
        self.on = on
        self.device = device
        self.max_pixels = max_pixels

    def pixels(self, batch: list[Decoded]) -> tuple[list[Decoded], list[Any], list[dict[str, Any]]]:
        """The batch's images for the model: JPEGs left undecoded are decoded
        together on the GPU, or, when that fails, one by one by Pillow.

        Returns the images that decoded, their pixels, and error rows for the others.
        """
        deferred = [d for d in batch if d.jpeg is not None]
        gpu, refused = self._on_gpu(deferred)
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
            self._turn_off(refused)
        return kept, pixels, errors

    def _on_gpu(self, deferred: list[Decoded]) -> tuple[dict[int, Any], Exception | None]:
        """The deferred JPEGs decoded together on the GPU ([3, H, W] uint8 tensors by
        ``id`` of their ``Decoded``), or nothing and why the decoder refused them."""
        if not deferred or not self.on:
            return {}, None
        try:
            decoded = decode_jpegs([d.jpeg for d in deferred], [d.header for d in deferred], self.device)
        except Exception as exc:  # one bad file fails the whole call: find it with Pillow
            log.info("GPU JPEG decoding of a batch failed (%s); decoding its %d JPEGs with Pillow", exc, len(deferred))
            return {}, exc
        return {id(d): img for d, img in zip(deferred, decoded)}, None

    def _turn_off(self, cause: Exception) -> None:
        """Pillow decoded every JPEG the GPU decoder refused: the decoder is at
        fault, not a file, and would fail every batch. Pillow from now on."""
        self.on = False
        log.warning(
            "GPU JPEG decoding turned off for this worker: the decoder refused a batch that Pillow "
            "decoded whole (%s: %s); JPEGs are decoded by Pillow from now on",
            type(cause).__name__,
            cause,
        )


class ShardProcessor:
    """Turns a list of URIs into the rows of one Parquet file.

    Thread-safe: several shards may stream at once (the actor runs two, so
    one shard's last encodings and its write overlap the next one's first
    reads); the model takes one batch at a time, whoever sent it.

    About 200 lines, one job: the stages of a shard and the hand-offs between
    them (fetch ahead, batch, infer, encode beside); the memory budget
    (``inflight.py``), the decoders and the GPU JPEG path live elsewhere.
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
        inflight_bytes: int | None = None,
        shards: int = 2,
    ):
        self.segmenter = segmenter
        self.storage = storage
        self.semantic_out = semantic_out
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.prefetch = prefetch_depth(batch_size, io_threads)
        # images held by the ``shards`` shards streaming at once, in bytes (see InFlightBytes)
        self.inflight = InFlightBytes(inflight_bytes or inflight_budget(batch_size, io_threads, shards))
        self.window_bytes = self.inflight.budget // shards
        self.io_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="segbatch-io")
        on_gpu = segmenter.device.type == "cuda"
        self.jpegs = _GpuJpegs(on_gpu if gpu_jpeg is None else gpu_jpeg, segmenter.device, max_pixels)
        if encode_processes is None:  # auto: see the module docstring
            # beside a GPU, the CPUs the worker has, less one for the model's thread and one for reads
            encode_processes = min(8, max(2, int(cpus or 0) - 2)) if on_gpu else 0
        self.encode_processes = encode_processes
        self.encode_pool: Executor = (
            # spawn, not fork: the actor has threads and a CUDA context that a forked child must not inherit
            ProcessPoolExecutor(
                encode_processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_encoder,
                initargs=(os.getpid(),),
            )
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

    @property
    def gpu_jpeg(self) -> bool:
        """Whether JPEGs are left to the GPU to decode (``_GpuJpegs``)."""
        return self.jpegs.on

    def close(self) -> None:
        self.inflight.close()  # fetches waiting for room give up: their threads end
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.encode_pool.shutdown(wait=False, cancel_futures=True)

    def _decoded(
        self, uris: list[str], stats: ShardStats, tiles: TileReading | None, shard: ShardClaims
    ) -> Iterator[Decoded]:
        """Decoded images in order, at most ``prefetch`` fetched ahead, each
        once ``InFlightBytes`` granted its claim (the fetch waits for room in
        its I/O thread).

        When the image the consumer waits for itself waits for room, a
        ``FLUSH`` comes first: the consumer segments (and releases) every image
        it holds, then that image's claim may exceed the budget, so the shard
        never waits for room only it could free. The caller releases each
        image's claim once its batch is segmented, and closes the shard's
        claims at its end (``close_shard``); closing this generator cancels the
        fetches not yet started.
        """
        queue: deque[tuple[Future, Claim]] = deque()
        it = iter(uris)
        nxt = next(it, None)
        try:
            while nxt is not None or queue:
                while nxt is not None and len(queue) < self.prefetch:
                    claim = Claim(shard)
                    queue.append((self._fetch(nxt, tiles, claim), claim))
                    nxt = next(it, None)
                t0 = time.perf_counter()
                if self.inflight.wait_for(queue[0][1], queue[0][0]):
                    stats.seconds["fetch_decode"] += time.perf_counter() - t0
                    yield FLUSH
                    self.inflight.let_exceed(queue[0][1])
                    t0 = time.perf_counter()
                queue[0][0].exception()  # waits for the fetch
                stats.seconds["fetch_decode"] += time.perf_counter() - t0  # time the model waited
                yield queue.popleft()[0].result()  # no local keeps the image once its batch is released
        finally:
            for f, _ in queue:  # the shard stopped early: fetches not started never start
                f.cancel()

    def _fetch(self, uri: str, tiles: TileReading | None, claim: Claim) -> Future:
        """Start one fetch, its bytes in ``claim`` (``InFlightBytes``)."""
        f = self.io_pool.submit(self._fetch_claimed, uri, tiles, claim)
        f.add_done_callback(lambda _: self.inflight.poke())  # its consumer may be waiting: see wait_for
        return f

    def _fetch_claimed(self, uri: str, tiles: TileReading | None, claim: Claim) -> Decoded:
        """``fetch_and_decode`` in an I/O thread, its claim granted before any pixel
        is decoded and settled to what its image holds (released if it failed)."""
        try:
            item = fetch_and_decode(
                uri,
                self.storage,
                self.max_bytes,
                self.max_pixels,
                self.gpu_jpeg,
                tiles,
                reserve=lambda nbytes: self.inflight.reserve(claim, nbytes),
            )
        except BaseException:
            self.inflight.settle(claim, 0)
            raise
        item.claim = claim
        self.inflight.settle(claim, held_bytes(item))
        return item

    def run(self, uris: list[str], tiles: TileReading | None = None) -> tuple[list[dict[str, Any]], ShardStats]:
        """Segment ``uris``; returns their rows sorted by URI, and stats."""
        rows: list[dict[str, Any]] = []
        stats = ShardStats()
        for stats in self.stream(uris, rows, tiles):  # noqa: B007  (the last yielded stats are the shard's)
            pass
        return rows, stats

    def stream(
        self, uris: list[str], rows: list[dict[str, Any]], tiles: TileReading | None = None
    ) -> Iterator[ShardStats]:
        """Segment ``uris``, appending their rows to ``rows`` (sorted by URI at
        the end); yields the running stats after each batch.

        tiles: the URIs are tiles of rasters (``tiles.tile_item``); their rows
        are ``schema.TILE_SCHEMA``'s, detections in scene pixels.
        """
        stats = ShardStats()
        pending: deque[Future] = deque()
        shard = self.inflight.open_shard()
        fetched = self._decoded(uris, stats, tiles, shard)
        semantic = None if tiles is not None or not self.semantic_out else (self.storage, self.semantic_out)

        def drain(keep: int = 0) -> Iterator[ShardStats]:
            while len(pending) > keep:
                batch_rows = pending.popleft().result()
                rows.extend(batch_rows)
                stats.images += len(batch_rows)
                stats.errors += sum(r["status"] == schema.STATUS_ERROR for r in batch_rows)
                stats.detections += sum(len(r["detections"]) for r in batch_rows)
                yield stats

        def decodable(item: Decoded) -> bool:
            if item is not FLUSH and item.error_row is not None:
                pending.append(_done([item.error_row]))
                return False
            return True

        try:
            # (a filter, not a generator: no frame of its own keeps the last image)
            for batch in aspect_batches(filter(decodable, fetched), self.batch_size, self.prefetch, self.window_bytes):
                with self._model_lock:
                    t0 = time.perf_counter()
                    kept, pixels, errors = self.jpegs.pixels(batch)
                    outputs = segment_isolating(self.segmenter, pixels)
                    stats.seconds["infer"] += time.perf_counter() - t0
                items = []
                for d, out in zip(kept, outputs):
                    if isinstance(out, ModelFailure):
                        errors.append(_failure_row(d, out, tiled=tiles is not None))
                    else:
                        # a tile's data mask rides with its detections: masks are cut to it (``tile_detections``)
                        items.append((d.uri, *d.size, out if d.valid is None else {**out, DATA_MASK: d.valid}))
                if errors:
                    pending.append(_done(errors))
                claims = [d.claim for d in batch]
                del batch, kept, pixels  # segmented: nothing here keeps the images once released
                d = None
                for claim in claims:
                    self.inflight.release(claim)
                # the encodings still running overlapped this inference
                yield from drain(keep=self.encode_depth - 1)
                encoding = self.encode_pool.submit(
                    encode_rows,
                    items,
                    self.segmenter.cfg.mask_threshold,
                    self.segmenter.loaded.classes,
                    tiles is not None,
                    semantic,
                )
                pending.append(_timed(encoding, stats))
        finally:
            fetched.close()
            self.inflight.close_shard(shard)
        yield from drain()
        rows.sort(key=lambda r: r["uri"])
        yield stats


def encode_rows(
    items: list[tuple[str, int, int, dict[str, np.ndarray]]],
    mask_threshold: float,
    classes: list[str],
    tiled: bool = False,
    semantic: tuple[Storage, str] | None = None,
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
        if "masks" not in raw:  # a Keypoint R-CNN: keypoints, no masks (nor class maps: the driver refuses them)
            rows.append(schema.ok_row(uri, width, height, keypoint_detection_records(raw, classes)))
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


def _failure_row(item: Decoded, failure: ModelFailure, tiled: bool) -> dict[str, Any]:
    """The error row of an image the model failed on (its size known: it was decoded)."""
    if tiled:
        return schema.tile_row(item.uri, error=failure.message)
    height, width = item.size
    return schema.error_row(item.uri, failure.message, width=width, height=height)


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
        log.warning(
            "prctl(PR_SET_PDEATHSIG) failed (errno %d): encoding processes may outlive their worker", ctypes.get_errno()
        )
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
