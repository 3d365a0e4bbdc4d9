"""The driver on the head node: one job's data flow.

Prepare (``prepare``: the model resolved, DEST checked, SOURCE's listing
begun), plan as SOURCE is listed (``planner.py``) while the actor pool
(``pool.py``) runs the shards without a commit record, merge the scenes of a
tiled job (``scene_tasks.py``), and summarize (``summary.json``). The whole
run holds DEST's lease (``lease.py``).

A shard that fails more than ``retries`` times is reported, never dropped
silently. Whether the job is complete is read from the commit records
against the plan, not from what the driver counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from segbatch import __version__
from segbatch.config import JobConfig, describe_change, result_key
from segbatch.errors import StorageFault
from segbatch.geo import AoiError, BandsError, TileOptions, load_area, plan_windows, raster_info, tile_item
from segbatch.model import ModelSpec, resolve_model
from segbatch.storage import Storage, is_transient, list_sources
from segbatch.storage.sources import Listing, stream_sources
from segbatch.storage.stac import StacAssets, read_stac

from .coverage import kept_windows, plan_coverage, tiles_skipped
from .lease import DestInUse, Lease
from .planner import Planner
from .policy import JobError
from .pool import WorkerPool
from .records import JobResult, JobSummary, Progress
from .scene_tasks import merge_scenes
from .sizing import ensure_ray
from .store import JobStore
from .worker import results_metadata

log = logging.getLogger(__name__)

__all__ = ["JobError", "JobResult", "prepare", "run_job"]


def prepare(cfg: JobConfig, storage: Storage) -> tuple[JobStore, ModelSpec, str, Listing]:
    """Resolve the model, check DEST, list SOURCE (or start to: ``stream_sources``).

    Returns the store, the model spec, the result key and SOURCE's listing,
    which the ``Planner`` makes the plan of (or extends it by).
    """
    spec = resolve_model(cfg.model, storage.read_bytes)
    if spec.keypoint_names is not None and cfg.semantic_out:
        raise JobError(
            f"--semantic-out paints masks, and {cfg.model.model} is a Keypoint R-CNN with none; "
            "leave --semantic-out out, or use a Mask R-CNN"
        )
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

    stac = read_stac(cfg.source, storage, cfg.stac_asset)  # None: SOURCE is not a STAC document
    if stac is None and not cfg.tile_size:
        listing = stream_sources(cfg.source, storage, dest=cfg.dest, semantic_out=cfg.semantic_out)
    else:
        uris = stac.uris if stac else list_sources(cfg.source, storage, dest=cfg.dest, semantic_out=cfg.semantic_out)
        listing = Listing.of(cfg.source, _tile_items(cfg, store, uris, stac) if cfg.tile_size else uris)
    store.write_config(
        {
            "result_key": key,
            "result_fields": fields,
            "job": cfg.to_json(),
            "segbatch_version": __version__,
        }
    )
    return store, spec, key, listing


def _tile_items(cfg: JobConfig, store: JobStore, scenes: list[str], stac: StacAssets | None = None) -> list[str]:
    """Every tile of every scene, as work items; each new scene's header is read
    (in parallel, a few small reads each) and kept in DEST/_segbatch/scenes.json,
    with its STAC item's id (``stac_id``, for its objects' rows) when SOURCE is STAC."""
    from concurrent.futures import ThreadPoolExecutor

    known = store.read_scenes()
    new = [u for u in scenes if u not in known]
    options = TileOptions(cfg.tile_size, cfg.tile_overlap, cfg.bands, cfg.scale)
    area = load_area(cfg.aoi, store.storage) if cfg.aoi and new else None

    def header(uri: str) -> dict[str, Any]:
        info = _header(uri)
        return {**info, "stac_id": stac.ids[uri]} if stac and uri in stac.ids else info

    def _header(uri: str) -> dict[str, Any]:
        if stac and uri in stac.errors:  # an item without the asset: its row says so
            return {"error": stac.errors[uri]}
        try:
            info = raster_info(uri, store.storage, options)
            # which tiles hold data and meet --aoi, decided once: a rerun plans the same tiles
            return {**info.to_json(), **plan_coverage(uri, info, store.storage, cfg, area)}
        except (BandsError, AoiError) as exc:  # the user's to fix; any other ValueError (a CRS GDAL cannot
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
                f"{len(lost)} rasters could not be read, storage kept failing (a rerun tries again); "
                f"the first: {uri}: {error}",
                uri,
            )
    items = []
    for uri in scenes:
        info = known[uri]
        if "error" not in info:
            windows = plan_windows(info["width"], info["height"], cfg.tile_size, cfg.tile_overlap)
            items += [tile_item(uri, w) for w in kept_windows(info, windows)]
    skipped = tiles_skipped({uri: known[uri] for uri in scenes})
    log.info(
        "%d scenes in %d tiles of %d pixels; %d tiles skipped (%d all nodata, %d outside --aoi)",
        len(scenes),
        len(items),
        cfg.tile_size,
        sum(skipped.values()),
        skipped["nodata"],
        skipped["aoi"],
    )
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
    store, spec, key, listing = prepare(cfg, storage)
    committed = store.committed()
    progress = Progress(total=0)
    planner = Planner(store.plan, listing, cfg.shard_size, committed)
    compactor = store.compactor(planner.num_shards, committed)
    compactor.catch_up()
    failed: dict[int, str] = {}
    stopped = None  # the StoreUnavailable storage stopped the job with (policy.StoreFaults)
    scenes = store.read_scenes() if cfg.tile_size else None
    skipped = tiles_skipped(scenes) if scenes else None
    progress.tiles_skipped = sum(skipped.values()) if skipped else 0
    planner.start()
    try:
        if planner.wait():  # a shard to run (none: every shard planned is committed)
            ensure_ray(cfg)
            pool = WorkerPool(cfg, spec, key, progress, on_progress, store, scenes, compactor)
            failed = pool.run(planner)
            stopped = pool.store_faults.error() if pool.stopped else None
        else:
            planner.take()  # raises what stopped the listing, if anything did
    finally:
        planner.close()
    planner.report(progress)
    num_shards = planner.num_shards
    failed_scenes: dict[str, str] = {}
    if scenes is not None and stopped is None:
        metadata = results_metadata(cfg, spec, key)
        shards = store.read_plan()[0]  # a tiled plan: tiles, not an archive's images
        failed_scenes = merge_scenes(cfg, store, scenes, shards, metadata, progress, on_progress)
        failed_scenes = _unmerged(store, scenes, failed_scenes)
    _clear_tmp(store)
    failed = _uncommitted(store, num_shards, failed, str(stopped) if stopped else None)
    finished = "finished" if not failed and not failed_scenes else _failures_text(failed, failed_scenes)
    progress.message = str(stopped) if stopped else finished
    summary = _summary(
        store, progress, failed, num_shards, None if scenes is None else failed_scenes, len(scenes or ()), skipped
    )
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


def _uncommitted(store: JobStore, num_shards: int, failed: dict[int, str], stopped: str | None) -> dict[int, str]:
    """The shards of the plan without a commit record, with why: the records,
    not what the driver counted, say whether the job is complete (a record
    whose write was lost is a shard to run again; one written by an attempt
    the driver gave up on is a shard done). ``stopped``: why storage stopped
    the job, for the shards it never handed out."""
    committed = store.committed()
    lost = [sid for sid in range(num_shards) if sid not in committed and sid not in failed]
    if lost and not stopped:
        log.error(
            "%d shards reported committed have no commit record in %s (the first: shard %d)", len(lost), store, lost[0]
        )
    why = stopped or "its worker reported it committed, but DEST holds no commit record for it; a rerun runs it again"
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


def _summary(
    store: JobStore,
    progress: Progress,
    failed: dict[int, str],
    num_shards: int,
    failed_scenes: dict[str, str] | None,
    num_scenes: int = 0,
    skipped: dict[str, int] | None = None,
) -> JobSummary:
    """What the run did; for a tiled job (``failed_scenes`` not None) rows are
    its ``num_scenes`` scenes and the tiles are counted beside them."""
    records = store.commit_records()
    tiled = failed_scenes is not None
    results = store.scene_records() if tiled else records
    return JobSummary(
        complete=not failed and len(records) == num_shards and not failed_scenes,
        images=num_scenes if tiled else progress.total,
        rows=sum(r.rows for r in results),
        errors=sum(r.errors for r in results),
        detections=sum(r.detections for r in results),
        shards=num_shards,
        shards_committed=len(records),
        failed_shards={str(k): v for k, v in sorted(failed.items())},
        tiles=progress.total if tiled else None,
        scenes=num_scenes if tiled else None,
        failed_scenes=dict(sorted(failed_scenes.items())) if tiled else None,
        tiles_skipped_nodata=skipped["nodata"] if tiled and skipped else None,
        tiles_skipped_aoi=skipped["aoi"] if tiled and skipped else None,
        wall_s=round(time.time() - progress.started, 3),
        finished=time.time(),
        images_per_s_this_run=round(progress.rate, 3),
        images_this_run=progress.done - progress.done_at_start,
        segbatch_version=__version__,
    )
