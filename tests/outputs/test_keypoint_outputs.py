"""A keypoint model's results, read by users: COCO export, keypoint AP, skeleton overlays, the report.

No model runs here: DEST/data is written by hand with ``schema.rows_to_table``, as a
Keypoint R-CNN job writes it (``keypoints`` per detection, mask and area null, names and
skeleton in the file metadata), from a COCO person-keypoint ground truth made here.
A mask model's DEST beside it (keypoints null) must read as it always has.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segbatch import schema
from segbatch.cli import main
from segbatch.model.keypoints import COCO_KEYPOINT_NAMES, COCO_SKELETON
from segbatch.outputs import EvaluationError, evaluate, keypoint_layout, write_report
from segbatch.outputs.render import class_colour
from segbatch.storage import Storage, output_name

SIZE = 160
GREY = (90, 90, 90)

# Where each of COCO's 17 keypoints sits in a standing person's box (fractions of its width, height).
TEMPLATE = np.array(
    [
        (0.50, 0.10), (0.55, 0.07), (0.45, 0.07), (0.60, 0.09), (0.40, 0.09),  # nose, eyes, ears
        (0.70, 0.25), (0.30, 0.25), (0.80, 0.42), (0.20, 0.42), (0.85, 0.58), (0.15, 0.58),  # arms
        (0.62, 0.58), (0.38, 0.58), (0.63, 0.78), (0.37, 0.78), (0.64, 0.97), (0.36, 0.97),  # legs
    ]
)  # fmt: skip

# image -> persons: (box x, y, w, h), keypoints not labelled (COCO v=0), labelled but hidden (v=1)
PERSONS = {
    "a.png": [((10, 10, 50, 120), {3, 4}, {9}), ((80, 20, 60, 130), set(), {15, 16})],
    "b.png": [((30, 15, 70, 140), {0, 1, 2}, set())],
    "c.png": [((5, 30, 45, 100), set(), set()), ((60, 5, 55, 110), {10}, {13}), ((115, 40, 40, 100), set(), set())],
}


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _ground_truth(images: Path) -> dict:
    """COCO person keypoints (as in person_keypoints_*.json: 1-based skeleton, v = 0, 1, 2)."""
    gt = {
        "images": [],
        "annotations": [],
        "categories": [
            {
                "id": 1,
                "name": "person",
                "supercategory": "person",
                "keypoints": list(COCO_KEYPOINT_NAMES),
                "skeleton": [[i + 1, j + 1] for i, j in COCO_SKELETON],
            }
        ],
    }
    for image_id, (name, persons) in enumerate(sorted(PERSONS.items()), start=1):
        Image.new("RGB", (SIZE, SIZE), GREY).save(images / name)
        gt["images"].append({"id": image_id, "file_name": name, "width": SIZE, "height": SIZE})
        for (x, y, w, h), unlabelled, hidden in persons:
            kps = []
            for k, (u, v) in enumerate(TEMPLATE):
                if k in unlabelled:
                    kps += [0, 0, 0]
                else:
                    kps += [round(x + u * w, 2), round(y + v * h, 2), 1 if k in hidden else 2]
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x, y, w, h],
                    "area": 0.5 * w * h,
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                    "keypoints": kps,
                    "num_keypoints": sum(1 for v in kps[2::3] if v > 0),
                }
            )
    return gt


def _metadata(keypoints: bool) -> dict:
    meta = schema.file_metadata(
        model_id="keypoint-coco" if keypoints else "coco",
        weights_hash="0123abcd",
        result_key="k",
        thresholds={"score_threshold": 0.5, "mask_threshold": 0.5},
        classes=["__background__", "person"],
        version="test",
    )
    if keypoints:
        meta.update(keypoint_names=list(COCO_KEYPOINT_NAMES), skeleton=[list(p) for p in COCO_SKELETON])
    return meta


def _detection(ann: dict, score: float, *, keypoints: bool, jitter: np.ndarray | None = None) -> dict:
    x, y, w, h = ann["bbox"]
    det = {"label": 1, "label_name": "person", "score": score, "box": [x, y, x + w, y + h]}
    if keypoints:
        flat = np.array(ann["keypoints"], dtype=np.float64).reshape(-1, 3)
        xy = flat[:, :2] + (0 if jitter is None else jitter)
        det.update(mask=None, area=None)
        det["keypoints"] = [
            {"x": float(px), "y": float(py), "score": 5.0 - 0.1 * k, "visible": bool(v > 0)}
            for k, ((px, py), v) in enumerate(zip(xy, flat[:, 2]))
        ]
    else:
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], SIZE, SIZE))
        det.update(mask={"size": [SIZE, SIZE], "counts": rle["counts"].decode()}, area=int(mask_utils.area(rle)))
        det["keypoints"] = None  # a mask model's rows
    return det


def _write_dest(dest: Path, images: Path | str, gt: dict, *, keypoints: bool, jitter_px: float = 0.0) -> list[dict]:
    """DEST/data as a job writes it, two shards, of the images under ``images`` (a folder or
    URL prefix); detections equal to the ground truth (keypoints moved by ``jitter_px``,
    seeded). Returns the rows."""
    rng = np.random.default_rng(16)
    rows = []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        dets = [
            _detection(
                a,
                0.95 - 0.1 * i,
                keypoints=keypoints,
                jitter=rng.normal(0, jitter_px, (len(TEMPLATE), 2)) if jitter_px else None,
            )
            for i, a in enumerate(anns)
        ]
        rows.append(schema.ok_row(f"{images}/{img['file_name']}", SIZE, SIZE, dets))
    rows.append(schema.error_row(f"{images}/broken.png", "decode: not an image"))
    (dest / "data").mkdir(parents=True)
    for k, part in enumerate((rows[:2], rows[2:])):
        pq.write_table(schema.rows_to_table(part, _metadata(keypoints)), dest / "data" / f"part-{k:05d}.parquet")
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("keypoints")
    images = root / "images"
    images.mkdir()
    gt = _ground_truth(images)
    gt_path = root / "person_keypoints.json"
    gt_path.write_text(json.dumps(gt))
    out = {"root": root, "images": images, "gt": gt, "gt_path": str(gt_path)}
    for name, kwargs in {
        "kp": {"keypoints": True},
        "kp_jitter": {"keypoints": True, "jitter_px": 4.0},
        "mask": {"keypoints": False},
    }.items():
        out[f"{name}_rows"] = _write_dest(root / name, images, gt, **kwargs)
        out[name] = str(root / name)
    return out


def _cocoeval(gt_path: str, results: list[dict], iou_type: str) -> np.ndarray:
    """pycocotools on its own: what segbatch eval must agree with."""
    coco = _quiet(COCO, gt_path)
    ev = COCOeval(coco, _quiet(coco.loadRes, results), iou_type)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    return ev.stats


def _independent_keypoint_results(world: dict, rows: list[dict]) -> list[dict]:
    """COCO keypoint results written straight from the rows (no segbatch code): x, y, v = 1."""
    ids = {img["file_name"]: img["id"] for img in world["gt"]["images"]}
    return [
        {
            "image_id": ids[Path(row["uri"]).name],
            "category_id": 1,
            "score": det["score"],
            "keypoints": [c for kp in det["keypoints"] for c in (kp["x"], kp["y"], 1)],
        }
        for row in rows
        if row["status"] == "ok"
        for det in row["detections"]
    ]


# -- export -----------------------------------------------------------------------------


def test_export_writes_coco_keypoint_results_that_pycocotools_scores(world, tmp_path) -> None:
    out = tmp_path / "results.json"
    _cli("export", world["kp"], "--coco", str(out), "--ground-truth", world["gt_path"])
    results = json.loads(out.read_text())
    anns = world["gt"]["annotations"]
    assert len(results) == len(anns)
    by_box = {tuple(r["bbox"]): r for r in results}
    for ann in anns:  # each person once: its box, its 17 keypoints as x, y, v (v: 1 visible, 0 not)
        r = by_box[tuple(float(v) for v in ann["bbox"])]
        assert r["image_id"] == ann["image_id"] and r["category_id"] == 1 and "segmentation" not in r
        assert len(r["keypoints"]) == 51 and len(r["keypoint_scores"]) == 17
        assert r["keypoints"][2::3] == [1 if v > 0 else 0 for v in ann["keypoints"][2::3]]
        assert np.allclose(r["keypoints"][0::3], ann["keypoints"][0::3], atol=1e-4)
        assert np.allclose(r["keypoints"][1::3], ann["keypoints"][1::3], atol=1e-4)
        assert r["keypoint_scores"][:2] == pytest.approx([5.0, 4.9])
    stats = _cocoeval(world["gt_path"], str(out), "keypoints")  # pycocotools reads the file itself
    assert stats[0] == pytest.approx(1.0)
    # without ground truth: ids 1.. in URI order (broken.png, an error row, is 3), the model's label as category
    _cli("export", world["kp"], "--coco", str(out))
    results = json.loads(out.read_text())
    assert sorted({r["image_id"] for r in results}) == [1, 2, 4] and {r["category_id"] for r in results} == {1}


def test_export_of_a_mask_model_is_as_before(world, tmp_path) -> None:
    out = tmp_path / "results.json"
    _cli("export", world["mask"], "--coco", str(out), "--ground-truth", world["gt_path"])
    results = json.loads(out.read_text())
    assert len(results) == len(world["gt"]["annotations"])
    assert all(set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)
    assert keypoint_layout(world["mask"], Storage()) is None
    assert keypoint_layout(world["kp"], Storage()).skeleton == COCO_SKELETON


# -- eval ---------------------------------------------------------------------------------


def test_eval_keypoint_ap_is_one_for_the_ground_truth_itself(world) -> None:
    figures = json.loads(_cli("eval", world["kp"], world["gt_path"], "--json"))
    assert figures["images_matched"] == 3
    assert figures["keypoints"]["AP"] == pytest.approx(1.0)
    assert figures["keypoints"]["AR"] == pytest.approx(1.0)
    assert figures["bbox"]["AP"] == pytest.approx(1.0)
    assert "segm" not in figures, "a keypoint-only model has no masks to score"
    text = _cli("eval", world["kp"], world["gt_path"])
    assert "keypoints AP 1.000" in text and "box  AP 1.000" in text and "mask" not in text


def test_eval_of_moved_keypoints_equals_pycocotools_on_the_same_data(world) -> None:
    figures = json.loads(_cli("eval", world["kp_jitter"], world["gt_path"], "--json"))["keypoints"]
    stats = _cocoeval(world["gt_path"], _independent_keypoint_results(world, world["kp_jitter_rows"]), "keypoints")
    assert 0.0 < stats[0] < 0.95, "4 px of noise costs keypoint AP at the strict OKS thresholds"
    # AP, AP50, AP75, AR, AR50, AR75 over all areas (APm/APl hang on the detection's own area, which
    # pycocotools takes from the bbox segbatch writes and, without one, from the keypoints' extent)
    for name, k in (("AP", 0), ("AP50", 1), ("AP75", 2), ("AR", 5), ("AR50", 6), ("AR75", 7)):
        assert figures[name] == pytest.approx(stats[k], abs=1e-12), name
    assert figures["AP"] < 1.0


def test_eval_matches_keypoints_by_name_when_the_ground_truth_orders_them_otherwise(world) -> None:
    gt = copy.deepcopy(world["gt"])
    order = list(range(17))
    np.random.default_rng(3).shuffle(order)  # the ground truth's k-th keypoint is the model's order[k]
    gt["categories"][0]["keypoints"] = [COCO_KEYPOINT_NAMES[i] for i in order]
    for ann in gt["annotations"]:
        triples = np.array(ann["keypoints"]).reshape(-1, 3)
        ann["keypoints"] = triples[order].ravel().tolist()
    rows = world["kp_rows"]
    assert evaluate(rows, gt, COCO_KEYPOINT_NAMES)["keypoints"]["AP"] == pytest.approx(1.0)
    assert evaluate(rows, gt, None)["keypoints"]["AP"] < 0.5, "in the model's order, a nose would meet an ankle"
    gt["categories"][0]["keypoints"][0] = "tail"
    with pytest.raises(EvaluationError, match=r"the model lacks \['tail'\]"):
        evaluate(rows, gt, COCO_KEYPOINT_NAMES)


def test_eval_of_a_mask_model_is_as_before_even_on_keypoint_ground_truth(world) -> None:
    figures = json.loads(_cli("eval", world["mask"], world["gt_path"], "--json"))
    assert set(figures) == {"images_matched", "images_ground_truth", "bbox", "segm"}
    assert figures["segm"]["AP"] == pytest.approx(1.0) and figures["bbox"]["AP"] == pytest.approx(1.0)
    text = _cli("eval", world["mask"], world["gt_path"])
    assert re.search(r"mask AP 1\.000", text) and "keypoints" not in text


# -- render -------------------------------------------------------------------------------


def test_render_draws_the_skeleton_of_visible_keypoints(world, tmp_path) -> None:
    _cli("render", world["kp"], "--uri", "b.png", "--out", str(tmp_path))
    picture = np.asarray(Image.open(tmp_path / output_name(str(world["images"] / "b.png"), ".png")))
    colour = class_colour(1)
    (x, y, w, h), unlabelled, _ = PERSONS["b.png"][0]
    at = {k: (x + u * w, y + v * h) for k, (u, v) in enumerate(TEMPLATE)}

    def pixel(px: float, py: float) -> tuple:
        return tuple(picture[round(py), round(px)])

    for k in range(17):
        assert pixel(*at[k]) == (colour if k not in unlabelled else GREY), COCO_KEYPOINT_NAMES[k]
    for i, j in [(5, 7), (7, 9), (11, 13), (13, 15), (5, 6), (11, 12)]:  # limbs between visible keypoints
        mid = ((at[i][0] + at[j][0]) / 2, (at[i][1] + at[j][1]) / 2)
        assert pixel(*mid) == colour, (COCO_KEYPOINT_NAMES[i], COCO_KEYPOINT_NAMES[j])
    # nose, eyes not visible: neither they nor the limbs to them are drawn (the ears' dots are, beside them)
    face = picture[round(at[1][1]) - 1 : round(at[0][1]) + 2, round(at[2][0]) + 3 : round(at[1][0]) - 2]
    assert (face == GREY).all()
    # the box, as for masks; nothing away from the person
    assert pixel(x + w / 2, y + h) == colour
    away = np.ones((SIZE, SIZE), bool)
    away[max(0, y - 16) : y + h + 4, x - 4 : x + w + 4] = False
    assert (picture[away] == GREY).all()


def test_render_of_a_mask_model_paints_masks_and_no_keypoints(world, tmp_path) -> None:
    _cli("render", world["mask"], "--uri", "b.png", "--out", str(tmp_path))
    picture = np.asarray(Image.open(tmp_path / output_name(str(world["images"] / "b.png"), ".png")))
    (x, y, w, h), _, _ = PERSONS["b.png"][0]
    blended = np.array(GREY) * 0.55 + np.array(class_colour(1)) * 0.45  # render's alpha: 0.45
    for k, (u, v) in enumerate(TEMPLATE):  # the mask's blend where keypoints would be: no dots
        got = picture[round(y + v * h), round(x + u * w)].astype(float)
        assert np.abs(got - blended).max() <= 1.0, COCO_KEYPOINT_NAMES[k]


# -- report -------------------------------------------------------------------------------


def test_report_counts_detections_with_keypoints_and_visible_keypoints_per_name(world, tmp_path) -> None:
    page, summary = write_report(world["kp"], str(tmp_path / "kp.html"), Storage(), overlays=1)
    anns = world["gt"]["annotations"]
    visible = [sum(1 for a in anns if a["keypoints"][3 * k + 2] > 0) for k in range(17)]
    assert summary.keypoint_detections == len(anns) == 6
    assert summary.visible_keypoints.tolist() == visible
    assert summary.keypoint_names() == COCO_KEYPOINT_NAMES
    text = Path(page).read_text()
    assert re.search(r'data-fact="detections with keypoints">6<', text)
    bars = re.findall(r'class="kp-bar" data-keypoint="([^"]+)" data-count="(\d+)"', text)
    assert bars == [(name, str(n)) for name, n in zip(COCO_KEYPOINT_NAMES, visible)]
    assert visible[0] == 5 and visible[9] == 6  # one nose unlabelled; a hidden wrist counts as visible (v=1)
    # a mask model's report has no keypoint section
    page, summary = write_report(world["mask"], str(tmp_path / "mask.html"), Storage(), overlays=1)
    text = Path(page).read_text()
    assert summary.keypoint_detections == 0 and "kp-bar" not in text and "with keypoints" not in text
    assert re.search(r'class="bar" data-label="person" data-count="6"', text)


def test_count_keypoints_reads_a_slice_of_mixed_detections() -> None:
    """A record batch is a slice of its file's column; mask detections (keypoints null) count nothing."""
    import pyarrow as pa

    from segbatch.outputs.report import count_keypoints

    def kps(*visible: bool) -> list[dict]:
        return [{"x": 1.0, "y": 2.0, "score": 0.5, "visible": v} for v in visible]

    column = pa.array(
        [kps(True, True, True), None, kps(False, True, False), kps(True, False, True), None, kps(True, True, True)],
        pa.list_(schema.KEYPOINT_TYPE),
    )
    detections, visible = count_keypoints(column.slice(1, 4))  # null, FTF, TFT, null
    assert detections == 2 and visible.tolist() == [1, 1, 1]
    detections, visible = count_keypoints(column.slice(4, 1))
    assert detections == 0 and visible.tolist() == []


