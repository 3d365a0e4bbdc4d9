"""``segbatch publish DEST --iceberg ...``: DEST's Parquet files registered in an Iceberg
table (pyiceberg, a SQL catalog on SQLite), each file once, read back by a scan and DuckDB.

DESTs come from a real job (``segbatch.run`` on Ray, the model's random weights) where
the point is the job's own files and a nightly rerun that adds images; elsewhere from
schema-valid Parquet written through ``segbatch.schema`` (seconds instead of a job).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data as skdata

pytest.importorskip("pyiceberg", reason="pyiceberg is not installed: pip install 'segbatch[iceberg]'")

import segbatch  # noqa: E402
from segbatch import schema  # noqa: E402
from segbatch.cli import results as results_cli  # noqa: E402
from segbatch.outputs import (  # noqa: E402
    PublishError,
    TableRef,
    fileio_properties,
    open_catalog,
    parse_table_ref,
    publish,
    read_results,
)
from segbatch.storage import Storage  # noqa: E402

REF = TableRef(None, ("retail", "shelves"))
FAST = dict(model="random", seed=3, score_threshold=0.0, max_detections=5, min_size=96, max_size=128)
POOL = dict(shard_size=1, workers=1, cpus_per_worker=1, progress="none")


def sql_catalog(root: Path, warehouse: str | None = None):
    """A SQL catalog on SQLite, its warehouse (where the table's metadata go) local unless given."""
    return open_catalog("test", {"uri": f"sqlite:///{root}/catalog.db", "warehouse": warehouse or f"file://{root}/wh"})


def rows_of(table) -> list[dict]:
    """The table's rows by URI. A mask model's ``keypoints`` (null) read as []: pyiceberg
    scans a null list inside the list of detections back as an empty one."""
    rows = sorted(table.to_pylist(), key=lambda r: r["uri"])
    for row in rows:
        for d in row["detections"]:
            d["keypoints"] = d["keypoints"] or []
    return rows


def write_shard(dest: str, shard: int, uris: list[str], storage: Storage | None = None) -> None:
    """A committed shard's file as the job writes it: SCHEMA, segbatch's metadata, DEST/data/part-N."""
    mask = {"size": [48, 64], "counts": "PPYo0"}
    detection = {"label": 1, "label_name": "bottle", "score": 0.9, "box": [1, 2, 30, 40], "mask": mask, "area": 12}
    rows = [schema.ok_row(u, 64, 48, [detection]) for u in uris] + [schema.error_row(f"{uris[0]}.bad", "not an image")]
    meta = schema.file_metadata(
        model_id="random", weights_hash="h", result_key="k1", thresholds={}, classes=["bg", "bottle"], version="t"
    )
    (storage or Storage()).write_parquet(schema.rows_to_table(rows, meta), f"{dest}/data/part-{shard:05d}.parquet")


# -- a real job, and the nightly rerun that adds images --------------------------------------------


def photo(root: Path, name: str, image) -> None:
    Image.fromarray(image).resize((image.shape[1] // 4, image.shape[0] // 4)).save(root / name)


@pytest.mark.slow
def test_a_job_published_twice_then_after_a_nightly_rerun_holds_each_row_once(ray_local, tmp_path):
    source, dest = tmp_path / "incoming", str(tmp_path / "segments")
    source.mkdir()
    photo(source, "astronaut.jpg", skdata.astronaut())
    photo(source, "chelsea.png", skdata.chelsea())
    assert segbatch.run(str(source), dest, **FAST, **POOL).complete
    catalog, storage = sql_catalog(tmp_path), Storage()

    first = publish(dest, storage, catalog, REF)
    again = publish(dest, storage, catalog, REF)  # a rerun of the publish: nothing twice
    assert first.created and len(first.added) == 2 and first.rows_added == 2
    assert (again.added, again.rows_added, again.snapshot_id, again.created) == ((), 0, None, False)
    assert sorted(again.skipped) == sorted(first.added) and again.table_rows == 2

    photo(source, "rocket.png", skdata.rocket())  # the night brings another photo: the rerun adds a shard
    rerun = segbatch.run(str(source), dest, **FAST, **POOL)
    assert rerun.complete and rerun.summary.images_this_run == 1
    later = publish(dest, storage, catalog, REF)
    assert len(later.added) == 1 and later.rows_added == 1 and sorted(later.skipped) == sorted(first.added)
    assert not set(later.added) & set(first.added)

    table = catalog.load_table(REF.identifier)
    dest_rows = read_results(dest, storage)
    assert later.table_rows == dest_rows.num_rows == 3
    scanned = table.scan().to_arrow()
    assert rows_of(scanned) == rows_of(dest_rows)  # every column, masks and boxes included
    assert {f.file.file_path for f in table.scan().plan_files()} == set(first.added) | set(later.added)
    assert len(table.snapshots()) == 2  # one snapshot per publish that added files
    assert table.current_snapshot().summary["segbatch.dest"] == dest

    con = duckdb.connect()
    con.register("shelves", scanned)
    ok, detections = con.execute("select count(*), sum(len(detections)) from shelves where status = 'ok'").fetchone()
    assert ok == 3 and detections == sum(len(r["detections"]) for r in dest_rows.to_pylist())


# -- schema-valid Parquet: the rules, in seconds ---------------------------------------------------


def test_files_added_to_dest_since_are_the_only_ones_published(tmp_path):
    dest, catalog, storage = str(tmp_path / "dest"), sql_catalog(tmp_path), Storage()
    write_shard(dest, 0, ["s3://in/a.jpg", "s3://in/b.jpg"])
    write_shard(dest, 1, ["s3://in/c.jpg"])
    first = publish(dest, storage, catalog, REF)
    write_shard(dest, 2, ["s3://in/d.jpg"])
    second = publish(dest, storage, catalog, REF)
    assert [Path(u).name for u in second.added] == ["part-00002.parquet"]
    assert (first.rows_added, second.rows_added, second.table_rows) == (5, 2, 7)
    snapshot = catalog.load_table(REF.identifier).current_snapshot()
    assert (snapshot.snapshot_id, snapshot.summary["segbatch.result-keys"]) == (second.snapshot_id, "k1")
    assert rows_of(catalog.load_table(REF.identifier).scan().to_arrow()) == rows_of(read_results(dest, storage))


def test_several_nights_publish_into_one_table(tmp_path):
    """One DEST a night (jobs/retail-nightly.yaml), one table: each night's files join it."""
    catalog, storage = sql_catalog(tmp_path), Storage()
    for night in ("2026-11-20", "2026-11-21"):
        write_shard(str(tmp_path / night), 0, [f"s3://in/{night}/a.jpg"])
        assert len(publish(str(tmp_path / night), storage, catalog, REF).added) == 1
    scanned = catalog.load_table(REF.identifier).scan(row_filter="status == 'ok'").to_arrow()
    assert sorted(scanned.column("uri").to_pylist()) == ["s3://in/2026-11-20/a.jpg", "s3://in/2026-11-21/a.jpg"]


def test_a_dest_rewritten_after_publishing_is_refused(tmp_path):
    """A cleared and rerun DEST has files of the same names and other bytes: the table's
    counts and statistics of them would be wrong, so publishing says what to do instead."""
    dest, catalog, storage = str(tmp_path / "dest"), sql_catalog(tmp_path), Storage()
    write_shard(dest, 0, ["s3://in/a.jpg"])
    write_shard(dest, 1, ["s3://in/b.jpg"])
    publish(dest, storage, catalog, REF)
    write_shard(dest, 0, ["s3://in/a.jpg", "s3://in/other.jpg"])
    with pytest.raises(PublishError, match="1 changed since they were published.*new table"):
        publish(dest, storage, catalog, REF)
    os.remove(f"{dest}/data/part-00001.parquet")
    write_shard(dest, 0, ["s3://in/a.jpg"])  # the bytes it had
    with pytest.raises(PublishError, match="1 gone since"):
        publish(dest, storage, catalog, REF)


def test_files_that_are_not_segbatch_results_are_left_or_refused(tmp_path):
    dest, catalog, storage = str(tmp_path / "dest"), sql_catalog(tmp_path), Storage()
    write_shard(dest, 0, ["s3://in/a.jpg"])
    Path(dest, "data", "notes.txt").write_text("left alone")  # not a results file: not registered
    assert len(publish(dest, storage, catalog, REF).added) == 1
    pq.write_table(schema.rows_to_table([]).drop_columns(["error"]), f"{dest}/data/part-00001.parquet")
    with pytest.raises(PublishError, match="part-00001.parquet does not have this segbatch's columns"):
        publish(dest, storage, catalog, REF)
    with pytest.raises(PublishError, match="no data/ folder"):
        publish(str(tmp_path / "nothing"), storage, catalog, REF)


def test_table_names_and_storage_options_the_pyiceberg_way():
    assert parse_table_ref("retail.shelves") == TableRef(None, ("retail", "shelves"))
    assert parse_table_ref("lake.retail.shelves") == TableRef("lake", ("retail", "shelves"))
    with pytest.raises(PublishError, match="NAMESPACE.TABLE"):
        parse_table_ref("shelves")
    s3fs_options = {"key": "AK", "secret": "SK", "client_kwargs": {"endpoint_url": "http://h:9000", "region_name": "r"}}
    assert fileio_properties(s3fs_options) == {
        "s3.endpoint": "http://h:9000",
        "s3.access-key-id": "AK",
        "s3.secret-access-key": "SK",
        "s3.region": "r",
    }
    assert fileio_properties({"anon": True}) == {"s3.anonymous": "true"}


# -- S3 (moto's server) and the command line --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "io_impl, on_s3",
    [
        ("pyiceberg.io.pyarrow.PyArrowFileIO", False),  # pyiceberg's default; its writes fail on moto (see below)
        ("pyiceberg.io.fsspec.FsspecFileIO", True),  # s3fs, as segbatch: the table's metadata on S3 too
    ],
)
def test_a_dest_on_s3_reached_with_the_storage_options(s3, tmp_path, io_impl, on_s3):
    """pyiceberg's S3 access gets DEST's endpoint and keys from the storage options.

    pyarrow's S3 (pyarrow 26) cannot complete a multipart upload on moto's server
    (INTERNAL_FAILURE in a 200 response) when writing the table's metadata: with
    pyarrow's FileIO the metadata stay local here, DEST's files are read from S3."""
    storage = Storage(s3.storage_options)
    dest = s3.url("segments/2026-11-21")
    write_shard(dest, 0, ["s3://in/a.jpg", "s3://in/b.jpg"], storage)
    warehouse = s3.url("warehouse") if on_s3 else f"file://{tmp_path}/wh"
    properties = {"uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": warehouse, "py-io-impl": io_impl}
    catalog = open_catalog("s3test", {**properties, **fileio_properties(s3.storage_options)})
    result = publish(dest, storage, catalog, REF)
    assert result.added == (f"{dest}/data/part-00000.parquet",) and result.table_rows == 3
    assert publish(dest, storage, catalog, REF).added == ()
    assert rows_of(catalog.load_table(REF.identifier).scan().to_arrow()) == rows_of(read_results(dest, storage))
    metadata = [k for k in s3.keys("warehouse/") if k.startswith("warehouse/retail/shelves/metadata/")]
    assert bool(metadata) == on_s3
    assert s3.keys("segments/") == ["segments/2026-11-21/data/part-00000.parquet"]  # DEST's files as they were


def test_publish_command_with_catalog_options(tmp_path):
    dest = str(tmp_path / "dest")
    write_shard(dest, 0, ["s3://in/a.jpg"])
    args = [dest, "--iceberg", "retail.shelves", "--catalog-uri", f"sqlite:///{tmp_path}/c.db"]
    args += ["--warehouse", f"file://{tmp_path}/wh"]
    out = CliRunner().invoke(results_cli.publish, args)
    assert out.exit_code == 0, out.output
    assert "retail.shelves: created, 1 files added (2 rows), 0 already there; 2 rows in the table" in out.output
    out = CliRunner().invoke(results_cli.publish, args)
    assert "0 files added (0 rows), 1 already there; 2 rows in the table" in out.output
    out = CliRunner().invoke(results_cli.publish, [*args, "--catalog-property", "novalue"])
    assert out.exit_code == 2 and "is not KEY=VALUE" in out.output


def test_publish_command_reads_the_catalog_from_pyicebergs_variables(tmp_path):
    """PYICEBERG_CATALOG__<NAME>__<PROPERTY>, as a scheduler's environment sets them
    (pyiceberg reads them when imported: a fresh process)."""
    dest = str(tmp_path / "dest")
    write_shard(dest, 0, ["s3://in/a.jpg"])
    env = {
        **os.environ,
        "PYICEBERG_CATALOG__NIGHTLY__URI": f"sqlite:///{tmp_path}/c.db",
        "PYICEBERG_CATALOG__NIGHTLY__WAREHOUSE": f"file://{tmp_path}/wh",
    }
    code = "import sys; from segbatch.cli.results import publish; publish(sys.argv[1:])"
    run = subprocess.run(
        [sys.executable, "-c", code, dest, "--iceberg", "nightly.retail.shelves"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "1 files added (2 rows)" in run.stderr
    catalog = open_catalog("nightly", {"uri": f"sqlite:///{tmp_path}/c.db"})  # a SQL catalog's tables go by its name
    table = catalog.load_table(("retail", "shelves"))
    assert table.scan().to_arrow().num_rows == 2


def test_publish_command_errors_are_one_line_naming_the_fix(tmp_path):
    """Through the command group's error handling (as `segbatch publish` once registered in group.py)."""
    from segbatch.cli.group import SegbatchGroup

    group = SegbatchGroup(commands=[results_cli.publish])
    args = ["publish", str(tmp_path / "empty"), "--iceberg", "retail.shelves", "--catalog-uri", "sqlite:///:memory:"]
    out = CliRunner().invoke(group, [*args, "--warehouse", f"file://{tmp_path}/wh"])
    assert out.exit_code == 2 and "segbatch: error:" in out.output and "no data/ folder" in out.output
    out = CliRunner().invoke(group, ["publish", str(tmp_path), "--iceberg", "shelves"])
    assert out.exit_code == 2 and "CATALOG.NAMESPACE.TABLE" in out.output
    out = CliRunner().invoke(
        group, ["publish", str(tmp_path), "--iceberg", "retail.shelves", "--catalog-uri", "ftp://x"]
    )
    assert out.exit_code == 2 and "cannot open the Iceberg catalog 'default'" in out.output


# -- the nightly job's publish step --------------------------------------------------------

SEGBATCH_SHIM = """#!/bin/sh
# `segbatch run` stands in for the night's job (the test wrote its DEST); `segbatch publish` is real.
[ "$1" = run ] && exit 0
exec {python} -m segbatch.cli "$@"
"""


def test_the_nightly_entrypoint_publishes_the_run_to_the_table(tmp_path):
    """jobs/nightly_ray_job.py's entrypoint, run by /bin/sh as Ray runs it, with the
    catalog `lake` from PYICEBERG_CATALOG__LAKE__* as on the Ray head: DEST's rows land
    in lake.retail.shelf_segments."""
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("nightly_ray_job", root / "jobs" / "nightly_ray_job.py")
    nightly = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, nightly)  # dataclasses look their module up there
    spec.loader.exec_module(nightly)
    dest = str(tmp_path / "segments" / "2026-11-30")
    write_shard(dest, 0, ["s3://in/a.jpg", "s3://in/b.jpg"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "segbatch").write_text(SEGBATCH_SHIM.format(python=sys.executable))
    (bin_dir / "segbatch").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        "PYICEBERG_CATALOG__LAKE__URI": f"sqlite:///{tmp_path}/c.db",
        "PYICEBERG_CATALOG__LAKE__WAREHOUSE": f"file://{tmp_path}/wh",
    }
    entrypoint = nightly.nightly_entrypoint(
        "retail-nightly.yaml", "s3://in/", dest, iceberg="lake.retail.shelf_segments"
    )
    run = subprocess.run(["/bin/sh", "-c", entrypoint], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "retail.shelf_segments: created, 1 files added (3 rows)" in run.stderr, run.stderr
    table = open_catalog("lake", {"uri": f"sqlite:///{tmp_path}/c.db"}).load_table(("retail", "shelf_segments"))
    assert table.scan().to_arrow().num_rows == 3
