"""The polygon rules of DEST/objects (``geo/polygons.py``): reprojection, simplification, --min-area.

Pure: shapely and pyproj only, checked against pyproj's own transform of the same points
and against the exact pixel areas a traced mask has.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from pyproj import CRS, Transformer
from shapely.geometry import Polygon, box

from segbatch.config import JobConfig, result_key
from segbatch.errors import UsageError
from segbatch.geo import Instance, Measure, PolygonOptionError, PolygonOptions, instance_polygon, parse_measure
from segbatch.geo.objects import object_table
from segbatch.geo.polygons import keeps_area, output_polygon, reproject, simplify

UTM31, UTM32, WGS84 = (CRS.from_epsg(c).to_wkt() for c in (32631, 32632, 4326))
TRANSFORM = (0.5, 0.0, 699_000.0, 0.0, -0.5, 5_000_000.0)  # 0.5 m pixels in UTM 31N, near 45 N 5.5 E


def _pyproj(src: int, dst: int, xy: np.ndarray) -> np.ndarray:
    t = Transformer.from_crs(src, dst, always_xy=True)
    return np.column_stack(t.transform(xy[:, 0], xy[:, 1]))


@pytest.mark.parametrize("dst", [4326, 32632])
def test_a_square_reprojects_as_pyproj_puts_its_points_x_first(dst: int) -> None:
    square = box(699_000, 4_999_900, 699_100, 5_000_000)  # 100 m
    out = reproject(square, UTM31, CRS.from_epsg(dst).to_wkt(), densify=10.0)
    dense = shapely.get_coordinates(shapely.segmentize(square, 10.0))
    assert np.allclose(shapely.get_coordinates(out), _pyproj(32631, dst, dense), rtol=0, atol=1e-9)
    x, y = out.centroid.x, out.centroid.y
    if dst == 4326:  # longitude first, whatever EPSG:4326's declared axis order (lat, lon)
        assert 5.0 < x < 6.0 and 44.9 < y < 45.2
    else:  # zone 32's false easting: west of its central meridian (9 E), so well below 500 km
        assert 200_000 < x < 300_000 and 4_990_000 < y < 5_010_000
    assert out.is_valid and len(shapely.get_coordinates(out)) == len(dense)


def test_densifying_keeps_long_edges_on_their_curve() -> None:
    """A 60 km edge, straight in zone 31, is a curve in zone 32: its midpoint's true image lies on
    the densified polygon's outline, and a quarter metre off the one reprojected from its corners alone."""
    square = box(640_000, 4_940_000, 700_000, 5_000_000)
    mid = np.array([[670_000.0, 5_000_000.0]])  # the middle of the top edge
    true_mid = shapely.points(_pyproj(32631, 32632, mid))[0]
    dense = reproject(square, UTM31, UTM32, densify=100.0)
    corners = reproject(square, UTM31, UTM32, densify=None)
    assert dense.exterior.distance(true_mid) < 0.01
    assert corners.exterior.distance(true_mid) > 0.1


def _traced(mask: np.ndarray, x0: int = 0, y0: int = 0):
    return instance_polygon(Instance(1, "a", 0.9, (0, 0, 1, 1), x0, y0, mask), TRANSFORM)


def _blobs() -> np.ndarray:
    """A ragged ring (with its hole) and a blob beside it, 3 px apart: simplification must keep them apart."""
    yy, xx = np.mgrid[:120, :160]
    r, theta = np.hypot(yy - 60, xx - 60), np.arctan2(yy - 60, xx - 60)
    ring = (r < 50 + 3 * np.sin(7 * theta)) & (r > 20 + 2 * np.cos(5 * theta))
    blob = np.hypot(yy - 60, xx - 138) < 18
    return ring | blob


@pytest.mark.parametrize("tolerance", [0.5, 1.0, 3.0])
def test_simplified_polygons_stay_valid_and_within_the_tolerance(tolerance: float) -> None:
    exact = _traced(_blobs())
    simple = simplify(exact, tolerance)
    assert exact.is_valid and simple.is_valid
    assert simple.geom_type == exact.geom_type == "MultiPolygon" and len(simple.geoms) == len(exact.geoms) == 2
    holes = [sorted(len(p.interiors) for p in g.geoms) for g in (simple, exact)]
    assert holes[0] == holes[1] == [0, 1]  # the ring keeps its hole
    assert simple.hausdorff_distance(exact) <= tolerance + 1e-9
    assert shapely.get_num_coordinates(simple) < shapely.get_num_coordinates(exact) / 2
    assert simplify(exact, tolerance).equals_exact(simple, 0)  # deterministic


def test_a_tolerance_in_pixels_is_the_pixel_size_times_it() -> None:
    exact = _traced(_blobs())
    in_px = output_polygon(exact, UTM31, TRANSFORM, PolygonOptions(simplify=Measure(4, pixels=True)))
    in_m = output_polygon(exact, UTM31, TRANSFORM, PolygonOptions(simplify=Measure(2.0)))  # 4 px of 0.5 m
    assert in_px.equals_exact(in_m, 0) and in_px.hausdorff_distance(exact) <= 2.0


