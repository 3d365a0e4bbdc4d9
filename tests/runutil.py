"""Running segbatch from tests: the command line in a subprocess with a Ray of
its own (a private RAY_TMPDIR, so it never joins another Ray on this
machine, its logs can be searched, and its processes are found by session
id and reaped when a test kills the driver), the fast random model's
options, small PNGs, and the SegmentWorker actors alive in a Ray session.

Shared by the engine's tests (``tests/engine/test_engine.py``) and others
(test_faults, test_secrets, test_errors), which import it by plain name.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

FAST_MODEL = dict(model="random", seed=5, score_threshold=0.0, max_detections=3, min_size=64, max_size=96)
FAST_ARGS = [
    "--model",
    "random",
    "--seed",
    "5",
    "--score-threshold",
    "0",
    "--max-detections",
    "3",
    "--min-size",
    "64",
    "--max-size",
    "96",
    "--progress",
    "lines",
]
SEGBATCH = [sys.executable, "-m", "segbatch.cli"]


def _png(seed: int, size: tuple[int, int] = (64, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """A short, private RAY_TMPDIR (Ray's socket paths must stay under 107 bytes)."""
    d = tempfile.mkdtemp(prefix="sbt", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _cli_env(ray_tmp: str) -> dict[str, str]:
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # the job starts its own local Ray
    return env


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: a CLI run started with
    start_new_session=True and every Ray process it started (Ray gives its
    workers their own process group, but they stay in the session)."""
    pids = []
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat_path) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(stat_path.split("/")[2]))
    return pids


def _reap_session(proc: subprocess.Popen, wait_s: float = 20.0) -> list[int]:
    """Wait for a killed CLI run's processes to go; SIGKILL (by pid) any that
    stay. Returns the pids that had to be killed (Ray should leave none)."""
    deadline = time.monotonic() + wait_s
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = _session_pids(proc.pid)
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftover


def _run_cli(args: list[str], ray_tmp: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [*SEGBATCH, *args],
        env=_cli_env(ray_tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        _reap_session(proc)
        pytest.fail(f"segbatch {' '.join(args[:3])} ran past {timeout} s; stderr:\n{err[-4000:]}")
    _reap_session(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _alive_worker_pids() -> list[int]:
    # the GCS's actor table; ray.util.state.list_actors would need the dashboard
    from ray._private import state

    actors = state.actors().values()
    return sorted(
        a["Pid"] for a in actors if a["ActorClassName"] == "SegmentWorker" and a["State"] == "ALIVE" and a.get("Pid")
    )
