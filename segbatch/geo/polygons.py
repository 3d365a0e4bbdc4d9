"""The rules an object's polygon goes through on its way to DEST/objects: dropped when too small
(``--min-area``), simplified (``--simplify``), reprojected (``--objects-crs``).

Plain functions over shapely geometries, so each rule is tested without a raster or Ray.
The order is fixed, and every step is deterministic:

1. ``--min-area`` is decided on the mask, exactly: a polygon traced round pixel corners has
   the area of its pixels, so the test needs no polygon at all (and a dropped object costs
   no tracing).
2. ``--simplify`` works in the raster's own CRS, where pixels are square and the tolerance
   means what the user measured on the map (or in pixels, with ``px``); topology preserving,
   so a polygon never crosses itself or its own holes.
3. ``--objects-crs`` reprojects last, after densifying: a straight edge in UTM is a curve in
   another zone or in longitude/latitude, and a vertex every ``DENSIFY_PIXELS`` keeps a long
   edge on that curve.
   Coordinates are x/easting/longitude first (``always_xy``), as GeoParquet's WKB requires
   whatever axis order the CRS declares.

The mask (DEST/data and the ``mask`` column of DEST/objects) is never changed: only polygons are.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from segbatch.errors import UsageError

# Before reprojecting, no polygon edge longer than this many pixels. The error of reprojecting
# an edge by its ends alone grows with its length squared: 0.25 m for a 60 km edge from UTM 31
# to 32 (tests/geo/test_polygons.py), so nanometres for 64 pixels of 0.5 m, and well under a
# pixel for 64 pixels of any raster; shorter edges (most of a traced outline) gain no vertex.
DENSIFY_PIXELS = 64.0

_MEASURE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(px)?\s*$")


class PolygonOptionError(UsageError, ValueError):
    """A polygon option (``--objects-crs``, ``--simplify``, ``--min-area``) is wrong; the message names the fix."""


@dataclass(frozen=True)
class Measure:
    """A length (``--simplify``) or an area (``--min-area``): in the raster's CRS units
    (``pixels`` False: metres for UTM, square metres for an area) or in pixels."""

    value: float
    pixels: bool = False

    def in_crs_units(self, pixel_size: float, power: int) -> float:
        """The measure in CRS units; ``power`` 1 for a length, 2 for an area."""
        return self.value * pixel_size**power if self.pixels else self.value


def parse_measure(text: str | float | None, option: str) -> Measure | None:
    """``0.5`` (CRS units) or ``2px`` (pixels) to a ``Measure``; None stays None."""
    if text is None:
        return None
    m = _MEASURE.match(str(text))
    if not m:
        raise PolygonOptionError(
            f"{option} {text!r}: give a number in the raster's CRS units (e.g. 0.5, metres for UTM) "
            "or in pixels with px (e.g. 2px)"
        )
    return Measure(float(m.group(1)), pixels=bool(m.group(2)))


def check_crs(text: str) -> str:
    """The WKT of the CRS ``text`` names (``EPSG:4326``, a PROJ string, WKT, PROJ JSON);
    a ``PolygonOptionError`` naming the fix when pyproj does not know it."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        return CRS.from_user_input(text).to_wkt()
    except CRSError as exc:
        raise PolygonOptionError(
            f"--objects-crs {text!r} is not a CRS pyproj knows ({exc}); give an authority code such as "
            "EPSG:4326 (longitude/latitude) or EPSG:32632 (UTM 32N), or the CRS's WKT"
        ) from None


@dataclass(frozen=True)
class PolygonOptions:
    """How objects' polygons are written (``JobConfig.polygon_options`` builds it from the options).

    crs: the CRS every polygon is written in, as the user gave it (None: each raster's own).
    """

    crs: str | None = None
    simplify: Measure | None = None
    min_area: Measure | None = None

    @functools.cached_property
    def crs_wkt(self) -> str | None:
        return None if self.crs is None else check_crs(self.crs)


def pixel_size(transform: tuple[float, ...]) -> float:
    """The side of a square of a pixel's area, in CRS units (for rotated or non-square pixels too)."""
    a, b, _, d, e, _ = transform[:6]
    return math.sqrt(abs(a * e - b * d))


def keeps_area(pixels: int, transform: tuple[float, ...], min_area: Measure | None) -> bool:
    """Whether an object of ``pixels`` mask pixels is at least ``min_area``: a polygon traced
    round pixel corners has exactly their area, so the mask decides (no polygon needed)."""
    if min_area is None:
        return True
    if min_area.pixels:
        return pixels >= min_area.value
    return pixels * pixel_size(transform) ** 2 >= min_area.value


def simplify(geom, tolerance: float):
    """``geom`` simplified within ``tolerance`` (CRS units), topology preserved: still valid,
    its parts never crossing, no vertex moved further than ``tolerance`` from the original's outline."""
    import shapely

    if tolerance <= 0 or geom.is_empty:
        return geom
    out = geom.simplify(tolerance, preserve_topology=True)
    return out if out.is_valid else polygonal(shapely.make_valid(out))


@functools.lru_cache(maxsize=64)
def _transformer(src_wkt: str, dst_wkt: str):
    from pyproj import CRS, Transformer

    return Transformer.from_crs(CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt), always_xy=True)


def reproject(geom, src_wkt: str, dst_wkt: str, densify: float | None = None):
    """``geom`` from CRS ``src_wkt`` to ``dst_wkt`` (x/longitude first), every edge first
    cut to at most ``densify`` source units so that it follows its curve in the target CRS."""
    import shapely

    if src_wkt == dst_wkt or geom.is_empty:
        return geom
    if densify:
        geom = shapely.segmentize(geom, densify)
    out = shapely.transform(geom, _transformer(src_wkt, dst_wkt).transform, interleaved=False)
    if not shapely.is_valid(out):  # a reprojection can fold a polygon that spans a zone's far edge
        out = polygonal(shapely.make_valid(out))
    return out


def polygonal(geom):
    """The polygons of a geometry (``make_valid`` may add lines or points where a polygon pinched)."""
    from shapely.geometry import MultiPolygon, Polygon

    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    polys = [p for g in parts for p in (g.geoms if isinstance(g, MultiPolygon) else [g])]
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def output_polygon(geom, crs_wkt: str | None, transform: tuple[float, ...], options: PolygonOptions):
    """An object's polygon (in its raster's CRS, ``crs_wkt``, traced through ``transform``) as
    DEST/objects holds it: simplified, then reprojected to ``options.crs`` (see the module docstring).
    A raster without a CRS keeps its pixel coordinates (nothing to reproject from)."""
    size = pixel_size(transform)
    if options.simplify is not None:
        geom = simplify(geom, options.simplify.in_crs_units(size, 1))
    if options.crs_wkt is not None and crs_wkt:
        geom = reproject(geom, crs_wkt, options.crs_wkt, densify=DENSIFY_PIXELS * size)
    return geom


def crs_tag(crs_wkt: str | None) -> str:
    """A short name for a CRS in file names: ``epsg32631``, or 8 hex digits of its WKT's hash."""
    import hashlib

    if not crs_wkt:
        return "nocrs"
    from pyproj import CRS

    code = CRS.from_wkt(crs_wkt).to_epsg()
    return f"epsg{code}" if code else hashlib.sha1(crs_wkt.encode()).hexdigest()[:8]
