"""What each polygon rule of DEST/objects costs an object (``geo/polygons.py``).

Run: ``python bench/bench_polygons.py [--objects 2000] [--size 60]``

Draws ``--objects`` seeded, ragged roof-like masks of about ``--size`` pixels across (0.5 m
pixels in UTM 31N) and times, per object, one step at a time as ``geo.objects.object_table``
runs them: tracing the mask's outline (``instance_polygon``, the cost before this change),
``--simplify 1px``, and ``--objects-crs EPSG:4326`` (edges over 64 pixels densified,
then reprojected), and the vertices each leaves. One process, one thread; the best of 3 passes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import numpy as np  # noqa: E402
import shapely  # noqa: E402
from pyproj import CRS  # noqa: E402

from segbatch.geo import Instance, Measure, PolygonOptions, instance_polygon  # noqa: E402
from segbatch.geo.polygons import output_polygon  # noqa: E402

import common  # noqa: E402,F401  (puts the checkout first on sys.path)

TRANSFORM = (0.5, 0.0, 699_000.0, 0.0, -0.5, 5_000_000.0)
UTM31 = CRS.from_epsg(32631).to_wkt()


def masks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    r, theta = np.hypot(yy, xx), np.arctan2(yy, xx)
    out = []
    for _ in range(n):
        k, a, phase = rng.integers(3, 9), rng.uniform(1, size / 10), rng.uniform(0, 2 * np.pi)
        out.append(r < size * 0.4 + a * np.sin(k * theta + phase))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=60)
    args = parser.parse_args()
    ms = masks(args.objects, args.size)
    steps = {
        "trace": PolygonOptions(),
        "trace + simplify 1px": PolygonOptions(simplify=Measure(1, pixels=True)),
        "trace + objects-crs 4326": PolygonOptions(crs="EPSG:4326"),
        "trace + simplify 1px + objects-crs 4326": PolygonOptions(crs="EPSG:4326", simplify=Measure(1, pixels=True)),
    }
    print(f"{args.objects} objects of ~{args.size} px across, {int(np.mean([m.sum() for m in ms]))} px on average")
    for name, options in steps.items():
        options.crs_wkt  # noqa: B018 - the CRS parsed once, as in a job
        times = []
        for _ in range(3):  # the best of 3: the machine is shared
            t0 = time.perf_counter()
            vertices = 0
            for m in ms:
                geom = instance_polygon(Instance(1, "roof", 0.9, (0, 0, 1, 1), 0, 0, m), TRANSFORM)
                geom = output_polygon(geom, UTM31, TRANSFORM, options)
                vertices += shapely.get_num_coordinates(geom)
            times.append(time.perf_counter() - t0)
        per = min(times) / len(ms) * 1e3
        print(f"{name:42s} {per:7.3f} ms/object   {vertices / len(ms):7.1f} vertices/object")


if __name__ == "__main__":
    main()
