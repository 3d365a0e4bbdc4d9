"""The Python API (``segbatch.run``, ``segbatch.read_results``): what a notebook,
an Airflow task or a Ray script calls, against real Ray, real files and S3 on moto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import segbatch
from segbatch import schema

FAST = dict(model="random", seed=3, score_threshold=0.0, max_detections=5, min_size=96, max_size=128)
POOL = dict(shard_size=2, workers=1, cpus_per_worker=1, progress="none")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name, image in (
        ("astronaut.jpg", skdata.astronaut()),
        ("chelsea.png", skdata.chelsea()),
        ("rocket.png", skdata.rocket()),
    ):
        Image.fromarray(image).resize((image.shape[1] // 4, image.shape[0] // 4)).save(root / name)
    (root / "notes.jpg").write_text("not an image\n")  # bad input costs one row, here as from the CLI
    return root


def test_import_segbatch_is_light_and_names_the_api():
    """`import segbatch` loads neither torch nor Ray (the CLI and Airflow's DAG parser import it)."""
    code = (
        "import sys, segbatch; "
        "assert callable(segbatch.run) and callable(segbatch.read_results); "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    # run/read_results were looked up above, but only the engine's use imports Ray and torch
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_segbatch_status_loads_no_model_code(tmp_path):
    """`segbatch status` reads DEST's records: importing torch for it took 3 of its 4 seconds."""
    from segbatch.engine import JobStore
    from segbatch.storage import Storage

    JobStore(str(tmp_path), Storage()).write_plan([f"/x/{i}.jpg" for i in range(10)], 4)
    code = (
        "import sys; from segbatch.cli import main; "
        f"main(['status', {str(tmp_path)!r}], standalone_mode=False); "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "0/10 images committed" in out and out.strip().endswith("[]"), out


@pytest.mark.slow
def test_run_then_read_results(ray_local, photos, tmp_path):
    dest = tmp_path / "out"
    result = segbatch.run(str(photos), str(dest), **FAST, **POOL)
    assert result.complete and result.failed == {} and result.failed_scenes == {}
    assert (result.summary.rows, result.summary.errors, result.summary.images_this_run) == (4, 1, 4)

    table = segbatch.read_results(str(dest))
    assert table.schema.equals(schema.SCHEMA, check_metadata=False)
    rows = sorted(table.to_pylist(), key=lambda r: r["uri"])
    assert [Path(r["uri"]).name for r in rows] == ["astronaut.jpg", "chelsea.png", "notes.jpg", "rocket.png"]
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok"]
    assert all(r["detections"] for r in rows if r["status"] == "ok")  # score threshold 0: random weights detect
    assert sum(len(r["detections"]) for r in rows) == result.summary.detections

    again = segbatch.run(str(photos), str(dest), **FAST, **POOL)  # the same call resumes: nothing runs twice
    assert again.complete and again.summary.images_this_run == 0 and again.summary.rows == 4
    assert segbatch.read_results(str(dest), columns=["uri", "status"]).column_names == ["uri", "status"]


@pytest.mark.slow
def test_run_and_read_results_on_s3_with_storage_options(ray_local, photos, s3):
    """Storage options pass straight through to fsspec, for the job and for reading."""
    for path in sorted(photos.glob("*.png")):
        s3.put(f"in/{path.name}", path.read_bytes())
    result = segbatch.run(s3.url("in/"), s3.url("out/"), storage_options=s3.storage_options, **FAST, **POOL)
    assert result.complete and result.summary.rows == 2
    table = segbatch.read_results(s3.url("out/"), storage_options=s3.storage_options)
    assert sorted(table.column("uri").to_pylist()) == [s3.url("in/chelsea.png"), s3.url("in/rocket.png")]


def test_an_unknown_option_names_the_nearest_one(tmp_path):
    with pytest.raises(segbatch.SegbatchError) as err:
        segbatch.run(str(tmp_path), str(tmp_path / "out"), shard_sise=8)
    assert "shard_sise (did you mean shard_size?)" in str(err.value)
    assert err.value.exit_code == 2


def test_a_bad_value_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(segbatch.SegbatchError, match="--score-threshold must be within"):
        segbatch.run(str(tmp_path), str(tmp_path / "out"), score_threshold=2.0)


def test_read_results_of_a_dest_without_results_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `segbatch run SOURCE"):
        segbatch.read_results(str(tmp_path / "nothing"))


def test_job_config_is_what_the_command_line_builds(tmp_path):
    """`segbatch.run`'s keywords and `segbatch run`'s options make the same config."""
    from segbatch.cli import build_config, run

    args = ["--model", "random", "--min-size", "96", "--shard-size", "8", "--stall-timeout", "30"]
    ctx = run.make_context("run", [str(tmp_path), str(tmp_path / "o"), *args])
    params = dict(ctx.params)
    source, dest = params.pop("source"), params.pop("dest")
    with ctx:
        from_cli = build_config(ctx, source, dest, params)
    from_python = segbatch.job_config(
        str(tmp_path), str(tmp_path / "o"), model="random", min_size=96, shard_size=8, stall_timeout_s=30.0
    )
    assert from_python == from_cli
    assert np.isclose(from_python.stall_timeout_s, 30.0)
