"""Large rasters: windows, tiles, merging across seams, georeferencing.

A scene far larger than the model's input is cut into square tiles of
``tile_size`` pixels overlapping by ``overlap`` pixels. A tile is a work
item like an image (``SCENE#tile=ROW,COL,W,H``), read by its window with
rasterio, so no process ever holds a whole scene, and the tiles of one
scene spread over every worker. Each tile's detections come back in scene
pixels, each mask cropped to its own pixels (a *piece*).

``merge_scene`` then finds the pieces that are one object: two pieces of
the same class from overlapping tiles whose masks agree inside the pixels
both tiles saw (IoU at least 0.5 there) are the same object, seen twice in
the overlap or in parts across a seam. Candidate pairs come from a spatial
index (shapely's STRtree), so the cost grows with the number of objects, not
its square. Groups are joined strongest agreement first, and never so that
a group holds two pieces of one tile: the model's own NMS already told those
apart, and refusing them stops the chains that glue neighbouring objects
into one (detectree2's over-merging). First, though, a piece lying mostly
(80%) inside another piece of its tile and class is taken as part of it:
near a tile's edge the model may report an object twice, once whole and once
cut, with boxes too different for its NMS; neighbours never lie inside each
other.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from pycocotools import mask as mask_utils
from segbatch.errors import UsageError

log = logging.getLogger(__name__)

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
class RasterInfo:
    """What the plan and the merge need of a raster, read from its header."""

    width: int
    height: int
    count: int  # bands
    dtype: str
    crs: str | None  # WKT; None when the raster is not georeferenced
    transform: tuple[float, ...]  # the affine pixel -> CRS transform, (a, b, c, d, e, f)
    scale: tuple[tuple[float, float], ...] | None  # (low, high) per model band; None: already 8-bit

    def to_json(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["scale"] = [list(s) for s in self.scale] if self.scale else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RasterInfo:
        scale = tuple(tuple(s) for s in d["scale"]) if d.get("scale") else None
        return cls(**{**d, "transform": tuple(d["transform"]), "scale": scale})


@dataclass(frozen=True)
class TileOptions:
    """How rasters become the model's tiles (``JobConfig`` holds the user's values)."""

    tile_size: int
    overlap: int
    bands: tuple[int, ...] | None = None  # 1-based; None: 1, 2, 3 (or 1 for a single band)
    scale: tuple[float, float] | None = None  # (low, high) to map to 0..255; None: from each band's statistics


# -- planning ---------------------------------------------------------------------------


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

    return [
        Window(c, r, min(tile_size, width), min(tile_size, height)) for r in starts(height) for c in starts(width)
    ]


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


def raster_info(uri: str, storage, options: TileOptions) -> RasterInfo:
    """A raster's size, bands, georeferencing and the 8-bit scaling its tiles will use.

    The scaling is fixed per scene (from ``options.scale``, or each band's
    approximate minimum and maximum, which GDAL reads from overviews or a
    sample): scaling each tile by its own range would make seams visible.
    """
    return storage.read_raster(uri, lambda ds: _header(ds, uri, options))


def _header(ds, uri: str, options: TileOptions) -> RasterInfo:
    """``raster_info`` of an open rasterio dataset."""
    bands = model_bands(ds.count, options.bands, uri)
    dtype = ds.dtypes[bands[0] - 1]
    scale = None
    if dtype != "uint8":
        if options.scale is not None:
            scale = tuple(options.scale for _ in bands)
        else:
            stats = ds.stats(indexes=list(bands), approx=True)
            scale = tuple((float(s.min), float(s.max)) for s in stats)
    return RasterInfo(
        width=ds.width,
        height=ds.height,
        count=ds.count,
        dtype=dtype,
        crs=ds.crs.to_wkt() if ds.crs else None,
        transform=tuple(ds.transform)[:6],
        scale=scale,
    )


class BandsError(UsageError, ValueError):
    """``--bands`` names a band the raster does not have: the user's to fix, not the scene's."""


def model_bands(count: int, bands: tuple[int, ...] | None, uri: str = "") -> tuple[int, ...]:
    """The three bands (1-based) that become the model's R, G, B."""
    if bands is None:
        return (1, 2, 3) if count >= 3 else (1, 1, 1)
    if any(b < 1 or b > count for b in bands):
        raise BandsError(f"--bands {','.join(map(str, bands))}: {uri} has bands 1 to {count}")
    return bands if len(bands) == 3 else (bands[0],) * 3


