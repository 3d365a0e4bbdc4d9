"""The keypoint path's cost per image beside the mask path's, in one run (issue 16).

Run: ``python bench/keypoints.py [--size 480 --min-size 480 --detections 20 --repeats 5 --threads 2]``

Both models are torchvision's ResNet-50 FPN (Mask R-CNN's ``random`` and Keypoint R-CNN's
``keypoint-random``: seeded random weights, so nothing is downloaded) at the same input size, on
the same photograph (scikit-image's astronaut, resized), score threshold 0 so that each gives
``--detections`` detections. Timed: ``Segmenter.segment`` (the model, then the rows' records:
COCO RLE of each mask over its box, or the keypoints), on the CPU, the median of ``--repeats``
after one warm-up; and its two parts apart (``raw_detections``, then ``records``).

Then the heatmap decode alone (``--detections`` detections of 17 keypoints, boxes of 40 to 400
pixels): torchvision's loop (``keypointrcnn_inference``) against segbatch's batched
``heatmaps_to_keypoints``, on the CPU and on CUDA where there is one; ``roi_heads.decode_heatmaps``
picks the loop on CPUs and the batch on accelerators from these figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402,F401  (puts the checkout first on sys.path)


def _image(size: int):
    import numpy as np
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((size, size)))


def measure(model: str, size: int, min_size: int, detections: int, repeats: int) -> dict:
    """Median seconds per image of one model: the whole segment() and its two parts."""
    from segbatch.config import ModelConfig
    from segbatch.model import Segmenter, load_model

    cfg = ModelConfig(
        model=model,
        seed=0,
        score_threshold=0.0,
        max_detections=detections,
        min_size=min_size,
        max_size=max(min_size, size),
        device="cpu",
    )
    seg = Segmenter(load_model(cfg), cfg)
    image = _image(size)
    seg.segment([image])  # warm-up
    total, infer, records = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        raw = seg.raw_detections([image])[0]
        t1 = time.perf_counter()
        rows = seg.records(raw, image.shape[:2])
        t2 = time.perf_counter()
        total.append(t2 - t0)
        infer.append(t1 - t0)
        records.append(t2 - t1)
    return {
        "model": model,
        "detections": len(rows),
        "seconds": statistics.median(total),
        "infer_s": statistics.median(infer),
        "records_s": statistics.median(records),
    }


def table(results: list[dict], size: int, min_size: int) -> str:
    lines = [
        f"| path ({size}x{size} image, --min-size {min_size}) | detections | s / image | model | records |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        name = "mask (Mask R-CNN R50-FPN)" if r["model"] == "random" else "keypoint (Keypoint R-CNN R50-FPN)"
        lines.append(
            f"| {name} | {r['detections']} | {r['seconds']:.3f} | {r['infer_s']:.3f} | {r['records_s'] * 1000:.1f} ms |"
        )
    return "\n".join(lines)


def measure_decode(detections: int, device: str, repeats: int) -> dict:
    """Median seconds to decode one image's heatmaps: torchvision's loop, then the batched decode."""
    import torch
    from torchvision.models.detection.roi_heads import keypointrcnn_inference

    from segbatch.model import heatmaps_to_keypoints

    g = torch.Generator().manual_seed(0)
    maps = torch.randn(detections, 17, 56, 56, generator=g).to(device)
    xy = torch.rand(detections, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + 40 + torch.rand(detections, 2, generator=g) * 360], 1).to(device)

    def timed(fn) -> float:
        fn()  # warm-up
        seconds = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
        return statistics.median(seconds)

    return {
        "device": device,
        "detections": detections,
        "loop_s": timed(lambda: keypointrcnn_inference(maps, [boxes])),
        "batched_s": timed(lambda: heatmaps_to_keypoints(maps, boxes)),
    }


def decode_table(results: list[dict]) -> str:
    lines = ["| heatmap decode | detections | torchvision's loop | batched | loop / batched |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['device']} | {r['detections']} | {r['loop_s'] * 1000:.1f} ms | {r['batched_s'] * 1000:.1f} ms "
            f"| {r['loop_s'] / r['batched_s']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=480, help="the image's side, pixels")
    parser.add_argument("--min-size", type=int, default=480, help="the models' --min-size")
    parser.add_argument("--detections", type=int, default=20, help="--max-detections (score threshold 0)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [
        measure(m, args.size, args.min_size, args.detections, args.repeats) for m in ("random", "keypoint-random")
    ]
    print(table(results, args.size, args.min_size))
    ratio = results[1]["seconds"] / results[0]["seconds"]
    print(f"keypoint / mask: {ratio:.2f}x per image ({args.threads} threads, torch {torch.__version__})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    decodes = [measure_decode(args.detections, d, args.repeats) for d in devices]
    print(decode_table(decodes))
    return results + decodes


if __name__ == "__main__":
    main()
