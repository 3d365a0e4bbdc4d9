"""DEST/objects from whole jobs: scenes in two UTM zones as one layer (``--objects-crs``), and a
GeoTIFF processed whole (no ``--tile-size``) that still gets its objects in its CRS.

Real photographs (skimage's) cut small and written as GeoTIFFs by rasterio, each with its own
CRS and transform; the model is seeded random weights with no score threshold, so every
image has detections to place on the map (where they fall is the model's; where their
polygons lie, given their masks, is what is checked).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pyproj import Transformer
from skimage import data as skdata

from segbatch.config import JobConfig, ModelConfig
from segbatch.engine import run_job
from segbatch.storage import Storage, join

MODEL = ModelConfig(model="random", seed=1, score_threshold=0.0, max_detections=4, min_size=128, max_size=128)
# (photo, EPSG, top-left corner): the two scenes lie side by side across the 6 E zone boundary
SCENES = {
    "west.tif": ("astronaut", 32631, (735_000.0, 5_000_000.0)),
    "east.tif": ("coffee", 32632, (265_000.0, 5_000_000.0)),
}
SIZE, PIXEL = 192, 1.0


def _write_geotiff(path, photo: str, epsg: int, origin: tuple[float, float], size: int = SIZE) -> None:
    import rasterio
    from rasterio.transform import from_origin

    image = getattr(skdata, photo)()[:size, :size]
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8"}
    profile.update(crs=f"EPSG:{epsg}", transform=from_origin(*origin, PIXEL, PIXEL), photometric="RGB")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(image.transpose(2, 0, 1))


def _job(tmp_path_factory, name: str, **options) -> dict:
    root = tmp_path_factory.mktemp(name)
    (root / "in").mkdir()
    cfg = JobConfig(
        source=str(root / "in"),
        dest=str(root / "dest"),
        model=MODEL,
        shard_size=4,
        workers=1,
        cpus_per_worker=2,
        progress="none",
        **options,
    )
    return {"root": root, "cfg": cfg}


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def two_zones(tmp_path_factory, ray_local) -> dict:
    job = _job(tmp_path_factory, "zones", tile_size=128, tile_overlap=32, objects_crs="EPSG:4326", simplify="1px")
    for name, (photo, epsg, origin) in SCENES.items():
        _write_geotiff(job["root"] / "in" / name, photo, epsg, origin)
    job["result"] = run_job(job["cfg"])
    return job


@pytest.fixture(scope="module")
def untiled(tmp_path_factory, ray_local) -> dict:
    from PIL import Image

    job = _job(tmp_path_factory, "whole")
    _write_geotiff(job["root"] / "in" / "field.tif", "chelsea", 32633, (500_000.0, 4_500_000.0), size=160)
    Image.fromarray(skdata.coffee()[:160, :160]).save(job["root"] / "in" / "shelf.png")
    job["result"] = run_job(job["cfg"])
    job["files"] = _files(job["root"] / "dest" / "objects")
    job["again"] = run_job(job["cfg"])
    return job


def _mask(d: dict) -> np.ndarray:
    return mask_utils.decode({"size": list(d["mask"]["size"]), "counts": d["mask"]["counts"].encode()}).astype(bool)


def test_scenes_in_two_utm_zones_read_back_as_one_layer_in_the_objects_crs(two_zones) -> None:
    import geopandas
    import rasterio
    import shapely
    from shapely.geometry import box

    assert two_zones["result"].complete
    dest = two_zones["root"] / "dest"
    objects = geopandas.read_parquet(dest / "objects")
    assert objects.crs.to_epsg() == 4326
    rows = {r["uri"]: r for r in pq.read_table(dest / "data").to_pylist()}
    assert set(objects["uri"]) == set(rows) and len(rows) == 2
    for uri, row in rows.items():
        mine = objects[objects["uri"] == uri]
        assert len(mine) == len(row["detections"]) > 0  # no --min-area: every detection has its polygon
        with rasterio.open(uri) as ds:
            transform, epsg = ds.transform, ds.crs.to_epsg()
        to_lonlat = Transformer.from_crs(epsg, 4326, always_xy=True)
        corners = [transform @ c for c in ((0, 0), (SIZE, 0), (SIZE, SIZE), (0, SIZE))]
        footprint = shapely.Polygon([to_lonlat.transform(x, y) for x, y in corners]).buffer(1e-7)
        for _, obj in mine.iterrows():
            assert obj.geometry.is_valid and footprint.contains(obj.geometry)
            mask = _mask(obj)
            ys, xs = np.nonzero(mask)
            # the mask's outline on the map (exact, then within the 1 px tolerance of --simplify)
            exact = shapely.MultiPoint([to_lonlat.transform(*(transform @ (x + 0.5, y + 0.5))) for x, y in zip(xs, ys)])
            lon, lat = to_lonlat.transform(*(transform @ (xs.mean() + 0.5, ys.mean() + 0.5)))
            east_m, north_m = 111_000 * np.cos(np.radians(lat)), 111_000  # metres a degree, here
            c = obj.geometry.centroid
            assert abs(c.x - lon) * east_m < 2 * PIXEL and abs(c.y - lat) * north_m < 2 * PIXEL
            assert exact.difference(obj.geometry.buffer(1.5 / north_m)).is_empty
    # the scenes' objects lie side by side on one map, either side of 6 E
    west = objects[objects["uri"].str.endswith("west.tif")].total_bounds
    east = objects[objects["uri"].str.endswith("east.tif")].total_bounds
    assert west[2] < 6.0 < east[0] and not box(*west).intersects(box(*east))
    for path in (dest / "objects").iterdir():  # every file: the one CRS, its bbox in longitude/latitude
        geo = json.loads(pq.read_schema(path).metadata[b"geo"])["columns"]["geometry"]
        assert geo["crs"]["id"] == {"authority": "EPSG", "code": 4326}
        part = objects[objects["uri"] == pq.read_table(path).column("uri")[0].as_py()]
        assert geo["bbox"] == pytest.approx(list(part.total_bounds))


def test_a_geotiff_processed_whole_gets_its_objects_in_its_crs(untiled) -> None:
    import geopandas

    assert untiled["result"].complete and untiled["result"].summary.rows == 2
    dest = untiled["root"] / "dest"
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in pq.read_table(dest / "data").to_pylist()}
    assert set(rows) == {"field.tif", "shelf.png"} and all(r["status"] == "ok" for r in rows.values())
    assert list(untiled["files"]) == ["part-00000-epsg32633.parquet"]  # the PNG has no place on a map: no objects
    objects = geopandas.read_parquet(dest / "objects")
    assert objects.crs.to_epsg() == 32633
    tif = rows["field.tif"]
    assert set(objects["uri"]) == {tif["uri"]} and len(objects) == len(tif["detections"]) > 0
    for (_, obj), det in zip(objects.iterrows(), tif["detections"]):
        mask = _mask(det)
        assert obj["mask"]["counts"] == det["mask"]["counts"] and obj.geometry.is_valid  # the row's mask, as it is
        assert obj.geometry.area == pytest.approx(mask.sum() * PIXEL * PIXEL)  # pixel corners, exactly
        x0, y0, x1, y1 = obj.geometry.bounds  # the transform puts pixel (0, 0)'s corner at (500000, 4500000)
        xs, ys = np.nonzero(mask.any(0))[0], np.nonzero(mask.any(1))[0]
        assert (x0, y1) == (500_000 + xs[0] * PIXEL, 4_500_000 - ys[0] * PIXEL)
        assert (x1, y0) == (500_000 + (xs[-1] + 1) * PIXEL, 4_500_000 - (ys[-1] + 1) * PIXEL)


def test_a_rerun_of_the_whole_geotiff_job_leaves_its_objects_as_they_were(untiled) -> None:
    again = untiled["again"]
    assert again.complete and again.summary.images_this_run == 0
    assert _files(untiled["root"] / "dest" / "objects") == untiled["files"]


# -- a shard's objects files: published whole, before its data file and commit record --------


class _DataWritesFail(Storage):
    """Real storage whose writes of a shard's data file fail (a crash between the two publishes)."""

    def write_parquet(self, table, url, **kw):
        if "epsg" not in url:
            raise OSError("the disk filled up")
        super().write_parquet(table, url, **kw)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shards_objects_are_published_before_its_data_and_record(where, tmp_path, request) -> None:
    from segbatch.engine import CommitRecord, JobStore
    from segbatch.geo.objects import empty_object_table
    from segbatch.geo.polygons import PolygonOptions

    if where == "local":
        dest, options = str(tmp_path / "dest"), {}
    else:
        s3 = request.getfixturevalue("s3")
        dest, options = s3.url("dest"), s3.storage_options
    objects = {"epsg4326": empty_object_table(PolygonOptions(crs="EPSG:4326"))}
    table = pa.table({"uri": ["a.tif"], "status": ["ok"]})
    store = JobStore(dest, Storage(options))
    store.write_plan(["a.tif"], 4)
    failing = JobStore(dest, _DataWritesFail(options))
    with pytest.raises(OSError, match="disk filled"):
        failing.commit(0, table, CommitRecord(rows=1), objects)
    (published,) = store.storage.list_files(store.objects)
    part = store.data_url(0).rsplit("/", 1)[1].removesuffix(".parquet")  # the shard's name, part-...
    assert published == join(store.objects, f"{part}-epsg4326.parquet")
    assert store.committed() == set()  # no record: the shard runs again, and rewrites it under the same name
    store.commit(0, table, CommitRecord(rows=1), objects)
    assert store.storage.list_files(store.objects) == [published] and store.committed() == {0}
    geo = json.loads(store.storage.read_parquet(published).schema.metadata[b"geo"])
    assert geo["columns"]["geometry"]["crs"]["id"]["code"] == 4326
