"""One shard through the stages: fetch, decode, infer, encode, write.

Plain Python (no Ray), so it runs and is tested in one process; ``worker.py``
wraps it in an actor. Fetching and decoding run in a thread pool ahead of
the model (Pillow and socket reads release the GIL), and encoding of one batch
overlaps the inference of the next. Memory is bounded in bytes, not in images:
each fetch claims its image's bytes from the worker's ``InFlightBytes`` once
its header is read and before any pixel is decoded, and waits while they do
not fit (see there for the bound, and ``worker_memory_bytes`` for what the
worker reserves in Ray).

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
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from segbatch import schema
from segbatch.model import DecodeError, DecodeInterrupted, decode_image, decode_peak_bytes
from segbatch.errors import StorageFault
from segbatch.model import JpegHeader, decode_jpegs, jpeg_header
from segbatch.model import class_map, records_and_box_masks
from segbatch.model import Segmenter, is_out_of_memory
from segbatch.storage import OpenRasters, Storage, join, output_name
from segbatch.geo import RasterInfo, parse_tile_item, read_tile, tile_detections, tile_peak_bytes

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
    uri: str, storage: Storage, max_bytes: int, max_pixels: int, gpu_jpeg: bool = False, tiles: TileReading | None = None,
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
        return Decoded(uri, error_row=schema.error_row(uri, f"cannot read: {type(exc).__name__}: {storage.redact(str(exc))}"))
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


def _read_tile(item: str, storage: Storage, tiles: TileReading, reserve: Callable[[int], None] | None = None) -> Decoded:
    """One tile's pixels, or its error row when the raster is damaged or gone
    (a ``StorageFault`` is raised, as in ``fetch_and_decode``)."""
    scene, window = parse_tile_item(item)
    try:
        info = tiles.scenes[scene]
        if reserve is not None:  # the window's size is known before any byte is read
            reserve(tile_peak_bytes(window, info))
        return Decoded(item, image=read_tile(scene, window, storage, info, tiles.bands, tiles.kept))
    except (StorageFault, DecodeInterrupted):
        raise
    except Exception as exc:
        # a damaged block costs its tile, named in the scene's row
        return Decoded(item, error_row=schema.tile_row(item, error=f"cannot read tile: {type(exc).__name__}: {storage.redact(str(exc))}"))


def _decode_on_cpu(uri: str, data: bytes, max_pixels: int, reserve: Callable[[int], None] | None = None) -> Decoded:
    claim_file = None if reserve is None else (lambda peak: reserve(len(data) + peak))  # the file is held while it decodes
    try:
        return Decoded(uri, image=decode_image(data, max_pixels=max_pixels, reserve=claim_file))
    except DecodeError as exc:
        return Decoded(uri, error_row=schema.error_row(uri, str(exc)))


# Memory: what the default in-flight budget is sized for, and what a worker needs besides it.
TYPICAL_PIXELS = 4000 * 3000  # a 12-megapixel photo (phones, shelf and drone cameras)
TYPICAL_IMAGE_BYTES = TYPICAL_PIXELS * 3  # decoded
MIN_INFLIGHT_BYTES = 1 << 30
# The resident model with torch and the runtime, and its activations at the default 800/1333 input size
# (a CPU worker measured 0.86 GiB loaded, 1.97 GiB at the peak of a batch of two 12 MP images); on a GPU,
# the host side of a CUDA context.
WORKER_BASE_BYTES = 2 << 30
BYTES_PER_PIXEL_AT_MODEL = 4 * 3  # float32 RGB: the copy the model's transform makes of each full-size image


def photo_claim_bytes(pixels: int = TYPICAL_PIXELS) -> int:
    """What fetching a JPEG photo of ``pixels`` claims while it decodes
    (``InFlightBytes``): its file (0.6 bytes a pixel at most: quality 75 of pure
    noise; photos take less) and Pillow's peak (``decode.decode_peak_bytes``)."""
    return pixels * 3 // 5 + decode_peak_bytes(pixels, 1, "RGB", "JPEG")


def held_bytes(item: Decoded) -> int:
    """Host bytes of one fetched image from the end of its fetch until its batch
    is segmented (a JPEG left to the GPU holds its file, an error row nothing)."""
    if item.image is not None:
        return item.image.nbytes
    return len(item.jpeg) if item.jpeg is not None else 0


def prefetch_depth(batch_size: int, io_threads: int) -> int:
    """Images a shard fetches ahead (and the aspect window's length): enough to
    fill two batches and keep every I/O thread reading."""
    return max(2 * batch_size, io_threads)


def inflight_budget(batch_size: int, io_threads: int, shards: int = 2) -> int:
    """Bytes a worker's fetches may claim (``InFlightBytes``): sized so that
    ``shards`` shards of typical photos run at full speed (each its prefetch
    queue, aspect window and batch, decoded, while ``io_threads`` more decode at
    their peak), and at least ``MIN_INFLIGHT_BYTES``. Larger images run with
    fewer in flight; one larger than the budget alone."""
    per_shard = 2 * prefetch_depth(batch_size, io_threads) + batch_size
    return max(MIN_INFLIGHT_BYTES, shards * per_shard * TYPICAL_IMAGE_BYTES + io_threads * photo_claim_bytes())


