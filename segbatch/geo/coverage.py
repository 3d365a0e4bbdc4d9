"""Where a scene has something to segment: its data (not its nodata) and the area of interest.

An orthomosaic's black border, or a scene's part outside ``--aoi``, holds
nothing to find: its tiles are dropped from the plan (and counted), and what
the model draws there is not reported. The rules, as pure functions:

- a tile runs when its pixels hold data (``windows_with_data``, over the
  dataset's mask read at a reduced resolution, ``mask_cells``) and it meets
  the area of interest (``windows_in_area``);
- an instance's mask is cut to the tile's data pixels (``cut_to_data``): no
  object lies in nodata;
- an object is reported when one of its pixels (its centre) lies in the area
  (``instances_in_area``): objects on the area's edge are kept whole, not cut.

Which tiles run is decided once, when a scene is first planned, and kept in
``DEST/_segbatch/scenes.json`` (``SceneCoverage``): a rerun plans the same
tiles, and the dropped ones are never "missing".
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .grid import Window
from .pieces import Instance

# a coarse cell of the dataset's mask is this fraction of a tile's side (1/16: a 1024 px tile, 64 px cells)
CELLS_PER_TILE = 16
MAX_CELLS = 4096  # per side: a planning read of at most 16 M mask bytes, whatever the scene's size


@dataclass(frozen=True)
class SceneCoverage:
    """Which of a scene's planned windows (``plan_windows``' order) run, and why the others do not.

    ``area``: the area of interest in the scene's pixels (WKT, cut to the
    scene), which the merge needs to drop objects outside it; None without ``--aoi``.
    """

    kept: tuple[bool, ...]
    skipped_nodata: int = 0
    skipped_aoi: int = 0
    area: str | None = None

    @property
    def skipped(self) -> int:
        return self.skipped_nodata + self.skipped_aoi

    def to_json(self) -> dict[str, Any]:
        return {
            "tiles": len(self.kept),
            "kept": pack_flags(self.kept),
            "skipped_nodata": self.skipped_nodata,
            "skipped_aoi": self.skipped_aoi,
            "area": self.area,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SceneCoverage:
        kept = unpack_flags(d["kept"], int(d["tiles"]))
        return cls(kept, int(d.get("skipped_nodata", 0)), int(d.get("skipped_aoi", 0)), d.get("area"))


def scene_coverage(
    windows: Sequence[Window], has_data: Sequence[bool] | None, in_area: Sequence[bool] | None, area: str | None
) -> SceneCoverage:
    """The coverage of ``windows`` from the two tests (None: every window passes it).

    A window outside the area is counted there, whatever its data: the area is the user's choice.
    """
    data = list(has_data) if has_data is not None else [True] * len(windows)
    inside = list(in_area) if in_area is not None else [True] * len(windows)
    kept = tuple(d and i for d, i in zip(data, inside))
    skipped_aoi = sum(not i for i in inside)
    skipped_nodata = sum(i and not d for d, i in zip(data, inside))
    return SceneCoverage(kept, skipped_nodata, skipped_aoi, area)


def mask_cells(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of the reduced-resolution mask the plan reads: cells of about
    ``tile_size / CELLS_PER_TILE`` pixels, at most ``MAX_CELLS`` a side."""
    cell = max(1, tile_size // CELLS_PER_TILE, math.ceil(max(width, height) / MAX_CELLS))
    return max(1, math.ceil(height / cell)), max(1, math.ceil(width / cell))


def windows_with_data(windows: Sequence[Window], cells: np.ndarray, width: int, height: int) -> list[bool]:
    """Whether each window may hold data, from ``cells``: the dataset's mask (0: nodata)
    averaged down to a coarse grid over the ``width`` x ``height`` scene.

    A cell that is not 0 has data somewhere in its footprint; a window is
    dropped only when every cell it touches, even in part, is 0 (a cell the
    window shares with a neighbour counts for both: the doubt keeps a tile).
    Averaging rounds a cell with under 1/510 of its pixels data to 0: a
    speck of a few pixels in a cell of nodata can go with its tile, never an object.
    """
    rows, cols = cells.shape
    any_data = cells != 0
    # summed-area table: any data in a block of cells in O(1)
    sat = np.zeros((rows + 1, cols + 1), np.int64)
    sat[1:, 1:] = any_data.cumsum(0).cumsum(1)
    out = []
    for w in windows:
        r0, r1 = math.floor(w.row * rows / height), min(rows, math.ceil((w.row + w.height) * rows / height))
        c0, c1 = math.floor(w.col * cols / width), min(cols, math.ceil((w.col + w.width) * cols / width))
        out.append(bool(sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]))
    return out


def windows_in_area(windows: Sequence[Window], area) -> list[bool]:
    """Whether each window meets ``area`` (a shapely geometry in scene pixels: x the column, y the row)."""
    import shapely

    boxes = shapely.box(
        [w.col for w in windows],
        [w.row for w in windows],
        [w.col + w.width for w in windows],
        [w.row + w.height for w in windows],
    )
    shapely.prepare(area)
    return [bool(v) for v in shapely.intersects(boxes, area)]


def cut_to_data(binary: np.ndarray, x0: int, y0: int, valid: np.ndarray) -> np.ndarray:
    """A pasted mask whose top-left lies at tile pixel (x0, y0), with the tile's
    nodata pixels (``valid`` False, a tile-sized bool array) turned off."""
    h, w = binary.shape
    th, tw = valid.shape
    out = binary.copy()
    r0, c0 = max(0, -y0), max(0, -x0)
    r1, c1 = min(h, th - y0), min(w, tw - x0)
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] &= valid[y0 + r0 : y0 + r1, x0 + c0 : x0 + c1]
    return out


def instances_in_area(instances: list[Instance], area) -> list[Instance]:
    """The instances with at least one pixel whose centre lies in ``area`` (shapely, scene pixels), in order."""
    import shapely
    from affine import Affine
    from rasterio.features import geometry_mask

    shapely.prepare(area)
    out = []
    for inst in instances:
        x0, y0, x1, y1 = inst.extent
        if not shapely.intersects(area, shapely.box(x0, y0, x1, y1)):
            continue
        inside = geometry_mask(
            [area], out_shape=inst.mask.shape, transform=Affine.translation(x0, y0), invert=True, all_touched=False
        )
        if np.any(inside & inst.mask):
            out.append(inst)
    return out


def pack_flags(flags: Sequence[bool]) -> str:
    """Flags as base64 of their bits: a scene's 10,000 tiles in 1.7 kB of scenes.json."""
    return base64.b64encode(np.packbits(np.asarray(flags, bool)).tobytes()).decode("ascii")


def unpack_flags(text: str, n: int) -> tuple[bool, ...]:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))[:n]
    return tuple(bool(b) for b in bits)
