"""`segbatch export DEST OUT.gpkg|.geojson|.fgb|.shp`: DEST/objects as a GIS vector file.

DEST/objects is written here by the project's own writer (``geo.scene.object_table``
over stitched instances, as a tiled job's merge does) for scenes in two UTM zones, so
most tests need no model; the output is read back through GDAL (pyogrio) and the
points checked against GDAL's own transformation (rasterio.warp), not pyproj's.
One test runs a tiny real tiled job and exports it through the command line.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely
from click.testing import CliRunner
from pyproj import CRS
from rasterio.crs import CRS as GdalCRS
from rasterio.warp import transform as gdal_transform

from segbatch.cli import main
from segbatch.geo.pieces import Instance
from segbatch.geo.read import RasterInfo
from segbatch.geo.scene import object_table, scene_row, unreadable_object_table
from segbatch.outputs.vector import (
    FEATURE_SCHEMA,
    ObjectsFile,
    ObjectsFileError,
    VectorExportError,
    choose_crs,
    export_vector,
    format_of,
    plan_export,
)
from segbatch.storage import Storage

PIXEL = 0.5  # metres


def _square(label: int, name: str, score: float, x0: int, y0: int, side: int) -> Instance:
    mask = np.ones((side, side), bool)
    return Instance(label, name, score, (x0, y0, x0 + side, y0 + side), x0, y0, mask)


def write_scene(
    dest, name: str, epsg: int | None, origin: tuple[float, float], instances: list[Instance], scene: str = ""
) -> str:
    """One scene's objects file, written as the merge writes it; returns the scene's URI."""
    scene = scene or f"s3://archive/{name}.tif"
    crs = GdalCRS.from_epsg(epsg).to_wkt() if epsg else None
    transform = (PIXEL, 0.0, origin[0], 0.0, -PIXEL, origin[1]) if epsg else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    info = RasterInfo(width=256, height=256, count=3, dtype="uint8", crs=crs, transform=transform, scale=None)
    row = scene_row(scene, info, instances, [], tiles=1)
    table = object_table(scene, info, row, instances)
    (dest / "objects").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, dest / "objects" / f"{name}.parquet")
    return scene


# Zone 31's scene: a roof at x 500000 (zone 31's central meridian, 3°E) and a car.
# Zone 32's: a roof whose top-left corner is (500000, 5000000): 9°E, its central meridian.
A_ORIGIN, B_ORIGIN = (499990.0, 5000010.0), (500000.0, 5000000.0)


@pytest.fixture
def two_zones(tmp_path):
    dest = tmp_path / "dest"
    a = write_scene(
        dest,
        "zone31",
        32631,
        A_ORIGIN,
        [_square(1, "roof", 0.9, 20, 20, 10), _square(2, "car", 0.8, 100, 40, 6)],
    )
    b = write_scene(
        dest, "zone32", 32632, B_ORIGIN, [_square(1, "roof", 0.95, 0, 0, 8), _square(1, "roof", 0.7, 50, 50, 4)]
    )
    return {"dest": dest, "a": a, "b": b}


def _read(path, layer=None):
    return pyogrio.read_dataframe(path, layer=layer)


def test_format_from_the_extension_or_the_option() -> None:
    assert format_of("x/objects.GPKG") == "gpkg" and format_of("s3://b/o.fgb") == "fgb"
    assert format_of("out.geojson") == "geojson" and format_of("out.shp") == "shp"
    assert format_of("out.json", "geojson") == "geojson"
    with pytest.raises(VectorExportError, match="--format"):
        format_of("out.json")
    with pytest.raises(VectorExportError, match="gpkg"):
        format_of("out.gpkg", "kml")


def test_gpkg_opens_in_gdal_with_one_crs_every_object_and_its_attributes(two_zones, tmp_path) -> None:
    dest, out = two_zones["dest"], tmp_path / "out" / "objects.gpkg"
    plan = plan_export(str(dest), Storage())
    assert "reprojected to EPSG:32631" in plan.note and plan.objects == 4
    result = export_vector(plan, str(out), Storage())
    assert result.outputs == [str(out)] and result.layers == {"objects": 4}
    info = pyogrio.read_info(out, layer="objects")
    assert info["driver"] == "GPKG" and info["features"] == 4 and info["geometry_type"] == "MultiPolygon"
    assert CRS.from_user_input(info["crs"]).to_epsg() == 32631
    assert set(FEATURE_SCHEMA.names) - {"geometry"} <= set(info["fields"])
    assert "mask" not in info["fields"] and "box" not in info["fields"]
    df = _read(out).sort_values(["uri", "score"], ascending=[True, False]).reset_index(drop=True)
    assert list(df["uri"]) == [two_zones["a"], two_zones["a"], two_zones["b"], two_zones["b"]]
    assert list(df["label_name"]) == ["roof", "car", "roof", "roof"] and list(df["label"]) == [1, 2, 1, 1]
    assert list(df["score"]) == pytest.approx([0.9, 0.8, 0.95, 0.7])
    assert list(df["area"]) == [100, 36, 64, 16]  # mask pixels
    assert list(df["map_area"]) == pytest.approx([25.0, 9.0, 16.0, 4.0])  # m² in the scene's own UTM zone
    assert list(df[["box_x1", "box_y1", "box_x2", "box_y2"]].iloc[1]) == [100, 40, 106, 46]
    # zone 31's own scene is not moved: its roof's corner is where its transform puts it
    x0, y0 = A_ORIGIN[0] + 20 * PIXEL, A_ORIGIN[1] - 20 * PIXEL
    assert df.geometry[0].bounds == pytest.approx((x0, y0 - 5.0, x0 + 5.0, y0))


def test_a_scene_in_another_zone_is_reprojected_like_gdal_does(two_zones, tmp_path) -> None:
    out = tmp_path / "objects.gpkg"
    export_vector(plan_export(str(two_zones["dest"]), Storage()), str(out), Storage())
    df = _read(out)
    roof = df[(df.uri == two_zones["b"]) & (df.score > 0.9)].geometry.iloc[0]
    # its top-left corner (500000, 5000000) in zone 32, by GDAL's transformation, in zone 31's metres
    (ex,), (ey,) = gdal_transform(GdalCRS.from_epsg(32632), GdalCRS.from_epsg(32631), [500000.0], [5000000.0])
    xs, ys = shapely.get_coordinates(roof).T
    assert np.min(np.hypot(xs - ex, ys - ey)) < 1e-6
    assert ex > 900000  # 6° east of zone 31's meridian at 45°N: x east, not swapped axes


def test_crs_option_reprojects_everything_known_points_land_on_their_meridians(two_zones, tmp_path) -> None:
    out = tmp_path / "wgs84.fgb"
    plan = plan_export(str(two_zones["dest"]), Storage(), crs="EPSG:4326")
    assert plan.note == "2 of 2 scenes reprojected to EPSG:4326 (--crs)"
    assert plan_export(str(two_zones["dest"]), Storage(), crs="EPSG:32632").note.startswith("1 of 2 scenes")
    export_vector(plan, str(out), Storage())
    info = pyogrio.read_info(out)
    assert info["driver"] == "FlatGeobuf" and info["features"] == 4
    assert CRS.from_user_input(info["crs"]).to_epsg() == 4326
    df = _read(out)
    b_roof = df[(df.uri == two_zones["b"]) & (df.score > 0.9)].geometry.iloc[0]
    lon, lat = b_roof.bounds[0], b_roof.bounds[3]
    assert lon == pytest.approx(9.0, abs=1e-9)  # x 500000 is zone 32's central meridian, 9°E: lon first
    (_,), (glat,) = gdal_transform(GdalCRS.from_epsg(32632), GdalCRS.from_epsg(4326), [500000.0], [5000000.0])
    assert lat == pytest.approx(glat, abs=1e-9) and 45 < lat < 45.2
    a_roof = df[df.label_name == "car"].geometry.iloc[0]
    assert 3.0 < a_roof.bounds[0] < 3.01  # zone 31's scene sits just east of 3°E
    assert list(df.sort_values("score")["map_area"]) == pytest.approx([4.0, 9.0, 25.0, 16.0])  # still in metres


@pytest.mark.parametrize("fmt", ["gpkg", "geojson", "fgb", "shp"])
def test_each_format_holds_every_object_with_its_attributes(two_zones, tmp_path, fmt) -> None:
    out = tmp_path / f"objects.{fmt}"
    export_vector(plan_export(str(two_zones["dest"]), Storage()), str(out), Storage())
    info = pyogrio.read_info(out)
    assert info["features"] == 4 and CRS.from_user_input(info["crs"]).to_epsg() == 32631
    df = _read(out)
    assert sorted(df["label_name"]) == ["car", "roof", "roof", "roof"]
    assert sorted(df["area"]) == [16, 36, 64, 100] and sorted(df["map_area"]) == pytest.approx([4, 9, 16, 25])
    # zone 32's squares, 6° off zone 31's meridian, grow by its scale error (about 0.5%): map_area keeps their own
    assert sorted(df.geometry.area) == pytest.approx([4, 9, 16, 25], rel=0.01)
    assert set(df["uri"]) == {two_zones["a"], two_zones["b"]}
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".segbatch-export-")]
    assert not leftovers


def test_layer_per_class_gpkg_has_a_layer_per_class_name(two_zones, tmp_path) -> None:
    out = tmp_path / "classes.gpkg"
    result = export_vector(plan_export(str(two_zones["dest"]), Storage()), str(out), Storage(), layer_per_class=True)
    assert result.layers == {"car": 1, "roof": 3} and result.outputs == [str(out)]
    layers = dict(pyogrio.list_layers(out))
    assert set(layers) == {"car", "roof"}
    assert pyogrio.read_info(out, layer="roof")["features"] == 3 and set(_read(out, "car")["label_name"]) == {"car"}
    assert CRS.from_user_input(pyogrio.read_info(out, layer="car")["crs"]).to_epsg() == 32631


@pytest.mark.parametrize("fmt", ["shp", "fgb", "geojson"])
def test_layer_per_class_in_a_single_layer_format_is_a_file_per_class(two_zones, tmp_path, fmt) -> None:
    out = tmp_path / f"objects.{fmt}"
    result = export_vector(plan_export(str(two_zones["dest"]), Storage()), str(out), Storage(), layer_per_class=True)
    assert sorted(result.outputs) == [str(tmp_path / f"objects_car.{fmt}"), str(tmp_path / f"objects_roof.{fmt}")]
    assert not out.exists()
    assert pyogrio.read_info(tmp_path / f"objects_roof.{fmt}")["features"] == 3
    car = _read(tmp_path / f"objects_car.{fmt}")
    assert list(car["label_name"]) == ["car"] and CRS.from_user_input(car.crs).to_epsg() == 32631
    if fmt == "shp":
        assert {f"objects_car{s}" for s in (".shp", ".dbf", ".shx", ".prj")} <= set(os.listdir(tmp_path))


def test_pixel_scenes_beside_georeferenced_ones_are_refused(two_zones, tmp_path) -> None:
    write_scene(two_zones["dest"], "photo", None, (0, 0), [_square(3, "dog", 0.6, 5, 5, 4)])
    with pytest.raises(VectorExportError, match="no CRS.*pixel coordinates") as err:
        plan_export(str(two_zones["dest"]), Storage())
    assert "photo.parquet" in str(err.value)


def test_pixel_scenes_alone_export_without_a_crs_and_empty_unreadable_scenes_do_not_count(tmp_path) -> None:
    dest = tmp_path / "dest"
    write_scene(dest, "photo", None, (0, 0), [_square(3, "dog", 0.6, 5, 5, 4)])
    pq.write_table(unreadable_object_table(), dest / "objects" / "broken.parquet")
    plan = plan_export(str(dest), Storage())
    assert plan.crs is None and plan.note == ""
    out = tmp_path / "px.gpkg"
    export_vector(plan, str(out), Storage())
    info = pyogrio.read_info(out)
    assert info["crs"] is None and info["features"] == 1
    assert _read(out).geometry[0].bounds == (5, 5, 9, 9) and np.isnan(_read(out)["map_area"][0])
    # one scene georeferenced beside an unreadable one (no CRS, no objects): no error
    write_scene(dest, "geo", 32631, A_ORIGIN, [_square(1, "roof", 0.9, 0, 0, 2)])
    os.remove(dest / "objects" / "photo.parquet")
    assert CRS.from_user_input(plan_export(str(dest), Storage()).crs).to_epsg() == 32631


def test_choose_crs_errors_name_the_cause_and_the_fix() -> None:
    pixel = ObjectsFile("d/objects/p.parquet", 3, None)
    with pytest.raises(VectorExportError, match="--crs EPSG:4326 was asked"):
        choose_crs([pixel], "EPSG:4326")
    with pytest.raises(VectorExportError, match="not a CRS pyproj knows"):
        choose_crs([ObjectsFile("a", 1, CRS.from_epsg(32631).to_json())], "EPSG:999999")


def test_no_objects_folder_says_what_to_run(tmp_path) -> None:
    with pytest.raises(VectorExportError, match="--tile-size"):
        plan_export(str(tmp_path), Storage())


def test_an_existing_output_is_replaced_whole(two_zones, tmp_path) -> None:
    out = tmp_path / "objects.gpkg"
    out.write_bytes(b"an older export")
    export_vector(plan_export(str(two_zones["dest"]), Storage()), str(out), Storage())
    assert pyogrio.read_info(out)["features"] == 4
    assert sorted(os.listdir(tmp_path)) == ["dest", "objects.gpkg"]


def test_s3_dest_and_out(two_zones, s3, tmp_path) -> None:
    for p in sorted((two_zones["dest"] / "objects").iterdir()):
        s3.put(f"job/objects/{p.name}", p.read_bytes())
    storage = Storage(s3.storage_options)
    plan = plan_export(s3.url("job"), storage)
    assert plan.objects == 4 and "reprojected" in plan.note
    result = export_vector(plan, s3.url("exports/roofs.shp"), storage, layer_per_class=True)
    assert sorted(result.outputs) == [s3.url("exports/roofs_car.shp"), s3.url("exports/roofs_roof.shp")]
    keys = s3.keys("exports/")
    assert {f"exports/roofs_roof{s}" for s in (".shp", ".dbf", ".shx", ".prj", ".cpg")} <= set(keys)
    local = tmp_path / "back"
    local.mkdir()
    for key in keys:
        (local / key.rsplit("/", 1)[1]).write_bytes(s3.get(key))
    roof = _read(local / "roofs_roof.shp")
    assert len(roof) == 3 and CRS.from_user_input(roof.crs).to_epsg() == 32631
    assert sorted(roof["map_area"]) == pytest.approx([4, 16, 25])


def test_the_command_line_exports_and_keeps_coco(two_zones, tmp_path) -> None:
    out = tmp_path / "cli.gpkg"
    run = CliRunner().invoke(main, ["export", str(two_zones["dest"]), str(out), "--layer-per-class"])
    assert run.exit_code == 0, run.output
    assert "reprojected to EPSG:32631" in run.output and "4 objects" in run.output
    assert {name for name, _ in pyogrio.list_layers(out)} == {"car", "roof"}
    run = CliRunner().invoke(main, ["export", str(two_zones["dest"]), str(tmp_path / "o.json")])
    assert run.exit_code == 2 and "--format" in run.output
    run = CliRunner().invoke(main, ["export", str(two_zones["dest"])])
    assert run.exit_code == 2 and "--coco" in run.output
    run = CliRunner().invoke(
        main, ["export", str(two_zones["dest"]), str(tmp_path / "o.json"), "--format", "geojson", "--crs", "EPSG:4326"]
    )
    assert run.exit_code == 0, run.output
    assert pyogrio.read_info(tmp_path / "o.json")["driver"] == "GeoJSON"


def test_a_damaged_objects_file_names_itself_and_leaves_no_output(two_zones, tmp_path) -> None:
    plan = plan_export(str(two_zones["dest"]), Storage())  # footers read while whole
    damaged = two_zones["dest"] / "objects" / "zone32.parquet"
    data = damaged.read_bytes()
    damaged.write_bytes(data[:4] + b"\0" * (len(data) - 8) + data[-4:])
    out = tmp_path / "objects.gpkg"
    with pytest.raises(ObjectsFileError, match="zone32.parquet cannot be read"):
        export_vector(plan, str(out), Storage())
    assert sorted(os.listdir(tmp_path)) == ["dest"]  # neither OUT nor the temporary folder


def test_a_real_tiled_job_over_two_utm_zones_exports_through_the_command_line(tmp_path) -> None:
    """Two small GeoTIFFs, in zones 31 and 32, segmented by tiles (demo model, local Ray), exported to a GeoPackage."""
    import ray

    from segbatch.config import JobConfig, ModelConfig
    from segbatch.engine import run_job
    from segbatch.train import write_aerial_raster

    scenes, dest, tile = tmp_path / "scenes", tmp_path / "dest", 192
    scenes.mkdir()
    write_aerial_raster(str(scenes / "a.tif"), 384, 384, seed=3, crs="EPSG:32631", origin=(499_900.0, 5_000_100.0))
    write_aerial_raster(str(scenes / "b.tif"), 384, 384, seed=4, crs="EPSG:32632", origin=(500_000.0, 5_000_000.0))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        cfg = JobConfig(
            source=str(scenes),
            dest=str(dest),
            workers=1,
            cpus_per_worker=2,
            model=ModelConfig(model="demo", min_size=tile, max_size=tile),
            tile_size=tile,
            tile_overlap=32,
            progress="none",
        )
        assert run_job(cfg).complete
    finally:
        ray.shutdown()
    objects = pq.read_table(dest / "objects", columns=["uri", "label_name", "score", "area", "geometry"]).to_pylist()
    assert {o["uri"] for o in objects} == {str(scenes / "a.tif"), str(scenes / "b.tif")}
    out = tmp_path / "exports" / "objects.gpkg"
    run = CliRunner().invoke(main, ["export", str(dest), str(out)])
    assert run.exit_code == 0, run.output
    assert "note: the scenes are in 2 CRSs" in run.output and f"{len(objects):,} objects of 2 scenes" in run.output
    info = pyogrio.read_info(out)
    assert info["features"] == len(objects) and CRS.from_user_input(info["crs"]).to_epsg() == 32631
    df = _read(out)
    key = lambda o: (o["uri"], round(o["score"], 5), o["area"])  # noqa: E731
    assert sorted(map(key, objects)) == sorted(
        (u, round(s, 5), a) for u, s, a in zip(df["uri"], df["score"], df["area"])
    )
    # each of zone 32's objects sits where GDAL puts its own centroid in zone 31
    exported = {key(o): g for o, g in zip(df.to_dict("records"), df.geometry)}
    b = [o for o in objects if o["uri"].endswith("b.tif")]
    assert b, "the demo model finds roofs in zone 32's scene"
    centroids = [shapely.from_wkb(o["geometry"]).centroid for o in b]
    xs, ys = gdal_transform(
        GdalCRS.from_epsg(32632), GdalCRS.from_epsg(32631), [c.x for c in centroids], [c.y for c in centroids]
    )
    for o, x, y in zip(b, xs, ys):
        c = exported[key(o)].centroid
        assert abs(c.x - x) < 0.05 and abs(c.y - y) < 0.05  # the outline's centroid moves with it (cm)


def test_no_spatial_index_writes_a_flatgeobuf_without_its_rtree(two_zones, tmp_path) -> None:
    plan = plan_export(str(two_zones["dest"]), Storage())
    with_index, without = tmp_path / "i.fgb", tmp_path / "n.fgb"
    export_vector(plan, str(with_index), Storage())
    export_vector(plan, str(without), Storage(), spatial_index=False)
    assert pyogrio.read_info(without)["features"] == pyogrio.read_info(with_index)["features"] == 4
    # the header's index node size: 0 when the file has no packed R-tree (FlatGeobuf's spec)
    assert _fgb_index_node_size(without) == 0 and _fgb_index_node_size(with_index) > 0
    run = CliRunner().invoke(main, ["export", str(two_zones["dest"]), str(tmp_path / "c.fgb"), "--no-spatial-index"])
    assert run.exit_code == 0, run.output
    assert _fgb_index_node_size(tmp_path / "c.fgb") == 0


def _fgb_index_node_size(path) -> int:
    """``index_node_size`` of a FlatGeobuf's header (a flatbuffer after the 8-byte magic and its
    uint32 length; field 9 of the Header table, 16 when absent, 0: no R-tree), read from the bytes:
    GDAL does not report it."""
    import struct

    data = open(path, "rb").read()
    (size,) = struct.unpack_from("<I", data, 8)
    header = data[12 : 12 + size]
    # a flatbuffer table: root offset -> table -> its vtable of field offsets
    (root,) = struct.unpack_from("<I", header, 0)
    (vt_off,) = struct.unpack_from("<i", header, root)
    vtable = root - vt_off
    (vt_len,) = struct.unpack_from("<H", header, vtable)
    slot = 4 + 2 * 9
    if slot >= vt_len:
        return 16
    (field,) = struct.unpack_from("<H", header, vtable + slot)
    return 16 if field == 0 else struct.unpack_from("<H", header, root + field)[0]


def test_features_of_a_batch_keep_a_null_box_as_nan_and_promote_polygons() -> None:
    import pyarrow as pa

    from segbatch import schema
    from segbatch.outputs.vector import features

    rows = [
        {"uri": "u", "label": 1, "label_name": "a", "score": 0.5, "box": [1, 2, 3, 4], "area": 4, "mask": None},
        {"uri": "u", "label": 2, "label_name": None, "score": 0.4, "box": None, "area": 9, "mask": None},
    ]
    rows[0]["geometry"] = shapely.box(0, 0, 2, 2).wkb
    rows[1]["geometry"] = shapely.MultiPolygon([shapely.box(5, 5, 6, 6), shapely.box(7, 7, 9, 9)]).wkb
    table = pa.Table.from_pylist(rows, schema=schema.OBJECT_SCHEMA)
    out = features(table, CRS.from_epsg(32631).to_json(), CRS.from_epsg(32631).to_json())
    assert out.schema == FEATURE_SCHEMA
    assert out["box_x1"].to_pylist()[0] == 1 and np.isnan(out["box_x1"].to_pylist()[1])
    geoms = shapely.from_wkb(out["geometry"].to_numpy(zero_copy_only=False))
    assert list(shapely.get_type_id(geoms)) == [shapely.GeometryType.MULTIPOLYGON] * 2
    assert out["map_area"].to_pylist() == [4.0, 5.0]
    assert features(table, None, None)["map_area"].to_pylist() == [None, None]  # pixels have no map area
