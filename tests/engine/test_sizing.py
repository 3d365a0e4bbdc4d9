"""Pool sizing from the nodes (issue 14), without Ray: the rules of
``segbatch.engine.sizing`` over node records shaped as ``ray.nodes()`` returns them.

The bug these pin: on two 2-CPU nodes a CPU worker asked for the cluster's
4 CPUs, which no node has, so no worker ever started.
"""

from __future__ import annotations

import logging

import pytest
from ray.autoscaler.v2.schema import ClusterStatus, LaunchRequest, NodeInfo

from segbatch.config import JobConfig, ModelConfig
from segbatch.engine.node_types import NodeType
from segbatch.engine.policy import JobError
from segbatch.engine.sizing import (
    PoolShape,
    check_fits,
    hosts,
    pending_text,
    size_pool,
)
from segbatch.storage import Storage


def _node(i: int, cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    """A node record as ``ray.nodes()`` gives it (the fields sizing reads, and a few more)."""
    ip = f"10.0.0.{i}"
    resources = {"CPU": float(cpus), "memory": 8e9, "object_store_memory": 2e9, f"node:{ip}": 1.0}
    if gpus:
        resources["GPU"] = float(gpus)
    return {"NodeID": f"{i:056x}", "Alive": alive, "NodeManagerAddress": ip, "Resources": resources}


def _cfg(device: str = "cpu", **kw) -> JobConfig:
    return JobConfig(source="in/", dest="out/", model=ModelConfig(device=device), **kw)


def _fits_every_node(shape: PoolShape, nodes: list[dict]) -> bool:
    return all(hosts(n, shape.cpus, shape.gpus) >= 1 for n in nodes)


def test_two_2cpu_nodes_a_cpu_worker_fits_one_node():
    nodes = [_node(1, 2), _node(2, 2)]
    shape = size_pool(_cfg(workers=2), nodes)
    assert shape == PoolShape(2.0, 0.0, 2)  # was 4 CPU: the cluster's total, which no node has
    assert _fits_every_node(shape, nodes)
    assert size_pool(_cfg(), nodes) == PoolShape(2.0, 0.0, 2)  # default --workers: one a node


def test_nodes_of_2_and_4_cpus_are_both_used():
    nodes = [_node(1, 2), _node(2, 4)]
    shape = size_pool(_cfg(), nodes)
    assert shape == PoolShape(2.0, 0.0, 3)  # 1 worker on the small node, 2 on the big one
    assert [hosts(n, shape.cpus, shape.gpus) for n in nodes] == [1, 2]


def test_a_head_without_cpus_hosts_no_worker_and_does_not_shrink_them():
    nodes = [_node(1, 0), _node(2, 2), _node(3, 2)]  # a head started with --num-cpus 0
    assert size_pool(_cfg(), nodes) == PoolShape(2.0, 0.0, 2)


def test_mixed_cluster_gpu_workers_go_to_gpu_nodes_with_their_share_of_its_cpus():
    nodes = [_node(1, 16, gpus=2), _node(2, 4), _node(3, 4)]
    shape = size_pool(_cfg(device="auto"), nodes)
    assert shape == PoolShape(8.0, 1.0, 2)  # 16 CPU / 2 GPU beside each GPU; CPU-only nodes host none
    assert [hosts(n, shape.cpus, shape.gpus) for n in nodes] == [2, 0, 0]
    # --device cpu: CPU workers of the smallest node's size fill the CPU nodes (and the GPU node's CPUs)
    cpu = size_pool(_cfg(device="cpu"), nodes)
    assert cpu == PoolShape(4.0, 0.0, 6)
    assert [hosts(n, cpu.cpus, cpu.gpus) for n in nodes] == [4, 1, 1]


def test_leanest_gpu_node_sets_the_cpus_beside_a_gpu():
    nodes = [_node(1, 8, gpus=4), _node(2, 32, gpus=2), _node(3, 2)]
    assert size_pool(_cfg(device="cuda"), nodes) == PoolShape(2.0, 1.0, 6)  # 8/4 beside a GPU: 4 + 2 workers
    half = size_pool(_cfg(device="cuda", gpus_per_worker=0.5), [_node(1, 8, gpus=1)])
    assert half == PoolShape(4.0, 0.5, 2)


def test_a_single_big_node_is_sized_as_before():
    assert size_pool(_cfg(), [_node(1, 32)]) == PoolShape(4.0, 0.0, 8)
    assert size_pool(_cfg(device="auto"), [_node(1, 2)]) == PoolShape(2.0, 0.0, 1)  # no GPU: CPU workers
    assert size_pool(_cfg(device="auto"), [_node(1, 64, gpus=4)]) == PoolShape(8.0, 1.0, 4)
    assert size_pool(_cfg(device="auto"), [_node(1, 4, gpus=8)]) == PoolShape(1.0, 1.0, 4)  # CPUs bound it


def test_no_live_nodes_gives_one_small_worker():
    assert size_pool(_cfg(), []) == PoolShape(1.0, 0.0, 1)  # an autoscaler scaled to zero adds a node for it
    assert size_pool(_cfg(device="cuda"), []) == PoolShape(1.0, 1.0, 1)


def test_explicit_sizes_are_the_users_choice():
    nodes = [_node(1, 2), _node(2, 4)]
    assert size_pool(_cfg(cpus_per_worker=1, workers=5), nodes) == PoolShape(1.0, 0.0, 5)
    assert size_pool(_cfg(cpus_per_worker=3), nodes) == PoolShape(3.0, 0.0, 1)  # only the 4-CPU node hosts one


def test_a_worker_no_node_can_host_is_refused_per_node_naming_the_fix(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nodes = [_node(1, 2), _node(2, 2)]  # 4 CPUs in all, but a worker lives on one node
    with pytest.raises(JobError, match=r"3 CPU and 0 GPU.*10\.0\.0\.1: 2 CPU.*10\.0\.0\.2: 2 CPU.*--cpus-per-worker"):
        check_fits(_cfg(cpus_per_worker=3), 3, 0, nodes)
    with pytest.raises(JobError, match=r"1 GPU.*0 GPU.*--gpus-per-worker.*--device cpu"):
        check_fits(_cfg(device="cuda"), 1, 1, nodes)
    check_fits(_cfg(), 2, 0, nodes)  # fits: nothing raised


def test_joining_a_cluster_an_unhostable_worker_waits_for_an_autoscaler_and_says_so(monkeypatch, caplog):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    caplog.set_level(logging.WARNING, logger="segbatch.engine.sizing")
    check_fits(_cfg(cpus_per_worker=3, address="127.0.0.1:6379"), 3, 0, [_node(1, 2)])
    assert "no node of this cluster has that" in caplog.text and "--startup-timeout" in caplog.text


def test_pending_text_says_what_is_pending_and_why():
    nodes = [_node(1, 2), _node(2, 2)]
    busy = pending_text(2, 0, nodes, {"CPU": 0.0})
    assert "needs 2 CPU and 0 GPU on one node" in busy and "0 CPU and 0 GPU free now" in busy
    assert "Other jobs may hold them" in busy and "autoscaler:" not in busy
    too_big = pending_text(3, 0, nodes, {"CPU": 4.0})
    assert "No node is big enough for one" in too_big and "--cpus-per-worker" in too_big
    status = ClusterStatus(
        pending_launches=[
            LaunchRequest("m5.xlarge", "cpu-4", 2, LaunchRequest.Status.PENDING, request_ts_s=0),
        ],
        pending_nodes=[NodeInfo("m5.xlarge", "cpu-4", "i-1", "10.0.0.9", node_status="RAY_INSTALLING")],
        failed_launches=[
            LaunchRequest("p3.2xlarge", "gpu", 1, LaunchRequest.Status.FAILED, 0, details="quota exceeded"),
        ],
    )
    scaling = pending_text(3, 0, nodes, {"CPU": 4.0}, status)
    assert scaling.endswith(
        "autoscaler: launching 2 cpu-4 node(s), node cpu-4 10.0.0.9 RAY_INSTALLING, "
        "failed to launch 1 gpu node(s): quota exceeded"
    )
    assert "autoscaler:" not in pending_text(2, 0, nodes, {}, ClusterStatus())  # it reports nothing


@pytest.mark.slow
def test_pool_shape_and_pending_reason_read_a_real_ray(ray_local, monkeypatch):
    """The same rules fed by Ray's own view (a local Ray of 2 CPUs), and the
    autoscaler's status read from its GCS without failing where none reports."""
    from segbatch.engine.sizing import pending_reason, pool_shape

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    storage = Storage()
    assert pool_shape(_cfg(), storage) == PoolShape(2.0, 0.0, 1)
    with pytest.raises(JobError, match=r"each worker asks for 3 CPU.*2 CPU, 0 GPU"):
        pool_shape(_cfg(cpus_per_worker=3), storage)
    reason = pending_reason(3, 0)
    assert reason.startswith("each worker needs 3 CPU and 0 GPU on one node") and "No node is big enough" in reason


# -- with an autoscaler: the node types it can still add count beside the live nodes


def test_a_cluster_scaled_to_zero_is_sized_for_the_nodes_its_autoscaler_adds():
    head = [_node(1, 0)]  # a head of 0 CPUs: it hosts no worker
    cpu2 = [NodeType("cpu2", 2, 0, more=2)]
    assert size_pool(_cfg(), head) == PoolShape(1.0, 0.0, 1)  # before: one 1-CPU worker
    assert size_pool(_cfg(), head, cpu2) == PoolShape(2.0, 0.0, 2)  # a worker a 2-CPU node, 2 nodes to come
    assert size_pool(_cfg(), head, cpu2, most=1) == PoolShape(2.0, 0.0, 1)  # one shard: one worker, one node


def test_live_and_addable_nodes_together_and_the_smallest_sets_a_workers_size():
    nodes = [_node(1, 4)]
    assert size_pool(_cfg(), nodes, [NodeType("cpu8", 8, 0, more=3)]) == PoolShape(4.0, 0.0, 1 + 2 * 3)
    assert size_pool(_cfg(), nodes, [NodeType("cpu2", 2, 0, more=3)]) == PoolShape(2.0, 0.0, 2 + 3)


def test_gpu_workers_are_sized_for_gpu_node_types_the_autoscaler_adds():
    head = [_node(1, 8)]  # a CPU-only head with room for CPU workers
    gpu = [NodeType("g5.xlarge", 4, 1, more=8)]
    assert size_pool(_cfg(device="auto"), head, gpu) == PoolShape(4.0, 1.0, 8)  # GPU workers, 4 CPUs each
    assert size_pool(_cfg(device="cpu"), head, gpu) == PoolShape(4.0, 0.0, 2 + 8)  # --device cpu: every node


def test_an_unlimited_node_type_gives_a_worker_a_shard():
    unlimited = [NodeType("workers", 2, 0, more=None)]
    assert size_pool(_cfg(), [_node(1, 0)], unlimited, most=12) == PoolShape(2.0, 0.0, 12)
    assert size_pool(_cfg(), [_node(1, 0)], unlimited) == PoolShape(2.0, 0.0, 1)


def test_the_users_workers_are_kept_and_the_shards_cap_only_the_default():
    nodes = [_node(1, 2), _node(2, 2)]
    assert size_pool(_cfg(), nodes, most=1) == PoolShape(2.0, 0.0, 1)
    assert size_pool(_cfg(workers=5), nodes, most=1) == PoolShape(2.0, 0.0, 5)


def test_an_addable_node_type_that_can_host_a_worker_is_not_refused(monkeypatch, caplog):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    caplog.set_level(logging.WARNING, logger="segbatch.engine.sizing")
    check_fits(_cfg(address="127.0.0.1:6379"), 2, 0, [_node(1, 0), NodeType("cpu2", 2, 0, 2).as_node()])
    assert caplog.text == ""  # no "waiting for an autoscaler" warning: a node it can add hosts one
