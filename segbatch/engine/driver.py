"""The driver: plan, resume, a pool of actors, retries, progress, summary.

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
  suspects. The merge phase of tiled scenes has the same guard, and the
  startup timeout for merge tasks no CPU runs (``StallGuard``).
- A storage fault is the store's, never the actor's: it fails the shard
  (retried) but never replaces a worker; once store-wide (``StoreFaults``)
  nothing more is scheduled, running shards end, and the job raises one
  ``StoreUnavailable`` naming the fix. Nothing of it becomes a row.
- Only an actor-level fault (a shard raising something other than a storage
  fault, twice in a row) replaces a live worker; a bad image costs its row.

A shard that fails more than ``retries`` times is reported, never dropped
silently. Whether the job is complete is read from the commit records
against the plan, not from what the driver counted.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from segbatch.errors import SegbatchError, StorageFault
from segbatch import __version__
from segbatch.config import JobConfig, describe_change, result_key
from .lease import DestInUse, Lease
from segbatch.model import ModelSpec, resolve_model
from .store import JobStore
from .plan import Shard, make_shards
from .pipeline import worker_memory_bytes
from .policy import PoisonHunt, Probe, StallGuard, StoreFaults
from segbatch.storage import list_sources
from segbatch.storage import Storage, is_transient
from segbatch.geo import BandsError, TileOptions, parse_tile_item, plan_windows, raster_info, tile_item
from .worker import SegmentWorker, merge_scene, results_metadata

log = logging.getLogger(__name__)

# Shards an actor runs at once (a threaded actor): the model takes one batch at a time, and the
# second shard's reads and decoding overlap the first one's last encodings and its write.
INFLIGHT_PER_WORKER = 2
PROGRESS_FILE_EVERY_S = 5.0
WAIT_TICK_S = 1.0
MAX_STARTUP_FAILURES = 3
# An actor whose shards fail this many times in a row is replaced: its state may be
# broken (a dead encode process pool, a sticky CUDA error) and would fail every shard.
MAX_FAILURES_IN_A_ROW = 2


class JobError(SegbatchError, RuntimeError):
    """The job cannot start or go on; the message names the cause and the fix."""

    exit_code = 2  # the CLI's status for it, as before errors.SegbatchError carried one


@dataclass
class Progress:
    """What the progress bar, the progress lines and `segbatch status` show."""

    total: int
    done: int = 0
    errors: int = 0
    shards_total: int = 0
    shards_done: int = 0
    shards_failed: int = 0
    workers: int = 0
    started: float = field(default_factory=time.time)
    done_at_start: int = 0
    message: str = ""

    @property
    def rate(self) -> float:
        """Images per second in this run."""
        elapsed = time.time() - self.started
        return (self.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "done": self.done,
            "errors": self.errors,
            "shards_total": self.shards_total,
            "shards_done": self.shards_done,
            "shards_failed": self.shards_failed,
            "workers": self.workers,
            "images_per_s": round(self.rate, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "started": self.started,
            "updated": time.time(),
            "message": self.message,
        }


@dataclass
class JobResult:
    progress: Progress
    failed: dict[int, str]  # shard id -> last error
    summary: dict[str, Any]
    failed_scenes: dict[str, str] = field(default_factory=dict)  # tiled scene URI -> why it was not merged

    @property
    def complete(self) -> bool:
        return not self.failed and not self.failed_scenes


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


class _Unready:
    """How long the pool has gone without a ready worker.

    Measured from when the last ready worker went (or the pool started), so
    losing every worker hours into a job gives the replacements the whole
    ``--startup-timeout`` to start, as the first workers had.
    """

    def __init__(self, now: float):
        self.since: float | None = now
        self.warned = False

    def waited(self, any_ready: bool, now: float) -> float:
        """Seconds without a ready worker, as of ``now`` (0 while one is ready)."""
        if any_ready:
            self.since, self.warned = None, False
            return 0.0
        if self.since is None:
            self.since = now
        return now - self.since


def prepare(cfg: JobConfig, storage: Storage) -> tuple[JobStore, ModelSpec, str, list[Shard]]:
    """Resolve the model, check DEST, write or read the plan.

    Returns the store, the model spec, the result key and all shards.
    """
    spec = resolve_model(cfg.model, storage.read_bytes)
    fields = {**spec.result_fields(cfg.model), **cfg.result_fields()}
    key = result_key(fields)
    store = JobStore(cfg.dest, storage, tiled=bool(cfg.tile_size))
    store.finish_clear()  # the caller holds DEST's lease: only now may a cut-short clear be finished
    previous = store.read_config()
    if previous is not None and previous.get("result_key") != key:
        if not cfg.overwrite:
            raise JobError(
                f"{cfg.dest} holds results made with other options that change rows "
                f"({describe_change(previous.get('result_fields', {}), fields)}); resuming would mix rows made "
                "two ways in one dataset. Run with the previous options, use another DEST, or add --overwrite "
                "to start over"
            )
        log.warning("--overwrite: removing the previous results in %s", cfg.dest)
        store.clear()
        previous = None
    elif previous is not None and cfg.overwrite:
        store.clear()
        previous = None

    uris = list_sources(cfg.source, storage, dest=cfg.dest, semantic_out=cfg.semantic_out)
    if cfg.tile_size:
        uris = _tile_items(cfg, store, uris)
    planned = store.read_plan()
    if planned is None:
        store.write_plan(uris, cfg.shard_size)
        shards = make_shards(uris, cfg.shard_size)
    else:
        # a rerun: resume the plan, plus shards for images that arrived since (by URI)
        shards, _ = planned
        known = {u for s in shards for u in s.uris}
        new = [u for u in uris if u not in known]
        if new:
            shards = shards + store.extend_plan(new, cfg.shard_size)
    store.write_config(
        {
            "result_key": key,
            "result_fields": fields,
            "job": cfg.to_json(),
            "segbatch_version": __version__,
        }
    )
    return store, spec, key, shards


def _tile_items(cfg: JobConfig, store: JobStore, scenes: list[str]) -> list[str]:
    """Every tile of every scene, as work items; each new scene's header is read
    (in parallel, a few small reads each) and kept in DEST/_segbatch/scenes.json."""
    from concurrent.futures import ThreadPoolExecutor

    known = store.read_scenes()
    new = [u for u in scenes if u not in known]
    options = TileOptions(cfg.tile_size, cfg.tile_overlap, cfg.bands, cfg.scale)

    def header(uri: str) -> dict[str, Any]:
        try:
            return raster_info(uri, store.storage, options).to_json()
        except BandsError as exc:  # the user's to fix; any other ValueError (a CRS GDAL cannot
            # write as WKT, say) is the scene's, and costs its row
            raise JobError(str(exc)) from None
        except Exception as exc:  # a damaged or missing scene costs its row, not the job
            error = {"error": f"cannot read raster: {type(exc).__name__}: {store.storage.redact(str(exc))}"}
            return {**error, "transient": True} if isinstance(exc, StorageFault) or is_transient(exc) else error

    if new:
        with ThreadPoolExecutor(16) as pool:
            read = dict(zip(new, pool.map(header, new)))
        # storage that kept failing is no fault of the scene: never kept, so a rerun reads it again
        lost = {uri: info["error"] for uri, info in read.items() if info.get("transient")}
        known.update((uri, info) for uri, info in read.items() if uri not in lost)
        store.write_scenes(known)
        if lost:
            uri, error = next(iter(lost.items()))
            raise StorageFault(  # the store's fault, not the scenes': exit 1, and a rerun reads them again
                f"{len(lost)} rasters could not be read, storage kept failing (a rerun tries again); the first: {uri}: {error}",
                uri,
            )
    items = []
    for uri in scenes:
        info = known[uri]
        if "error" not in info:
            items += [tile_item(uri, w) for w in plan_windows(info["width"], info["height"], cfg.tile_size, cfg.tile_overlap)]
    log.info("%d scenes in %d tiles of %d pixels", len(scenes), len(items), cfg.tile_size)
    return items


def run_job(cfg: JobConfig, on_progress: Callable[[Progress], None] | None = None) -> JobResult:
    """Run (or resume) the job ``cfg`` describes; see the module docstring.

    The whole run holds DEST's lease (``lease.py``): one driver per DEST.
    """
    storage = Storage(cfg.storage_options, retries=cfg.io_retries)
    with Lease(cfg.dest, storage) as lease:
        result = _run_holding_lease(cfg, storage, on_progress)
    if lease.lost:
        raise DestInUse(  # exit 1: the job did not finish, and the same command resumes
            f"another driver took over {cfg.dest} while this one stalled (its lease went unrenewed); both may have "
            "written there. Once that driver has finished, run the same command again: it resumes"
        )
    return result


def _run_holding_lease(cfg: JobConfig, storage: Storage, on_progress: Callable[[Progress], None] | None) -> JobResult:
    store, spec, key, shards = prepare(cfg, storage)
    committed = store.committed()
    todo = deque(s for s in shards if s.id not in committed)
    progress = Progress(total=sum(len(s.uris) for s in shards), shards_total=len(shards))
    progress.done = progress.done_at_start = sum(len(s.uris) for s in shards if s.id in committed)
    progress.shards_done = len(shards) - len(todo)
    failed: dict[int, str] = {}
    stopped = None  # the StoreUnavailable storage stopped the job with (policy.StoreFaults)
    scenes = store.read_scenes() if cfg.tile_size else None
    if todo:
        _ensure_ray(cfg)
        pool = _Pool(cfg, spec, key, progress, on_progress, store, scenes)
        failed = pool.run(todo)
        stopped = pool.store_faults.error() if pool.stopped else None
    failed_scenes: dict[str, str] = {}
    if scenes is not None and stopped is None:
        failed_scenes = _merge_scenes(cfg, store, scenes, shards, results_metadata(cfg, spec, key), progress, on_progress)
        failed_scenes = _unmerged(store, scenes, failed_scenes)
    _clear_tmp(store)
    failed = _uncommitted(store, shards, failed)
    finished = "finished" if not failed and not failed_scenes else _failures_text(failed, failed_scenes)
    progress.message = str(stopped) if stopped else finished
    summary = _summary(store, progress, failed, shards, failed_scenes if scenes is not None else None, len(scenes or ()))
    if cfg.count_by and not failed and not failed_scenes:
        from segbatch.outputs import count_table

        storage.write_parquet(count_table(cfg.dest, storage, cfg.count_by), store.counts_url())
    store.write_summary(summary)
    store.write_progress(progress.to_json())
    if on_progress:
        on_progress(progress)
    if stopped is not None:
        raise stopped  # one message naming the fix; nothing of it became a row, and a rerun resumes
    return JobResult(progress, failed, summary, failed_scenes)


def _uncommitted(store: JobStore, shards: list[Shard], failed: dict[int, str]) -> dict[int, str]:
    """The shards of the plan without a commit record, with why: the records,
    not what the driver counted, say whether the job is complete (a record
    whose write was lost is a shard to run again; one written by an attempt
    the driver gave up on is a shard done)."""
    committed = store.committed()
    lost = [s.id for s in shards if s.id not in committed and s.id not in failed]
    if lost:
        log.error(
            "%d shards reported committed have no commit record in %s (the first: shard %d)", len(lost), store, lost[0]
        )
    why = "its worker reported it committed, but DEST holds no commit record for it; a rerun runs it again"
    return {**{sid: e for sid, e in failed.items() if sid not in committed}, **{sid: why for sid in lost}}


def _unmerged(store: JobStore, scenes: dict[str, dict], failed_scenes: dict[str, str]) -> dict[str, str]:
    """The scenes without a merge record, with why (as ``_uncommitted``)."""
    merged = store.merged_scenes()
    why = "its merge was reported done, but DEST holds no record of it; a rerun merges it again"
    return {uri: failed_scenes.get(uri, why) for uri in sorted(scenes) if store.scene_id(uri) not in merged}


def _clear_tmp(store: JobStore) -> None:
    """Remove what failed or killed attempts left in tmp/: no actor or merge task
    of this job runs now, so nothing there is still being written."""
    try:
        store.clear_tmp()
    except Exception as exc:  # leftovers cost space, not results: the next run tries again
        log.warning("cannot remove temporary files: %s", exc)


def _failures_text(failed: dict[int, str], failed_scenes: dict[str, str]) -> str:
    parts = [f"{len(failed)} shards failed"] if failed else []
    return ", ".join(parts + ([f"{len(failed_scenes)} scenes not merged"] if failed_scenes else []))


def _merge_scenes(
    cfg: JobConfig, store: JobStore, scenes: dict[str, dict], shards: list[Shard], metadata: dict[str, Any],
    progress: Progress, on_progress: Callable[[Progress], None] | None,
) -> dict[str, str]:
    """Merge every scene whose tiles are all committed (Ray tasks, retried);
    returns the scenes left unmerged, with why."""
    parts: dict[str, set[int]] = {uri: set() for uri in scenes}
    for shard in shards:
        for item in shard.uris:
            parts[parse_tile_item(item)[0]].add(shard.id)
    committed, merged = store.committed(), store.merged_scenes()
    failed: dict[str, str] = {}
    todo = []
    for uri in sorted(scenes):
        if store.scene_id(uri) in merged:
            continue
        if parts[uri] <= committed:
            todo.append(uri)
        else:
            failed[uri] = f"{len(parts[uri] - committed)} of its {len(parts[uri])} tile shards are not committed"
    if not todo:
        return failed
    _ensure_ray(cfg)
    attempts: dict[str, int] = {}
    running: dict[Any, str] = {}  # ObjectRefGenerator -> scene
    limit = max(1, int(ray.cluster_resources().get("CPU", 1)))
    done = 0
    # the shard phase's guards: a merge not started in --startup-timeout, one silent for --stall-timeout
    waiting: StallGuard[Any] = StallGuard(cfg.startup_timeout_s)
    stalls: StallGuard[Any] = StallGuard(cfg.stall_timeout_s)

    def submit(uri: str) -> None:
        urls = [store.data_url(sid) for sid in sorted(parts[uri])]
        gen = merge_scene.remote(cfg, uri, scenes[uri], urls, metadata)
        running[gen] = uri
        waiting.beat(gen)

    def retry(gen: Any, error: str) -> None:
        uri = running.pop(gen)
        waiting.forget(gen)
        stalls.forget(gen)
        attempts[uri] = attempts.get(uri, 0) + 1
        if attempts[uri] > cfg.retries:
            failed[uri] = error
            log.error("scene %s could not be merged: %s", uri, error)
        else:
            log.warning(
                "merging scene %s failed (attempt %d of %d), retrying: %s", uri, attempts[uri], cfg.retries + 1, error
            )
            queue.append(uri)

    queue = deque(todo)
    try:
        while queue or running:
            while queue and len(running) < limit:
                submit(queue.popleft())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_TICK_S, fetch_local=False)
            for gen in ready:
                try:
                    event = ray.get(next(gen))
                except StopIteration:  # ended without its record: not merged
                    retry(gen, "the merge task ended without committing")
                    continue
                except ray.exceptions.RayError as exc:  # the task raised, its worker died or ran out of memory
                    retry(gen, _cause(exc))
                    continue
                if event.get("event") == "started":
                    waiting.forget(gen)
                    stalls.beat(gen)
                else:
                    running.pop(gen)
                    stalls.forget(gen)
                    done += 1
            for gen in stalls.stalled():
                ray.cancel(gen, force=True)  # kills its worker process: a hung read holds no CPU after this
                retry(gen, f"merging made no progress for {cfg.stall_timeout_s:.0f} s (--stall-timeout)")
            if waiting.stalled():
                raise JobError(
                    f"no merge task started within {cfg.startup_timeout_s:.0f} s (--startup-timeout): "
                    f"{_pending_reason(1, 0)}"
                )
            progress.message = f"merged {done} of {len(todo)} scenes"
            if on_progress:
                on_progress(progress)
    finally:
        for gen in running:  # the job raised: no merge outlives it
            ray.cancel(gen, force=True)
    return failed


def _ensure_ray(cfg: JobConfig) -> None:
    if ray.is_initialized():
        return
    # address None: join the cluster of a Ray job (RAY_ADDRESS) or start one locally.
    # "local", not None: ray.init(None) would join whatever `ray start` cluster
    # this machine last ran, which _check_fits (and the contract) take as local.
    address = cfg.address or (None if os.environ.get("RAY_ADDRESS") else "local")
    ray.init(address=address, log_to_driver=True, configure_logging=False)


def _summary(
    store: JobStore, progress: Progress, failed: dict[int, str], shards: list[Shard], failed_scenes: dict[str, str] | None,
    num_scenes: int = 0,
) -> dict[str, Any]:
    """What the run did; for a tiled job (``failed_scenes`` not None) rows are
    its ``num_scenes`` scenes and the tiles are counted beside them."""
    records = store.commit_records()
    results = records if failed_scenes is None else store.scene_records()
    extra: dict[str, Any] = {}
    if failed_scenes is not None:
        extra = {"tiles": progress.total, "scenes": num_scenes, "failed_scenes": dict(sorted(failed_scenes.items()))}
    return {
        "complete": not failed and len(records) == len(shards) and not failed_scenes,
        "images": progress.total if failed_scenes is None else extra["scenes"],
        "rows": sum(r.get("rows", 0) for r in results),
        "errors": sum(r.get("errors", 0) for r in results),
        "detections": sum(r.get("detections", 0) for r in results),
        "shards": len(shards),
        "shards_committed": len(records),
        "failed_shards": {str(k): v for k, v in sorted(failed.items())},
        **extra,
        "wall_s": round(time.time() - progress.started, 3),
        "finished": time.time(),
        "images_per_s_this_run": round(progress.rate, 3),
        "images_this_run": progress.done - progress.done_at_start,
        "segbatch_version": __version__,
    }


class _Pool:
    """A pool of SegmentWorker actors pulling shards from a queue."""

    def __init__(self, cfg, spec, key, progress, on_progress, store, scenes=None):
        self.cfg = cfg
        self.scenes = scenes  # a tiled job's scene headers: each shard gets those of its tiles
        self.progress = progress
        self.on_progress = on_progress
        self.store = store
        self.spec_ref = ray.put(spec)  # one copy of the weights in the object store, not one per actor
        self.key = key
        self.num_cpus, self.num_gpus, self.size = _pool_shape(cfg)
        self.attempts: dict[int, int] = {}
        self.workers: list[_Worker] = []
        self.startup_failures = 0
        self.last_startup_error = ""
        self.unready = _Unready(time.monotonic())
        self.last_progress_file = 0.0
        self.stalls: StallGuard[_Task] = StallGuard(cfg.stall_timeout_s)  # per task: a sibling's progress hides nothing
        self.hunt = PoisonHunt()
        self.store_faults = StoreFaults()
        self.stopped: str | None = None  # why storage stopped the job (StoreFaults)

    def _start_worker(self) -> None:
        actor_cls = ray.remote(SegmentWorker).options(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=INFLIGHT_PER_WORKER,
            # host memory in bytes (model + images in flight): Ray places no more workers on a node than fit
            memory=worker_memory_bytes(self.cfg.batch_size, self.cfg.io_threads, self.cfg.max_pixels, INFLIGHT_PER_WORKER),
        )
        handle = actor_cls.remote(self.cfg, self.spec_ref, self.key)
        self.workers.append(_Worker(handle, handle.info.remote()))

    def run(self, todo: deque) -> dict[int, str]:
        """Run the shards of ``todo``; returns those that failed for good, with why.

        When storage stops the job (``stopped``), every shard left is among them."""
        try:
            return self._run(todo)
        finally:
            # also when the job raises (run_job used as a library): no actor outlives it
            for w in self.workers:
                ray.kill(w.handle, no_restart=True)

    def _run(self, shards: deque) -> dict[int, str]:
        self.todo: deque[_Unit] = deque(_Unit(s) for s in shards)
        self.alone: deque[_Unit] = deque()  # suspects and probes: each on an actor with no other task
        failed: dict[int, str] = {}
        for _ in range(self.size):
            self._start_worker()
        log.info("pool: %d workers x (%s CPU, %s GPU)", self.size, self.num_cpus, self.num_gpus)
        while any(w.tasks for w in self.workers) or (not self.stopped and (self.todo or self.alone)):
            self._check_startup()
            for w in self.workers:
                self._fill(w)
            waitables = [w.ready_ref for w in self.workers if not w.ready] + [
                t.gen for w in self.workers for t in w.tasks
            ]
            ready, _ = ray.wait(waitables, num_returns=1, timeout=WAIT_TICK_S, fetch_local=False)
            for w in list(self.workers):
                if not w.ready and w.ready_ref in ready:
                    self._on_ready(w)
                for task in list(w.tasks):
                    if task.gen in ready and task in w.tasks:  # not requeued by a replacement
                        self._on_task_event(w, task, failed)
            self._check_stalls(failed)
            self.progress.workers = sum(w.ready for w in self.workers)
            self._report()
        if self.stopped:
            for unit in [*self.alone, *self.todo]:
                failed.setdefault(unit.shard.id, self.stopped)
        return failed

    def _fill(self, w: _Worker) -> None:
        """Give a ready actor tasks up to ``INFLIGHT_PER_WORKER``; a suspect or a
        probe only to an actor with none, and nothing beside it."""
        while w.ready and not self.stopped and len(w.tasks) < INFLIGHT_PER_WORKER and not any(t.alone for t in w.tasks):
            if self.alone and not w.tasks:
                self._submit(w, self.alone.popleft(), alone=True)
            elif self.todo and not self.alone:  # with a suspect waiting, let this actor drain for it
                self._submit(w, self.todo.popleft(), alone=False)
            else:
                return

    def _submit(self, w: _Worker, unit: _Unit, alone: bool) -> None:
        shard = unit.shard
        if unit.probe is not None:
            gen = w.handle.process.remote(shard.id, list(unit.probe.uris), self._scenes_of(shard), None, True)
        else:
            poison = self.hunt.poison_of(shard.id)  # images that killed an actor on their own: error rows, never read
            gen = w.handle.process.remote(shard.id, list(shard.uris), self._scenes_of(shard), poison)
        task = _Task(unit, gen, alone)
        w.tasks.append(task)
        self.stalls.beat(task)

    def _requeue(self, unit: _Unit) -> None:
        """Back to the front of its queue: probes and suspects run alone."""
        alone = unit.probe is not None or self.hunt.alone(unit.shard.id)
        (self.alone if alone else self.todo).appendleft(unit)

    def _scenes_of(self, shard: Shard) -> dict[str, dict] | None:
        if self.scenes is None:
            return None
        return {uri: self.scenes[uri] for uri in {parse_tile_item(item)[0] for item in shard.uris}}

    # -- events ---------------------------------------------------------------

    def _on_ready(self, w: _Worker) -> None:
        try:
            info = ray.get(w.ready_ref)
        except RayActorError as exc:
            self._worker_died(w, f"worker failed to start: {_cause(exc)}", {}, startup=True)
            return
        w.ready = True
        self.startup_failures = 0  # counted in a row: failures hours apart say nothing of each other
        log.info("worker ready on node %s (%s, %s)", info["node"][:8], info["host"], info["device"])

    def _on_task_event(self, w: _Worker, task: _Task, failed: dict) -> None:
        try:
            ref = next(task.gen)
            event = ray.get(ref)
        except StopIteration:
            self._end(w, task)
            return
        except RayActorError as exc:
            self._worker_died(w, f"worker died: {_cause(exc)}", failed)
            return
        except RayTaskError as exc:
            self._task_raised(w, task, exc, failed)
            return
        self.stalls.beat(task)
        probe = task.unit.probe
        if probe is not None:
            if event["event"] == "probed":
                self._end(w, task)
                self.hunt.probe_passed(probe)
                self._after_probe(task.shard)
        elif event["event"] == "progress":
            self._count(task, event["images"], event["errors"])
        elif event["event"] == "committed":
            self._count(task, len(task.shard.uris), event["errors"])
            self.progress.shards_done += 1
            self._end(w, task)
            w.shard_committed()
            self.hunt.committed(task.shard.id)

    def _end(self, w: _Worker, task: _Task) -> None:
        if task in w.tasks:
            w.tasks.remove(task)
        self.stalls.forget(task)

    def _task_raised(self, w: _Worker, task: _Task, exc: RayTaskError, failed: dict) -> None:
        """A task raised: its shard is charged; its actor is replaced only for
        faults of its own, never for the store's."""
        self._end(w, task)
        cause = getattr(exc, "cause", None)
        fault = cause if isinstance(cause, StorageFault) else None
        if fault is not None and self.store_faults.record(fault) and not self.stopped:
            self._stop(self.store_faults.stop)
        if task.unit.probe is not None:  # it raised rather than kill its actor: not what the probe looks for
            log.warning("a probe of shard %d raised: %s", task.shard.id, _cause(exc))
            self.hunt.probe_passed(task.unit.probe)
            self._after_probe(task.shard)
        else:
            self._shard_failed(task, _cause(exc), failed)
        if fault is None and w.shard_failed():
            self._replace(w, f"worker failed {w.failures_in_a_row} shards in a row, the last with {_cause(exc)}")

    def _stop(self, message: str) -> None:
        """Storage refuses the job as a whole: schedule nothing more, let the running shards end."""
        self.stopped = message
        self.progress.message = message
        log.error("stopping: %s", message)

    def _count(self, task: _Task, images: int, errors: int) -> None:
        self.progress.done += images - task.images
        self.progress.errors += errors - task.errors
        task.images, task.errors = images, errors

    def _uncount(self, task: _Task) -> None:
        self._count(task, 0, 0)

    def _shard_failed(self, task: _Task, error: str, failed: dict) -> None:
        self._uncount(task)
        n = self.attempts.get(task.shard.id, 0) + 1
        self.attempts[task.shard.id] = n
        if n > self.cfg.retries:
            log.error("shard %d failed %d times, giving up: %s", task.shard.id, n, error)
            failed[task.shard.id] = error
            self.progress.shards_failed += 1
        else:
            log.warning("shard %d failed (attempt %d of %d), retrying: %s", task.shard.id, n, self.cfg.retries + 1, error)
            self._requeue(task.unit)

    def _worker_died(
        self, w: _Worker, error: str, failed: dict, culprit: _Task | None = None, startup: bool = False
    ) -> None:
        """An actor is gone (it died, or was killed for ``culprit``'s stall).

        Only the task it died of is charged: ``culprit``, or its only task. A
        death beside other tasks says nothing of which one caused it: they all
        become suspects, uncharged, rerun alone (``PoisonHunt``)."""
        tasks = list(w.tasks)
        for task in tasks:
            self._uncount(task)
            self.stalls.forget(task)
        w.tasks.clear()
        self._retire(w)
        stalled = culprit is not None
        if culprit is None and len(tasks) == 1:
            culprit = tasks[0]
        for task in tasks:
            if task is culprit:
                self._charge_death(task, error, failed, stalled)
            elif task.unit.probe is not None:
                self._requeue(task.unit)
            else:
                self.hunt.died_beside_others(task.shard.id)
                log.warning(
                    "shard %d ran beside others on an actor that went (%s): rerunning it alone, uncharged",
                    task.shard.id,
                    error,
                )
                self._requeue(task.unit)
        if startup:
            self.startup_failures += 1
            self.last_startup_error = error
            if self.startup_failures >= MAX_STARTUP_FAILURES and not any(x.ready for x in self.workers):
                raise JobError(f"{self.startup_failures} workers failed to start; the last said: {error}")
        if self.stopped:  # nothing more will be scheduled
            log.warning("%s", error)
            return
        log.warning("%s; starting a replacement", error)
        self._start_worker()

    def _charge_death(self, task: _Task, error: str, failed: dict, stalled: bool) -> None:
        """``task`` alone is to blame for its actor's end: charge it, or hunt its poison."""
        shard, probe = task.shard, task.unit.probe
        if probe is not None:  # a probe's stall is a death too: it is how an image stops an actor
            self._probed(shard, self.hunt.probe_died(probe))
            return
        probes = None if stalled else self.hunt.died_alone(shard.id, list(shard.uris))
        if probes is None:
            self._shard_failed(task, error, failed)
            return
        images = sum(len(p.uris) for p in probes)
        log.warning("shard %d killed its actor again on its own (%s): probing its %d images", shard.id, error, images)
        self._probed(shard, probes)

    def _probed(self, shard: Shard, probes: list[Probe]) -> None:
        for probe in reversed(probes):
            self._requeue(_Unit(shard, probe))
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
        self._requeue(_Unit(shard))

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
            self._uncount(task)
            self.stalls.forget(task)
            self._requeue(task.unit)
        w.tasks.clear()

    def _check_stalls(self, failed: dict) -> None:
        """Kill the actor of a task silent for ``stall_timeout_s``, charging that task."""
        for task in self.stalls.stalled():
            w = next((x for x in self.workers if task in x.tasks), None)
            if w is None:
                continue  # its actor went for another of its tasks in this same pass
            why = f"worker made no progress on shard {task.shard.id} for {self.cfg.stall_timeout_s:.0f} s"
            self._worker_died(w, why, failed, culprit=task)

    def _check_startup(self) -> None:
        """Never a silent hang: say why no worker starts, and give up in time."""
        waited = self.unready.waited(any(w.ready for w in self.workers), time.monotonic())
        if waited > 30 and not self.unready.warned:
            self.unready.warned = True
            self.progress.message = _pending_reason(self.num_cpus, self.num_gpus)
            log.warning("no worker has been ready for %.0f s: %s", waited, self.progress.message)
        if waited > self.cfg.startup_timeout_s:
            raise JobError(
                f"no worker started within {self.cfg.startup_timeout_s:.0f} s (--startup-timeout): "
                f"{_pending_reason(self.num_cpus, self.num_gpus)}"
            )

    def _report(self) -> None:
        if self.on_progress:
            self.on_progress(self.progress)
        now = time.monotonic()
        if now - self.last_progress_file >= PROGRESS_FILE_EVERY_S:
            self.last_progress_file = now
            try:
                self.store.write_progress(self.progress.to_json())
            except Exception as exc:  # progress is advisory; the job goes on
                log.warning("cannot write progress: %s", exc)


