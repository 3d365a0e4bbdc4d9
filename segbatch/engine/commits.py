"""Publishing results under DEST: each shard's file and its commit record, each
merged scene's outputs and its record.

A shard is done when its commit record exists (the data file is written
first, so a record always names a whole file); a scene is merged when its
record exists. What a record holds: ``records.CommitRecord``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pyarrow as pa

from segbatch.storage import OBJECT_STORES, join, protocol

from .meta import MetaFolder
from .plan import PlanFile
from .records import CommitRecord

_RECORD_NAME = re.compile(r"^part-(\d+)\.json$")
_SCENE_RECORD = re.compile(r"^scene-([0-9a-f]{16})\.json$")
_READ_THREADS = 16  # commit records are small objects: latency-bound, so read many at once


def scene_id(uri: str) -> str:
    """A scene's name in DEST: a hash of its URI, stable when later runs add scenes."""
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


class CommitLog:
    """The shards' files (under ``shard_files``) and commit records
    (``_segbatch/commits/``); the merged scenes' rows (under ``data``), objects
    (under ``objects``) and records (``_segbatch/scenes/``)."""

    def __init__(self, meta: MetaFolder, plan: PlanFile, shard_files: str, data: str, objects: str):
        self.meta = meta
        self.storage = meta.storage
        self.plan = plan  # names each shard's files
        self.shard_files = shard_files
        self.data = data
        self.objects = objects

    # -- shards --------------------------------------------------------------

    def data_url(self, shard_id: int) -> str:
        return join(self.shard_files, f"{self.plan.part(shard_id)}.parquet")

    def tmp_url(self, shard_id: int, attempt: str) -> str:
        # under _segbatch, never under data/: a reader of data/ must not see a part
        return self.meta.url("tmp", f"{self.plan.part(shard_id)}.{attempt}.parquet")

    def commit_url(self, shard_id: int) -> str:
        return self.meta.url("commits", f"{self.plan.part(shard_id)}.json")

    def commit(
        self, shard_id: int, table: pa.Table, record: CommitRecord, objects: dict[str, pa.Table] | None = None
    ) -> CommitRecord:
        """Publish a shard: its objects files (``objects``: the shard's georeferenced whole images'
        objects, by the tag of their CRS, ``geo.polygons.crs_tag``), its data file, then its
        commit record; returns the record as written.

        In this order a record always names whole files; a crash between
        them leaves files that the rerun rewrites whole (under the same names:
        each objects file is named by its shard and CRS).
        """
        final = self.data_url(shard_id)
        attempt = uuid.uuid4().hex[:12]
        for tag, objects_table in sorted((objects or {}).items()):
            name = f"{self.plan.part(shard_id)}-{tag}"
            tmp = self.meta.url("tmp", f"{name}.{attempt}.parquet")
            self._publish(objects_table, join(self.objects, f"{name}.parquet"), tmp)
        self._publish(table, final, self.tmp_url(shard_id, attempt))
        rows = table.num_rows if record.rows is None else record.rows
        written = replace(record, shard=shard_id, rows=rows, file=final, committed=time.time())
        self.storage.write_bytes(self.commit_url(shard_id), json.dumps(written.to_json()).encode())
        return written

    def committed(self) -> set[int]:
        """Ids of the shards with a commit record (one listing, not one call per shard)."""
        names = self.storage.listdir_names(self.meta.url("commits"))
        return {int(m.group(1)) for m in map(_RECORD_NAME.match, names) if m}

    def commit_records(self) -> list[CommitRecord]:
        """Every commit record, by shard id."""
        return self._read_records([f"commits/{self.plan.part(i)}.json" for i in sorted(self.committed())])

    # -- scenes of a tiled job -------------------------------------------------

    def scene_data_url(self, uri: str) -> str:
        return join(self.data, f"scene-{scene_id(uri)}.parquet")

    def scene_objects_url(self, uri: str) -> str:
        return join(self.objects, f"scene-{scene_id(uri)}.parquet")

    def scene_tmp_url(self, uri: str, kind: str, attempt: str) -> str:
        return self.meta.url("tmp", f"scene-{scene_id(uri)}.{kind}.{attempt}.parquet")

    def commit_scene(self, uri: str, data: pa.Table, objects: pa.Table, record: CommitRecord) -> CommitRecord:
        """Publish a merged scene: its objects, then its row, then its record (as ``commit``)."""
        attempt = uuid.uuid4().hex[:12]
        self._publish(objects, self.scene_objects_url(uri), self.scene_tmp_url(uri, "objects", attempt))
        self._publish(data, self.scene_data_url(uri), self.scene_tmp_url(uri, "data", attempt))
        written = replace(record, scene=uri, file=self.scene_data_url(uri), committed=time.time())
        record_url = self.meta.url("scenes", f"scene-{scene_id(uri)}.json")
        self.storage.write_bytes(record_url, json.dumps(written.to_json()).encode())
        return written

    def merged_scenes(self) -> set[str]:
        """Ids (``scene_id``) of the scenes with a commit record."""
        names = self.storage.listdir_names(self.meta.url("scenes"))
        return {m.group(1) for m in map(_SCENE_RECORD.match, names) if m}

    def scene_records(self) -> list[CommitRecord]:
        """Every merged scene's record, by scene id."""
        return self._read_records([f"scenes/scene-{i}.json" for i in sorted(self.merged_scenes())])

    # -- both ------------------------------------------------------------------

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

    def _read_records(self, names: list[str]) -> list[CommitRecord]:
        """The records of ``names`` under ``_segbatch`` that still exist, read many at once."""
        with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(names)))) as pool:
            found = list(pool.map(self.meta.read_json, names))
        return [CommitRecord.from_json(d) for d in found if d is not None]
