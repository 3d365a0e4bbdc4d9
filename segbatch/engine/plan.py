"""The plan: the input cut into consecutive, deterministic units of work
(shards), recorded under DEST/_segbatch part by part as SOURCE is listed
(``PlanFile``; ``planner.py`` makes it).

Layout::

    plan.json                      shard_size, width (digits of part numbers), complete, num_shards, num_uris
    plan/shards-00000.parquet      uri, shard: whole shards, the first one named; its least and
                                   greatest URI in its metadata

A part file is whole or absent (one write), and every part present is the
plan's: a driver killed mid-listing leaves whole parts, whose shards keep
their ids and URIs, and the rerun plans only URIs no part holds. plan.json is
written before the first part (the width every process names files by) and
again after each (counts; ``complete`` once the listing ended).

A plan made before parts (one ``plan.parquet``) is read as one part.

Where each shard's commit record lives is ``commits.py``; the whole of DEST, ``store.py``.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segbatch.storage.sources import sorted_unique

from .meta import MetaFolder

log = logging.getLogger(__name__)

PARTS = "plan"  # the folder of plan parts under _segbatch
LEGACY = "plan.parquet"  # the whole plan, as plans were written before parts
_PART_NAME = re.compile(r"^shards-(\d+)\.parquet$")
_READ_THREADS = 16


@dataclass(frozen=True)
class Shard:
    """A unit of work: consecutive URIs of the sorted input, committed as one file."""

    id: int
    uris: tuple[str, ...]


@dataclass(frozen=True)
class PlanPart:
    """One part file of the plan: shards ``first_shard`` .. ``first_shard + num_shards - 1``,
    ``num_uris`` URIs, none less than ``min_uri`` or greater than ``max_uri``."""

    url: str
    first_shard: int
    num_shards: int
    num_uris: int
    min_uri: str
    max_uri: str


def make_shards(uris: list[str], shard_size: int) -> list[Shard]:
    """Cut the sorted, de-duplicated URIs into consecutive shards of ``shard_size``.

    Deterministic: the same URIs give the same shards in any order, so a
    rerun's plan matches the first run's.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, not {shard_size}")
    return make_shards_from(sorted_unique(uris), shard_size, 0)


def make_shards_from(uris: list[str], shard_size: int, first_id: int) -> list[Shard]:
    """Consecutive chunks of already sorted ``uris``, numbered from ``first_id``."""
    return [Shard(first_id + i, tuple(uris[j : j + shard_size])) for i, j in enumerate(range(0, len(uris), shard_size))]


def part_width(num_shards: int) -> int:
    """Digits in a part number: 5, more for a plan of more shards (fixed when the plan is made)."""
    return max(5, len(str(num_shards)))


