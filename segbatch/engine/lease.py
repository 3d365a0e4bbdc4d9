"""One driver per DEST: a lease, ``DEST/_segbatch/lease.json``.

Two drivers on one DEST would interleave plan parts and plan.json from
different listings, and one's ``--overwrite`` would delete the other's
results. So a driver takes the lease before it reads or writes DEST's state,
renews it from a daemon thread every ``HEARTBEAT_S`` and removes it at the
end (on an error too). A second driver is refused with a message naming the
holder. A driver that died (killed, its machine lost) stops renewing: once
its lease is ``STALE_S`` old, the next driver takes it over. On the machine
the dead driver ran on, that is known at once (its process is gone: a
``kill -9`` and the same command again resumes without waiting).

Taking is a conditional create (``Storage.create_new``: ``O_EXCL``'s effect
locally, ``If-None-Match: *`` on S3), so of two drivers starting at once
exactly one wins. Taking over a stale lease must be as exclusive: the taker
first creates ``lease.takeover-<stale id>-<n>.json`` conditionally, then
checks that the lease still is the stale one it saw, and only then writes
its own. A second taker of the same stale lease loses the create, or, coming
later, finds the lease no longer the one it saw; a marker left by a taker
that died in between goes stale itself and the next one tries ``n + 1``.

Staleness compares the holder's clock (``renewed``, written by the holder)
with the reader's: drivers' clocks must agree within a fraction of
``STALE_S`` (NTP does, by far). The clock is injectable for tests.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from segbatch import __version__
from segbatch.errors import SegbatchError
from segbatch.storage import Storage, join

log = logging.getLogger(__name__)

LEASE = "lease.json"
TAKEOVER_PREFIX = "lease.takeover-"  # lease.takeover-<stale id>-<n>.json
HEARTBEAT_S = 30.0
STALE_S = 120.0  # four missed heartbeats: a driver that did not renew for this long is gone
_MAX_TAKEOVER_MARKERS = 8  # markers of takers that died in between: more is a store that lies, not bad luck


class DestInUse(SegbatchError):
    """Another driver holds DEST's lease; the message names it and what to do."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: written in lease.json and named to a refused driver."""

    id: str
    host: str
    pid: int
    started: float
    renewed: float
    version: str = __version__
    machine: str = ""  # boot and PID namespace (``_machine``): where ``pid`` means this process; "" unknown
    pid_start: int | None = None  # the process's start (``_process_start``): a reused pid is another process

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Holder:
        pid_start = d.get("pid_start")
        return cls(
            id=str(d["id"]),
            host=str(d["host"]),
            pid=int(d["pid"]),
            started=float(d["started"]),
            renewed=float(d["renewed"]),
            version=str(d.get("version", "")),
            machine=str(d.get("machine", "")),
            pid_start=None if pid_start is None else int(pid_start),
        )

    def is_dead_here(self) -> bool:
        """True when the holder ran in this machine's PID namespace and its process is gone."""
        if not self.machine or self.machine != _machine():
            return False
        start = _process_start(self.pid)
        return start is None or (self.pid_start is not None and start != self.pid_start)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()