# -- reading ---------------------------------------------------------------------------


def read_tile(
    uri: str, w: Window, storage, info: RasterInfo, bands: tuple[int, ...] | None, kept=None
) -> np.ndarray:
    """The tile's pixels as [H, W, 3] uint8, read by its window only.

    kept: a ``storage.OpenRasters`` that keeps the scene open for the next
    tile this thread reads (None: opened and closed for this tile alone).
    """
    import rasterio.windows

    indexes = list(model_bands(info.count, bands, uri))
    window = rasterio.windows.Window(w.col, w.row, w.width, w.height)
    data = storage.read_raster(uri, lambda ds: ds.read(indexes=indexes, window=window), kept)  # [3, H, W]
    return to_8bit(data, info.scale)


def tile_peak_bytes(w: Window, info: RasterInfo) -> int:
    """Host bytes ``read_tile`` allocates at its peak for the tile ``w`` of a
    scene: its 3 bands as read (in the raster's sample type), the uint8 tile, a
    byte a pixel for GDAL's own buffers, and, when scaled, one band's float32
    temporaries (3 at once, and a margin). Measured (a 1536 px tile of a tiled
    GeoTIFF, peak RSS): uint8 6.2, uint16 scaled 22.6, float32 scaled 29.1
    bytes a pixel, against 7, 26 and 32 here. GDAL's block cache is its own
    (``GDAL_CACHEMAX``)."""
    pixels = w.width * w.height
    return pixels * (3 * np.dtype(info.dtype).itemsize + 3 + 1 + (16 if info.scale else 0))


def to_8bit(data: np.ndarray, scale: Iterable[tuple[float, float]] | None) -> np.ndarray:
    """[3, H, W] samples to [H, W, 3] uint8: ``low`` maps to 0 and ``high`` to 255, per band."""
    if scale is None:
        return np.ascontiguousarray(data.transpose(1, 2, 0)).astype(np.uint8, copy=False)
    out = np.empty(data.shape[1:] + (3,), np.uint8)
    for i, (low, high) in enumerate(scale):
        span = max(high - low, 1e-9)
        band = (data[i].astype(np.float32) - low) * (255.0 / span)
        out[..., i] = np.clip(np.nan_to_num(band), 0, 255).round().astype(np.uint8)
    return out


# -- pieces and their merging ----------------------------------------------------------


