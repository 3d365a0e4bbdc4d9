"""The merge phase of a tiled job: each scene whose tiles are all committed is
merged by a Ray task (``worker.merge_scene_task``), as many at once as the
cluster has CPUs.

A merge that fails is tried again by the rule shards follow (``Retries``,
``--retries``) and reported once given up. The shard phase's guards watch
the tasks (``StallGuard``): a merge silent for ``--stall-timeout`` is
cancelled (its worker process killed) and charged; one no CPU has started
within ``--startup-timeout`` ends the job, saying why.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import ray

from segbatch.config import JobConfig
from segbatch.geo import parse_tile_item

from .plan import Shard
from .policy import JobError, Retries, StallGuard
from .pool import WAIT_TICK_S, cause
from .records import MergeStarted, Progress
from .sizing import ensure_ray, pending_reason
from .store import JobStore
from .worker import merge_scene_task

log = logging.getLogger(__name__)


def tile_shards(scenes: dict[str, dict], shards: list[Shard]) -> dict[str, set[int]]:
    """Each scene's shards: those that hold its tiles."""
    parts: dict[str, set[int]] = {uri: set() for uri in scenes}
    for shard in shards:
        for item in shard.uris:
            parts[parse_tile_item(item)[0]].add(shard.id)
    return parts


def merge_scenes(
    cfg: JobConfig,
    store: JobStore,
    scenes: dict[str, dict],
    shards: list[Shard],
    metadata: dict[str, Any],
    progress: Progress,
    on_progress: Callable[[Progress], None] | None,
) -> dict[str, str]:
    """Merge every scene whose tiles are all committed and that has no merge
    record yet; returns the scenes left unmerged, with why."""
    parts = tile_shards(scenes, shards)
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
    if todo:
        ensure_ray(cfg)
        merges = _SceneMerges(cfg, store, scenes, parts, metadata, failed)
        merges.run(todo, progress, on_progress)
    return failed


class _SceneMerges:
    """The merge tasks in flight, their guards and their retries."""

    def __init__(
        self,
        cfg: JobConfig,
        store: JobStore,
        scenes: dict[str, dict],
        parts: dict[str, set[int]],
        metadata: dict[str, Any],
        failed: dict[str, str],
    ):
        self.cfg, self.store, self.scenes, self.parts, self.metadata = cfg, store, scenes, parts, metadata
        self.failed = failed
        self.retries: Retries[str] = Retries(cfg.retries)
        self.running: dict[Any, str] = {}  # ObjectRefGenerator -> scene
        self.queue: deque[str] = deque()
        # the shard phase's guards: a merge not started in --startup-timeout, one silent for --stall-timeout
        self.waiting: StallGuard[Any] = StallGuard(cfg.startup_timeout_s)
        self.stalls: StallGuard[Any] = StallGuard(cfg.stall_timeout_s)

    def run(self, todo: list[str], progress: Progress, on_progress: Callable[[Progress], None] | None) -> None:
        limit = max(1, int(ray.cluster_resources().get("CPU", 1)))
        done = 0
        self.queue.extend(todo)
        try:
            while self.queue or self.running:
                while self.queue and len(self.running) < limit:
                    self._submit(self.queue.popleft())
                ready, _ = ray.wait(list(self.running), num_returns=1, timeout=WAIT_TICK_S, fetch_local=False)
                for gen in ready:
                    done += self._on_event(gen)
                for gen in self.stalls.stalled():
                    ray.cancel(gen, force=True)  # kills its worker process: a hung read holds no CPU after this
                    silent = f"merging made no progress for {self.cfg.stall_timeout_s:.0f} s (--stall-timeout)"
                    self._failed(gen, silent)
                if self.waiting.stalled():
                    raise JobError(
                        f"no merge task started within {self.cfg.startup_timeout_s:.0f} s (--startup-timeout): "
                        f"{pending_reason(1, 0)}"
                    )
                progress.message = f"merged {done} of {len(todo)} scenes"
                if on_progress:
                    on_progress(progress)
        finally:
            for gen in self.running:  # the job raised: no merge outlives it
                ray.cancel(gen, force=True)

    def _submit(self, uri: str) -> None:
        urls = [self.store.data_url(sid) for sid in sorted(self.parts[uri])]
        gen = merge_scene_task.remote(self.cfg, uri, self.scenes[uri], urls, self.metadata)
        self.running[gen] = uri
        self.waiting.beat(gen)

    def _on_event(self, gen: Any) -> int:
        """Handle the merge's next event; returns 1 when it committed its scene, else 0."""
        try:
            event = ray.get(next(gen))
        except StopIteration:  # ended without its record: not merged
            self._failed(gen, "the merge task ended without committing")
            return 0
        except ray.exceptions.RayError as exc:  # the task raised, its worker died or ran out of memory
            self._failed(gen, cause(exc))
            return 0
        if isinstance(event, MergeStarted):
            self.waiting.forget(gen)
            self.stalls.beat(gen)
            return 0
        self.running.pop(gen)
        self.stalls.forget(gen)
        return 1

    def _failed(self, gen: Any, error: str) -> None:
        """The merge of ``gen`` failed: merged again, or given up (``Retries``)."""
        uri = self.running.pop(gen)
        self.waiting.forget(gen)
        self.stalls.forget(gen)
        n = self.retries.failed(uri)
        if self.retries.given_up(uri):
            self.failed[uri] = error
            log.error("scene %s could not be merged: %s", uri, error)
        else:
            log.warning("merging scene %s failed (attempt %d of %d), retrying: %s", uri, n, self.retries.tries, error)
            self.queue.append(uri)