class Lease:
    """A driver's hold on DEST (see the module docstring).

    Use as ``with Lease(dest, storage): ...`` or ``acquire()`` / ``release()``.
    ``lost`` turns True when the heartbeat finds another driver's lease in
    place of this one (this driver stalled past ``stale_s`` and was taken over).
    """

    def __init__(
        self,
        dest: str,
        storage: Storage,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        stale_s: float = STALE_S,
        clock: Callable[[], float] = time.time,
    ):
        if stale_s <= heartbeat_s:
            raise ValueError(f"stale_s ({stale_s}) must exceed heartbeat_s ({heartbeat_s})")
        self.dest = dest.rstrip("/") or dest
        self.storage = storage
        self.meta = join(self.dest, "_segbatch")
        self.url = join(self.meta, LEASE)
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.clock = clock
        self.id = uuid.uuid4().hex
        self.lost = False
        self._started = 0.0
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Lease({self.url!r}, held={self._held})"

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- taking ----------------------------------------------------------------

    def _me(self) -> Holder:
        pid = os.getpid()
        host, machine, start = socket.gethostname(), _machine(), _process_start(pid)
        return Holder(self.id, host, pid, self._started, self.clock(), __version__, machine, start)

    def acquire(self, heartbeat: bool = True) -> None:
        """Take the lease, or raise ``DestInUse`` naming its live holder.

        heartbeat: renew it from a daemon thread until ``release`` (tests
        that drive the clock themselves call ``renew`` instead)."""
        self._started = self.clock()
        for _ in range(3):  # a lease released between our create and our read: create again
            if self.storage.create_new(self.url, self._me().to_bytes()):
                break
            holder = self.holder()
            if holder is not None and holder.id == self.id:  # our create landed, its reply was lost
                break
            if holder is not None and not self._is_stale(holder):
                raise DestInUse(self._in_use_message(holder))
            if holder is not None and self._take_over(holder):
                break
        else:
            holder = self.holder()
            raise DestInUse(self._in_use_message(holder) if holder else f"{self.url} keeps changing; try again")
        self._held = True
        log.info("lease on %s taken (%s)", self.dest, self.id[:8])
        if heartbeat:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="segbatch-lease", daemon=True)
            self._thread.start()

    def _take_over(self, stale: Holder) -> bool:
        """Replace ``stale`` by this driver's lease, exclusively (module docstring)."""
        age = self.clock() - stale.renewed
        for n in range(_MAX_TAKEOVER_MARKERS):
            marker = join(self.meta, f"{TAKEOVER_PREFIX}{stale.id}-{n}.json")
            if self.storage.create_new(marker, self._me().to_bytes()):
                break
            other = self._read(marker)
            if other is not None and other.id == self.id:
                break  # our create landed, its reply was lost
            if other is None or not self._is_stale(other):
                # another driver is taking it over now, or has just done so: the caller reads the lease again
                return False
        else:
            return False
        try:
            current = self.holder()
            if current is None or current != stale:
                return False  # released, renewed or already taken over since we looked
            why = "its process is gone" if stale.is_dead_here() else f"not renewed for {age:.0f} s"
            log.warning("DEST %s: taking over the lease of %s: %s", self.dest, self._describe(stale), why)
            self.storage.write_bytes(self.url, self._me().to_bytes())
            return True
        finally:
            self.storage.delete(marker)

    # -- holding ---------------------------------------------------------------

    def renew(self) -> bool:
        """Write a fresh ``renewed`` time; False (and ``lost``) when the lease
        is no longer this driver's."""
        holder = self.holder()
        if holder is None or holder.id != self.id:
            if not self.lost:
                who = self._describe(holder) if holder else "nobody"
                log.error("DEST %s: this driver's lease was taken over (now held by %s); stop it", self.dest, who)
            self.lost = True
            return False
        self.storage.write_bytes(self.url, self._me().to_bytes())
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.renew():
                    return
            except Exception as exc:  # a store that fails now and then: the next beat tries again
                why = self.storage.redact(f"{type(exc).__name__}: {exc}")
                log.warning("DEST %s: cannot renew the lease: %s", self.dest, why)

    def release(self) -> None:
        """Stop renewing and remove the lease, if it still is this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if not self._held:
            return
        self._held = False
        try:
            holder = self.holder()
            if holder is not None and holder.id == self.id:
                self.storage.delete(self.url)
                log.info("lease on %s released", self.dest)
        except Exception as exc:  # left behind, it goes stale: the next driver waits stale_s at most
            why = self.storage.redact(f"{type(exc).__name__}: {exc}")
            log.warning("DEST %s: cannot remove the lease (it goes stale in %.0f s): %s", self.dest, self.stale_s, why)

    # -- reading ---------------------------------------------------------------

    def holder(self) -> Holder | None:
        """The lease's holder now; None when there is no lease."""
        return self._read(self.url)

    def _read(self, url: str) -> Holder | None:
        try:
            data = self.storage.read_bytes(url)
        except FileNotFoundError:
            return None
        try:
            return Holder.from_json(json.loads(data))
        except (ValueError, KeyError, TypeError):
            # not written by segbatch, or cut short by a filesystem without hard links:
            # never taken over on a guess
            raise DestInUse(
                f"{url} is not a segbatch lease; if no segbatch job runs on {self.dest}, delete that file and run again"
            ) from None

    def _is_stale(self, holder: Holder) -> bool:
        return self.clock() - holder.renewed > self.stale_s or holder.is_dead_here()

    def _describe(self, holder: Holder) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(holder.started))
        return f"segbatch on host {holder.host}, pid {holder.pid}, since {since}"

    def _in_use_message(self, holder: Holder) -> str:
        age = max(0.0, self.clock() - holder.renewed)
        wait = max(0.0, self.stale_s - age)
        return (
            f"{self.dest} is in use by {self._describe(holder)} (lease renewed {age:.0f} s ago): one driver per "
            f"DEST. Wait for that job to finish (`segbatch status {self.dest}`), or use another DEST; if that "
            f"driver is dead, run the same command again in {wait:.0f} s, when its lease goes stale and is taken over"
        )


def _machine() -> str:
    """This machine's boot and PID namespace, where a pid names one process
    (a hostname does not: containers on the host network share it); "" where
    unknown (not Linux), and then only staleness frees a lease."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot); None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19])  # field 22, starttime: fields after the name start at field 3
