"""STAC sources: a static catalog built here with pystac, its GeoTIFF assets written by
rasterio from skimage's photographs in a UTM CRS, served by moto's S3 (and read locally).

The unit tests read the catalog as the plan does (``read_stac``); the end-to-end
test runs a tiled job on the S3 catalog and on an ItemCollection with an item
that lacks the asset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from segbatch.storage import Storage
from segbatch.storage.stac import StacAssetError, StacError, read_stac

from s3util import S3Bucket, aws_test_env, new_bucket

UTM = "EPSG:32633"
ITEMS = {"scene-a": "astronaut", "scene-b": "coffee"}  # item id -> skimage.data photograph
SCENE = 160  # pixels a side: 4 tiles of 96 with an overlap of 32


def _geotiff(path: Path, photo: str, x0: float) -> None:
    """A small RGB GeoTIFF of a skimage photograph, placed at ``x0`` in UTM 33N, 10 m pixels."""
    import rasterio
    import skimage.data
    from rasterio.transform import from_origin

    rgb = getattr(skimage.data, photo)()[:SCENE, :SCENE]
    profile = {"driver": "GTiff", "width": SCENE, "height": SCENE, "count": 3, "dtype": "uint8", "crs": UTM}
    with rasterio.open(path, "w", transform=from_origin(x0, 4_500_000.0, 10.0, 10.0), **profile) as dst:
        dst.write(np.moveaxis(rgb, -1, 0))


def _item(item_id: str, x0: float, assets: dict[str, str]):
    import datetime

    import pystac

    bbox = [x0, 4_500_000.0 - SCENE * 10, x0 + SCENE * 10, 4_500_000.0]  # (in UTM; not checked by segbatch)
    geometry = {"type": "Polygon", "coordinates": [[[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]]]]}
    item = pystac.Item(item_id, geometry, bbox, datetime.datetime(2026, 6, 1), {})
    for key, href in assets.items():
        item.add_asset(key, pystac.Asset(href, media_type=pystac.MediaType.GEOTIFF))
    return item


def build_catalog(root: Path) -> dict[str, Path]:
    """A self-contained static catalog (relative hrefs) under ``root``:

    - ``catalog.json``: a Catalog whose two items each have a GeoTIFF asset ``visual``
      (and ``thumbnail``), beside their item JSON;
    - ``items.json``: an ItemCollection of the same two items plus ``scene-c``, which has
      only a ``thumbnail``; its assets' hrefs are relative to the collection's folder;
    - ``single/item.json``: one Item alone.
    """
    import pystac

    catalog = pystac.Catalog("archive", "test archive")
    features = []
    for k, (item_id, photo) in enumerate(ITEMS.items()):
        folder = root / item_id
        folder.mkdir(parents=True)
        _geotiff(folder / "visual.tif", photo, 500_000.0 + k * 5_000)
        catalog.add_item(_item(item_id, 500_000.0 + k * 5_000, {"visual": "./visual.tif", "thumbnail": "./t.png"}))
        feature = _item(item_id, 500_000.0 + k * 5_000, {"visual": f"{item_id}/visual.tif"}).to_dict()
        features.append(feature)
    features.append(_item("scene-c", 600_000.0, {"thumbnail": "scene-c/t.png"}).to_dict())
    catalog.normalize_hrefs(str(root))
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    (root / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    (root / "single").mkdir()
    _geotiff(root / "single" / "scene.tif", "chelsea", 700_000.0)
    single = _item("scene-single", 700_000.0, {"visual": "scene.tif"})
    single.set_self_href(str(root / "single" / "item.json"))
    single.save_object(include_self_link=False)
    return {"catalog": root / "catalog.json", "items": root / "items.json", "item": root / "single" / "item.json"}


def upload(bucket: S3Bucket, root: Path, prefix: str) -> None:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        bucket.put(f"{prefix}/{path.relative_to(root).as_posix()}", path.read_bytes())


@pytest.fixture(scope="module")
def local_catalog(tmp_path_factory) -> dict[str, Path]:
    return build_catalog(tmp_path_factory.mktemp("stac"))


@pytest.fixture(scope="module")
def s3_catalog(local_catalog, s3_server) -> S3Bucket:
    """The catalog uploaded under ``s3://BUCKET/stac/`` on moto (boto3, not segbatch)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in aws_test_env():
            mp.delenv(name, raising=False) if value is None else mp.setenv(name, value)
        bucket = new_bucket(s3_server, "stac")
        upload(bucket, local_catalog["catalog"].parent, "stac")
        yield bucket


# -- reading STAC documents (no Ray) ------------------------------------------------------


def test_a_catalog_on_s3_gives_each_items_asset_with_its_id(s3_catalog) -> None:
    storage = Storage(s3_catalog.storage_options)
    stac = read_stac(s3_catalog.url("stac/catalog.json"), storage)  # pystac could not read s3:// itself
    expected = {s3_catalog.url(f"stac/{i}/visual.tif"): i for i in ITEMS}
    assert stac.ids == expected and stac.uris == sorted(expected) and stac.errors == {}
    for uri in stac.uris:  # the resolved hrefs name the GeoTIFFs themselves
        assert storage.read_bytes(uri)[:4] in (b"II*\x00", b"MM\x00*")


