"""Postprocessing one image's Mask R-CNN outputs: segbatch versus the usual path.

Run: ``python bench/bench_postprocess.py [--width 1920 --height 1080 --detections 100
--repeats 21 --ref-repeats 5] [--class-map] [--json]``

Inputs are what torchvision's RoI heads hand over for one 1080p image with
100 detections: boxes of assorted sizes (sides log-uniform in 20..400 px,
some running off the image and clipped to it, as the model clips them),
and 28x28 mask probabilities shaped like real ones (a smooth blob: a
sigmoid of an elliptic distance field with a random centre, radii,
orientation, edge sharpness and a smooth low-frequency wobble), seeded.

- **reference**: what a user of torchvision writes:
  ``paste_masks_in_image`` (a full-image float mask per detection),
  ``> threshold``, then ``pycocotools.mask.encode`` of each full-frame mask.
- **segbatch**: ``segbatch.model.masks.detections_to_records`` (each mask
  resized over its own box only, run lengths computed from the box).

Both run on one thread (``torch.set_num_threads(1)``); each is run once
untimed, then timed ``--repeats`` (segbatch) and ``--ref-repeats`` (the
reference, ~100x slower) times; the medians are reported. The RLE strings
(and areas) of the two paths must be identical, or the script fails.
Targets (issue 4): segbatch under 20 ms and at least 100x faster.

``--class-map`` times instead the per-image class map (``--semantic-out``)
from the same detections' records, the postprocessing itself untimed:

- **decode RLE** (the former way): each record's RLE decoded by pycocotools
  to a full-image mask and painted, lowest score first.
- **box masks**: ``segbatch.model.masks.class_map``, each mask painted over
  its own box from ``records_and_box_masks``' box masks.

The two maps must be identical, or the script fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout first on sys.path)

TARGET_MS = 20.0
TARGET_SPEEDUP = 100.0


def make_inputs(width: int, height: int, n: int, seed: int = 0, mask_size: int = 28):
    """Seeded boxes [n, 4], labels, scores (descending) and masks [n, 1, M, M] probabilities."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    # box sides log-uniform in 20..400 px; the centre anywhere, a little off the image too
    sides = np.exp(rng.uniform(np.log(20), np.log(400), size=(n, 2)))
    centres = rng.uniform([-0.05 * width, -0.05 * height], [1.05 * width, 1.05 * height], size=(n, 2))
    boxes = np.concatenate([centres - sides / 2, centres + sides / 2], axis=1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    # a box clipped to nothing is moved back inside (the model never returns an empty box)
    tiny = (boxes[:, 2] - boxes[:, 0] < 2) | (boxes[:, 3] - boxes[:, 1] < 2)
    boxes[tiny] = [[width / 2 - 10, height / 2 - 10, width / 2 + 10, height / 2 + 10]]

    # masks: sigmoid(k * (1 - d)), d the elliptic distance from a jittered centre,
    # plus a smooth wobble so the edge is not a perfect ellipse
    m = mask_size
    yy, xx = np.mgrid[0:m, 0:m].astype(np.float64)
    yy, xx = (yy + 0.5) / m - 0.5, (xx + 0.5) / m - 0.5
    masks = np.empty((n, m, m), dtype=np.float32)
    for i in range(n):
        cx, cy = rng.normal(0, 0.05, size=2)
        rx, ry = rng.uniform(0.2, 0.45, size=2)
        theta = rng.uniform(0, np.pi)
        c, s = np.cos(theta), np.sin(theta)
        u = ((xx - cx) * c + (yy - cy) * s) / rx
        v = (-(xx - cx) * s + (yy - cy) * c) / ry
        d = np.sqrt(u * u + v * v)
        fx, fy, ph = rng.uniform(1, 3), rng.uniform(1, 3), rng.uniform(0, 2 * np.pi, size=2)
        wobble = 0.15 * np.sin(2 * np.pi * fx * xx + ph[0]) * np.sin(2 * np.pi * fy * yy + ph[1])
        sharp = rng.uniform(4, 12)
        masks[i] = 1.0 / (1.0 + np.exp(-sharp * (1.0 - d + wobble)))
    scores = np.sort(rng.uniform(0.05, 1.0, size=n))[::-1].copy()
    labels = rng.integers(1, 91, size=n)
    return (
        torch.from_numpy(boxes.astype(np.float32)),
        torch.from_numpy(labels),
        torch.from_numpy(scores.astype(np.float32)),
        torch.from_numpy(masks)[:, None],
    )


def reference(boxes, masks, height: int, width: int, threshold: float) -> list[dict]:
    """torchvision's full-image paste, threshold, pycocotools on each full-frame mask."""
    import numpy as np
    from pycocotools import mask as mask_utils
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    binary = (paste_masks_in_image(masks, boxes, (height, width)) > threshold).squeeze(1).numpy()
    return [mask_utils.encode(np.asfortranarray(b.astype(np.uint8))) for b in binary]


def segbatch_path(
    boxes, labels, scores, masks, height: int, width: int, threshold: float, classes: list[str]
) -> list[dict]:
    from segbatch.model import detections_to_records

    return detections_to_records(boxes, labels, scores, masks, (height, width), threshold, classes)


def _median_ms(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), times


def run(
    width: int = 1920,
    height: int = 1080,
    detections: int = 100,
    repeats: int = 21,
    ref_repeats: int = 5,
    threshold: float = 0.5,
    seed: int = 0,
) -> dict:
    """Time both paths; raises AssertionError if their RLEs differ."""
    import torch
    from pycocotools import mask as mask_utils

    torch.set_num_threads(1)
    boxes, labels, scores, masks = make_inputs(width, height, detections, seed)
    classes = ["__background__"] + [f"class_{i}" for i in range(1, 91)]

    ours = segbatch_path(boxes, labels, scores, masks, height, width, threshold, classes)  # also a warm-up
    ref = reference(boxes, masks, height, width, threshold)
    assert len(ours) == len(ref) == detections, (len(ours), len(ref), detections)
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert o["mask"]["size"] == [height, width], (i, o["mask"]["size"])
        assert o["mask"]["counts"] == r["counts"].decode("ascii"), f"detection {i}: RLE differs from the reference"
        assert o["area"] == int(mask_utils.area(r)), f"detection {i}: area differs"
    areas = [o["area"] for o in ours]

    seg_ms, seg_all = _median_ms(
        lambda: segbatch_path(boxes, labels, scores, masks, height, width, threshold, classes), repeats
    )
    ref_ms, ref_all = _median_ms(lambda: reference(boxes, masks, height, width, threshold), ref_repeats)
    speedup = ref_ms / seg_ms if seg_ms > 0 else float("inf")
    return {
        "image": f"{width}x{height}",
        "detections": detections,
        "repeats": repeats,
        "ref_repeats": ref_repeats,
        "threads": torch.get_num_threads(),
        "identical_rle": True,
        "mask_area_px": {"min": min(areas), "median": int(statistics.median(areas)), "max": max(areas)},
        "reference_ms": round(ref_ms, 2),
        "segbatch_ms": round(seg_ms, 3),
        "reference_ms_all": [round(t, 2) for t in ref_all],
        "segbatch_ms_all": [round(t, 3) for t in seg_all],
        "speedup": round(speedup, 1),
        "target_ms": TARGET_MS,
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": seg_ms < TARGET_MS and speedup >= TARGET_SPEEDUP,
        "machine": common.machine_text(),
    }


def class_map_from_rles(records: list[dict], height: int, width: int):
    """The former class map: every RLE decoded to a full [height, width] mask, painted best score last."""
    import numpy as np
    from pycocotools import mask as mask_utils

    dtype = np.uint8 if all(d["label"] < 256 for d in records) else np.uint16
    out = np.zeros((height, width), dtype)
    for d in sorted(records, key=lambda d: d["score"]):
        out[mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}).astype(bool)] = d[
            "label"
        ]
    return out


