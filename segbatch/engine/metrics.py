"""segbatch's figures as Ray metrics (``ray.util.metrics``): each defined once
here, recorded where the engine already counts, and scraped from Ray's
Prometheus endpoint beside Ray's own (``infra/grafana/segbatch-dashboard.json``
charts them).

Ray exports an application metric ``NAME`` as ``ray_NAME``: a counter as
``ray_NAME_total``, a histogram as ``ray_NAME_bucket``/``_sum``/``_count``, a
gauge as ``ray_NAME``. Every metric carries ``dest``: the job's DEST, its query
and any password masked, so the figures of one nightly run (one DEST) stand
apart from another's. The tag is not called ``job``: Prometheus sets ``job``
itself on every scraped series (the scrape job), and renames an exported
``job`` label to ``exported_job``.

Where each figure is recorded, and why there:

- the driver (``pool.py``) records what the job committed (images, error rows
  by cause, detections, stage seconds, shards committed, failed and rerun) and
  what it sees each pass (shards waiting, workers ready, images done). It
  outlives the actors: an actor is killed the moment the job ends, and what
  it recorded since its last export (every ``metrics_report_interval_ms``,
  10 s by default) would go with it, so counters the job's total is read from
  are never recorded in an actor.
- each actor (``worker.py``) sets its own images/s, a gauge that Ray lets age
  out once the actor is gone.

Metrics are a view, never a reason to fail: an error while defining or
recording them is logged once (per kind of record) and the job goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from segbatch.redact import redact

from .records import Committed, Progress

log = logging.getLogger(__name__)

DEST = "dest"

# What an error row's message says went wrong, from the messages the pipeline
# writes (engine/pipeline.py, model/decode.py, worker.POISON_ERROR): first match wins.
CAUSE_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("empty", ("empty file",)),
    ("truncated", ("truncated",)),
    ("too_large", ("too large", "TooLarge", "more than the limit")),
    ("not_found", ("not found",)),
    ("not_an_image", ("not an image", "unsupported format")),
    ("corrupt", ("cannot decode",)),
    ("unreadable", ("cannot read",)),
    ("model_failed", ("model failed",)),
    ("worker_died", ("worker died",)),
)
CAUSES: tuple[str, ...] = (*(cause for cause, _ in CAUSE_PATTERNS), "other")

STAGES: tuple[str, ...] = ("fetch_decode", "infer", "encode", "write")


@dataclass(frozen=True)
class MetricDef:
    """One metric: its Ray name (Prometheus adds ``ray_`` and, to a counter, ``_total``)."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    description: str
    tags: tuple[str, ...] = (DEST,)
    boundaries: tuple[float, ...] = ()

    @property
    def exported(self) -> tuple[str, ...]:
        """The names Ray's Prometheus endpoint shows it under."""
        base = f"ray_{self.name}"
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


DEFINITIONS: tuple[MetricDef, ...] = (
    MetricDef("segbatch_images", "counter", "Images (tiles, in a tiled job) of committed shards, error rows included"),
    MetricDef("segbatch_errors", "counter", "Error rows of committed shards, by cause", (DEST, "cause")),
    MetricDef("segbatch_detections", "counter", "Detections in committed shards"),
    MetricDef("segbatch_shards_committed", "counter", "Shards committed"),
    MetricDef("segbatch_shards_failed", "counter", "Shards given up after their retries (the job is incomplete)"),
    MetricDef(
        "segbatch_shards_retried",
        "counter",
        "Shard runs that did not commit and run again: the shard failed, or its actor died or was replaced",
    ),
    MetricDef(
        "segbatch_stage_seconds",
        "counter",
        "Seconds committed shards spent in each stage: fetch_decode, infer, encode (summed over a "
        "worker's threads), write (the commit)",
        (DEST, "stage"),
    ),
    MetricDef(
        "segbatch_shard_seconds",
        "histogram",
        "Seconds from a shard's start on its worker to its commit",
        boundaries=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600),
    ),
    MetricDef("segbatch_queue_shards", "gauge", "Shards waiting for a worker"),
    MetricDef("segbatch_workers", "gauge", "Workers ready (model loaded)"),
    MetricDef(
        "segbatch_images_done",
        "gauge",
        "Images the driver counts done, those of running shards included (it drops back when a shard reruns)",
    ),
    MetricDef("segbatch_images_planned", "gauge", "Images (tiles) in the job's plan"),
    MetricDef(
        "segbatch_worker_images_per_s",
        "gauge",
        "A worker's images per second since its first shard started",
        (DEST, "worker"),
    ),
)
BY_NAME: dict[str, MetricDef] = {d.name: d for d in DEFINITIONS}


def dest_tag(dest: str) -> str:
    """The ``dest`` tag of a job: DEST without a query (a presigned URL's) and
    with any password masked, no trailing slash."""
    return redact(dest.split("?", 1)[0].split("#", 1)[0]).rstrip("/") or dest


