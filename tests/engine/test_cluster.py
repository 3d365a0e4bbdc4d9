"""`segbatch submit` against a real two-node Ray cluster on this machine (issue 5).

The cluster is what `ray start` makes for users: a head node (GCS, dashboard
with the Jobs API, a raylet with 1 CPU) and a worker node (a second raylet
with 1 CPU and a ``worker_node`` resource), joined over TCP, with Ray's token
authentication on. Each node is a ``ray start --block`` process this module
owns, in its own session, so stopping one kills exactly that node's
processes (its raylet, agents and workers) and nothing of other Ray sessions
that other tests may run at the same time.

Every client (``segbatch submit``/``status``) gets ``RAY_AUTH_MODE=token``
and the cluster's token in ``RAY_AUTH_TOKEN``; ~/.ray/auth_token is left
alone. The model is torchvision's Mask R-CNN with seeded random weights at a
small input size, so a job takes seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest
from PIL import Image
from skimage import data as skdata

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]  # tests/engine/ -> the repository
FAST = ["--model", "random", "--score-threshold", "0", "--max-detections", "3", "--min-size", "64", "--max-size", "96"]
# a larger input: enough work that the actor started second still gets shards
# when the machine is busy (actors pull shards; a late one may find none left)
SLOWER = [*FAST[:-4], "--min-size", "128", "--max-size", "160"]
POOL = ["--workers", "2", "--cpus-per-worker", "1", "--shard-size", "2"]
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A head node and worker nodes, each a `ray start --block` process of ours
    with ``cpus`` logical CPUs (1 unless a test sizes its nodes)."""

    def __init__(self) -> None:
        # Ray's Unix sockets live under the temp dir and their paths must stay
        # under ~107 bytes: a short dir in /tmp, not pytest's deep tmp_path.
        self.temp_dir = tempfile.mkdtemp(prefix="sbray-", dir="/tmp")
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.procs: list[subprocess.Popen] = []
        self.head_id = ""
        self.workers: dict[str, subprocess.Popen] = {}  # node id -> its `ray start --block`

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, name: str, args: list[str], cpus: int = 1) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"{name}.log", "wb")
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            f"--node-name={name}",
            f"--num-cpus={cpus}",
            "--disable-usage-stats",
            # the agent's HTTP port is fixed (52365) by default: two nodes on one machine collide
            f"--dashboard-agent-listen-port={_free_port()}",
            *args,
        ]
        proc = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir
        )
        self.procs.append(proc)
        return proc

    def start_head(self, cpus: int = 1) -> None:
        proc = self._ray_start(
            "sb-head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                "--include-dashboard=true",
                f"--ray-client-server-port={_free_port()}",
            ],
            cpus,
        )
        self.head_id = self._wait_node("sb-head", proc)

    def start_worker(self, cpus: int = 1) -> str:
        name = f"sb-worker-{len(self.workers)}"
        proc = self._ray_start(name, [f"--address=127.0.0.1:{self.gcs_port}", '--resources={"worker_node": 1}'], cpus)
        node_id = self._wait_node(name, proc)
        self.workers[node_id] = proc
        return node_id

    def kill_node(self, node_id: str) -> None:
        """Lose a worker node at once: SIGKILL to its raylet, agents and workers.

        By process tree, not only by process group: Ray workers may leave the
        group of the `ray start` that spawned them, and a worker that outlives
        its raylet for a moment can still finish a shard.
        """
        root = psutil.Process(self.workers.pop(node_id).pid)
        procs = [root, *root.children(recursive=True)]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)

    def nodes(self) -> list[dict]:
        """The cluster's nodes, from the State API (authenticated with the token)."""
        req = urllib.request.Request(
            f"{self.dashboard}/api/v0/nodes?limit=100&detail=1",
            headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["data"]["result"]["result"]

    def _wait_node(self, name: str, proc: subprocess.Popen) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                alive = [n for n in self.nodes() if n["node_name"] == name and n["state"] == "ALIVE"]
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                alive = []
            if alive:
                return alive[0]["node_id"]
            time.sleep(0.5)
        log = (Path(self.temp_dir) / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"ray node {name} did not come up (exit {proc.poll()}):\n{log}")

    def stop(self) -> None:
        """Kill every process of this cluster, and only those."""
        for proc in self.procs:  # `ray start --block` stops its node's processes on SIGTERM
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # what is left: our sessions' processes, and any process naming our temp dir
        sessions = {proc.pid for proc in self.procs}
        for pid in _ours(sessions, self.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ours(sessions: set[int], marker: str) -> list[int]:
    """Processes in one of our sessions, or with ``marker`` in their command line."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            sid = int(stat.rsplit(")", 1)[1].split()[3])  # fields after the name: state ppid pgrp session
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if sid in sessions or marker in cmdline:
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.start_head()
        c.start_worker()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """16 small photographs (JPEG), each different."""
    root = tmp_path_factory.mktemp("cluster_images")
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    for i in range(16):
        p = photos[i % 4]
        img = Image.fromarray(p).resize((p.shape[1] // 4, p.shape[0] // 4)).rotate(7 * i)
        img.save(root / f"img{i:02d}.jpg", quality=90)
    return root


def _subset(images: Path, dest: Path, n: int) -> Path:
    dest.mkdir()
    for p in sorted(images.glob("*.jpg"))[:n]:
        shutil.copy(p, dest / p.name)
    return dest


def _segbatch(cluster: Cluster, *args: str, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "segbatch.cli", *args], env=cluster.env, capture_output=True, text=True, timeout=timeout
    )


def _commits(dest: Path) -> list[dict]:
    records = []
    for f in sorted(glob.glob(str(dest / "_segbatch" / "commits" / "*.json"))):
        try:
            records.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError):  # polled while being written
            continue
    return records


def _assert_exactly_once(dest: Path, src: Path) -> None:
    uris = pads.dataset(str(dest / "data"), format="parquet").to_table(columns=["uri", "status"]).to_pylist()
    expected = sorted(str(p) for p in src.glob("*.jpg"))
    assert sorted(r["uri"] for r in uris) == expected  # every image, exactly once
    assert {r["status"] for r in uris} == {"ok"}
    summary = json.loads((dest / "_segbatch" / "summary.json").read_text())
    assert summary["complete"] and summary["rows"] == len(expected)


def _out(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def test_submit_runs_the_job_on_both_nodes(cluster, images, tmp_path):
    src, dest = images, tmp_path / "out"
    proc = _segbatch(cluster, "submit", "--address", cluster.dashboard, str(src), str(dest), *SLOWER, *POOL)
    assert proc.returncode == 0, _out(proc)
    assert "progress: " in proc.stdout and "progress: 16/16 images" in proc.stdout, _out(
        proc
    )  # the job's log, streamed
    assert "SUCCEEDED" in proc.stderr
    _assert_exactly_once(dest, src)
    commits = _commits(dest)
    assert len(commits) == 8
    assert {c["node"] for c in commits} == {cluster.head_id, *cluster.workers}, (
        f"actors ran on both nodes\n{_out(proc)}"
    )


def test_submit_no_wait_then_status_and_follow(cluster, images, tmp_path):
    src, dest = _subset(images, tmp_path / "src", 6), tmp_path / "out"
    proc = _segbatch(
        cluster, "submit", "--no-wait", "--address", cluster.dashboard, str(src), str(dest), *FAST, *POOL, timeout=60
    )
    assert proc.returncode == 0, _out(proc)
    job_id = proc.stdout.strip()
    assert job_id and "\n" not in job_id and job_id in proc.stderr, _out(proc)

    status = _segbatch(cluster, "status", "--job", job_id, "--address", cluster.dashboard, timeout=60)
    assert status.returncode == 0, _out(status)
    assert status.stdout.startswith(f"job {job_id}: ")
    assert status.stdout.split()[2] in ("PENDING", "RUNNING", "SUCCEEDED"), _out(status)

    follow = _segbatch(cluster, "status", "--job", job_id, "--address", cluster.dashboard, "--follow")
    assert follow.returncode == 0, _out(follow)
    assert "progress: 6/6 images" in follow.stdout, _out(follow)
    assert f"job {job_id}: SUCCEEDED" in follow.stderr
    _assert_exactly_once(dest, src)

    final = _segbatch(cluster, "status", "--job", job_id, "--address", cluster.dashboard, timeout=60)
    assert final.returncode == 0 and final.stdout.startswith(f"job {job_id}: SUCCEEDED"), _out(final)
    assert "progress: 6/6 images" in final.stdout  # the last progress line of the job's log

    unknown = _segbatch(cluster, "status", "--job", "raysubmit_nosuchjob", "--address", cluster.dashboard, timeout=60)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr and "nosuchjob" in unknown.stderr, _out(
        unknown
    )


def test_client_with_a_wrong_token_gets_a_clear_error(cluster, images, tmp_path):
    env = {**cluster.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "segbatch.cli",
            "submit",
            "--address",
            cluster.dashboard,
            str(images),
            str(tmp_path / "o"),
            *FAST,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, _out(proc)
    assert "authentication" in proc.stderr.lower() and "RAY_AUTH_TOKEN" in proc.stderr, _out(proc)
    assert "not-the-token" not in proc.stderr + proc.stdout  # a token never reaches a message


def test_losing_a_worker_node_mid_job(cluster, images, tmp_path):
    """SIGKILL to the worker node while its actor works: the job still finishes, every image once."""
    dest = tmp_path / "out"
    (worker_id,) = cluster.workers
    cmd = [
        sys.executable,
        "-m",
        "segbatch.cli",
        "submit",
        "--address",
        cluster.dashboard,
        str(images),
        str(dest),
        *SLOWER,
        *POOL,
    ]
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(cmd, env=cluster.env, stdout=fo, stderr=fe, text=True)
        try:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while not any(c["node"] == worker_id for c in _commits(dest)):
                assert proc.poll() is None and time.monotonic() < deadline, "the worker node committed nothing"
                time.sleep(0.2)
            cluster.kill_node(worker_id)
            before = _commits(dest)
            by_worker = {json.dumps(c, sort_keys=True) for c in before if c["node"] == worker_id}
            assert len(before) < 8, "the job ended before the worker node could be lost"
            proc.wait(timeout=JOB_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())
    assert result.returncode == 0, _out(result)
    assert "worker died" in result.stdout, _out(result)  # the driver saw the actor go, and retried its shard
    assert "progress: 16/16 images" in result.stdout
    _assert_exactly_once(dest, images)
    commits = _commits(dest)
    assert len(commits) == 8
    assert {c["node"] for c in commits} == {cluster.head_id, worker_id}
    # nothing came from the dead node after it died; the head finished the rest
    assert {json.dumps(c, sort_keys=True) for c in commits if c["node"] == worker_id} == by_worker
