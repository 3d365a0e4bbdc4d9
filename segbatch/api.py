"""segbatch from Python: for notebooks, Airflow tasks and Ray scripts.

Two calls, the same job and results as the command line::

    import segbatch

    result = segbatch.run("s3://archive/2026-11/", "s3://results/2026-11/", model="coco", shard_size=128)
    if not result.complete:
        raise RuntimeError(f"{len(result.failed)} shards failed; run again to resume them")
    table = segbatch.read_results("s3://results/2026-11/")  # a pyarrow.Table, one row per image

``run`` takes every option of ``segbatch run`` by its config name
(``JobConfig`` and ``ModelConfig``'s fields: ``model``, ``score_threshold``,
``shard_size``, ``storage_options``, ...). It runs in this process as the
driver: it joins the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or
starts Ray locally, exactly like the command. Errors a user can fix raise a
``segbatch.SegbatchError`` whose message names the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from segbatch.config import JobConfig, ModelConfig
from segbatch.errors import UsageError


def run(source: str, dest: str, *, on_progress: Callable[[Any], None] | None = None, **options: Any):
    """Segment every image under ``source`` into Parquet files under ``dest``.

    ``options``: any field of ``JobConfig`` or ``ModelConfig`` (the options of
    ``segbatch run``, with underscores: ``min_size=512``, ``progress="none"``).
    ``on_progress`` is called with the job's ``Progress`` now and then.
    Returns a ``JobResult``: ``complete``, ``failed`` (shard -> last error),
    ``failed_scenes`` and ``summary``. An incomplete job is not an exception:
    the same call resumes it.
    """
    from segbatch.engine import run_job

    return run_job(job_config(source, dest, **options), on_progress=on_progress)


def job_config(source: str, dest: str, **options: Any) -> JobConfig:
    """The validated ``JobConfig`` of ``run``'s keyword options; an unknown name is
    refused with the nearest known one (a typo would otherwise be silently ignored)."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    job_fields = {f.name for f in dataclasses.fields(JobConfig)} - {"source", "dest", "model"}
    unknown = sorted(set(options) - model_fields - job_fields)
    if unknown:
        known = sorted(model_fields | job_fields)
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in unknown]
        raise UsageError(f"unknown options: {', '.join(hints)}; segbatch.run takes {', '.join(known)}")
    model = ModelConfig(**{k: v for k, v in options.items() if k in model_fields})
    return JobConfig(source=source, dest=dest, model=model, **{k: v for k, v in options.items() if k in job_fields})


def read_results(
    dest: str, *, columns: list[str] | None = None, storage_options: dict[str, Any] | None = None
) -> pa.Table:
    """Every row under ``dest`` as one ``pyarrow.Table`` (``segbatch.schema.SCHEMA``).

    One row per input image: ``uri``, ``width``, ``height``, ``status``,
    ``error`` and ``detections`` (label, label_name, score, box, COCO RLE
    mask, area). ``table.to_pandas()`` for pandas; for an archive larger than
    memory, pass ``columns`` or read ``dest/data/`` with DuckDB or
    ``pyarrow.dataset``. Works while a job is still writing ``dest``: only
    committed shards are there.
    """
    from segbatch.outputs import read_results as read_table
    from segbatch.storage import Storage

    return read_table(dest, Storage(storage_options or {}), columns=columns)
