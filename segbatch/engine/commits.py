"""Publishing results under DEST: each shard's file and its commit record, each
merged scene's outputs and its record.

A shard is done when its commit record exists (the data file is written
first, so a record always names a whole file); a scene is merged when its
record exists. What a record holds: ``records.CommitRecord``.

An archive of 100 million images has 400,000 shards: one small JSON object
each would make a rerun (or ``segbatch status``) read 400,000 objects to learn
what is done. So the driver folds the records of each full block of
``BLOCK_SHARDS`` consecutive shards, once all are committed, into one Parquet
file (``commits/block-00000000-00001023.parquet``: its first and last shard),
published whole before their JSON records are deleted: the name alone says
which shards are committed (a listing answers ``committed``), and a crash
between the two leaves both, the same records twice, counted once.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

log = logging.getLogger(__name__)

_RECORD_NAME = re.compile(r"^part-(\d+)\.json$")
_BLOCK_NAME = re.compile(r"^block-(\d+)-(\d+)\.parquet$")
BLOCK_SHARDS = 1024  # shards whose records one block file holds: 400 files at 100M images in shards of 256
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
        self.block = BLOCK_SHARDS  # shards a block file folds (the names say which: readers need not know it)
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
        """Ids of the shards with a commit record, in a block or alone (one listing, no reads)."""
        blocks, alone = self._listed()
        return {sid for first, last in blocks for sid in range(first, last + 1)} | alone

    def commit_records(self) -> list[CommitRecord]:
        """Every commit record, by shard id: the blocks' and those alone (each shard once)."""
        blocks, alone = self._listed()
        with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(blocks)))) as pool:
            in_blocks = [r for records in pool.map(self._read_block, sorted(blocks)) for r in records]
        compacted = {sid for first, last in blocks for sid in range(first, last + 1)}
        rest = self._read_records([f"commits/{self.plan.part(i)}.json" for i in sorted(alone - compacted)])
        return sorted(in_blocks + rest, key=lambda r: r.shard)

    def block_shards(self, block: int) -> range:
        """The shard ids of block ``block``."""
        return range(block * self.block, (block + 1) * self.block)

    def compacted_blocks(self) -> set[int]:
        """The blocks (of ``self.block`` shards) with a block file."""
        return {first // self.block for first, last in self._listed()[0] if last - first + 1 == self.block}

    def compact(self, block: int, records: dict[int, CommitRecord]) -> None:
        """Fold the records of block ``block`` (every one of its shards committed) into its block file,
        then delete their JSON records. ``records``: those the caller holds; the rest are read."""
        ids = self.block_shards(block)
        missing = [sid for sid in ids if sid not in records]
        read = self._read_records([f"commits/{self.plan.part(i)}.json" for i in missing])
        records = {**records, **{r.shard: r for r in read}}
        if any(sid not in records for sid in ids):
            raise FileNotFoundError(f"block {block} is not wholly committed: shards without a record")
        table = pa.table(
            {
                "shard": pa.array(list(ids), pa.int64()),
                "record": pa.array([json.dumps(records[sid].to_json()) for sid in ids], pa.string()),
            }
        )
        name = f"block-{ids[0]:08d}-{ids[-1]:08d}"
        self._publish(table, self.meta.url("commits", f"{name}.parquet"), self.meta.url("tmp", f"{name}.parquet"))
        # each record is in the block now: one that a failed delete leaves is counted once
        self.storage.delete_files([self.commit_url(sid) for sid in ids])

    def _listed(self) -> tuple[set[tuple[int, int]], set[int]]:
        """(block files' (first, last) shards, shards with a JSON record) in ``commits/``."""
        names = self.storage.listdir_names(self.meta.url("commits"))
        blocks = {(int(m.group(1)), int(m.group(2))) for m in map(_BLOCK_NAME.match, names) if m}
        return blocks, {int(m.group(1)) for m in map(_RECORD_NAME.match, names) if m}

    def _read_block(self, block: tuple[int, int]) -> list[CommitRecord]:
        name = f"block-{block[0]:08d}-{block[1]:08d}.parquet"
        table = self.storage.read_parquet(self.meta.url("commits", name), columns=["record"])
        return [CommitRecord.from_json(json.loads(text)) for text in table.column("record").to_pylist()]

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


class Compactor:
    """The driver's side of block files: folds each block of the plan into its file
    once all its shards are committed, from the records the workers report.

    Blocks wholly inside the plan only: the plan grows while it is listed
    (``grow``), and a nightly run that extends it adds shards after its last
    id, never inside a full block. Records of blocks not yet folded are held
    here: with shards handed out in order, a block or two of them.
    """

    def __init__(self, commits: CommitLog, num_shards: int, committed: set[int]):
        self.commits = commits
        self.num_shards = num_shards
        self.done = commits.compacted_blocks()
        self.committed_ids = set(committed)
        self.left: dict[int, set[int]] = {}  # a block wholly planned and not folded: its shards not committed
        self.records: dict[int, dict[int, CommitRecord]] = {}

    def grow(self, num_shards: int) -> None:
        """The plan has ``num_shards`` shards now."""
        self.num_shards = max(self.num_shards, num_shards)

    def catch_up(self) -> None:
        """Fold the blocks a previous run committed whole but did not fold (it was killed first)."""
        for block in range(self.num_shards // self.commits.block):
            if self._waiting(block) == set():
                self._compact(block)

    def committed(self, record: CommitRecord) -> None:
        """A shard's commit record, as its worker reported it."""
        block = record.shard // self.commits.block
        self.committed_ids.add(record.shard)
        if block in self.done:
            return
        self.records.setdefault(block, {})[record.shard] = record
        left = self._waiting(block)
        if left is not None:
            left.discard(record.shard)
            if not left:
                self._compact(block)

    def _waiting(self, block: int) -> set[int] | None:
        """The block's shards not committed yet; None while the plan does not hold it whole."""
        if block not in self.left:
            shards = self.commits.block_shards(block)
            if block in self.done or shards.stop > self.num_shards:
                return None
            self.left[block] = set(shards) - self.committed_ids
        return self.left[block]

    def _compact(self, block: int) -> None:
        self.done.add(block)
        self.left.pop(block, None)
        try:
            self.commits.compact(block, self.records.pop(block, {}))
        except Exception as exc:  # the JSON records are as valid as the block: only a rerun's speed is at stake
            log.warning("the commit records of block %d stay one file per shard: %s", block, exc)
