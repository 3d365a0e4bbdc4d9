"""Nodata and areas of interest: tiles without data, or outside ``--aoi``, are not segmented
(and are counted), and no object is reported in nodata or outside the area.

The rules are checked on their own (``geo/coverage.py``, ``geo/aoi.py``) against
real GDAL reads of scenes whose data is known pixel by pixel (a nodata value, an
alpha band, an internal mask; local and on S3), then whole jobs run on an
orthomosaic-like scene with a wide black border, with the shipped demo model.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from pycocotools import mask as mask_utils

from segbatch.config import ConfigError, JobConfig, ModelConfig
from segbatch.engine import run_job
from segbatch.engine.coverage import plan_coverage
from segbatch.geo import (
    AoiError,
    Area,
    Instance,
    SceneCoverage,
    TileOptions,
    Window,
    area_in_pixels,
    cut_to_data,
    instances_in_area,
    load_area,
    mask_cells,
    plan_windows,
    raster_info,
    read_data_cells,
    read_tile_data,
    scene_coverage,
    windows_in_area,
    windows_with_data,
)
from segbatch.storage import Storage
from segbatch.train import write_aerial_raster

SIZE, TILE, OVERLAP = 960, 320, 32  # plan_windows: starts 0, 288, 576, 640 on each axis: 16 tiles
DATA = (340, 620)  # rows and columns of the data; the rest is border: 4 tiles hold data, 12 none
CRS, ORIGIN, PIXEL = "EPSG:32633", (500_000.0, 4_500_000.0), 0.5


def _data_mask(lo: int = DATA[0], hi: int = DATA[1]) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    m[lo:hi, lo:hi] = True
    return m


def _write_scene(path, pixels: np.ndarray, kind: str, data: np.ndarray | None = None, crs: str | None = CRS) -> str:
    """``pixels`` ([3, H, W] uint8) as a tiled GeoTIFF whose nodata is told by ``kind``:
    "nodata" (the value 0), "alpha" (a 4th band), "mask" (an internal mask), "none" (nothing)."""
    import rasterio
    from rasterio.transform import from_origin

    data = data if data is not None else pixels.any(0)
    profile = {
        "driver": "GTiff",
        "width": pixels.shape[2],
        "height": pixels.shape[1],
        "count": 4 if kind == "alpha" else 3,
        "dtype": "uint8",
        "crs": crs,
        "transform": from_origin(*ORIGIN, PIXEL, PIXEL),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    if kind == "nodata":
        profile["nodata"] = 0
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels, [1, 2, 3])
        if kind == "alpha":
            dst.write(np.where(data, 255, 0).astype(np.uint8), 4)
            dst.colorinterp = [*dst.colorinterp[:3], rasterio.enums.ColorInterp.alpha]
        elif kind == "mask":
            dst.write_mask(np.where(data, 255, 0).astype(np.uint8))
    return str(path)


@pytest.fixture(scope="module")
def aerial(tmp_path_factory) -> np.ndarray:
    """An aerial scene's pixels ([3, SIZE, SIZE] uint8), no zero pixel in it (0 is the border's)."""
    import rasterio

    path = tmp_path_factory.mktemp("aerial") / "aerial.tif"
    write_aerial_raster(str(path), SIZE, SIZE, seed=11, pixel_size=PIXEL, keep_truth=False)
    with rasterio.open(path) as ds:
        return np.maximum(ds.read(), 1)


def _bordered(aerial: np.ndarray, data: np.ndarray) -> np.ndarray:
    return np.where(data[None], aerial, 0).astype(np.uint8)


# -- which tiles hold data: GDAL's mask, read at a reduced resolution --------------------------


@pytest.mark.parametrize("kind", ["nodata", "alpha", "mask"])
def test_the_plan_drops_exactly_the_tiles_without_data(aerial, tmp_path, kind) -> None:
    """Whatever tells nodata (a value, an alpha band, an internal mask), a tile runs
    when its pixels hold data, judged from a mask read at 1/16 of a tile's resolution."""
    data = _data_mask()
    data[100:104, 900:904] = True  # a 4 x 4 px island in the border: its tiles hold data
    path = _write_scene(tmp_path / f"{kind}.tif", _bordered(aerial, data), kind, data)
    storage = Storage()
    info = raster_info(path, storage, TileOptions(TILE, OVERLAP))
    assert info.masked
    windows = plan_windows(SIZE, SIZE, TILE, OVERLAP)
    cells = read_data_cells(path, storage, info, mask_cells(SIZE, SIZE, TILE))
    assert cells.shape == mask_cells(SIZE, SIZE, TILE) == (48, 48)  # cells of 20 px: 2,304 bytes read
    truth = [bool(data[w.row : w.row + w.height, w.col : w.col + w.width].any()) for w in windows]
    assert windows_with_data(windows, cells, SIZE, SIZE) == truth
    assert sum(truth) == 4 + 1  # the data's 4, and the island's (row 0, column 640)


