"""A tiled scene's coverage in the plan: which of its tiles hold data and meet
``--aoi`` (the rules are ``geo/coverage.py``'s; this module reads what they need),
kept in the scene's record in ``DEST/_segbatch/scenes.json`` under ``coverage``.

A scene's record without ``coverage`` (a raster without nodata and a job
without ``--aoi``, or a DEST planned by an older segbatch) runs every tile.
"""

from __future__ import annotations

from typing import Any

from segbatch.config import JobConfig
from segbatch.geo import (
    Area,
    RasterInfo,
    SceneCoverage,
    Window,
    area_in_pixels,
    mask_cells,
    plan_windows,
    read_data_cells,
    scene_coverage,
    windows_in_area,
    windows_with_data,
)

COVERAGE_KEY = "coverage"


def plan_coverage(uri: str, info: RasterInfo, storage, cfg: JobConfig, area: Area | None) -> dict[str, Any]:
    """``{"coverage": ...}`` for the scene's record, or ``{}`` when every tile runs.

    The data test reads the dataset's mask at a reduced resolution (``read_data_cells``);
    the area test places ``area`` in the scene's pixels (``AoiError`` for a scene without a CRS).
    """
    if not info.masked and area is None:
        return {}
    windows = plan_windows(info.width, info.height, cfg.tile_size, cfg.tile_overlap)
    in_area, pixels = None, None
    if area is not None:
        place = area_in_pixels(area, info.crs, info.transform, info.width, info.height, uri)
        in_area, pixels = windows_in_area(windows, place), place.wkt
    has_data = None
    if info.masked:
        cells = read_data_cells(uri, storage, info, mask_cells(info.width, info.height, cfg.tile_size))
        has_data = windows_with_data(windows, cells, info.width, info.height)
    return {COVERAGE_KEY: scene_coverage(windows, has_data, in_area, pixels).to_json()}


def coverage_of(record: dict[str, Any]) -> SceneCoverage | None:
    """A scene record's coverage; None when every tile runs."""
    d = record.get(COVERAGE_KEY)
    return SceneCoverage.from_json(d) if d else None


def kept_windows(record: dict[str, Any], windows: list[Window]) -> list[Window]:
    """The windows of the scene (``plan_windows``' order) that run."""
    coverage = coverage_of(record)
    if coverage is None:
        return windows
    if len(coverage.kept) != len(windows):  # the tiling changed: refused before this (the result key)
        raise ValueError(f"the scene's record plans {len(coverage.kept)} tiles, the tiling {len(windows)}")
    return [w for w, keep in zip(windows, coverage.kept) if keep]


def tiles_skipped(scenes: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Tiles the plan skipped over ``scenes``' records: ``{"nodata": n, "aoi": m}``."""
    out = {"nodata": 0, "aoi": 0}
    for record in scenes.values():
        coverage = coverage_of(record)
        if coverage is not None:
            out["nodata"] += coverage.skipped_nodata
            out["aoi"] += coverage.skipped_aoi
    return out
