"""Reading a DEST's results, for export, evaluation, rendering and reports.

Only the public output is read (``DEST/data`` through ``schema``), never the
job's internals, so these work on any copy of the results.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from segbatch import schema
from segbatch.errors import UsageError
from segbatch.storage import Storage, join


class NoResults(UsageError, FileNotFoundError):
    """DEST has no results to read: no job wrote there yet (or DEST is mistyped)."""


def results_dataset(dest: str, storage: Storage) -> pads.Dataset:
    """DEST/data as one pyarrow dataset of ``schema.SCHEMA``."""
    data = join(dest, schema.DATA)
    # Storage's exists: retried, with a fresh listing (the actors may have just written here).
    if not storage.exists(data):
        raise NoResults(f"{dest} holds no results (no data/ folder); run `segbatch run SOURCE {dest}` first")
    fs, path = storage.fs(data)  # pyarrow reads through the filesystem itself
    return pads.dataset(path, filesystem=fs, format="parquet", schema=schema.SCHEMA)


def read_results(dest: str, storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """All rows under DEST/data as one table (empty when there are none)."""
    return results_dataset(dest, storage).to_table(columns=columns)


def iter_batches(dest: str, storage: Storage, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """DEST's rows a record batch at a time: memory bounded by a batch, not the archive."""
    yield from results_dataset(dest, storage).to_batches(columns=columns)


def read_rows(dest: str, storage: Storage) -> list[dict[str, Any]]:
    """Rows as dicts, sorted by URI."""
    return sorted(read_results(dest, storage).to_pylist(), key=lambda r: r["uri"])


def files_metadata(dest: str, storage: Storage) -> list[dict[str, Any]]:
    """segbatch's metadata of each of DEST's files (model, thresholds, classes,
    the shard it holds), by file name; only the files' footers are read."""
    files = [url for url in storage.list_files(join(dest, schema.DATA)) if url.endswith(".parquet")]
    return [schema.read_metadata(storage.read_parquet_metadata(url).schema.to_arrow_schema()) for url in files]


@dataclass(frozen=True)
class KeypointLayout:
    """What a keypoint model's rows mean: ``names[k]`` is the k-th entry of each
    detection's ``keypoints``; ``skeleton`` the 0-based pairs of them that are joined
    (empty when the model records none)."""

    names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...] = ()


def keypoint_layout(dest: str, storage: Storage) -> KeypointLayout | None:
    """The keypoint names and skeleton of DEST's model (the file metadata's ``keypoint_names``
    and ``skeleton``), or None for a mask model (or a DEST without files).

    One footer is read: every file of a DEST comes from the same model (a run refuses
    another model on the same DEST)."""
    files = [url for url in storage.list_files(join(dest, schema.DATA)) if url.endswith(".parquet")]
    if not files:
        return None
    meta = schema.read_metadata(storage.read_parquet_metadata(files[0]).schema.to_arrow_schema())
    return layout_of(meta)


def layout_of(metadata: dict[str, Any]) -> KeypointLayout | None:
    """The KeypointLayout in a file's segbatch metadata (None without ``keypoint_names``)."""
    names = metadata.get("keypoint_names")
    if not names:
        return None
    skeleton = tuple((int(i), int(j)) for i, j in metadata.get("skeleton") or ())
    return KeypointLayout(tuple(names), skeleton)