def test_another_asset_key_is_picked_by_stac_asset(s3_catalog) -> None:
    stac = read_stac(s3_catalog.url("stac/catalog.json"), Storage(s3_catalog.storage_options), "thumbnail")
    assert stac.uris == [s3_catalog.url(f"stac/{i}/t.png") for i in sorted(ITEMS)]


def test_an_item_without_the_asset_among_others_is_one_error(s3_catalog) -> None:
    stac = read_stac(s3_catalog.url("stac/items.json"), Storage(s3_catalog.storage_options))
    with_asset = {s3_catalog.url(f"stac/{i}/visual.tif"): i for i in ITEMS}
    missing = s3_catalog.url("stac/items.json#scene-c")  # a feature without a self href: the document's
    assert stac.ids == {**with_asset, missing: "scene-c"}
    (error,) = stac.errors.values()
    assert list(stac.errors) == [missing]
    assert "'scene-c'" in error and "'visual'" in error and "thumbnail" in error


def test_no_item_with_the_asset_is_refused_naming_the_keys_they_have(s3_catalog) -> None:
    with pytest.raises(StacAssetError, match=r"no item .* has the asset 'nir'.*thumbnail, visual.*--stac-asset"):
        read_stac(s3_catalog.url("stac/catalog.json"), Storage(s3_catalog.storage_options), "nir")


def test_a_local_item_json_resolves_its_relative_asset(local_catalog) -> None:
    stac = read_stac(str(local_catalog["item"]), Storage())
    scene = str(local_catalog["item"].parent / "scene.tif")
    assert stac.ids == {scene: "scene-single"} and Path(scene).is_file()


def test_a_local_catalog_reads_as_the_s3_one(local_catalog) -> None:
    stac = read_stac(str(local_catalog["catalog"]), Storage())
    root = local_catalog["catalog"].parent
    assert stac.ids == {str(root / i / "visual.tif"): i for i in ITEMS}


def test_json_that_is_not_stac_and_a_broken_link_are_usage_errors(tmp_path, local_catalog) -> None:
    (tmp_path / "other.json").write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(StacError, match="not a STAC Item, ItemCollection, Collection or Catalog"):
        read_stac(str(tmp_path / "other.json"), Storage())
    with pytest.raises(StacError, match="does not exist"):
        read_stac(str(tmp_path / "nothing.json"), Storage())
    catalog = json.loads(local_catalog["catalog"].read_text())
    catalog["links"].append({"rel": "child", "href": "./gone/catalog.json"})
    (tmp_path / "catalog.json").write_text(json.dumps(catalog))
    with pytest.raises(StacError, match="leads to nothing"):
        read_stac(str(tmp_path / "catalog.json"), Storage())


