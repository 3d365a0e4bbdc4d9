"""The job's state under DEST: the plan file, commit records, config, progress and summary.

Layout::

    DEST/data/part-00000.parquet          results, one file per committed shard
    DEST/objects/part-00000-epsg32631.parquet   its georeferenced whole images' objects, a file per CRS
    DEST/_segbatch/plan/shards-00000.parquet   uri, shard: inputs (or tiles) and their shards, a part of the plan
    DEST/_segbatch/plan.json              shard_size, width, num_shards, ..., complete (``plan.py``)
    DEST/_segbatch/config.json            what the job was run with
    DEST/_segbatch/tmp/part-00000.<attempt>.parquet   a shard being written (local disks only)
    DEST/_segbatch/commits/part-00000.json            a shard's commit record
    DEST/_segbatch/commits/block-00000000-00001023.parquet   the records of shards 0-1023, once all are committed
    DEST/_segbatch/progress.json, summary.json
    DEST/_segbatch/lease.json             the driver that holds DEST (``lease.py``)

A shard is done when its commit record exists; resuming runs the plan's
shards that have none. ``JobStore`` is the one object callers use; it keeps
the small files itself and hands the rest to the plan file (``plan.PlanFile``)
and the commit log (``commits.CommitLog``).

Reading is strictly read-only: ``segbatch status`` and every other reader
may run beside a driver. Only the driver, holding the lease, changes DEST,
and only it finishes a ``clear`` that was cut short (``finish_clear``).

Tiled rasters (``geo/``) add a second kind of work, each scene's merge::

    DEST/_segbatch/tiles/part-00000.parquet       a shard of tiles (instead of data/)
    DEST/_segbatch/scenes.json                    each scene's header: size, bands, georeferencing, scaling
                                                  (and its STAC item's id, ``stac_id``, when SOURCE is STAC)
    DEST/data/scene-<id>.parquet                  a scene's row, once its tiles are merged
    DEST/objects/scene-<id>.parquet               its objects, one row each (GeoParquet)
    DEST/_segbatch/scenes/scene-<id>.json         the scene's commit record

``<id>`` is a hash of the scene's URI, stable when later runs add scenes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from segbatch.schema import DATA, META, OBJECTS, TILES
from segbatch.storage import Storage, join
from segbatch.storage.sources import Listing

from .commits import CommitLog, Compactor, scene_id
from .meta import MetaFolder
from .plan import PlanFile, Shard
from .planner import Planner
from .records import CommitRecord, JobSummary

log = logging.getLogger(__name__)

CLEARING = "clearing.json"  # present while clear() runs: a crash half way is finished by the next driver
LEASE_FILES = "lease"  # lease.json and its takeover markers (lease.py): clear() keeps the driver's lease


class JobStore:
    """Everything a job keeps under DEST/_segbatch and DEST/data."""

    def __init__(self, dest: str, storage: Storage, tiled: bool = False):
        self.dest = dest.rstrip("/") or dest
        self.storage = storage
        self.meta = join(self.dest, META)
        self.data = join(self.dest, DATA)
        self.objects = join(self.dest, OBJECTS)
        self._files = MetaFolder(storage, self.meta)
        self.plan = PlanFile(self._files)
        # a tiled job's shards are its tiles: their files are the job's own, not results
        shard_files = join(self.dest, TILES) if tiled else self.data
        self.commits = CommitLog(self._files, self.plan, shard_files, self.data, self.objects)

    def __repr__(self) -> str:
        return f"JobStore({self.dest!r})"

    # -- names ---------------------------------------------------------------

    def data_url(self, shard_id: int) -> str:
        return self.commits.data_url(shard_id)

    def tmp_url(self, shard_id: int, attempt: str) -> str:
        return self.commits.tmp_url(shard_id, attempt)

    def commit_url(self, shard_id: int) -> str:
        return self.commits.commit_url(shard_id)

    def counts_url(self) -> str:
        """``--count-by``'s table: beside data/, so data/ stays one dataset of one schema."""
        return join(self.dest, "counts.parquet")

    # -- plan (plan.PlanFile) ----------------------------------------------------

    def write_plan(self, uris: list[str], shard_size: int) -> list[Shard]:
        """Plan ``uris`` whole, here and now (the driver plans as it lists: ``planner.Planner``);
        with a plan already, only those it does not hold, as shards after its own. Returns the new shards."""
        return Planner(self.plan, Listing.of(self.dest, uris), shard_size, set()).plan_all()

    def plan_info(self) -> dict[str, Any] | None:
        """What the plan holds (``PlanFile.info``: num_uris, num_shards, ...) without reading it;
        None as for ``read_plan``."""
        if self.clearing():
            return None
        return self.plan.info()

    def read_plan(self) -> tuple[list[Shard], int] | None:
        """The shards and shard size of the recorded plan; None when there is
        none, or while a clear is under way (what remains of it is being deleted)."""
        if self.clearing():
            return None
        return self.plan.read()

    # -- commits (commits.CommitLog) ---------------------------------------------

    def commit(
        self, shard_id: int, table: pa.Table, record: CommitRecord, objects: dict[str, pa.Table] | None = None
    ) -> CommitRecord:
        return self.commits.commit(shard_id, table, record, objects)

    def committed(self) -> set[int]:
        return self.commits.committed()

    def commit_records(self) -> list[CommitRecord]:
        return self.commits.commit_records()

    def compactor(self, num_shards: int, committed: set[int]) -> Compactor:
        """What folds full blocks of commit records into one file each (the driver's)."""
        return Compactor(self.commits, num_shards, committed)

    scene_id = staticmethod(scene_id)

    def scene_data_url(self, uri: str) -> str:
        return self.commits.scene_data_url(uri)

    def scene_objects_url(self, uri: str) -> str:
        return self.commits.scene_objects_url(uri)

    def commit_scene(self, uri: str, data: pa.Table, objects: pa.Table, record: CommitRecord) -> CommitRecord:
        return self.commits.commit_scene(uri, data, objects, record)

    def merged_scenes(self) -> set[str]:
        return self.commits.merged_scenes()

    def scene_records(self) -> list[CommitRecord]:
        return self.commits.scene_records()

    # -- small records -------------------------------------------------------

    def write_scenes(self, scenes: dict[str, dict[str, Any]]) -> None:
        """Each scene's header (``geo.RasterInfo.to_json``, or why it could not be read), by URI."""
        self._files.write_json("scenes.json", scenes)

    def read_scenes(self) -> dict[str, dict[str, Any]]:
        return self._files.read_json("scenes.json") or {}

    def write_config(self, cfg: dict[str, Any]) -> None:
        self._files.write_json("config.json", cfg)

    def read_config(self) -> dict[str, Any] | None:
        """What the job was run with; None when there is none, or while a clear is under way."""
        if self.clearing():
            return None
        return self._files.read_json("config.json")

    def write_summary(self, summary: JobSummary) -> None:
        self._files.write_json("summary.json", summary.to_json())

    def read_summary(self) -> JobSummary | None:
        d = self._files.read_json("summary.json")
        return None if d is None else JobSummary.from_json(d)

    def write_progress(self, d: dict[str, Any]) -> None:
        self._files.write_json("progress.json", d)

    def read_progress(self) -> dict[str, Any] | None:
        return self._files.read_json("progress.json")

    # -- clearing ----------------------------------------------------------------

    def clear(self) -> None:
        """Remove data/, objects/ and _segbatch/ (but the lease): the next run starts over.

        Only for the driver holding DEST's lease. A marker is written first
        and removed last. Deleting is many calls on an object store; were it
        cut short, records naming deleted files (shards skipped) or data
        files without a plan (rows twice) could remain: readers take the
        marker as "no job" and the next driver finishes the job (``finish_clear``).
        """
        self._files.write_json(CLEARING, {"started": time.time()})
        self.storage.delete(self.data)
        self.storage.delete(self.objects)
        for name in self.storage.listdir_names(self.meta):
            if name != CLEARING and not name.startswith(LEASE_FILES):
                self.storage.delete(join(self.meta, name))
        self.storage.delete(join(self.meta, CLEARING))
        self.plan.forget()

    def clearing(self) -> bool:
        """True while a clear is under way, or was cut short and not finished yet."""
        return self.storage.exists(join(self.meta, CLEARING))

    def finish_clear(self) -> None:
        """Finish a clear that was cut short: for the driver, once it holds the lease."""
        if self.clearing():
            log.warning("%s: finishing a clear that was interrupted", self.dest)
            self.clear()

    def clear_tmp(self) -> None:
        """Remove the temporary files that failed or abandoned attempts left."""
        self.storage.delete(join(self.meta, "tmp"))
