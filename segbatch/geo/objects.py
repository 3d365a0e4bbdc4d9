"""DEST/objects: one GeoParquet row per object of a georeferenced raster, tiled or processed whole.

``object_rows`` turns a raster's detections (and their masks as ``Instance`` objects) into a
table through the polygon rules (``polygons.py``); a tiled scene's merge calls it once per
scene (``scene.object_table``), a shard of whole images once per georeferenced TIFF among
them (``image_object_tables``).

Whole images: a TIFF (``.tif``, ``.tiff``) small enough to go whole is decoded by the image
pipeline like any photo, and its row is written as any image's. Its georeferencing is read
afterwards (its header: a few small reads), so a shard of JPEGs costs nothing more. Other
images, and TIFFs without a CRS, get no objects: their pixels are nowhere on a map.
Each shard writes one objects file per CRS it holds (GeoParquet holds one CRS a file):
``DEST/objects/part-00000-epsg32631.parquet``, one file with ``--objects-crs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from segbatch import schema
from segbatch.errors import StorageFault

from .georef import geo_metadata, instance_polygon
from .pieces import Instance
from .polygons import PolygonOptions, crs_tag, keeps_area, output_polygon
from .stitch import box_union

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class Georef:
    """Where a raster's pixels lie: its CRS (WKT) and pixel -> CRS affine transform, and its size."""

    crs: str
    transform: tuple[float, ...]
    width: int
    height: int


def object_table(
    uri: str,
    crs_wkt: str | None,
    transform: tuple[float, ...],
    detections: list[dict[str, Any]],
    instances: list[Instance],
    options: PolygonOptions,
    stac_id: str | None = None,
) -> pa.Table:
    """A raster's objects as a GeoParquet table (``schema.OBJECT_SCHEMA``), one per detection
    (``detections[k]``'s mask is ``instances[k]``'s) that ``--min-area`` keeps; ``stac_id``:
    the raster's STAC item (null when SOURCE is not STAC).

    In ``options.crs`` when given, else the raster's own. A raster without a CRS keeps pixel
    coordinates (a null CRS), or, with ``--objects-crs``, has no objects: they cannot be
    placed on that map, and one pixel-grid file would spoil the folder's one CRS.
    """
    out_crs = options.crs_wkt or crs_wkt
    if options.crs_wkt and not crs_wkt:
        return empty_object_table(options)
    rows, bounds, types = [], [], set()
    for det, inst in zip(detections, instances):
        if not det["area"] or not keeps_area(int(det["area"]), transform, options.min_area):
            continue  # an empty mask has no outline
        polygon = output_polygon(instance_polygon(inst, transform), crs_wkt, transform, options)
        types.add(polygon.geom_type)
        bounds.append(polygon.bounds)
        kept = {k: det[k] for k in ("label", "label_name", "score", "box", "area", "mask")}
        rows.append({**kept, "uri": uri, "stac_id": stac_id, "geometry": polygon.wkb})
    bbox = list(box_union(bounds)) if bounds else None
    return _geoparquet(rows, geo_metadata(out_crs, sorted(types), bbox))


def empty_object_table(options: PolygonOptions) -> pa.Table:
    """No objects, in ``--objects-crs`` when given (so every file of DEST/objects agrees), else no CRS."""
    return _geoparquet([], geo_metadata(options.crs_wkt, [], None))


def _geoparquet(rows: list[dict[str, Any]], geo: bytes) -> pa.Table:
    return schema.rows_to_table(rows, schema=schema.OBJECT_SCHEMA, extra_metadata={schema.GEO_METADATA_KEY: geo})


# -- whole images ---------------------------------------------------------------------------


def is_tiff(uri: str) -> bool:
    """Whether ``uri`` names a TIFF, the one image format that carries georeferencing here."""
    return uri.split("?", 1)[0].lower().endswith(TIFF_SUFFIXES)


def read_georef(uri: str, storage) -> Georef | None:
    """The georeferencing of a TIFF (its header only); None when it has no CRS, or when
    rasterio cannot open what Pillow decoded (its objects are lost, never its row).
    A storage fault is raised: the shard is retried, as for any read."""

    def header(ds) -> Georef | None:
        if not ds.crs:
            return None
        return Georef(ds.crs.to_wkt(), tuple(ds.transform)[:6], ds.width, ds.height)

    try:
        return storage.read_raster(uri, header)
    except StorageFault:
        raise
    except Exception as exc:  # noqa: BLE001 - the image's row stands; only its polygons are lost
        log.warning("%s: no objects, its georeferencing cannot be read: %s", storage.redact(uri), exc)
        return None


def image_instances(detections: list[dict[str, Any]]) -> list[Instance]:
    """A whole image's detections (``schema.DETECTION_TYPE``, image-sized RLE) as ``Instance``
    objects, each mask cut to its own pixels."""
    out = []
    for d in detections:
        if d["mask"] is None:  # a keypoint model's detection: no outline (object_table skips it: no area)
            out.append(Instance(d["label"], d["label_name"], d["score"], tuple(d["box"]), 0, 0, np.zeros((0, 0), bool)))
            continue
        mask = mask_utils.decode({"size": list(d["mask"]["size"]), "counts": d["mask"]["counts"].encode()})
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if len(rows) == 0:
            crop, x0, y0 = np.zeros((0, 0), bool), 0, 0
        else:
            crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(bool)
            x0, y0 = int(cols[0]), int(rows[0])
        out.append(Instance(d["label"], d["label_name"], d["score"], tuple(d["box"]), x0, y0, crop))
    return out


def image_object_tables(
    rows: list[dict[str, Any]], georefs: dict[str, Georef], options: PolygonOptions
) -> dict[str, pa.Table]:
    """The objects of a shard's georeferenced whole images, one table per output CRS, by its
    ``crs_tag`` (two spellings of one EPSG CRS share a table: a file name is one CRS).

    rows: the shard's rows (``schema.SCHEMA``); georefs: the georeferencing of those that have
    one. An image whose decoded size is not its raster's (Pillow turned it by its orientation
    tag, say) gets none: its pixels are not the transform's.
    """
    by_crs: dict[str, list[pa.Table]] = {}
    for row in rows:
        g = georefs.get(row["uri"])
        if g is None or row["status"] != schema.STATUS_OK:
            continue
        if (row["width"], row["height"]) != (g.width, g.height):
            log.warning("%s: no objects, its pixels (%dx%d) are not its raster's", row["uri"], g.width, g.height)
            continue
        dets = row["detections"]
        table = object_table(row["uri"], g.crs, g.transform, dets, image_instances(dets), options)
        by_crs.setdefault(crs_tag(options.crs_wkt or g.crs), []).append(table)
    return {crs: _concat(tables) for crs, tables in by_crs.items()}


def _concat(tables: list[pa.Table]) -> pa.Table:
    """One table of one CRS's objects: the union of the tables' bboxes and geometry types."""
    import json

    geos = [json.loads(t.schema.metadata[schema.GEO_METADATA_KEY]) for t in tables]
    columns = [g["columns"]["geometry"] for g in geos]
    types = sorted({t for c in columns for t in c["geometry_types"]})
    boxes = [tuple(c["bbox"]) for c in columns if "bbox" in c]
    merged = geos[0]
    merged["columns"]["geometry"]["geometry_types"] = types
    if boxes:
        merged["columns"]["geometry"]["bbox"] = list(box_union(boxes))
    rows = [r for t in tables for r in t.to_pylist()]
    return _geoparquet(rows, json.dumps(merged).encode())