@pytest.fixture(scope="module")
def http_catalog(local_catalog):
    """The local catalog's folder served over HTTP on 127.0.0.1 (a static catalog on a web server)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(local_catalog["catalog"].parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_catalog_url_over_http_and_a_folder_url_that_is_not_stac(http_catalog) -> None:
    stac = read_stac(f"{http_catalog}/catalog.json", Storage())
    assert stac.ids == {f"{http_catalog}/{i}/visual.tif": i for i in ITEMS}
    assert read_stac(f"{http_catalog}/scene-a/", Storage()) is None  # an HTML listing: listed as before


def test_sources_that_are_not_json_are_not_read_as_stac(tmp_path) -> None:
    assert read_stac(str(tmp_path), Storage()) is None
    assert read_stac(str(tmp_path / "list.txt"), Storage()) is None
    assert read_stac(str(tmp_path / "*.tif"), Storage()) is None


def test_a_catalog_where_no_item_has_the_asset_exits_2_before_any_work(s3_catalog, tmp_path) -> None:
    from segbatch.cli import main

    options = json.dumps(s3_catalog.storage_options)
    args = ["run", s3_catalog.url("stac/catalog.json"), str(tmp_path / "dest"), "--tile-size", "96"]
    result = CliRunner().invoke(main, [*args, "--stac-asset", "nir", "--storage-options", options, "--model", "random"])
    assert result.exit_code == 2, result.output
    assert "has the asset 'nir'" in result.output and "thumbnail, visual" in result.output
    assert "testing" not in result.output  # the credentials never reach a message
    assert not (tmp_path / "dest" / "data").exists()


# -- end to end: tiled jobs on STAC sources ------------------------------------------------------


def _job(source: str, dest: Path, storage_options: dict, tile_size: int = 96):
    from runutil import FAST_MODEL

    from segbatch.config import JobConfig, ModelConfig
    from segbatch.engine import run_job

    cfg = JobConfig(
        source=source,
        dest=str(dest),
        storage_options=storage_options,
        shard_size=4,
        workers=1,
        cpus_per_worker=1,
        model=ModelConfig(**FAST_MODEL),
        tile_size=tile_size,
        tile_overlap=32 if tile_size else 64,
        progress="none",
    )
    return run_job(cfg)


@pytest.fixture(scope="module")
def stac_jobs(s3_catalog, local_catalog, ray_local, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stac-jobs")
    options = s3_catalog.storage_options
    catalog = _job(s3_catalog.url("stac/catalog.json"), root / "catalog", options)
    files = sorted((root / "catalog" / "objects").iterdir())
    before = {p: p.read_bytes() for p in files}
    again = _job(s3_catalog.url("stac/catalog.json"), root / "catalog", options)
    items = _job(s3_catalog.url("stac/items.json"), root / "items", options)
    single = _job(str(local_catalog["item"]), root / "single", {}, tile_size=0)  # a local Item, images whole
    return {"root": root, "catalog": catalog, "again": again, "before": before, "items": items, "single": single}


@pytest.mark.slow
def test_a_stac_catalog_on_s3_runs_end_to_end_each_asset_once(stac_jobs, s3_catalog) -> None:
    import geopandas

    from segbatch.geo import plan_windows

    dest = stac_jobs["root"] / "catalog"
    result = stac_jobs["catalog"]
    tiles = len(plan_windows(SCENE, SCENE, 96, 32))
    assert result.complete and result.summary.scenes == 2 and result.summary.tiles == 2 * tiles
    rows = pq.read_table(dest / "data").to_pylist()
    assets = {s3_catalog.url(f"stac/{i}/visual.tif"): i for i in ITEMS}
    assert sorted(r["uri"] for r in rows) == sorted(assets)  # every asset once, nothing else
    assert all(r["status"] == "ok" and (r["width"], r["height"]) == (SCENE, SCENE) for r in rows)
    objects = geopandas.read_parquet(dest / "objects")
    assert len(objects) == sum(len(r["detections"]) for r in rows) > 0
    assert objects.crs.to_epsg() == 32633
    assert {(u, s) for u, s in zip(objects["uri"], objects["stac_id"])} == set(assets.items())
    # a rerun resumes: nothing to do, and the objects (with their ids) stay as they were
    again = stac_jobs["again"]
    assert again.complete and again.summary.images_this_run == 0
    assert {p: p.read_bytes() for p in sorted((dest / "objects").iterdir())} == stac_jobs["before"]


@pytest.mark.slow
def test_an_item_without_the_asset_costs_its_row_not_the_job(stac_jobs, s3_catalog) -> None:
    dest = stac_jobs["root"] / "items"
    result = stac_jobs["items"]
    assert result.complete and result.summary.scenes == 3 and result.summary.errors == 1
    rows = {r["uri"]: r for r in pq.read_table(dest / "data").to_pylist()}
    missing = rows.pop(s3_catalog.url("stac/items.json#scene-c"))
    assert missing["status"] == "error" and "'scene-c' has no asset 'visual'" in missing["error"]
    assert sorted(rows) == sorted(s3_catalog.url(f"stac/{i}/visual.tif") for i in ITEMS)
    assert all(r["status"] == "ok" for r in rows.values())
    ids = pq.read_table(dest / "objects", columns=["uri", "stac_id"]).to_pylist()
    assert {(o["uri"], o["stac_id"]) for o in ids} == {(s3_catalog.url(f"stac/{i}/visual.tif"), i) for i in ITEMS}


@pytest.mark.slow
def test_a_local_item_json_runs_untiled_its_asset_one_row(stac_jobs, local_catalog) -> None:
    result = stac_jobs["single"]
    (row,) = pq.read_table(stac_jobs["root"] / "single" / "data").to_pylist()
    assert result.complete and row["uri"] == str(local_catalog["item"].parent / "scene.tif")
    assert row["status"] == "ok" and (row["width"], row["height"]) == (SCENE, SCENE)


def test_objects_carry_their_scenes_stac_id_and_null_without_stac() -> None:
    from rasterio.crs import CRS

    from segbatch.geo import Instance, RasterInfo, object_table, scene_row

    transform = (10.0, 0.0, 500_000.0, 0.0, -10.0, 4_500_000.0)
    info = RasterInfo(8, 8, 3, "uint8", CRS.from_string(UTM).to_wkt(), transform, None)
    mask = np.ones((2, 3), bool)
    instances = [Instance(1, "roof", 0.9, (1.0, 2.0, 4.0, 4.0), 1, 2, mask)]
    row = scene_row("s3://b/a.tif", info, instances, [], 1)
    tagged = object_table("s3://b/a.tif", info, row, instances, stac_id="item-a")
    assert tagged.column("stac_id").to_pylist() == ["item-a"]
    plain = object_table("/a.tif", info, row, instances)
    assert plain.column("stac_id").to_pylist() == [None] and plain.schema.field("stac_id").nullable
