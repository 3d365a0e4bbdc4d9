"""Memory is bounded by what is in flight, never by the archive's size.

Runs the same job (seeded random Mask R-CNN at a tiny input size, local
images, shards of --shard-size) on --small and on --large images and reports
the peak resident memory (VmHWM) of the driver and of the worker actors.
With memory bounded by what is in flight, 10x the images should raise
neither peak by more than 20%.

Each job runs in a fresh child process that starts its own local Ray (in a
private RAY_TMPDIR) and calls ``run_job``, the same call ``segbatch run``
makes; so the driver's peak is that child's own VmHWM, untouched by the
other run. A thread in the child samples every SegmentWorker actor's
/proc/<pid>/status (pids from the GCS's actor table) until the job ends.

    python bench/bench_memory.py [--small 20 --large 200 --shard-size 10 --workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (puts the checkout first on sys.path)

TARGET_GROWTH = 1.20


# -- child: one job, measured ----------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import ray

    from segbatch.config import JobConfig, ModelConfig
    from segbatch.engine import run_job

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    peaks: dict[int, int] = {}  # worker pid -> highest VmHWM seen (KiB)
    stop = threading.Event()

    def sample() -> None:
        from ray._private import state

        while not stop.is_set():
            try:
                actors = state.actors().values()
            except Exception:  # the GCS may be busy; try again
                actors = []
            for a in actors:
                if a.get("ActorClassName") == "SegmentWorker" and a.get("State") == "ALIVE" and a.get("Pid"):
                    hwm = common.status_kib(a["Pid"])
                    if hwm is not None:
                        peaks[a["Pid"]] = max(peaks.get(a["Pid"], 0), hwm)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = JobConfig(
        source=args.source,
        dest=args.dest,
        model=ModelConfig(model="random", seed=1, score_threshold=0.0, max_detections=3, min_size=64, max_size=96),
        shard_size=args.shard_size,
        workers=args.workers,
        cpus_per_worker=1,
        progress="none",
    )
    started = time.perf_counter()
    result = run_job(cfg)
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    driver_hwm = common.status_kib("self")
    ray.shutdown()
    print(
        "RESULT "
        + json.dumps(
            {
                "images": result.progress.total,
                "rows": result.summary.rows,
                "complete": result.complete,
                "wall_s": round(wall, 1),
                "driver_peak_kib": driver_hwm,
                "worker_peak_kib": max(peaks.values(), default=None),
                "worker_pids": len(peaks),
            }
        ),
        flush=True,
    )


# -- parent: images, two runs, the table -------------------------------------------


def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def run_one(n: int, images: Path, work: Path, args: argparse.Namespace) -> dict:
    src = work / f"src{n}"
    src.mkdir()
    for p in sorted(images.iterdir())[:n]:
        os.symlink(p, src / p.name)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--source",
        str(src),
        "--dest",
        str(work / f"out{n}"),
        "--shard-size",
        str(args.shard_size),
        "--workers",
        str(args.workers),
        "--cpus",
        str(args.cpus),
    ]
    return common.run_measured_child(cmd, args.timeout, f"the {n}-image run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=20)
    ap.add_argument("--large", type=int, default=200)
    ap.add_argument("--shard-size", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray each run starts.")
    ap.add_argument("--timeout", type=float, default=1200, help="Seconds per run.")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--source", help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="segbatch-bench-memory-"))
    try:
        images = work / "images"
        images.mkdir()
        for i in range(max(args.small, args.large)):
            (images / f"img{i:06d}.png").write_bytes(_png(i))
        results = {}
        for n in (args.small, args.large):
            print(
                f"running {n} images (shard size {args.shard_size}, {args.workers} workers) ...",
                file=sys.stderr,
                flush=True,
            )
            results[n] = run_one(n, images, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    small, large = results[args.small], results[args.large]
    mib = lambda kib: "-" if kib is None else f"{kib / 1024:.1f}"  # noqa: E731
    print(
        f"{'images':>8} {'shards':>7} {'wall s':>8} {'img/s':>7} "
        f"{'driver peak MiB':>16} {'worker peak MiB':>16} {'workers seen':>13}"
    )
    for n, r in results.items():
        shards = -(-n // args.shard_size)
        print(
            f"{n:>8} {shards:>7} {r['wall_s']:>8.1f} {n / r['wall_s']:>7.2f} {mib(r['driver_peak_kib']):>16} "
            f"{mib(r['worker_peak_kib']):>16} {r['worker_pids']:>13}"
        )
    ok = True
    for what in ("driver", "worker"):
        a, b = small[f"{what}_peak_kib"], large[f"{what}_peak_kib"]
        growth = b / a if a and b else float("nan")
        good = growth <= TARGET_GROWTH
        ok &= good
        print(
            f"{what} peak growth for {args.large / args.small:g}x the images: {growth:.3f}x "
            f"({'within' if good else 'OVER'} the {TARGET_GROWTH:.2f}x target)"
        )
    if not (small["complete"] and large["complete"]):
        print("a run was incomplete", file=sys.stderr)
        ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
