"""Reading images from S3: requests and seconds per image, as the workers read them.

Run: ``python bench/bench_reads.py [--images 200 --size 1280x720 --threads 8]``

moto's S3 server on 127.0.0.1 holds ``--images`` JPEGs of real photographs
(``common.photo_jpeg``). Each is read with ``Storage.read_bytes(uri,
max_bytes=...)``, the call a worker's I/O threads make for every image
(the size limit is the contract's guard against oversized files), once
one by one and once from ``--threads`` threads as the pipeline does. The
reads go through a forwarding proxy on 127.0.0.1 that counts the HTTP
requests (``tests/faultproxy.py`` with no faults); the times are those of
direct reads. Loopback has no network latency: on a real object store
each request costs a round trip of ~10-30 ms, so requests per image is
the figure that carries over.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout first on sys.path)

sys.path.insert(0, str(common.ROOT / "tests"))
from faultproxy import FaultProxy  # noqa: E402

MAX_BYTES = 512 * 1024 * 1024  # JobConfig.max_bytes' default


def read_all(storage, uris: list[str], threads: int) -> float:
    """Seconds to read every URI with ``threads`` threads (1: one by one)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(lambda u: len(storage.read_bytes(u, max_bytes=MAX_BYTES)), uris))
    assert all(sizes)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT of each JPEG.")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="Timed passes; the median is reported.")
    args = ap.parse_args()
    width, height = common.parse_size(args.size)

    from segbatch.storage import Storage

    server, endpoint = common.start_moto()
    try:
        client = common.boto_client(endpoint)
        client.create_bucket(Bucket="reads")
        jpegs = [common.photo_jpeg(i, width, height) for i in range(min(args.images, 16))]
        uris = []
        for i in range(args.images):
            client.put_object(Bucket="reads", Key=f"img/{i:06d}.jpg", Body=jpegs[i % len(jpegs)])
            uris.append(f"s3://reads/img/{i:06d}.jpg")

        with FaultProxy(endpoint, rate=0.0) as proxy:
            read_all(Storage(common.storage_options(proxy.endpoint)), uris, args.threads)
            requests = proxy.counts["forwarded"]

        storage = Storage(common.storage_options(endpoint))
        read_all(storage, uris[: min(20, len(uris))], args.threads)  # connections and credentials, untimed
        one = statistics.median(read_all(storage, uris, 1) for _ in range(args.repeats))
        many = statistics.median(read_all(storage, uris, args.threads) for _ in range(args.repeats))
    finally:
        server.stop()

    mean_kib = sum(len(j) for j in jpegs) / len(jpegs) / 1024
    print(f"`python bench/bench_reads.py {' '.join(sys.argv[1:])}`; {common.machine_text()}\n")
    print(
        "| images | mean size | HTTP requests per image | ms per image, one by one | images/s, "
        f"{args.threads} threads |"
    )
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| {args.images} | {mean_kib:.0f} KiB | {requests / args.images:.2f} | "
        f"{1000 * one / args.images:.2f} | {args.images / many:.0f} |"
    )


if __name__ == "__main__":
    main()
