"""Default pool sizing on real multi-node loopback clusters of small nodes (issue 14).

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
