"""Reading a DEST's results, for export, evaluation, rendering and reports.

Only the public output is read (``DEST/data`` through ``schema``), never the
job's internals, so these work on any copy of the results.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from . import schema
from .storage import Storage, join


def read_results(dest: str, storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """All rows under DEST/data as one table (empty when there are none)."""
    fs, path = storage.fs(join(dest, "data"))
    if not fs.exists(path):
        raise FileNotFoundError(f"{dest} holds no results (no data/ folder); run `segbatch run SOURCE {dest}` first")
    dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=schema.SCHEMA)
    return dataset.to_table(columns=columns)


def read_rows(dest: str, storage: Storage) -> list[dict[str, Any]]:
    """Rows as dicts, sorted by URI."""
    return sorted(read_results(dest, storage).to_pylist(), key=lambda r: r["uri"])


def results_metadata(dest: str, storage: Storage) -> dict[str, Any]:
    """segbatch's metadata of one of DEST's files (model, thresholds, classes)."""
    fs, path = storage.fs(join(dest, "data"))
    files = sorted(f for f in fs.find(path) if f.endswith(".parquet"))
    if not files:
        return {}
    import pyarrow.parquet as pq

    with fs.open(files[0], "rb") as f:
        return schema.read_metadata(pq.ParquetFile(f).schema_arrow)
