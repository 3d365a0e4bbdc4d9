"""The cluster: joining (or starting) Ray, how big each worker is, how many
there are, and whether the cluster can hold them.

A worker is sized from what ONE node can host, never from the cluster's
total: Ray places an actor on a single node, so a worker asking for the
cluster's 4 CPUs on two 2-CPU nodes would never start. The rules live in
pure functions over Ray's node records (``ray.nodes()``), tested without
Ray: ``size_pool``, ``hosts``, ``cpus_beside_a_gpu``, ``unhostable``,
``pending_text`` and ``autoscaler_text`` (and ``node_types.py``'s parsers); ``pool_shape``, ``check_fits`` and
``pending_reason`` feed them Ray's view of the cluster when the pool starts.

A worker no node of a Ray started here could ever host is refused at once,
naming the options that fix it. Joining a cluster, an autoscaler may still
add the nodes: the startup guard (``policy.StartupGuard``) then says why
nothing starts, with ``pending_reason`` (what each node has, and what the
autoscaler is launching where it reports that).

With an autoscaler, the nodes it can still add count beside the live ones
(``node_types.py``: from ``--autoscaling-config``, the GCS or the head's
``ray up`` config): a cluster scaled to zero gets workers sized for the nodes
to come, and Ray's autoscaler adds them for the pending actors. Without a
config to read, sizing sees only the live nodes; ``--workers`` and
``--cpus-per-worker``/``--gpus-per-worker`` then say what to ask for.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, NamedTuple

import ray

from segbatch.config import JobConfig

from .node_types import NodeType, discover_node_types, launched_by_type, still_addable
from .policy import JobError

log = logging.getLogger(__name__)

# Model threads a CPU worker gets at most: Mask R-CNN's CPU kernels scale
# poorly past 4 threads, and more workers of 4 use a big node better.
MAX_CPUS_PER_CPU_WORKER = 4
# CPUs beside one GPU at most: enough to read, decode and encode for it.
MAX_CPUS_BESIDE_A_GPU = 8


class PoolShape(NamedTuple):
    """What each worker asks Ray for, and how many workers the pool starts."""

    cpus: float
    gpus: float
    workers: int


def ensure_ray(cfg: JobConfig) -> None:
    """Join the cluster ``--address`` names (or a Ray job's), or start a local Ray, unless Ray runs already."""
    if ray.is_initialized():
        return
    # address None: join the cluster of a Ray job (RAY_ADDRESS) or start one locally.
    # "local", not None: ray.init(None) would join whatever `ray start` cluster
    # this machine last ran, which check_fits (and the contract) take as local.
    address = cfg.address or (None if os.environ.get("RAY_ADDRESS") else "local")
    ray.init(address=address, log_to_driver=True, configure_logging=False)


def pool_shape(cfg: JobConfig, storage, most: int | None = None) -> PoolShape:
    """(CPUs per worker, GPUs per worker, number of workers) for the cluster Ray sees now, and the
    nodes its autoscaler can add (joined clusters only: a Ray started here never grows).

    most: the number of shards; without ``--workers`` the pool has no more workers than that.
    """
    nodes = _live_nodes()
    addable = _addable_node_types(cfg, storage)
    shape = size_pool(cfg, nodes, addable, most)
    check_fits(cfg, shape.cpus, shape.gpus, nodes + [t.as_node() for t in addable])
    waiting = shape.workers - sum(hosts(n, shape.cpus, shape.gpus) for n in nodes)
    if addable and waiting > 0:
        log.info("%d of the %d workers wait for nodes the autoscaler adds for them", waiting, shape.workers)
    return shape


def _addable_node_types(cfg: JobConfig, storage) -> list[NodeType]:
    if not _joined(cfg):
        return []
    types, where = discover_node_types(cfg.autoscaling_config, storage)
    addable = still_addable(types, launched_by_type(_autoscaler_status()))
    if addable:
        log.info(
            "the autoscaler can add (from %s): %s",
            where,
            "; ".join(f"{t.name} nodes of {t.cpus:g} CPU, {t.gpus:g} GPU: {_more(t.more)}" for t in addable),
        )
    return addable


def size_pool(cfg: JobConfig, nodes: list[dict], addable: list[NodeType] = (), most: int | None = None) -> PoolShape:
    """The pool for these live nodes (``ray.nodes()`` records) and the node types
    an autoscaler can still add (``addable``, each with how many more).

    One rule for both kinds of worker: each is as big as the SMALLEST node
    that can host one allows, so every such node hosts at least one and a
    bigger node hosts several (``hosts``). On nodes of 2 and 4 CPUs a CPU
    worker gets 2 CPUs and the pool has 3 workers (1 + 2): both nodes work.
    It is the simplest rule that uses every node: one shape for the whole
    pool, so Ray may place any worker, and a lost one's replacement, on any
    node with room. Its cost: one small node (a 1-CPU head beside 8-CPU
    workers) makes every worker small; give ``--cpus-per-worker`` there.

    - GPU workers (``--device`` not ``cpu``, ``--gpus-per-worker`` > 0, and a
      GPU node or ``--device cuda``): ``--gpus-per-worker`` GPUs, and beside
      them their share of the leanest GPU node's CPUs (``cpus_beside_a_gpu``).
      CPU-only nodes host none: GPU workers go to GPU nodes.
    - CPU workers: the smallest node's CPUs (nodes with at least 1 CPU; a
      head started with ``--num-cpus 0`` hosts none), at most 4.

    ``--cpus-per-worker`` and ``--workers`` are the user's: kept as given
    (``check_fits`` refuses a worker no node can host). Without ``--workers``
    the pool has as many workers as the nodes, live and addable, can host side
    by side, at least 1 and at most ``most`` (the shards: a worker more would
    hold a model, and with an autoscaler a node, for nothing).
    """
    shapes = nodes + [t.as_node() for t in addable]
    total_gpus = sum(_res(n, "GPU") for n in shapes)
    device = cfg.model.device
    use_gpu = device != "cpu" and cfg.gpus_per_worker > 0 and (total_gpus > 0 or device == "cuda")
    if use_gpu:
        gpus = cfg.gpus_per_worker
        cpus = cfg.cpus_per_worker or cpus_beside_a_gpu(gpus, shapes)
    else:
        gpus = 0.0
        cpus = cfg.cpus_per_worker or cpus_for_a_cpu_worker(shapes)
    if cfg.workers:
        return PoolShape(float(cpus), float(gpus), cfg.workers)
    room = sum(hosts(n, cpus, gpus) for n in nodes)
    unlimited = False
    for t in addable:
        each = hosts(t.as_node(), cpus, gpus)
        if t.more is None and each:
            unlimited = True
        else:
            room += each * (t.more or 0)
    if unlimited:  # the autoscaler adds as many as asked: one worker a shard
        room = max(room, most or 1)
    workers = max(1, room if most is None else min(room, most))
    return PoolShape(float(cpus), float(gpus), workers)


def cpus_for_a_cpu_worker(nodes: list[dict]) -> float:
    """A CPU worker's CPUs: the smallest node's (of those with at least 1 CPU), 1 to 4; 1 with no such node."""
    sizes = [int(_res(n, "CPU")) for n in nodes if _res(n, "CPU") >= 1]
    return float(max(1, min(MAX_CPUS_PER_CPU_WORKER, min(sizes)))) if sizes else 1.0


def cpus_beside_a_gpu(gpus_per_worker: float, nodes: list[dict]) -> float:
    """CPUs for a GPU worker: its share of the leanest GPU node's CPUs, 1 to 8.

    A GPU worker reads, decodes and encodes on CPUs while the GPU runs the
    model (about 30 ms of CPU an image beside a few ms of GPU): one CPU would
    starve the GPU, and the node's share leaves room for its other workers.
    Only nodes with the worker's GPUs count: a CPU-only node's CPUs are not
    beside any GPU.
    """
    shares = [
        _res(n, "CPU") / _res(n, "GPU") * gpus_per_worker
        for n in nodes
        if _res(n, "GPU") >= gpus_per_worker and _res(n, "CPU") > 0
    ]
    return float(max(1, min(MAX_CPUS_BESIDE_A_GPU, int(min(shares))))) if shares else 1.0


def hosts(node: dict, cpus: float, gpus: float) -> int:
    """How many workers of ``cpus`` and ``gpus`` this node can host side by side."""
    counts = [math.floor(_res(node, name) / need + 1e-9) for name, need in (("CPU", cpus), ("GPU", gpus)) if need > 0]
    return min(counts) if counts else 0


def unhostable(cpus: float, gpus: float, nodes: list[dict]) -> bool:
    """True when no node can host even one worker of ``cpus`` and ``gpus``."""
    return not any(hosts(n, cpus, gpus) for n in nodes)


def check_fits(cfg: JobConfig, num_cpus: float, num_gpus: float, nodes: list[dict] | None = None) -> None:
    """Refuse at once a worker no node of a local Ray could ever host.

    Per node: a worker lives on one node, so 2 nodes of 2 CPUs do not host a
    worker of 4. Joining a cluster (``--address``, or a Ray job's
    RAY_ADDRESS), an autoscaler may add a node that can: say so now and wait
    up to ``--startup-timeout`` (the startup guard says why meanwhile). A Ray
    started here for this job will never grow: refuse at once.
    """
    nodes = _live_nodes() if nodes is None else nodes
    if not unhostable(num_cpus, num_gpus, nodes):
        return
    what = (
        f"each worker asks for {num_cpus:g} CPU and {num_gpus:g} GPU, but no node of this cluster has that "
        f"({nodes_text(nodes)})"
    )
    if _joined(cfg):
        log.warning(
            "%s; waiting up to %.0f s (--startup-timeout) for an autoscaler to add one", what, cfg.startup_timeout_s
        )
        return
    raise JobError(f"{what}. Lower --cpus-per-worker/--gpus-per-worker, use --device cpu, or add nodes that have them")


def nodes_text(nodes: list[dict]) -> str:
    """Each node's address and its CPUs and GPUs, for a message."""
    return (
        "; ".join(f"node {n['NodeManagerAddress']}: {_res(n, 'CPU'):g} CPU, {_res(n, 'GPU'):g} GPU" for n in nodes)
        or "no live nodes"
    )


def pending_reason(num_cpus: float, num_gpus: float) -> str:
    """Why a worker (or task) of ``num_cpus`` and ``num_gpus`` may not be placed: what the cluster has free now,
    and what its autoscaler is adding, where it reports that."""
    return pending_text(num_cpus, num_gpus, _live_nodes(), ray.available_resources(), _autoscaler_status())


def pending_text(num_cpus: float, num_gpus: float, nodes: list[dict], free: dict, autoscaler: Any = None) -> str:
    """``pending_reason``'s message from its parts: the worker's size, the live
    nodes, the cluster's free resources and the autoscaler's status
    (``ray.autoscaler.v2.schema.ClusterStatus``, or None)."""
    text = (
        f"each worker needs {num_cpus:g} CPU and {num_gpus:g} GPU on one node; the cluster has "
        f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free now ({nodes_text(nodes)}). "
    )
    if unhostable(num_cpus, num_gpus, nodes):
        text += (
            "No node is big enough for one: an autoscaler must add one, "
            "else lower --cpus-per-worker/--gpus-per-worker or use --device cpu"
        )
    else:
        text += "Other jobs may hold them, or an autoscaler is still adding nodes"
    scaling = autoscaler_text(autoscaler)
    return f"{text}; {scaling}" if scaling else text


def autoscaler_text(status: Any) -> str:
    """What the autoscaler reports it is adding (and failed to add), from its
    ``ClusterStatus``; "" when it reports nothing (or there is none)."""
    if status is None:
        return ""
    parts = [
        f"launching {r.count} {r.ray_node_type_name or r.instance_type_name} node(s)"
        for r in getattr(status, "pending_launches", [])
    ]
    parts += [
        " ".join(filter(None, ["node", n.ray_node_type_name or n.instance_type_name, n.ip_address, n.node_status]))
        for n in getattr(status, "pending_nodes", [])
    ]
    parts += [
        f"failed to launch {r.count} {r.ray_node_type_name or r.instance_type_name} node(s)"
        + (f": {r.details}" if r.details else "")
        for r in getattr(status, "failed_launches", [])
    ]
    return "autoscaler: " + ", ".join(parts) if parts else ""


def _autoscaler_status() -> Any:
    """The autoscaler's status from the GCS, or None where it cannot be read
    (no autoscaler v2 reporting, an older GCS): a message is never worth a failure."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        return get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
    except Exception:  # any failure only leaves the autoscaler out of the message
        return None


def _joined(cfg: JobConfig) -> bool:
    """Whether the job joins a cluster (``--address``, or a Ray job's RAY_ADDRESS), which an autoscaler may grow."""
    return cfg.address is not None or bool(os.environ.get("RAY_ADDRESS"))


def _more(more: int | None) -> str:
    return "no limit" if more is None else f"{more} more"


def _res(node: dict, name: str) -> float:
    return float(node.get("Resources", {}).get(name, 0) or 0)


def _live_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]
