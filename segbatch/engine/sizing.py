"""The cluster: joining (or starting) Ray, how big each worker is, how many
there are, and whether the cluster can hold them.

Read from Ray's view of the cluster when the pool starts; a worker no node
of a Ray started here could ever host is refused at once, naming the options
that fix it. Joining a cluster, an autoscaler may still add the nodes: the
startup guard (``policy.StartupGuard``) then says why nothing starts, with
``pending_reason``.
"""

from __future__ import annotations

import os

import ray

from segbatch.config import JobConfig

from .policy import JobError


def ensure_ray(cfg: JobConfig) -> None:
    """Join the cluster ``--address`` names (or a Ray job's), or start a local Ray, unless Ray runs already."""
    if ray.is_initialized():
        return
    # address None: join the cluster of a Ray job (RAY_ADDRESS) or start one locally.
    # "local", not None: ray.init(None) would join whatever `ray start` cluster
    # this machine last ran, which check_fits (and the contract) take as local.
    address = cfg.address or (None if os.environ.get("RAY_ADDRESS") else "local")
    ray.init(address=address, log_to_driver=True, configure_logging=False)


def pool_shape(cfg: JobConfig) -> tuple[float, float, int]:
    """(CPUs per worker, GPUs per worker, number of workers) for this cluster."""
    resources = ray.cluster_resources()
    total_cpus = resources.get("CPU", 0)
    total_gpus = resources.get("GPU", 0)
    use_gpu = cfg.model.device != "cpu" and cfg.gpus_per_worker > 0 and (total_gpus > 0 or cfg.model.device == "cuda")
    if use_gpu:
        num_gpus = cfg.gpus_per_worker
        num_cpus = cfg.cpus_per_worker or cpus_beside_a_gpu(num_gpus)
        size = cfg.workers or max(1, int(total_gpus // num_gpus))
    else:
        num_gpus = 0
        num_cpus = cfg.cpus_per_worker or max(1, min(4, int(total_cpus)))
        size = cfg.workers or max(1, int(total_cpus // num_cpus))
    check_fits(cfg, num_cpus, num_gpus)
    return num_cpus, num_gpus, size


def cpus_beside_a_gpu(gpus_per_worker: float) -> float:
    """CPUs for a GPU worker: its share of the leanest GPU node's CPUs, 1 to 8.

    A GPU worker reads, decodes and encodes on CPUs while the GPU runs the
    model (about 30 ms of CPU an image beside a few ms of GPU): one CPU would
    starve the GPU, and the node's share leaves room for its other workers.
    """
    shares = [
        n["Resources"]["CPU"] / n["Resources"]["GPU"] * gpus_per_worker
        for n in ray.nodes()
        if n.get("Alive") and n["Resources"].get("GPU", 0) > 0 and n["Resources"].get("CPU", 0) > 0
    ]
    return float(max(1, min(8, int(min(shares))))) if shares else 1.0


def check_fits(cfg: JobConfig, num_cpus: float, num_gpus: float) -> None:
    """Refuse at once a worker no node of a local Ray could ever host."""
    nodes = _live_nodes()
    fits = any(n["Resources"].get("CPU", 0) >= num_cpus and n["Resources"].get("GPU", 0) >= num_gpus for n in nodes)
    # Joining a cluster (--address, or a Ray job's RAY_ADDRESS), an autoscaler
    # may add the nodes: wait up to --startup-timeout, saying why. A Ray
    # started here for this job will never grow: refuse at once.
    joined = cfg.address is not None or bool(os.environ.get("RAY_ADDRESS"))
    if not fits and not joined:
        raise JobError(
            f"each worker asks for {num_cpus:g} CPU and {num_gpus:g} GPU, but no node of this cluster has that "
            f"({nodes_text(nodes)}). Lower --cpus-per-worker/--gpus-per-worker, use --device cpu, "
            "or add nodes that have them"
        )


def nodes_text(nodes: list[dict]) -> str:
    """Each node's address and its CPUs and GPUs, for a message."""
    return (
        "; ".join(
            f"node {n['NodeManagerAddress']}: "
            f"{n['Resources'].get('CPU', 0):g} CPU, {n['Resources'].get('GPU', 0):g} GPU"
            for n in nodes
        )
        or "no live nodes"
    )


def pending_reason(num_cpus: float, num_gpus: float) -> str:
    """Why a worker (or task) of ``num_cpus`` and ``num_gpus`` may not be placed: what the cluster has free now."""
    avail = ray.available_resources()
    return (
        f"each worker needs {num_cpus:g} CPU and {num_gpus:g} GPU; the cluster has "
        f"{avail.get('CPU', 0):g} CPU and {avail.get('GPU', 0):g} GPU free now "
        f"({nodes_text(_live_nodes())}). Other jobs may hold them, "
        "or an autoscaler is still adding nodes"
    )


def _live_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]
