"""The job engine against real failures: S3, killed actors, a killed driver,
storage faults, a stalled worker, a pool the cluster cannot host.

No mocks: a moto S3 server over HTTP, real Ray (a local cluster the CLI
starts for itself, or one started here in-process), real SIGKILLs. The model
is torchvision's Mask R-CNN with seeded random weights at a tiny input size.

CLI runs get their own RAY_TMPDIR, so they never join another Ray on this
machine, their logs can be searched, and their processes are found (by
session id) and reaped when a test kills the driver (``tests/runutil.py``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from runutil import FAST_ARGS, FAST_MODEL, SEGBATCH, _alive_worker_pids, _cli_env, _png, _reap_session, _run_cli

from segbatch.config import JobConfig, ModelConfig
from segbatch.engine import JobError, run_job

# -- helpers --------------------------------------------------------------------


def _image_folder(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"img{i:03d}.png"
        p.write_bytes(_png(i))
        paths.append(str(p))
    return paths


def _rows(data_dir, filesystem=None) -> list[dict]:
    table = pads.dataset(str(data_dir), format="parquet", filesystem=filesystem).to_table()
    return sorted(table.to_pylist(), key=lambda r: r["uri"])


def _comparable(rows: list[dict]) -> list[tuple]:
    return [(r["uri"], r["status"], r["detections"]) for r in rows]


def _commits(dest: Path) -> list[Path]:
    return sorted((dest / "_segbatch" / "commits").glob("part-*.json"))


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


# -- 1. S3 end to end; credentials stay out of logs and files ------------------------


def test_s3_end_to_end_keeps_credentials_out_of_logs_and_files(s3, ray_tmp):
    import s3fs

    # distinctive values (moto takes any), so a leak cannot hide behind a common word
    key, secret = "AKIASEGBATCHKEY00042", "SEGBATCHsecretValue0123456789abcdefXYZ"
    options = {"endpoint_url": s3.endpoint, "key": key, "secret": secret}
    expected = []
    for i in range(4):
        expected.append(s3.put(f"in/{'sub/' if i % 2 else ''}img{i}.png", _png(i)))
    expected.append(
        s3.put("in/broken.png", b"\x89PNG\r\n\x1a\n not really")
    )  # an error row: its message is checked too
    expected.sort()

    proc = _run_cli(
        [
            "-vv",
            "run",
            s3.url("in/"),
            s3.url("out/"),
            *FAST_ARGS,
            "--shard-size",
            "2",
            "--workers",
            "1",
            "--cpus-per-worker",
            "1",
            "--storage-options",
            json.dumps(options),
        ],
        ray_tmp,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "5 rows (1 with errors" in proc.stderr

    fs = s3fs.S3FileSystem(key=key, secret=secret, client_kwargs={"endpoint_url": s3.endpoint})
    rows = _rows(f"{s3.bucket}/out/data", filesystem=fs)
    assert [r["uri"] for r in rows] == expected  # every image, exactly once
    by_uri = {r["uri"]: r for r in rows}
    assert by_uri[s3.url("in/broken.png")]["status"] == "error"
    assert all(r["status"] == "ok" for u, r in by_uri.items() if not u.endswith("broken.png"))

    # credentials: in no log line, in no file under out/, nowhere in Ray's logs
    for text, where in ((proc.stderr, "stderr"), (proc.stdout, "stdout")):
        assert key not in text and secret not in text, f"a credential in the job's {where}"
    out_keys = s3.keys("out/")
    assert (
        any(k.endswith("_segbatch/config.json") for k in out_keys)
        and sum(k.startswith("out/data/") for k in out_keys) == 3
    )
    for k in out_keys:
        body = s3.get(k)
        assert key.encode() not in body and secret.encode() not in body, f"a credential in s3://{s3.bucket}/{k}"
    config = json.loads(s3.get("out/_segbatch/config.json"))
    assert "storage_options" not in config["job"]
    ray_logs = [p for p in glob.glob(f"{ray_tmp}/**/*", recursive=True) if os.path.isfile(p) and "/logs/" in p]
    assert ray_logs, f"no Ray logs under {ray_tmp}"
    for path in ray_logs:
        with open(path, "rb") as f:
            body = f.read()
        assert key.encode() not in body and secret.encode() not in body, f"a credential in Ray's log {path}"


# -- 3. the driver killed mid-job, then the same command again --------------------------


def test_driver_killed_then_rerun_resumes_and_equals_uninterrupted_run(tmp_path, ray_tmp):
    src = tmp_path / "images"
    uris = _image_folder(src, 12)
    dest, reference = tmp_path / "out", tmp_path / "reference"
    args = [*FAST_ARGS, "--shard-size", "2", "--workers", "1", "--cpus-per-worker", "1"]
    run_cmd = [*SEGBATCH, "run", str(src), str(dest), *args]

    proc = subprocess.Popen(
        run_cmd, env=_cli_env(ray_tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for(lambda: len(_commits(dest)) >= 2 or proc.poll() is not None, 180, "two commits")
        assert proc.poll() is None, "the job finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its GCS and raylet (the actors share their fate)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        leftover = _reap_session(proc)
    assert not leftover, f"Ray processes outlived the killed driver: {leftover}"

    committed = {p.name: json.loads(p.read_text()) for p in _commits(dest)}
    assert 2 <= len(committed) < 6, f"{len(committed)} of 6 shards committed when the driver died"
    assert not (dest / "_segbatch" / "summary.json").exists()
    rerun_started = time.time()

    again = _run_cli(["run", str(src), str(dest), *args], ray_tmp)
    assert again.returncode == 0, again.stderr[-4000:]
    summary = json.loads((dest / "_segbatch" / "summary.json").read_text())
    assert summary["complete"] and summary["rows"] == 12 and summary["shards_committed"] == 6
    assert summary["images_this_run"] == 12 - 2 * len(committed)  # only the missing shards ran
    after = {p.name: json.loads(p.read_text()) for p in _commits(dest)}
    for name, record in committed.items():
        assert after[name] == record, f"{name} was committed before the kill but ran again"
    assert all(r["committed"] >= rerun_started for n, r in after.items() if n not in committed)

    first = _run_cli(["run", str(src), str(reference), *args], ray_tmp)
    assert first.returncode == 0, first.stderr[-4000:]
    rows, ref_rows = _rows(dest / "data"), _rows(reference / "data")
    assert [r["uri"] for r in rows] == sorted(uris)  # exactly once
    assert _comparable(rows) == _comparable(ref_rows)
    assert sorted(p.name for p in (dest / "data").iterdir()) == sorted(p.name for p in (reference / "data").iterdir())


_SLOW_LISTING = """
import sys, time, runpy
import segbatch.engine.planner as planner
import segbatch.storage.sources as sources
planner.FIRST_PART_URIS = planner.PART_URIS = sources.CHUNK_URIS = 4
chunks = sources._parquet_chunks
def slow(*a, **k):  # two chunks, then a source that never answers
    for i, chunk in enumerate(chunks(*a, **k)):
        while i >= 2:
            time.sleep(1.0)
        yield chunk
