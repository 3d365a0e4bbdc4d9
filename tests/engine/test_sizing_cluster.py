"""Default pool sizing on real multi-node loopback clusters of small nodes (issue 14),
and on a cluster whose real Ray autoscaler (v2) adds the nodes.

On two nodes of 2 CPUs each a CPU worker used to ask for the cluster's 4
CPUs, which no node has: no worker ever started and the job failed after
--startup-timeout. Here each test starts its own cluster of sized nodes
(``Cluster`` of test_cluster.py, `ray start` processes of ours) and runs a
job with no --cpus-per-worker and no --workers: it must finish, every image
once, with a worker ready on every node (the pool logs each one's node)
and nothing committed from elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator

import pytest
from test_cluster import (
    SLOWER,
    Cluster,
    _assert_exactly_once,
    _commits,
    _out,
    _segbatch,
    images,  # noqa: F401 (a fixture: 16 small photographs)
)

pytestmark = pytest.mark.slow

# no pool options: sizing is the cluster's; a shorter wait than the default 300 s if it is wrong again
DEFAULT_POOL = ["--device", "cpu", "--shard-size", "1", "--startup-timeout", "120"]


# Ray's own test provider (tests/autoscaling_provider.py): each node it "launches" is a real raylet on this machine
FAKE_PROVIDER = "tests.autoscaling_provider.Provider"
FAKE_HEAD_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the id that provider gives its head


def _ready_nodes(proc) -> set[str]:
    """The nodes (first 8 characters of their ids) the pool saw a worker become ready on."""
    return set(re.findall(r"worker ready on node (\w{8})", proc.stdout + proc.stderr))


@contextlib.contextmanager
def _cluster(head_cpus: int, *worker_cpus: int) -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start_head(head_cpus)
        for cpus in worker_cpus:
            c.start_worker(cpus)
        yield c
    finally:
        c.stop()


def test_submit_on_two_2cpu_nodes_with_default_sizing(images, tmp_path):  # noqa: F811
    src, dest = images, tmp_path / "out"
    with _cluster(2, 2) as cluster:
        proc = _segbatch(cluster, "submit", "--address", cluster.dashboard, str(src), str(dest), *SLOWER, *DEFAULT_POOL)
        nodes = {cluster.head_id, *cluster.workers}
    assert proc.returncode == 0, _out(proc)
    assert "pool: 2 workers x (2.0 CPU, 0.0 GPU)" in proc.stdout + proc.stderr, _out(proc)  # one worker a node
    assert "progress: 16/16 images" in proc.stdout, _out(proc)
    _assert_exactly_once(dest, src)
    assert _ready_nodes(proc) == {n[:8] for n in nodes}, f"a worker on each node\n{_out(proc)}"
    assert {c["node"] for c in _commits(dest)} <= nodes


def test_run_on_nodes_of_2_and_4_cpus_uses_both(images, tmp_path):  # noqa: F811
    src, dest = images, tmp_path / "out"
    with _cluster(2, 4) as cluster:
        address = f"127.0.0.1:{cluster.gcs_port}"
        proc = _segbatch(cluster, "run", "--address", address, str(src), str(dest), *SLOWER, *DEFAULT_POOL)
        nodes = {cluster.head_id, *cluster.workers}
    assert proc.returncode == 0, _out(proc)
    assert "pool: 3 workers x (2.0 CPU, 0.0 GPU)" in proc.stdout + proc.stderr, _out(proc)  # 1 + 2
    _assert_exactly_once(dest, src)
    assert _ready_nodes(proc) == {n[:8] for n in nodes}, f"a worker on each node\n{_out(proc)}"
    assert {c["node"] for c in _commits(dest)} <= nodes


class AutoscalingCluster(Cluster):
    """A head of 0 CPUs whose Ray autoscaler (v2, Ray's fake multi-node provider)
    adds worker nodes of the given types for pending actors, on this machine.

    The provider's defaults file is not in Ray's wheel, so it is named as an
    ``external`` provider module; the head gets the node id it expects."""

    head_args: list[str] = []

    def _ray_start(self, name: str, args: list[str], cpus: int = 1):
        return super()._ray_start(name, [*args, *self.head_args] if "--head" in args else args, cpus)

    def start(self, worker_types: dict[str, dict]) -> str:
        config = {
            "cluster_name": "segbatch-autoscaling",
            "max_workers": 4,
            "idle_timeout_minutes": 5,
            "upscaling_speed": 1.0,
            "provider": {
                "type": "external",
                "module": FAKE_PROVIDER,
                "launch_multiple": True,
                "head_node_id": FAKE_HEAD_ID,
                "gcs_address": f"127.0.0.1:{self.gcs_port}",
            },
            "auth": {"ssh_user": "ray"},
            # the cluster launcher's keys the autoscaler reads, here with nothing to run
            **{k: [] for k in ("setup_commands", "head_setup_commands", "worker_setup_commands")},
            **{k: [] for k in ("initialization_commands", "head_start_ray_commands", "worker_start_ray_commands")},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "head_node_type": "ray.head.default",
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                **worker_types,
            },
        }
        path = f"{self.temp_dir}/autoscaling.json"
        with open(path, "w") as f:
            json.dump(config, f)
        cluster_env = self.env
        self.env = {
            **cluster_env,
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_ID,
        }
        self.head_args = [f"--autoscaling-config={path}"]
        try:
            self.start_head(0)
        finally:
            self.env = cluster_env  # the driver's env: no fake node ids
        return path


def test_a_cluster_scaled_to_zero_gets_workers_sized_for_the_nodes_its_autoscaler_adds(images, tmp_path):  # noqa: F811
    """A head of 0 CPUs, and an autoscaler that can add two 2-CPU nodes: sized
    from the live nodes alone the pool was one 1-CPU worker; sized with the
    config the autoscaler runs with, it is a 2-CPU worker for each node to
    come, the autoscaler adds both for the pending actors, and both work."""
    src, dest = images, tmp_path / "out"
    cluster = AutoscalingCluster()
    try:
        cpu2 = {"resources": {"CPU": 2, "memory": 8 << 30}, "node_config": {}, "min_workers": 0, "max_workers": 2}
        config = cluster.start({"cpu2": cpu2})
        address = f"127.0.0.1:{cluster.gcs_port}"
        proc = _segbatch(
            cluster, "run", "--address", address, "--autoscaling-config", config, str(src), str(dest),
            *SLOWER, *DEFAULT_POOL,
        )  # fmt: skip
        added = {n["node_id"] for n in cluster.nodes() if n["node_id"] != cluster.head_id and n["state"] == "ALIVE"}
    finally:
        cluster.stop()
    out = _out(proc)
    assert proc.returncode == 0, out
    assert "the autoscaler can add (from " in out and "cpu2 nodes of 2 CPU, 0 GPU: 2 more" in out, out
    assert "pool: 2 workers x (2.0 CPU, 0.0 GPU)" in out, out  # was 1 worker x 1 CPU
    assert "2 of the 2 workers wait for nodes the autoscaler adds" in out, out
    _assert_exactly_once(dest, src)
    assert len(added) == 2, f"the autoscaler added a node for each worker\n{out}"
    assert _ready_nodes(proc) == {n[:8] for n in added}, f"a worker on each added node\n{out}"
    assert {c["node"] for c in _commits(dest)} <= added