class PlanFile:
    """The recorded plan (module docstring). It also names each shard's files
    (``part``), alike in every process that reads plan.json (driver, actors)."""

    def __init__(self, meta: MetaFolder):
        self.meta = meta
        self._width: int | None = None

    def part(self, shard_id: int) -> str:
        """The name of a shard's files: ``part-00002``."""
        if self._width is None:
            info = self.meta.read_json("plan.json")
            if info is None:
                return f"part-{shard_id:05d}"
            self._adopt(info)
        return f"part-{shard_id:0{self._width}d}"

    def _adopt(self, info: dict[str, Any]) -> None:
        """Name files as plan.json says: every reader of it (driver, actors) alike.
        (Plans before ``width`` was recorded: from their shard count.)"""
        self._width = int(info.get("width") or part_width(int(info["num_shards"])))

    def forget(self) -> None:
        """The plan was deleted: names are read again from the next one."""
        self._width = None

    # -- writing (the driver's planner) ----------------------------------------

    def begin(self, shard_size: int, width: int) -> dict[str, Any]:
        """plan.json for a plan with no part yet: the width files are named by, before any is written."""
        info = {
            "shard_size": shard_size,
            "num_shards": 0,
            "num_uris": 0,
            "width": width,
            "complete": False,
            "created": time.time(),
        }
        self.record(info)
        return info

    def record(self, info: dict[str, Any]) -> None:
        """Write plan.json (counts, ``complete``)."""
        self.meta.write_json("plan.json", info)
        self._adopt(info)

    def write_part(self, first_shard: int, uris: list[str], shard_size: int) -> PlanPart:
        """Record ``uris`` (none in the plan yet) as shards from ``first_shard`` on, in one part file,
        with the least and greatest of them (what the planner asks a part: might it hold this URI?)."""
        ids = first_shard + np.arange(len(uris), dtype=np.int64) // shard_size
        table = pa.table({"uri": pa.array(uris, pa.string()), "shard": pa.array(ids, pa.int32())})
        lo, hi = min(uris), max(uris)
        table = table.replace_schema_metadata({"min_uri": lo, "max_uri": hi})
        url = self.meta.url(PARTS, f"shards-{first_shard:0{self._width or 5}d}.parquet")
        self.meta.storage.write_parquet(table, url)  # whole or absent (Storage.write_bytes)
        num_shards = int(ids[-1]) - first_shard + 1
        return PlanPart(url, first_shard, num_shards, len(uris), lo, hi)

    # -- reading ---------------------------------------------------------------

    def info(self) -> dict[str, Any] | None:
        """plan.json: shard_size, num_shards, num_uris, complete, ...; None when there is no plan.
        What a reader that needs no URI asks (``segbatch status``): one small file, at any size."""
        info = self.meta.read_json("plan.json")
        if info is not None:
            self._adopt(info)
            info.setdefault("complete", True)  # plans before parts wrote plan.json last
        return info

    def parts(self, info: dict[str, Any]) -> list[PlanPart]:
        """The plan's parts by first shard: the files present, each read for its footer only
        (a plan before parts: its one file, whole)."""
        storage = self.meta.storage
        names = [n for n in storage.listdir_names(self.meta.url(PARTS)) if _PART_NAME.match(n)]
        urls = [self.meta.url(PARTS, n) for n in names]
        with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(urls)))) as pool:
            footers = list(pool.map(storage.read_parquet_metadata, urls))
        parts = [_part(url, footer) for url, footer in zip(urls, footers)]
        if "legacy_rows" in info or storage.exists(self.meta.url(LEGACY)):
            parts.append(self._legacy_part(info))
        return sorted(parts, key=lambda p: p.first_shard)

    def read_part(self, part: PlanPart) -> list[Shard]:
        """The shards of one part."""
        uris, shard = self._columns(part)
        # shard boundaries: where the shard id changes
        starts = np.flatnonzero(np.diff(shard, prepend=-1)) if len(shard) else np.array([], dtype=np.int64)
        ends = np.append(starts[1:], len(shard))
        return [Shard(int(shard[s]), tuple(uris[s:e])) for s, e in zip(starts.tolist(), ends.tolist())]

    def part_uris(self, part: PlanPart) -> pa.Array:
        """One part's URIs, as Arrow (for set operations without Python strings)."""
        return self._table(part).column("uri").combine_chunks()

    def read(self) -> tuple[list[Shard], int] | None:
        """Every shard of the plan and its shard size; None when there is none.
        Holds the whole plan: for small plans (tiled jobs' merges, tests); the driver reads part by part."""
        info = self.info()
        if info is None:
            return None
        return [s for p in self.parts(info) for s in self.read_part(p)], int(info["shard_size"])

    def _columns(self, part: PlanPart) -> tuple[list[str], np.ndarray]:
        table = self._table(part)
        uris, shard = table.column("uri").to_pylist(), table.column("shard").to_numpy()
        if len(shard) and np.any(np.diff(shard) < 0):
            order = np.argsort(shard, kind="stable")
            uris, shard = [uris[i] for i in order], shard[order]
        return uris, shard

    def _table(self, part: PlanPart) -> pa.Table:
        table = self.meta.storage.read_parquet(part.url, columns=["uri", "shard"])
        return table.slice(0, part.num_uris)

    def _legacy_part(self, info: dict[str, Any]) -> PlanPart:
        """plan.parquet of a plan made before parts, as one part: the rows plan.json counted then.

        Plans then were extended by appending rows before rewriting plan.json: rows past the
        count are an extension cut short, and the rerun plans them again. Fewer is a damaged plan.
        """
        url = self.meta.url(LEGACY)
        table = self.meta.storage.read_parquet(url, columns=["uri", "shard"])
        count = int(info.get("legacy_rows", info["num_uris"]))
        if table.num_rows < count:
            raise ValueError(f"{self.meta.path}/{LEGACY} has {table.num_rows} rows, plan.json says {count}")
        if table.num_rows > count:
            log.warning("%s: ignoring %d plan rows of an unfinished extension", self.meta.path, table.num_rows - count)
        table = table.slice(0, count)
        uris = table.column("uri")
        shard = table.column("shard").to_numpy()
        first = int(shard.min()) if count else 0
        num_shards = int(shard.max()) - first + 1 if count else 0
        bounds = pc.min_max(uris).as_py() if count else {"min": "", "max": ""}
        lo, hi = bounds["min"], bounds["max"]
        return PlanPart(url, first, num_shards, count, lo, hi)


def _part(url: str, footer: Any) -> PlanPart:
    meta = {k.decode(): v.decode() for k, v in (footer.metadata or {}).items()}
    first = int(_PART_NAME.match(url.rsplit("/", 1)[-1]).group(1))
    rows = footer.num_rows
    last_shard = _last_shard(footer)
    return PlanPart(url, first, last_shard - first + 1, rows, meta["min_uri"], meta["max_uri"])


def _last_shard(footer: Any) -> int:
    """The part's last shard id, from the ``shard`` column's statistics."""
    col = footer.schema.to_arrow_schema().get_field_index("shard")
    return max(int(footer.row_group(i).column(col).statistics.max) for i in range(footer.num_row_groups))
