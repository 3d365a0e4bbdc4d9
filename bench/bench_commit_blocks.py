"""What a rerun and ``segbatch status`` pay to learn what is done: one JSON record per shard
against the records folded into block files (issue 18).

Run: ``python bench/bench_commit_blocks.py [--shards 40000] [--storage local|s3]``

A plan of ``--shards`` shards (of one URI each: the plan's size does not matter here) is
committed twice under two DESTs, records only (no data files), by ``CommitLog``: once one JSON
record per shard (how every shard commits), once folded by ``Compactor`` into blocks of
``commits.BLOCK_SHARDS`` (how a run leaves them). Timed on each, fresh ``JobStore`` each time:
``committed()`` (what a rerun reads before it starts) and ``commit_records()`` (what ``status``
and the job's summary read). ``--storage s3`` puts both DESTs on a moto S3 server on 127.0.0.1
(writing 40,000 records there takes minutes: try ``--shards 4000``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (puts the checkout first on sys.path)


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> list[dict]:
    from segbatch.engine import CommitRecord, JobStore, commits
    from segbatch.storage import Storage

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=40_000, help="10M images in shards of 256: 39,063")
    parser.add_argument("--storage", choices=["local", "s3"], default="local")
    args = parser.parse_args(argv)

    if args.storage == "s3":
        server, endpoint = common.start_moto()
        common.boto_client(endpoint).create_bucket(Bucket="bench")
        storage, root = Storage(common.storage_options(endpoint)), "s3://bench"
    else:
        storage, root = Storage(), tempfile.mkdtemp(prefix="commit-blocks-")
    uris = [f"s3://archive/{i:08d}.jpg" for i in range(args.shards)]
    results = []
    for folded in (False, True):
        dest = f"{root}/{'blocks' if folded else 'records'}"
        store = JobStore(dest, storage)
        store.write_plan(uris, 1)
        log = store.commits
        compactor = store.compactor(args.shards, set()) if folded else None

        def write(sid: int, log=log) -> CommitRecord:
            record = CommitRecord(rows=1, detections=3, shard=sid, file=log.data_url(sid), committed=time.time())
            log.storage.write_bytes(log.commit_url(sid), json.dumps(record.to_json()).encode())
            return record

        t_write, written = _timed(lambda: list(ThreadPoolExecutor(16).map(write, range(args.shards))))
        t_fold = 0.0
        if compactor is not None:
            t0 = time.perf_counter()
            for record in written:
                compactor.committed(record)
            t_fold = time.perf_counter() - t0
        fresh = JobStore(dest, storage)
        t_committed, done = _timed(fresh.committed)
        t_records, records = _timed(JobStore(dest, storage).commit_records)
        assert len(done) == len(records) == args.shards
        results.append(
            {
                "kind": f"blocks of {commits.BLOCK_SHARDS}" if folded else "one JSON per shard",
                "files": len(storage.listdir_names(f"{dest}/_segbatch/commits")),
                "write_s": t_write,
                "fold_s": t_fold,
                "committed_s": t_committed,
                "records_s": t_records,
            }
        )
    print(f"| {args.shards} shards on {args.storage} | files | committed() | commit_records() | folding |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['kind']} | {r['files']} | {r['committed_s']:.3f} s | {r['records_s']:.3f} s | {r['fold_s']:.2f} s |"
        )
    if args.storage == "s3":
        server.stop()
    return results


if __name__ == "__main__":
    main()
