"""The fault-injection suite: the whole job driven through the faults real archives bring.

Section 1 checks the tools themselves: the fault proxy (tests/faultproxy.py)
answers what S3 answers, and s3fs surfaces each code as segbatch will see it;
the poison hook (tests/poison.py) really kills a Ray actor.

Section 2 is the table (``ROWS``): for each fault, one job on a moto bucket
through the proxy (real Ray, real torchvision with seeded random weights at a
tiny input size), then the same job again with every fault lifted. Each row
asserts the promises of CONTRACT.md:

- no image lost or duplicated: every listed image has at most one row after
  the faulty run and exactly one after the rerun;
- no healthy image committed as an error row (only the row's own bad images
  may be errors, with the cause named);
- the outcome is right: complete where the fault is retried away, else
  incomplete (or stopped with one store-wide message), never "complete"
  with a hole;
- the rerun completes the job and its rows equal a clean run's.

A node lost is left to tests/test_cluster.py::test_losing_a_worker_node_mid_job
(a two-node ``ray start`` cluster is too heavy to start once more here).

The rows share one Ray session (started here, with the poison hook in its
workers' runtime env) and one fault proxy; each has its own bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pytest

import poison
from faultproxy import FaultProxy, request_path
from s3util import S3Bucket

# -- 1. the tools: the fault proxy and the poison hook --------------------------

# each code, the status S3 gives it, and what s3fs raises for it (what segbatch's storage layer sees)
S3FS_ERRORS = [
    ("AccessDenied", 403, PermissionError),
    ("ExpiredToken", 403, PermissionError),
    ("InvalidAccessKeyId", 403, PermissionError),
    ("SignatureDoesNotMatch", 403, PermissionError),
    ("RequestTimeTooSkewed", 403, PermissionError),
    ("NoSuchBucket", 404, FileNotFoundError),
    ("PermanentRedirect", 301, OSError),
]


def _s3fs(endpoint: str) -> Any:
    import s3fs

    # one attempt: the proxy's answer, not botocore's retries, is under test
    return s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": endpoint},
        skip_instance_cache=True,
        config_kwargs={"retries": {"max_attempts": 1}},
    )


@pytest.fixture
def proxy(targeted_proxy: FaultProxy) -> FaultProxy:
    return targeted_proxy


@pytest.mark.parametrize("code,status,exc_type", S3FS_ERRORS, ids=[c for c, _, _ in S3FS_ERRORS])
def test_deny_answers_the_s3_error_and_s3fs_raises_what_segbatch_sees(s3, proxy, code, status, exc_type):
    s3.put("src/a.png", b"a")
    s3.put("dst/b.txt", b"b")
    rule = proxy.deny(f"/{s3.bucket}/src/", code=code)
    assert rule.status == status
    fs = _s3fs(proxy.endpoint)
    with pytest.raises(exc_type):
        fs.cat_file(f"{s3.bucket}/src/a.png")
    with pytest.raises(exc_type):
        fs.ls(f"{s3.bucket}/src/", refresh=True)  # a listing of the prefix is denied too
    assert fs.cat_file(f"{s3.bucket}/dst/b.txt") == b"b"  # outside the prefix: forwarded
    fs.pipe_file(f"{s3.bucket}/src/c.png", b"c")  # PUT is not among the denied methods
    assert s3.get("src/c.png") == b"c"
    assert proxy.counts[f"denied:{code}"] >= 2 and proxy.counts["forwarded"] >= 2
    assert all(path.startswith(f"/{s3.bucket}/src/") for _, path in proxy.denied)

    # the raw answer, as a second client sees it: status, and S3's XML naming the code
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client(
        "s3",
        endpoint_url=proxy.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=s3.bucket, Key="src/a.png")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert info.value.response["Error"]["Code"] == code


def test_deny_after_requests_at_a_time_by_method_and_allow(s3, proxy):
    keys = [f"src/{i}.png" for i in range(5)]
    for k in keys:
        s3.put(k, k.encode())
    fs = _s3fs(proxy.endpoint)
    rule = proxy.deny(f"/{s3.bucket}/src/", code="ExpiredToken", methods=("GET",), after_requests=2)
    assert fs.cat_file(f"{s3.bucket}/{keys[0]}") == keys[0].encode()
    assert fs.cat_file(f"{s3.bucket}/{keys[1]}") == keys[1].encode()
    with pytest.raises(PermissionError):  # the credential expired after two reads
        fs.cat_file(f"{s3.bucket}/{keys[2]}")
    assert (rule.seen, rule.denied) == (3, 1)
    proxy.allow()  # renewed
    assert fs.cat_file(f"{s3.bucket}/{keys[2]}") == keys[2].encode()

    # by time: nothing denied before `at`, everything after
    proxy.deny(f"/{s3.bucket}/src/", code="AccessDenied", methods=("GET",), at=time.monotonic() + 0.5)
    assert fs.cat_file(f"{s3.bucket}/{keys[3]}") == keys[3].encode()
    time.sleep(0.6)
    with pytest.raises(PermissionError):
        fs.cat_file(f"{s3.bucket}/{keys[3]}")
    proxy.allow()

    # DEST's writes denied, its reads not
    proxy.deny(f"/{s3.bucket}/dst/", code="AccessDenied", methods=("PUT", "POST", "DELETE"))
    with pytest.raises(PermissionError):
        fs.pipe_file(f"{s3.bucket}/dst/x", b"x")
    assert "dst/x" not in s3.keys("dst/")
    assert fs.cat_file(f"{s3.bucket}/{keys[4]}") == keys[4].encode()
    proxy.clear()
    fs.pipe_file(f"{s3.bucket}/dst/x", b"x")
    assert s3.get("dst/x") == b"x"


def test_slow_and_a_storm_aimed_at_one_prefix(s3, proxy):
    s3.put("src/a.png", b"a" * 1000)
    s3.put("dst/b.txt", b"b" * 1000)
    fs = _s3fs(proxy.endpoint)
    proxy.slow(f"/{s3.bucket}/src/", 0.4)
    started = time.monotonic()
    fs.cat_file(f"{s3.bucket}/src/a.png")
    assert time.monotonic() - started >= 0.4 and proxy.counts["slowed"] >= 1
    started = time.monotonic()
    fs.cat_file(f"{s3.bucket}/dst/b.txt")
    assert time.monotonic() - started < 0.4  # outside the prefix: not slowed
    proxy.fast()

    proxy.storm(1.0, modes=("slowdown",), path_prefix=f"/{s3.bucket}/dst/")
    assert fs.cat_file(f"{s3.bucket}/src/a.png") == b"a" * 1000  # the storm is aimed at dst/ only
    with pytest.raises(OSError):
        fs.cat_file(f"{s3.bucket}/dst/b.txt")  # 503 on every request; one attempt
    assert proxy.counts["slowdown"] >= 1
    proxy.clear()
    assert fs.cat_file(f"{s3.bucket}/dst/b.txt") == b"b" * 1000


def test_request_path_is_what_rules_match():
    assert request_path("/bkt/src/a%20b.png?versionId=1") == "/bkt/src/a b.png"
    assert request_path("/bkt?list-type=2&prefix=src%2Fsub%2F&delimiter=%2F") == "/bkt/src/sub/"
    assert request_path("/bkt/?prefix=") == "/bkt/"


def test_poison_png_decodes_everywhere_but_in_a_hooked_worker():
    from segbatch.model import decode_image

    data = poison.poisoned_png(3)
    assert poison.POISON_MARK in data
    image = decode_image(data, max_pixels=10**8)  # no hook in this process: an ordinary image
    assert image.shape == (64, 80, 3)
    assert np.array_equal(image, decode_image(poison.png(3), max_pixels=10**8))


# -- shared Ray session (the poison hook in every worker) ---------------------------


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import ray

    if ray.is_initialized():  # another module's session: ours needs the hook in its workers
        ray.shutdown()
    # "local": never join a `ray start` cluster that may be running on this machine
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, configure_logging=False, runtime_env=poison.runtime_env()
    )
    yield
    ray.shutdown()


@pytest.mark.slow
def test_poison_kills_the_ray_actor_that_decodes_it(ray_session):
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
    class Decoder:
        def decode(self, data: bytes) -> tuple[int, ...]:
            from segbatch.engine import pipeline

            return pipeline.decode_image(data, max_pixels=10**8).shape

        def pid(self) -> int:
            return os.getpid()

    actor = Decoder.remote()
    assert ray.get(actor.decode.remote(poison.png(1)), timeout=120) == (64, 80, 3)  # a clean image: decoded
    pid = ray.get(actor.pid.remote())
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.decode.remote(poison.poisoned_png(1)), timeout=120)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"the actor's process {pid} outlived its poison"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- 2. the table: the whole job through each fault, then a rerun -------------------

N_IMAGES = 8
SHARD_SIZE = 2  # a bad image's name sorts it into a shard with a healthy one, which must still get its ok row
THIN = poison.png(7, size=(1, 2000))  # valid, but torchvision's resize asks for a 0-pixel side
MODEL_FAILED = "model failed"
WORKER_DIED = "worker died while processing this image"


@dataclass
class Ctx:
    """What a row's injection works with."""

    s3: S3Bucket
    proxy: FaultProxy
    events: list[str] = field(default_factory=list)  # what was injected, and when, for the failure message
    watchers: list[threading.Thread] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def src(self) -> str:
        return f"/{self.s3.bucket}/src/"

    @property
    def dst(self) -> str:
        return f"/{self.s3.bucket}/dst/"

    def after_first_commit(self, action: Callable[[], str]) -> None:
        """Run ``action`` once DEST holds a first data file (seen past the proxy); it returns what it did."""

        def watch() -> None:
            while not self.done.is_set():
                if self.s3.keys("dst/data/"):
                    self.events.append(action())
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=watch, name="fault-watcher", daemon=True)
        thread.start()
        self.watchers.append(thread)

    def finish(self) -> None:
        self.done.set()
        for t in self.watchers:
            t.join(timeout=30)


