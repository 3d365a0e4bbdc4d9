"""Listing a large prefix: one flat listing against the fan-out over sub-prefixes (issue 18).

Run: ``python bench/bench_listing.py [--keys 20000 --prefixes 40 --latency-ms 30]``

``--keys`` objects spread over ``--prefixes`` sub-prefixes (``archive/pNNN/``, as a date or a
camera folder splits an archive) on moto's S3 on 127.0.0.1, reached through the tests' fault proxy
(``tests/faultproxy.py``) that delays every GET by ``--latency-ms``: moto answers in a millisecond,
S3 in tens (a LIST page of 1000 keys takes 50-100 ms there). Timed, each from a fresh ``Storage``:
fsspec's flat ``find`` of the prefix (what ``Storage.list_files`` did before) and
``Storage.list_files`` (delimiter listings, then the sub-prefixes listed in parallel). Both must
give the same keys.
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
    from segbatch.storage import Storage
    from segbatch.storage.urls import url_like

    from faultproxy import FaultProxy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--prefixes", type=int, default=40)
    parser.add_argument("--latency-ms", type=float, default=30.0, help="added to every GET (a LIST is a GET)")
    args = parser.parse_args(argv)

    server, endpoint = common.start_moto()
    client = common.boto_client(endpoint)
    client.create_bucket(Bucket="bench")
    keys = [f"archive/p{i % args.prefixes:03d}/{i:08d}.jpg" for i in range(args.keys)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket="bench", Key=k, Body=b"x"), keys))
    results = []
    with FaultProxy(endpoint, rate=0.0) as proxy:
        proxy.slow("/", args.latency_ms / 1000.0)
        options = common.storage_options(proxy.endpoint)
        url = "s3://bench/archive/"

        def flat() -> list[str]:
            fs, path = Storage(options).fs(url)
            return sorted(url_like(url, p) for p in fs.find(path))

        for name, fn in (("flat find", flat), ("fanned out (list_files)", lambda: Storage(options).list_files(url))):
            t0 = time.perf_counter()
            found = fn()
            seconds = time.perf_counter() - t0
            assert found == sorted(f"s3://bench/{k}" for k in keys), name
            results.append({"method": name, "seconds": seconds, "keys": len(found)})
    server.stop()
    print(f"| {args.keys} keys in {args.prefixes} prefixes, +{args.latency_ms:g} ms a request | seconds | keys/s |")
    print("|---|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['seconds']:.2f} | {r['keys'] / r['seconds']:,.0f} |")
    return results


if __name__ == "__main__":
    main()
