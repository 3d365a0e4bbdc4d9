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

from segbatch.lazy import lazy_names

# Each name is imported from its module when first asked for: `segbatch status` and the other
# readers need the store, not the driver (which loads torch through geo/ and model/).
_WHERE = {
    "aspect_batches": "pipeline",
    "Claim": "inflight",
    "CommitRecord": "records",
    "Committed": "records",
    "Decoded": "pipeline",
    "DestInUse": "lease",
    "encode_rows": "pipeline",
    "entrypoint": "submit",
    "fetch_and_decode": "pipeline",
    "held_bytes": "inflight",
    "Holder": "lease",
    "inflight_budget": "inflight",
    "InFlightBytes": "inflight",
    "JobError": "policy",
    "JobResult": "records",
    "JobStore": "store",
    "JobSummary": "records",
    "Lease": "lease",
    "make_shards": "plan",
    "MAX_FAILURES_IN_A_ROW": "pool",
    "MergeStarted": "records",
    "photo_claim_bytes": "inflight",
    "POISON_ERROR": "worker",
    "PoisonHunt": "policy",
    "prepare": "driver",
    "Probe": "policy",
    "Probed": "records",
    "Progress": "records",
    "Progressed": "records",
    "refuse_secrets": "submit",
    "Retries": "policy",
    "run_job": "driver",
    "runtime_env": "submit",
    "SecretInSubmission": "submit",
    "SegmentWorker": "worker",
    "Shard": "plan",
    "ShardProcessor": "pipeline",
    "StallGuard": "policy",
    "StartupGuard": "policy",
    "StoreFaults": "policy",
    "TileReading": "pipeline",
    "TYPICAL_PIXELS": "inflight",
    "Withdrawn": "inflight",
    "WORKER_BASE_BYTES": "inflight",
    "worker_memory_bytes": "inflight",
}


__getattr__ = lazy_names(__name__, {name: f".{module}" for name, module in _WHERE.items()})


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
