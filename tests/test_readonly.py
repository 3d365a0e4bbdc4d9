"""Read-only commands never change DEST: ``status``, ``report``, ``export``,
``render``, ``eval`` and ``counts`` leave every file under it as it was, also
while another run's ``--overwrite`` is clearing it (a clear is finished only
by a driver holding DEST's lease)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils

from segbatch import schema
from segbatch.cli import main
from segbatch.engine import JobStore, JobSummary
from segbatch.storage import Storage

IMAGES = 3
W, H = 64, 48


def _detection() -> dict:
    mask = np.zeros((H, W), np.uint8, order="F")
    mask[4:20, 4:20] = 1
    rle = mask_utils.encode(mask)
    box = [4.0, 4.0, 20.0, 20.0]
    mask_rle = {"size": [H, W], "counts": rle["counts"].decode()}
    return {"label": 1, "label_name": "thing", "score": 0.9, "box": box, "mask": mask_rle, "area": 256}


@pytest.fixture
def finished(tmp_path: Path) -> dict:
    """A finished job's DEST written as a driver and its actors write it (plan, config,
    data files with their metadata, commit records, summary, progress), its images,
    and a COCO ground truth for them."""
    images = tmp_path / "images"
    images.mkdir()
    uris = []
    for i in range(IMAGES):
        path = images / f"img{i}.png"
        Image.fromarray(np.full((H, W, 3), 60 * i, np.uint8)).save(path)
        uris.append(str(path))
    dest = tmp_path / "dest"
    storage = Storage()
    store = JobStore(str(dest), storage)
    store.write_plan(uris, 2)
    store.write_config({"result_key": "k", "result_fields": {}, "job": {}})
    classes = ["__background__", "thing"]
    meta = schema.file_metadata(
        model_id="demo", weights_hash="h", result_key="k", thresholds={}, classes=classes, version="0"
    )
    for shard, chunk in enumerate((uris[:2], uris[2:])):
        rows = [schema.ok_row(u, W, H, [_detection()]) for u in chunk]
        shard_meta = schema.shard_metadata(shard, len(rows), 1.0, 2.0, len(rows))
        storage.write_parquet(schema.rows_to_table(rows, {**meta, "shard": shard_meta}), store.data_url(shard))
        record = {"shard": shard, "rows": len(rows), "errors": 0, "detections": len(rows)}
        storage.write_bytes(store.commit_url(shard), json.dumps(record).encode())
    _write_objects(dest, uris[0])
    store.write_summary(JobSummary(complete=True, finished=3.0))
    store.write_progress({"done": IMAGES, "total": IMAGES, "updated": 2.0})
    polygon = [[4, 4, 20, 4, 20, 20, 4, 20]]
    square = {"category_id": 1, "bbox": [4, 4, 16, 16], "area": 256, "iscrowd": 0, "segmentation": polygon}
    gt = {
        "images": [{"id": i + 1, "file_name": f"img{i}.png", "width": W, "height": H} for i in range(IMAGES)],
        "annotations": [{"id": i + 1, "image_id": i + 1, **square} for i in range(IMAGES)],
        "categories": [{"id": 1, "name": "thing"}],
    }
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    out = tmp_path / "elsewhere"
    out.mkdir()
    return {"dest": str(dest), "gt": str(gt_path), "out": out}


def _write_objects(dest: Path, scene: str) -> None:
    """DEST/objects/ as a tiled job leaves it: one scene's GeoParquet (one square object, UTM 31N)."""
    import pyarrow.parquet as pq
    import shapely
    from rasterio.crs import CRS

    from segbatch.geo.georef import geo_metadata

    square = shapely.box(500000, 5000000, 500008, 5000008)
    row = {**_detection(), "uri": scene, "geometry": square.wkb}
    geo = geo_metadata(CRS.from_epsg(32631).to_wkt(), ["Polygon"], list(square.bounds))
    (dest / "objects").mkdir()
    table = schema.rows_to_table([row], schema=schema.OBJECT_SCHEMA, extra_metadata={schema.GEO_METADATA_KEY: geo})
    pq.write_table(table, dest / "objects" / "scene-0.parquet")


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: size and modification time in ns."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.stat(os.path.join(folder, name))
            size = st.st_size if name in files else 0
            found[os.path.relpath(os.path.join(folder, name), root)] = (size, st.st_mtime_ns)
    return found


COMMANDS = {
    "status": lambda f: ["status", f["dest"]],
    "status --json": lambda f: ["status", f["dest"], "--json"],
    "report": lambda f: ["report", f["dest"], "--out", str(f["out"] / "report.html"), "--overlays", "1"],
    "export": lambda f: ["export", f["dest"], "--coco", str(f["out"] / "coco.json"), "--ground-truth", f["gt"]],
    "export gpkg": lambda f: ["export", f["dest"], str(f["out"] / "objects.gpkg"), "--layer-per-class"],
    "render": lambda f: ["render", f["dest"], "--out", str(f["out"] / "render"), "--count", "2"],
    "eval": lambda f: ["eval", f["dest"], f["gt"], "--json"],
    "counts": lambda f: ["counts", f["dest"], "--by", r"img(?P<n>\d)", "--out", "-"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_read_only_commands_never_change_dest(finished: dict, command: str):
    before = _snapshot(finished["dest"])
    result = CliRunner().invoke(main, COMMANDS[command](finished))
    assert result.exit_code == 0, result.output
    assert _snapshot(finished["dest"]) == before


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_read_only_commands_leave_a_clear_under_way_alone(finished: dict, command: str):
    """Another run's --overwrite has begun clearing DEST (its marker is there, the
    rest not deleted yet): a reader must not finish, race or disturb it."""
    Path(finished["dest"], "_segbatch", "clearing.json").write_text("{}")
    before = _snapshot(finished["dest"])
    result = CliRunner().invoke(main, COMMANDS[command](finished))
    assert _snapshot(finished["dest"]) == before, result.output
    if command.startswith("status"):
        assert result.exit_code == 1 and "is being cleared" in result.output and "Traceback" not in result.output
    else:  # data/ is still there: they read it as it stands
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["report", "render"])
def test_report_and_render_write_their_defaults_outside_dest(finished: dict, command: str, monkeypatch):
    """Without --out, the page and the overlays go to the current folder, named
    after DEST, never into DEST (which a running job may own)."""
    monkeypatch.chdir(finished["out"])
    before = _snapshot(finished["dest"])
    args = [command, finished["dest"]] + (["--overlays", "1"] if command == "report" else ["--count", "2"])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert _snapshot(finished["dest"]) == before
    if command == "report":
        assert (finished["out"] / "dest-report.html").stat().st_size > 0
    else:
        assert len(list((finished["out"] / "dest-render").glob("*.png"))) == 2
