"""Large rasters: tiling, merging across seams, georeferenced output, class maps.

The pure parts (windows, merging) are checked on hand-made pieces, where the
right answer is known whatever a model sees; the whole job runs once on a
generated GeoTIFF (UTM, 2560 x 2560 pixels, objects across every seam, many
larger than the tiles' overlap) with the shipped demo model.
"""

from __future__ import annotations

import errno
import json

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
from pycocotools import mask as mask_utils

from segbatch.config import JobConfig, ModelConfig
from segbatch.engine import run_job
from segbatch.errors import StorageFault
from segbatch.geo import Piece, Window, crop_record, parse_tile_item, plan_windows, stitch_instances, tile_item, to_8bit
from segbatch.storage import Storage, output_name
from segbatch.train import write_aerial_raster

# -- windows -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(2560, 2560), (1000, 333), (320, 320), (100, 50)])
def test_windows_cover_the_scene_with_full_tiles(width: int, height: int) -> None:
    tile, overlap = 320, 96
    windows = plan_windows(width, height, tile, overlap)
    covered = np.zeros((height, width), np.int32)
    for w in windows:
        assert (w.width, w.height) == (min(tile, width), min(tile, height))
        covered[w.row : w.row + w.height, w.col : w.col + w.width] += 1
    assert covered.min() >= 1
    cols = sorted({w.col for w in windows})
    assert all(b - a <= tile - overlap for a, b in zip(cols, cols[1:]))  # neighbours share at least the overlap
    with pytest.raises(ValueError, match="tile-overlap"):
        plan_windows(width, height, 64, 64)


def test_tile_items_round_trip_and_sort_by_position() -> None:
    windows = plan_windows(5000, 5000, 1024, 128)
    items = [tile_item("s3://b/scene.tif", w) for w in windows]
    assert sorted(items) == items
    assert [parse_tile_item(i) for i in items] == [("s3://b/scene.tif", w) for w in windows]
    assert parse_tile_item("s3://b/photo.jpg") is None


def test_16_bit_samples_scaled_by_a_fixed_range() -> None:
    data = np.array([[[0, 1000, 3000, 5000]]] * 3, np.uint16)
    out = to_8bit(data, [(1000.0, 3000.0)] * 3)
    assert out.shape == (1, 4, 3) and out[0, :, 0].tolist() == [0, 0, 255, 255]
    assert to_8bit(np.full((3, 2, 2), 7, np.uint8), None).shape == (2, 2, 3)


def test_crop_keeps_only_the_tiles_pixels_and_the_masks_own() -> None:
    binary = np.zeros((10, 10), bool)
    binary[2:5, 3:9] = True
    x, y, crop = crop_record(binary, -4, 1, Window(100, 200, 8, 8))  # pasted partly left of the tile
    mask = mask_utils.decode({"size": crop["size"], "counts": crop["counts"].encode()}).astype(bool)
    assert (x, y) == (100, 203) and mask.shape == (3, 5) and mask.all()
    assert crop_record(binary, 20, 20, Window(0, 0, 8, 8)) is None


def test_multiband_16_bit_raster_read_by_window_with_a_band_choice(tmp_path) -> None:
    """A 4-band uint16 scene (e.g. B, G, R, NIR): --bands picks R, G, B, --scale maps 16-bit to 8-bit."""
    import rasterio
    from rasterio.transform import from_origin

    from segbatch.geo import TileOptions, raster_info, read_tile

    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, size=(4, 300, 500), dtype=np.uint16)
    path = tmp_path / "multiband.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=500,
        height=300,
        count=4,
        dtype="uint16",
        crs="EPSG:3857",
        transform=from_origin(0, 0, 10, 10),
    ) as dst:
        dst.write(data)
    storage = Storage()
    info = raster_info(str(path), storage, TileOptions(256, 32, bands=(3, 2, 1), scale=(0.0, 4000.0)))
    assert (info.width, info.height, info.count, info.dtype) == (500, 300, 4, "uint16")
    assert info.scale == ((0.0, 4000.0),) * 3
    tile = read_tile(str(path), Window(200, 40, 256, 256), storage, info, (3, 2, 1))
    expected = np.clip(np.round(data[[2, 1, 0], 40:296, 200:456].astype(np.float32) * 255 / 4000), 0, 255)
    assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
    assert np.array_equal(tile, expected.transpose(1, 2, 0).astype(np.uint8))
    # without --scale, each band's own range over the whole scene (never per tile: seams would show)
    auto = raster_info(str(path), storage, TileOptions(256, 32, bands=(4,)))
    assert len(auto.scale) == 3 and auto.scale[0][0] <= data[3].min() + 1 and auto.scale[0][1] >= data[3].max() - 1
    with pytest.raises(ValueError, match="has bands 1 to 4"):
        raster_info(str(path), storage, TileOptions(256, 32, bands=(5, 2, 1)))


