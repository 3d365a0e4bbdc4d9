"""Reading a static STAC catalog as SOURCE: what planning from a catalog of N items costs.

Run: ``python bench/bench_stac_plan.py [--items 2000]``

A self-contained catalog (one Catalog, ``--items`` Items, each with a
``visual`` asset href that is never read) is written with pystac into a
temporary folder, uploaded to a local moto S3, and read by
``storage.stac.read_stac`` as the driver does: from the local folder, then
from ``s3://`` (one GET per item JSON), with the item JSONs read one at a
time (``--threads 1``, as pystac's own walk does) and 16 at a time (segbatch's
``_walk``); then again through ``tests/faultproxy.py`` adding 20 ms to each
GET, as a remote store's latency would. moto runs in a child process, so its
CPU is not the walk's GIL.
Prints the seconds and items/s of each.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (puts the checkout first on sys.path)

sys.path.insert(0, str(common.ROOT / "tests"))
from faultproxy import FaultProxy  # noqa: E402


def write_catalog(root: Path, n: int) -> Path:
    import pystac

    catalog = pystac.Catalog("bench", "bench catalog")
    for i in range(n):
        bbox = [0.0, 0.0, 1.0, 1.0]
        geometry = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]}
        item = pystac.Item(f"scene-{i:06d}", geometry, bbox, datetime.datetime(2026, 1, 1), {})
        item.add_asset("visual", pystac.Asset("./visual.tif", media_type=pystac.MediaType.COG))
        catalog.add_item(item)
    catalog.normalize_hrefs(str(root))
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args()
    os.environ.update(common.aws_env())

    from segbatch.storage import Storage
    from segbatch.storage import stac as stac_module
    from segbatch.storage.stac import read_stac

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            path = write_catalog(root, args.items)
            client = common.boto_client(endpoint)
            client.create_bucket(Bucket="stac")
            files = list(root.rglob("*.json"))

            def put(p: Path) -> None:
                client.put_object(Bucket="stac", Key=p.relative_to(root).as_posix(), Body=p.read_bytes())

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(put, files))
            print(common.machine_text())
            with FaultProxy(endpoint, rate=0.0) as proxy:
                proxy.slow("/", 0.02)
                s3, slow = Storage(common.storage_options(endpoint)), Storage(common.storage_options(proxy.endpoint))
                for where, source, storage, threads in (
                    ("local", str(path), Storage(), 16),
                    ("moto S3", "s3://stac/catalog.json", s3, 1),
                    ("moto S3", "s3://stac/catalog.json", s3, 16),
                    ("S3+20ms", "s3://stac/catalog.json", slow, 1),
                    ("S3+20ms", "s3://stac/catalog.json", slow, 16),
                ):
                    stac_module._READ_THREADS = threads
                    t = time.perf_counter()
                    stac = read_stac(source, storage)
                    seconds = time.perf_counter() - t
                    assert len(stac.uris) == args.items
                    print(
                        f"{where:8s} {args.items} items, {threads:2d} reads at once: "
                        f"{seconds:.2f} s, {args.items / seconds:.0f} items/s"
                    )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
