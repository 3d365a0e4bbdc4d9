"""The output schema: the one place that knows the columns of DEST/data
(and of DEST/objects and the job's tile files, for tiled rasters).

A row is one input image (or scene). ``detections`` is a list of structs, best score
first; ``mask`` is COCO compressed RLE, so ``pycocotools.mask.decode`` of
``{"size": mask["size"], "counts": mask["counts"]}`` gives the h x w mask.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from segbatch.redact import redact

SCHEMA_VERSION = "1"
METADATA_KEY = b"segbatch"

# DEST's folders (what each holds: ``engine/store.py``). Readers find results here.
DATA = "data"  # one Parquet file per committed shard (or merged scene)
OBJECTS = "objects"  # georeferenced rasters (tiled, or GeoTIFFs whole): one GeoParquet row per object
META = "_segbatch"  # the job's own state: plan, commit records, lease, progress
TILES = f"{META}/tiles"  # tiled scenes: the shards of tile rows before their scene is merged

MASK_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

# A keypoint of a Keypoint R-CNN detection (COCO's 17 person keypoints, or a checkpoint's own):
# x, y in pixels of the oriented image (the scene's, for tiled rasters), the model's score of it,
# and whether it is visible (COCO's v > 0). Names and skeleton: the file metadata (``keypoint_names``,
# ``skeleton``).
KEYPOINT_TYPE = pa.struct([("x", pa.float32()), ("y", pa.float32()), ("score", pa.float32()), ("visible", pa.bool_())])

DETECTION_TYPE = pa.struct(
    [
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("score", pa.float32()),
        ("box", pa.list_(pa.float32(), 4)),
        ("mask", MASK_TYPE),  # null for keypoint-only models
        ("area", pa.int64()),  # mask pixels; null without a mask
        ("keypoints", pa.list_(KEYPOINT_TYPE)),  # one per keypoint name, in their order; null for mask models
    ]
)

SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("detections", pa.list_(DETECTION_TYPE)),
    ]
)

STATUS_OK = "ok"
STATUS_ERROR = "error"

# -- tiles of large rasters (internal, under DEST/_segbatch/tiles) ------------------------

# A detection of one tile, in scene pixels; its mask is cut to its own pixels
# (``crop``, whose top-left pixel is the scene's (x0, y0)), so merging across
# seams never needs a whole tile's mask.
TILE_DETECTION_TYPE = pa.struct(
    [
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("score", pa.float32()),
        ("box", pa.list_(pa.float32(), 4)),
        ("x0", pa.int32()),
        ("y0", pa.int32()),
        ("crop", MASK_TYPE),
        ("keypoints", pa.list_(KEYPOINT_TYPE)),  # in scene pixels; null for mask models
    ]
)

TILE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),  # the tile's work item: SCENE#tile=ROW,COL,W,H
        ("status", pa.string()),
        ("error", pa.string()),
        ("detections", pa.list_(TILE_DETECTION_TYPE)),
    ]
)

# -- one row per object (DEST/objects, GeoParquet) ------------------------------------------

OBJECT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),  # the scene (or whole image)
        ("stac_id", pa.string()),  # the scene's STAC item id; null when SOURCE is not STAC
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("score", pa.float32()),
        ("box", pa.list_(pa.float32(), 4)),  # scene pixels
        ("area", pa.int64()),
        ("mask", MASK_TYPE),  # COCO RLE over the whole scene
        ("geometry", pa.binary()),  # WKB (Multi)Polygon in --objects-crs or the raster's CRS (pixels when it has none)
    ]
)
GEO_METADATA_KEY = b"geo"


def ok_row(uri: str, width: int, height: int, detections: list[dict[str, Any]]) -> dict[str, Any]:
    """A row for a segmented image. ``detections`` hold the DETECTION_TYPE fields."""
    return {"uri": uri, "width": width, "height": height, "status": STATUS_OK, "error": None, "detections": detections}


def error_row(uri: str, error: str, width: int | None = None, height: int | None = None) -> dict[str, Any]:
    """A row for an image that could not be segmented; ``error`` names the cause."""
    return {"uri": uri, "width": width, "height": height, "status": STATUS_ERROR, "error": error, "detections": []}


def rows_to_table(
    rows: Iterable[dict[str, Any]],
    metadata: dict[str, Any] | None = None,
    schema: pa.Schema = SCHEMA,
    extra_metadata: dict[bytes, bytes] | None = None,
) -> pa.Table:
    """Rows (dicts) to a table of ``schema`` (SCHEMA, TILE_SCHEMA or OBJECT_SCHEMA), with
    segbatch's key-value metadata (and others, e.g. GeoParquet's ``geo``)."""
    table = pa.Table.from_pylist(list(rows), schema=schema)
    meta = dict(extra_metadata or {})
    if metadata is not None:
        meta[METADATA_KEY] = json.dumps(metadata, sort_keys=True).encode()
    return table.replace_schema_metadata(meta) if meta else table


def tile_row(item: str, detections: list[dict[str, Any]] | None = None, error: str | None = None) -> dict[str, Any]:
    """A tile's row: its detections (TILE_DETECTION_TYPE), or the error that cost it."""
    status = STATUS_ERROR if error else STATUS_OK
    return {"uri": item, "status": status, "error": error, "detections": detections or []}


def file_metadata(
    *, model_id: str, weights_hash: str, result_key: str, thresholds: dict[str, Any], classes: list[str], version: str
) -> dict[str, Any]:
    """The key-value metadata every Parquet file carries."""
    return {
        "schema_version": SCHEMA_VERSION,
        "segbatch_version": version,
        "model_id": redact(model_id),  # a checkpoint's URI may be presigned or carry a password
        "weights_hash": weights_hash,
        "result_key": result_key,
        "thresholds": thresholds,
        "classes": classes,
    }


def shard_metadata(shard_id: int, images: int, started: float, finished: float, detections: int) -> dict[str, Any]:
    """The part of a file's metadata about the shard it holds (``"shard"``):
    when it was segmented, so reports can draw the job's pace from the files alone."""
    return {"id": shard_id, "images": images, "detections": detections, "started": started, "finished": finished}


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """segbatch's metadata of a Parquet file's schema ({} when absent)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}
