"""A tiled scene's tiles to its outputs: its row, its objects and its class map.

Runs once every tile of the scene is committed (``job.py`` sends it to a
Ray task); reads the scene's tile rows from the job's tile files, merges
the pieces (``tiles.merge_scene``), and publishes, each whole or absent:

- ``DEST/objects/scene-<id>.parquet``: one row per object with its polygon
  (GeoParquet: WKB ``geometry``, ``geo`` metadata with the raster's CRS);
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

from segbatch import schema
from .store import JobStore
from segbatch.model import box_mask_runs, encode_runs
from segbatch.storage import Storage, join, output_name
from segbatch.geo import TILE_MARK, Instance, RasterInfo, geo_metadata, instance_polygon, merge_scene, parse_tile_item, tile_pieces, write_class_map


def read_scene_tiles(storage: Storage, scene: str, part_urls: list[str]) -> list[dict[str, Any]]:
    """The scene's tile rows from the tile files that hold them, in tile order."""
    prefix = scene + TILE_MARK
    tables = []
    for url in part_urls:
        table = storage.read_parquet(url)
        tables.append(table.filter(pc.starts_with(table.column("uri"), prefix)))
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    return sorted(rows, key=lambda r: r["uri"])


def scene_instances(tile_rows: list[dict[str, Any]], iou_threshold: float = 0.5) -> tuple[list[Instance], list[str]]:
    """The scene's merged instances, and the errors of tiles that could not be read."""
    errors = [f"{r['uri'].rpartition(TILE_MARK)[2]}: {r['error']}" for r in tile_rows if r["status"] != schema.STATUS_OK]
    windows = [parse_tile_item(r["uri"])[1] for r in tile_rows]
    pieces = [p for k, r in enumerate(tile_rows) for p in tile_pieces(r["detections"], k)]
    return merge_scene(pieces, windows, iou_threshold), errors


def scene_row(scene: str, info: RasterInfo, instances: list[Instance], errors: list[str], tiles: int) -> dict[str, Any]:
    """The scene's row of ``schema.SCHEMA``: whole-scene RLE masks, best score first."""
    if errors:
        message = f"{len(errors)} of {tiles} tiles could not be read; the first: {errors[0]}"
        return schema.error_row(scene, message, info.width, info.height)
    runs = [box_mask_runs(inst.mask, inst.x0, inst.y0, info.height, info.width) for inst in instances]
    rles = encode_runs([r for r, _ in runs], info.height, info.width)
    detections = [
        {"label": inst.label, "label_name": inst.label_name, "score": inst.score, "box": list(inst.box), "mask": rle, "area": area}
        for inst, rle, (_, area) in zip(instances, rles, runs)
    ]
    return schema.ok_row(scene, info.width, info.height, detections)


def object_table(scene: str, info: RasterInfo, row: dict[str, Any], instances: list[Instance]) -> pa.Table:
    """One row per object with its polygon, as a GeoParquet table (``schema.OBJECT_SCHEMA``)."""
    rows, bounds, types = [], [], set()
    for det, inst in zip(row["detections"], instances):
        polygon = instance_polygon(inst, info.transform)
        types.add(polygon.geom_type)
        bounds.append(polygon.bounds)
        rows.append({**{k: det[k] for k in ("label", "label_name", "score", "box", "area", "mask")},
                     "uri": scene, "geometry": polygon.wkb})  # fmt: skip
    bbox = [min(b[0] for b in bounds), min(b[1] for b in bounds), max(b[2] for b in bounds), max(b[3] for b in bounds)] if bounds else None
    geo = geo_metadata(info.crs, sorted(types), bbox)
    return schema.rows_to_table(rows, schema=schema.OBJECT_SCHEMA, extra_metadata={schema.GEO_METADATA_KEY: geo})


def commit_unreadable(store: JobStore, scene: str, error: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """A scene whose header could not be read: its error row, no objects (the scene costs one row)."""
    geo = {schema.GEO_METADATA_KEY: geo_metadata(None, [], None)}
    objects = schema.rows_to_table([], schema=schema.OBJECT_SCHEMA, extra_metadata=geo)
    data = schema.rows_to_table([schema.error_row(scene, error)], metadata)
    record = {"rows": 1, "tiles": 0, "errors": 1, "detections": 0, "pieces_merged": 0, "seconds": 0.0}
    store.commit_scene(scene, data, objects, record)
    return record


def merge_and_commit(
    store: JobStore, scene: str, info: RasterInfo, part_urls: list[str], metadata: dict[str, Any],
    semantic_out: str | None = None, iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Merge one scene and publish its outputs (see the module docstring); returns its commit record."""
    started = time.time()
    storage = store.storage
    tile_rows = read_scene_tiles(storage, scene, part_urls)
    instances, errors = scene_instances(tile_rows, iou_threshold)
    if errors:
        instances = []
    row = scene_row(scene, info, instances, errors, len(tile_rows))
    objects = object_table(scene, info, row, instances)
    if semantic_out and not errors:
        with tempfile.TemporaryDirectory(prefix="segbatch-classmap-") as tmp:
            local = os.path.join(tmp, "classes.tif")
            write_class_map(instances, info, local)
            storage.upload_file(local, join(semantic_out, output_name(scene, ".tif")))
    shard = schema.shard_metadata(-1, 1, started, time.time(), len(row["detections"]))
    data = schema.rows_to_table([row], {**metadata, "shard": shard})
    record = {
        "rows": 1,
        "tiles": len(tile_rows),
        "errors": int(row["status"] != schema.STATUS_OK),
        "detections": len(row["detections"]),
        "pieces_merged": sum(inst.pieces > 1 for inst in instances),
        "seconds": round(time.time() - started, 3),
    }
    store.commit_scene(scene, data, objects, record)
    return record
