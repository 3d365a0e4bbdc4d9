"""bench/keypoints.py runs (tiny settings, never timed): the mask and keypoint paths side by side."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import keypoints as bench_keypoints  # noqa: E402


def test_keypoint_bench_measures_both_paths(capsys) -> None:
    results = bench_keypoints.main(["--size", "96", "--min-size", "64", "--detections", "2", "--repeats", "1"])
    paths, decodes = results[:2], results[2:]
    assert [r["model"] for r in paths] == ["random", "keypoint-random"]
    assert all(r["detections"] == 2 and r["seconds"] > 0 for r in paths)
    assert decodes[0]["device"] == "cpu" and decodes[0]["loop_s"] > 0 and decodes[0]["batched_s"] > 0
    out = capsys.readouterr().out
    assert "| keypoint (Keypoint R-CNN R50-FPN) | 2 |" in out and "keypoint / mask:" in out
    assert "| cpu | 2 |" in out
