"""Faults a test switches on in the Ray workers of its session, for the driver's tests.

``install`` is a Ray ``worker_process_setup_hook`` (``runtime_env()``): it
installs ``poison`` (a worker SIGKILLs itself decoding a poison image) and
three more faults, each on while its marker file exists in the folder
``$SEGBATCH_TEST_MARKERS`` (so a test turns them on and off between runs of
one Ray session):

- an image whose bytes hold ``HANG_MARK`` hangs its decoding (a read that
  never returns): always on;
- ``drop-record-<shard>``: that shard's data file is published but its
  commit record is never written (a write lost on the way);
- ``hang-merge``: merging a tiled scene never returns.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import poison

HANG_MARK = b"SEGBATCH-HANG"
HOOK = "driver_hooks.install"


def runtime_env(markers: Path) -> dict[str, Any]:
    env = poison.runtime_env({"SEGBATCH_TEST_MARKERS": str(markers)})
    return {**env, "worker_process_setup_hook": HOOK}


def _on(name: str) -> bool:
    return (Path(os.environ["SEGBATCH_TEST_MARKERS"]) / name).exists()


def install() -> None:
    poison.install()
    from segbatch import pipeline, plan, worker

    decode = pipeline.decode_image

    @functools.wraps(decode)
    def hanging(data: Any, *args: Any, **kwargs: Any) -> Any:
        if HANG_MARK in bytes(data):
            time.sleep(3600)
        return decode(data, *args, **kwargs)

    pipeline.decode_image = hanging

    commit = plan.JobStore.commit

    def losing_records(self: plan.JobStore, shard_id: int, *args: Any, **kwargs: Any) -> None:
        if not _on(f"drop-record-{shard_id}"):
            return commit(self, shard_id, *args, **kwargs)
        record, write = self.commit_url(shard_id), self.storage.write_bytes
        # the data file is published, the record's write is lost
        self.storage.write_bytes = lambda url, *a, **k: None if url == record else write(url, *a, **k)
        try:
            return commit(self, shard_id, *args, **kwargs)
        finally:
            del self.storage.write_bytes

    plan.JobStore.commit = losing_records

    merge = worker.merge_and_commit

    def hanging_merge(*args: Any, **kwargs: Any) -> Any:
        while _on("hang-merge"):
            time.sleep(0.5)
        return merge(*args, **kwargs)

    worker.merge_and_commit = hanging_merge
