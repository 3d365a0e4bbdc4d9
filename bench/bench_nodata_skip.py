"""Time saved by skipping nodata: an orthomosaic with a wide black border, tiled, with and without its nodata flag.

    python bench/bench_nodata_skip.py [--size 2400 --border 0.6 --tile-size 320 --overlap 32 --model-size 320]

Writes one aerial scene (``segbatch.train.synth``, UTM, tiled and compressed)
whose footprint is a square turned by 30 degrees, as a drone flight's
orthomosaic is, covering ``1 - --border`` of the raster; the rest is black
(0). The same pixels are written twice: with ``nodata=0`` (the tiles of the
border are dropped from the plan) and without a nodata flag (every tile
runs). Both run the same tiled job (the shipped demo model, one worker, a
local Ray started once for both, the order alternated over ``--repeats``),
side by side; the table gives each run's tiles, tiles skipped, objects, its
planning seconds (the scene's header, and its mask read at 1/16 of a tile's resolution) and wall seconds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout first on sys.path)


def footprint(size: int, border: float, angle: float = 30.0):
    """A square turned by ``angle`` degrees about the centre, ``1 - border`` of the scene: [size, size] bool."""
    import numpy as np

    side = size * (1 - border) ** 0.5
    yy, xx = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    t = np.deg2rad(angle)
    u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
    return (np.abs(u) <= side / 2) & (np.abs(v) <= side / 2)


def write_scenes(work: Path, size: int, border: float) -> tuple[Path, Path, float]:
    """(folder of the scene with nodata=0, folder of the same pixels without a flag, the border's share)."""
    import numpy as np
    import rasterio

    from segbatch.train import write_aerial_raster

    raw = work / "raw.tif"
    write_aerial_raster(str(raw), size, size, seed=5, keep_truth=False)
    with rasterio.open(raw) as ds:
        profile = ds.profile
        pixels = np.maximum(ds.read(), 1)  # 0 is the border's alone
    data = footprint(size, border)
    pixels = np.where(data[None], pixels, 0).astype(np.uint8)
    folders = (work / "nodata", work / "flagless")
    for folder, nodata in zip(folders, (0, None)):
        folder.mkdir()
        with rasterio.open(folder / "ortho.tif", "w", **{**profile, "nodata": nodata}) as dst:
            dst.write(pixels)
    return folders[0], folders[1], 1 - float(data.mean())


def run(source: Path, dest: Path, args: argparse.Namespace) -> dict:
    from segbatch.config import JobConfig, ModelConfig
    from segbatch.engine import run_job
    from segbatch.engine.coverage import plan_coverage
    from segbatch.geo import TileOptions, raster_info
    from segbatch.storage import Storage

    cfg = JobConfig(
        source=str(source),
        dest=str(dest),
        shard_size=8,
        workers=1,
        cpus_per_worker=args.cpus,
        model=ModelConfig(model="demo", min_size=args.model_size, max_size=args.model_size),
        tile_size=args.tile_size,
        tile_overlap=args.overlap,
        progress="none",
    )
    t0 = time.perf_counter()  # the scene's header and coverage alone: what the plan reads of it
    scene = str(source / "ortho.tif")
    plan_coverage(scene, raster_info(scene, Storage(), TileOptions(args.tile_size, args.overlap)), Storage(), cfg, None)
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = run_job(cfg)
    wall = time.perf_counter() - t0
    s = result.summary
    assert result.complete
    skipped = s.tiles_skipped_nodata or 0
    return {"tiles": s.tiles, "skipped": skipped, "objects": s.detections, "plan_s": plan_s, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2400, help="Pixels a side of the scene.")
    ap.add_argument("--border", type=float, default=0.6, help="The border's share of the scene's pixels.")
    ap.add_argument("--tile-size", type=int, default=320)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--model-size", type=int, default=320, help="The model's input size (--min-size/--max-size).")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="Runs of each, alternating which goes first.")
    args = ap.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="segbatch-bench-nodata-"))
    try:
        with_flag, without, share = write_scenes(work, args.size, args.border)
        ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
        runs: dict[str, list[dict]] = {"nodata=0 (border skipped)": [], "no nodata flag (every tile)": []}
        names = list(runs)
        for k in range(args.repeats):
            order = [(names[0], with_flag), (names[1], without)]
            for name, source in order if k % 2 == 0 else order[::-1]:
                print(f"running {name} ...", file=sys.stderr, flush=True)
                runs[name].append(run(source, work / f"dest-{k}-{names.index(name)}", args))
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"`python bench/bench_nodata_skip.py {' '.join(sys.argv[1:])}`; {common.machine_text()}\n")
    print(
        f"{args.size} x {args.size} px scene, {share:.0%} of it border (0); tiles of {args.tile_size} px "
        f"(overlap {args.overlap}), demo model at {args.model_size} px, {args.cpus} CPUs; "
        f"best of {args.repeats}\n"
    )
    print("| run | tiles segmented | tiles skipped | objects | plan s | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    best = {name: min(rs, key=lambda r: r["wall_s"]) for name, rs in runs.items()}
    for name, r in best.items():
        print(f"| {name} | {r['tiles']} | {r['skipped']} | {r['objects']} | {r['plan_s']:.2f} | {r['wall_s']:.1f} |")
    a, b = best[names[0]], best[names[1]]
    print(f"\nskipping saves {b['wall_s'] - a['wall_s']:.1f} s ({1 - a['wall_s'] / b['wall_s']:.0%} of the wall time)")


if __name__ == "__main__":
    main()
