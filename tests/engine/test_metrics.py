"""segbatch's Ray metrics (``segbatch/engine/metrics.py``) and its Grafana dashboard.

The fast tests check what the figures are made of: the cause tags of the
error messages the pipeline really writes, the ``dest`` tag, that a failing
record never fails a job, and that every panel of the dashboard charts a
metric segbatch defines, under the name Ray exports it as.

The slow one runs a job on a local Ray whose metrics endpoint is on a known
port, scrapes it while the job runs and after, and finds segbatch's image
counter rising to the job's total beside Ray's own metrics.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segbatch.engine import metrics
from segbatch.engine.pipeline import fetch_and_decode
from segbatch.engine.records import CommitRecord, Committed, Progress
from segbatch.engine.worker import POISON_ERROR
from segbatch.storage import Storage

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "segbatch-dashboard.json"
EXPORTED = {name: d for d in metrics.DEFINITIONS for name in d.exported}


# -- what the figures are made of -------------------------------------------------------


def _jpeg(size=(40, 60)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), 90, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_error_causes_of_the_messages_the_pipeline_writes(tmp_path):
    """Each bad input the pipeline meets gets its own cause tag, from the row it really writes."""
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 400 M pixels in a few KB
    files = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (_jpeg((400, 400))[:300], "truncated"),
        "notes.jpg": (b"this is not an image\n", "not_an_image"),
        "doc.jpg": (b"%PDF-1.4\n" + b"x" * 100, "not_an_image"),
        "bomb.png": (bomb.getvalue(), "too_large"),
        "huge.jpg": (_jpeg() + b"\0" * 5000, "too_large"),  # over max_bytes: refused before decoding
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    storage = Storage({})
    for name, (_, cause) in files.items():
        row = fetch_and_decode(str(tmp_path / name), storage, max_bytes=4000, max_pixels=10_000_000).error_row
        assert row is not None, name
        assert metrics.error_cause(row["error"]) == cause, (name, row["error"])
    gone = fetch_and_decode(str(tmp_path / "gone.jpg"), storage, max_bytes=4000, max_pixels=10_000_000).error_row
    assert metrics.error_cause(gone["error"]) == "not_found"
    assert metrics.error_cause(POISON_ERROR) == "worker_died"
    assert metrics.error_cause("model failed: RuntimeError: shape [0, 3]") == "model_failed"
    assert metrics.error_cause("something new") == "other"
    assert set(metrics.CAUSES) >= {"empty", "truncated", "not_an_image", "too_large", "not_found", "model_failed"}

    rows = [{"uri": "a", "error": None}, {"uri": "b", "error": "empty file (0 bytes)"}, {"uri": "c", "error": "x"}]
    assert metrics.error_causes(rows) == {"empty": 1, "other": 1}


def test_the_dest_tag_holds_no_secret():
    assert metrics.dest_tag("s3://bucket/nightly/2026-12-01/") == "s3://bucket/nightly/2026-12-01"
    presigned = "https://host/out?X-Amz-Signature=abc&X-Amz-Credential=AKIA"
    assert metrics.dest_tag(presigned) == "https://host/out"
    assert "hunter2" not in metrics.dest_tag("ftp://user:hunter2@host/out")


def test_every_metric_is_named_as_ray_wants_it():
    names = [d.name for d in metrics.DEFINITIONS]
    assert len(names) == len(set(names))
    for d in metrics.DEFINITIONS:
        assert re.fullmatch(r"segbatch_[a-z0-9_]+", d.name), d.name
        assert d.kind in ("counter", "gauge", "histogram")
        assert metrics.DEST in d.tags
        assert (d.kind == "histogram") == bool(d.boundaries)


def test_a_failing_record_never_fails_the_job(caplog, monkeypatch):
    """A record that fails (here a commit without a record) is logged once, never raised."""
    monkeypatch.setattr(metrics, "_warned", set())
    caplog.set_level(logging.WARNING, logger="segbatch.engine.metrics")
    job = metrics.JobMetrics("/tmp/out")
    broken = Committed(record=None)  # type: ignore[arg-type]
    job.committed(broken, 3)
    job.committed(broken, 3)
    warnings = [r.getMessage() for r in caplog.records if "cannot record segbatch's metrics" in r.getMessage()]
    assert len(warnings) == 1 and "the job goes on" in warnings[0]
    # the good records go on (without Ray they are no-ops)
    job.committed(Committed(CommitRecord(rows=3, detections=2, seconds=0.5, stage_seconds={"infer": 0.2})), 3)
    job.passed(Progress(total=3, done=3, shards_failed=0), 0, 0)
    metrics.WorkerRate("/tmp/out").add(2)


# -- the dashboard -----------------------------------------------------------------------


def _panel_exprs(dashboard: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for row_panel in [panel, *panel.get("panels", [])]:  # panels folded in a row too
            out += [(row_panel["title"], t["expr"]) for t in row_panel.get("targets", [])]
    return out


def test_every_dashboard_panel_charts_a_metric_segbatch_defines():
    """Each expression names only metrics of ``metrics.py`` under Ray's exported
    names (``ray_`` + name, ``_total`` for a counter, ``_bucket``/``_sum``/``_count``
    for a histogram), and every metric has a panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _panel_exprs(dashboard)
    assert len(dashboard["panels"]) >= 10 and exprs
    charted = set()
    for title, expr in exprs:
        names = set(re.findall(r"\bray_[a-zA-Z0-9_:]+", expr))
        assert names, f"panel {title!r} charts no ray_ metric: {expr}"
        unknown = names - EXPORTED.keys()
        assert not unknown, f"panel {title!r} names metrics segbatch does not define: {sorted(unknown)}"
        assert 'dest=~"$dest"' in expr, f"panel {title!r} ignores the DEST chosen: {expr}"
        charted |= {EXPORTED[n].name for n in names}
    assert charted == {d.name for d in metrics.DEFINITIONS}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert "ray_segbatch_images_planned" in variables["dest"]["definition"]


