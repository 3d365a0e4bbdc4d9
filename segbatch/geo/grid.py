"""The tile grid: a scene cut into square, overlapping windows, each one a work item.

A scene far larger than the model's input is cut into square tiles of
``tile_size`` pixels overlapping by ``overlap`` pixels. A tile is a work
item like an image (``SCENE#tile=ROW,COL,W,H``), read by its window
(``read.py``), so no process ever holds a whole scene, and the tiles of one
scene spread over every worker.
"""

from __future__ import annotations

from dataclasses import dataclass

TILE_MARK = "#tile="


@dataclass(frozen=True)
class Window:
    """A rectangle of scene pixels: columns ``col`` .. ``col + width``, rows ``row`` .. ``row + height``."""

    col: int
    row: int
    width: int
    height: int

    def intersection(self, other: Window) -> Window | None:
        c0, r0 = max(self.col, other.col), max(self.row, other.row)
        c1 = min(self.col + self.width, other.col + other.width)
        r1 = min(self.row + self.height, other.row + other.height)
        return Window(c0, r0, c1 - c0, r1 - r0) if c1 > c0 and r1 > r0 else None


@dataclass(frozen=True)
class TileOptions:
    """How rasters become the model's tiles (``JobConfig`` holds the user's values)."""

    tile_size: int
    overlap: int
    bands: tuple[int, ...] | None = None  # 1-based; None: 1, 2, 3 (or 1 for a single band)
    scale: tuple[float, float] | None = None  # (low, high) to map to 0..255; None: from each band's statistics


def plan_windows(width: int, height: int, tile_size: int, overlap: int) -> list[Window]:
    """Tiles covering a ``width`` x ``height`` scene, row by row.

    Neighbours overlap by at least ``overlap`` pixels; the last tile of a row
    or column is moved back to end at the scene's edge, so every tile is
    ``tile_size`` square (batches need no padding) unless the scene is smaller.
    """
    if not 0 <= overlap < tile_size:
        raise ValueError(f"--tile-overlap must be at least 0 and less than --tile-size ({tile_size}), not {overlap}")

    def starts(size: int) -> list[int]:
        if size <= tile_size:
            return [0]
        stride = tile_size - overlap
        out = list(range(0, size - tile_size, stride))
        return out + [size - tile_size]

    return [Window(c, r, min(tile_size, width), min(tile_size, height)) for r in starts(height) for c in starts(width)]


def tile_item(uri: str, w: Window) -> str:
    """The work item of one tile: its scene's URI and window (zero-padded, so items sort by position)."""
    return f"{uri}{TILE_MARK}{w.row:07d},{w.col:07d},{w.width},{w.height}"


def parse_tile_item(item: str) -> tuple[str, Window] | None:
    """(scene URI, window) of a tile item; None for a plain image URI."""
    uri, mark, spec = item.rpartition(TILE_MARK)
    if not mark:
        return None
    row, col, width, height = (int(v) for v in spec.split(","))
    return uri, Window(col, row, width, height)
