"""The driver at archive scale (issue 18): a sorted Parquet manifest of 1M, 10M
or 30M URIs, run by ``segbatch run`` with the fast random model on one CPU
worker. The URIs name files that do not exist, so each shard is 256 "not
found" rows and only the engine counts.

Run: ``python bench/bench_scale.py --sizes 1000000 10000000 30000000 [--segbatch-path OLD_CHECKOUT]``

For each size, printed (the driver is the `segbatch run` process; its peak RSS is VmHWM):
- fresh: seconds from start to the first commit record, and the driver's peak RSS over
  ``--window`` seconds after it (the listing goes on meanwhile); then the driver is killed;
- resume: a DEST whose plan is whole with the whole blocks of shards in its first half committed
  (commit blocks written by the bench, as a killed run that folded them leaves them): seconds
  to the first new commit, and the driver's peak RSS over the window;
- status: seconds of ``segbatch status DEST`` on that DEST.

``--segbatch-path`` runs another checkout (the code before a change) for the fresh run only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ARGS = ["--model", "random", "--seed", "5", "--min-size", "64", "--max-size", "96", "--progress", "none"]
ARGS += ["--workers", "1", "--cpus-per-worker", "1", "--shard-size", "256"]


def write_manifest(path: Path, n: int) -> None:
    """``n`` sorted URIs of files that do not exist, in row groups of 1M (written a group at a time)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = pa.schema([("uri", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, 1_000_000):
            ids = pa.array(np.arange(start, min(n, start + 1_000_000)))
            names = pc.utf8_lpad(pc.cast(ids, pa.string()), 9, "0")
            uris = pc.binary_join_element_wise("/nonexistent/archive/", names, ".jpg", "")
            writer.write_table(pa.table({"uri": uris}, schema=schema))


def half_committed(dest: str, manifest: Path) -> int:
    """DEST with the manifest's whole plan and the whole commit blocks of its first half of
    shards written; returns the number of shards."""
    import pyarrow as pa

    from segbatch.engine import JobStore
    from segbatch.engine.planner import Planner
    from segbatch.engine.records import CommitRecord
    from segbatch.storage import Storage
    from segbatch.storage.sources import stream_sources

    storage = Storage()
    store = JobStore(dest, storage)
    Planner(store.plan, stream_sources(str(manifest), storage, dest=dest), 256, set()).plan_all()
    num_shards = store.plan_info()["num_shards"]
    block = store.commits.block
    for b in range(num_shards // 2 // block):
        ids = list(range(b * block, (b + 1) * block))
        records = [
            json.dumps(CommitRecord(rows=256, errors=256, shard=i, file=store.data_url(i)).to_json()) for i in ids
        ]
        table = pa.table({"shard": pa.array(ids, pa.int64()), "record": pa.array(records, pa.string())})
        storage.write_parquet(table, store.commits.meta.url("commits", f"block-{ids[0]:08d}-{ids[-1]:08d}.parquet"))
    return num_shards


def run_until_first_commit(manifest: Path, dest: str, window: float, env: dict[str, str]) -> dict:
    """Start ``segbatch run``; seconds to the first new commit record, then peak RSS over ``window`` s."""
    commits = Path(dest, "_segbatch", "commits")
    before = set(os.listdir(commits)) if commits.exists() else set()
    cmd = [sys.executable, "-m", "segbatch.cli", "run", str(manifest), dest, *ARGS]
    t0 = time.perf_counter()
    # cwd: not a checkout, whose segbatch/ `python -m` would put before PYTHONPATH's
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=tempfile.gettempdir(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    first = None
    peak = 0
    try:
        while proc.poll() is None:
            peak = max(peak, common.status_kib(proc.pid) or 0)
            if (
                first is None
                and commits.exists()
                and any(n.startswith("part-") for n in set(os.listdir(commits)) - before)
            ):
                first = time.perf_counter() - t0
            if first is not None and time.perf_counter() - t0 > first + window:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in common.session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if first is None:
        raise RuntimeError(f"no shard committed; stderr: {proc.stderr.read().decode()[-2000:]}")
    return {"first_commit_s": round(first, 1), "driver_peak_mib": round(peak / 1024)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--window", type=float, default=20.0, help="seconds the driver runs after its first commit")
    parser.add_argument("--segbatch-path", help="another checkout to run for the fresh run (the code before)")
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)
    print(common.machine_text())
    env = dict(os.environ, PYTHONPATH=str(Path(args.segbatch_path or common.ROOT).resolve()))
    env.pop("RAY_ADDRESS", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-", dir=os.environ.get("BENCH_TMP")) as tmp:
        for n in args.sizes:
            manifest = Path(tmp, f"manifest-{n}.parquet")
            write_manifest(manifest, n)
            row = {"uris": n, "fresh": run_until_first_commit(manifest, str(Path(tmp, f"fresh-{n}")), args.window, env)}
            print(json.dumps(row), flush=True)
            if not args.no_resume:
                dest = str(Path(tmp, f"half-{n}"))
                t = time.perf_counter()
                row["shards"] = half_committed(dest, manifest)
                row["setup_s"] = round(time.perf_counter() - t, 1)
                row["resume"] = run_until_first_commit(manifest, dest, args.window, env)
                t = time.perf_counter()
                status = [sys.executable, "-m", "segbatch.cli", "status", dest]
                subprocess.run(status, env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
                row["status_s"] = round(time.perf_counter() - t, 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
