"""What users do with a job's results: COCO export and AP, overlays, the HTML report.

One real job (local Ray, the shipped demo model) segments a few generated
scenes with ground truth; every command below reads its DEST.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import shutil
import subprocess
from collections import Counter

import numpy as np
import pyarrow.dataset as pads
import pytest
import ray
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segbatch.cli import main
from segbatch.config import JobConfig, ModelConfig
from segbatch.engine import run_job
from segbatch.outputs import EvaluationError, coco_results, count_table, decode_mask, evaluate, match_images, pick_uris
from segbatch.storage import Storage, output_name
from segbatch.train import write_dataset

SCENES = 6


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("outputs")
    gt = write_dataset(str(root / "scenes"), SCENES, seed=2026)
    dest = root / "dest"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        cfg = JobConfig(
            source=str(root / "scenes" / "images"),
            dest=str(dest),
            model=ModelConfig(model="demo"),
            shard_size=2,
            workers=1,
            cpus_per_worker=2,
            progress="none",
        )
        assert run_job(cfg).complete
    finally:
        ray.shutdown()
    rows = pads.dataset(str(dest / "data"), format="parquet").to_table().to_pylist()
    return {"dest": str(dest), "gt": gt, "rows": sorted(rows, key=lambda r: r["uri"]), "root": root}


def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _quiet_coco(path: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(path)


def test_export_loads_in_pycocotools_and_eval_equals_cocoeval(job, tmp_path) -> None:
    out = tmp_path / "results.json"
    _cli("export", job["dest"], "--coco", str(out), "--ground-truth", job["gt"])
    results = json.loads(out.read_text())
    assert len(results) == sum(len(r["detections"]) for r in job["rows"]) > 0
    gt = _quiet_coco(job["gt"])
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(str(out))
        ev = COCOeval(gt, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    figures = json.loads(_cli("eval", job["dest"], job["gt"], "--json"))
    assert figures["images_matched"] == SCENES
    assert figures["segm"]["AP"] == pytest.approx(ev.stats[0], abs=1e-9)
    assert figures["segm"]["AP"] > 0.5, "the shipped demo model segments its held-out scenes"
    text = _cli("eval", job["dest"], job["gt"])
    assert re.search(r"mask AP 0\.\d{3}", text)


def test_render_draws_each_mask_on_its_image(job, tmp_path) -> None:
    row = next(r for r in job["rows"] if r["detections"])
    name = row["uri"].rsplit("/", 1)[-1]
    _cli("render", job["dest"], "--uri", name, "--out", str(tmp_path))
    picture = np.asarray(Image.open(tmp_path / output_name(row["uri"], ".png")))
    original = np.asarray(Image.open(row["uri"]).convert("RGB"))
    assert picture.shape == original.shape
    det = row["detections"][0]
    inside = decode_mask(det["mask"])
    changed = np.any(picture != original, axis=2)
    assert changed[inside].mean() > 0.95, "the best detection's mask is painted over"
    far = np.ones_like(inside)
    for d in row["detections"]:  # each box, its outline, and its label above it ("name 0.99", ~6 px a letter)
        x1, y1, x2, y2 = (int(v) for v in d["box"])
        label_end = x1 + 8 * len(f"{d['label_name']} 0.00")
        far[max(0, y1 - 16) : y2 + 16, max(0, x1 - 16) : max(x2, label_end) + 16] = False
    assert not changed[far].any(), "nothing is drawn away from the detections"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_in_a_headless_browser(job, tmp_path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine: `apt-get install chromium` (.ci/run installs it)")
    page = tmp_path / "report.html"
    _cli("report", job["dest"], "--out", str(page), "--overlays", "3")
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    # the browser decoded every overlay picture (set by the page's own script on load)
    assert re.search(r'<body[^>]*data-images-decoded="3"', dom), dom[:2000]
    detections = [d for r in job["rows"] for d in r["detections"]]
    per_class = Counter(d["label_name"] for d in detections)
    bars = dict(re.findall(r'class="bar" data-label="([^"]+)" data-count="(\d+)"', dom))
    assert {k: int(v) for k, v in bars.items()} == dict(per_class)
    hist = [int(c) for c in re.findall(r'class="hist-bar" data-bin="\d+" data-count="(\d+)"', dom)]
    assert len(hist) == 20 and sum(hist) == len(detections)
    assert re.search(rf'data-fact="images">{SCENES}<', dom)
    assert re.search(r'<svg id="pace" data-points="(\d+)"', dom).group(1) == str(SCENES // 2 + 1)  # one point a shard


# -- without a job: hand-made rows and ground truth --------------------------------


def _square_rle(x: int, y: int, side: int = 10, size: int = 40) -> dict:
    mask = np.zeros((size, size), np.uint8)
    mask[y : y + side, x : x + side] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [size, size], "counts": rle["counts"].decode("ascii")}


def test_eval_maps_labels_to_non_contiguous_category_ids_by_name(tmp_path) -> None:
    # A model trained on this set numbers its classes 1..3; the set's ids are 1, 3, 18.
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    objects = [("person", 1, 0, 0), ("car", 2, 15, 0), ("dog", 3, 0, 20)]  # name, model label, x, y
    gt = {
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 40}],
        "categories": categories,
        "annotations": [
            {
                "id": i + 1,
                "image_id": 7,
                "category_id": next(c["id"] for c in categories if c["name"] == name),
                "segmentation": _square_rle(x, y),
                "area": 100,
                "bbox": [x, y, 10, 10],
                "iscrowd": 0,
            }
            for i, (name, _, x, y) in enumerate(objects)
        ],
    }
    dets = [
        {"box": [x, y, x + 10, y + 10], "score": 0.9, "label": label, "label_name": name, "mask": _square_rle(x, y)}
        for name, label, x, y in objects
    ]
    rows = [{"uri": "/data/a.png", "status": "ok", "detections": dets}]
    results = coco_results(rows, match_images(rows, gt["images"]), categories)
    assert sorted(r["category_id"] for r in results) == [1, 3, 18]
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(results))
    coco = _quiet_coco(str(gt_path))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' own round trip
        ev = COCOeval(coco, coco.loadRes(str(dt_path)), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    assert evaluate(rows, gt)["segm"]["AP"] == pytest.approx(1.0)
    # names the ground truth does not have keep the model's label
    assert [r["category_id"] for r in coco_results(rows, {"/data/a.png": 7}, [{"id": 5, "name": "cat"}])] == [1, 2, 3]


def test_match_images_refuses_a_name_two_rows_end_with() -> None:
    rows = [{"uri": f"s3://b/{split}/a.jpg"} for split in ("train", "val")]
    with pytest.raises(EvaluationError, match=r"'a.jpg'.*train/a.jpg.*val/a.jpg"):
        match_images(rows, [{"id": 1, "file_name": "a.jpg"}])
    # a ground truth that gives enough of the path tells them apart
    assert match_images(rows, [{"id": 1, "file_name": "train/a.jpg"}, {"id": 2, "file_name": "val/a.jpg"}]) == {
        "s3://b/train/a.jpg": 1,
        "s3://b/val/a.jpg": 2,
    }


def test_counts_keep_groups_without_detections_and_count_errors_apart(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    det = {
        "box": [0, 0, 1, 1],
        "score": 0.9,
        "label": 1,
        "label_name": "can",
        "area": 1,
        "mask": {"size": [2, 2], "counts": "0"},
    }
    rows = [
        ("s3://x/store-1/shelf-1/a.jpg", "ok", [det, det]),
        ("s3://x/store-1/shelf-1/b.jpg", "error", []),
        ("s3://x/store-1/shelf-2/a.jpg", "ok", []),  # an empty shelf
        ("s3://x/store-2/shelf-1/a.jpg", "error", []),  # a shelf whose only photo failed
    ]
    (tmp_path / "data").mkdir()
    table = pa.table({"uri": [r[0] for r in rows], "status": [r[1] for r in rows], "detections": [r[2] for r in rows]})
    pq.write_table(table, tmp_path / "data" / "part-0.parquet")
    counts = count_table(str(tmp_path), Storage(), r"store-(?P<store>\d+)/shelf-(?P<shelf>\d+)/").to_pylist()
    assert counts == [
        {"store": "1", "shelf": "1", "label_name": "can", "detections": 2, "images": 1, "errors": 1},
        {"store": "1", "shelf": "2", "label_name": None, "detections": 0, "images": 1, "errors": 0},
        {"store": "2", "shelf": "1", "label_name": None, "detections": 0, "images": 0, "errors": 1},
    ]


def test_pick_uris_samples_and_names_rows_from_the_uri_column_alone(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    uris = [f"s3://b/{folder}/img-{i:03d}.jpg" for folder in ("x", "y") for i in range(50)]
    for k in range(4):  # several files of several row groups: picks cross batch boundaries
        pq.write_table(pa.table({"uri": uris[k * 25 : (k + 1) * 25]}), tmp_path / f"part-{k}.parquet", row_group_size=7)
    dataset = pads.dataset(str(tmp_path), format="parquet")
    in_order = dataset.to_table(columns=["uri"]).column("uri").to_pylist()
    for seed in (0, 1, 7):  # what sampling every row in memory picked before, seed for seed
        assert pick_uris(dataset, 5, seed=seed) == set(random.Random(seed).sample(in_order, 5))
        assert pick_uris(dataset, 5, seed=seed) == pick_uris(dataset, 5, seed=seed)
    assert pick_uris(dataset, 500) == set(uris)
    assert pick_uris(dataset, 0) == set()
    named = ("img-007.jpg", "s3://b/y/img-010.jpg", "07.jpg", "missing.jpg")  # a whole file name or URI, never a suffix
    assert pick_uris(dataset, 1, uris=named) == {"s3://b/x/img-007.jpg", "s3://b/y/img-007.jpg", "s3://b/y/img-010.jpg"}
