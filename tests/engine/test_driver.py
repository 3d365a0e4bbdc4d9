"""The driver's rules for what goes wrong (``segbatch/engine/policy.py``), alone and in real jobs.

The policies are tested with plain values and a fake clock; the jobs run on
real Ray (a session started here with ``driver_hooks`` in its workers: a
poison image kills its worker, a hang image never decodes, a commit record
or a merge can be made to go missing or hang), real files and moto's S3
server behind the fault proxy.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import ray

from segbatch.config import JobConfig, ModelConfig
from segbatch.engine import (
    POISON_ERROR,
    Committed,
    JobError,
    PoisonHunt,
    Probe,
    Probed,
    Retries,
    StallGuard,
    StartupGuard,
    StoreFaults,
    run_job,
)
from segbatch.errors import StorageFault, StoreUnavailable

import driver_hooks
import poison

FAST_MODEL = dict(model="random", seed=5, score_threshold=0.0, max_detections=3, min_size=64, max_size=96)

# -- the policies, without Ray ------------------------------------------------------------


def test_stall_guard_times_each_task_not_its_worker():
    now = [0.0]
    guard: StallGuard[str] = StallGuard(10.0, clock=lambda: now[0])
    guard.beat("hung")
    guard.beat("busy")
    for t in range(1, 30):  # the sibling reports every second; the hung task never does
        now[0] = float(t)
        guard.beat("busy")
        if t <= 10:
            assert guard.stalled() == []
    assert guard.stalled() == ["hung"] and guard.silent_for("hung") == 29.0
    guard.beat("late")
    now[0] = 45.0
    assert guard.stalled() == ["hung", "busy", "late"]  # the longest silent first
    guard.forget("hung")
    assert guard.stalled() == ["busy", "late"]


def test_store_faults_stop_once_several_distinct_objects_are_denied():
    faults = StoreFaults()

    def denied(key: str) -> StorageFault:
        return StorageFault(f"ExpiredToken: the token expired reading s3://b/in/{key}", f"s3://b/in/{key}", "denied")

    assert faults.record(denied("a.png")) is None
    assert faults.record(denied("a.png")) is None  # the same object again: still one
    for _ in range(20):  # throttling and resets never stop a job
        assert faults.record(StorageFault("SlowDown", "s3://b/in/x.png", "transient")) is None
    assert faults.record(denied("b.png")) is None
    stop = faults.record(denied("sub/c.png"))
    assert stop is not None
    assert "credentials for s3://b/in/... expired or were revoked" in stop and "ExpiredToken on 3 objects" in stop
    assert stop.endswith("run the same command again: it resumes")
    error = faults.error()
    assert isinstance(error, StoreUnavailable) and str(error) == stop and error.exit_code == 1


def test_store_unavailable_and_a_missing_bucket_stop_at_once():
    faults = StoreFaults()
    fix = "renew the credentials"
    refused = StoreUnavailable("the credentials of s3://b/ were refused (InvalidAccessKeyId)", "s3://b/x", fix=fix)
    stop = faults.record(refused)
    assert stop is not None and fix in stop and "InvalidAccessKeyId" in stop and "run the same command again" in stop
    gone = StoreFaults()
    assert "does not exist" in gone.record(StorageFault("NoSuchBucket", "s3://gone/x.png", "no-bucket"))
    redirected = StoreFaults()
    for key in "abc":
        stop = redirected.record(StorageFault("PermanentRedirect", f"s3://b/{key}", "redirect"))
    assert "region" in stop and "--storage-options" in stop


def _hunt(uris: list[str], killers: set[str], nondeterministic: bool = False) -> tuple[list[str], int, int]:
    """Drive a PoisonHunt as the pool does, for one shard on an actor beside a
    healthy one; an actor dies when it runs any of ``killers`` (once only,
    when ``nondeterministic``). Returns (poison, charges, actor deaths)."""
    hunt, charges, deaths, fired = PoisonHunt(), 0, 1, set()
    hunt.died_beside_others(0)  # the first death: beside its neighbour, both uncharged
    hunt.died_beside_others(1)
    hunt.committed(1)  # the neighbour, rerun alone, commits uncharged
    queue: list[Probe | None] = [None]

    def kills(run: list[str]) -> bool:
        hit = [u for u in run if u in killers and not (nondeterministic and u in fired)]
        fired.update(hit)
        return bool(hit)

    while queue and deaths < 50:
        probe = queue.pop(0)
        if probe is None:
            if not kills([u for u in uris if u not in hunt.poison_of(0)]):
                hunt.committed(0)
                return hunt.poison_of(0), charges, deaths
            deaths += 1
            probes = hunt.died_alone(0, uris)
            if probes is None:
                charges += 1
                queue.append(None)
                continue
            queue += probes
        elif kills(list(probe.uris)):
            deaths += 1
            queue += hunt.probe_died(probe)
        else:
            hunt.probe_passed(probe)
        if not hunt.hunting(0) and None not in queue:
            queue.append(None)
    raise AssertionError(f"the hunt did not end: {deaths} deaths")


@pytest.mark.parametrize(
    "killers", [{"u3"}, {"u0"}, {"u7"}, {"u1", "u6"}, {"u2", "u3", "u4"}, {f"u{i}" for i in range(8)}], ids=str
)
def test_poison_hunt_finds_every_image_that_kills_its_actor(killers):
    uris = [f"u{i}" for i in range(8)]
    found, charges, deaths = _hunt(uris, killers)
    assert found == sorted(killers)
    assert charges == 1  # the first death alone; the second bisects; the neighbour never
    assert deaths <= 3 + 2 * len(killers) * 3  # together, alone twice, then each killer's path down 8 -> 1


def test_poison_hunt_that_finds_nothing_charges_later_deaths():
    hunt = PoisonHunt()
    assert hunt.died_alone(0, ["a", "b"]) is None  # charged
    probes = hunt.died_alone(0, ["a", "b"])
    assert probes == [Probe(0, ("a",)), Probe(0, ("b",))] and hunt.hunting(0)
    for probe in probes:
        hunt.probe_passed(probe)  # the death does not repeat
    assert not hunt.hunting(0) and hunt.poison_of(0) == []
    assert hunt.died_alone(0, ["a", "b"]) is None  # bisected once: from now on each death is charged
    found, charges, _ = _hunt(["a", "b", "c"], {"b"}, nondeterministic=True)
    assert found == [] and charges == 1


def test_startup_guard_warns_once_then_gives_up_naming_the_setting():
    now = [0.0]
    guard = StartupGuard(120.0, pending_reason=lambda: "each worker needs 4 CPU", clock=lambda: now[0])
    now[0] = 20.0
    assert guard.check(any_ready=False) is None
    now[0] = 31.0
    assert guard.check(any_ready=False) == (31.0, "each worker needs 4 CPU")
    now[0] = 60.0
    assert guard.check(any_ready=False) is None  # said once
    now[0] = 121.0
    timed_out = r"no worker started within 120 s \(--startup-timeout\): each worker needs 4 CPU"
    with pytest.raises(JobError, match=timed_out):
        guard.check(any_ready=False)


def test_startup_guard_gives_up_after_failures_in_a_row_with_none_ready():
    guard = StartupGuard(600.0, max_failures=3)
    guard.failed("boom", any_ready=False)
    guard.failed("boom", any_ready=False)
    guard.started()  # a worker became ready: the count starts over
    guard.failed("boom", any_ready=False)
    guard.failed("boom", any_ready=True)
    guard.failed("boom", any_ready=True)  # three in a row, but one is ready
    with pytest.raises(JobError, match="4 workers failed to start; the last said: bang"):
        guard.failed("bang", any_ready=False)


def test_retries_give_a_unit_up_after_its_retries():
    retries: Retries[str] = Retries(1)
    assert retries.tries == 2
    assert retries.failed("a") == 1 and not retries.given_up("a")
    assert retries.failed("a") == 2 and retries.given_up("a")
    assert not retries.given_up("b")


# -- real jobs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def markers(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def ray_hooked(markers):
    """A local Ray whose workers run ``driver_hooks.install``."""
    env = driver_hooks.runtime_env(markers)
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, runtime_env=env)
    yield
    ray.shutdown()


def _job(src, dest, **kw) -> JobConfig:
    model = ModelConfig(**{**FAST_MODEL, **kw.pop("model", {})})
    options = {"shard_size": 2, "workers": 1, "cpus_per_worker": 1, "progress": "none", **kw}
    return JobConfig(source=str(src), dest=str(dest), model=model, **options)


def _rows(dest) -> list[dict]:
    table = pads.dataset(str(dest) + "/data", format="parquet").to_table()
    return sorted(table.to_pylist(), key=lambda r: r["uri"])


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_poison_image_is_found_and_costs_only_its_row(ray_hooked, tmp_path, caplog):
    """Two shards on one actor, one holding an image that kills its worker every
    time: the healthy shard is never charged, the poison one is bisected to the
    image, which gets its error row; the job completes."""
    caplog.set_level(logging.WARNING, logger="segbatch.engine")
    src = tmp_path / "images"
    poison.two_shards_one_poisoned(src)
    dest = tmp_path / "out"
    result = run_job(_job(src, dest, retries=1))

    messages = _messages(caplog)
    assert result.complete, (result.failed, messages)
    rows = _rows(dest)
    assert [Path(r["uri"]).name for r in rows] == ["a0.png", "a1.png", "b0.png", "b1.png"]  # each once
    assert {Path(r["uri"]).name: r["error"] for r in rows if r["status"] == "error"} == {"a1.png": POISON_ERROR}
    assert not any(m.startswith("shard 1 failed") for m in messages), messages  # the healthy neighbour
    assert any("shard 1 ran beside others" in m for m in messages), messages
    assert any(m.startswith("shard 0: 1 images killed their actor") for m in messages), messages
    assert result.summary.errors == 1 and result.summary.rows == 4


def test_a_task_hung_beside_a_busy_sibling_is_timed_out_on_its_own(ray_hooked, tmp_path, caplog):
    """The stall timer is the task's: a shard hung on a read is killed after
    --stall-timeout while its actor's other shards keep reporting progress, not
    once the whole queue behind it has drained.

    The siblings decode slowly (``SLOW_MARK``: 1 s each), so their queue
    certainly outlasts the 4 s timeout however fast or loaded the machine. A
    per-worker timer would see their progress and fire only 4 s after the last
    of them, with no commit after it; the task's own fires while some remain."""
    caplog.set_level(logging.WARNING, logger="segbatch.engine")
    src = tmp_path / "images"
    src.mkdir()
    (src / "a_hangs.png").write_bytes(poison.png(0) + driver_hooks.HANG_MARK)  # shard 0, with the first sibling
    siblings = 12
    for i in range(siblings):
        (src / f"img{i:02d}.png").write_bytes(poison.png(10 + i) + driver_hooks.SLOW_MARK)
    dest = tmp_path / "out"
    result = run_job(_job(src, dest, shard_size=1, retries=0, stall_timeout_s=4.0))

    messages = _messages(caplog)
    assert list(result.failed) == [0] and "worker made no progress on shard 0 for 4 s" in result.failed[0]
    assert not any(re.match(r"shard (?!0 )\d+ failed", m) for m in messages), messages  # no sibling charged
    stalled_at = next(r.created for r in caplog.records if "made no progress" in r.getMessage())
    records = [json.loads(p.read_text()) for p in (dest / "_segbatch" / "commits").glob("*.json")]
    assert len(records) == siblings and result.summary.rows == siblings
    committed = sorted(r["committed"] for r in records)
    # timed out while the siblings still ran: some committed after it (a per-worker timer: none)
    assert sum(t > stalled_at for t in committed) >= 1, (stalled_at, committed)