def _deny_source(ctx: Ctx) -> None:
    # by count, not by commit: the workers read ahead, so every read may be over before the first commit.
    # The listing (GET /bucket?prefix=src/) and the first reads pass; the credential then expires.
    ctx.proxy.deny(ctx.src, code="ExpiredToken", after_requests=4)
    ctx.events.append("reads under src/ denied (ExpiredToken) after 4 requests")


def _deny_dest(ctx: Ctx) -> None:
    ctx.proxy.slow(ctx.src, 0.3)  # the job outlasts its first commit
    ctx.after_first_commit(lambda: str(ctx.proxy.deny(ctx.dst, code="AccessDenied", methods=("PUT", "POST", "DELETE"))))


def _kill_an_actor(ctx: Ctx) -> None:
    from runutil import _alive_worker_pids

    def kill() -> str:
        pids = _alive_worker_pids()
        if not pids:
            return "no SegmentWorker alive to kill"
        os.kill(pids[0], signal.SIGKILL)
        return f"killed SegmentWorker pid {pids[0]}"

    ctx.proxy.slow(ctx.src, 0.3)
    ctx.after_first_commit(kill)


@dataclass(frozen=True)
class FaultRow:
    """One fault, and what the job must do through it.

    outcome: ``complete`` (the fault is retried away), ``incomplete`` (the
    run ends unfinished: JobResult.complete false, or a SegbatchError with
    exit status 1) or ``store-wide`` (StoreUnavailable: one message naming
    the store and the fix). bad: extra source images and the cause their
    error row must name. proof: a check on the proxy's counts or the
    injection's events that the fault really happened.
    """

    name: str
    inject: Callable[[Ctx], None]
    outcome: str
    proof: Callable[[Ctx], bool]
    bad: dict[str, bytes] = field(default_factory=dict)
    bad_errors: dict[str, str] = field(default_factory=dict)
    driver_killed: bool = False


