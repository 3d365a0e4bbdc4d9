"""Making the plan while SOURCE is listed, and handing its shards out as each
part of it is written (``Planner``): the driver holds a part, never the archive.

In a thread, in order: the shards of the parts a previous run wrote that have
no commit record; then SOURCE's URIs that no part holds yet (a driver killed
mid-listing, or a nightly prefix that grew), a sorted chunk at a time, cut
into whole shards and written as parts, each handed out once written. A
bounded queue between the thread and the pool keeps the driver's memory to a
few parts: the listing goes on as fast as the workers take shards.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from segbatch.storage.sources import Listing, sorted_unique

from .plan import LEGACY, PlanFile, PlanPart, Shard, make_shards_from, part_width
from .records import Progress

log = logging.getLogger(__name__)

PART_URIS = 262_144  # the most URIs a part holds: ~120 parts at 30M images, a few MB each
FIRST_PART_URIS = 4_096  # parts start small, so the first shard goes out at once, and grow 4x to PART_URIS
PARTS_AHEAD = 2  # parts planned and not yet handed out: what bounds the driver's memory
_KNOWN_PARTS_KEPT = 4  # parts whose URIs the listing's lookups keep (a chunk overlaps one or two)


class Planner:
    """The plan of one run, made in a thread (module docstring). The driver's
    pool calls ``take`` for a shard, never waiting; ``finished`` once all were taken.

    ``num_shards``/``num_uris``: the plan so far, whole once ``finished``."""

    def __init__(self, plan: PlanFile, listing: Listing, shard_size: int, committed: set[int]):
        self.plan = plan
        self.listing = listing
        self.shard_size = shard_size
        self.committed = committed
        self.num_shards = 0
        self.num_uris = 0
        self.resumed = [0, 0]  # images, shards of the recorded plan found committed (the thread's count)
        self._reported = [0, 0]  # what ``report`` has added of them to the progress (the driver's)
        self.estimate: int | None = None  # shards to run, as far as known before listing (pool sizing)
        self._queue: queue.Queue[list[Shard]] = queue.Queue(PARTS_AHEAD)
        self._current: deque[Shard] = deque()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="segbatch-planner", daemon=True)
        self._written: list[Shard] | None = None  # plan_all's: the new shards, kept rather than handed out
        self.info = plan.info()
        self._parts = plan.parts(self.info) if self.info else []
        if self.info is None:
            expected = -(-(listing.estimate or 0) // shard_size)
            self.info = plan.begin(shard_size, part_width(expected))
        self.num_shards = max((p.first_shard + p.num_shards for p in self._parts), default=0)
        self.num_uris = sum(p.num_uris for p in self._parts)
        if listing.estimate is not None:  # (a listing that streams does not know: no bound on the pool)
            new = -(-max(0, listing.estimate - self.num_uris) // shard_size)  # at most: some are planned
            self.estimate = self.num_shards - len(committed) + new

    def start(self) -> Planner:
        self._thread.start()
        return self

    def plan_all(self) -> list[Shard]:
        """Plan SOURCE's URIs that no part holds, here and now; the new shards (for small plans: tests, benches)."""
        self._written = []
        self._list()
        return self._written

    def close(self) -> None:
        """Stop planning (the job ended or failed): parts written so far stay the plan's."""
        self._stop.set()
        self._thread.join(timeout=30)

    def report(self, progress: Progress) -> None:
        """Bring ``progress`` up to the plan so far. Called from the driver's thread, which alone
        writes ``progress`` (the pool counts images there too)."""
        uris, shards = self.resumed[0] - self._reported[0], self.resumed[1] - self._reported[1]
        self._reported = [self.resumed[0], self.resumed[1]]
        progress.done += uris
        progress.done_at_start += uris
        progress.shards_done += shards
        progress.total = self.num_uris if self.finished() else max(self.num_uris, self.listing.estimate or 0)
        progress.shards_total = self.num_shards

    def take(self) -> Shard | None:
        """The next shard to run; None when none is planned yet (or ``finished``). Raises what stopped the listing."""
        while not self._current:
            try:
                self._current.extend(self._queue.get_nowait())
            except queue.Empty:
                if self._error is not None and not self._thread.is_alive():
                    error, self._error = self._error, None
                    raise error from None  # (not from the empty queue)
                return None
        return self._current.popleft()

    def wait(self) -> bool:
        """Wait until a shard is ready or planning ended; whether a shard is ready."""
        while not self._current:
            try:
                self._current.extend(self._queue.get(timeout=0.1))
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    break
        return bool(self._current)

    def finished(self) -> bool:
        """Planning ended and every shard planned was taken (an error still to raise counts as not finished)."""
        return not self._thread.is_alive() and self._queue.empty() and not self._current and self._error is None

    def waiting(self) -> int:
        """Shards planned and not yet taken (a metric: the queue's depth)."""
        return len(self._current) + sum(len(s) for s in list(self._queue.queue))

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            for part in self._parts:
                self._resume(part)
            self._list()
        except BaseException as exc:  # raised in the driver by take(): the job stops; the parts stay the plan's
            self._error = exc

    def _resume(self, part: PlanPart) -> None:
        """A part of the recorded plan: its shards without a commit record are handed out."""
        shards = self.plan.read_part(part)
        todo = [s for s in shards if s.id not in self.committed]
        done = sum(len(s.uris) for s in shards) - sum(len(s.uris) for s in todo)
        self.resumed = [self.resumed[0] + done, self.resumed[1] + len(shards) - len(todo)]
        self._put(todo)

    def _list(self) -> None:
        """SOURCE's URIs no part holds, written as parts and handed out (module docstring).

        A chunk is sorted here; chunks need not be in order among themselves (an inventory's
        data files): each is checked against every part whose range it meets, this run's too,
        and against the URIs waiting for the next part. In order (a sorted listing), a chunk
        meets a part or two."""
        known = _KnownUris(self.plan, self._parts)
        buffer: list[str] = []
        buffered: set[str] = set()
        size = max(self.shard_size, FIRST_PART_URIS // self.shard_size * self.shard_size)
        for chunk in self.listing.chunks:
            if self._stop.is_set():
                return
            new = [u for u in known.new_only(sorted_unique(chunk)) if u not in buffered]
            buffer += new
            buffered.update(new)
            while len(buffer) >= size:
                head = buffer[:size]
                known.add(self._write(head), head)
                buffered.difference_update(head)
                del buffer[:size]
                size = max(self.shard_size, min(PART_URIS, size * 4) // self.shard_size * self.shard_size)
        if buffer:
            self._write(buffer)
        self.info.update(num_shards=self.num_shards, num_uris=self.num_uris, complete=True)
        self.plan.record(self.info)
        log.info("plan: %d images in %d shards of %d", self.num_uris, self.num_shards, self.shard_size)

    def _write(self, uris: list[str]) -> PlanPart:
        if "legacy_rows" not in self.info and self._legacy():
            self.info["legacy_rows"] = self.info["num_uris"]  # plan.parquet's rows stay the plan's
        part = self.plan.write_part(self.num_shards, uris, self.shard_size)
        self.num_shards += part.num_shards
        self.num_uris += part.num_uris
        self.info.update(num_shards=self.num_shards, num_uris=self.num_uris, complete=False)
        self.plan.record(self.info)
        self._put(make_shards_from(uris, self.shard_size, part.first_shard))
        return part

    def _legacy(self) -> bool:
        return any(p.url.endswith("/" + LEGACY) for p in self._parts)

    def _put(self, shards: list[Shard]) -> None:
        """Hand ``shards`` out, waiting while ``PARTS_AHEAD`` parts are still to be taken."""
        if self._written is not None:
            self._written += shards
            return
        while shards and not self._stop.is_set():
            try:
                self._queue.put(shards, timeout=0.2)
                return
            except queue.Full:
                continue


class _KnownUris:
    """The URIs the plan's parts hold, asked a sorted chunk at a time: only the
    parts whose range meets the chunk's are read, and a few are kept."""

    def __init__(self, plan: PlanFile, parts: Iterable[PlanPart]):
        self.plan = plan
        self.parts = list(parts)
        self._kept: OrderedDict[str, pa.Array] = OrderedDict()

    def add(self, part: PlanPart, uris: list[str]) -> None:
        """A part this run wrote (its URIs at hand)."""
        self.parts.append(part)
        self._keep(part.url, pa.array(uris, pa.string()))

    def new_only(self, chunk: list[str]) -> list[str]:
        """``chunk`` (sorted) less the URIs a part holds."""
        if not chunk:
            return chunk
        lo, hi = chunk[0], chunk[-1]
        meets = [p for p in self.parts if p.min_uri <= hi and p.max_uri >= lo]
        if not meets:
            return chunk
        known = pa.chunked_array([self._uris(p) for p in meets], pa.string()).combine_chunks()
        arr = pa.array(chunk, pa.string())
        return arr.filter(pc.invert(pc.is_in(arr, value_set=known))).to_pylist()

    def _uris(self, part: PlanPart) -> pa.Array:
        if part.url not in self._kept:
            self._keep(part.url, self.plan.part_uris(part))
        self._kept.move_to_end(part.url)
        return self._kept[part.url]

    def _keep(self, url: str, uris: pa.Array) -> None:
        self._kept[url] = uris
        while len(self._kept) > _KNOWN_PARTS_KEPT:
            self._kept.popitem(last=False)
