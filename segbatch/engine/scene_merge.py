"""A tiled scene's tiles to its outputs: its row, its objects and its class map.

Runs once every tile of the scene is committed (``worker.py``'s Ray task
``merge_scene_task``); reads the scene's tile rows from the job's tile files,
stitches the pieces and computes the outputs (``geo.scene``), and publishes
them through the ``JobStore``, each whole or absent:

- ``DEST/objects/scene-<id>.parquet``: one row per object with its polygon
  (GeoParquet: WKB ``geometry``, ``geo`` metadata with the raster's CRS, or ``--objects-crs``) and
  the scene's STAC item id (``stac_id``, kept in scenes.json by the driver);
- ``--semantic-out``/<scene stem>-<8 hex of its URI's SHA-1>.tif (``storage.output_name``):
  the class map, a Cloud-Optimized GeoTIFF;
- ``DEST/data/scene-<id>.parquet``: the scene's row, as for any image;
- the scene's commit record, last.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import shapely

from segbatch import schema
from segbatch.geo import (
    TILE_MARK,
    PolygonOptions,
    RasterInfo,
    SceneCoverage,
    instances_in_area,
    object_table,
    scene_instances,
    scene_row,
    unreadable_object_table,
    write_class_map,
)
from segbatch.storage import Storage, join, output_name

from .records import CommitRecord
from .store import JobStore


def read_scene_tiles(storage: Storage, scene: str, part_urls: list[str]) -> list[dict[str, Any]]:
    """The scene's tile rows from the tile files that hold them, in tile order."""
    prefix = scene + TILE_MARK
    tables = []
    for url in part_urls:
        table = storage.read_parquet(url)
        tables.append(table.filter(pc.starts_with(table.column("uri"), prefix)))
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    return sorted(rows, key=lambda r: r["uri"])


def commit_unreadable(
    store: JobStore, scene: str, error: str, metadata: dict[str, Any], polygons: PolygonOptions | None = None
) -> CommitRecord:
    """A scene whose header could not be read: its error row, no objects (the scene costs one row)."""
    objects = unreadable_object_table(polygons)
    data = schema.rows_to_table([schema.error_row(scene, error)], metadata)
    record = CommitRecord(rows=1, tiles=0, errors=1, detections=0, pieces_merged=0, seconds=0.0)
    return store.commit_scene(scene, data, objects, record)


def merge_and_commit(
    store: JobStore,
    scene: str,
    info: RasterInfo,
    part_urls: list[str],
    metadata: dict[str, Any],
    semantic_out: str | None = None,
    iou_threshold: float = 0.5,
    polygons: PolygonOptions | None = None,
    stac_id: str | None = None,
    coverage: SceneCoverage | None = None,
) -> CommitRecord:
    """Merge one scene and publish its outputs (see the module docstring); returns its commit record.

    polygons: ``--objects-crs``, ``--simplify``, ``--min-area`` (``geo.polygons``).
    coverage: the scene's tiles the plan skipped, counted in its record, and
    the ``--aoi`` area: objects with no pixel in it are not reported.
    """
    started = time.time()
    storage = store.storage
    tile_rows = read_scene_tiles(storage, scene, part_urls)
    instances, errors = scene_instances(tile_rows, iou_threshold)
    if errors:
        instances = []
    elif coverage is not None and coverage.area is not None:
        instances = instances_in_area(instances, shapely.from_wkt(coverage.area))
    row = scene_row(scene, info, instances, errors, len(tile_rows))
    objects = object_table(scene, info, row, instances, polygons, stac_id)
    if semantic_out and not errors:
        with tempfile.TemporaryDirectory(prefix="segbatch-classmap-") as tmp:
            local = os.path.join(tmp, "classes.tif")
            write_class_map(instances, info, local)
            storage.upload_file(local, join(semantic_out, output_name(scene, ".tif")))
    shard = schema.shard_metadata(-1, 1, started, time.time(), len(row["detections"]))
    data = schema.rows_to_table([row], {**metadata, "shard": shard})
    record = CommitRecord(
        rows=1,
        tiles=len(tile_rows),
        errors=int(row["status"] != schema.STATUS_OK),
        detections=len(row["detections"]),
        pieces_merged=sum(inst.pieces > 1 for inst in instances),
        seconds=round(time.time() - started, 3),
        tiles_skipped=coverage.skipped if coverage is not None else None,
    )
    return store.commit_scene(scene, data, objects, record)