def run_class_map(
    width: int = 1920,
    height: int = 1080,
    detections: int = 100,
    repeats: int = 21,
    ref_repeats: int = 5,
    threshold: float = 0.5,
    seed: int = 0,
) -> dict:
    """Time the class map both ways on one image's records; raises AssertionError if the maps differ."""
    import numpy as np
    import torch

    from segbatch.model import class_map, records_and_box_masks

    torch.set_num_threads(1)
    boxes, labels, scores, masks = make_inputs(width, height, detections, seed)
    classes = ["__background__"] + [f"class_{i}" for i in range(1, 91)]
    records, box_masks = records_and_box_masks(boxes, labels, scores, masks, (height, width), threshold, classes)
    ours, ref = (
        class_map(records, box_masks, height, width),
        class_map_from_rles(records, height, width),
    )  # also warm-ups
    assert ours.dtype == ref.dtype and np.array_equal(ours, ref), "class map differs from the RLE-decoding one"
    new_ms, new_all = _median_ms(lambda: class_map(records, box_masks, height, width), repeats)
    old_ms, old_all = _median_ms(lambda: class_map_from_rles(records, height, width), ref_repeats)
    return {
        "image": f"{width}x{height}",
        "detections": detections,
        "repeats": repeats,
        "ref_repeats": ref_repeats,
        "identical_map": True,
        "painted_px": int((ours > 0).sum()),
        "decode_rle_ms": round(old_ms, 2),
        "box_masks_ms": round(new_ms, 3),
        "decode_rle_ms_all": [round(t, 2) for t in old_all],
        "box_masks_ms_all": [round(t, 3) for t in new_all],
        "speedup": round(old_ms / new_ms if new_ms > 0 else float("inf"), 1),
        "machine": common.machine_text(),
    }