@pytest.mark.parametrize("kind", ["nodata", "alpha", "mask", "none"])
def test_a_tile_is_read_with_its_data_mask(aerial, tmp_path, kind) -> None:
    """The worker reads a tile's mask with its pixels, for every kind of nodata; none without one."""
    data = _data_mask()
    path = _write_scene(tmp_path / f"{kind}.tif", _bordered(aerial, data), kind, data)
    storage = Storage()
    info = raster_info(path, storage, TileOptions(TILE, OVERLAP))
    w = Window(288, 576, TILE, TILE)
    image, valid = read_tile_data(path, w, storage, info, None)
    assert image.shape == (TILE, TILE, 3)
    if kind == "none":
        assert valid is None
    else:
        assert np.array_equal(valid, data[w.row : w.row + w.height, w.col : w.col + w.width])


def test_a_raster_without_nodata_plans_every_tile(aerial, tmp_path) -> None:
    path = _write_scene(tmp_path / "none.tif", _bordered(aerial, _data_mask()), "none")
    info = raster_info(path, Storage(), TileOptions(TILE, OVERLAP))
    cfg = JobConfig(source=str(tmp_path), dest=str(tmp_path / "dest"), tile_size=TILE, tile_overlap=OVERLAP)
    assert not info.masked and plan_coverage(path, info, Storage(), cfg, None) == {}


def test_a_remote_scene_and_aoi_are_planned_through_storage(aerial, tmp_path, s3) -> None:
    """The plan reads a remote raster's mask and a remote --aoi file through the job's storage options."""
    local = _write_scene(tmp_path / "remote.tif", _bordered(aerial, _data_mask()), "nodata")
    storage = Storage(s3.storage_options)
    storage.upload_file(local, s3.url("scenes/remote.tif"))
    geojson = _geojson_of_pixels(tmp_path / "aoi.geojson", 0, 0, 400, SIZE, "EPSG:4326")  # the left columns
    storage.upload_file(str(geojson), s3.url("aoi.geojson"))
    uri = s3.url("scenes/remote.tif")
    info = raster_info(uri, storage, TileOptions(TILE, OVERLAP))
    cfg = JobConfig(source=s3.url("scenes/"), dest=s3.url("dest"), tile_size=TILE, tile_overlap=OVERLAP)
    coverage = SceneCoverage.from_json(
        plan_coverage(uri, info, storage, cfg, load_area(s3.url("aoi.geojson"), storage))["coverage"]
    )
    # columns 0 and 288 meet the area (8 tiles, 8 outside); of those, rows and column 288 x 288, 576 hold data
    assert (coverage.skipped_aoi, coverage.skipped_nodata, sum(coverage.kept)) == (8, 6, 2)


