"""A worker's peak memory with large images, against what it reserves in Ray.

Runs one shard of large images (--pixels each, random noise PNGs) through
``ShardProcessor`` (what a worker runs; no Ray) with the default in-flight
budget, and prints the process's peak RSS beside ``worker_memory_bytes``,
the ``memory=`` its actor reserves, and the most its ``InFlightBytes`` held
beside that ledger's bound (the budget and one claim per shard over it).

    python bench/bench_worker_memory.py [--images 12 --pixels 12000000 --batch-size 2]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402,F401  (puts the checkout first on sys.path)


def main() -> None:
    import numpy as np
    from PIL import Image

    from segbatch.config import ModelConfig
    from segbatch.engine import ShardProcessor, inflight_budget, worker_memory_bytes
    from segbatch.model import Segmenter, decode_peak_bytes, load_model
    from segbatch.storage import Storage

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--pixels", type=int, default=12_000_000)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--io-threads", type=int, default=4)
    args = ap.parse_args()
    side = int(args.pixels**0.5)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        tile = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        uris = []
        for i in range(args.images):
            path = Path(tmp) / f"img{i:03d}.png"
            Image.fromarray(np.roll(tile, i, axis=0)).save(path, compress_level=1)
            uris.append(str(path))
        cfg = ModelConfig(model="random", seed=1)
        segmenter = Segmenter(load_model(cfg), cfg)
        loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        proc = ShardProcessor(
            segmenter,
            Storage(),
            batch_size=args.batch_size,
            max_bytes=1 << 31,
            max_pixels=args.pixels,
            io_threads=args.io_threads,
        )
        try:
            rows, _ = proc.run(uris)
        finally:
            proc.close()
        claim = max(Path(u).stat().st_size for u in uris) + decode_peak_bytes(side, side, "RGB", "PNG")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gib = 1 << 30
    print(f"images {len(rows)} of {side}x{side} px, batch {args.batch_size}, io threads {args.io_threads}")
    budget = inflight_budget(args.batch_size, args.io_threads)
    print(f"in-flight budget {budget / gib:.2f} GiB; one image's claim {claim / gib:.2f} GiB")
    print(
        f"ledger held at most {proc.inflight.peak / gib:.2f} GiB (bound, one shard: {(budget + claim) / gib:.2f} GiB)"
    )
    print(f"peak RSS {peak / gib:.2f} GiB (model loaded: {loaded / gib:.2f} GiB)")
    print(f"reserved (memory=) {worker_memory_bytes(args.batch_size, args.io_threads, args.pixels) / gib:.2f} GiB")


if __name__ == "__main__":
    main()
