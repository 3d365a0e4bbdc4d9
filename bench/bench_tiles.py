"""Memory while segmenting one huge scene: bounded by the tiles in flight, not the scene.

    python bench/bench_tiles.py [--small 5000 --large 20000 --tile-size 1024 --overlap 64]

Writes two georeferenced aerial GeoTIFFs (``--small`` and ``--large``
pixels a side; tiled and compressed, drawn block by block from eight
distinct 512-pixel aerial scenes of ``segbatch.train.synth``, so even the large
one is made without holding it in memory), then runs the same tiled job on
each (the shipped demo model, tiles of ``--tile-size``, a local Ray in a
fresh child process, ``--semantic-out`` on). It reports the peak resident
memory (VmHWM) of the driver and of every Ray worker process (the actors
reading and segmenting tiles, and the task merging the scene), sampled
every 0.2 s, with the wall time, tiles and objects of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout first on sys.path)


def write_scene(path: str, size: int, block: int = 512) -> None:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from segbatch.train import generate_scene, scene_rng

    blocks = [generate_scene(scene_rng(11, k), "aerial", block, block)[0].transpose(2, 0, 1) for k in range(8)]
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": from_origin(500_000.0, 4_500_000.0, 0.5, 0.5),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "photometric": "RGB",
        "BIGTIFF": "IF_SAFER",
    }
    with rasterio.open(path, "w", **profile) as dst:
        for i, row in enumerate(range(0, size, block)):
            for j, col in enumerate(range(0, size, block)):
                w, h = min(block, size - col), min(block, size - row)
                dst.write(blocks[(i * 3 + j) % 8][:, :h, :w], window=Window(col, row, w, h))


def _ray_worker_pids(sid: int) -> list[int]:
    """Ray's worker processes (titled ``ray::...``) among this run's session."""
    out = []
    for pid in common.session_pids(sid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read(5) == b"ray::":
                    out.append(pid)
        except OSError:
            pass
    return out


def child(args: argparse.Namespace) -> None:
    import ray

    from segbatch.config import JobConfig, ModelConfig
    from segbatch.engine import run_job

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    peaks: dict[int, int] = {}
    stop = threading.Event()

    def sample() -> None:
        sid = os.getsid(0)
        while not stop.is_set():
            for pid in _ray_worker_pids(sid):
                hwm = common.status_kib(pid)
                if hwm:
                    peaks[pid] = max(peaks.get(pid, 0), hwm)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = JobConfig(
        source=args.source,
        dest=args.dest,
        shard_size=8,
        workers=1,
        cpus_per_worker=args.cpus,
        model=ModelConfig(model="demo", min_size=args.model_size, max_size=args.model_size),
        tile_size=args.tile_size,
        tile_overlap=args.overlap,
        semantic_out=args.dest + "/classes",
        progress="none",
    )
    started = time.perf_counter()
    result = run_job(cfg)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    print(
        "RESULT "
        + json.dumps(
            {
                "complete": result.complete,
                "tiles": result.summary.tiles,
                "objects": result.summary.detections,
                "wall_s": round(wall, 1),
                "driver_peak_kib": common.status_kib("self"),
                "worker_peak_kib": max(peaks.values(), default=None),
                "ray_workers_seen": len(peaks),
            }
        ),
        flush=True,
    )
    ray.shutdown()


def run_one(size: int, work: Path, args: argparse.Namespace) -> dict:
    src = work / f"scene{size}"
    src.mkdir()
    t0 = time.perf_counter()
    write_scene(str(src / "scene.tif"), size)
    print(f"  wrote a {size} x {size} GeoTIFF in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--source",
        str(src),
        "--dest",
        str(work / f"out{size}"),
        "--cpus",
        str(args.cpus),
        "--tile-size",
        str(args.tile_size),
        "--overlap",
        str(args.overlap),
        "--model-size",
        str(args.model_size),
    ]
    return common.run_measured_child(cmd, args.timeout, f"the {size}-pixel run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=5000, help="Pixels a side of the small scene.")
    ap.add_argument("--large", type=int, default=20000, help="Pixels a side of the large scene.")
    ap.add_argument("--tile-size", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--model-size", type=int, default=512, help="The model's input size (--min-size/--max-size).")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="segbatch-bench-tiles-"))
    results = {}
    try:
        for size in (args.small, args.large):
            print(f"running a {size} x {size} scene ...", file=sys.stderr, flush=True)
            results[size] = run_one(size, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"`python bench/bench_tiles.py {' '.join(sys.argv[1:])}`; {common.machine_text()}\n")
    print(
        "| scene (pixels) | megapixels | tiles | objects | wall s | driver peak MiB "
        "| worker peak MiB (largest Ray worker) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, r in results.items():
        print(
            f"| {size} x {size} | {size * size / 1e6:.0f} | {r['tiles']} | {r['objects']} | {r['wall_s']} | "
            f"{common.mib(r['driver_peak_kib'])} | {common.mib(r['worker_peak_kib'])} |"
        )
    a, b = results[args.small], results[args.large]
    print(
        f"\n{(args.large / args.small) ** 2:.0f}x the pixels: "
        f"driver peak x{b['driver_peak_kib'] / a['driver_peak_kib']:.2f}, "
        f"worker peak x{b['worker_peak_kib'] / a['worker_peak_kib']:.2f}"
    )


if __name__ == "__main__":
    main()