def test_coverage_counts_and_round_trips() -> None:
    windows = plan_windows(SIZE, SIZE, TILE, OVERLAP)
    has_data = [k % 3 == 0 for k in range(len(windows))]
    in_area = [k < 10 for k in range(len(windows))]
    cov = scene_coverage(windows, has_data, in_area, "POLYGON ((0 0, 1 0, 1 1, 0 0))")
    assert cov.kept == tuple(d and a for d, a in zip(has_data, in_area))
    assert (cov.skipped_aoi, cov.skipped_nodata) == (6, 6) and cov.skipped + sum(cov.kept) == len(windows)
    assert SceneCoverage.from_json(json.loads(json.dumps(cov.to_json()))) == cov


# -- masks cut to the data; objects kept by the area --------------------------------------------


def test_a_mask_is_cut_to_the_tiles_data_pixels() -> None:
    valid = np.zeros((50, 60), bool)
    valid[:, 30:] = True
    binary = np.ones((20, 20), bool)
    # a mask over the data's edge, and one hanging off the tile's top-left corner
    cut = cut_to_data(binary, 20, 10, valid)
    assert cut[:, :10].sum() == 0 and cut[:, 10:].all()
    off = cut_to_data(binary, -5, -5, valid)  # its tile part lies in nodata; the rest is crop_record's to cut
    assert not off[5:, 5:].any() and off[:5].all() and off[:, :5].all()
    assert binary.all()  # the input is left as it was


def test_objects_with_a_pixel_in_the_area_are_kept_whole() -> None:
    import shapely

    area = shapely.box(0, 0, 100, 100)
    mask = np.ones((10, 10), bool)
    straddling = Instance(1, "a", 0.9, (95.0, 50.0, 105.0, 60.0), 95, 50, mask)
    outside = Instance(1, "a", 0.8, (100.0, 50.0, 110.0, 60.0), 100, 50, mask)  # touches the edge, no pixel in
    far = Instance(1, "a", 0.7, (300.0, 300.0, 310.0, 310.0), 300, 300, mask)
    kept = instances_in_area([straddling, outside, far], area)
    assert kept == [straddling] and kept[0].mask.sum() == 100


def test_a_lon_lat_bbox_lands_on_the_scenes_pixels() -> None:
    import shapely
    from pyproj import Transformer

    to_lonlat = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    lon0, lat0 = to_lonlat.transform(ORIGIN[0] + 100 * PIXEL, ORIGIN[1] - 600 * PIXEL)  # pixel (100, 600)
    lon1, lat1 = to_lonlat.transform(ORIGIN[0] + 500 * PIXEL, ORIGIN[1] - 200 * PIXEL)  # pixel (500, 200)
    from rasterio.transform import from_origin

    transform = tuple(from_origin(*ORIGIN, PIXEL, PIXEL))[:6]
    area = Area(shapely.box(lon0, lat0, lon1, lat1), "EPSG:4326")
    from rasterio.crs import CRS as RioCRS

    pixels = area_in_pixels(area, RioCRS.from_string(CRS).to_wkt(), transform, SIZE, SIZE, "scene.tif")
    x0, y0, x1, y1 = pixels.bounds
    # a lon/lat box is not square in UTM: its corners are where they were, its edges bow by under a pixel
    assert abs(x0 - 100) < 1.5 and abs(y0 - 200) < 1.5 and abs(x1 - 500) < 1.5 and abs(y1 - 600) < 1.5
    windows = plan_windows(SIZE, SIZE, TILE, OVERLAP)
    inside = windows_in_area(windows, pixels)
    assert inside == [w.col < 500 and w.col + w.width > 100 and w.row < 600 and w.row + w.height > 200 for w in windows]
    with pytest.raises(AoiError, match="plain.png has no CRS"):
        area_in_pixels(area, None, transform, SIZE, SIZE, "s3://b/plain.png")


