"""Tiled rasters with a Keypoint R-CNN (issue 16): keypoints in scene pixels, following their merged object.

The pure parts on hand-made tile detections (the right answer known); then a small tiled job with
seeded random keypoint weights on a generated GeoTIFF.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from segbatch import schema
from segbatch.config import JobConfig, ModelConfig
from segbatch.engine import run_job
from segbatch.geo import RasterInfo, Window, scene_instances, scene_row, tile_detections, tile_item
from segbatch.train import write_aerial_raster

K = 3  # keypoints per detection in the hand-made ones


def _raw(boxes, keypoints, kp_scores, scores=None) -> dict[str, np.ndarray]:
    """A keypoint model's raw detections of one tile (tile pixels), as Segmenter.raw_detections gives them."""
    n = len(boxes)
    kps = np.concatenate([np.asarray(keypoints, np.float32), np.ones((n, K, 1), np.float32)], axis=2)
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(n, 4),
        "labels": np.ones(n, np.int64),
        "scores": np.asarray(scores if scores is not None else [0.9] * n, np.float32),
        "keypoints": kps.reshape(n, K, 3),
        "keypoints_scores": np.asarray(kp_scores, np.float32).reshape(n, K),
    }


def _tile_rows(scene: str, tiles: list[tuple[Window, dict]]) -> list[dict]:
    """Tile rows as they come back from the job's tile files (through TILE_SCHEMA and Parquet's types)."""
    rows = [schema.tile_row(tile_item(scene, w), tile_detections(raw, w, 0.5, ["bg", "person"])) for w, raw in tiles]
    return schema.rows_to_table(rows, schema=schema.TILE_SCHEMA).to_pylist()


def test_tile_keypoints_come_back_in_scene_pixels() -> None:
    w = Window(96, 64, 128, 128)
    dets = tile_detections(_raw([[10, 20, 50, 90]], [[[12, 22], [30, 50], [48, 88]]], [[1, 2, 3]]), w, 0.5, ["bg", "p"])
    assert dets[0]["box"] == [106, 84, 146, 154] and dets[0]["crop"] is None
    assert [(k["x"], k["y"]) for k in dets[0]["keypoints"]] == [(108, 86), (126, 114), (144, 152)]
    assert [k["visible"] for k in dets[0]["keypoints"]] == [True] * K


def test_a_person_across_a_seam_is_one_object_with_each_keypoint_from_the_piece_that_saw_it_best() -> None:
    # two tiles overlapping in columns 96..128; one person at scene x 80..150 seen by both
    left, right = Window(0, 0, 128, 128), Window(96, 0, 128, 128)
    seen_left = _raw([[80, 10, 128, 100]], [[[90, 20], [120, 50], [127, 90]]], [[5.0, 4.0, 0.5]], scores=[0.8])
    seen_right = _raw([[0, 12, 54, 98]], [[[2, 21], [25, 52], [40, 91]]], [[1.0, 6.0, 7.0]], scores=[0.95])
    # and someone else, in the right tile only
    other = _raw([[100, 20, 120, 60]], [[[105, 25], [110, 40], [115, 55]]], [[1, 1, 1]], scores=[0.7])
    right_raw = {k: np.concatenate([seen_right[k], other[k]]) for k in seen_right}
    instances, errors = scene_instances(_tile_rows("s.tif", [(left, seen_left), (right, right_raw)]))
    assert errors == [] and len(instances) == 2
    person = instances[0]
    assert person.pieces == 2 and person.score == pytest.approx(0.95) and person.box == (80, 10, 150, 100)
    # keypoint 0 from the left piece (score 5 > 1), 1 and 2 from the right one, in scene pixels
    assert [(k["x"], k["y"], k["score"]) for k in person.keypoints] == [(90, 20, 5), (121, 52, 6), (136, 91, 7)]
    assert [(k["x"], k["y"]) for k in instances[1].keypoints] == [(201, 25), (206, 40), (211, 55)]

    row = scene_row("s.tif", RasterInfo(224, 128, 3, "uint8", None, (1, 0, 0, 0, 1, 0), None), instances, [], 2)
    assert [d["mask"] for d in row["detections"]] == [None, None] and [d["area"] for d in row["detections"]] == [
        None, None]  # fmt: skip
    assert row["detections"][0]["keypoints"] == person.keypoints
    schema.rows_to_table([row])  # the scene's row fits the schema


def test_people_of_one_tile_are_never_absorbed_into_each_other() -> None:
    """A child's box mostly inside an adult's: two detections the model's NMS kept, both kept here."""
    w = Window(0, 0, 128, 128)
    raw = _raw([[10, 10, 100, 120], [40, 50, 90, 115]], [[[20, 20]] * K, [[50, 60]] * K], [[1] * K, [2] * K])
    instances, _ = scene_instances(_tile_rows("s.tif", [(w, raw)]))
    assert len(instances) == 2 and all(inst.pieces == 1 for inst in instances)


def test_neighbours_seen_by_two_tiles_stay_apart() -> None:
    left, right = Window(0, 0, 128, 128), Window(96, 0, 128, 128)
    a = _raw([[60, 10, 100, 100]], [[[70, 20]] * K], [[1] * K])  # scene x 60..100: left only
    b = _raw([[10, 10, 60, 100]], [[[20, 20]] * K], [[1] * K])  # scene x 106..156: right only
    instances, _ = scene_instances(_tile_rows("s.tif", [(left, a), (right, b)]))
    assert len(instances) == 2


@pytest.fixture(scope="module")
def keypoint_tiled_job(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kpgeo")
    (root / "scenes").mkdir()
    write_aerial_raster(str(root / "scenes" / "scene.tif"), 224, 160, seed=3, pixel_size=0.5)
    dest = root / "dest"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        cfg = JobConfig(
            source=str(root / "scenes"),
            dest=str(dest),
            workers=1,
            cpus_per_worker=1,
            model=ModelConfig(
                model="keypoint-random", seed=2, score_threshold=0.0, max_detections=3, min_size=64, max_size=96
            ),
            tile_size=96,
            tile_overlap=32,
            progress="none",
        )
        result = run_job(cfg)
        again = run_job(cfg)
    finally:
        ray.shutdown()
    return {"dest": dest, "result": result, "again": again}


def test_a_tiled_keypoint_job_gives_keypoints_in_scene_pixels(keypoint_tiled_job) -> None:
    dest = keypoint_tiled_job["dest"]
    assert keypoint_tiled_job["result"].complete
    assert keypoint_tiled_job["again"].summary.images_this_run == 0
    files = sorted((dest / "data").glob("*.parquet"))
    rows = pq.read_table(files).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "ok" and (rows[0]["width"], rows[0]["height"]) == (224, 160)
    dets = rows[0]["detections"]
    # 6 tiles of 3 detections, some merged across seams
    assert 3 < len(dets) <= 18
    for d in dets:
        assert d["mask"] is None and d["area"] is None and len(d["keypoints"]) == 17
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= 224 and 0 <= y1 < y2 <= 160
        for k in d["keypoints"]:
            assert x1 - 1 <= k["x"] <= x2 + 1 and y1 - 1 <= k["y"] <= y2 + 1
    assert max(d["box"][0] for d in dets) >= 64  # detections of the tiles right of the first: offset into the scene
    meta = schema.read_metadata(pq.read_schema(files[0]))
    assert len(meta["keypoint_names"]) == 17 and meta["skeleton"]
    # keypoint models have no outlines: the objects table is empty
    objects = sorted((dest / "objects").glob("*.parquet"))
    assert sum(pq.read_metadata(f).num_rows for f in objects) == 0
