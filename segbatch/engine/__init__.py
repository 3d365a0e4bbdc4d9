"""The engine: the driver on the head node (plan, resume, lease), the actor pool and its guards,
the DEST store and its commit records, the worker actor and its per-shard pipeline, and job submission.

The only layer (with Ray Train in ``train/``) that knows Ray. Where each thing is:

- ``driver.py``: one job's data flow (plan, resume, schedule, merge, summarize);
- ``pool.py``: the actor pool, where a shard is scheduled, retried, and a worker replaced;
- ``policy.py``: the pool's rules (stalls, startup, retries, poison images, store-wide faults);
- ``sizing.py``: the cluster: how big each worker is and whether a node can hold it;
- ``scene_tasks.py``: the merge phase of a tiled job; ``scene_merge.py``: one scene's merge;
- ``store.py`` (``plan.py``, ``commits.py``, ``meta.py``): the job's state under DEST;
- ``records.py``: the typed records that cross these modules (summary, commit records, events);
- ``worker.py``: the actor; ``pipeline.py``: one shard through its stages; ``inflight.py``: its byte budget;
- ``lease.py``: one driver per DEST; ``submit.py``: submitting a job to a cluster.
"""

from .driver import prepare, run_job
from .inflight import (
    TYPICAL_PIXELS,
    WORKER_BASE_BYTES,
    Claim,
    InFlightBytes,
    Withdrawn,
    held_bytes,
    inflight_budget,
    photo_claim_bytes,
    worker_memory_bytes,
)
from .lease import DestInUse, Holder, Lease
from .pipeline import Decoded, ShardProcessor, TileReading, aspect_batches, encode_rows, fetch_and_decode
from .plan import Shard, make_shards
from .policy import JobError, PoisonHunt, Probe, Retries, StallGuard, StartupGuard, StoreFaults
from .pool import MAX_FAILURES_IN_A_ROW
from .records import CommitRecord, Committed, JobResult, JobSummary, MergeStarted, Probed, Progress, Progressed
from .store import JobStore
from .submit import SecretInSubmission, entrypoint, refuse_secrets, runtime_env
from .worker import POISON_ERROR, SegmentWorker

__all__ = [
    "Claim",
    "CommitRecord",
    "Committed",
    "Decoded",
    "DestInUse",
    "Holder",
    "InFlightBytes",
    "JobError",
    "JobResult",
    "JobStore",
    "JobSummary",
    "Lease",
    "MAX_FAILURES_IN_A_ROW",
    "MergeStarted",
    "POISON_ERROR",
    "PoisonHunt",
    "Probe",
    "Probed",
    "Progress",
    "Progressed",
    "Retries",
    "SecretInSubmission",
    "SegmentWorker",
    "Shard",
    "ShardProcessor",
    "StallGuard",
    "StartupGuard",
    "StoreFaults",
    "TYPICAL_PIXELS",
    "TileReading",
    "WORKER_BASE_BYTES",
    "Withdrawn",
    "aspect_batches",
    "encode_rows",
    "entrypoint",
    "fetch_and_decode",
    "held_bytes",
    "inflight_budget",
    "make_shards",
    "photo_claim_bytes",
    "prepare",
    "refuse_secrets",
    "run_job",
    "runtime_env",
    "worker_memory_bytes",
]
