"""Vector export throughput and memory: objects/s and peak RSS as the object count grows.

Run: ``python bench/bench_export_vector.py [--objects 1000 10000 100000] [--per-scene 1000] [--format gpkg]``

For each N, DEST/objects is synthesized (N objects, ``--per-scene`` to a scene's
file, written with ``schema.rows_to_table`` and ``geo.georef.geo_metadata`` as the
merge writes them; every other scene in UTM zone 32, the rest in 31, so half the
objects are reprojected), then a fresh child process exports it
(``outputs.vector.plan_export`` + ``export_vector``) and reports its wall time and
the rise of its peak RSS (VmHWM) over its RSS once imports are done. A flat
rise as N grows is the point: the export streams a record batch at a time. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402,F401  (puts the checkout first on sys.path)


def synthesize(dest: Path, objects: int, per_scene: int, seed: int = 0) -> None:
    """DEST/objects with ``objects`` objects: octagons of 2-10 m in scenes of ``per_scene``."""
    import numpy as np
    import pyarrow.parquet as pq
    import shapely
    from rasterio.crs import CRS

    from segbatch import schema
    from segbatch.geo.georef import geo_metadata

    rng = np.random.default_rng(seed)
    (dest / "objects").mkdir(parents=True, exist_ok=True)
    wkt = {z: CRS.from_epsg(z).to_wkt() for z in (32631, 32632)}
    for k, start in enumerate(range(0, objects, per_scene)):
        n = min(per_scene, objects - start)
        zone = 32632 if k % 2 else 32631
        cx, cy = 500000 + rng.uniform(0, 5000, n), 5000000 + rng.uniform(0, 5000, n)
        r = rng.uniform(1, 5, n)
        polys = shapely.buffer(shapely.points(cx, cy), r, quad_segs=2)
        rows = [
            {
                "uri": f"s3://archive/scenes/scene-{k:06d}.tif",
                "label": int(label),
                "label_name": ("roof", "car", "tree")[label - 1],
                "score": float(score),
                "box": [float(x), float(y), float(x) + 20, float(y) + 20],
                "area": int(a),
                "mask": {"size": [10000, 10000], "counts": "abc123"},
                "geometry": wkb,
            }
            for label, score, x, y, a, wkb in zip(
                rng.integers(1, 4, n),
                rng.uniform(0.5, 1, n),
                rng.uniform(0, 9980, n),
                rng.uniform(0, 9980, n),
                rng.integers(10, 500, n),
                shapely.to_wkb(polys),
            )
        ]
        bbox = list(shapely.total_bounds(polys))
        geo = geo_metadata(wkt[zone], ["Polygon"], bbox)
        table = schema.rows_to_table(rows, schema=schema.OBJECT_SCHEMA, extra_metadata={schema.GEO_METADATA_KEY: geo})
        pq.write_table(table, dest / "objects" / f"scene-{k:06d}.parquet")


def child(dest: str, out: str, fmt: str, layer_per_class: bool, index: bool = True) -> dict:
    """One export in this (fresh) process: seconds, and the peak RSS rise over the RSS after imports."""
    import time

    import pyogrio  # noqa: F401  (imported before the base figure: libraries are not the data's memory)
    import pyproj  # noqa: F401
    import shapely  # noqa: F401

    from segbatch.outputs.vector import export_vector, plan_export
    from segbatch.storage import Storage

    base_kib = _status_kib("VmRSS")
    t0 = time.perf_counter()
    plan = plan_export(dest, Storage())
    result = export_vector(plan, out, Storage(), fmt, layer_per_class, spatial_index=index)
    seconds = time.perf_counter() - t0
    peak_kib = _status_kib("VmHWM")
    return {
        "features": result.features,
        "seconds": seconds,
        "base_mib": base_kib / 1024,
        "peak_mib": peak_kib / 1024,
        "rise_mib": (peak_kib - base_kib) / 1024,
        "out_mib": sum(os.path.getsize(p) for p in result.outputs) / 2**20,
    }


def _status_kib(key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not ``ru_maxrss``: Linux carries
    that over an exec, so a child would report its parent's peak (the synthesis's)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def run(objects: int, per_scene: int, fmt: str, layer_per_class: bool = False, index: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        dest = Path(tmp) / "dest"
        synthesize(dest, objects, per_scene)
        out = str(Path(tmp) / f"objects.{fmt}")
        args = [sys.executable, __file__, "--child", str(dest), out, fmt, str(int(layer_per_class)), str(int(index))]
        done = subprocess.run(args, check=True, capture_output=True, text=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["features"] == objects, figures
    return {"objects": objects, "format": fmt, "layer_per_class": layer_per_class, "index": index, **figures}


def table_row(r: dict) -> str:
    return (
        f"| {r['objects']:,} | {r['format']}{' per class' if r['layer_per_class'] else ''}"
        f"{'' if r['index'] else ', no index'} | {r['seconds']:.2f} | "
        f"{r['objects'] / r['seconds']:,.0f} | {r['peak_mib']:.0f} | {r['rise_mib']:.0f} | {r['out_mib']:.1f} |"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        dest, out, fmt, per_class, index = argv[1:6]
        print(json.dumps(child(dest, out, fmt, per_class == "1", index == "1")))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--per-scene", type=int, default=1000)
    p.add_argument("--format", default="gpkg")
    p.add_argument("--layer-per-class", action="store_true")
    p.add_argument("--no-spatial-index", action="store_true")
    a = p.parse_args(argv)
    print("| objects | format | seconds | objects/s | peak RSS MiB | rise over imports MiB | output MiB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in a.objects:
        print(table_row(run(n, a.per_scene, a.format, a.layer_per_class, not a.no_spatial_index)), flush=True)


if __name__ == "__main__":
    main()