def test_aoi_values_are_checked_when_the_job_is_configured(tmp_path) -> None:
    base = {"source": str(tmp_path), "dest": str(tmp_path / "d")}
    with pytest.raises(ConfigError, match="minlon,minlat,maxlon,maxlat"):
        JobConfig(**base, tile_size=TILE, aoi="15,45,14,46")
    with pytest.raises(ConfigError, match="add --tile-size"):
        JobConfig(**base, aoi="14,45,15,46")
    assert JobConfig(**base, tile_size=TILE, aoi="aoi.gpkg").tiling_fields()["aoi"] == "aoi.gpkg"
    assert "aoi" not in JobConfig(**base, tile_size=TILE).tiling_fields()  # older DESTs keep their result key


def test_an_aoi_file_in_any_crs_or_unreadable(tmp_path) -> None:
    gpkg = _geojson_of_pixels(tmp_path / "aoi.gpkg", 0, 0, 400, SIZE, "EPSG:3857", driver="GPKG")
    area = load_area(str(gpkg), Storage())
    assert "Pseudo-Mercator" in area.crs or "3857" in area.crs
    (tmp_path / "bad.geojson").write_text("not json")
    with pytest.raises(AoiError, match="bad.geojson: cannot read it as a vector file"):
        load_area(str(tmp_path / "bad.geojson"), Storage())
    with pytest.raises(AoiError, match="cannot read"):
        load_area(str(tmp_path / "missing.geojson"), Storage())


def _geojson_of_pixels(path, col0: int, row0: int, col1: int, row1: int, crs: str, driver: str = "GeoJSON"):
    """A vector file (in ``crs``) of the scene's pixels col0..col1 x row0..row1 (densified, then reprojected)."""
    import geopandas
    import shapely

    x0, x1 = ORIGIN[0] + col0 * PIXEL, ORIGIN[0] + col1 * PIXEL
    y0, y1 = ORIGIN[1] - row1 * PIXEL, ORIGIN[1] - row0 * PIXEL
    frame = geopandas.GeoDataFrame({"name": ["field"]}, geometry=[shapely.box(x0, y0, x1, y1)], crs=CRS)
    frame.geometry = frame.geometry.segmentize(10.0)
    frame.to_crs(crs).to_file(path, driver=driver)
    return path


# -- whole jobs --------------------------------------------------------------------------------


def _config(source, dest, **kw) -> JobConfig:
    return JobConfig(
        source=str(source),
        dest=str(dest),
        shard_size=4,
        workers=1,
        cpus_per_worker=2,
        batch_size=1,  # each tile alone: the same pixels give the same detections, whatever ran beside them
        model=ModelConfig(model="demo", min_size=TILE, max_size=TILE),
        tile_size=TILE,
        tile_overlap=OVERLAP,
        progress="none",
        **kw,
    )


@pytest.fixture(scope="module")
def jobs(aerial, tmp_path_factory) -> dict:
    """The same pixels with a nodata border (nodata=0, and an alpha band), without a nodata flag,
    and with --aoi as a lon/lat bbox and as a GeoJSON in EPSG:4326."""
    from pyproj import Transformer

    root = tmp_path_factory.mktemp("coverage")
    data = _data_mask()
    pixels = _bordered(aerial, data)
    for name in ("bordered", "plain", "alpha"):
        (root / name).mkdir()
    _write_scene(root / "bordered" / "scene.tif", pixels, "nodata")
    _write_scene(root / "plain" / "scene.tif", pixels, "none")
    _write_scene(root / "alpha" / "scene.tif", pixels, "alpha", data)
    to_lonlat = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    lon0, lat0 = to_lonlat.transform(ORIGIN[0] + 0 * PIXEL, ORIGIN[1] - 500 * PIXEL)
    lon1, lat1 = to_lonlat.transform(ORIGIN[0] + 500 * PIXEL, ORIGIN[1] - 0 * PIXEL)
    bbox = f"{lon0},{lat0},{lon1},{lat1}"  # the scene's pixels 0..500 x 0..500, as lon/lat
    geojson = _geojson_of_pixels(root / "aoi.geojson", 500, 0, SIZE, SIZE, "EPSG:4326")  # the right half
    out: dict = {"root": root, "data": data, "bbox": bbox}
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        for name, source, kw in (
            ("bordered", "bordered", {}),
            ("plain", "plain", {}),
            ("alpha", "alpha", {}),
            ("bbox", "plain", {"aoi": bbox}),
            ("geojson", "bordered", {"aoi": str(geojson)}),
            ("elsewhere", "plain", {"aoi": "-1,-1,1,1"}),  # an area the scene does not meet
        ):
            cfg = _config(root / source, root / f"dest-{name}", **kw)
            out[name] = run_job(cfg)
            out[f"{name}-cfg"] = cfg
        dest = root / "dest-bordered"
        out["files"] = {p: p.read_bytes() for p in sorted((dest / "data").iterdir())}
        out["again"] = run_job(out["bordered-cfg"])  # the same command: nothing to do, no tile "missing"
    finally:
        ray.shutdown()
    return out