# -- Ray's Prometheus endpoint during a job ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Ray's endpoint: each sample name's (labels, value)s."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def _value(samples: dict, name: str, dest: str, **labels: str) -> float | None:
    found = [
        v
        for lab, v in samples.get(name, [])
        if lab.get("dest") == dest and all(lab.get(k) == x for k, x in labels.items())
    ]
    return sum(found) if found else None


@pytest.fixture(scope="module")
def ray_metrics(tmp_path_factory) -> Iterator[int]:
    """A local Ray whose metrics endpoint is on a known port (yielded), reporting
    every second (Ray's default: every 10 s), its workers running ``driver_hooks``."""
    import ray

    import driver_hooks

    port = _free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        runtime_env=driver_hooks.runtime_env(tmp_path_factory.mktemp("markers")),
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield port
    ray.shutdown()


def _job(src: Path, dest: Path, **kw):
    from segbatch.config import JobConfig, ModelConfig

    model = ModelConfig(model="random", seed=3, score_threshold=0.0, max_detections=5, min_size=64, max_size=96)
    options = {"shard_size": 2, "workers": 1, "cpus_per_worker": 1, "progress": "none", **kw}
    return JobConfig(source=str(src), dest=str(dest), model=model, **options)


def _settled(port: int, tag: str, total: int) -> dict:
    """The endpoint once the job's image counter shows ``total`` (the driver's
    last figures arrive within an export or two), or after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        samples = _scrape(port)
        if _value(samples, "ray_segbatch_images_total", tag) == total or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


@pytest.mark.slow
def test_the_image_counter_rises_to_the_jobs_total_at_rays_endpoint(ray_metrics, tmp_path):
    from segbatch.engine import run_job

    import driver_hooks
    import poison

    slow = 12  # each takes driver_hooks.SLOW_DECODE_S (1 s) to decode, one at a time: the job lasts 12 s or more
    src = tmp_path / "images"
    src.mkdir()
    for i in range(slow):
        (src / f"img{i:02d}.png").write_bytes(poison.png(i) + driver_hooks.SLOW_MARK)
    (src / "zz_empty.jpg").write_bytes(b"")
    (src / "zz_notes.jpg").write_text("this is not an image\n")
    total, shards = slow + 2, (slow + 2) // 2
    dest = tmp_path / "out"
    tag = metrics.dest_tag(str(dest))

    outcome: dict = {}
    job = threading.Thread(target=lambda: outcome.update(result=run_job(_job(src, dest, io_threads=1))), daemon=True)
    job.start()
    seen: list[tuple[bool, float]] = []  # (the job still running, the image counter)
    rates: list[float] = []
    while job.is_alive():
        samples = _scrape(ray_metrics)
        images = _value(samples, "ray_segbatch_images_total", tag)
        if images is not None:
            seen.append((job.is_alive(), images))
        rates += [v for lab, v in samples.get("ray_segbatch_worker_images_per_s", []) if lab.get("dest") == tag]
        time.sleep(0.5)
    job.join()
    result = outcome["result"]
    assert result.complete and result.summary.images == total
    samples = _settled(ray_metrics, tag, total)

    counts = [v for _, v in seen]
    assert any(running and 0 < v < total for running, v in seen), f"never seen mid-job: {seen}"
    assert counts == sorted(counts), f"the counter went down: {counts}"
    assert _value(samples, "ray_segbatch_images_total", tag) == total

    # the other figures of the job, as the summary tells them
    assert _value(samples, "ray_segbatch_errors_total", tag, cause="empty") == 1
    assert _value(samples, "ray_segbatch_errors_total", tag, cause="not_an_image") == 1
    assert _value(samples, "ray_segbatch_detections_total", tag) == result.summary.detections
    assert _value(samples, "ray_segbatch_shards_committed_total", tag) == shards
    assert _value(samples, "ray_segbatch_shard_seconds_count", tag) == shards
    stages = {lab["stage"] for lab, _ in samples["ray_segbatch_stage_seconds_total"] if lab.get("dest") == tag}
    assert stages == set(metrics.STAGES)
    assert _value(samples, "ray_segbatch_stage_seconds_total", tag, stage="fetch_decode") >= slow * 0.9
    assert _value(samples, "ray_segbatch_images_planned", tag) == total
    assert _value(samples, "ray_segbatch_queue_shards", tag) == 0
    assert rates and max(rates) > 0, "no worker's images/s seen while the job ran"
    assert _value(samples, "ray_segbatch_shards_retried_total", tag) is None  # nothing ran twice
    # every metric the dashboard charts is exported under its name, but the two that stay at 0
    # in a job where nothing fails (Ray exports a counter once it counted something)
    untouched = {"ray_segbatch_shards_failed_total", "ray_segbatch_shards_retried_total"}
    missing = {n for n in EXPORTED if n not in samples} - untouched
    assert missing <= {"ray_segbatch_worker_images_per_s"}, missing  # a gauge: gone with its actor
    # beside Ray's own
    assert any(n.startswith("ray_") and not n.startswith("ray_segbatch_") for n in samples)


@pytest.mark.slow
def test_shards_rerun_and_a_worker_killed_by_an_image_are_counted(ray_metrics, tmp_path):
    """Two shards on one actor, one holding an image that kills its worker: both
    run again (the driver's poison hunt), the image gets its error row, and the
    metrics count the reruns, the ``worker_died`` row and every image once."""
    from segbatch.engine import run_job

    import poison

    src = tmp_path / "images"
    poison.two_shards_one_poisoned(src)
    dest = tmp_path / "out"
    tag = metrics.dest_tag(str(dest))
    result = run_job(_job(src, dest, retries=1))
    assert result.complete and result.summary.errors == 1

    samples = _settled(ray_metrics, tag, 4)
    assert _value(samples, "ray_segbatch_images_total", tag) == 4  # the reruns' images counted once
    assert _value(samples, "ray_segbatch_errors_total", tag) == 1
    assert _value(samples, "ray_segbatch_errors_total", tag, cause="worker_died") == 1
    assert _value(samples, "ray_segbatch_shards_committed_total", tag) == 2
    assert _value(samples, "ray_segbatch_shards_retried_total", tag) >= 2  # both shards of the dead actor
    assert _value(samples, "ray_segbatch_shards_failed_total", tag) is None
