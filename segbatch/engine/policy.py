"""The driver's decisions, kept apart from Ray: when storage faults are the
whole store's, which shard (and which image) kills its actor, which task has
gone silent, when no worker starting is a failure, when a failed unit of
work is given up.

Each rule is one small class fed with plain events (and, where time
matters, an injectable clock, as Ray's own no-progress guard), so it is unit
tested without a cluster; ``pool.py`` and ``scene_tasks.py`` feed them what
Ray reports and carry out what they decide.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from segbatch.errors import SegbatchError, StorageFault, StoreUnavailable

K = TypeVar("K", bound=Hashable)

MAX_STARTUP_FAILURES = 3

# The codes S3 (and its look-alikes) answer with; the first one a fault's message names is quoted back.
_CODES = re.compile(
    r"\b(ExpiredToken|InvalidAccessKeyId|SignatureDoesNotMatch|RequestTimeTooSkewed|AccessDenied|InvalidToken|"
    r"TokenRefreshRequired|AllAccessDisabled|AccountProblem|PermanentRedirect|TemporaryRedirect|"
    r"AuthorizationHeaderMalformed|NoSuchBucket|Forbidden|403)\b"
)
RESUMES = "run the same command again: it resumes"


class StallGuard(Generic[K]):
    """Which of the things it watches (tasks, keyed as the caller likes) have
    been silent for longer than ``timeout_s``.

    Per task, not per worker: a worker's other task making progress says
    nothing of a task stuck on a read. The same guard times a task that has
    not started (``timeout_s`` = the startup timeout) and one that stopped
    reporting (the stall timeout).
    """

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.timeout_s = timeout_s
        self.clock = clock
        self.last: dict[K, float] = {}

    def beat(self, key: K) -> None:
        """``key`` started, or showed progress, now."""
        self.last[key] = self.clock()

    def forget(self, key: K) -> None:
        self.last.pop(key, None)

    def silent_for(self, key: K) -> float:
        return self.clock() - self.last[key]

    def stalled(self) -> list[K]:
        """The keys silent for longer than the timeout, the longest silent first."""
        now = self.clock()
        late = [(t, k) for k, t in self.last.items() if now - t > self.timeout_s]
        return [k for _, k in sorted(late, key=lambda tk: tk[0])]


class JobError(SegbatchError, RuntimeError):
    """The job cannot start or go on; the message names the cause and the fix."""

    exit_code = 2  # the CLI's status for it, as before errors.SegbatchError carried one


class StartupGuard:
    """Never a silent hang while no worker is ready: say why after
    ``warn_after_s``, give up after ``timeout_s`` (``--startup-timeout``), and
    give up at once when ``max_failures`` workers in a row failed to start with
    none ready.

    The wait is measured from when the last ready worker went (or the pool
    started), so losing every worker hours into a job gives the replacements
    the whole timeout to start, as the first workers had. ``pending_reason``
    says why no worker is placed (what each asks for beside what the cluster
    has free): the guard asks it only when it speaks.
    """

    def __init__(
        self,
        timeout_s: float,
        pending_reason: Callable[[], str] = lambda: "",
        max_failures: int = MAX_STARTUP_FAILURES,
        warn_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.timeout_s = timeout_s
        self.pending_reason = pending_reason
        self.max_failures = max_failures
        self.warn_after_s = warn_after_s
        self.clock = clock
        self.since: float | None = clock()  # when the pool was last without a ready worker
        self.warned = False
        self.failures = 0  # workers that failed to start, in a row

    def waited(self, any_ready: bool, now: float) -> float:
        """Seconds without a ready worker, as of ``now`` (0 while one is ready)."""
        if any_ready:
            self.since, self.warned = None, False
            return 0.0
        if self.since is None:
            self.since = now
        return now - self.since

    def check(self, any_ready: bool) -> tuple[float, str] | None:
        """Once no worker has been ready for ``warn_after_s``: how long, and why
        (else None); ``JobError`` once it has been ``timeout_s``."""
        waited = self.waited(any_ready, self.clock())
        warning = None
        if waited > self.warn_after_s and not self.warned:
            self.warned = True
            warning = waited, self.pending_reason()
        if waited > self.timeout_s:
            raise JobError(
                f"no worker started within {self.timeout_s:.0f} s (--startup-timeout): {self.pending_reason()}"
            )
        return warning

    def started(self) -> None:
        """A worker is ready: failures are counted in a row, and failures hours apart say nothing of each other."""
        self.failures = 0

    def failed(self, error: str, any_ready: bool) -> None:
        """A worker failed to start with ``error``: ``JobError`` when too many did, none ready."""
        self.failures += 1
        if self.failures >= self.max_failures and not any_ready:
            raise JobError(f"{self.failures} workers failed to start; the last said: {error}")


class Retries(Generic[K]):
    """How often each unit of work (a shard, a scene's merge) may fail: it is
    tried again ``retries`` times (``--retries``), then given up and reported,
    never dropped silently."""

    def __init__(self, retries: int):
        self.retries = retries
        self.attempts: dict[K, int] = {}

    @property
    def tries(self) -> int:
        """Attempts a unit gets in all."""
        return self.retries + 1

    def failed(self, key: K) -> int:
        """Count a failed attempt of ``key``; returns how many times it has failed."""
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key]

    def given_up(self, key: K) -> bool:
        """Whether ``key`` has failed more than ``retries`` times."""
        return self.attempts.get(key, 0) > self.retries


class StoreFaults:
    """Decides when storage faults are the whole store's, so the job stops.

    One object refused may be that object's own permissions; several distinct
    objects refused (or redirected) are the credentials, a bucket policy, the
    clock or the region: every later read fails the same way, and going on
    only burns every shard's retries. A ``StoreUnavailable`` (the store says
    so itself) and a missing bucket stop at once. Transient faults
    (throttling, resets, timeouts) never stop the job: they fail their shard,
    which is retried. None of them is ever written as a row.
    """

    COUNTED = ("denied", "redirect")
    AT_ONCE = ("no-bucket",)

    def __init__(self, distinct_objects: int = 3):
        self.distinct_objects = distinct_objects
        self.seen: dict[str, dict[str, str]] = {}  # kind -> url -> message
        self.stop: str | None = None
        self.cause: StorageFault | None = None  # the fault that stopped the job

    def record(self, fault: StorageFault) -> str | None:
        """Count ``fault``; returns the message that stops the job once the
        faults are store-wide (and from then on), else None."""
        if self.stop is None:
            urls = self.seen.setdefault(fault.kind, {})
            urls[fault.url] = str(fault)
            if isinstance(fault, StoreUnavailable):
                self.stop = _unavailable_message(fault)
            elif fault.kind in self.AT_ONCE or (fault.kind in self.COUNTED and len(urls) >= self.distinct_objects):
                self.stop = _store_wide_message(fault.kind, urls)
            if self.stop is not None:
                self.cause = fault
        return self.stop

    def error(self) -> StoreUnavailable:
        """What the driver raises once stopped: the cause's own type where it
        is a ``StoreUnavailable`` (its exit status included), with the message."""
        assert self.stop is not None and self.cause is not None
        fault = self.cause
        if isinstance(fault, StoreUnavailable):
            return type(fault)(self.stop, fault.url, fault.kind, fault.fix)
        return StoreUnavailable(self.stop, fault.url, fault.kind)


def _where(urls: list[str]) -> str:
    """What the URLs have in common, to the last '/': ``s3://bucket/in/...``."""
    common = os.path.commonprefix(urls)
    cut = common.rfind("/") + 1
    return (common[:cut] if cut > len(common.split("://", 1)[0]) + 3 else common or "the store") + "..."