sources._parquet_chunks = slow
sys.argv = ["segbatch", *sys.argv[1:]]
runpy.run_module("segbatch.cli", run_name="__main__")
"""


def test_driver_killed_mid_listing_then_rerun_plans_each_image_once(tmp_path, ray_tmp):
    """A sorted manifest listed in parts of 4 URIs, whose listing stalls after two: the driver is
    killed once shards are committed and the listing is not done. The rerun, over a manifest that grew
    meanwhile, keeps the killed run's parts and commits, and every image is in exactly one row."""
    uris = _image_folder(tmp_path / "images", 30)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"uri": uris[::2]}), manifest)  # sorted: streamed
    dest = tmp_path / "out"
    args = [*FAST_ARGS, "--shard-size", "2", "--workers", "1", "--cpus-per-worker", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_LISTING, "run", str(manifest), str(dest), *args],
        env=_cli_env(ray_tmp),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    plan_json = dest / "_segbatch" / "plan.json"
    try:
        _wait_for(lambda: len(_commits(dest)) >= 2 or proc.poll() is not None, 180, "two commits")
        assert proc.poll() is None, "the job finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _reap_session(proc)
    assert json.loads(plan_json.read_text())["complete"] is False, "the listing ended before the kill"
    committed = {p.name: json.loads(p.read_text()) for p in _commits(dest)}
    parts = sorted(p.name for p in (dest / "_segbatch" / "plan").iterdir())

    pq.write_table(pa.table({"uri": uris}), manifest)  # the archive grew: odd images arrived
    again = _run_cli(["run", str(manifest), str(dest), *args], ray_tmp)
    assert again.returncode == 0, again.stderr[-4000:]
    summary = json.loads((dest / "_segbatch" / "summary.json").read_text())
    assert summary["complete"] and summary["rows"] == 30
    assert [r["uri"] for r in _rows(dest / "data")] == sorted(uris)  # exactly once
    after = {p.name: json.loads(p.read_text()) for p in _commits(dest)}
    assert all(after[name] == record for name, record in committed.items()), "a committed shard ran again"
    assert set(parts) <= {p.name for p in (dest / "_segbatch" / "plan").iterdir()}  # the killed run's parts kept
    assert json.loads(plan_json.read_text())["complete"] is True


