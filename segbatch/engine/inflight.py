"""The in-flight byte budget of a worker: how much host memory the images its
fetches hold may take, claimed before any pixel is decoded (``InFlightBytes``),
and what a worker reserves in Ray beside it (``worker_memory_bytes``).

Memory is bounded in bytes, not by a count of images whose size ranges from
a thumbnail to ``--max-pixels``; the pipeline (``pipeline.py``) claims and
releases, this module keeps the ledger and sizes it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

from segbatch.model import DecodeInterrupted, decode_peak_bytes

if TYPE_CHECKING:
    from .pipeline import Decoded

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
        return item.image.nbytes + (item.valid.nbytes if item.valid is not None else 0)  # a tile's data mask
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