def _row(dest) -> dict:
    (row,) = pq.read_table(dest / "data").to_pylist()
    return row


def _mask(det: dict) -> np.ndarray:
    return mask_utils.decode({"size": list(det["mask"]["size"]), "counts": det["mask"]["counts"].encode()}).astype(bool)


@pytest.mark.parametrize("name", ["bordered", "alpha"])
def test_border_tiles_are_skipped_and_no_object_lies_in_nodata(jobs, name) -> None:
    result = jobs[name]
    s = result.summary
    assert result.complete and (s.scenes, s.rows, s.errors) == (1, 1, 0)
    assert (s.tiles, s.tiles_skipped_nodata, s.tiles_skipped_aoi) == (4, 12, 0)
    record = json.loads(next((jobs["root"] / f"dest-{name}" / "_segbatch" / "scenes").glob("*.json")).read_text())
    assert record["tiles"] == 4 and record["tiles_skipped"] == 12
    row = _row(jobs["root"] / f"dest-{name}")
    assert row["status"] == "ok" and (row["width"], row["height"]) == (SIZE, SIZE)
    assert len(row["detections"]) >= 5, "the data's objects are found"
    nodata = ~jobs["data"]
    for det in row["detections"]:
        m = _mask(det)
        assert m.any() and not (m & nodata).any(), "an object in nodata"
        assert det["area"] == m.sum()
    # the objects' polygons too, in the raster's CRS
    import geopandas
    import shapely

    objects = geopandas.read_parquet(jobs["root"] / f"dest-{name}" / "objects")
    lo, hi = DATA
    data_box = shapely.box(
        ORIGIN[0] + lo * PIXEL, ORIGIN[1] - hi * PIXEL, ORIGIN[0] + hi * PIXEL, ORIGIN[1] - lo * PIXEL
    )
    assert len(objects) == len(row["detections"]) and objects.geometry.within(data_box).all()


def test_the_data_tiles_find_what_they_find_without_skipping(jobs) -> None:
    """The same pixels without a nodata flag: every tile runs (16), the border's find nothing,
    and each object wholly in the data is found alike, mask and score, with skipping."""
    plain, bordered = jobs["plain"].summary, jobs["bordered"].summary
    assert plain.tiles == 16 and plain.tiles_skipped_nodata == 0
    skipped = {(d["score"], _mask(d).tobytes()) for d in _row(jobs["root"] / "dest-bordered")["detections"]}
    nodata = ~jobs["data"]
    whole = [d for d in _row(jobs["root"] / "dest-plain")["detections"] if not (_mask(d) & nodata).any()]
    assert len(whole) >= 5 and all((d["score"], _mask(d).tobytes()) in skipped for d in whole)
    assert bordered.tiles + bordered.tiles_skipped_nodata == plain.tiles