def test_min_area_is_the_masks_exact_area_in_pixels_or_crs_units() -> None:
    mask = np.zeros((10, 10), bool)
    mask[2:7, 3:8] = True  # 25 px, 6.25 m2 at 0.5 m
    assert _traced(mask).area == pytest.approx(6.25)
    assert keeps_area(25, TRANSFORM, Measure(25, pixels=True)) and not keeps_area(25, TRANSFORM, Measure(26, True))
    assert keeps_area(25, TRANSFORM, Measure(6.25)) and not keeps_area(25, TRANSFORM, Measure(6.3))
    assert keeps_area(1, TRANSFORM, None)


def _detection(mask: np.ndarray, score: float) -> tuple[dict, Instance]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    det = {
        "label": 1,
        "label_name": "roof",
        "score": score,
        "box": [0.0, 0.0, 1.0, 1.0],
        "area": int(mask.sum()),
        "mask": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
    }
    return det, Instance(1, "roof", score, (0, 0, 1, 1), 0, 0, mask)


def test_object_table_drops_small_objects_and_writes_the_output_crs_and_bbox() -> None:
    big, small = np.zeros((40, 40), bool), np.zeros((40, 40), bool)
    big[5:30, 5:30] = True
    small[35:38, 35:38] = True
    dets, insts = zip(*[_detection(big, 0.9), _detection(small, 0.8)])
    options = PolygonOptions(crs="EPSG:4326", simplify=Measure(1, True), min_area=Measure(10, True))
    table = object_table("s.tif", UTM31, TRANSFORM, list(dets), list(insts), options)
    assert table.num_rows == 1 and table.column("area").to_pylist() == [625]
    assert table.column("mask").to_pylist()[0] == dets[0]["mask"]  # the mask stays exact
    geo = json.loads(table.schema.metadata[b"geo"])["columns"]["geometry"]
    assert CRS.from_json_dict(geo["crs"]).to_epsg() == 4326
    polygon = shapely.from_wkb(table.column("geometry")[0].as_py())
    assert geo["bbox"] == pytest.approx(list(polygon.bounds)) and 5 < geo["bbox"][0] < 6  # lon/lat
    # the same polygon as pyproj puts the exact square's corners
    corners = np.array(Polygon(shapely.get_coordinates(_traced(big))).exterior.coords)
    assert np.allclose(polygon.bounds[:2], _pyproj(32631, 4326, corners).min(0), atol=1e-7)


def test_measures_parse_pixels_or_crs_units_and_refuse_anything_else() -> None:
    assert parse_measure("2px", "--simplify") == Measure(2.0, pixels=True)
    assert parse_measure("0.5", "--simplify") == Measure(0.5) == parse_measure(0.5, "--simplify")
    assert parse_measure(None, "--min-area") is None
    with pytest.raises(PolygonOptionError, match="--min-area 'ten'.*2px"):
        parse_measure("ten", "--min-area")


def test_config_refuses_a_crs_pyproj_does_not_know_naming_the_fix() -> None:
    with pytest.raises(UsageError, match="--objects-crs 'EPSG:99999'.*EPSG:4326"):
        JobConfig(source="s", dest="d", objects_crs="EPSG:99999")
    with pytest.raises(UsageError, match="--simplify must be more than 0"):
        JobConfig(source="s", dest="d", simplify="0px")
    with pytest.raises(UsageError, match="--simplify '1 m'"):
        JobConfig(source="s", dest="d", simplify="1 m")


def test_polygon_options_change_the_result_key_only_when_given() -> None:
    plain = JobConfig(source="s", dest="d")
    assert "objects_crs" not in plain.result_fields()  # a DEST made before these options resumes
    other = JobConfig(source="s", dest="d", objects_crs="EPSG:4326", simplify="1px", min_area="20")
    assert other.polygon_options() == PolygonOptions("EPSG:4326", Measure(1, True), Measure(20))
    assert result_key(other.result_fields()) != result_key(plain.result_fields())


def test_a_raster_without_a_crs_keeps_pixels_or_with_objects_crs_has_no_objects() -> None:
    mask = np.zeros((20, 20), bool)
    mask[2:6, 3:9] = True
    det, inst = _detection(mask, 0.9)
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    plain = object_table("p.tif", None, identity, [det], [inst], PolygonOptions())
    assert json.loads(plain.schema.metadata[b"geo"])["columns"]["geometry"]["crs"] is None
    assert shapely.from_wkb(plain.column("geometry")[0].as_py()).bounds == (3, 2, 9, 6)  # pixel corners
    placed = object_table("p.tif", None, identity, [det], [inst], PolygonOptions(crs="EPSG:4326"))
    geo = json.loads(placed.schema.metadata[b"geo"])["columns"]["geometry"]
    assert placed.num_rows == 0 and CRS.from_json_dict(geo["crs"]).to_epsg() == 4326  # the folder keeps one CRS