CLASS_MAP_HEADER = (
    "| image | detections | class map, decode RLE to full masks (ms) | class map from box masks (ms) "
    "| speedup | identical map |\n| --- | ---: | ---: | ---: | ---: | --- |"
)


def class_map_row(r: dict) -> str:
    return (
        f"| {r['image']} | {r['detections']} | {r['decode_rle_ms']:.1f} | {r['box_masks_ms']:.2f} "
        f"| {r['speedup']:.0f}x | {'yes' if r['identical_map'] else 'NO'} |"
    )


TABLE_HEADER = (
    "| image | detections | reference: paste_masks_in_image + pycocotools (ms) | segbatch detections_to_records (ms) "
    "| speedup | identical RLE |\n| --- | ---: | ---: | ---: | ---: | --- |"
)


def table_row(r: dict) -> str:
    return (
        f"| {r['image']} | {r['detections']} | {r['reference_ms']:.1f} | {r['segbatch_ms']:.2f} "
        f"| {r['speedup']:.0f}x | {'yes' if r['identical_rle'] else 'NO'} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--detections", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=21, help="Timed runs of segbatch's path (median reported).")
    ap.add_argument("--ref-repeats", type=int, default=5, help="Timed runs of the reference path (median reported).")
    ap.add_argument("--mask-threshold", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="Print the result as JSON instead of a table.")
    ap.add_argument("--no-target", action="store_true", help="Exit 0 even when the targets are missed (smoke tests).")
    ap.add_argument(
        "--class-map",
        action="store_true",
        help="Time the class map (--semantic-out) instead: decoded RLEs vs box masks.",
    )
    args = ap.parse_args(argv)
    if args.class_map:
        r = run_class_map(
            args.width, args.height, args.detections, args.repeats, args.ref_repeats, args.mask_threshold, args.seed
        )
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            print(
                f"class map of one image on 1 thread, median of {r['repeats']} (box masks) and {r['ref_repeats']} "
                f"(decode RLE) runs; {r['machine']}"
            )
            print(CLASS_MAP_HEADER)
            print(class_map_row(r))
        return 0
    r = run(args.width, args.height, args.detections, args.repeats, args.ref_repeats, args.mask_threshold, args.seed)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(
            f"postprocessing one image on 1 thread, median of {r['repeats']} (segbatch) and {r['ref_repeats']} "
            f"(reference) runs; {r['machine']}"
        )
        print(TABLE_HEADER)
        print(table_row(r))
        print(
            f"target: segbatch < {TARGET_MS:.0f} ms and >= {TARGET_SPEEDUP:.0f}x: "
            f"{'met' if r['meets_target'] else 'MISSED'}"
        )
    return 0 if (r["meets_target"] or args.no_target) else 1


if __name__ == "__main__":
    sys.exit(main())
