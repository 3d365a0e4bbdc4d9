"""Reading a large raster's tiles from S3: HTTP requests, bytes and seconds per tile.

Run: ``python bench/bench_tile_reads.py [--size 4096 --tile 1024 --overlap 64 --threads 1]``

moto's S3 server on 127.0.0.1 holds two versions of one ``--size`` square
aerial scene (``segbatch.train.synth.write_aerial_raster``): the tiled GeoTIFF it
writes (256-pixel blocks, deflate) and a COG of it (512-pixel blocks). Each
scene's header is read once with ``geo.raster_info``, as the driver does,
and then every tile of ``geo.plan_windows`` is read with
``geo.read_tile``, as a worker's I/O threads do, by ``TileReading`` when
``--threads`` > 1 (through ``pipeline.fetch_and_decode``, with a shard's
``TileReading``, so whatever it keeps between tiles counts). The reads go
through a forwarding proxy on 127.0.0.1 that counts the HTTP requests and
the bytes of their responses (``tests/faultproxy.py`` with no faults); the
times are those of direct reads. Loopback has no network latency: on a real
object store each request costs a round trip of ~10-30 ms and each byte its
share of the bandwidth, so requests and bytes per tile are the figures that
carry over.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout first on sys.path)

sys.path.insert(0, str(common.ROOT / "tests"))
from faultproxy import FaultProxy  # noqa: E402


def write_scenes(folder: Path, size: int) -> dict[str, Path]:
    """The bench's two scenes: the synthetic tiled GeoTIFF and a COG of it."""
    import rasterio
    from rasterio.shutil import copy as rio_copy

    from segbatch.train import write_aerial_raster

    gtiff = folder / "scene.tif"
    write_aerial_raster(str(gtiff), size, size, seed=11, keep_truth=False)
    cog = folder / "scene_cog.tif"
    with rasterio.open(gtiff) as src:
        rio_copy(src, str(cog), driver="COG", blocksize=512, compress="DEFLATE", overview_resampling="average")
    return {"GeoTIFF, 256 blocks": gtiff, "COG, 512 blocks": cog}


def count_bytes(proxy: FaultProxy) -> None:
    """Make ``proxy`` also count, as ``counts["bytes"]``, the body bytes of its GET responses."""
    base = proxy._server.RequestHandlerClass

    class Counting(base):
        def send_header(self, keyword: str, value: str) -> None:
            if self.command == "GET" and keyword.lower() == "content-length":
                with proxy._lock:
                    proxy.counts["bytes"] += int(value)
            super().send_header(keyword, value)

    proxy._server.RequestHandlerClass = Counting


def read_tiles(storage, uri: str, info, args: argparse.Namespace) -> float:
    """Seconds to read every tile of ``uri`` with ``args.threads`` threads, as a shard's I/O threads do."""
    from segbatch.engine import TileReading, fetch_and_decode
    from segbatch.geo import plan_windows, tile_item

    items = [tile_item(uri, w) for w in plan_windows(info.width, info.height, args.tile, args.overlap)]
    tiles = TileReading({uri: info})
    started = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        out = list(pool.map(lambda it: fetch_and_decode(it, storage, 1 << 30, 10**9, tiles=tiles), items))
    _close(tiles)
    elapsed = time.perf_counter() - started
    failed = [d.error_row for d in out if d.error_row is not None]
    assert not failed, failed[0]
    assert all(d.image.shape == (args.tile, args.tile, 3) for d in out)
    return elapsed


def _close(tiles) -> None:
    """End the shard: what ``TileReading`` keeps open between tiles, if anything, is closed."""
    close = getattr(tiles, "close", None)
    if close is not None:
        close()


def measure(endpoint: str, uri: str, args: argparse.Namespace) -> dict[str, float]:
    """Requests, bytes and median seconds of reading every tile of ``uri`` once."""
    from segbatch.geo import TileOptions, plan_windows, raster_info
    from segbatch.storage import Storage

    options = TileOptions(args.tile, args.overlap)
    with FaultProxy(endpoint, rate=0.0) as proxy:
        count_bytes(proxy)
        counted = Storage(common.storage_options(proxy.endpoint))
        info = raster_info(uri, counted, options)
        header = dict(proxy.counts)
        read_tiles(counted, uri, info, args)
        requests = proxy.counts["forwarded"] - header.get("forwarded", 0)
        nbytes = proxy.counts["bytes"] - header.get("bytes", 0)
    storage = Storage(common.storage_options(endpoint))
    read_tiles(storage, uri, info, args)  # connections and credentials, untimed
    seconds = statistics.median(read_tiles(storage, uri, info, args) for _ in range(args.repeats))
    n = len(plan_windows(info.width, info.height, args.tile, args.overlap))
    return {"tiles": n, "requests": requests / n, "mib": nbytes / n / 2**20, "ms": 1000 * seconds / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="Width and height of the scene, pixels.")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="I/O threads reading the tiles (the pipeline's io_threads).")
    ap.add_argument("--repeats", type=int, default=3, help="Timed passes; the median is reported.")
    args = ap.parse_args()

    server, endpoint = common.start_moto()
    rows = []
    try:
        client = common.boto_client(endpoint)
        client.create_bucket(Bucket="tiles")
        with tempfile.TemporaryDirectory() as tmp:
            scenes = write_scenes(Path(tmp), args.size)
            # all uploaded before any read: s3fs caches the bucket's listing, which would miss a later one
            for path in scenes.values():
                client.put_object(Bucket="tiles", Key=path.name, Body=path.read_bytes())
            for name, path in scenes.items():
                mib = path.stat().st_size / 2**20
                rows.append((name, mib, measure(endpoint, f"s3://tiles/{path.name}", args)))
    finally:
        server.stop()

    print(f"`python bench/bench_tile_reads.py {' '.join(sys.argv[1:])}`; {common.machine_text()}\n")
    print(
        f"| scene ({args.size} px) | file | tiles ({args.tile} px, overlap {args.overlap}) | HTTP requests per tile "
        f"| MiB fetched per tile | ms per tile, {args.threads} thread(s) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, mib, m in rows:
        print(f"| {name} | {mib:.1f} MiB | {m['tiles']} | {m['requests']:.2f} | {m['mib']:.2f} | {m['ms']:.1f} |")


if __name__ == "__main__":
    main()
