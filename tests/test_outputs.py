"""What users do with a job's results: COCO export and AP, overlays, the HTML report.

One real job (local Ray, the shipped demo model) segments a few generated
scenes with ground truth; every command below reads its DEST.
"""

from __future__ import annotations

import contextlib
import io
import json
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
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segbatch.cli import main
from segbatch.config import JobConfig, ModelConfig
from segbatch.job import run_job
from segbatch.render import decode_mask
from segbatch.synth import write_dataset

SCENES = 6


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("outputs")
    gt = write_dataset(str(root / "scenes"), SCENES, seed=2026)
    dest = root / "dest"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        cfg = JobConfig(source=str(root / "scenes" / "images"), dest=str(dest), model=ModelConfig(model="demo"),
                        shard_size=2, workers=1, cpus_per_worker=2, progress="none")  # fmt: skip
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
    picture = np.asarray(Image.open(tmp_path / name.replace(".png", ".png")))
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
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
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