# -- merging ---------------------------------------------------------------------------------


def _disc(cx: float, cy: float, r: float, size: int = 200) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _piece(scene_mask: np.ndarray, w: Window, tile: int, label: int = 1, score: float = 0.9) -> Piece | None:
    """What a tile sees of an object: the mask cut to the tile, then to its own pixels."""
    inside = np.zeros_like(scene_mask)
    inside[w.row : w.row + w.height, w.col : w.col + w.width] = scene_mask[
        w.row : w.row + w.height, w.col : w.col + w.width
    ]
    ys, xs = np.nonzero(inside)
    if len(xs) == 0:
        return None
    y0, x0 = ys.min(), xs.min()
    crop = inside[y0 : ys.max() + 1, x0 : xs.max() + 1]
    return Piece(
        label,
        f"class_{label}",
        score,
        (float(x0), float(y0), float(xs.max() + 1), float(ys.max() + 1)),
        int(x0),
        int(y0),
        crop,
        tile=tile,
    )


def _scene_mask(inst, size: int = 200) -> np.ndarray:
    out = np.zeros((size, size), bool)
    out[inst.y0 : inst.y0 + inst.mask.shape[0], inst.x0 : inst.x0 + inst.mask.shape[1]] = inst.mask
    return out


TWO_TILES = [Window(0, 0, 120, 200), Window(80, 0, 120, 200)]  # they share columns 80..119


def test_an_object_cut_by_a_seam_is_one_object_with_its_whole_mask() -> None:
    obj = _disc(100, 100, 30)  # columns 70..130: neither tile sees all of it
    pieces = [p for k, w in enumerate(TWO_TILES) if (p := _piece(obj, w, k))]
    assert len(pieces) == 2 and not any(p.mask.sum() == obj.sum() for p in pieces)
    (inst,) = stitch_instances(pieces, TWO_TILES)
    assert np.array_equal(_scene_mask(inst), obj) and inst.pieces == 2


def test_an_object_in_the_overlap_seen_twice_is_reported_once() -> None:
    obj = _disc(100, 60, 12)  # columns 88..112: inside the overlap
    pieces = [_piece(obj, w, k, score=s) for k, (w, s) in enumerate(zip(TWO_TILES, (0.8, 0.95)))]
    (inst,) = stitch_instances(pieces, TWO_TILES)
    assert np.array_equal(_scene_mask(inst), obj) and inst.score == pytest.approx(0.95)


def test_neighbours_are_never_glued_together() -> None:
    """Two touching objects that one tile saw apart stay two, even if the other tile saw one blob."""
    left, right = _disc(90, 100, 12), _disc(113, 100, 12)  # they touch at column ~101
    a1 = _piece(left, TWO_TILES[0], 0)
    a2 = _piece(right, TWO_TILES[0], 0)
    blob = _piece(left | right, TWO_TILES[1], 1)
    instances = stitch_instances([a1, a2, blob], TWO_TILES)
    assert len(instances) == 2  # the blob joins one of them, never both
    far = _disc(100, 170, 10)
    other_class = [_piece(far, TWO_TILES[0], 0, label=1), _piece(far, TWO_TILES[1], 1, label=2)]
    assert len(stitch_instances(other_class, TWO_TILES)) == 2  # different classes never merge


