"""The area of interest (``--aoi``): a lon/lat bbox, or a vector file in any CRS, and
where it lies in each scene's pixels.

``--aoi minlon,minlat,maxlon,maxlat`` or ``--aoi FILE_OR_URL`` (GeoJSON,
GeoPackage, or any vector format GDAL reads; its features' union is the
area; a file without a CRS is read as longitude/latitude, as GeoJSON's
RFC 7946 says). The file is read once, by the driver, when the plan is made;
each scene gets the area reprojected to its CRS and then to its pixels
(``area_in_pixels``), kept in the scene's record for the merge.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from segbatch.errors import UsageError

LONLAT = "EPSG:4326"


class AoiError(UsageError, ValueError):
    """``--aoi`` cannot be used: a bad bbox, an unreadable or empty file, a scene without a CRS."""


@dataclass(frozen=True)
class Area:
    """The area of interest: a shapely geometry and its CRS (any form pyproj takes)."""

    geometry: object
    crs: str


def parse_bbox(text: str) -> tuple[float, float, float, float] | None:
    """``minlon,minlat,maxlon,maxlat`` as numbers; None when ``text`` is not four numbers (a file, then).

    Raises ``AoiError`` for four numbers that are no lon/lat box.
    """
    parts = text.split(",")
    if len(parts) != 4:
        return None
    try:
        minx, miny, maxx, maxy = (float(p) for p in parts)
    except ValueError:
        return None
    if not (-180 <= minx < maxx <= 180 and -90 <= miny < maxy <= 90):
        raise AoiError(
            f"--aoi {text}: a bbox is minlon,minlat,maxlon,maxlat in degrees, each min less than its max "
            "(longitudes -180..180, latitudes -90..90)"
        )
    return minx, miny, maxx, maxy


def load_area(text: str, storage) -> Area:
    """The area ``--aoi`` names: a bbox, or the union of a vector file's features (read through ``storage``)."""
    import shapely

    bbox = parse_bbox(text)
    if bbox is not None:
        return Area(shapely.box(*bbox), LONLAT)
    try:
        import geopandas
    except ImportError:
        raise AoiError(
            f"--aoi {storage.redact(text)}: reading a vector file needs geopandas: pip install 'segbatch[vector]' "
            "(or give a bbox: minlon,minlat,maxlon,maxlat)"
        ) from None

    try:
        data = storage.read_bytes(text)
        frame = geopandas.read_file(io.BytesIO(data))
    except Exception as exc:
        raise AoiError(
            f"--aoi {storage.redact(text)}: cannot read it as a vector file ({type(exc).__name__}: "
            f"{storage.redact(str(exc))}); give a GeoJSON or GeoPackage file or URL, or minlon,minlat,maxlon,maxlat"
        ) from None
    geometry = shapely.union_all(frame.geometry.dropna().make_valid().to_numpy()) if len(frame) else None
    if geometry is None or geometry.is_empty or geometry.area == 0:
        raise AoiError(f"--aoi {storage.redact(text)}: the file holds no polygon; the area must have polygons")
    return Area(geometry, frame.crs.to_wkt() if frame.crs is not None else LONLAT)


def area_in_pixels(area: Area, crs_wkt: str | None, transform: tuple[float, ...], width: int, height: int, uri: str):
    """``area`` in the scene's pixels (x the column, y the row), cut to the scene
    (and a pixel around it); an empty geometry when the area misses the scene.

    The area's edges are densified before reprojecting, so a lon/lat box stays
    the curved shape it is in a projected CRS. A scene without a CRS cannot be
    placed: ``AoiError``, naming it.
    """
    import shapely
    from affine import Affine
    from pyproj import CRS, Transformer
    from shapely.affinity import affine_transform

    if not crs_wkt:
        raise AoiError(
            f"--aoi: {uri} has no CRS, so the area cannot be placed in it; georeference it, "
            "or run the scenes without a CRS without --aoi"
        )
    source, target = CRS.from_user_input(area.crs), CRS.from_wkt(crs_wkt)
    geometry = area.geometry
    if source != target:
        minx, miny, maxx, maxy = geometry.bounds
        geometry = shapely.segmentize(geometry, max(maxx - minx, maxy - miny) / 64 or 1.0)
        to_scene = Transformer.from_crs(source, target, always_xy=True)
        geometry = shapely.transform(geometry, lambda xy: _stacked(to_scene.transform(xy[:, 0], xy[:, 1])))
    back = ~Affine(*transform)
    a, b, c, d, e, f = back.a, back.b, back.c, back.d, back.e, back.f
    pixels = affine_transform(geometry, [a, b, d, e, c, f])
    scene = shapely.box(-1, -1, width + 1, height + 1)
    return shapely.make_valid(pixels).intersection(scene)


def _stacked(xy):
    import numpy as np

    return np.column_stack(xy)
