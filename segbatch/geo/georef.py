"""Georeferencing: an instance's outline in the raster's CRS, and the GeoParquet metadata of a table of them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .pieces import Instance


def instance_polygon(inst: Instance, transform: tuple[float, ...]):
    """The instance's outline as a shapely (Multi)Polygon in the raster's CRS
    (pixel corners through the affine ``transform``)."""
    from affine import Affine
    from rasterio.features import shapes
    from shapely.geometry import shape
    from shapely.ops import unary_union

    at = Affine(*transform) @ Affine.translation(inst.x0, inst.y0)
    parts = [shape(geom) for geom, value in shapes(inst.mask.astype(np.uint8), mask=inst.mask, transform=at) if value]
    return unary_union(parts)


def geo_metadata(crs_wkt: str | None, geometry_types: list[str], bbox: list[float] | None) -> bytes:
    """The GeoParquet 1.1 ``geo`` file metadata for one WKB ``geometry`` column.

    An explicit null CRS for rasters without one: GeoParquet reads a missing
    ``crs`` as longitude/latitude, which a pixel grid is not.
    """
    crs = None
    if crs_wkt:
        from rasterio.crs import CRS

        crs = CRS.from_wkt(crs_wkt).to_dict(projjson=True)
    column: dict[str, Any] = {"encoding": "WKB", "geometry_types": geometry_types, "crs": crs}
    if bbox is not None:
        column["bbox"] = bbox
    return json.dumps({"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}).encode()