def worker_memory_bytes(batch_size: int, io_threads: int, max_pixels: int, shards: int = 2) -> int:
    """Host memory one worker needs, for ``memory=`` in its actor's options, so
    that Ray places no more workers on a node than fit: the model
    (``WORKER_BASE_BYTES``); the bound of its ``InFlightBytes``, that is the
    budget and one claim over it per shard, reserved as a typical photo's (of
    ``max_pixels`` when smaller); and the model's float copy of a batch of
    typical images (of ``max_pixels`` when smaller).

    Not covered: a shard's claim over the budget for an image larger than a
    typical photo adds its excess (at most ``--max-pixels`` x 9 to 27 bytes,
    ``decode.decode_peak_bytes``, for each of the ``shards``), as does its float
    copy at the model (12 bytes a pixel); ``--max-pixels`` bounds both
    (``bench/bench_memory.py --large-images``). Nor what ``InFlightBytes`` leaves out.
    """
    pixels = min(max_pixels, TYPICAL_PIXELS)
    over_budget = shards * photo_claim_bytes(pixels)
    at_model = (batch_size + 1) * pixels * BYTES_PER_PIXEL_AT_MODEL  # + the one being normalized
    return WORKER_BASE_BYTES + inflight_budget(batch_size, io_threads, shards) + over_budget + at_model


class Withdrawn(DecodeInterrupted):
    """A fetch gives up before it was granted room: its shard stopped (it holds nothing)."""


# A claim's states: not granted yet; its fetch blocked for room; granted, its image decoding;
# its image decoded (held until released); released or withdrawn.
_NEW, _WAITING, _DECODING, _HELD, _DONE = "new", "waiting", "decoding", "held", "done"


class ShardClaims:
    """The claims of one shard streaming (``InFlightBytes.open_shard``)."""

    __slots__ = ("live", "over", "stopped")

    def __init__(self) -> None:
        self.live: set[Claim] = set()  # granted and not released
        self.over: Claim | None = None  # its one claim granted over the budget, until released
        self.stopped = False


class Claim:
    """One fetch's bytes in an ``InFlightBytes``: none until granted, then its
    peak while its image decodes, then what the image holds, until released."""

    __slots__ = ("shard", "nbytes", "state", "may_exceed")

    def __init__(self, shard: ShardClaims) -> None:
        self.shard = shard
        self.nbytes = 0
        self.state = _NEW
        self.may_exceed = False

    def __repr__(self) -> str:
        return f"Claim({self.state}, {self.nbytes} bytes)"