@dataclass
class Piece:
    """One detection of one tile, in scene pixels; ``mask`` covers rows/columns from (y0, x0)."""

    tile: int
    label: int
    label_name: str
    score: float
    box: tuple[float, float, float, float]
    x0: int
    y0: int
    mask: np.ndarray  # [h, w] bool

    @property
    def extent(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the mask's pixels, end exclusive."""
        return self.x0, self.y0, self.x0 + self.mask.shape[1], self.y0 + self.mask.shape[0]


@dataclass
class Instance:
    """One object of the scene after merging: its mask over its own extent."""

    label: int
    label_name: str
    score: float
    box: tuple[float, float, float, float]
    x0: int
    y0: int
    mask: np.ndarray  # [h, w] bool
    pieces: int = 1


def tile_pieces(records: list[dict[str, Any]], tile: int) -> list[Piece]:
    """A tile row's detections (``schema.TILE_DETECTION_TYPE``) as pieces."""
    out = []
    for d in records:
        crop = d["crop"]
        mask = mask_utils.decode({"size": list(crop["size"]), "counts": crop["counts"].encode()}).astype(bool)
        out.append(Piece(tile, d["label"], d["label_name"], d["score"], tuple(d["box"]), d["x0"], d["y0"], mask))
    return out


def crop_record(binary: np.ndarray, x0: int, y0: int, w: Window) -> tuple[int, int, dict[str, Any]] | None:
    """A pasted mask (top-left at tile pixel (x0, y0)) cut to the tile and to its own
    pixels, as (scene x, scene y, RLE of the crop); None when nothing is left."""
    h, wd = binary.shape
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + wd, w.width), min(y0 + h, w.height)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    region = binary[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    if len(rows) == 0:
        return None
    region = region[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
    crop = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return w.col + cx0 + int(cols[0]), w.row + cy0 + int(rows[0]), crop


def _agreement(a: Piece, b: Piece, shared: Window) -> float:
    """IoU of two pieces' masks inside ``shared``, the pixels both their tiles saw."""
    # the shared window, cut to where either piece has pixels
    x0, y0 = max(min(a.x0, b.x0), shared.col), max(min(a.y0, b.y0), shared.row)
    x1 = min(max(a.extent[2], b.extent[2]), shared.col + shared.width)
    y1 = min(max(a.extent[3], b.extent[3]), shared.row + shared.height)
    if x1 <= x0 or y1 <= y0:
        return 0.0

    def window_of(p: Piece) -> np.ndarray:
        out = np.zeros((y1 - y0, x1 - x0), bool)
        px0, py0, px1, py1 = p.extent
        cx0, cy0, cx1, cy1 = max(px0, x0), max(py0, y0), min(px1, x1), min(py1, y1)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = p.mask[cy0 - py0 : cy1 - py0, cx0 - px0 : cx1 - px0]
        return out

    ma, mb = window_of(a), window_of(b)
    union = np.count_nonzero(ma | mb)
    return np.count_nonzero(ma & mb) / union if union else 0.0


def merge_scene(pieces: list[Piece], windows: list[Window], iou_threshold: float = 0.5) -> list[Instance]:
    """Join the pieces that are one object (see the module docstring); best score first.

    pieces: every tile's detections; windows: the tiles, indexed by ``Piece.tile``.
    """
    if not pieces:
        return []
    from shapely import STRtree, box

    pieces = _absorb_within_tiles(pieces)
    extents = [box(*p.extent) for p in pieces]
    left, right = STRtree(extents).query(extents, predicate="intersects")
    edges = []
    for i, j in zip(left.tolist(), right.tolist()):
        a, b = pieces[i], pieces[j]
        if i >= j or a.tile == b.tile or a.label != b.label:
            continue
        shared = windows[a.tile].intersection(windows[b.tile])
        if shared is None:
            continue
        iou = _agreement(a, b, shared)
        if iou >= iou_threshold:
            edges.append((iou, i, j))
    # Strongest agreement first, never two pieces of one tile in a group.
    groups = _Groups(len(pieces))
    tiles = [{p.tile} for p in pieces]
    for _, i, j in sorted(edges, key=lambda e: (-e[0], e[1], e[2])):
        ri, rj = groups.root(i), groups.root(j)
        if ri != rj and not (tiles[ri] & tiles[rj]):
            groups.join(ri, rj)
            tiles[ri] |= tiles[rj]
    instances = [_join(g) for g in groups.members(pieces)]
    instances.sort(key=lambda inst: (-inst.score, inst.y0, inst.x0))
    return instances


def _absorb_within_tiles(pieces: list[Piece], share: float = 0.8) -> list[Piece]:
    """Join each piece to another of its tile and class that holds ``share`` of its pixels."""
    from shapely import STRtree, box

    extents = [box(*p.extent) for p in pieces]
    left, right = STRtree(extents).query(extents, predicate="intersects")
    groups = _Groups(len(pieces))
    for i, j in zip(left.tolist(), right.tolist()):
        a, b = pieces[i], pieces[j]
        if i >= j or a.tile != b.tile or a.label != b.label:
            continue
        if _overlap(a, b) >= share * min(np.count_nonzero(a.mask), np.count_nonzero(b.mask)):
            groups.join(groups.root(i), groups.root(j))
    out = []
    for g in groups.members(pieces):
        if len(g) == 1:
            out.append(g[0])
            continue
        joined = _join(g)
        out.append(Piece(g[0].tile, joined.label, joined.label_name, joined.score, joined.box, joined.x0, joined.y0, joined.mask))
    return out


class _Groups:
    """Union-find over indices 0..n-1."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def root(self, k: int) -> int:
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def join(self, keep: int, other: int) -> None:
        """Join the group of root ``other`` into that of root ``keep``."""
        self.parent[other] = keep

    def members(self, items: list) -> list[list]:
        groups: dict[int, list] = {}
        for k, item in enumerate(items):
            groups.setdefault(self.root(k), []).append(item)
        return list(groups.values())


def _overlap(a: Piece, b: Piece) -> int:
    """Pixels two masks share, in scene pixels."""
    x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
    x1 = min(a.x0 + a.mask.shape[1], b.x0 + b.mask.shape[1])
    y1 = min(a.y0 + a.mask.shape[0], b.y0 + b.mask.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0
    return int(np.count_nonzero(a.mask[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0] & b.mask[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]))


def _join(group: list[Piece]) -> Instance:
    best = max(group, key=lambda p: p.score)
    x0 = min(p.x0 for p in group)
    y0 = min(p.y0 for p in group)
    x1 = max(p.extent[2] for p in group)
    y1 = max(p.extent[3] for p in group)
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    for p in group:
        mask[p.y0 - y0 : p.extent[3] - y0, p.x0 - x0 : p.extent[2] - x0] |= p.mask
    box = (
        min(p.box[0] for p in group), min(p.box[1] for p in group),
        max(p.box[2] for p in group), max(p.box[3] for p in group),
    )  # fmt: skip
    return Instance(best.label, best.label_name, best.score, box, x0, y0, mask, len(group))


# -- georeferencing ------------------------------------------------------------------------


def instance_polygon(inst: Instance, transform: tuple[float, ...]):
    """The instance's outline as a shapely (Multi)Polygon in the raster's CRS
    (pixel corners through the affine ``transform``)."""
    from affine import Affine
    from rasterio.features import shapes
    from shapely.geometry import shape
    from shapely.ops import unary_union

    at = Affine(*transform) * Affine.translation(inst.x0, inst.y0)
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


# -- the class map ---------------------------------------------------------------------------


def write_class_map(
    instances: list[Instance], info: RasterInfo, path: str, block: int = 512
) -> None:
    """A per-pixel class map (0 the background) as a Cloud-Optimized GeoTIFF at local ``path``:
    uint8, or uint16 when a label does not fit in a byte (as ``postprocess.class_map``).

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

    dtype = np.uint8 if all(inst.label < 256 for inst in instances) else np.uint16
    profile = {
        "driver": "GTiff", "width": info.width, "height": info.height, "count": 1, "dtype": np.dtype(dtype).name,
        "tiled": True, "blockxsize": block, "blockysize": block, "compress": "deflate", "BIGTIFF": "IF_SAFER",
        "crs": info.crs, "transform": Affine(*info.transform), "nodata": None,
    }  # fmt: skip
    # each block's instances, worst score first (the best paints last, over the others)
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
                    canvas = np.zeros((w.height, w.width), dtype)
                    for inst in by_block.get((r // block, c // block), ()):
                        _paint(canvas, w, inst)
                    dst.write(canvas, 1, window=rasterio.windows.Window(w.col, w.row, w.width, w.height))
        rasterio.shutil.copy(plain, path, driver="COG", compress="DEFLATE", blocksize=block)


def _paint(canvas: np.ndarray, w: Window, inst: Instance) -> None:
    x0, y0 = max(inst.x0, w.col), max(inst.y0, w.row)
    x1 = min(inst.x0 + inst.mask.shape[1], w.col + w.width)
    y1 = min(inst.y0 + inst.mask.shape[0], w.row + w.height)
    if x1 <= x0 or y1 <= y0:
        return
    sub = inst.mask[y0 - inst.y0 : y1 - inst.y0, x0 - inst.x0 : x1 - inst.x0]
    canvas[y0 - w.row : y1 - w.row, x0 - w.col : x1 - w.col][sub] = inst.label


# -- a tile's detections ----------------------------------------------------------------------


def tile_detections(
    raw: dict[str, np.ndarray], w: Window, mask_threshold: float, classes: list[str]
) -> list[dict[str, Any]]:
    """One tile's raw detections (tile pixels, 28x28 masks) as ``schema.TILE_DETECTION_TYPE``
    records in scene pixels, each mask pasted over its box and cut to its own pixels."""
    import torch

    from segbatch.model import paste_box_masks

    masks = raw["masks"][:, 0] if raw["masks"].ndim == 4 else raw["masks"]
    pasted = paste_box_masks(torch.from_numpy(masks).float(), torch.from_numpy(raw["boxes"]), mask_threshold)
    out = []
    for (binary, x0, y0), box, label, score in zip(pasted, raw["boxes"].tolist(), raw["labels"].tolist(), raw["scores"].tolist()):
        cut = crop_record(binary, x0, y0, w)
        if cut is None:
            continue
        sx, sy, crop = cut
        out.append(
            {
                "label": int(label),
                "label_name": classes[label] if 0 <= label < len(classes) else str(label),
                "score": float(score),
                "box": [box[0] + w.col, box[1] + w.row, box[2] + w.col, box[3] + w.row],
                "x0": sx,
                "y0": sy,
                "crop": crop,
            }
        )
    return out