def _denied(ctx: Ctx) -> bool:
    return ctx.proxy.counts["denied"] > 0


def _injected(ctx: Ctx) -> bool:
    return bool(ctx.events) and not ctx.events[0].startswith("no ")


def _storm(rate: float, *modes: str) -> Callable[[Ctx], None]:
    return lambda c: c.proxy.storm(rate, modes)


def _counted(*keys: str, at_least: int = 5) -> Callable[[Ctx], bool]:
    return lambda c: sum(c.proxy.counts[k] for k in keys) >= at_least


def _slow_source(delay_s: float) -> Callable[[Ctx], None]:
    return lambda c: c.proxy.slow(c.src, delay_s)


def _nothing(ctx: Ctx) -> None:
    """The row's fault is in its images."""


def _always(ctx: Ctx) -> bool:
    return True


ROWS = [
    FaultRow("source-denied-mid-job", _deny_source, "store-wide", _denied),
    FaultRow("dest-denied-mid-job", _deny_dest, "incomplete", _denied),
    FaultRow("503-storm", _storm(0.3, "slowdown"), "complete", _counted("slowdown")),
    FaultRow("connection-resets", _storm(0.3, "drop", "truncate"), "complete", _counted("drop", "truncate")),
    FaultRow("slow-reads", _slow_source(0.5), "complete", _counted("slowed", at_least=N_IMAGES)),
    FaultRow("actor-killed", _kill_an_actor, "complete", _injected),
    FaultRow("driver-killed", _slow_source(0.3), "incomplete", _injected, driver_killed=True),
    FaultRow(
        "poison-image",
        _nothing,
        "complete",
        _always,
        bad={"src/img05-poison.png": poison.poisoned_png(99)},
        bad_errors={"src/img05-poison.png": WORKER_DIED},
    ),
    FaultRow(
        "model-error-one-image",
        _nothing,
        "complete",
        _always,
        bad={"src/img03-thin.png": THIN},
        bad_errors={"src/img03-thin.png": MODEL_FAILED},
    ),
]