class InFlightBytes:
    """The bytes of images a worker's fetches hold, claimed before any pixel is
    decoded: memory is bounded in bytes, not by a count of images whose size
    ranges from a thumbnail to ``--max-pixels``. Shared by the shards a
    ``ShardProcessor`` streams at once; thread-safe.

    Claims: once a fetch knows its image's size (its header parsed, or a tile's
    window), and before any pixel is decoded, it claims the bytes it will hold
    at its peak (``fetch_and_decode``'s ``reserve``: the file and what decoding
    allocates; a JPEG left to the GPU its file) and waits, in its I/O thread,
    until they are granted (``reserve``). Decoded, its claim shrinks to what the
    image holds (``held_bytes``; never more than was claimed) until its batch is
    segmented and the claim released. A fetch that fails releases its claim. A
    shard that stops (``close_shard``) releases what it holds; its fetches
    waiting for room give up (``Withdrawn``), those decoding release theirs as
    they end.

    Granted: a claim that fits, ``held + claim <= budget``; else its fetch
    waits. One exception, or a shard could wait forever for room that only its
    own next image would free: the claim of the image a shard's consumer waits
    for, once that consumer has segmented everything else it held
    (``let_exceed``), goes whatever its size, one such claim per shard at a
    time (until released).

    The bound: ``held <= budget + the claims granted over it``, of which each
    open shard has at most one: ``held <= budget + shards x the largest claim``
    (a worker streams 2 shards). A claim that fits keeps ``held - over <=
    budget``, one over the budget adds to ``held`` and ``over`` alike, and
    shrinking or releasing one lowers both. An image larger than the budget
    still goes, the only one over it in its shard.

    Not in the ledger: a file while it is read, or read and waiting for room
    (at most ``io_threads`` files, each within ``--max-bytes``); GDAL's block
    cache (tiles); the model's copies of a batch (``worker_memory_bytes``); a
    batch of JPEGs the GPU decoder refused, decoded again by Pillow at the model.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.held = 0
        self.peak = 0  # the most held at once
        self.waiting = 0  # fetches blocked for room now
        self._open: set[ShardClaims] = set()
        self._cond = threading.Condition()

    def open_shard(self) -> ShardClaims:
        """A shard starts streaming; ``close_shard`` when it ends."""
        shard = ShardClaims()
        with self._cond:
            self._open.add(shard)
        return shard

    def try_reserve(self, claim: Claim, nbytes: int) -> bool:
        """Grant ``nbytes`` to ``claim`` if the policy allows it now (see the class),
        and say so; ``Withdrawn`` if its shard stopped."""
        with self._cond:
            return self._grant(claim, nbytes)

    def reserve(self, claim: Claim, nbytes: int) -> None:
        """Grant ``nbytes`` to ``claim``, waiting until the policy allows it (an I/O
        thread's fetch, its image's size known, no pixel decoded yet); ``Withdrawn``
        if its shard stops first."""
        with self._cond:
            while not self._grant(claim, nbytes):
                if claim.state != _WAITING:
                    claim.state = _WAITING
                    self._cond.notify_all()  # its consumer may be waiting for it: see wait_for
                self.waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self.waiting -= 1

    def settle(self, claim: Claim, nbytes: int) -> None:
        """The claim's fetch ended: from now on it holds ``nbytes`` (its image, or
        0 when the fetch failed, which releases the claim)."""
        with self._cond:
            if claim.state == _DONE:  # withdrawn
                return
            self.held += nbytes - claim.nbytes
            self.peak = max(self.peak, self.held)
            claim.nbytes = nbytes
            if nbytes == 0 or claim.shard.stopped:  # nothing held, or nobody's
                self._drop(claim)
            else:
                claim.state = _HELD
                claim.shard.live.add(claim)
            self._cond.notify_all()

    def release(self, claim: Claim | None) -> None:
        """The claim's image was segmented (or dropped): its bytes are free."""
        if claim is None:
            return
        with self._cond:
            if claim.state == _HELD:
                self._drop(claim)
                self._cond.notify_all()

    def wait_for(self, claim: Claim, fetch: Future) -> bool:
        """Wait until ``fetch`` ends or its ``claim`` waits for room; True for the
        latter. (``fetch`` must ``poke`` this ledger when it ends.)"""
        with self._cond:
            while not fetch.done() and claim.state != _WAITING:
                self._cond.wait()
            return claim.state == _WAITING

    def let_exceed(self, claim: Claim) -> None:
        """The claim's shard holds nothing its consumer could free before this
        image comes: it may go over the budget (one such claim per shard at a time)."""
        with self._cond:
            claim.may_exceed = True
            self._cond.notify_all()

    def poke(self) -> None:
        """Wake whoever waits (a fetch ended)."""
        with self._cond:
            self._cond.notify_all()

    def close_shard(self, shard: ShardClaims) -> None:
        """The shard stopped streaming (at its end, or early): what it holds is
        released, its fetches waiting for room give up, and those decoding
        release their claims as they end."""
        with self._cond:
            shard.stopped = True
            for claim in list(shard.live):
                if claim.state == _HELD:
                    self._drop(claim)
            self._open.discard(shard)
            self._cond.notify_all()

    def close(self) -> None:
        """Close every shard still open (the worker stops)."""
        with self._cond:
            shards = list(self._open)
        for shard in shards:
            self.close_shard(shard)

    def _grant(self, claim: Claim, nbytes: int) -> bool:
        shard = claim.shard
        if shard.stopped:
            claim.state = _DONE
            raise Withdrawn("its shard stopped")
        if self.held + nbytes > self.budget:
            if not claim.may_exceed or shard.over is not None:
                return False
            shard.over = claim
        claim.state, claim.nbytes = _DECODING, nbytes
        shard.live.add(claim)
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        return True

    def _drop(self, claim: Claim) -> None:
        shard = claim.shard
        self.held -= claim.nbytes
        claim.nbytes, claim.state = 0, _DONE
        shard.live.discard(claim)
        if shard.over is claim:
            shard.over = None


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
        self.inflight.close()  # fetches waiting for room give up: their threads end
        self.io_pool.shutdown(wait=False, cancel_futures=True)
        self.encode_pool.shutdown(wait=False, cancel_futures=True)

    def _decoded(self, uris: list[str], stats: ShardStats, tiles: TileReading | None, shard: ShardClaims) -> Iterator[Decoded]:
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
                uri, self.storage, self.max_bytes, self.max_pixels, self.gpu_jpeg, tiles,
                reserve=lambda nbytes: self.inflight.reserve(claim, nbytes),
            )  # fmt: skip
        except BaseException:
            self.inflight.settle(claim, 0)
            raise
        item.claim = claim
        self.inflight.settle(claim, held_bytes(item))
        return item

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
                    kept, pixels, errors = self._pixels(batch)
                    outputs = segment_isolating(self.segmenter, pixels)
                    stats.seconds["infer"] += time.perf_counter() - t0
                items = []
                for d, out in zip(kept, outputs):
                    if isinstance(out, ModelFailure):
                        errors.append(_failure_row(d, out, tiled=tiles is not None))
                    else:
                        items.append((d.uri, *d.size, out))
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
                    encode_rows, items, self.segmenter.cfg.mask_threshold, self.segmenter.loaded.classes,
                    tiles is not None, semantic,
                )  # fmt: skip
                pending.append(_timed(encoding, stats))
        finally:
            fetched.close()
            self.inflight.close_shard(shard)
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
