"""The job end to end on one machine: local Ray, local files, real Parquet.

The model is torchvision's Mask R-CNN with seeded random weights at a small
input size, so a run takes seconds; score threshold 0 keeps detections.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data as skdata

from segbatch import schema
from segbatch.config import JobConfig, ModelConfig
from segbatch.engine import MAX_FAILURES_IN_A_ROW, JobError, StartupGuard, run_job
from segbatch.engine.pool import _Worker

FAST_MODEL = dict(model="random", seed=3, score_threshold=0.0, max_detections=5, min_size=96, max_size=128)


def _save(img: np.ndarray, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **kw)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Real photographs (small), a nested folder, and the bad inputs users' archives hold."""
    root = tmp_path_factory.mktemp("images")
    small = lambda a: np.asarray(Image.fromarray(a).resize((a.shape[1] // 4, a.shape[0] // 4)))  # noqa: E731
    _save(small(skdata.astronaut()), root / "astronaut.jpg", quality=90)
    _save(small(skdata.chelsea()), root / "cats" / "chelsea.png")
    _save(small(skdata.coffee()), root / "cats" / "deeper" / "coffee.webp")
    _save(small(skdata.rocket()), root / "rocket.bmp")
    _save(small(skdata.camera()), root / "camera.tif")  # grayscale
    (root / "empty.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(jpeg, format="JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "notes.jpg").write_text("this is not an image\n")
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 400 M pixels in a few KB
    (root / "bomb.png").write_bytes(bomb.getvalue())
    (root / "readme.txt").write_text("not listed: not an image extension")
    return root


BAD = {"empty.jpg": "empty", "truncated.jpg": "truncated", "notes.jpg": "not an image", "bomb.png": "too large"}


def _job(src, dest, **kw) -> JobConfig:
    model = ModelConfig(**{**FAST_MODEL, **kw.pop("model", {})})
    return JobConfig(source=str(src), dest=str(dest), model=model, shard_size=3, workers=2, cpus_per_worker=1, **kw)


def _rows(dest) -> list[dict]:
    table = pads.dataset(str(Path(dest) / "data"), format="parquet").to_table()
    return sorted(table.to_pylist(), key=lambda r: r["uri"])


def test_folder_to_parquet(ray_local, image_dir, tmp_path):
    dest = tmp_path / "out"
    # count_by: a retail job's table of detections per store and class, here per folder
    result = run_job(_job(image_dir, dest, count_by=r"images\d*/(?P<folder>[^/]+)/"))
    assert result.complete
    rows = _rows(dest)
    images = sorted(p for p in image_dir.rglob("*") if p.suffix != ".txt" and p.is_file())
    assert [r["uri"] for r in rows] == [str(p) for p in images]  # one row per image, exactly once

    by_name = {Path(r["uri"]).name: r for r in rows}
    for name, cause in BAD.items():
        row = by_name.pop(name)
        assert row["status"] == "error" and cause in row["error"].lower(), row["error"]
        assert row["detections"] == []
    for name, row in by_name.items():
        assert row["status"] == "ok" and row["error"] is None, (name, row["error"])
        with Image.open(row["uri"]) as im:
            assert (row["width"], row["height"]) == im.size
        assert 0 < len(row["detections"]) <= 5
        scores = [d["score"] for d in row["detections"]]
        assert scores == sorted(scores, reverse=True)
        for det in row["detections"]:
            mask = mask_utils.decode({"size": det["mask"]["size"], "counts": det["mask"]["counts"].encode()})
            assert mask.shape == (row["height"], row["width"])
            assert det["area"] == int(mask.sum())
            assert len(det["box"]) == 4 and det["label_name"]

    # every file carries the schema and segbatch's metadata
    files = sorted((dest / "data").glob("*.parquet"))
    assert len(files) == 3  # 9 images in shards of 3
    for f in files:
        pf = pq.ParquetFile(f)
        assert pf.schema_arrow.remove_metadata().equals(schema.SCHEMA)
        meta = schema.read_metadata(pf.schema_arrow)
        assert meta["schema_version"] == schema.SCHEMA_VERSION
        assert meta["model_id"] == "random" and meta["weights_hash"] == "random-seed3"
        assert meta["thresholds"]["score_threshold"] == 0.0 and meta["thresholds"]["min_size"] == 96
    summary = json.loads((dest / "_segbatch" / "summary.json").read_text())
    assert summary["complete"] and summary["rows"] == 9 and summary["errors"] == 4

    counts = pq.read_table(dest / "counts.parquet").to_pylist()
    expected: dict[tuple, int] = {}
    for row in rows:
        rel = Path(row["uri"]).relative_to(image_dir).parts
        folder = rel[0] if len(rel) > 1 else None  # images at the top match no folder: a null group
        for det in row["detections"]:
            expected[(folder, det["label_name"])] = expected.get((folder, det["label_name"]), 0) + 1
    assert {(c["folder"], c["label_name"]): c["detections"] for c in counts} == expected
    assert {c["images"] for c in counts if c["folder"] == "cats"} == {2}


def test_readers_see_one_dataset(ray_local, image_dir, tmp_path):
    import duckdb
    import pandas as pd

    dest = tmp_path / "out"
    run_job(_job(image_dir, dest))
    df = pd.read_parquet(dest / "data")
    assert len(df) == 9 and set(df["status"]) == {"ok", "error"}
    con = duckdb.connect()
    n, n_ok = con.execute(
        f"select count(*), count(*) filter (where status = 'ok') from read_parquet('{dest}/data/*.parquet')"
    ).fetchone()
    assert (n, n_ok) == (9, 5)
    dets = con.execute(
        f"select count(*) from (select unnest(detections) as d from read_parquet('{dest}/data/*.parquet'))"
    ).fetchone()[0]
    assert dets == sum(len(d) for d in df["detections"])


def test_resume_runs_nothing_twice_and_refuses_other_models(ray_local, image_dir, tmp_path):
    dest = tmp_path / "out"
    first = run_job(_job(image_dir, dest))
    before = {p.name: p.stat().st_mtime_ns for p in (dest / "data").glob("*.parquet")}
    # lose one shard's commit: only that shard runs again
    commits = sorted((dest / "_segbatch" / "commits").iterdir())
    commits[1].unlink()
    stale = dest / "_segbatch" / "tmp" / "part-00001.killedattempt.parquet"  # a killed attempt's file
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a file")
    again = run_job(_job(image_dir, dest))
    assert not (dest / "_segbatch" / "tmp").exists()
    assert again.summary.images_this_run == 3
    after = {p.name: p.stat().st_mtime_ns for p in (dest / "data").glob("*.parquet")}
    changed = [name for name in before if before[name] != after[name]]
    assert len(changed) == 1
    assert _rows(dest) == sorted(_rows(dest), key=lambda r: r["uri"]) and len(_rows(dest)) == 9
    assert first.summary.rows == again.summary.rows == 9

    with pytest.raises(JobError, match="score_threshold: 0.0 -> 0.2.*--overwrite"):
        run_job(_job(image_dir, dest, model={"score_threshold": 0.2}))
    redo = run_job(_job(image_dir, dest, model={"score_threshold": 0.2}, overwrite=True))
    assert redo.complete and redo.summary.images_this_run == 9


def test_manifest_with_missing_entry(ray_local, image_dir, tmp_path):
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"uri,store\n{image_dir / 'astronaut.jpg'},7\n{image_dir / 'gone.jpg'},8\n")
    dest = tmp_path / "out"
    assert run_job(_job(manifest, dest)).complete
    rows = _rows(dest)
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert "not found" in rows[1]["error"]


def test_cli_run_exit_status_and_progress_lines(image_dir, tmp_path):
    dest = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "segbatch.cli",
        "run",
        str(image_dir),
        str(dest),
        "--model",
        "random",
        "--score-threshold",
        "0",
        "--max-detections",
        "3",
        "--min-size",
        "96",
        "--max-size",
        "128",
        "--shard-size",
        "4",
        "--workers",
        "1",
        "--cpus-per-worker",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "progress: 9/9 images" in proc.stderr
    assert "9 rows (4 with errors" in proc.stderr
    status = subprocess.run([sys.executable, "-m", "segbatch.cli", "status", str(dest)], capture_output=True, text=True)
    assert status.returncode == 0 and "9/9 images committed" in status.stdout

    bad = subprocess.run([*cmd[:6], "--score-threshold", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--score-threshold must be within [0, 1]" in bad.stderr


def test_incremental_run_processes_only_new_images(ray_local, tmp_path):
    """A nightly job re-lists a growing prefix: only the new day's images run."""
    src = tmp_path / "shelf"
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.immunohistochemistry()]
    small = [np.asarray(Image.fromarray(p).resize((p.shape[1] // 4, p.shape[0] // 4))) for p in photos]
    for i, img in enumerate(small[:3]):
        _save(img, src / "2026-11-21" / f"img{i}.jpg")
    dest = tmp_path / "out"
    first = run_job(_job(src, dest))
    assert first.summary.images_this_run == 3
    for i, img in enumerate(small[3:]):
        _save(img, src / "2026-11-22" / f"img{i}.jpg")
    second = run_job(_job(src, dest))
    assert second.complete and second.summary.images_this_run == 2
    rows = _rows(dest)
    assert len(rows) == 5 and len({r["uri"] for r in rows}) == 5
    assert sum("2026-11-22" in r["uri"] for r in rows) == 2
    third = run_job(_job(src, dest))
    assert third.summary.images_this_run == 0


def test_startup_wait_counts_from_the_last_ready_worker():
    unready = StartupGuard(timeout_s=600.0, clock=lambda: 100.0)
    assert unready.waited(False, 130.0) == 30.0  # the pool's first workers still starting
    unready.warned = True
    assert unready.waited(True, 4000.0) == 0.0 and not unready.warned
    # hours later every worker is lost: the replacements get the whole timeout
    assert unready.waited(False, 9000.0) == 0.0
    assert unready.waited(False, 9010.0) == 10.0
    assert unready.waited(True, 9020.0) == 0.0 and unready.waited(False, 9021.0) == 0.0


def test_worker_is_replaced_after_failures_in_a_row():
    w = _Worker(handle=None, ready_ref=None)
    assert MAX_FAILURES_IN_A_ROW == 2
    assert not w.shard_failed()
    w.shard_committed()  # a success between two failures: not in a row
    assert not w.shard_failed()
    assert w.shard_failed()
