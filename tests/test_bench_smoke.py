"""The benchmarks run (tiny settings, never timed): CI keeps them working, the lead times them.

bench_throughput runs only methods (a) and (d) here: all four, even on
160x120 images, take about two minutes on a 2-core machine (Ray Data starts
an actor per run); the four-row table itself is checked on made-up figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import bench_postprocess  # noqa: E402
import bench_throughput  # noqa: E402


def test_postprocess_bench_runs_and_matches_reference():
    r = bench_postprocess.run(width=320, height=240, detections=10, repeats=1, ref_repeats=1)
    assert r["identical_rle"] and r["detections"] == 10  # run() asserts RLE equality itself
    assert r["segbatch_ms"] > 0 and r["reference_ms"] > 0
    assert bench_postprocess.table_row(r).startswith("| 320x240 | 10 |")


def test_postprocess_bench_main(capsys):
    argv = [
        "--width",
        "200",
        "--height",
        "150",
        "--detections",
        "5",
        "--repeats",
        "1",
        "--ref-repeats",
        "1",
        "--no-target",
    ]
    assert bench_postprocess.main(argv) == 0
    assert "| 200x150 | 5 |" in capsys.readouterr().out


def test_postprocess_inputs_are_realistic():
    boxes, labels, scores, masks = bench_postprocess.make_inputs(1920, 1080, 100)
    sides = (boxes[:, 2:] - boxes[:, :2]).flatten()
    assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 1920 and boxes[:, 1::2].max() <= 1080
    assert sides.min() >= 2 and sides.max() <= 400
    assert masks.shape == (100, 1, 28, 28) and 0 < masks.min() and masks.max() < 1
    # smooth blobs: a mask's centre is on, its corners off, neighbours differ little
    assert (masks[:, 0, 14, 14] > 0.5).float().mean() > 0.9
    assert (masks[:, 0, 0, 0] < 0.5).float().mean() > 0.9
    assert (masks[..., 1:] - masks[..., :-1]).abs().mean() < 0.1
    assert bool((scores[:-1] >= scores[1:]).all())


def test_throughput_table_has_four_rows():
    fake = {
        m: {
            "t_small_s": 2.0,
            "t_large_s": 6.0,
            "s_per_image": 1.0 + i,
            "images_per_s": 1 / (1.0 + i),
            "precision": "fp32",
            "peak_process_kib": 1024 * 900,
            "peak_actor_kib": None if m in "ab" else 1024 * 1500,
        }
        for i, m in enumerate("abcd")
    }
    args = bench_throughput.parse_args(["--images", "6", "--images-small", "2"])
    text = bench_throughput.table(fake, args)
    rows = [ln for ln in text.splitlines() if ln.startswith("| (")]
    assert [r.split("|")[1].strip()[:3] for r in rows] == ["(a)", "(b)", "(c)", "(d)"]
    assert bench_throughput.ratios_text(fake) == "d/a = 0.25, d/b = 0.50, d/c = 0.75"


@pytest.mark.slow  # starts moto, Ray and two `segbatch run`s: about 40 s on an idle 2-core machine
def test_throughput_bench_network_and_segbatch(tmp_path):
    out = tmp_path / "throughput.md"
    cmd = [
        sys.executable,
        str(BENCH / "bench_throughput.py"),
        "--images",
        "2",
        "--images-small",
        "1",
        "--size",
        "160x120",
        "--min-size",
        "64",
        "--max-size",
        "64",
        "--threads",
        "1",
        "--batch-size",
        "1",
        "--methods",
        "ad",
        "--out",
        str(out),
        "--timeout",
        "300",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "| (a) network only |" in text and "| (d) segbatch run |" in text
    assert "detections per image [100, 100]" in text  # score threshold 0: always 100
    assert "rows [1, 2], error rows [0, 0]" in text
    assert "--methods ad" in text  # the exact command line is recorded


def test_export_vector_bench_runs_and_counts_every_object():
    import bench_export_vector

    r = bench_export_vector.run(objects=250, per_scene=100, fmt="gpkg", layer_per_class=True)
    assert r["features"] == 250 and r["seconds"] > 0 and r["peak_mib"] >= r["base_mib"] > 0
    assert bench_export_vector.table_row(r).startswith("| 250 | gpkg per class |")


def test_nodata_bench_border_is_the_share_asked():
    """bench_nodata_skip's orthomosaic footprint: a turned square leaving ``border`` of the scene black."""
    import bench_nodata_skip

    data = bench_nodata_skip.footprint(400, 0.6)
    assert abs((1 - data.mean()) - 0.6) < 0.01 and data[200, 200] and not data[0, 0] and not data[399, 399]


def test_listing_bench_lists_every_key_three_ways():
    import bench_listing

    rows = bench_listing.main(["--keys", "300", "--prefixes", "3", "--latency-ms", "0"])
    assert [r["listing"] for r in rows] == ["fsspec find, flat", "list_pages, 1 at a time", "list_pages, 16 at a time"]
    assert all(0 <= r["first_keys_s"] <= r["all_keys_s"] for r in rows)  # each asserted the same 300 keys


def test_scale_bench_writes_a_sorted_manifest(tmp_path):
    import bench_scale
    import pyarrow.parquet as pq

    bench_scale.write_manifest(tmp_path / "m.parquet", 1_000_500)
    uris = pq.read_table(tmp_path / "m.parquet").column("uri").to_pylist()
    assert len(uris) == 1_000_500 and uris == sorted(uris) and uris[7] == "/nonexistent/archive/000000007.jpg"