def _model_kwargs() -> dict[str, Any]:
    from runutil import FAST_MODEL

    return FAST_MODEL


def _config(s3: S3Bucket, endpoint: str) -> Any:
    from segbatch.config import JobConfig, ModelConfig

    return JobConfig(
        source=s3.url("src/"),
        dest=s3.url("dst/"),
        model=ModelConfig(**_model_kwargs()),
        shard_size=SHARD_SIZE,
        workers=2,
        cpus_per_worker=1,
        retries=2,
        storage_options=s3.options_via(endpoint),
        stall_timeout_s=120,
        startup_timeout_s=180,
    )


def _put_images(s3: S3Bucket, bad: dict[str, bytes]) -> list[str]:
    uris = [s3.put(f"src/img{i:02d}.png", poison.png(i)) for i in range(N_IMAGES)]
    uris += [s3.put(key, data) for key, data in bad.items()]
    return sorted(uris)


def _dest_rows(s3: S3Bucket) -> list[dict[str, Any]]:
    """DEST's rows, read past the proxy with a second client (s3fs straight to moto)."""
    if not s3.keys("dst/data/"):
        return []
    fs = _s3fs(s3.endpoint)
    table = pads.dataset(f"{s3.bucket}/dst/data", format="parquet", filesystem=fs).to_table()
    return sorted(table.to_pylist(), key=lambda r: r["uri"])


def _key(s3: S3Bucket, uri: str) -> str:
    return uri.removeprefix(s3.url(""))


@pytest.fixture(scope="module")
def reference(ray_session, s3_server: str) -> dict[str, tuple]:
    """A clean run's rows of the healthy images: key -> ``_comparable(row)``."""
    from segbatch.engine import run_job

    from s3util import new_bucket

    s3 = new_bucket(s3_server, "reference")
    _put_images(s3, {})
    result = run_job(_config(s3, s3.endpoint))
    assert result.complete, result.failed
    rows = _dest_rows(s3)
    assert len(rows) == N_IMAGES and all(r["status"] == "ok" for r in rows)
    return {_key(s3, r["uri"]): _comparable(r) for r in rows}


def _comparable(row: dict[str, Any]) -> tuple:
    """What a rerun must reproduce: status, error, and per detection its label, score, box and area."""
    dets = [(d["label"], d["score"], tuple(d["box"]), d["area"]) for d in row["detections"] or []]
    return row["status"], row["error"], dets


def _same(a: tuple, b: tuple) -> bool:
    """Equal up to float arithmetic: a CLI process and this test's Ray workers may sum in another order
    (boxes seen to differ by 1e-4 px), which can move a mask's edge by a pixel."""
    if a[:2] != b[:2] or len(a[2]) != len(b[2]):
        return False
    for (la, sa, ba, aa), (lb, sb, bb, ab) in zip(a[2], b[2]):
        if la != lb or abs(sa - sb) > 1e-3 or not np.allclose(ba, bb, atol=0.05) or abs(aa - ab) > max(2, 0.02 * ab):
            return False
    return True


def _cli_args(s3: S3Bucket, endpoint: str) -> list[str]:
    from runutil import FAST_ARGS, SEGBATCH

    return [
        *SEGBATCH,
        "run",
        s3.url("src/"),
        s3.url("dst/"),
        *FAST_ARGS,
        "--shard-size",
        str(SHARD_SIZE),
        "--workers",
        "1",
        "--cpus-per-worker",
        "1",
        "--retries",
        "2",
        "--storage-options",
        json.dumps(s3.options_via(endpoint)),
    ]


