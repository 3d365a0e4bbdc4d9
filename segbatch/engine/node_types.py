"""The node types a cluster's autoscaler can add, so a pool is sized for the
nodes it will have, not only for those alive when the job starts.

A cluster scaled to zero workers has only its head when the job starts:
sized from the live nodes alone, a pool gets one small worker and the
autoscaler adds one node for it. Sized with the node types too, the pool
asks for as many workers as the nodes the autoscaler may add can host (at
most one a shard), each worker as big as such a node allows, and Ray's
autoscaler adds the nodes for the pending actors by itself.

Where the node types come from, first found wins:

1. ``--autoscaling-config FILE`` (any path or URL): the cluster config the
   autoscaler runs with, a Ray cluster-launcher YAML (``ray up``'s,
   ``available_node_types``) or a KubeRay RayCluster or RayJob manifest
   (``workerGroupSpecs``); the flag is named after ``ray start``'s.
2. The cluster config the autoscaler published in the GCS
   (``ray._private.state.state.get_cluster_config()``, read as Ray Data
   reads it); platforms that report one (``ReportClusterConfig``) fill it.
3. ``~/ray_bootstrap_config.yaml``: the config ``ray up`` leaves on the head,
   where a Ray Jobs entrypoint runs (Ray Tune checks the same file).

The parsers are pure functions over the parsed documents, tested without Ray.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segbatch.errors import UsageError

log = logging.getLogger(__name__)

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler can add, and how many more of it it may add.

    ``more`` is None where the config sets no limit (KubeRay's and the GCS's
    unlimited groups): the pool then asks for at most one worker a shard."""

    name: str
    cpus: float
    gpus: float
    more: int | None

    def as_node(self) -> dict[str, Any]:
        """One such node as a ``ray.nodes()`` record: the sizing rules read both alike."""
        return {
            "NodeID": f"(autoscaler) {self.name}",
            "Alive": True,
            "NodeManagerAddress": f"{self.name} (the autoscaler can add {_count_text(self.more)})",
            "Resources": {"CPU": self.cpus, "GPU": self.gpus},
        }


class AutoscalingConfigError(UsageError):
    """``--autoscaling-config`` names a file that is not a cluster config segbatch can read."""


def node_types_from_cluster_yaml(doc: dict[str, Any]) -> list[NodeType]:
    """The worker node types of a Ray cluster-launcher config (``ray up``'s YAML).

    ``max_workers`` (per type, and the cluster's over all types) bounds how
    many the autoscaler adds; the head type adds none. A type without its
    CPUs in ``resources`` is left out with a note: the autoscaler fills those
    from the instance type in the bootstrap config, not in the user's YAML.
    """
    head = doc.get("head_node_type")
    cluster_max = doc.get("max_workers")
    types = []
    for name, spec in (doc.get("available_node_types") or {}).items():
        if name == head:
            continue
        resources = spec.get("resources") or {}
        if "CPU" not in resources:
            log.info("node type %s: no CPU in its resources; sizing leaves it out", name)
            continue
        most = spec.get("max_workers", cluster_max)
        if most is not None and cluster_max is not None:
            most = min(most, cluster_max)
        if most == 0:
            continue
        types.append(NodeType(name, float(resources["CPU"]), float(resources.get("GPU", 0)), most))
    return types


def node_types_from_kuberay(doc: dict[str, Any]) -> list[NodeType]:
    """The worker groups of a KubeRay RayCluster, or of a RayJob's ``rayClusterSpec``.

    A group's CPUs and GPUs are what KubeRay tells Ray: ``rayStartParams``'
    ``num-cpus``/``num-gpus`` where set, else the Ray container's limits (or
    requests): ``cpu`` (``"3"``, ``"2500m"``) and ``nvidia.com/gpu``.
    ``maxReplicas`` bounds the group (KubeRay's default: unlimited).
    """
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or spec
    types = []
    for group in cluster.get("workerGroupSpecs") or []:
        params = group.get("rayStartParams") or {}
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        resources = containers[0].get("resources") or {}
        quantity = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
        cpus = _k8s_cpus(params.get("num-cpus", quantity.get("cpu", 0)))
        gpus = float(params.get("num-gpus", quantity.get("nvidia.com/gpu", 0)))
        most = group.get("maxReplicas")
        if most == 0:
            continue
        types.append(NodeType(group.get("groupName", "workers"), cpus, gpus, most))
    return types


