"""The actor pool: shards scheduled onto ``SegmentWorker`` actors, their events,
retries, and workers replaced.

Shards are pulled: an actor gets a new shard whenever it has fewer than
``INFLIGHT_PER_WORKER`` in flight, so a slow worker never holds back a fast
one. The rules for what goes wrong live in ``policy.py``:

- A dead actor is replaced. Its death says nothing of which of its shards
  was at fault, so every shard it ran becomes a suspect, uncharged, and runs
  again alone on an actor; a suspect that dies alone is charged, and one
  that keeps dying is bisected down to the images that kill an actor on
  their own, which get error rows (``PoisonHunt``).
- A task (not an actor: a sibling's progress hides nothing) silent for
  ``stall_timeout_s`` is charged and its actor killed; its siblings are
  suspects (``StallGuard``). No worker ready for ``--startup-timeout``, or
  several failing to start in a row, ends the job (``StartupGuard``).
- A storage fault is the store's, never the actor's: it fails the shard
  (retried) but never replaces a worker; once store-wide (``StoreFaults``)
  nothing more is scheduled, running shards end, and the job raises one
  ``StoreUnavailable`` naming the fix. Nothing of it becomes a row.
- Only an actor-level fault (a shard raising something other than a storage
  fault, twice in a row) replaces a live worker; a bad image costs its row.

A shard that fails more than ``retries`` times (``Retries``) is reported,
never dropped silently. How big each worker is: ``sizing.py``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.exceptions import RayActorError, RayTaskError

from segbatch.config import JobConfig
from segbatch.errors import StorageFault
from segbatch.geo import parse_tile_item
from segbatch.model import ModelSpec

from .commits import Compactor
from .inflight import worker_memory_bytes
from .metrics import JobMetrics
from .plan import Shard
from .policy import PoisonHunt, Probe, Retries, StallGuard, StartupGuard, StoreFaults
from .records import Committed, Probed, Progress, Progressed
from .sizing import pending_reason, pool_shape
from .store import JobStore
from .worker import SegmentWorker

log = logging.getLogger(__name__)

# Shards an actor runs at once (a threaded actor): the model takes one batch at a time, and the
# second shard's reads and decoding overlap the first one's last encodings and its write.
INFLIGHT_PER_WORKER = 2
PROGRESS_FILE_EVERY_S = 5.0
WAIT_TICK_S = 1.0
IDLE_TICK_S = 0.05  # how often idle workers look for a shard while the plan is being listed
# An actor whose shards fail this many times in a row is replaced: its state may be
# broken (a dead encode process pool, a sticky CUDA error) and would fail every shard.
MAX_FAILURES_IN_A_ROW = 2


@dataclass
class _Unit:
    """What a pool task runs: a shard, or a probe of some of its images."""

    shard: Shard
    probe: Probe | None = None


@dataclass(eq=False)  # hashed by identity: the stall guard's key
class _Task:
    unit: _Unit
    gen: Any  # ray.ObjectRefGenerator
    alone: bool = False  # its actor takes no other task beside it
    images: int = 0
    errors: int = 0

    @property
    def shard(self) -> Shard:
        return self.unit.shard

    def count(self, progress: Progress, images: int, errors: int) -> None:
        """The task has done ``images`` (``errors`` of them error rows): the job's progress follows."""
        progress.done += images - self.images
        progress.errors += errors - self.errors
        self.images, self.errors = images, errors


@dataclass
class _Worker:
    handle: Any
    ready_ref: Any
    created: float = field(default_factory=time.monotonic)
    ready: bool = False
    tasks: list[_Task] = field(default_factory=list)
    failures_in_a_row: int = 0

    def shard_failed(self) -> bool:
        """Count a shard that raised; True when the actor should be replaced."""
        self.failures_in_a_row += 1
        return self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW

    def shard_committed(self) -> None:
        self.failures_in_a_row = 0


