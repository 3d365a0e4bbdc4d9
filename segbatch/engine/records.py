"""The typed records that cross the engine's module boundaries.

- ``Progress``: what the driver counts while it runs, shown by the progress bar,
  written to ``progress.json`` and read by ``segbatch status``.
- ``JobSummary``: what a run did, ``DEST/_segbatch/summary.json``, returned in
  ``JobResult`` and read by the command line.
- ``CommitRecord``: a committed shard's record (``DEST/_segbatch/commits/``) or a
  merged scene's (``DEST/_segbatch/scenes/``).
- The events an actor (``SegmentWorker.process``) and a merge task stream to
  the driver: ``Progressed``, ``Committed``, ``Probed``, ``MergeStarted``.

The JSON each record writes is exactly what the dicts it replaced wrote: same
keys, same values, same order. Reading is lenient: a key a file lacks (written
by an older segbatch, or by hand) takes the field's default, as the readers of
the dicts assumed with ``.get(key, 0)``; a key the record does not know is ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Progress:
    """What the progress bar, the progress lines and `segbatch status` show."""

    total: int
    done: int = 0
    errors: int = 0
    shards_total: int = 0
    shards_done: int = 0
    shards_failed: int = 0
    workers: int = 0
    started: float = field(default_factory=time.time)
    done_at_start: int = 0
    message: str = ""
    tiles_skipped: int = 0  # a tiled job's tiles left out of the plan (all nodata, or outside --aoi): not in total

    @property
    def rate(self) -> float:
        """Images per second in this run."""
        elapsed = time.time() - self.started
        return (self.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rate
        return (self.total - self.done) / rate if rate > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "done": self.done,
            "errors": self.errors,
            "shards_total": self.shards_total,
            "shards_done": self.shards_done,
            "shards_failed": self.shards_failed,
            "workers": self.workers,
            "images_per_s": round(self.rate, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "started": self.started,
            "updated": time.time(),
            "message": self.message,
            **({"tiles_skipped": self.tiles_skipped} if self.tiles_skipped else {}),
        }


def _known(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``d`` that ``cls`` has fields for."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _present(record: Any) -> dict[str, Any]:
    """The record's fields in their order, those that are None left out."""
    return {f.name: v for f in fields(record) if (v := getattr(record, f.name)) is not None}


@dataclass(frozen=True)
class JobSummary:
    """What a run did: ``DEST/_segbatch/summary.json``.

    A tiled job's rows are its scenes (``images`` counts them too); its tiles,
    scenes and the scenes left unmerged are only in a tiled job's summary
    (None, and absent from its JSON, otherwise).
    """

    complete: bool = False
    images: int = 0
    rows: int = 0
    errors: int = 0
    detections: int = 0
    shards: int = 0
    shards_committed: int = 0
    failed_shards: dict[str, str] = field(default_factory=dict)  # shard id (a string, as in JSON) -> last error
    tiles: int | None = None
    scenes: int | None = None
    failed_scenes: dict[str, str] | None = None  # scene URI -> why it was not merged
    # a tiled job's tiles the plan skipped: all nodata, or outside --aoi (``engine/coverage.py``)
    tiles_skipped_nodata: int | None = None
    tiles_skipped_aoi: int | None = None
    wall_s: float = 0.0
    finished: float = 0.0
    images_per_s_this_run: float = 0.0
    images_this_run: int = 0
    segbatch_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return _present(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> JobSummary:
        return cls(**_known(cls, d))


@dataclass
class JobResult:
    """What ``run_job`` returns: the run's progress, what failed, and its summary."""

    progress: Progress
    failed: dict[int, str]  # shard id -> last error
    summary: JobSummary
    failed_scenes: dict[str, str] = field(default_factory=dict)  # tiled scene URI -> why it was not merged

    @property
    def complete(self) -> bool:
        return not self.failed and not self.failed_scenes


@dataclass(frozen=True)
class CommitRecord:
    """A committed shard's record (``shard`` set) or a merged scene's (``scene``,
    ``tiles`` and ``pieces_merged`` set): what the actor or the merge task
    reports, and the store completes with ``file`` and ``committed`` when it
    publishes. ``rows`` None: the store counts the table's rows. Fields that are
    None are absent from the JSON.
    """

    rows: int | None = None
    tiles: int | None = None  # a scene's: its tiles
    errors: int = 0
    detections: int = 0
    pieces_merged: int | None = None  # a scene's: its objects stitched from more than one tile
    seconds: float = 0.0
    tiles_skipped: int | None = None  # a scene's: tiles the plan skipped (all nodata, or outside --aoi)
    stage_seconds: dict[str, float] | None = None  # a shard's: seconds in each stage of the pipeline
    node: str | None = None  # a shard's: the Ray node and process that ran it
    pid: int | None = None
    shard: int | None = None
    scene: str | None = None
    file: str | None = None  # the data file it publishes
    committed: float | None = None  # when (time.time())

    def to_json(self) -> dict[str, Any]:
        return _present(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CommitRecord:
        return cls(**{"rows": 0, **_known(cls, d)})  # read, a record without rows has none


# -- what an actor or a merge task streams to the driver ----------------------------


@dataclass(frozen=True)
class Progressed:
    """A shard's images segmented so far (and how many of them are error rows)."""

    shard: int
    images: int
    errors: int


@dataclass(frozen=True)
class Committed:
    """A shard (or a scene) is published: its commit record, and for a shard's
    metrics (``metrics.py``) its error rows by cause and its write's seconds."""

    record: CommitRecord
    causes: dict[str, int] | None = None
    write_s: float | None = None


@dataclass(frozen=True)
class Probed:
    """A probe (``policy.Probe``) ran to its end: its images did not kill the actor."""

    shard: int
    images: int


@dataclass(frozen=True)
class MergeStarted:
    """A merge task got a CPU and runs (the driver tells waiting from hanging)."""

    pid: int
