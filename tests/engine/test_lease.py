"""One driver per DEST (``segbatch.engine.lease``): a conditional create, a heartbeat,
a stale or dead holder taken over by exactly one driver; locally and on S3 (moto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from segbatch.cli import main
from segbatch.config import JobConfig, ModelConfig
from segbatch.engine import DestInUse, Holder, Lease, run_job
from segbatch.storage import Storage, join

from s3util import S3Bucket


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "s3"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Storage]:
    """A DEST on a local disk, then on S3 (moto's server over HTTP)."""
    if request.param == "local":
        return str(tmp_path / "dest"), Storage()
    s3: S3Bucket = request.getfixturevalue("s3")
    return s3.url("out/dest"), Storage(s3.storage_options)


def _lease(dest: tuple[str, Storage], clock: Clock | None = None) -> Lease:
    return Lease(dest[0], dest[1], clock=clock or Clock())


def test_create_new_creates_once(dest):
    url, storage = join(dest[0], "_segbatch", "x.json"), dest[1]
    assert storage.create_new(url, b"first") is True
    assert storage.create_new(url, b"second") is False
    assert storage.read_bytes(url) == b"first"
    assert storage.listdir_names(join(dest[0], "_segbatch")) == ["x.json"]  # no file left aside


def test_create_new_has_one_winner_among_racers(dest):
    url, storage = join(dest[0], "_segbatch", "race.json"), dest[1]
    barrier, wins = threading.Barrier(8), []

    def race(i: int) -> None:
        barrier.wait()
        if storage.create_new(url, str(i).encode()):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and storage.read_bytes(url) == str(wins[0]).encode()


def test_second_driver_is_refused_naming_the_holder(dest):
    clock = Clock()
    first = _lease(dest, clock)
    first.acquire(heartbeat=False)
    clock.now += 40
    with pytest.raises(DestInUse) as refused:
        _lease(dest, clock).acquire(heartbeat=False)
    message = str(refused.value)
    holder = first.holder()
    assert holder is not None and holder.id == first.id
    assert f"host {holder.host}, pid {os.getpid()}" in message and "renewed 40 s ago" in message
    assert "segbatch status" in message and "in 80 s" in message  # when it would go stale
    first.release()
    assert first.holder() is None
    second = _lease(dest, clock)
    second.acquire(heartbeat=False)  # free again
    second.release()


def test_stale_lease_is_taken_over_and_its_old_holder_knows(dest):
    clock = Clock()
    old = _lease(dest, clock)
    old.acquire(heartbeat=False)
    clock.now += 100
    assert old.renew()  # renewed in time: still refused 100 s later
    clock.now += 100
    with pytest.raises(DestInUse):
        _lease(dest, clock).acquire(heartbeat=False)
    clock.now += 21  # 121 s without a renewal: stale
    new = _lease(dest, clock)
    new.acquire(heartbeat=False)
    assert new.holder().id == new.id
    assert not old.renew() and old.lost  # the old driver's heartbeat finds it lost
    old.release()  # and never removes the new holder's lease
    assert new.holder().id == new.id
    new.release()
    assert new.holder() is None
    assert dest[1].listdir_names(join(dest[0], "_segbatch")) == []  # no takeover marker left


def test_one_of_many_takers_of_a_stale_lease_wins(dest):
    clock = Clock()
    _lease(dest, clock).acquire(heartbeat=False)  # never renewed: a driver that hung
    clock.now += 200
    takers = [_lease(dest, clock) for _ in range(6)]
    barrier, won, refused = threading.Barrier(len(takers)), [], []

    def take(lease: Lease) -> None:
        barrier.wait()
        try:
            lease.acquire(heartbeat=False)
            won.append(lease)
        except DestInUse as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == len(takers) - 1, (won, refused)
    assert won[0].holder().id == won[0].id


def test_a_taker_that_lost_its_race_later_does_not_take_over(dest):
    """A slow taker that saw the stale lease acts after the winner is done:
    the lease it would replace is no longer the one it saw."""
    clock = Clock()
    hung = _lease(dest, clock)
    hung.acquire(heartbeat=False)
    clock.now += 200
    stale = hung.holder()
    winner, slow = _lease(dest, clock), _lease(dest, clock)
    winner.acquire(heartbeat=False)
    slow._started = clock.now
    assert slow._take_over(stale) is False
    assert winner.holder().id == winner.id


def test_a_taker_that_died_mid_takeover_blocks_nobody_for_long(dest):
    clock = Clock()
    hung = _lease(dest, clock)
    hung.acquire(heartbeat=False)
    clock.now += 200
    # a taker created its marker, then died before writing the lease
    marker = join(dest[0], "_segbatch", f"lease.takeover-{hung.id}-0.json")
    dying = Holder("dying", "elsewhere", 1, clock.now, clock.now, machine="another machine")
    assert dest[1].create_new(marker, dying.to_bytes())
    with pytest.raises(DestInUse):  # it might still be writing
        _lease(dest, clock).acquire(heartbeat=False)
    clock.now += 121
    taker = _lease(dest, clock)
    taker.acquire(heartbeat=False)
    assert taker.holder().id == taker.id


def test_heartbeat_renews_until_released(tmp_path: Path):
    lease = Lease(str(tmp_path / "dest"), Storage(), heartbeat_s=0.05, stale_s=1.0)
    lease.acquire()
    first = lease.holder().renewed
    deadline = time.monotonic() + 10
    while lease.holder().renewed == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.holder().renewed > first
    lease.release()
    assert lease.holder() is None and lease._thread is None


def test_killed_driver_lease_is_taken_over_at_once_on_its_machine(tmp_path: Path):
    """A driver killed with SIGKILL leaves its lease; on the machine it ran on the
    next driver sees its process gone and takes over without waiting."""
    dest = str(tmp_path / "dest")
    code = (
        "import sys, time\n"
        "from segbatch.engine import Lease\n"
        "from segbatch.storage import Storage\n"
        f"Lease({dest!r}, Storage()).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(DestInUse, match=f"pid {proc.pid}"):  # alive: refused
            Lease(dest, Storage()).acquire(heartbeat=False)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    lease = Lease(dest, Storage())
    lease.acquire(heartbeat=False)  # at once, no STALE_S wait
    assert lease.holder().id == lease.id
    lease.release()


def test_killed_driver_on_another_machine_goes_stale(dest):
    clock = Clock()
    url = join(dest[0], "_segbatch", "lease.json")
    # a driver on another host (another machine id), killed: its pid means nothing here
    gone = Holder("gone", "node-7", os.getpid(), clock.now, clock.now, machine="boot-of-node-7:1")
    dest[1].write_bytes(url, gone.to_bytes())
    clock.now += 60
    with pytest.raises(DestInUse, match="host node-7, pid"):
        _lease(dest, clock).acquire(heartbeat=False)
    clock.now += 61
    taker = _lease(dest, clock)
    taker.acquire(heartbeat=False)
    assert taker.holder().id == taker.id


def test_a_file_that_is_no_lease_is_never_taken_over(tmp_path: Path):
    dest = tmp_path / "dest"
    (dest / "_segbatch").mkdir(parents=True)
    (dest / "_segbatch" / "lease.json").write_text("not json")
    with pytest.raises(DestInUse, match="not a segbatch lease; .*delete that file"):
        Lease(str(dest), Storage()).acquire(heartbeat=False)


# -- the driver holds the lease for its whole run -----------------------------------


def _cfg(src: Path, dest: Path) -> JobConfig:
    return JobConfig(source=str(src), dest=str(dest), model=ModelConfig(model="random"), progress="none")


def test_a_second_run_is_refused_and_leaves_dest_alone(tmp_path: Path):
    src, dest = tmp_path / "images", tmp_path / "out"
    src.mkdir()
    holder = Lease(str(dest), Storage())
    holder.acquire(heartbeat=False)
    try:
        with pytest.raises(DestInUse, match=f"in use by segbatch on host .*, pid {os.getpid()}"):
            run_job(_cfg(src, dest))
        assert sorted(p.name for p in (dest / "_segbatch").iterdir()) == ["lease.json"]  # no plan, no config
        result = CliRunner().invoke(main, ["run", str(src), str(dest), "--model", "random", "--progress", "none"])
        assert result.exit_code == 1 and "in use by segbatch on host" in result.output
        assert "Traceback" not in result.output
    finally:
        holder.release()


def test_the_lease_is_released_when_the_run_fails(tmp_path: Path):
    src, dest = tmp_path / "nothing-here", tmp_path / "out"
    with pytest.raises(Exception, match="does not exist"):  # the source is missing: prepare raises
        run_job(_cfg(src, dest))
    assert not (dest / "_segbatch" / "lease.json").exists()
    lease = Lease(str(dest), Storage())
    lease.acquire(heartbeat=False)  # free at once
    lease.release()


def test_lease_file_is_json_naming_the_holder(tmp_path: Path):
    lease = Lease(str(tmp_path), Storage())
    lease.acquire(heartbeat=False)
    body = json.loads((tmp_path / "_segbatch" / "lease.json").read_text())
    assert body["id"] == lease.id and body["pid"] == os.getpid() and body["host"] and body["started"] > 0
    lease.release()
