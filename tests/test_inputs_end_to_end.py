"""Whole jobs over the inputs real archives bring: names that are not UTF-8,
and a DEST (and ``--semantic-out``) under SOURCE, as a nightly job has it.

Real Ray (in-process, 2 CPUs), real files, moto's S3 server over HTTP; the
model is torchvision's Mask R-CNN with seeded random weights at a tiny size.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
from PIL import Image

from segbatch.config import JobConfig, ModelConfig
from segbatch.engine import run_job
from segbatch.storage import Storage

from s3util import S3Bucket

FAST_MODEL = dict(model="random", seed=5, score_threshold=0.0, max_detections=3, min_size=64, max_size=96)


def _png(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _job(source: str, dest: str, **kw) -> JobConfig:
    model = ModelConfig(**FAST_MODEL)
    return JobConfig(source=source, dest=dest, model=model, shard_size=2, workers=1, cpus_per_worker=1, **kw)


def _rows(dest: str, storage: Storage) -> list[dict]:
    fs, path = storage.fs(dest.rstrip("/") + "/data")
    fs.invalidate_cache()  # the job wrote here through other clients since
    table = pads.dataset(path, format="parquet", filesystem=fs).to_table(columns=["uri", "status", "error"])
    return sorted(table.to_pylist(), key=lambda r: r["uri"])


def test_names_that_are_not_utf8_each_get_their_row(ray_local, tmp_path: Path):
    """Planning crashed with UnicodeEncodeError and no image got a row; now each does, readable by its URI."""
    src = tmp_path / "camera"
    src.mkdir()
    names = [b"caf\xe9.png", b"IMG_\x81\x82.png", b"ok.png"]
    for i, name in enumerate(names):
        with open(os.fsencode(src) + b"/" + name, "wb") as f:
            f.write(_png(i))
    storage = Storage()
    result = run_job(_job(str(src), str(tmp_path / "out")))
    assert result.complete
    rows = _rows(str(tmp_path / "out"), storage)
    expected = {f"file://{src}/caf%E9.png": _png(0), f"file://{src}/IMG_%81%82.png": _png(1), f"{src}/ok.png": _png(2)}
    assert [r["uri"] for r in rows] == sorted(expected)
    assert all(r["status"] == "ok" for r in rows), rows
    assert {r["uri"]: storage.read_bytes(r["uri"]) for r in rows} == expected  # each read back by its URI


def _three_runs(source: str, dest: str, semantic_out: str, storage_options: dict | None = None) -> list[int]:
    storage = Storage(storage_options)
    counts = []
    for _ in range(3):
        result = run_job(_job(source, dest, semantic_out=semantic_out, storage_options=storage_options or {}))
        assert result.complete
        counts.append(len(_rows(dest, storage)))
    return counts


def test_dest_under_source_is_never_read_back(ray_local, tmp_path: Path):
    """SOURCE /x, DEST /x/results, class maps in /x/maps: rows grew 3 -> 6 -> 12 over three runs."""
    src = tmp_path / "shelves"
    for i in range(3):
        (src / f"store{i}").mkdir(parents=True)
        (src / f"store{i}" / f"shelf{i}.png").write_bytes(_png(i))
    assert _three_runs(str(src), str(src / "results"), str(src / "maps")) == [3, 3, 3]
    assert len(list((src / "maps").glob("*.png"))) == 3  # the class maps were written, and never read


def test_dest_under_source_on_s3(ray_local, s3: S3Bucket):
    """The common nightly setup: s3://bucket/ in, s3://bucket/results/ out (class maps under it too)."""
    for i in range(3):
        s3.put(f"store{i}/shelf{i}.png", _png(i))
    counts = _three_runs(s3.url(""), s3.url("results/"), s3.url("results/maps/"), s3.storage_options)
    assert counts == [3, 3, 3]
    assert len(s3.keys("results/maps/")) == 3
