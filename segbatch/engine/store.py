"""The job's state under DEST: the plan file, commit records, config, progress and summary.

Layout::

    DEST/data/part-00000.parquet          results, one file per committed shard
    DEST/_segbatch/plan.parquet           uri, shard: every input (or tile) and its shard
    DEST/_segbatch/plan.json              shard_size, num_shards, ... (written last: the plan is whole)
    DEST/_segbatch/config.json            what the job was run with
    DEST/_segbatch/tmp/part-00000.<attempt>.parquet   a shard being written (local disks only)
    DEST/_segbatch/commits/part-00000.json            a shard's commit record
    DEST/_segbatch/progress.json, summary.json
    DEST/_segbatch/lease.json             the driver that holds DEST (``lease.py``)

A shard is done when its commit record exists; resuming runs the plan's
shards that have none.

Reading is strictly read-only: ``segbatch status`` and every other reader
may run beside a driver. Only the driver, holding the lease, changes DEST,
and only it finishes a ``clear`` that was cut short (``finish_clear``).

Tiled rasters (``tiles.py``) add a second kind of work, each scene's merge::

    DEST/_segbatch/tiles/part-00000.parquet       a shard of tiles (instead of data/)
    DEST/_segbatch/scenes.json                    each scene's header: size, bands, georeferencing, scaling
    DEST/data/scene-<id>.parquet                  a scene's row, once its tiles are merged
    DEST/objects/scene-<id>.parquet               its objects, one row each (GeoParquet)
    DEST/_segbatch/scenes/scene-<id>.json         the scene's commit record

``<id>`` is a hash of the scene's URI, stable when later runs add scenes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from segbatch.redact import scrub
from segbatch.schema import DATA, META, OBJECTS, TILES
from .plan import Shard, make_shards_from, sorted_unique
from segbatch.storage import OBJECT_STORES, Storage, join, protocol

log = logging.getLogger(__name__)

CLEARING = "clearing.json"  # present while clear() runs: a crash half way is finished by the next driver
LEASE_FILES = "lease"  # lease.json and its takeover markers (lease.py): clear() keeps the driver's lease
_RECORD_NAME = re.compile(r"^part-(\d+)\.json$")
_SCENE_RECORD = re.compile(r"^scene-([0-9a-f]{16})\.json$")
_READ_THREADS = 16  # commit records are small objects: latency-bound, so read many at once



class JobStore:
    """Everything a job keeps under DEST/_segbatch and DEST/data."""

    def __init__(self, dest: str, storage: Storage, tiled: bool = False):
        self.dest = dest.rstrip("/") or dest
        self.storage = storage
        self.meta = join(self.dest, META)
        self.data = join(self.dest, DATA)
        self.objects = join(self.dest, OBJECTS)
        # a tiled job's shards are its tiles: their files are the job's own, not results
        self.shard_files = join(self.dest, TILES) if tiled else self.data
        self._num_shards: int | None = None
        self._fixed_width: int | None = None

    def __repr__(self) -> str:
        return f"JobStore({self.dest!r})"

    # -- names ---------------------------------------------------------------

    def _width(self) -> int:
        """Digits in a part number: 5, more when the plan has more shards.

        Read from the plan once, so every process names files alike."""
        if self._num_shards is None:
            info = self._read_json("plan.json")
            if info is None:
                return 5
            self._adopt(info)
        # fixed when the plan is made, so names stay put when a later run extends it
        return self._fixed_width or max(5, len(str(self._num_shards)))

    def _adopt(self, info: dict[str, Any]) -> None:
        """Name files as plan.json says: every reader of it (driver, actors) alike."""
        self._num_shards = int(info["num_shards"])
        self._fixed_width = info.get("width")

    def _part(self, shard_id: int) -> str:
        return f"part-{shard_id:0{self._width()}d}"

    def data_url(self, shard_id: int) -> str:
        return join(self.shard_files, f"{self._part(shard_id)}.parquet")

    def tmp_url(self, shard_id: int, attempt: str) -> str:
        # under _segbatch, never under data/: a reader of data/ must not see a part
        return join(self.meta, "tmp", f"{self._part(shard_id)}.{attempt}.parquet")

    def counts_url(self) -> str:
        """``--count-by``'s table: beside data/, so data/ stays one dataset of one schema."""
        return join(self.dest, "counts.parquet")

    def commit_url(self, shard_id: int) -> str:
        return join(self.meta, "commits", f"{self._part(shard_id)}.json")

    # -- plan ----------------------------------------------------------------

    def write_plan(self, uris: list[str], shard_size: int) -> None:
        """Record the shards: plan.parquet (uri, shard), then plan.json, which marks it whole."""
        ordered = sorted_unique(uris)
        num_shards = -(-len(ordered) // shard_size)
        table = pa.table(
            {
                "uri": pa.array(ordered, pa.string()),
                # uris are sorted and cut in consecutive chunks: row i is in shard i // shard_size
                "shard": pa.array(np.arange(len(ordered), dtype=np.int64) // shard_size, pa.int32()),
            }
        )
        self.storage.write_parquet(table, join(self.meta, "plan.parquet"))
        width = max(5, len(str(num_shards)))
        info = {
            "shard_size": shard_size,
            "num_shards": num_shards,
            "num_uris": len(ordered),
            "width": width,
            "created": time.time(),
        }
        self._write_json("plan.json", info)
        self._num_shards, self._fixed_width = num_shards, width
        log.info("plan: %d images in %d shards of %d", len(ordered), num_shards, shard_size)

    def extend_plan(self, new_uris: list[str], shard_size: int) -> list[Shard]:
        """Add shards for URIs the plan does not have yet (a nightly run over a
        prefix that grew); existing shards and their files stay as they are.

        Returns the new shards, numbered after the existing ones.
        """
        info = self._read_json("plan.json")
        if info is None:
            raise ValueError(f"{self.meta} has no plan to extend")
        old = self._plan_table(info)
        ordered = sorted_unique(new_uris)
        first = int(info["num_shards"])
        ids = first + np.arange(len(ordered), dtype=np.int64) // shard_size
        added = pa.table({"uri": pa.array(ordered, pa.string()), "shard": pa.array(ids, pa.int32())})
        table = pa.concat_tables([old.select(["uri", "shard"]).cast(added.schema), added])
        self.storage.write_parquet(table, join(self.meta, "plan.parquet"))
        num_shards = first + -(-len(ordered) // shard_size)
        width = info.get("width") or max(5, len(str(first)))
        self._write_json("plan.json", {**info, "num_shards": num_shards, "num_uris": table.num_rows, "width": width})
        self._num_shards, self._fixed_width = num_shards, width
        log.info("plan extended: %d new images in %d new shards", len(ordered), num_shards - first)
        return make_shards_from(ordered, shard_size, first)

    def read_plan(self) -> tuple[list[Shard], int] | None:
        """The shards and shard size of the recorded plan; None when there is
        none, or while a clear is under way (what remains of it is being deleted)."""
        if self.clearing():
            return None
        info = self._read_json("plan.json")
        if info is None:
            return None
        table = self._plan_table(info)
        uris = table.column("uri").to_pylist()
        shard = table.column("shard").to_numpy()
        if len(shard) and np.any(np.diff(shard) < 0):
            order = np.argsort(shard, kind="stable")
            uris, shard = [uris[i] for i in order], shard[order]
        # shard boundaries: where the shard id changes
        starts = np.flatnonzero(np.diff(shard, prepend=-1)) if len(shard) else np.array([], dtype=np.int64)
        ends = np.append(starts[1:], len(shard))
        shards = [Shard(int(shard[s]), tuple(uris[s:e])) for s, e in zip(starts.tolist(), ends.tolist())]
        self._adopt(info)
        return shards, int(info["shard_size"])

    def _plan_table(self, info: dict[str, Any]) -> pa.Table:
        """plan.parquet's rows that plan.json counts.

        ``extend_plan`` appends rows, then rewrites plan.json: rows past the
        count are an extension cut short before plan.json named it, and the
        rerun plans them again. Fewer rows than counted is a damaged plan.
        """
        table = self.storage.read_parquet(join(self.meta, "plan.parquet"))
        count = int(info["num_uris"])
        if table.num_rows < count:
            raise ValueError(f"{self.meta}/plan.parquet has {table.num_rows} rows, plan.json says {count}")
        if table.num_rows > count:
            log.warning("%s: ignoring %d plan rows of an unfinished extension", self.meta, table.num_rows - count)
        return table.slice(0, count)

    # -- commits -------------------------------------------------------------

    def commit(self, shard_id: int, table: pa.Table, record: dict[str, Any]) -> None:
        """Publish a shard: its data file first, then its commit record.

        In this order a record always names a whole file; a crash between
        the two leaves a file that the rerun rewrites whole.
        """
        final = self.data_url(shard_id)
        self._publish(table, final, self.tmp_url(shard_id, uuid.uuid4().hex[:12]))
        rows = record.get("rows", table.num_rows)
        body = {**record, "shard": shard_id, "rows": rows, "file": final, "committed": time.time()}
        self.storage.write_bytes(self.commit_url(shard_id), json.dumps(body).encode())

    def _publish(self, table: pa.Table, final: str, tmp: str) -> None:
        """Write ``table`` as the Parquet file ``final``, whole or not at all.

        On an object store one PUT of the final key (an object appears whole
        when its upload completes): half the writes of a temporary object, a
        copy and a delete, and no copy to wait for (adlfs's does not). On a
        disk the file is written in tmp/, synced and renamed into place (the
        rename is atomic; ``Storage.commit_file`` syncs).
        """
        if protocol(final) in OBJECT_STORES:
            self.storage.write_parquet(table, final)
            return
        self.storage.write_parquet(table, tmp)
        self.storage.commit_file(tmp, final)

    def committed(self) -> set[int]:
        """Ids of the shards with a commit record (one listing, not one call per shard)."""
        names = self.storage.listdir_names(join(self.meta, "commits"))
        return {int(m.group(1)) for m in map(_RECORD_NAME.match, names) if m}

    def commit_records(self) -> list[dict[str, Any]]:
        """Every commit record, by shard id."""
        ids = sorted(self.committed())
        with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(ids)))) as pool:
            records = list(pool.map(lambda i: self._read_json(f"commits/{self._part(i)}.json"), ids))
        return [r for r in records if r is not None]

    # -- scenes of a tiled job -------------------------------------------------

    @staticmethod
    def scene_id(uri: str) -> str:
        return hashlib.sha1(uri.encode()).hexdigest()[:16]

    def scene_data_url(self, uri: str) -> str:
        return join(self.data, f"scene-{self.scene_id(uri)}.parquet")

    def scene_objects_url(self, uri: str) -> str:
        return join(self.objects, f"scene-{self.scene_id(uri)}.parquet")

    def scene_tmp_url(self, uri: str, kind: str, attempt: str) -> str:
        return join(self.meta, "tmp", f"scene-{self.scene_id(uri)}.{kind}.{attempt}.parquet")

    def commit_scene(self, uri: str, data: pa.Table, objects: pa.Table, record: dict[str, Any]) -> None:
        """Publish a merged scene: its objects, then its row, then its record (as ``commit``)."""
        attempt = uuid.uuid4().hex[:12]
        self._publish(objects, self.scene_objects_url(uri), self.scene_tmp_url(uri, "objects", attempt))
        self._publish(data, self.scene_data_url(uri), self.scene_tmp_url(uri, "data", attempt))
        body = {**record, "scene": uri, "file": self.scene_data_url(uri), "committed": time.time()}
        record_url = join(self.meta, "scenes", f"scene-{self.scene_id(uri)}.json")
        self.storage.write_bytes(record_url, json.dumps(body).encode())

    def merged_scenes(self) -> set[str]:
        """Ids (``scene_id``) of the scenes with a commit record."""
        names = self.storage.listdir_names(join(self.meta, "scenes"))
        return {m.group(1) for m in map(_SCENE_RECORD.match, names) if m}

    def scene_records(self) -> list[dict[str, Any]]:
        ids = sorted(self.merged_scenes())
        with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(ids)))) as pool:
            records = list(pool.map(lambda i: self._read_json(f"scenes/scene-{i}.json"), ids))
        return [r for r in records if r is not None]

    def write_scenes(self, scenes: dict[str, dict[str, Any]]) -> None:
        self._write_json("scenes.json", scenes)

    def read_scenes(self) -> dict[str, dict[str, Any]]:
        return self._read_json("scenes.json") or {}

    # -- small records -------------------------------------------------------

    def write_config(self, cfg: dict[str, Any]) -> None:
        self._write_json("config.json", cfg)

    def read_config(self) -> dict[str, Any] | None:
        """What the job was run with; None when there is none, or while a clear is under way."""
        if self.clearing():
            return None
        return self._read_json("config.json")

    def write_summary(self, d: dict[str, Any]) -> None:
        self._write_json("summary.json", d)

    def read_summary(self) -> dict[str, Any] | None:
        return self._read_json("summary.json")

    def write_progress(self, d: dict[str, Any]) -> None:
        self._write_json("progress.json", d)

    def read_progress(self) -> dict[str, Any] | None:
        return self._read_json("progress.json")

    def clear(self) -> None:
        """Remove data/, objects/ and _segbatch/ (but the lease): the next run starts over.

        Only for the driver holding DEST's lease. A marker is written first
        and removed last. Deleting is many calls on an object store; were it
        cut short, records naming deleted files (shards skipped) or data
        files without a plan (rows twice) could remain: readers take the
        marker as "no job" and the next driver finishes the job (``finish_clear``).
        """
        self._write_json(CLEARING, {"started": time.time()})
        self.storage.delete(self.data)
        self.storage.delete(self.objects)
        for name in self.storage.listdir_names(self.meta):
            if name != CLEARING and not name.startswith(LEASE_FILES):
                self.storage.delete(join(self.meta, name))
        self.storage.delete(join(self.meta, CLEARING))
        self._num_shards = self._fixed_width = None

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

    def _write_json(self, name: str, d: dict[str, Any]) -> None:
        d = scrub(d, self.storage.redact)  # config, summary, progress may quote a URL with a credential
        self.storage.write_bytes(join(self.meta, name), json.dumps(d, indent=1, sort_keys=True).encode())

    def _read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_bytes(join(self.meta, name)))
        except FileNotFoundError:
            return None
