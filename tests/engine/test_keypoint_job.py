"""A Keypoint R-CNN job end to end (issue 16): local files and moto's S3, error rows, resume.

The model is torchvision's Keypoint R-CNN with seeded random weights (``keypoint-random``) at a small input
size and few detections: its keypoint head is costly on a CPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data as skdata

from segbatch import schema
from segbatch.config import JobConfig, ModelConfig
from segbatch.engine import JobError, run_job
from segbatch.model import COCO_KEYPOINT_NAMES, COCO_SKELETON

KEYPOINT_MODEL = dict(model="keypoint-random", seed=3, score_threshold=0.0, max_detections=3, min_size=64, max_size=96)


def _encoded(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _inputs() -> dict[str, bytes]:
    small = lambda a: np.asarray(Image.fromarray(a).resize((a.shape[1] // 6, a.shape[0] // 6)))  # noqa: E731
    good = _encoded(small(skdata.astronaut()), "JPEG")
    return {
        "astronaut.jpg": good,
        "people/coffee.png": _encoded(small(skdata.coffee()), "PNG"),
        "people/broken.jpg": good[: len(good) // 3],  # a download cut short
    }


def _job(src: str, dest: str, **kw) -> JobConfig:
    model = ModelConfig(**{**KEYPOINT_MODEL, **kw.pop("model", {})})
    return JobConfig(source=src, dest=dest, model=model, shard_size=2, workers=1, cpus_per_worker=1, **kw)


def _check_rows(table) -> None:
    rows = sorted(table.to_pylist(), key=lambda r: r["uri"])
    assert [r["uri"].rsplit("/", 1)[-1] for r in rows] == ["astronaut.jpg", "broken.jpg", "coffee.png"]
    broken = rows[1]
    assert broken["status"] == schema.STATUS_ERROR and "truncated" in broken["error"] and broken["detections"] == []
    for row in (rows[0], rows[2]):
        assert row["status"] == schema.STATUS_OK and len(row["detections"]) == 3
        for d in row["detections"]:
            assert d["mask"] is None and d["area"] is None and d["label_name"] == "person"
            assert len(d["keypoints"]) == len(COCO_KEYPOINT_NAMES)
            x1, y1, x2, y2 = d["box"]
            for k in d["keypoints"]:  # image pixels: inside the detection's box (torchvision decodes them there)
                assert x1 - 1 <= k["x"] <= x2 + 1 and y1 - 1 <= k["y"] <= y2 + 1
                assert isinstance(k["visible"], bool) and np.isfinite(k["score"])
        scores = [d["score"] for d in row["detections"]]
        assert scores == sorted(scores, reverse=True)
    assert table.schema.field("detections").type == pa.list_(schema.DETECTION_TYPE)


def _check_metadata(schema_: object) -> None:
    meta = schema.read_metadata(schema_)
    assert meta["keypoint_names"] == list(COCO_KEYPOINT_NAMES)
    assert meta["skeleton"] == [list(p) for p in COCO_SKELETON]
    assert meta["classes"] == ["no person", "person"]


def test_keypoint_job_on_local_files_with_an_error_row_and_resume(ray_local, tmp_path: Path) -> None:
    src = tmp_path / "images"
    for name, data in _inputs().items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    dest = tmp_path / "out"
    first = run_job(_job(str(src), str(dest)))
    assert first.complete and first.summary.rows == 3
    table = pads.dataset(str(dest / "data"), format="parquet").to_table()
    _check_rows(table)
    files = sorted((dest / "data").glob("*.parquet"))
    for f in files:
        _check_metadata(pq.read_schema(f))

    before = {f.name: f.stat().st_mtime_ns for f in files}
    again = run_job(_job(str(src), str(dest)))
    assert again.complete and again.summary.images_this_run == 0
    assert {f.name: f.stat().st_mtime_ns for f in (dest / "data").glob("*.parquet")} == before

    # other keypoint names change the rows' meaning: resuming with them is refused
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"k{i}" for i in range(17)) + "\n")
    with pytest.raises(JobError, match="keypoint_names"):
        run_job(_job(str(src), str(dest), model={"keypoints": str(names)}))


def test_keypoint_job_on_s3(ray_local, s3) -> None:
    import s3fs

    for name, data in _inputs().items():
        s3.put(f"in/{name}", data)
    job = _job(s3.url("in/"), s3.url("out/"), storage_options=s3.storage_options)
    first = run_job(job)
    assert first.complete and first.summary.rows == 3
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint}, key="testing", secret="testing")
    files = sorted(fs.glob(f"{s3.bucket}/out/data/*.parquet"))
    assert files
    _check_rows(pads.dataset(files, format="parquet", filesystem=fs).to_table())
    for f in files:
        with fs.open(f, "rb") as fh:
            _check_metadata(pq.read_schema(fh))
    again = run_job(job)
    assert again.complete and again.summary.images_this_run == 0
    assert sorted(fs.glob(f"{s3.bucket}/out/data/*.parquet")) == files


def test_class_maps_of_a_keypoint_model_are_refused(ray_local, tmp_path: Path) -> None:
    src = tmp_path / "images"
    src.mkdir()
    (src / "a.png").write_bytes(_inputs()["people/coffee.png"])
    with pytest.raises(JobError, match="--semantic-out paints masks.*Keypoint R-CNN"):
        run_job(_job(str(src), str(tmp_path / "out"), semantic_out=str(tmp_path / "maps")))