def test_a_rerun_plans_the_same_tiles_and_finds_nothing_missing(jobs) -> None:
    again = jobs["again"]
    assert again.complete and again.summary.images_this_run == 0 and again.summary.tiles == 4
    assert again.summary.tiles_skipped_nodata == 12
    dest = jobs["root"] / "dest-bordered"
    assert {p: p.read_bytes() for p in sorted((dest / "data").iterdir())} == jobs["files"]
    from click.testing import CliRunner

    from segbatch.cli import main

    status = CliRunner().invoke(main, ["status", str(dest)])
    assert status.exit_code == 0 and "4/4 tiles committed" in status.output and "tiles skipped" in status.output


def test_a_lon_lat_bbox_limits_tiles_and_objects(jobs) -> None:
    s = jobs["bbox"].summary
    # columns and rows 0 and 288 meet pixels 0..500 (the tiles at 576 and 640 start past it)
    assert jobs["bbox"].complete and (s.tiles, s.tiles_skipped_aoi, s.tiles_skipped_nodata) == (4, 12, 0)
    dets = _row(jobs["root"] / "dest-bbox")["detections"]
    assert dets, "the area's objects are found"
    for det in dets:
        ys, xs = np.nonzero(_mask(det))
        assert ((xs + 0.5 < 500.5) & (ys + 0.5 < 500.5)).any(), "an object with no pixel in the area"
    # each object of the whole scene lying well inside the area is found alike
    plain = _row(jobs["root"] / "dest-plain")["detections"]
    inner = [d for d in plain if not _mask(d)[460:].any() and not _mask(d)[:, 460:].any()]
    found = {(d["score"], _mask(d).tobytes()) for d in dets}
    assert inner and all((d["score"], _mask(d).tobytes()) in found for d in inner)
    assert len(dets) < len(plain), "objects outside the area are not reported"


def test_a_geojson_aoi_in_lon_lat_limits_tiles_and_objects_beside_nodata(jobs) -> None:
    s = jobs["geojson"].summary
    # 4 tiles (column 0) miss the area; of its 12, the 8 without data are skipped as nodata
    assert jobs["geojson"].complete and (s.tiles, s.tiles_skipped_aoi, s.tiles_skipped_nodata) == (4, 4, 8)
    dets = _row(jobs["root"] / "dest-geojson")["detections"]
    nodata = ~jobs["data"]
    assert dets
    for det in dets:
        m = _mask(det)
        assert m[:, 500:].any() and not (m & nodata).any()
    everything = _row(jobs["root"] / "dest-bordered")["detections"]
    assert len(dets) < len(everything), "objects left of the area are not reported"


def test_a_scene_the_area_misses_runs_no_tile_and_has_its_empty_row(jobs) -> None:
    result = jobs["elsewhere"]
    s = result.summary
    assert result.complete and (s.tiles, s.tiles_skipped_aoi, s.scenes, s.rows, s.errors) == (0, 16, 1, 1, 0)
    row = _row(jobs["root"] / "dest-elsewhere")
    assert row["status"] == "ok" and row["detections"] == [] and (row["width"], row["height"]) == (SIZE, SIZE)


def test_the_plan_stops_naming_a_scene_without_crs_or_an_unreadable_aoi(aerial, tmp_path) -> None:
    from segbatch.engine.driver import _tile_items
    from segbatch.engine.policy import JobError
    from segbatch.engine.store import JobStore

    (tmp_path / "scenes").mkdir()
    uri = _write_scene(tmp_path / "scenes" / "nocrs.tif", aerial, "none", crs=None)
    store = JobStore(str(tmp_path / "dest"), Storage(), tiled=True)
    with pytest.raises(JobError, match="nocrs.tif has no CRS"):
        _tile_items(_config(tmp_path / "scenes", tmp_path / "dest", aoi="14,40,16,41"), store, [uri])
    with pytest.raises(AoiError, match="gone.geojson: cannot read it"):
        _tile_items(_config(tmp_path / "scenes", tmp_path / "dest", aoi=str(tmp_path / "gone.geojson")), store, [uri])
    # without --aoi the same scene plans all its tiles
    assert len(_tile_items(_config(tmp_path / "scenes", tmp_path / "dest"), store, [uri])) == 16