# -- 5. a worker that stops making progress ---------------------------------------------


class _ImageServer:
    """HTTP on 127.0.0.1 serving PNGs; paths in ``hang`` are never answered."""

    def __init__(self, files: dict[str, bytes], hang: set[str]):
        self.files, self.hang = files, hang
        self.release = threading.Event()
        self.hung_requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def _serve(self, body: bool) -> None:
                name = self.path.lstrip("/")
                if name in owner.hang:
                    owner.hung_requests += 1
                    owner.release.wait()  # never a byte back, until the test ends
                    return
                data = owner.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve(True)

            def do_HEAD(self) -> None:
                self._serve(False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def __enter__(self) -> _ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_stalled_worker_is_timed_out_and_the_job_reports_it(tmp_path, ray_tmp):
    names = ["a.png", "b.png", "c_hangs.png", "d.png", "e.png"]  # shards: [a b] [c d] [e]
    with _ImageServer({n: _png(i) for i, n in enumerate(names)}, hang={"c_hangs.png"}) as server:
        manifest = tmp_path / "images.txt"
        manifest.write_text("".join(server.url(n) + "\n" for n in names))
        dest = tmp_path / "out"
        started = time.monotonic()
        proc = _run_cli(
            [
                "run",
                str(manifest),
                str(dest),
                *FAST_ARGS,
                "--shard-size",
                "2",
                "--workers",
                "1",
                "--cpus-per-worker",
                "1",
                "--stall-timeout",
                "5",
                "--retries",
                "1",
            ],
            ray_tmp,
            timeout=180,
        )
        elapsed = time.monotonic() - started
        hung = server.hung_requests
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "segbatch: incomplete: 1 shards stayed uncommitted" in proc.stderr
    assert "shard 1: worker made no progress on shard 1 for 5 s" in proc.stderr
    assert hung >= 2  # the first attempt and the one retry both reached the stuck image
    assert "shard 1 failed (attempt 1 of 2), retrying: worker made no progress" in proc.stderr
    # the shard queued behind the stuck one on the killed actor never started: it is not charged a retry
    assert "shard 2 failed" not in proc.stderr and "shard 0 failed" not in proc.stderr
    assert elapsed < 150
    summary = json.loads((dest / "_segbatch" / "summary.json").read_text())
    assert not summary["complete"] and list(summary["failed_shards"]) == ["1"]
    assert "no progress" in summary["failed_shards"]["1"]
    # the shards around the stuck one are committed, whole
    assert [p.name for p in _commits(dest)] == ["part-00000.json", "part-00002.json"]
    assert [r["uri"] for r in _rows(dest / "data")] == [server.url(n) for n in ("a.png", "b.png", "e.png")]
    assert all(r["status"] == "ok" for r in _rows(dest / "data"))


# -- 6. a pool the cluster cannot host fails fast --------------------------------------


def test_gpu_pool_on_a_cpu_cluster_fails_fast_naming_the_fix(tmp_path, ray_tmp):
    src = tmp_path / "images"
    _image_folder(src, 2)
    started = time.monotonic()
    proc = _run_cli(
        ["run", str(src), str(tmp_path / "out"), *FAST_ARGS, "--device", "cuda", "--gpus-per-worker", "1"],
        ray_tmp,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert elapsed < 60
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("segbatch: error:")]
    assert len(error) == 1, proc.stderr[-4000:]
    assert "1 GPU" in error[0] and "0 GPU" in error[0]  # what a worker asks for, what the nodes have
    assert "--gpus-per-worker" in error[0] and "--device cpu" in error[0]  # the fix


# -- in-process Ray: the tests below reach into the cluster ----------------------------


def _job(src, dest, **kw) -> JobConfig:
    return JobConfig(
        source=str(src),
        dest=str(dest),
        model=ModelConfig(**FAST_MODEL),
        shard_size=2,
        **{"workers": 2, "cpus_per_worker": 1, **kw},
    )


def test_cpu_pool_larger_than_any_node_fails_fast(ray_local, tmp_path):
    src = tmp_path / "images"
    _image_folder(src, 2)
    started = time.monotonic()
    with pytest.raises(JobError, match=r"64 CPU.*2 CPU.*--cpus-per-worker"):
        run_job(
            JobConfig(source=str(src), dest=str(tmp_path / "out"), model=ModelConfig(**FAST_MODEL), cpus_per_worker=64)
        )
    assert time.monotonic() - started < 30


def test_worker_killed_mid_job_is_replaced_and_its_shards_rerun(ray_local, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="segbatch.engine.pool")
    src, dest = tmp_path / "images", tmp_path / "out"
    uris = _image_folder(src, 12)
    outcome: list = []

    def job() -> None:
        try:
            outcome.append(run_job(_job(src, dest)))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    _wait_for(lambda: _commits(dest) or outcome, 120, "a first commit")
    assert not outcome, f"the job ended before a worker could be killed: {outcome}"
    pids = _alive_worker_pids()
    assert pids, "no SegmentWorker alive"
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    at_kill = len(_commits(dest))
    assert at_kill < 6, "every shard committed before the kill"
    thread.join(timeout=180)
    assert outcome, "the job did not finish within 180 s of the kill"
    result = outcome[0]
    assert not isinstance(result, BaseException), result

    assert result.complete and not result.failed
    rows = _rows(dest / "data")
    assert [r["uri"] for r in rows] == sorted(uris)  # exactly once
    assert result.summary.complete and result.summary.rows == 12 and result.summary.shards_committed == 6
    assert result.summary.images_this_run == 12
    assert result.progress.done == 12 and result.progress.shards_done == 6  # the lost shard's images counted once
    progress = json.loads((dest / "_segbatch" / "progress.json").read_text())
    assert progress["done"] == 12 and progress["shards_done"] == 6 and progress["message"] == "finished"
    assert any("worker died" in r.getMessage() and "replacement" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
    # the shards the victim was running went back to the queue and another worker committed them:
    # one alone on it is charged; two beside each other are uncharged suspects, each rerun alone
    messages = [r.getMessage() for r in caplog.records]
    charged = {int(m.group(1)) for t in messages if (m := re.match(r"shard (\d+) failed \(attempt 1 of", t))}
    suspects = {
        int(m.group(1))
        for t in messages
        if (m := re.match(r"shard (\d+) ran beside others on an actor that went \(", t))
    }
    assert charged or suspects, messages
    assert not (charged and suspects) and len(charged) <= 1, messages  # none charged while it ran beside another
    records = {r["shard"]: r for r in (json.loads(p.read_text()) for p in _commits(dest))}
    assert all(records[s]["pid"] != victim for s in charged | suspects)
    assert not any(r["pid"] == victim and r["committed"] > killed_at + 1 for r in records.values())


def test_storage_faults_are_retried_and_every_image_lands_once(ray_local, s3, fault_proxy):
    import s3fs

    expected = sorted(s3.put(f"in/img{i}.png", _png(100 + i)) for i in range(6))
    cfg = JobConfig(
        source=s3.url("in/"),
        dest=s3.url("out/"),
        model=ModelConfig(**FAST_MODEL),
        shard_size=2,
        workers=2,
        cpus_per_worker=1,
        storage_options=s3.options_via(fault_proxy.endpoint),
    )
    result = run_job(cfg)
    assert result.complete, result.failed
    faults = {m: fault_proxy.counts[m] for m in ("slowdown", "drop", "truncate")}
    assert sum(faults.values()) >= 10, (faults, fault_proxy.counts["forwarded"])  # the faults were real

    # read back past the proxy, with a second client
    fs = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": s3.endpoint},
        **{k: v for k, v in s3.storage_options.items() if k != "endpoint_url"},
    )
    rows = _rows(f"{s3.bucket}/out/data", filesystem=fs)
    assert [r["uri"] for r in rows] == expected
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    assert len([k for k in s3.keys("out/data/")]) == 3
    assert not s3.keys("out/_segbatch/tmp/")  # every attempt's temporary file was cleaned up or committed


def _workers_not_dead() -> list[str]:
    """SegmentWorker actors that are starting or alive (the GCS's actor table)."""
    from ray._private import state

    return [
        a["ActorID"] for a in state.actors().values() if a["ActorClassName"] == "SegmentWorker" and a["State"] != "DEAD"
    ]


def test_worker_failing_shards_in_a_row_is_replaced_and_tmp_is_cleared(ray_local, tmp_path, caplog):
    """An actor whose shards all raise (here: DEST/_segbatch/tmp is a file, so
    no shard can be written) is replaced after two in a row, and the retries
    still end; tmp/ is cleared at the end."""
    caplog.set_level(logging.WARNING, logger="segbatch.engine.pool")
    src, dest = tmp_path / "images", tmp_path / "out"
    _image_folder(src, 4)
    (dest / "_segbatch").mkdir(parents=True)
    (dest / "_segbatch" / "tmp").write_bytes(b"in the way")
    result = run_job(_job(src, dest, workers=1, retries=1))

    assert sorted(result.failed) == [0, 1] and all("FileExistsError" in e for e in result.failed.values()), (
        result.failed
    )
    messages = [r.getMessage() for r in caplog.records]
    assert any("worker failed 2 shards in a row" in m and "replacing it" in m for m in messages), messages
    for shard in (0, 1):  # each charged its two attempts, no more: a replacement requeues uncharged
        assert sum(m.startswith(f"shard {shard} failed (attempt 1 of 2)") for m in messages) == 1, messages
        assert sum(m.startswith(f"shard {shard} failed 2 times, giving up") for m in messages) == 1, messages
    assert not (dest / "_segbatch" / "tmp").exists()
    _wait_for(lambda: not _workers_not_dead(), 30, "the pool's actors to be killed")


def test_pool_kills_its_actors_when_the_job_raises(ray_local, tmp_path):
    src = tmp_path / "images"
    _image_folder(src, 2)
    with pytest.raises(JobError, match="no worker started within") as raised:
        run_job(_job(src, tmp_path / "out", startup_timeout_s=0.01))
    # the caller holds the error, so the pool (in its traceback) and its handles are not collected
    assert raised.traceback
    _wait_for(lambda: not _workers_not_dead(), 30, "the pool's actors to be killed")
