"""The node types an autoscaler can add (issue 14), read from each kind of
cluster config segbatch meets: the repository's own ``ray_cluster.yaml`` and
KubeRay manifests, a RayCluster in the GCS's form, and Ray's own status."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler.v2.schema import ClusterStatus, LaunchRequest, NodeInfo
from ray.core.generated import autoscaler_pb2

from segbatch.engine.node_types import (
    AutoscalingConfigError,
    NodeType,
    discover_node_types,
    launched_by_type,
    node_types_from_cluster_yaml,
    node_types_from_gcs,
    node_types_from_kuberay,
    parse_autoscaling_config,
    read_autoscaling_config,
    still_addable,
)
from segbatch.errors import UsageError
from segbatch.storage import Storage

REPO = Path(__file__).resolve().parents[2]


def test_the_repositorys_ray_up_config_gives_its_gpu_workers():
    doc = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    # the head type and gpu_spot (max_workers 0) add nothing
    assert node_types_from_cluster_yaml(doc) == [NodeType("gpu", 4.0, 1.0, 8)]
    assert parse_autoscaling_config(doc, "ray_cluster.yaml") == [NodeType("gpu", 4.0, 1.0, 8)]


def test_a_cluster_yaml_caps_each_type_by_the_clusters_max_workers_and_skips_types_without_cpus():
    doc = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 2}},
            "big": {"max_workers": 10, "resources": {"CPU": 16}},
            "filled_by_aws": {"max_workers": 2, "node_config": {"InstanceType": "m5.large"}},
            "default_max": {"resources": {"CPU": 2}},
        },
    }
    assert node_types_from_cluster_yaml(doc) == [NodeType("big", 16.0, 0.0, 3), NodeType("default_max", 2.0, 0.0, 3)]


def test_the_repositorys_kuberay_manifests_give_their_worker_groups():
    for name in ("rayjob.yaml", "raycluster.yaml"):
        docs = [d for d in yaml.safe_load_all((REPO / "infra/kuberay" / name).read_text()) if d]
        ray_docs = [d for d in docs if d.get("kind") in ("RayJob", "RayCluster")]
        assert ray_docs, name
        types = parse_autoscaling_config(ray_docs[0], name)
        assert types == [NodeType("gpu", 3.0, 1.0, 8)], name  # limits cpu "3", nvidia.com/gpu 1, maxReplicas 8


def test_kuberay_ray_start_params_win_and_cpu_quantities_round_up_as_kuberay_does():
    group = {
        "groupName": "cpu",
        "rayStartParams": {},
        "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "2500m"}}}]}},
    }
    doc = {"kind": "RayCluster", "spec": {"workerGroupSpecs": [group]}}
    assert node_types_from_kuberay(doc) == [NodeType("cpu", 3.0, 0.0, None)]  # no maxReplicas: unlimited
    group["rayStartParams"] = {"num-cpus": "2"}
    group["maxReplicas"] = 5
    assert node_types_from_kuberay(doc) == [NodeType("cpu", 2.0, 0.0, 5)]


def test_the_gcs_cluster_config_gives_its_node_groups():
    config = autoscaler_pb2.ClusterConfig(
        node_group_configs=[
            autoscaler_pb2.NodeGroupConfig(name="cpu4", resources={"CPU": 4}, min_count=0, max_count=3),
            autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, max_count=-1),
            autoscaler_pb2.NodeGroupConfig(name="off", resources={"CPU": 4}, max_count=0),
        ]
    )
    assert node_types_from_gcs(config) == [NodeType("cpu4", 4.0, 0.0, 3), NodeType("gpu", 8.0, 1.0, None)]


def test_nodes_already_launched_count_against_each_types_limit():
    status = ClusterStatus(
        active_nodes=[NodeInfo("", "cpu2", "i-1", "10.0.0.1")],
        idle_nodes=[NodeInfo("", "head", "i-0", "10.0.0.0")],
        pending_nodes=[NodeInfo("", "cpu2", "i-2", "")],
        pending_launches=[LaunchRequest("", "gpu", 2, LaunchRequest.Status.PENDING, request_ts_s=0)],
    )
    launched = launched_by_type(status)
    assert launched == {"cpu2": 2, "head": 1, "gpu": 2}
    types = [NodeType("cpu2", 2, 0, 3), NodeType("gpu", 4, 1, 2), NodeType("any", 2, 0, None)]
    assert still_addable(types, launched) == [NodeType("cpu2", 2, 0, 1), NodeType("any", 2, 0, None)]
    assert launched_by_type(None) == {}


def test_a_file_that_is_no_cluster_config_is_refused_naming_what_to_give(tmp_path):
    storage = Storage()
    (tmp_path / "job.yaml").write_text("model: coco\n")
    with pytest.raises(AutoscalingConfigError, match=r"neither a Ray cluster config.*`ray up`.*RayCluster") as e:
        read_autoscaling_config(str(tmp_path / "job.yaml"), storage)
    assert isinstance(e.value, UsageError)
    with pytest.raises(AutoscalingConfigError, match="no such file"):
        read_autoscaling_config(str(tmp_path / "missing.yaml"), storage)


def test_discovery_reads_the_given_config_then_the_heads_ray_up_config(tmp_path, monkeypatch):
    storage = Storage()
    monkeypatch.setenv("HOME", str(tmp_path))  # no Ray connected: the GCS has nothing to give
    assert discover_node_types(None, storage) == ([], "")
    bootstrap = {"head_node_type": "h", "available_node_types": {"w": {"max_workers": 2, "resources": {"CPU": 2}}}}
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(bootstrap))
    types, where = discover_node_types(None, storage)
    assert types == [NodeType("w", 2.0, 0.0, 2)] and where.endswith("ray_bootstrap_config.yaml")
    types, where = discover_node_types(str(REPO / "ray_cluster.yaml"), storage)  # the flag wins
    assert types == [NodeType("gpu", 4.0, 1.0, 8)] and where.endswith("ray_cluster.yaml")


@pytest.mark.slow
def test_a_cluster_config_published_in_the_gcs_is_read_from_a_real_ray(ray_local, tmp_path, monkeypatch):
    """Where a platform reports its cluster config to the GCS, the driver reads
    it there (the key Ray Data reads it from): written here as the GCS stores it."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    monkeypatch.setenv("HOME", str(tmp_path))
    config = autoscaler_pb2.ClusterConfig(
        node_group_configs=[autoscaler_pb2.NodeGroupConfig(name="cpu4", resources={"CPU": 4}, max_count=3)]
    )
    key = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode()
    namespace = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    _internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        found = discover_node_types(None, Storage())
        assert found == ([NodeType("cpu4", 4.0, 0.0, 3)], "the cluster config in the GCS")
    finally:
        _internal_kv_del(key, namespace=namespace)
