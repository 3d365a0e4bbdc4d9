"""Listing a large S3 prefix (issue 18): fsspec's flat ``find`` (the whole listing, then the plan)
against ``Storage.list_pages`` (the stream the planner reads), its sub-prefixes listed one at a
time and 16 at a time.

Run: ``python bench/bench_listing.py [--keys 20000 --prefixes 40 --latency-ms 50]``

``--keys`` objects in ``--prefixes`` sub-prefixes (``archive/pNNN/``, as a day or a camera
splits an archive) on moto's S3 on 127.0.0.1, through the tests' fault proxy
(``tests/faultproxy.py``), which delays every request by ``--latency-ms`` (moto answers in a
millisecond, S3's LIST page of 1,000 keys in 50-100 ms). Printed for each: seconds to the first
keys (when the planner can start) and to the last; all three must give the same keys.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import common  # noqa: E402  (puts the checkout first on sys.path)


def main(argv: list[str] | None = None) -> list[dict]:
    from segbatch.storage import Storage, listing
    from segbatch.storage.urls import url_like

    from faultproxy import FaultProxy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--prefixes", type=int, default=40)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added to every request")
    args = parser.parse_args(argv)
    print(common.machine_text())

    server, endpoint = common.start_moto()
    client = common.boto_client(endpoint)
    client.create_bucket(Bucket="bench")
    keys = sorted(f"archive/p{i % args.prefixes:03d}/{i:08d}.jpg" for i in range(args.keys))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket="bench", Key=k, Body=b"x"), keys))
    url = "s3://bench/archive/"
    expected = [f"s3://bench/{k}" for k in keys]
    rows = []
    with FaultProxy(endpoint, rate=0.0) as proxy:
        proxy.slow("/", args.latency_ms / 1000.0, methods=("GET", "HEAD"))
        options = common.storage_options(proxy.endpoint)

        def find():
            fs, path = Storage(options).fs(url)
            yield sorted(url_like(url, p) for p in fs.find(path))

        def pages(lookahead: int):
            def run():
                listing.LOOKAHEAD = lookahead
                yield from Storage(options).list_pages(url)

            return run

        for name, run in (
            ("fsspec find, flat", find),
            ("list_pages, 1 at a time", pages(1)),
            ("list_pages, 16 at a time", pages(16)),
        ):
            t0 = time.perf_counter()
            first, found = None, []
            for batch in run():
                first = first if first is not None else time.perf_counter() - t0
                found += batch
            total = time.perf_counter() - t0
            assert found == expected, name
            row = {"listing": name, "first_keys_s": round(first, 2), "all_keys_s": round(total, 2)}
            print(f"{name:26s} first keys {first:6.2f} s, all {len(found)} keys {total:6.2f} s", flush=True)
            rows.append(row)
    server.stop()
    return rows


if __name__ == "__main__":
    main()
