"""The plan: the sorted input cut into consecutive, deterministic units of work
(shards), and its files under DEST (``PlanFile``).

Where each shard's commit record lives is ``commits.py``; the whole of DEST, ``store.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .meta import MetaFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """A unit of work: consecutive URIs of the sorted input, committed as one file."""

    id: int
    uris: tuple[str, ...]


def make_shards(uris: list[str], shard_size: int) -> list[Shard]:
    """Cut the sorted, de-duplicated URIs into consecutive shards of ``shard_size``.

    Deterministic: the same URIs give the same shards in any order, so a
    rerun's plan matches the first run's.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, not {shard_size}")
    ordered = sorted_unique(uris)
    starts = range(0, len(ordered), shard_size)
    return [Shard(i, tuple(ordered[start : start + shard_size])) for i, start in enumerate(starts)]


def make_shards_from(uris: list[str], shard_size: int, first_id: int) -> list[Shard]:
    """Consecutive chunks of already sorted ``uris``, numbered from ``first_id``."""
    return [Shard(first_id + i, tuple(uris[j : j + shard_size])) for i, j in enumerate(range(0, len(uris), shard_size))]


def sorted_unique(uris: list[str]) -> list[str]:
    # list_sources already returns them so: checking is a tenth of sorting a million again
    if all(a < b for a, b in zip(uris, uris[1:])):
        return list(uris)
    return sorted(set(uris))


class PlanFile:
    """The recorded plan: ``plan.parquet`` (uri, shard: every input, or tile, and
    its shard) and ``plan.json`` (shard_size, num_shards, ..., written last: the
    plan is whole). It also names each shard's files (``part``), alike in every
    process that reads it (driver, actors)."""

    def __init__(self, meta: MetaFolder):
        self.meta = meta
        self._num_shards: int | None = None
        self._fixed_width: int | None = None

    def part(self, shard_id: int) -> str:
        """The name of a shard's files: ``part-00002``."""
        return f"part-{shard_id:0{self._width()}d}"

    def _width(self) -> int:
        """Digits in a part number: 5, more when the plan has more shards.

        Read from the plan once, so every process names files alike."""
        if self._num_shards is None:
            info = self.meta.read_json("plan.json")
            if info is None:
                return 5
            self._adopt(info)
        # fixed when the plan is made, so names stay put when a later run extends it
        return self._fixed_width or max(5, len(str(self._num_shards)))

    def _adopt(self, info: dict[str, Any]) -> None:
        """Name files as plan.json says: every reader of it (driver, actors) alike."""
        self._num_shards = int(info["num_shards"])
        self._fixed_width = info.get("width")

    def forget(self) -> None:
        """The plan was deleted: names are read again from the next one."""
        self._num_shards = self._fixed_width = None

    def write(self, uris: list[str], shard_size: int) -> None:
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
        self.meta.storage.write_parquet(table, self.meta.url("plan.parquet"))
        width = max(5, len(str(num_shards)))
        info = {
            "shard_size": shard_size,
            "num_shards": num_shards,
            "num_uris": len(ordered),
            "width": width,
            "created": time.time(),
        }
        self.meta.write_json("plan.json", info)
        self._num_shards, self._fixed_width = num_shards, width
        log.info("plan: %d images in %d shards of %d", len(ordered), num_shards, shard_size)

    def extend(self, new_uris: list[str], shard_size: int) -> list[Shard]:
        """Add shards for URIs the plan does not have yet (a nightly run over a
        prefix that grew); existing shards and their files stay as they are.

        Returns the new shards, numbered after the existing ones.
        """
        info = self.meta.read_json("plan.json")
        if info is None:
            raise ValueError(f"{self.meta.path} has no plan to extend")
        old = self._table(info)
        ordered = sorted_unique(new_uris)
        first = int(info["num_shards"])
        ids = first + np.arange(len(ordered), dtype=np.int64) // shard_size
        added = pa.table({"uri": pa.array(ordered, pa.string()), "shard": pa.array(ids, pa.int32())})
        table = pa.concat_tables([old.select(["uri", "shard"]).cast(added.schema), added])
        self.meta.storage.write_parquet(table, self.meta.url("plan.parquet"))
        num_shards = first + -(-len(ordered) // shard_size)
        width = info.get("width") or max(5, len(str(first)))
        extended = {**info, "num_shards": num_shards, "num_uris": table.num_rows, "width": width}
        self.meta.write_json("plan.json", extended)
        self._num_shards, self._fixed_width = num_shards, width
        log.info("plan extended: %d new images in %d new shards", len(ordered), num_shards - first)
        return make_shards_from(ordered, shard_size, first)

    def info(self) -> dict[str, Any] | None:
        """plan.json: shard_size, num_shards, num_uris, ...; None when there is no whole plan.
        What a reader that needs no URI asks (``segbatch status``): one small file, at any size."""
        info = self.meta.read_json("plan.json")
        if info is not None:
            self._adopt(info)
        return info

    def read(self) -> tuple[list[Shard], int] | None:
        """The shards and shard size of the recorded plan; None when there is none."""
        info = self.info()
        if info is None:
            return None
        table = self._table(info)
        uris = table.column("uri").to_pylist()
        shard = table.column("shard").to_numpy()
        if len(shard) and np.any(np.diff(shard) < 0):
            order = np.argsort(shard, kind="stable")
            uris, shard = [uris[i] for i in order], shard[order]
        # shard boundaries: where the shard id changes
        starts = np.flatnonzero(np.diff(shard, prepend=-1)) if len(shard) else np.array([], dtype=np.int64)
        ends = np.append(starts[1:], len(shard))
        shards = [Shard(int(shard[s]), tuple(uris[s:e])) for s, e in zip(starts.tolist(), ends.tolist())]
        return shards, int(info["shard_size"])

    def _table(self, info: dict[str, Any]) -> pa.Table:
        """plan.parquet's rows that plan.json counts.

        ``extend`` appends rows, then rewrites plan.json: rows past the
        count are an extension cut short before plan.json named it, and the
        rerun plans them again. Fewer rows than counted is a damaged plan.
        """
        table = self.meta.storage.read_parquet(self.meta.url("plan.parquet"))
        count = int(info["num_uris"])
        if table.num_rows < count:
            raise ValueError(f"{self.meta.path}/plan.parquet has {table.num_rows} rows, plan.json says {count}")
        if table.num_rows > count:
            log.warning("%s: ignoring %d plan rows of an unfinished extension", self.meta.path, table.num_rows - count)
        return table.slice(0, count)