def test_export_eval_and_render_read_a_keypoint_dest_on_s3(world, s3, tmp_path) -> None:
    """The model's keypoint names and skeleton come from a file's footer, read through fsspec."""
    local = tmp_path / "dest"
    rows = _write_dest(local, s3.url("photos"), world["gt"], keypoints=True, jitter_px=4.0)
    for name in PERSONS:
        s3.put(f"photos/{name}", (world["images"] / name).read_bytes())
    for part in sorted((local / "data").iterdir()):
        s3.put(f"dest/data/{part.name}", part.read_bytes())
    s3.put("person_keypoints.json", Path(world["gt_path"]).read_bytes())
    dest, options = s3.url("dest"), json.dumps(s3.storage_options)
    figures = json.loads(_cli("eval", dest, s3.url("person_keypoints.json"), "--json", "--storage-options", options))
    stats = _cocoeval(world["gt_path"], _independent_keypoint_results(world, rows), "keypoints")
    assert figures["keypoints"]["AP"] == pytest.approx(stats[0], abs=1e-12) and 0 < stats[0] < 1
    out = tmp_path / "results.json"
    _cli("export", dest, "--coco", str(out), "--ground-truth", world["gt_path"], "--storage-options", options)
    assert len(json.loads(out.read_text())) == 6
    _cli("render", dest, "--uri", "b.png", "--out", str(tmp_path / "render"), "--storage-options", options)
    picture = np.asarray(Image.open(tmp_path / "render" / output_name(s3.url("photos/b.png"), ".png")))
    left, right = next(r for r in rows if r["uri"].endswith("/b.png"))["detections"][0]["keypoints"][5:7]
    mid = ((left["x"] + right["x"]) / 2, (left["y"] + right["y"]) / 2)  # of the limb between the shoulders
    assert tuple(picture[round(mid[1]), round(mid[0])]) == class_colour(1)
