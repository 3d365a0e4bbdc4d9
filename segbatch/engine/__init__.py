"""The engine: the driver on the head node (plan, resume, lease), the actor pool and its guards,
the DEST store and its commit records, the worker actor and its per-shard pipeline, and job submission.

The only layer (with Ray Train in ``train/``) that knows Ray.
"""

from .driver import JobError, MAX_FAILURES_IN_A_ROW, prepare, run_job
from .lease import DestInUse, Holder, Lease
from .pipeline import Claim, Decoded, InFlightBytes, ShardProcessor, TYPICAL_PIXELS, TileReading, WORKER_BASE_BYTES, Withdrawn, aspect_batches, encode_rows, fetch_and_decode, held_bytes, inflight_budget, photo_claim_bytes, worker_memory_bytes
from .plan import Shard, make_shards
from .policy import PoisonHunt, Probe, StallGuard, StoreFaults
from .store import JobStore
from .submit import SecretInSubmission, entrypoint, refuse_secrets, runtime_env
from .worker import POISON_ERROR, SegmentWorker

__all__ = ["Claim", "Decoded", "DestInUse", "Holder", "InFlightBytes", "JobError", "JobStore", "Lease", "MAX_FAILURES_IN_A_ROW", "POISON_ERROR", "PoisonHunt", "Probe", "SecretInSubmission", "SegmentWorker", "Shard", "ShardProcessor", "StallGuard", "StoreFaults", "TYPICAL_PIXELS", "TileReading", "WORKER_BASE_BYTES", "Withdrawn", "aspect_batches", "encode_rows", "entrypoint", "fetch_and_decode", "held_bytes", "inflight_budget", "make_shards", "photo_claim_bytes", "prepare", "refuse_secrets", "run_job", "runtime_env", "worker_memory_bytes"]
