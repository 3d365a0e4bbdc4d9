"""A tiled scene's outputs, computed from its tile rows: its instances, its row, its object table
and its class map raster. Plain functions: reading the tile files and publishing the outputs
through DEST's store is ``engine/scene_merge.py``'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from segbatch import schema
from segbatch.model import box_mask_records, class_map_dtype, paint_class_map

from . import objects
from .grid import TILE_MARK, Window, parse_tile_item
from .pieces import Instance, tile_pieces
from .polygons import PolygonOptions
from .read import RasterInfo
from .stitch import stitch_instances


def scene_instances(tile_rows: list[dict[str, Any]], iou_threshold: float = 0.5) -> tuple[list[Instance], list[str]]:
    """The scene's stitched instances, and the errors of tiles that could not be read.

    tile_rows: the scene's rows of its tiles (``schema.TILE_SCHEMA``), in tile order.
    """
    failed = [r for r in tile_rows if r["status"] != schema.STATUS_OK]
    errors = [f"{r['uri'].rpartition(TILE_MARK)[2]}: {r['error']}" for r in failed]
    windows = [parse_tile_item(r["uri"])[1] for r in tile_rows]
    pieces = [p for k, r in enumerate(tile_rows) for p in tile_pieces(r["detections"], k)]
    return stitch_instances(pieces, windows, iou_threshold), errors


def scene_row(scene: str, info: RasterInfo, instances: list[Instance], errors: list[str], tiles: int) -> dict[str, Any]:
    """The scene's row of ``schema.SCHEMA``: whole-scene RLE masks, best score first."""
    if errors:
        message = f"{len(errors)} of {tiles} tiles could not be read; the first: {errors[0]}"
        return schema.error_row(scene, message, info.width, info.height)
    if instances and instances[0].keypoints is not None:  # a keypoint model's: no masks, keypoints in scene pixels
        detections = [
            {
                "label": inst.label,
                "label_name": inst.label_name,
                "score": inst.score,
                "box": list(inst.box),
                "mask": None,
                "area": None,
                "keypoints": inst.keypoints,
            }
            for inst in instances
        ]
        return schema.ok_row(scene, info.width, info.height, detections)
    detections = box_mask_records(
        [(inst.mask, inst.x0, inst.y0) for inst in instances],
        [inst.label for inst in instances],
        [inst.label_name for inst in instances],
        [inst.score for inst in instances],
        [inst.box for inst in instances],
        info.height,
        info.width,
    )
    return schema.ok_row(scene, info.width, info.height, detections)


def object_table(
    scene: str,
    info: RasterInfo,
    row: dict[str, Any],
    instances: list[Instance],
    options: PolygonOptions | None = None,
    stac_id: str | None = None,
) -> pa.Table:
    """One row per object with its polygon, as a GeoParquet table (``schema.OBJECT_SCHEMA``; ``objects.py``);
    ``stac_id``: the scene's STAC item, so objects join back to the catalog's metadata."""
    return objects.object_table(
        scene, info.crs, info.transform, row["detections"], instances, options or PolygonOptions(), stac_id
    )


def unreadable_object_table(options: PolygonOptions | None = None) -> pa.Table:
    """The object table of a scene whose header could not be read: no objects (in --objects-crs, if given)."""
    return objects.empty_object_table(options or PolygonOptions())


def write_class_map(instances: list[Instance], info: RasterInfo, path: str, block: int = 512) -> None:
    """A per-pixel class map (0 the background) as a Cloud-Optimized GeoTIFF at local ``path``:
    uint8, or uint16 when a label does not fit in a byte (``model.class_map_dtype``, as an image's).

    Written block by block (never the whole map in memory) into a tiled
    GeoTIFF with the raster's georeferencing, then laid out as a COG by GDAL,
    which also streams. Where instances overlap, the best score wins a pixel.
    """
    import os
    import tempfile

    import rasterio
    import rasterio.shutil
    import rasterio.windows
    from affine import Affine

    dtype = class_map_dtype(inst.label for inst in instances)
    profile = {
        "driver": "GTiff",
        "width": info.width,
        "height": info.height,
        "count": 1,
        "dtype": np.dtype(dtype).name,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
        "crs": info.crs,
        "transform": Affine(*info.transform),
        "nodata": None,
    }
    # each block's instances, worst score first (the order of equal scores kept in every block)
    by_block: dict[tuple[int, int], list[Instance]] = {}
    for inst in sorted(instances, key=lambda inst: inst.score):
        for br in range(inst.y0 // block, (inst.y0 + inst.mask.shape[0] - 1) // block + 1):
            for bc in range(inst.x0 // block, (inst.x0 + inst.mask.shape[1] - 1) // block + 1):
                by_block.setdefault((br, bc), []).append(inst)
    with tempfile.TemporaryDirectory(prefix="segbatch-classmap-", dir=os.path.dirname(path) or None) as tmp:
        plain = os.path.join(tmp, "plain.tif")
        with rasterio.open(plain, "w", **profile) as dst:
            for r in range(0, info.height, block):
                for c in range(0, info.width, block):
                    w = Window(c, r, min(block, info.width - c), min(block, info.height - r))
                    here = by_block.get((r // block, c // block), [])
                    canvas = paint_class_map(
                        [(inst.mask, inst.x0, inst.y0) for inst in here],
                        [inst.label for inst in here],
                        [inst.score for inst in here],
                        w.height,
                        w.width,
                        col=w.col,
                        row=w.row,
                        dtype=dtype,
                    )
                    dst.write(canvas, 1, window=rasterio.windows.Window(w.col, w.row, w.width, w.height))
        rasterio.shutil.copy(plain, path, driver="COG", compress="DEFLATE", blocksize=block)