def error_cause(message: str | None) -> str:
    """The cause tag (one of ``CAUSES``) of an error row's message."""
    text = (message or "").lower()
    for cause, patterns in CAUSE_PATTERNS:
        if any(p.lower() in text for p in patterns):
            return cause
    return "other"


def error_causes(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """How many of ``rows`` are error rows, by cause."""
    return dict(Tally(error_cause(r["error"]) for r in rows if r.get("error")))


# -- the metrics of this process, made on first use ----------------------------------

_lock = threading.Lock()
_made: dict[str, Any] | None = None
_warned: set[str] = set()


@contextmanager
def _never_fails(what: str) -> Iterator[None]:
    """Run a record; an error is logged the first time for ``what``, then dropped."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - a metric must never fail a job
        if what not in _warned:
            _warned.add(what)
            log.warning("cannot record segbatch's metrics (%s): %s: %s; the job goes on", what, type(exc).__name__, exc)


def _metrics() -> dict[str, Any] | None:
    """This process's Ray metric objects, by name; None before Ray is initialized.

    Made once per process, and only once Ray is up: before, there is nowhere
    to export to, and records are dropped (a library call outside Ray)."""
    global _made
    import ray

    with _lock:
        if _made is None and ray.is_initialized():
            from ray.util import metrics as rm

            made: dict[str, Any] = {}
            for d in DEFINITIONS:
                if d.kind == "counter":
                    made[d.name] = rm.Counter(d.name, d.description, d.tags)
                elif d.kind == "gauge":
                    made[d.name] = rm.Gauge(d.name, d.description, d.tags)
                else:
                    made[d.name] = rm.Histogram(d.name, d.description, list(d.boundaries), d.tags)
            _made = made
        return _made


def _inc(name: str, value: float, tags: dict[str, str]) -> None:
    made = _metrics()
    if made is not None and value > 0:  # Ray's counter refuses 0
        made[name].inc(value, tags)


def _set(name: str, value: float, tags: dict[str, str]) -> None:
    made = _metrics()
    if made is not None:
        made[name].set(value, tags)


def _observe(name: str, value: float, tags: dict[str, str]) -> None:
    made = _metrics()
    if made is not None:
        made[name].observe(value, tags)


class JobMetrics:
    """The driver's records of one job (``pool.py``): a commit as it arrives, and
    the pool's state after each pass."""

    def __init__(self, dest: str):
        self.tags = {DEST: dest_tag(dest)}
        self.failed_seen = 0
        self.retried_seen = 0

    def committed(self, event: Committed, images: int) -> None:
        """A shard of ``images`` images is committed: its figures (``event``: its record, causes, write time)."""
        with _never_fails("a commit"):
            record, tags = event.record, self.tags
            _inc("segbatch_images", images, tags)
            _inc("segbatch_detections", record.detections, tags)
            _inc("segbatch_shards_committed", 1, tags)
            for cause, n in (event.causes or {}).items():
                _inc("segbatch_errors", n, {**tags, "cause": cause})
            seconds = {**(record.stage_seconds or {}), **({"write": event.write_s} if event.write_s else {})}
            for stage, s in seconds.items():
                _inc("segbatch_stage_seconds", s, {**tags, "stage": stage})
            _observe("segbatch_shard_seconds", record.seconds, tags)

    def passed(self, progress: Progress, waiting: int, retried: int) -> None:
        """After a pass of the pool: shards waiting, workers ready, images done, and the
        shards given up (``progress.shards_failed``) or rerun (``retried``) since the last pass."""
        with _never_fails("the pool's state"):
            tags = self.tags
            _set("segbatch_queue_shards", waiting, tags)
            _set("segbatch_workers", progress.workers, tags)
            _set("segbatch_images_done", progress.done, tags)
            _set("segbatch_images_planned", progress.total, tags)
            _inc("segbatch_shards_failed", progress.shards_failed - self.failed_seen, tags)
            _inc("segbatch_shards_retried", retried - self.retried_seen, tags)
            self.failed_seen, self.retried_seen = progress.shards_failed, retried


class WorkerRate:
    """An actor's images per second since its first shard started (``worker.py``):
    its shards run on threads of the actor, hence the lock."""

    def __init__(self, dest: str):
        self.tags = {DEST: dest_tag(dest), "worker": f"{socket.gethostname()}:{os.getpid()}"}
        self.lock = threading.Lock()
        self.first: float | None = None
        self.images = 0

    def started(self) -> None:
        """A shard starts (the first one starts the clock)."""
        with self.lock:
            if self.first is None:
                self.first = time.monotonic()

    def add(self, images: int) -> None:
        """``images`` more images done."""
        with self.lock:
            self.images += images
            elapsed = time.monotonic() - (self.first or time.monotonic())
            rate = self.images / elapsed if elapsed > 0 else 0.0
        with _never_fails("a worker's rate"):
            _set("segbatch_worker_images_per_s", rate, self.tags)