def _code(messages: list[str], default: str) -> str:
    for message in messages:
        if m := _CODES.search(message):
            return m.group(1)
    return default


def _store_wide_message(kind: str, urls: dict[str, str]) -> str:
    """One line: where (the objects' common prefix), what (the code and how
    many objects), the first object, and the fix once (each fault's own text
    ends with a fix of its own, so it is not quoted)."""
    first = sorted(urls)
    where, n = _where(first), len(urls)
    if kind == "denied":
        code = _code(list(urls.values()), "access denied")
        return (
            f"credentials for {where} expired or were revoked, or access was taken away ({code} on {n} objects, "
            f"the first {first[0]}); renew them (or restore access) and {RESUMES}"
        )
    if kind == "redirect":
        code = _code(list(urls.values()), "redirected")
        return (
            f"{where} is answered from another region or endpoint ({code} on {n} objects, the first {first[0]}); "
            f"give the bucket's region or endpoint in --storage-options and {RESUMES}"
        )
    return (
        f"the bucket of {where} does not exist or cannot be reached ({_code(list(urls.values()), 'no bucket')} on "
        f"{first[0]}); check the URL and the endpoint in --storage-options, then {RESUMES}"
    )


def _unavailable_message(fault: StoreUnavailable) -> str:
    text = str(fault)
    fix = fault.fix if fault.fix and fault.fix not in text else ""
    text = f"{text}; {fix}" if fix else text
    return text if "same command" in text else f"{text}; then {RESUMES}"