def test_a_lost_commit_record_leaves_the_job_incomplete_and_a_rerun_completes_it(ray_hooked, markers, tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for i in range(6):
        (src / f"img{i}.png").write_bytes(poison.png(i))
    dest = tmp_path / "out"
    (markers / "drop-record-1").touch()
    try:
        result = run_job(_job(src, dest))
    finally:
        (markers / "drop-record-1").unlink()
    assert result.progress.shards_done == 3  # the driver saw every shard committed ...
    assert not result.complete and list(result.failed) == [1]  # ... but DEST has no record of shard 1
    assert "no commit record" in result.failed[1]
    assert not result.summary.complete and result.summary.shards_committed == 2

    again = run_job(_job(src, dest))
    assert again.complete and again.summary.images_this_run == 2
    assert [Path(r["uri"]).name for r in _rows(dest)] == [f"img{i}.png" for i in range(6)]


def test_a_hung_merge_is_timed_out_retried_and_reported(ray_hooked, markers, tmp_path, caplog):
    from segbatch.train import write_aerial_raster

    caplog.set_level(logging.WARNING, logger="segbatch.engine")
    (tmp_path / "scenes").mkdir()
    write_aerial_raster(str(tmp_path / "scenes" / "scene.tif"), 256, 256, seed=1, keep_truth=False)
    dest = tmp_path / "out"
    model = {"min_size": 128, "max_size": 128}
    cfg = dict(tile_size=128, tile_overlap=16, shard_size=4, retries=1, model=model)
    assert run_job(_job(tmp_path / "scenes", dest, **cfg)).complete
    # as if the driver had died between the shard phase and the merges (a tile shard's
    # first batch can take longer than this test's short stall timeout on a busy machine)
    for record in (dest / "_segbatch" / "scenes").glob("scene-*.json"):
        record.unlink()
    cfg["stall_timeout_s"] = 5.0
    for leftover in markers.glob("merge-hung-*"):
        leftover.unlink()
    (markers / "hang-merge").touch()  # each merge hangs reading its tiles (for 60 s, then merges)
    try:
        result = run_job(_job(tmp_path / "scenes", dest, **cfg))
    finally:
        (markers / "hang-merge").unlink()
    assert not result.failed and list(result.failed_scenes) == [str(tmp_path / "scenes" / "scene.tif")]
    assert "merging made no progress for 5 s (--stall-timeout)" in next(iter(result.failed_scenes.values()))
    assert any(m.startswith("merging scene") and "attempt 1 of 2" in m for m in _messages(caplog))
    assert not list((dest / "_segbatch" / "scenes").glob("scene-*.json"))  # nothing published
    # each attempt hung in a process of its own, and the guard killed it: none is left to
    # wake up later (its marker gone) and publish a merge the driver gave up on
    hung = driver_hooks.hung_merge_pids(markers)
    assert len(hung) == 2, hung
    assert _wait_until(lambda: not any(map(_alive, hung)), 20), [p for p in hung if _alive(p)]

    again = run_job(_job(tmp_path / "scenes", dest, **cfg))
    assert again.complete and len(_rows(dest)) == 1
    assert driver_hooks.hung_merge_pids(markers) == hung  # the rerun did not hang


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _s3_rows(s3, prefix: str) -> list[dict]:
    """The rows of every data file under ``prefix``, listed and read with boto3
    (a second client, no listing cache: an s3fs filesystem kept across the
    rerun lists the new files, then refuses to open them from its stale cache)."""
    import io

    import pyarrow.parquet as pq

    keys = [k for k in s3.keys(prefix) if k.endswith(".parquet")]
    rows = [r for k in keys for r in pq.read_table(io.BytesIO(s3.get(k))).to_pylist()]
    return sorted(rows, key=lambda r: r["uri"])


def test_access_revoked_on_the_source_stops_the_job_without_a_row(ray_hooked, s3, s3_server, caplog):
    """Three distinct objects denied: the job stops with one message naming the
    fix, no worker is replaced, nothing denied becomes a row; once access is
    back, the same command completes the job."""
    from faultproxy import FaultProxy

    caplog.set_level(logging.WARNING, logger="segbatch.engine")
    denied = sorted(s3.put(f"in/a/img{i}.png", poison.png(i)) for i in range(3))
    healthy = sorted(s3.put(f"in/b/img{i}.png", poison.png(10 + i)) for i in range(3))
    with FaultProxy(s3_server, rate=0.0) as proxy:
        options = s3.options_via(proxy.endpoint)
        cfg = _job(s3.url("in/"), s3.url("out/"), shard_size=1, retries=3, storage_options=options)
        proxy.deny(f"/{s3.bucket}/in/a/", code="AccessDenied")
        with pytest.raises(StoreUnavailable) as stopped:
            run_job(cfg)
        message = str(stopped.value)
        assert "expired or were revoked" in message and "AccessDenied on 3 objects" in message, message
        assert f"s3://{s3.bucket}/in/a/..." in message and message.endswith("run the same command again: it resumes")
        assert message.count("run the same command again") == 1, message  # the fix once, not each fault's own too
        assert stopped.value.exit_code == 1
        assert not any("replacing it" in m for m in _messages(caplog)), _messages(caplog)
        # what the stopped job left in the dataset: committed shards only, each row ok, none denied
        records = [json.loads(s3.get(k)) for k in s3.keys("out/_segbatch/commits/")]
        rows = _s3_rows(s3, "out/data/")
        assert len(rows) == sum(r["rows"] for r in records), (rows, records)
        assert all(r["status"] == "ok" for r in rows), rows
        assert not {r["uri"] for r in rows} & set(denied), rows

        proxy.allow()  # access restored
        result = run_job(cfg)
    assert result.complete, result.failed
    rows = _s3_rows(s3, "out/data/")
    assert [r["uri"] for r in rows] == denied + healthy and all(r["status"] == "ok" for r in rows)


def test_the_worker_writes_poison_rows_without_reading_them(ray_hooked, tmp_path):
    """A poison URI given to ``process`` gets its error row and is never read
    (here: it does not even exist); a probe runs the images and writes nothing."""
    from segbatch.engine import SegmentWorker
    from segbatch.model import resolve_model
    from segbatch.storage import Storage

    src = tmp_path / "images"
    src.mkdir()
    (src / "ok.png").write_bytes(poison.png(0))
    cfg = _job(src, tmp_path / "out")
    spec = resolve_model(cfg.model, Storage().read_bytes)
    worker = ray.remote(SegmentWorker).remote(cfg, spec, "key")
    missing = str(src / "killer.png")
    events = []
    gen = worker.process.remote(7, [str(src / "ok.png"), missing], None, [missing])
    for ref in gen:
        events.append(ray.get(ref))
    assert isinstance(events[-1], Committed) and events[-1].record.errors == 1 and events[-1].record.rows == 2
    rows = _rows(tmp_path / "out")
    assert [(Path(r["uri"]).name, r["error"]) for r in rows] == [("killer.png", POISON_ERROR), ("ok.png", None)]
    probe = [ray.get(ref) for ref in worker.process.remote(8, [str(src / "ok.png")], None, None, True)]
    assert probe[-1] == Probed(shard=8, images=1)
    assert not any(re.match(r"part-0*8", p.name) for p in (tmp_path / "out" / "data").iterdir())  # probes write nothing
    ray.kill(worker)