def _run_cli(cmd: list[str], ray_tmp: str, ctx: Ctx | None = None, timeout: float = 240) -> int:
    """Run `segbatch run`; with ``ctx``, SIGKILL its whole session after DEST's first commit.
    Returns the exit status (-9 when killed); Ray's leftover processes are reaped either way."""
    from runutil import _cli_env, _reap_session

    proc = subprocess.Popen(
        cmd, env=_cli_env(ray_tmp), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    if ctx is not None:

        def kill() -> str:
            if proc.poll() is not None:
                return f"no driver to kill: it exited {proc.returncode}"
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, its GCS and raylet (the actors share their fate)
            return f"killed driver pid {proc.pid}"

        ctx.after_first_commit(kill)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        _reap_session(proc)
        pytest.fail(f"segbatch run ran past {timeout} s; stderr:\n{err[-3000:]}")
    _reap_session(proc)
    if proc.returncode not in (0, -signal.SIGKILL):
        sys.stderr.write(err[-3000:])
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_fault_table(row: FaultRow, s3: S3Bucket, targeted_proxy: FaultProxy, reference: dict):
    from segbatch.engine import run_job
    from segbatch.errors import SegbatchError, StoreUnavailable

    proxy = targeted_proxy
    uris = _put_images(s3, row.bad)
    ctx = Ctx(s3, proxy)
    row.inject(ctx)
    cfg = _config(s3, proxy.endpoint)
    outcome: Any
    ray_tmp = tempfile.mkdtemp(prefix="sbf", dir="/tmp")  # short: Ray's socket paths stay under 107 bytes
    try:
        if row.driver_killed:
            outcome = _run_cli(_cli_args(s3, proxy.endpoint), ray_tmp, ctx)
        else:
            try:
                outcome = run_job(cfg)
            except SegbatchError as exc:
                outcome = exc
        ctx.finish()
        what = f"{row.name}: outcome {outcome!r}, injected {ctx.events}, proxy {dict(proxy.counts)}"
        assert row.proof(ctx), f"the fault never happened (the job ended first?) - {what}"

        # the faulty run: nothing duplicated, nothing foreign, no healthy image as an error row
        rows = _dest_rows(s3)
        counts = Counter(r["uri"] for r in rows)
        assert not [u for u, n in counts.items() if n > 1], f"duplicated rows - {what}"
        assert set(counts) <= set(uris), f"rows of images never listed: {set(counts) - set(uris)}"
        wrong = [(r["uri"], r["error"]) for r in rows if r["status"] != "ok" and _key(s3, r["uri"]) not in row.bad]
        assert not wrong, f"healthy images committed as error rows - {what}"

        # the outcome
        if row.outcome == "complete":
            assert not isinstance(outcome, BaseException), what
            assert outcome.complete, what
            assert sorted(counts) == uris, f"complete, yet images have no row - {what}"
        elif row.outcome == "store-wide":
            assert isinstance(outcome, StoreUnavailable), f"expected one store-wide stop - {what}"
            assert outcome.exit_code == 1 and s3.bucket in str(outcome), what
            assert "same command" in str(outcome) or "same command" in outcome.fix, f"no fix named - {what}"
        elif row.driver_killed:
            assert outcome == -signal.SIGKILL, what
            assert len(rows) < len(uris), f"every image had its row before the kill - {what}"
        else:
            incomplete = (isinstance(outcome, SegbatchError) and outcome.exit_code == 1) or (
                not isinstance(outcome, BaseException) and not outcome.complete
            )
            assert incomplete, f"expected an incomplete run - {what}"

        # the rerun, every fault lifted: the job completes and equals a clean run
        proxy.clear()
        if row.driver_killed:
            assert _run_cli(_cli_args(s3, proxy.endpoint), ray_tmp) == 0, f"the rerun failed - {what}"
        else:
            again = run_job(cfg)
            assert again.complete, f"the rerun failed: {again.failed} - {what}"
    finally:
        ctx.finish()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    final = _dest_rows(s3)
    assert [r["uri"] for r in final] == uris, f"not exactly one row per image after the rerun - {what}"
    by_key = {_key(s3, r["uri"]): r for r in final}
    healthy = {k: _comparable(r) for k, r in by_key.items() if k not in row.bad}
    assert healthy.keys() == reference.keys()
    differ = [k for k in healthy if not _same(healthy[k], reference[k])]
    assert not differ, f"rows differ from a clean run's: {[(healthy[k], reference[k]) for k in differ[:2]]} - {what}"
    for r in final:
        key = _key(s3, r["uri"])
        if key in row.bad:
            assert r["status"] == "error" and row.bad_errors[key] in (r["error"] or ""), (key, r["error"])