class _Reporter:
    """Shows the progress after each pass of the pool, and writes progress.json every few seconds."""

    def __init__(self, progress: Progress, on_progress: Callable[[Progress], None] | None, store: JobStore):
        self.progress, self.on_progress, self.store = progress, on_progress, store
        self.last_file = 0.0

    def __call__(self) -> None:
        if self.on_progress:
            self.on_progress(self.progress)
        now = time.monotonic()
        if now - self.last_file >= PROGRESS_FILE_EVERY_S:
            self.last_file = now
            try:
                self.store.write_progress(self.progress.to_json())
            except Exception as exc:  # progress is advisory; the job goes on
                log.warning("cannot write progress: %s", exc)


class ShardFeed(Protocol):
    """Where the pool takes the plan's shards from (``planner.Planner``): ``take`` never waits."""

    num_shards: int  # the plan's shards so far
    estimate: int | None  # shards to run, as far as known (sizes the pool)

    def take(self) -> Shard | None: ...

    def report(self, progress: Progress) -> None: ...

    def finished(self) -> bool: ...

    def waiting(self) -> int: ...


class _ShardQueue:
    """The units waiting for an actor, and what becomes of a unit that fails,
    whose actor goes, or that is probed.

    ``todo`` shares an actor; ``alone`` (suspects and probes) takes an actor
    with no other task, and nothing beside it. A unit that failed runs again
    until ``Retries`` gives it up into ``failed``; whose actor died is charged,
    or becomes a suspect, or has its images probed (``PoisonHunt``).
    """

    def __init__(self, retries: Retries[int], progress: Progress, feed: ShardFeed):
        self.feed = feed  # the plan's shards not yet taken (``planner.Planner``)
        self.todo: deque[_Unit] = deque()  # units that ran before and run again first
        self.alone: deque[_Unit] = deque()
        self.retries = retries
        self.progress = progress
        self.hunt = PoisonHunt()
        self.failed: dict[int, str] = {}  # shard id -> last error, for the shards given up
        self.retried = 0  # shard runs that did not commit and run again (a metric)

    def __bool__(self) -> bool:
        return bool(self.todo or self.alone) or not self.feed.finished()

    def waiting(self) -> int:
        """Units waiting for an actor (a metric: the queue's depth)."""
        return len(self.todo) + len(self.alone) + self.feed.waiting()

    def take(self, running: list[_Task]) -> tuple[_Unit, bool] | None:
        """The next unit for an actor running ``running``, and whether it runs alone; None: nothing for it now."""
        if len(running) >= INFLIGHT_PER_WORKER or any(t.alone for t in running):
            return None
        if self.alone:  # with a suspect waiting, an actor with tasks drains for it
            return None if running else (self.alone.popleft(), True)
        if self.todo:
            return self.todo.popleft(), False
        shard = self.feed.take()
        return None if shard is None else (_Unit(shard), False)

    def requeue(self, unit: _Unit) -> None:
        """Back to the front of its queue: probes and suspects run alone."""
        alone = unit.probe is not None or self.hunt.alone(unit.shard.id)
        self.retried += unit.probe is None
        (self.alone if alone else self.todo).appendleft(unit)

    def left(self) -> list[_Unit]:
        return [*self.alone, *self.todo]

    def poison_of(self, shard: Shard) -> list[str]:
        """Images of ``shard`` that killed an actor on their own: error rows, never read."""
        return self.hunt.poison_of(shard.id)

    def committed(self, shard: Shard) -> None:
        self.hunt.committed(shard.id)

    def failed_attempt(self, unit: _Unit, error: str) -> None:
        """The unit's shard failed (charged): run it again, or give it up."""
        sid = unit.shard.id
        n = self.retries.failed(sid)
        if self.retries.given_up(sid):
            log.error("shard %d failed %d times, giving up: %s", sid, n, error)
            self.failed[sid] = error
            self.progress.shards_failed += 1
        else:
            log.warning("shard %d failed (attempt %d of %d), retrying: %s", sid, n, self.retries.tries, error)
            self.requeue(unit)

    def probe_passed(self, probe_unit: _Unit) -> None:
        """A probe ran to its end, or raised: its images did not kill the actor."""
        self.hunt.probe_passed(probe_unit.probe)
        self._after_probe(probe_unit.shard)

    def actor_gone(self, units: list[_Unit], culprit: _Unit | None, error: str) -> None:
        """The actor that ran ``units`` is gone: it died, or was killed for ``culprit``'s stall.

        Only the unit it died of is charged: ``culprit``, or its only unit. A
        death beside other units says nothing of which one caused it: they all
        become suspects, uncharged, rerun alone (``PoisonHunt``)."""
        stalled = culprit is not None
        if culprit is None and len(units) == 1:
            culprit = units[0]
        for unit in units:
            if unit is culprit:
                self._charge_death(unit, error, stalled)
            elif unit.probe is not None:
                self.requeue(unit)
            else:
                self.hunt.died_beside_others(unit.shard.id)
                log.warning(
                    "shard %d ran beside others on an actor that went (%s): rerunning it alone, uncharged",
                    unit.shard.id,
                    error,
                )
                self.requeue(unit)

    def _charge_death(self, unit: _Unit, error: str, stalled: bool) -> None:
        """``unit`` alone is to blame for its actor's end: charge it, or hunt its poison."""
        shard, probe = unit.shard, unit.probe
        if probe is not None:  # a probe's stall is a death too: it is how an image stops an actor
            self._probed(shard, self.hunt.probe_died(probe))
            return
        probes = None if stalled else self.hunt.died_alone(shard.id, list(shard.uris))
        if probes is None:
            self.failed_attempt(unit, error)
            return
        images = sum(len(p.uris) for p in probes)
        log.warning("shard %d killed its actor again on its own (%s): probing its %d images", shard.id, error, images)
        self._probed(shard, probes)

    def _probed(self, shard: Shard, probes: list[Probe]) -> None:
        for probe in reversed(probes):
            self.requeue(_Unit(shard, probe))
        self._after_probe(shard)

    def _after_probe(self, shard: Shard) -> None:
        """The hunt of ``shard`` is over: it runs again, its poison images as error rows."""
        if self.hunt.hunting(shard.id):
            return
        poison = self.hunt.poison_of(shard.id)
        if poison:
            log.warning(
                "shard %d: %d images killed their actor on their own, each gets an error row: %s",
                shard.id,
                len(poison),
                ", ".join(poison[:5]),
            )
        else:
            log.warning("shard %d: no image killed an actor on its own; running it again", shard.id)
        self.requeue(_Unit(shard))