@dataclass(frozen=True)
class Probe:
    """Some images of a shard, run on an actor of their own without writing
    anything, to learn whether they kill it."""

    shard: int
    uris: tuple[str, ...]


class PoisonHunt:
    """Finds the shards, and in them the images, that kill their actor.

    An actor's death kills every shard it runs, so it says nothing of which
    one was at fault: each becomes a suspect, uncharged, and runs again alone
    on an actor. A suspect that dies alone is charged (``died_alone`` returns
    None: the driver counts a retry). The ``bisect_after``-th time it dies
    alone, its images are probed in halves on isolated actors (``Probe``),
    down to the single images that kill an actor by themselves; those are
    ``poison``: the shard then runs again and they get error rows without
    being touched. Several poison images in a shard are found in one hunt,
    each half being probed on its own.

    A shard is bisected once: if its probes find nothing (a death that does
    not repeat), later deaths are charged as usual, so the retries bound it.
    An image is convicted by ``convict_after`` deaths of its own probe; one
    is enough by default, since its shard already died alone twice and every
    probe on the way down died too.
    """

    def __init__(self, bisect_after: int = 2, convict_after: int = 1):
        self.bisect_after = bisect_after
        self.convict_after = convict_after
        self.suspects: set[int] = set()
        self.deaths_alone: dict[int, int] = {}
        self.bisected: set[int] = set()
        self.outstanding: dict[int, int] = {}  # shard -> probes not yet decided
        self.probe_deaths: dict[tuple[int, str], int] = {}
        self.poison: dict[int, set[str]] = {}

    def died_beside_others(self, shard: int) -> None:
        """``shard`` ran on an actor that died while it ran other tasks too."""
        self.suspects.add(shard)

    def alone(self, shard: int) -> bool:
        """Whether ``shard`` must run with no other task on its actor."""
        return shard in self.suspects

    def died_alone(self, shard: int, uris: list[str]) -> list[Probe] | None:
        """``shard`` was the only task of an actor that died. Returns the probes
        to run when it is to be bisected now, else None: charge it a retry."""
        self.suspects.add(shard)
        n = self.deaths_alone[shard] = self.deaths_alone.get(shard, 0) + 1
        if n < self.bisect_after or shard in self.bisected:
            return None
        self.bisected.add(shard)
        known = self.poison.get(shard, set())
        probes = _halves(shard, tuple(u for u in uris if u not in known))
        self.outstanding[shard] = len(probes)
        return probes

    def hunting(self, shard: int) -> bool:
        """Whether probes of ``shard`` are still to be decided (the shard waits)."""
        return self.outstanding.get(shard, 0) > 0

    def probe_died(self, probe: Probe) -> list[Probe]:
        """Its actor died running ``probe`` alone; returns the probes to run next."""
        if len(probe.uris) > 1:
            halves = _halves(probe.shard, probe.uris)
            self.outstanding[probe.shard] += len(halves) - 1
            return halves
        key = (probe.shard, probe.uris[0])
        self.probe_deaths[key] = self.probe_deaths.get(key, 0) + 1
        if self.probe_deaths[key] < self.convict_after:
            return [probe]
        self.poison.setdefault(probe.shard, set()).add(probe.uris[0])
        self.outstanding[probe.shard] -= 1
        return []

    def probe_passed(self, probe: Probe) -> None:
        """``probe`` ran to its end (or raised: it did not kill its actor)."""
        self.outstanding[probe.shard] -= 1

    def poison_of(self, shard: int) -> list[str]:
        return sorted(self.poison.get(shard, ()))

    def committed(self, shard: int) -> None:
        self.suspects.discard(shard)


def _halves(shard: int, uris: tuple[str, ...]) -> list[Probe]:
    if len(uris) <= 1:
        return [Probe(shard, uris)] if uris else []
    mid = len(uris) // 2
    return [Probe(shard, uris[:mid]), Probe(shard, uris[mid:])]
