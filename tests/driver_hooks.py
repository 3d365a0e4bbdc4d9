"""Faults a test switches on in the Ray workers of its session, for the driver's tests.

``install`` is a Ray ``worker_process_setup_hook`` (``runtime_env()``): it
installs ``poison`` (a worker SIGKILLs itself decoding a poison image) and
four more faults, each on while its marker file exists in the folder
``$SEGBATCH_TEST_MARKERS`` (so a test turns them on and off between runs of
one Ray session):

- an image whose bytes hold ``HANG_MARK`` hangs its decoding (a read that
  never returns): always on;
- an image whose bytes hold ``SLOW_MARK`` takes ``SLOW_DECODE_S`` more to
  decode (a slow read): always on;
- ``drop-record-<shard>``: that shard's data file is published but its
  commit record is never written (a write lost on the way);
- ``hang-merge``: each merge task hangs reading its tiles (for up to
  ``HANG_MERGE_S``, so a driver that never times it out fails its test rather
  than hanging it); each process that hangs so leaves ``merge-hung-<pid>``.

Each fault patches a name looked up at call time in the worker: a class
attribute (``JobStore.commit``, ``Storage.read_parquet``) or a module global
of the pipeline, whose code runs as imported there. Not ``worker.merge_and_commit``:
Ray ships the ``merge_scene_task`` remote function by value (cloudpickle: the
module's ``merge_scene_task`` is the RemoteFunction, not the function), with its
globals copied from the driver, where nothing is patched, so the task never
looks that module name up.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import poison

HANG_MARK = b"SEGBATCH-HANG"
SLOW_MARK = b"SEGBATCH-SLOW"
SLOW_DECODE_S = 1.0
HANG_MERGE_S = 60.0
HOOK = "driver_hooks.install"


def runtime_env(markers: Path) -> dict[str, Any]:
    env = poison.runtime_env({"SEGBATCH_TEST_MARKERS": str(markers)})
    return {**env, "worker_process_setup_hook": HOOK}


def _markers() -> Path:
    return Path(os.environ["SEGBATCH_TEST_MARKERS"])


def _on(name: str) -> bool:
    return (_markers() / name).exists()


def hung_merge_pids(markers: Path) -> list[int]:
    """The worker processes where a ``hang-merge`` hung a merge (each one's ``merge-hung-<pid>``)."""
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in markers.glob("merge-hung-*"))


def install() -> None:
    poison.install()
    import ray

    from segbatch.engine import pipeline, store
    from segbatch.storage import files as storage

    decode = pipeline.decode_image

    @functools.wraps(decode)
    def hanging(data: Any, *args: Any, **kwargs: Any) -> Any:
        if HANG_MARK in bytes(data):
            time.sleep(3600)
        if SLOW_MARK in bytes(data):
            time.sleep(SLOW_DECODE_S)
        return decode(data, *args, **kwargs)

    pipeline.decode_image = hanging

    commit = store.JobStore.commit

    def losing_records(self: store.JobStore, shard_id: int, *args: Any, **kwargs: Any) -> None:
        if not _on(f"drop-record-{shard_id}"):
            return commit(self, shard_id, *args, **kwargs)
        record, write = self.commit_url(shard_id), self.storage.write_bytes
        # the data file is published, the record's write is lost
        self.storage.write_bytes = lambda url, *a, **k: None if url == record else write(url, *a, **k)
        try:
            return commit(self, shard_id, *args, **kwargs)
        finally:
            del self.storage.write_bytes

    store.JobStore.commit = losing_records

    read_parquet = storage.Storage.read_parquet
    hung: set[str] = set()  # the tasks that hung here: each once, for HANG_MERGE_S at most

    def hanging_read(self: storage.Storage, url: str, *args: Any, **kwargs: Any) -> Any:
        task = ray.get_runtime_context().get_task_id()
        if _on("hang-merge") and task not in hung:
            hung.add(task)
            (_markers() / f"merge-hung-{os.getpid()}").touch()
            since = time.monotonic()
            while _on("hang-merge") and time.monotonic() - since < HANG_MERGE_S:
                time.sleep(0.2)
        return read_parquet(self, url, *args, **kwargs)

    storage.Storage.read_parquet = hanging_read
