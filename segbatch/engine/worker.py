"""The Ray actor: a shard in, a committed Parquet file out; and the Ray task
that merges a tiled scene once its tiles are committed.

Each actor builds its model once (on its GPU when Ray gave it one) and
keeps it resident. ``process`` is a streaming generator: it yields progress
events while it works and the commit record last (``records.py``), so the
driver sees a live worker, can time out a stuck one, and counts images as
they finish.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import ray

from segbatch import __version__, schema
from segbatch.config import JobConfig
from segbatch.geo import RasterInfo, image_object_tables, is_tiff, read_georef
from segbatch.model import ModelSpec, Segmenter, build_model
from segbatch.storage import Storage

from .coverage import coverage_of
from .metrics import WorkerRate, error_causes
from .pipeline import ShardProcessor, TileReading
from .records import CommitRecord, Committed, MergeStarted, Probed, Progressed
from .scene_merge import commit_unreadable, merge_and_commit
from .store import JobStore

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0


class SegmentWorker:
    """Holds one model; processes shards one after another."""

    def __init__(self, job: JobConfig, spec: ModelSpec, result_key: str):
        self.job = job
        self.storage = Storage(job.storage_options, retries=job.io_retries)
        self.store = JobStore(job.dest, self.storage, tiled=bool(job.tile_size))
        loaded = build_model(spec, job.model)
        self.segmenter = Segmenter(loaded, job.model)
        self.processor = ShardProcessor(
            self.segmenter,
            self.storage,
            batch_size=job.batch_size,
            max_bytes=job.max_bytes,
            max_pixels=job.max_pixels,
            io_threads=job.io_threads,
            encode_processes=job.encode_processes,
            gpu_jpeg={"auto": None, "cpu": False, "gpu": True}[job.decode],
            cpus=ray.get_runtime_context().get_assigned_resources().get("CPU"),
            semantic_out=job.semantic_out,
        )
        self.metadata = results_metadata(job, spec, result_key)
        self.polygons = job.polygon_options()
        self.rate = WorkerRate(job.dest)  # its images/s, a Ray metric

    def info(self) -> dict[str, Any]:
        """Where this worker runs: answered once the model is loaded."""
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.segmenter.device),
        }

    def process(
        self,
        shard_id: int,
        uris: list[str],
        scenes: dict[str, dict] | None = None,
        poison: list[str] | None = None,
        probe: bool = False,
    ) -> Iterator[Progressed | Committed | Probed]:
        """Segment a shard, write its file under a temporary name, commit it.

        scenes: for a shard of tiles, the header (``RasterInfo``) of each of
        its scenes. poison: URIs (of ``uris``) that killed an actor on their
        own (the driver's bisection): never read, each gets an error row.
        probe: only run the pipeline, to learn whether ``uris`` kill this
        actor; nothing is written. Yields ``Progressed`` now and then, and
        finally ``Committed`` with the commit record (or ``Probed``).
        """
        started = time.time()
        last = 0.0
        rows: list[dict[str, Any]] = []
        tiles = None
        if scenes is not None:
            tiles = TileReading({uri: RasterInfo.from_json(d) for uri, d in scenes.items()}, self.job.bands)
        skipped = set(poison or ())
        seen = 0
        self.rate.started()
        try:
            for stats in self.processor.stream([u for u in uris if u not in skipped], rows, tiles):
                self.rate.add(stats.images - seen)
                seen = stats.images
                if time.monotonic() - last >= PROGRESS_EVERY_S:
                    last = time.monotonic()
                    yield Progressed(shard_id, stats.images, stats.errors)
        finally:
            if tiles is not None:
                tiles.close()  # the scenes its I/O threads kept open between tiles
        if probe:
            yield Probed(shard_id, stats.images)
            return
        if skipped:
            rows += [_poison_row(uri, tiles is not None) for uri in sorted(skipped)]
            rows.sort(key=lambda r: r["uri"])
        errors = stats.errors + len(skipped)
        shard = schema.shard_metadata(shard_id, len(rows), started, time.time(), stats.detections)
        table = schema.rows_to_table(
            rows, {**self.metadata, "shard": shard}, schema=schema.SCHEMA if tiles is None else schema.TILE_SCHEMA
        )
        record = CommitRecord(
            rows=table.num_rows,
            errors=errors,
            detections=stats.detections,
            seconds=round(time.time() - started, 3),
            stage_seconds={k: round(v, 3) for k, v in stats.seconds.items()},
            node=ray.get_runtime_context().get_node_id(),
            pid=os.getpid(),
        )
        write_started = time.monotonic()
        objects = None if tiles is not None else self._objects(rows)
        committed = self.store.commit(shard_id, table, record, objects)
        yield Committed(committed, error_causes(rows), round(time.monotonic() - write_started, 3))

    def _objects(self, rows: list[dict[str, Any]]) -> dict[str, pa.Table]:
        """DEST/objects tables of the shard's georeferenced whole images (TIFFs with a CRS), by CRS
        (``geo.objects``); a shard without one has none."""
        tiffs = [r["uri"] for r in rows if r["status"] == schema.STATUS_OK and is_tiff(r["uri"])]
        if not tiffs:
            return {}
        # their headers, a few small reads each, at once (a pool of its own: the I/O threads may wait for room)
        with ThreadPoolExecutor(min(8, len(tiffs)), thread_name_prefix="segbatch-georef") as pool:
            found = list(pool.map(lambda uri: read_georef(uri, self.storage), tiffs))
        georefs = {uri: g for uri, g in zip(tiffs, found) if g is not None}
        return image_object_tables(rows, georefs, self.polygons) if georefs else {}


POISON_ERROR = "worker died while processing this image"


def _poison_row(uri: str, tiled: bool) -> dict[str, Any]:
    """The row of an image that killed its actor on its own (found by the driver's bisection)."""
    return schema.tile_row(uri, error=POISON_ERROR) if tiled else schema.error_row(uri, POISON_ERROR)


def results_metadata(job: JobConfig, spec: ModelSpec, result_key: str) -> dict[str, Any]:
    """The key-value metadata of every results file of this job; a keypoint model's files add
    ``keypoint_names`` and ``skeleton`` (0-based [i, j] pairs into the names; null when unknown)."""
    metadata = schema.file_metadata(
        model_id=spec.model_id,
        weights_hash=spec.weights_hash,
        result_key=result_key,
        thresholds={
            "score_threshold": job.model.score_threshold,
            "mask_threshold": job.model.mask_threshold,
            "max_detections": job.model.max_detections,
            "min_size": spec.min_size,
            "max_size": spec.max_size,
            "precision": job.model.precision,
            **job.tiling_fields(),
        },
        classes=spec.classes,
        version=__version__,
    )
    if spec.keypoint_names is not None:
        metadata["keypoint_names"] = list(spec.keypoint_names)
        metadata["skeleton"] = [list(pair) for pair in spec.skeleton] if spec.skeleton is not None else None
    return metadata


@ray.remote(num_cpus=1, max_retries=0, num_returns="streaming")
def merge_scene_task(
    job: JobConfig, scene: str, info: dict, part_urls: list[str], metadata: dict
) -> Iterator[MergeStarted | Committed]:
    """Merge a tiled scene whose tiles are all committed, and publish it (``scene_merge.py``).

    Yields ``MergeStarted`` first, so the driver tells a merge that waits
    for a CPU (the startup timeout) from one that hangs (the stall timeout),
    then ``Committed`` with the scene's record.
    """
    yield MergeStarted(os.getpid())
    store = JobStore(job.dest, Storage(job.storage_options, retries=job.io_retries), tiled=True)
    polygons = job.polygon_options()
    if "error" in info:
        record = commit_unreadable(store, scene, info["error"], metadata, polygons)
    else:
        raster = RasterInfo.from_json(info)
        stac_id = info.get("stac_id")  # the scene's STAC item (driver._tile_items), for its objects' rows
        record = merge_and_commit(
            store,
            scene,
            raster,
            part_urls,
            metadata,
            job.semantic_out,
            polygons=polygons,
            stac_id=stac_id,
            coverage=coverage_of(info),
        )
    yield Committed(record)