def _pool_shape(cfg: JobConfig) -> tuple[float, float, int]:
    """(CPUs per worker, GPUs per worker, number of workers) for this cluster."""
    resources = ray.cluster_resources()
    total_cpus = resources.get("CPU", 0)
    total_gpus = resources.get("GPU", 0)
    use_gpu = cfg.model.device != "cpu" and cfg.gpus_per_worker > 0 and (total_gpus > 0 or cfg.model.device == "cuda")
    if use_gpu:
        num_gpus = cfg.gpus_per_worker
        num_cpus = cfg.cpus_per_worker or _cpus_beside_a_gpu(num_gpus)
        size = cfg.workers or max(1, int(total_gpus // num_gpus))
    else:
        num_gpus = 0
        num_cpus = cfg.cpus_per_worker or max(1, min(4, int(total_cpus)))
        size = cfg.workers or max(1, int(total_cpus // num_cpus))
    _check_fits(cfg, num_cpus, num_gpus)
    return num_cpus, num_gpus, size


def _cpus_beside_a_gpu(gpus_per_worker: float) -> float:
    """CPUs for a GPU worker: its share of the leanest GPU node's CPUs, 1 to 8.

    A GPU worker reads, decodes and encodes on CPUs while the GPU runs the
    model (about 30 ms of CPU an image beside a few ms of GPU): one CPU would
    starve the GPU, and the node's share leaves room for its other workers.
    """
    shares = [
        n["Resources"]["CPU"] / n["Resources"]["GPU"] * gpus_per_worker
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("GPU", 0) > 0 and n["Resources"].get("CPU", 0) > 0
    ]
    return float(max(1, min(8, int(min(shares))))) if shares else 1.0


def _check_fits(cfg: JobConfig, num_cpus: float, num_gpus: float) -> None:
    """Refuse at once a worker no node of a local Ray could ever host."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = any(
        n["Resources"].get("CPU", 0) >= num_cpus and n["Resources"].get("GPU", 0) >= num_gpus for n in nodes
    )
    # Joining a cluster (--address, or a Ray job's RAY_ADDRESS), an autoscaler
    # may add the nodes: wait up to --startup-timeout, saying why. A Ray
    # started here for this job will never grow: refuse at once.
    joined = cfg.address is not None or bool(os.environ.get("RAY_ADDRESS"))
    if not fits and not joined:
        raise JobError(
            f"each worker asks for {num_cpus:g} CPU and {num_gpus:g} GPU, but no node of this cluster has that "
            f"({_nodes_text(nodes)}). Lower --cpus-per-worker/--gpus-per-worker, use --device cpu, "
            "or add nodes that have them"
        )


def _nodes_text(nodes) -> str:
    return "; ".join(
        f"node {n['NodeManagerAddress']}: {n['Resources'].get('CPU', 0):g} CPU, {n['Resources'].get('GPU', 0):g} GPU"
        for n in nodes
    ) or "no live nodes"


def _pending_reason(num_cpus: float, num_gpus: float) -> str:
    avail = ray.available_resources()
    return (
        f"each worker needs {num_cpus:g} CPU and {num_gpus:g} GPU; the cluster has "
        f"{avail.get('CPU', 0):g} CPU and {avail.get('GPU', 0):g} GPU free now "
        f"({_nodes_text([n for n in ray.nodes() if n.get('Alive')])}). Other jobs may hold them, "
        "or an autoscaler is still adding nodes"
    )


def _cause(exc: Exception) -> str:
    """The first line of a Ray error, which names the underlying exception."""
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # RayTaskError's text ends with the original exception's "Type: message"
    return (lines[-1] if lines else type(exc).__name__)[:500]