def test_a_cut_duplicate_inside_its_whole_object_joins_it() -> None:
    """Near a tile's edge the model may report one object whole and again cut; one object it is."""
    whole = _disc(40, 100, 20)
    cut = whole.copy()
    cut[:, 50:] = False
    pieces = [_piece(whole, TWO_TILES[0], 0, score=0.8), _piece(cut, TWO_TILES[0], 0, score=0.95)]
    (inst,) = stitch_instances(pieces, TWO_TILES)
    assert np.array_equal(_scene_mask(inst), whole) and inst.score == pytest.approx(0.95)


def test_merging_many_objects_is_not_quadratic() -> None:
    """10,000 pieces on a grid of tiles: the spatial index keeps the pairs to the overlaps."""
    import time

    rng = np.random.default_rng(0)
    windows = plan_windows(6000, 6000, 600, 100)
    pieces = []
    for k, w in enumerate(windows):
        for _ in range(10000 // len(windows)):
            x, y = w.col + int(rng.integers(0, w.width - 12)), w.row + int(rng.integers(0, w.height - 12))
            pieces.append(Piece(1, "a", 0.9, (x, y, x + 12, y + 12), x, y, np.ones((12, 12), bool), tile=k))
    t0 = time.perf_counter()
    instances = stitch_instances(pieces, windows)
    assert len(instances) <= len(pieces) and time.perf_counter() - t0 < 30


# -- the whole job on a GeoTIFF ----------------------------------------------------------------

SIZE, TILE, OVERLAP, PIXEL = 2560, 320, 32, 0.5  # roofs reach 75 px: many are cut in every tile


@pytest.fixture(scope="module")
def tiled_job(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("geo")
    (root / "scenes").mkdir()
    scene = root / "scenes" / "orthomosaic.tif"
    truth = write_aerial_raster(str(scene), SIZE, SIZE, seed=7, pixel_size=PIXEL)
    dest = root / "dest"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        cfg = JobConfig(
            source=str(root / "scenes"),
            dest=str(dest),
            shard_size=16,
            workers=1,
            cpus_per_worker=2,
            model=ModelConfig(model="demo", min_size=TILE, max_size=TILE),
            tile_size=TILE,
            tile_overlap=OVERLAP,
            semantic_out=str(root / "classes"),
            progress="none",
        )
        result = run_job(cfg)
        files = {p: p.read_bytes() for p in sorted((dest / "data").iterdir()) + sorted((dest / "objects").iterdir())}
        again = run_job(cfg)  # the same command on the same DEST: nothing is left to do
    finally:
        ray.shutdown()
    return {
        "scene": str(scene),
        "dest": dest,
        "truth": truth,
        "result": result,
        "classes": root / "classes",
        "again": again,
        "files": files,
    }


def _crop(mask: np.ndarray) -> tuple[int, int, np.ndarray]:
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(xs[0]), int(ys[0]), mask[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]


def _iou(a: tuple[int, int, np.ndarray], b: tuple[int, int, np.ndarray]) -> float:
    """IoU of two masks given as (x0, y0, crop)."""
    (ax, ay, am), (bx, by, bm) = a, b
    x0, y0 = max(ax, bx), max(ay, by)
    x1, y1 = min(ax + am.shape[1], bx + bm.shape[1]), min(ay + am.shape[0], by + bm.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0.0
    inter = np.count_nonzero(am[y0 - ay : y1 - ay, x0 - ax : x1 - ax] & bm[y0 - by : y1 - by, x0 - bx : x1 - bx])
    return inter / (np.count_nonzero(am) + np.count_nonzero(bm) - inter)


def _decode(mask: dict) -> np.ndarray:
    return mask_utils.decode({"size": list(mask["size"]), "counts": mask["counts"].encode()}).astype(bool)


def test_one_row_per_scene_and_each_object_once(tiled_job) -> None:
    result = tiled_job["result"]
    windows = plan_windows(SIZE, SIZE, TILE, OVERLAP)
    assert (
        result.complete
        and result.summary.rows == result.summary.scenes == 1
        and result.summary.tiles == len(windows) == 81
    )
    (row,) = pq.read_table(tiled_job["dest"] / "data").to_pylist()
    assert row["uri"] == tiled_job["scene"] and row["status"] == "ok" and (row["width"], row["height"]) == (SIZE, SIZE)
    found = [(d["label"], _crop(_decode(d["mask"]))) for d in row["detections"]]
    matched, duplicated, cut_and_found = 0, 0, 0
    for t in tiled_job["truth"]:
        truth = (t["x0"], t["y0"], t["mask"])
        hits = [k for k, (label, m) in enumerate(found) if label == t["label"] and _iou(m, truth) >= 0.5]
        matched += bool(hits)
        # Two confident reports of one object: what tiles seeing it twice would cause. (The model's
        # own low-confidence guesses, e.g. a blob straddling two roofs, are not the tiler's to drop.)
        duplicated += sum(row["detections"][k]["score"] >= 0.8 for k in hits) > 1
        # no single tile saw the whole object: only merging its pieces finds it whole
        x1, y1 = t["x0"] + t["mask"].shape[1], t["y0"] + t["mask"].shape[0]
        cut = not any(
            w.col <= t["x0"] and x1 <= w.col + w.width and w.row <= t["y0"] and y1 <= w.row + w.height for w in windows
        )
        cut_and_found += cut and bool(hits)
    n = len(tiled_job["truth"])
    assert duplicated == 0, "an object reported twice"
    assert matched >= 0.8 * n, f"{matched} of {n} objects found"
    assert cut_and_found >= 3, "objects no tile saw whole are found whole"


def test_a_rerun_resumes_and_finds_nothing_to_do(tiled_job) -> None:
    from click.testing import CliRunner

    from segbatch.cli import main

    status = CliRunner().invoke(main, ["status", str(tiled_job["dest"])])
    assert status.exit_code == 0 and "81/81 tiles committed" in status.output and "scenes merged: 1/1" in status.output
    again = tiled_job["again"]
    assert again.complete and again.summary.images_this_run == 0 and again.summary.rows == 1
    now = {
        p: p.read_bytes()
        for p in sorted((tiled_job["dest"] / "data").iterdir()) + sorted((tiled_job["dest"] / "objects").iterdir())
    }
    assert now == tiled_job["files"]


def test_objects_are_geoparquet_in_the_rasters_crs(tiled_job) -> None:
    import geopandas
    import rasterio

    objects = geopandas.read_parquet(tiled_job["dest"] / "objects")
    with rasterio.open(tiled_job["scene"]) as ds:
        assert objects.crs == ds.crs and objects.crs.to_epsg() == 32633
        transform = ds.transform
    (row,) = pq.read_table(tiled_job["dest"] / "data").to_pylist()
    assert len(objects) == len(row["detections"])
    assert objects["stac_id"].isna().all()  # SOURCE is a folder, not a STAC catalog
    geo = json.loads(pq.read_schema(next((tiled_job["dest"] / "objects").iterdir())).metadata[b"geo"])
    assert geo["columns"]["geometry"]["encoding"] == "WKB"
    for _, obj in objects.head(50).iterrows():
        mask = _decode(obj["mask"])
        assert obj.geometry.area == pytest.approx(mask.sum() * PIXEL * PIXEL)  # pixel corners, exactly
        ys, xs = np.nonzero(mask)
        cx, cy = transform @ (xs.mean() + 0.5, ys.mean() + 0.5)  # the mask's centre on the map
        assert obj.geometry.centroid.x == pytest.approx(cx, abs=PIXEL) and obj.geometry.centroid.y == pytest.approx(
            cy, abs=PIXEL
        )


def test_class_map_is_a_cog_with_the_inputs_georeferencing(tiled_job) -> None:
    import rasterio

    cmap_path = tiled_job["classes"] / output_name(tiled_job["scene"], ".tif")
    with rasterio.open(tiled_job["scene"]) as src, rasterio.open(cmap_path) as cmap:
        assert (cmap.crs, cmap.transform, cmap.shape) == (src.crs, src.transform, src.shape)
        assert cmap.profile["tiled"] and cmap.overviews(1), "tiled, with overviews: a Cloud-Optimized GeoTIFF"
        classes = cmap.read(1)
    (row,) = pq.read_table(tiled_job["dest"] / "data").to_pylist()
    expected = np.zeros((SIZE, SIZE), np.uint8)
    for d in sorted(row["detections"], key=lambda d: d["score"]):  # the best score wins a pixel
        expected[_decode(d["mask"])] = d["label"]
    assert np.array_equal(classes, expected)


def test_a_raster_is_read_by_windows_from_object_storage(s3, tmp_path) -> None:
    import rasterio
    from rasterio.windows import Window as RWindow

    local = tmp_path / "small.tif"
    write_aerial_raster(str(local), 600, 500, seed=3, keep_truth=False)
    Storage(s3.storage_options).write_bytes(s3.url("rasters/small.tif"), local.read_bytes())
    window = RWindow(250, 200, 300, 250)
    remote = Storage(s3.storage_options).read_raster(
        s3.url("rasters/small.tif"), lambda ds: (ds.crs, ds.transform, ds.read(window=window))
    )
    with rasterio.open(local) as here:
        assert remote[:2] == (here.crs, here.transform)
        assert np.array_equal(remote[2], here.read(window=window))


def test_class_map_of_256_classes_or_more_is_uint16(tmp_path) -> None:
    import rasterio

    from segbatch.geo import Instance, RasterInfo, write_class_map

    info = RasterInfo(64, 48, 3, "uint8", None, (0.5, 0.0, 100.0, 0.0, -0.5, 200.0), None)
    mask = np.ones((10, 20), bool)
    instances = [
        Instance(300, "class_300", 0.9, (5, 4, 25, 14), 5, 4, mask),
        Instance(7, "class_7", 0.5, (0, 0, 10, 10), 0, 0, mask),
    ]
    write_class_map(instances, info, str(tmp_path / "classes.tif"), block=32)
    with rasterio.open(tmp_path / "classes.tif") as ds:
        classes = ds.read(1)
    expected = np.zeros((48, 64), np.uint16)
    expected[0:10, 0:20] = 7
    expected[4:14, 5:25] = 300  # the better score wins
    assert classes.dtype == np.uint16 and np.array_equal(classes, expected)


# -- storage faults while reading rasters ------------------------------------------------------


class _FlakyFile(LocalFileOpener):
    def read(self, *args, **kw):
        if self.fs.fail_reads > 0:
            self.fs.fail_reads -= 1
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return super().read(*args, **kw)

    def close(self):
        if not self.closed:
            self.fs.open_files -= 1
        super().close()


class FlakyFileSystem(LocalFileSystem):
    """Local files as ``flaky://PATH``, which Storage reads as it reads a remote store
    (through rasterio's fsspec opener); the next ``fail_reads`` reads of a file are reset.
    ``opened`` counts the files opened, ``open_files`` those not yet closed."""

    protocol = ("flaky",)
    fail_reads = 0
    opened = 0
    open_files = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("flaky://"))

    def _open(self, path, mode="rb", block_size=None, **kw):
        self.opened += 1
        self.open_files += 1
        return _FlakyFile(path, mode, fs=self, **kw)


@pytest.fixture
def flaky(tmp_path):
    """(a Storage, its FlakyFileSystem, a 3-band scene's flaky:// URL, its [3, H, W] pixels)."""
    import rasterio
    from rasterio.transform import from_origin

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    data = np.random.default_rng(5).integers(0, 256, size=(3, 384, 512), dtype=np.uint8)
    path = tmp_path / "scene.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=512,
        height=384,
        count=3,
        dtype="uint8",
        crs="EPSG:3857",
        transform=from_origin(0, 0, 1, 1),
        tiled=True,
        blockxsize=128,
        blockysize=128,
        compress="deflate",
    ) as dst:
        dst.write(data)
    storage = Storage(retries=2, backoff_s=0.001)
    fs = storage.fs("flaky:///")[0]
    fs.fail_reads = fs.opened = fs.open_files = 0
    yield storage, fs, f"flaky://{path}", data
    fs.fail_reads = 0


def test_a_reset_while_reading_a_raster_is_retried_not_hidden(flaky) -> None:
    """GDAL swallows the errors of the files it reads through fsspec: a reset must
    not pass as a damaged raster, nor as a successful read."""
    from rasterio.windows import Window as RWindow

    storage, fs, url, data = flaky
    faults = iter([1])  # a reset after the open, once

    def read(ds):
        fs.fail_reads = next(faults, 0)
        return ds.read(window=RWindow(100, 50, 256, 256))

    assert np.array_equal(storage.read_raster(url, read), data[:, 50:306, 100:356])
    fs.fail_reads = 10**6  # storage down for longer than the retries: its own error, transient
    with pytest.raises(StorageFault, match="ConnectionResetError"):
        storage.read_raster(url, lambda ds: ds.read())


def test_a_storage_fault_fails_the_tile_a_damaged_raster_costs_its_row(flaky, tmp_path) -> None:
    from segbatch.engine import TileReading, fetch_and_decode
    from segbatch.geo import TileOptions, raster_info

    storage, fs, url, data = flaky
    fs.fail_reads = 1
    info = raster_info(url, storage, TileOptions(256, 32))  # the header's read is retried too
    assert (info.width, info.height, fs.fail_reads) == (512, 384, 0)
    w = Window(200, 100, 256, 256)

    def read(scene: str) -> object:
        return fetch_and_decode(tile_item(scene, w), storage, 1 << 26, 10**8, tiles=TileReading({scene: info}))

    fs.fail_reads = 1
    tile = read(url)
    assert tile.error_row is None and np.array_equal(tile.image, data[:, 100:356, 200:456].transpose(1, 2, 0))
    fs.fail_reads = 10**6  # retries spent: raised, so the shard is retried rather than committed with an error
    with pytest.raises(StorageFault, match="ConnectionResetError"):
        read(url)
    fs.fail_reads = 0
    whole = (tmp_path / "scene.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(whole[: len(whole) * 2 // 3])  # its last blocks are gone
    for scene in (url.replace("scene.tif", "cut.tif"), url.replace("scene.tif", "missing.tif")):
        row = read(scene).error_row
        assert row["status"] == "error" and row["error"].startswith("cannot read tile: RasterioIOError")


def _tiles_of(scene: str, storage, tiles, windows: list[Window]) -> list:
    """``fetch_and_decode`` of the scene's tiles at ``windows`` with one shard's ``tiles``."""
    from segbatch.engine import fetch_and_decode

    return [fetch_and_decode(tile_item(scene, w), storage, 1 << 26, 10**8, tiles=tiles) for w in windows]


def _pixels_of(data: np.ndarray, w: Window) -> np.ndarray:
    return data[:, w.row : w.row + w.height, w.col : w.col + w.width].transpose(1, 2, 0)


def test_a_threads_tiles_of_a_scene_share_one_open_dataset_closed_with_the_shard(flaky) -> None:
    """Consecutive tiles read by one thread open their scene once (its header is read once);
    the shard's end closes it, and no file stays open."""
    from segbatch.engine import TileReading
    from segbatch.geo import TileOptions, raster_info

    storage, fs, url, data = flaky
    info = raster_info(url, storage, TileOptions(128, 16))
    windows = plan_windows(512, 384, 128, 16)
    assert fs.open_files == 0
    opened = fs.opened
    with TileReading({url: info}) as tiles:
        out = _tiles_of(url, storage, tiles, windows)
        assert fs.opened - opened == 1 and fs.open_files == 1 and len(tiles.kept) == 1
    assert all(np.array_equal(d.image, _pixels_of(data, w)) for d, w in zip(out, windows))
    assert len(tiles.kept) == 0 and fs.open_files == 0


def test_a_fault_on_a_kept_dataset_drops_it_and_the_retry_reopens(flaky) -> None:
    from segbatch.engine import TileReading
    from segbatch.geo import TileOptions, raster_info

    storage, fs, url, data = flaky
    info = raster_info(url, storage, TileOptions(128, 16))
    first, second, third = Window(0, 0, 128, 128), Window(256, 256, 128, 128), Window(384, 0, 128, 128)
    with TileReading({url: info}) as tiles:
        _tiles_of(url, storage, tiles, [first])
        opened = fs.opened
        fs.fail_reads = 1  # a reset while reading the kept dataset's blocks
        (tile,) = _tiles_of(url, storage, tiles, [second])
        assert tile.error_row is None and np.array_equal(tile.image, _pixels_of(data, second))
        assert fs.opened - opened == 1 and fs.open_files == 1  # the faulty one closed, one reopened
        fs.fail_reads = 10**6  # retries spent: raised, and nothing left open
        with pytest.raises(StorageFault, match="ConnectionResetError"):
            _tiles_of(url, storage, tiles, [third])
        assert fs.open_files == 0 and len(tiles.kept) == 0
        fs.fail_reads = 0
        (tile,) = _tiles_of(url, storage, tiles, [third])
        assert np.array_equal(tile.image, _pixels_of(data, third))
    assert fs.open_files == 0


def test_kept_datasets_are_per_thread_and_closed_from_another(flaky, tmp_path) -> None:
    """Each I/O thread reads its own dataset (GDAL's are not thread-safe); the shard's end,
    in another thread, closes them all, and a scene read after it is not kept."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from segbatch.engine import TileReading
    from segbatch.geo import TileOptions, raster_info

    storage, fs, url, data = flaky
    other = url.replace("scene.tif", "other.tif")
    (tmp_path / "other.tif").write_bytes((tmp_path / "scene.tif").read_bytes())
    info = raster_info(url, storage, TileOptions(128, 16))
    windows = plan_windows(512, 384, 128, 16)
    tiles = TileReading({url: info, other: info})
    barrier = threading.Barrier(2)

    def read(scene: str) -> list:
        barrier.wait()  # both threads at once: two threads, two datasets
        return _tiles_of(scene, storage, tiles, windows)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(read, [url, other]))
    assert all(np.array_equal(d.image, _pixels_of(data, w)) for out in results for d, w in zip(out, windows))
    assert len(tiles.kept) == 2 and fs.open_files == 2
    tiles.close()
    assert fs.open_files == 0
    _tiles_of(url, storage, tiles, windows[:1])  # a read that outlived its shard
    assert len(tiles.kept) == 0 and fs.open_files == 0


def test_a_header_storage_kept_failing_to_read_is_never_kept(flaky, tmp_path) -> None:
    from segbatch.engine import JobStore
    from segbatch.engine.driver import _tile_items

    storage, fs, url, _ = flaky
    cfg = JobConfig(source=url, dest=str(tmp_path / "dest"), tile_size=256, tile_overlap=32)
    store = JobStore(cfg.dest, storage, tiled=True)
    missing = url.replace("scene.tif", "missing.tif")
    fs.fail_reads = 10**6
    with pytest.raises(StorageFault, match="1 rasters could not be read.*ConnectionResetError"):
        _tile_items(cfg, store, [url, missing])
    assert list(store.read_scenes()) == [missing]  # the missing scene's error is its own, kept
    assert "error" in store.read_scenes()[missing]
    fs.fail_reads = 0
    items = _tile_items(cfg, store, [url, missing])  # a rerun reads the header again
    assert len(items) == len(plan_windows(512, 384, 256, 32)) and "error" not in store.read_scenes()[url]


def test_bands_a_raster_lacks_stop_the_job_naming_the_fix(tmp_path) -> None:
    """--bands 5 on a 3-band scene is the user's to fix: the job stops before any work,
    naming the option and the bands the scene has (it is not one scene's error row)."""
    from segbatch.engine import JobError, prepare

    scene = tmp_path / "scenes" / "small.tif"
    scene.parent.mkdir()
    write_aerial_raster(str(scene), 300, 200, seed=3, keep_truth=False)
    cfg = JobConfig(
        source=str(scene.parent),
        dest=str(tmp_path / "out"),
        model=ModelConfig(model="random", seed=1),
        tile_size=128,
        tile_overlap=16,
        bands=(5,),
    )
    with pytest.raises(JobError, match=r"--bands 5: .*small.tif has bands 1 to 3"):
        prepare(cfg, Storage())
