"""Reading a raster: its header once per scene, then each tile by its window, as 8-bit RGB."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from segbatch.errors import UsageError

from .grid import TileOptions, Window


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
    masked: bool = False  # some pixels may be nodata (a nodata value, an alpha band or an internal mask)

    def to_json(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["scale"] = [list(s) for s in self.scale] if self.scale else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RasterInfo:
        """From ``to_json``'s dict; other keys beside it in scenes.json (``stac_id``) are not the raster's."""
        scale = tuple(tuple(s) for s in d["scale"]) if d.get("scale") else None
        known = {f.name for f in fields(cls)}  # a scene's record also holds its coverage (``coverage.py``)
        kept = {k: v for k, v in d.items() if k in known}
        return cls(**{**kept, "transform": tuple(d["transform"]), "scale": scale})


def raster_info(uri: str, storage, options: TileOptions) -> RasterInfo:
    """A raster's size, bands, georeferencing and the 8-bit scaling its tiles will use.

    The scaling is fixed per scene (from ``options.scale``, or each band's
    approximate minimum and maximum, which GDAL reads from overviews or a
    sample): scaling each tile by its own range would make seams visible.
    """
    return storage.read_raster(uri, lambda ds: _header(ds, uri, options))


def _header(ds, uri: str, options: TileOptions) -> RasterInfo:
    """``raster_info`` of an open rasterio dataset."""
    from rasterio.enums import MaskFlags

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
        masked=any(MaskFlags.all_valid not in flags for flags in ds.mask_flag_enums),
    )


def read_data_cells(uri: str, storage, info: RasterInfo, shape: tuple[int, int]) -> np.ndarray:
    """The dataset's mask (GDAL's: nodata value, alpha band or internal mask alike)
    averaged down to ``shape`` (``coverage.mask_cells``): a cell not 0 holds data.

    A reduced-resolution read: GDAL takes it from the overviews' masks where
    the raster has them (a COG does), so planning a huge remote scene reads
    little; without overviews it reads the scene's mask (or bands) once.
    """
    from rasterio.enums import Resampling

    return storage.read_raster(uri, lambda ds: ds.dataset_mask(out_shape=shape, resampling=Resampling.average))


class BandsError(UsageError, ValueError):
    """``--bands`` names a band the raster does not have: the user's to fix, not the scene's."""


def model_bands(count: int, bands: tuple[int, ...] | None, uri: str = "") -> tuple[int, ...]:
    """The three bands (1-based) that become the model's R, G, B."""
    if bands is None:
        return (1, 2, 3) if count >= 3 else (1, 1, 1)
    if any(b < 1 or b > count for b in bands):
        raise BandsError(f"--bands {','.join(map(str, bands))}: {uri} has bands 1 to {count}")
    return bands if len(bands) == 3 else (bands[0],) * 3


def read_tile(uri: str, w: Window, storage, info: RasterInfo, bands: tuple[int, ...] | None, kept=None) -> np.ndarray:
    """The tile's pixels as [H, W, 3] uint8, read by its window only.

    kept: a ``storage.OpenRasters`` that keeps the scene open for the next
    tile this thread reads (None: opened and closed for this tile alone).
    """
    return read_tile_data(uri, w, storage, info, bands, kept)[0]


def read_tile_data(
    uri: str, w: Window, storage, info: RasterInfo, bands: tuple[int, ...] | None, kept=None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``read_tile``'s pixels, and for a raster with nodata the window's data mask
    ([H, W] bool, False where nodata; None when every pixel is data), read in the same step."""
    import rasterio.windows

    indexes = list(model_bands(info.count, bands, uri))
    window = rasterio.windows.Window(w.col, w.row, w.width, w.height)

    def read(ds):
        data = ds.read(indexes=indexes, window=window)  # [3, H, W]
        return data, (ds.dataset_mask(window=window) != 0 if info.masked else None)

    data, valid = storage.read_raster(uri, read, kept)
    return to_8bit(data, info.scale), valid


def tile_peak_bytes(w: Window, info: RasterInfo) -> int:
    """Host bytes ``read_tile`` allocates at its peak for the tile ``w`` of a
    scene: its 3 bands as read (in the raster's sample type), the uint8 tile, a
    byte a pixel for GDAL's own buffers, and, when scaled, one band's float32
    temporaries (3 at once, and a margin). Measured (a 1536 px tile of a tiled
    GeoTIFF, peak RSS): uint8 6.2, uint16 scaled 22.6, float32 scaled 29.1
    bytes a pixel, against 7, 26 and 32 here. GDAL's block cache is its own
    (``GDAL_CACHEMAX``)."""
    pixels = w.width * w.height
    mask = 2 if info.masked else 0  # the data mask as GDAL reads it, and as bool
    return pixels * (3 * np.dtype(info.dtype).itemsize + 3 + 1 + mask + (16 if info.scale else 0))


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