def node_types_from_gcs(config: Any) -> list[NodeType]:
    """The node groups of the autoscaler's ``ClusterConfig`` (``autoscaler_pb2``) as the GCS holds it.

    ``max_count`` -1 is unlimited; a group with 0 adds nothing.
    """
    types = []
    for group in getattr(config, "node_group_configs", []):
        resources = dict(group.resources)
        if group.max_count == 0 or not resources.get("CPU"):
            continue
        most = None if group.max_count < 0 else group.max_count
        types.append(NodeType(group.name, float(resources["CPU"]), float(resources.get("GPU", 0)), most))
    return types


def parse_autoscaling_config(doc: Any, where: str) -> list[NodeType]:
    """The node types of a cluster config of either kind (see the module docstring)."""
    if not isinstance(doc, dict):
        raise AutoscalingConfigError(f"--autoscaling-config {where}: not a YAML or JSON mapping")
    if doc.get("kind") in ("RayCluster", "RayJob"):
        return node_types_from_kuberay(doc)
    if "available_node_types" in doc:
        return node_types_from_cluster_yaml(doc)
    raise AutoscalingConfigError(
        f"--autoscaling-config {where}: neither a Ray cluster config (available_node_types) nor a KubeRay "
        "RayCluster or RayJob; give the file you ran `ray up` with, or your RayCluster manifest"
    )


def read_autoscaling_config(url: str, storage) -> list[NodeType]:
    """``parse_autoscaling_config`` of a file or URL, read through ``storage`` (``Storage``)."""
    import yaml

    try:
        text = storage.read_bytes(url).decode()
    except FileNotFoundError as exc:
        raise AutoscalingConfigError(f"--autoscaling-config {url}: no such file") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AutoscalingConfigError(f"--autoscaling-config {url}: not YAML or JSON ({exc})") from exc
    return parse_autoscaling_config(doc, url)


def discover_node_types(config_url: str | None, storage) -> tuple[list[NodeType], str]:
    """The node types the autoscaler can add, and where they were read from ("" where nowhere)."""
    if config_url:
        return read_autoscaling_config(config_url, storage), config_url
    published = _gcs_cluster_config()
    if published is not None:
        return node_types_from_gcs(published), "the cluster config in the GCS"
    bootstrap = Path(BOOTSTRAP_CONFIG).expanduser()
    if bootstrap.is_file():
        import yaml

        return parse_autoscaling_config(yaml.safe_load(bootstrap.read_text()), str(bootstrap)), str(bootstrap)
    return [], ""


def still_addable(types: Iterable[NodeType], launched: dict[str, int]) -> list[NodeType]:
    """The types with how many more of each the autoscaler may add: its limit less
    the nodes of that type it has launched already (``launched``, by type name,
    from its status: alive, pending or being launched). A type at its limit goes."""
    left = []
    for t in types:
        more = None if t.more is None else t.more - launched.get(t.name, 0)
        if more is None or more > 0:
            left.append(NodeType(t.name, t.cpus, t.gpus, more))
    return left


def launched_by_type(status: Any) -> dict[str, int]:
    """Nodes the autoscaler has of each type, from its ``ClusterStatus`` (v2): {} without one."""
    if status is None:
        return {}
    counts: dict[str, int] = {}
    for n in [*status.active_nodes, *status.idle_nodes, *status.pending_nodes]:
        counts[n.ray_node_type_name] = counts.get(n.ray_node_type_name, 0) + 1
    for r in status.pending_launches:
        counts[r.ray_node_type_name] = counts.get(r.ray_node_type_name, 0) + r.count
    return counts


def _k8s_cpus(quantity: Any) -> float:
    """A Kubernetes CPU quantity ("3", "2500m", 2) in CPUs, rounded up as KubeRay tells Ray (``Quantity.Value()``)."""
    text = str(quantity).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", text)
    if not m:
        return 0.0
    value = float(m.group(1)) / (1000 if m.group(2) else 1)
    return float(math.ceil(value))


def _count_text(more: int | None) -> str:
    return "any number" if more is None else f"{more} more"


def _gcs_cluster_config() -> Any:
    """The ClusterConfig in the GCS, or None (none published, or not readable from this Ray)."""
    try:
        import ray._private.state

        return ray._private.state.state.get_cluster_config()
    except Exception:  # a private API: when it moves, sizing falls back to the other sources
        return None
