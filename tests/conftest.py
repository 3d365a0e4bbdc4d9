"""Shared pytest fixtures.

Other fixtures will be added here by others: keep one section per topic,
each with its imports at the top of the file and a short comment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (s3util, faultproxy) import as modules

from faultproxy import FaultProxy  # noqa: E402
from s3util import S3Bucket, aws_test_env, new_bucket, start_moto  # noqa: E402

_EXIT_STATUS = pytest.StashKey[int]()

# -- S3: a real moto server over HTTP on 127.0.0.1 ------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server shared by the session."""
    server, endpoint = start_moto()
    yield endpoint
    server.stop()


@pytest.fixture
def s3(s3_server: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh bucket for this test: ``.bucket``, ``.endpoint``, ``.storage_options``, ``.url(path)``."""
    for name, value in aws_test_env():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return new_bucket(s3_server, request.node.name)


@pytest.fixture
def fault_proxy(s3_server: str) -> Iterator[FaultProxy]:
    """A proxy to the moto server that fails 30% of requests (seeded); use ``.endpoint``."""
    with FaultProxy(s3_server, rate=0.3, seed=1234) as proxy:
        yield proxy


# -- Fault injection: targeted faults switched on mid-test (tests/faultproxy.py, tests/poison.py) --


@pytest.fixture
def targeted_proxy(s3_server: str) -> Iterator[FaultProxy]:
    """A proxy to the moto server that forwards everything until a test calls
    ``.deny(path_prefix, code=...)``, ``.slow(...)`` or ``.storm(...)``; ``.clear()`` lifts them."""
    with FaultProxy(s3_server, rate=0.0, seed=4321) as proxy:
        yield proxy


# -- Ray: one local session per test module ------------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray of 2 CPUs for the module's tests (``address="local"``: never a
    `ray start` cluster that may be running on this machine)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


# -- Exit: the run's outcome is its tests', not a native library's finalization -----------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's status once everything is reported, skipping the interpreter's finalization.

    CI once printed "685 passed" and then died of SIGSEGV (exit 139) while the interpreter tore
    down: the session loads Ray, torch, two GDALs (rasterio's and pyogrio's), DuckDB, Airflow and
    pyarrow's AWS SDK into one process, and a native library whose destructor runs after another
    has shut down crashes at exit now and then (pyarrow's S3 is a known case: apache/arrow#38352).
    Every fixture has already stopped its servers and clusters by now; nothing is left to flush
    but the streams.
    """
    status = config.stash.get(_EXIT_STATUS, None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