class WorkerPool:
    """A pool of SegmentWorker actors pulling shards from a ``_ShardQueue`` (see
    the module docstring): it starts, feeds, watches and replaces the actors,
    and hands what becomes of each shard to the queue.

    About 200 lines, one job: the actors' life cycle and their events. What
    to do with a failed shard is the queue's, when to give up the policies'
    (``policy.py``), how big a worker is ``sizing.py``'s."""

    def __init__(
        self,
        cfg: JobConfig,
        spec: ModelSpec,
        key: str,
        progress: Progress,
        on_progress: Callable[[Progress], None] | None,
        store: JobStore,
        scenes: dict[str, dict] | None = None,
        compactor: Compactor | None = None,
    ):
        self.cfg = cfg
        self.compactor = compactor  # folds full blocks of commit records (commits.py)
        self.scenes = scenes  # a tiled job's scene headers: each shard gets those of its tiles
        self.progress = progress
        self.report = _Reporter(progress, on_progress, store)
        self.spec_ref = ray.put(spec)  # one copy of the weights in the object store, not one per actor
        self.key = key
        self.store = store
        self.num_cpus, self.num_gpus, self.size = 0.0, 0.0, 0  # sized by run(), for its shards
        self.queue: _ShardQueue  # the shards of run()'s feed
        self.workers: list[_Worker] = []
        self.startup = StartupGuard(cfg.startup_timeout_s, lambda: pending_reason(self.num_cpus, self.num_gpus))
        self.stalls: StallGuard[_Task] = StallGuard(cfg.stall_timeout_s)  # per task: a sibling's progress hides nothing
        self.store_faults = StoreFaults()
        self.stopped: str | None = None  # why storage stopped the job (StoreFaults)
        self.metrics = JobMetrics(cfg.dest)  # Ray metrics of the job (metrics.py)

    def _start_worker(self) -> None:
        actor_cls = ray.remote(SegmentWorker).options(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=INFLIGHT_PER_WORKER,
            # host memory in bytes (model + images in flight): Ray places no more workers on a node than fit
            memory=worker_memory_bytes(
                self.cfg.batch_size, self.cfg.io_threads, self.cfg.max_pixels, INFLIGHT_PER_WORKER
            ),
        )
        handle = actor_cls.remote(self.cfg, self.spec_ref, self.key)
        self.workers.append(_Worker(handle, handle.info.remote()))

    def run(self, feed: ShardFeed) -> dict[int, str]:
        """Run the shards ``feed`` hands out; returns those that failed for good, with why.

        When storage stops the job (``stopped``), every shard left is among them."""
        try:
            return self._run(feed)
        finally:
            # also when the job raises (run_job used as a library): no actor outlives it
            for w in self.workers:
                ray.kill(w.handle, no_restart=True)

    def _run(self, feed: ShardFeed) -> dict[int, str]:
        self.queue = queue = _ShardQueue(Retries(self.cfg.retries), self.progress, feed)
        self.num_cpus, self.num_gpus, self.size = pool_shape(self.cfg, self.store.storage, most=feed.estimate)
        for _ in range(self.size):
            self._start_worker()
        log.info("pool: %d workers x (%s CPU, %s GPU)", self.size, self.num_cpus, self.num_gpus)
        while any(w.tasks for w in self.workers) or (not self.stopped and queue):
            self._check_startup()
            for w in self.workers:
                while w.ready and not self.stopped and (taken := queue.take(w.tasks)):
                    self._submit(w, *taken)
            waitables = [w.ready_ref for w in self.workers if not w.ready] + [
                t.gen for w in self.workers for t in w.tasks
            ]
            if not waitables:  # every worker idle: the plan's next part is still being listed
                time.sleep(IDLE_TICK_S)
            ready = ray.wait(waitables, num_returns=1, timeout=WAIT_TICK_S, fetch_local=False)[0] if waitables else []
            for w in list(self.workers):
                if not w.ready and w.ready_ref in ready:
                    self._on_ready(w)
                for task in list(w.tasks):
                    if task.gen in ready and task in w.tasks:  # not requeued by a replacement
                        self._on_task_event(w, task)
            self._check_stalls()
            self.progress.workers = sum(w.ready for w in self.workers)
            feed.report(self.progress)
            self.metrics.passed(self.progress, queue.waiting(), queue.retried)
            if self.compactor is not None:
                self.compactor.grow(feed.num_shards)
            self.report()
        if self.stopped:
            for unit in queue.left():
                queue.failed.setdefault(unit.shard.id, self.stopped)
        return queue.failed

    def _submit(self, w: _Worker, unit: _Unit, alone: bool) -> None:
        shard = unit.shard
        if unit.probe is not None:
            gen = w.handle.process.remote(shard.id, list(unit.probe.uris), self._scenes_of(shard), None, True)
        else:
            poison = self.queue.poison_of(shard)
            gen = w.handle.process.remote(shard.id, list(shard.uris), self._scenes_of(shard), poison)
        task = _Task(unit, gen, alone)
        w.tasks.append(task)
        self.stalls.beat(task)

    def _scenes_of(self, shard: Shard) -> dict[str, dict] | None:
        if self.scenes is None:
            return None
        return {uri: self.scenes[uri] for uri in {parse_tile_item(item)[0] for item in shard.uris}}

    # -- events ---------------------------------------------------------------

    def _on_ready(self, w: _Worker) -> None:
        try:
            info = ray.get(w.ready_ref)
        except RayActorError as exc:
            self._worker_died(w, f"worker failed to start: {cause(exc)}", startup=True)
            return
        w.ready = True
        self.startup.started()
        log.info("worker ready on node %s (%s, %s)", info["node"][:8], info["host"], info["device"])

    def _on_task_event(self, w: _Worker, task: _Task) -> None:
        try:
            event = ray.get(next(task.gen))
        except StopIteration:
            self._end(w, task)
            return
        except RayActorError as exc:
            self._worker_died(w, f"worker died: {cause(exc)}")
            return
        except RayTaskError as exc:
            self._task_raised(w, task, exc)
            return
        self.stalls.beat(task)
        if task.unit.probe is not None:
            if isinstance(event, Probed):
                self._end(w, task)
                self.queue.probe_passed(task.unit)
        elif isinstance(event, Progressed):
            task.count(self.progress, event.images, event.errors)
        elif isinstance(event, Committed):
            task.count(self.progress, len(task.shard.uris), event.record.errors)
            self.progress.shards_done += 1
            self.metrics.committed(event, len(task.shard.uris))
            if self.compactor is not None:
                self.compactor.committed(event.record)
            self._end(w, task)
            w.shard_committed()
            self.queue.committed(task.shard)

    def _end(self, w: _Worker, task: _Task) -> None:
        if task in w.tasks:
            w.tasks.remove(task)
        self.stalls.forget(task)

    def _task_raised(self, w: _Worker, task: _Task, exc: RayTaskError) -> None:
        """A task raised: its shard is charged; its actor is replaced only for
        faults of its own, never for the store's."""
        self._end(w, task)
        fault = exc.cause if isinstance(getattr(exc, "cause", None), StorageFault) else None
        if fault is not None and self.store_faults.record(fault) and not self.stopped:
            self._stop(self.store_faults.stop)
        if task.unit.probe is not None:  # it raised rather than kill its actor: not what the probe looks for
            log.warning("a probe of shard %d raised: %s", task.shard.id, cause(exc))
            self.queue.probe_passed(task.unit)
        else:
            task.count(self.progress, 0, 0)
            self.queue.failed_attempt(task.unit, cause(exc))
        if fault is None and w.shard_failed():
            self._replace(w, f"worker failed {w.failures_in_a_row} shards in a row, the last with {cause(exc)}")

    def _stop(self, message: str) -> None:
        """Storage refuses the job as a whole: schedule nothing more, let the running shards end."""
        self.stopped = message
        self.progress.message = message
        log.error("stopping: %s", message)

    def _worker_died(self, w: _Worker, error: str, culprit: _Task | None = None, startup: bool = False) -> None:
        """An actor is gone (it died, or was killed for ``culprit``'s stall): the
        queue decides what becomes of its tasks (``_ShardQueue.actor_gone``)."""
        tasks = list(w.tasks)
        for task in tasks:
            task.count(self.progress, 0, 0)
            self.stalls.forget(task)
        w.tasks.clear()
        self._retire(w)
        self.queue.actor_gone([t.unit for t in tasks], None if culprit is None else culprit.unit, error)
        if startup:
            self.startup.failed(error, any_ready=any(x.ready for x in self.workers))
        if self.stopped:  # nothing more will be scheduled
            log.warning("%s", error)
            return
        log.warning("%s; starting a replacement", error)
        self._start_worker()

    def _replace(self, w: _Worker, why: str) -> None:
        """Swap a live actor for a new one; its other shards go back uncharged."""
        self._retire(w)
        log.warning("%s; replacing it", why)
        self._start_worker()

    def _retire(self, w: _Worker) -> None:
        """Kill an actor and put the tasks it still holds back in their queues, uncharged."""
        if w in self.workers:
            self.workers.remove(w)
        ray.kill(w.handle, no_restart=True)
        for task in reversed(w.tasks):
            task.count(self.progress, 0, 0)
            self.stalls.forget(task)
            self.queue.requeue(task.unit)
        w.tasks.clear()

    def _check_stalls(self) -> None:
        """Kill the actor of a task silent for ``stall_timeout_s``, charging that task."""
        for task in self.stalls.stalled():
            w = next((x for x in self.workers if task in x.tasks), None)
            if w is None:
                continue  # its actor went for another of its tasks in this same pass
            why = f"worker made no progress on shard {task.shard.id} for {self.cfg.stall_timeout_s:.0f} s"
            self._worker_died(w, why, culprit=task)

    def _check_startup(self) -> None:
        """Never a silent hang: say why no worker starts, and give up in time (``StartupGuard``)."""
        warning = self.startup.check(any(w.ready for w in self.workers))
        if warning is not None:
            waited, self.progress.message = warning
            log.warning("no worker has been ready for %.0f s: %s", waited, self.progress.message)


def cause(exc: Exception) -> str:
    """The first line of a Ray error, which names the underlying exception."""
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # RayTaskError's text ends with the original exception's "Type: message"
    return (lines[-1] if lines else type(exc).__name__)[:500]
