"""Where the time goes on one GPU (issue 4): network, decoding, postprocessing, pipeline.

Run on a machine with a CUDA GPU (the figures in BENCHMARKS.md came from
one H100):

    python bench/bench_gpu.py --out OUT_DIR [--images 256] [--size 1920x1080]

The stage: ``--images`` JPEGs (quality 90) of real photographs
(``common.photo_jpeg``) in a local folder; torchvision's
maskrcnn_resnet50_fpn at 800/1333 with seeded random weights and a score
threshold of 0, so every image has exactly 100 detections (COCO weights
cannot be downloaded everywhere; the arithmetic is the same).

It measures, each on its own and then together:

- network: ``Segmenter.raw_detections`` (transform, backbone, RPN, RoI
  heads; no paste) on decoded images, for each precision, batch size and
  memory format;
- torchvision's full ``model(images)`` (paste into full-image masks
  included), the network a naive script runs;
- decoding a JPEG: Pillow on one CPU thread, and ``torchvision.io.decode_jpeg``
  on the GPU in batches;
- postprocessing one image's 100 detections on one CPU thread
  (``Segmenter.records``: box-local paste, threshold, RLE);
- segbatch's pipeline in one process (``ShardProcessor``: threaded reads and
  decoding, batched network, encoding), the work of one actor.

Every GPU timing synchronises before reading the clock and follows an
untimed warm-up. Results: a table on stdout and ``OUT_DIR/bench_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout first on sys.path)


def _write_jpeg(job: tuple[str, int, int, int]) -> str:
    folder, index, width, height = job
    path = os.path.join(folder, f"img-{index:05d}.jpg")
    with open(path, "wb") as f:
        f.write(common.photo_jpeg(index, width, height))
    return path


def make_images(folder: str, n: int, width: int, height: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        return sorted(pool.map(_write_jpeg, [(folder, i, width, height) for i in range(n)]))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 1) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (GPU work included)."""
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_config(precision: str, min_size: int, max_size: int, device: str = "auto"):
    from segbatch.config import ModelConfig

    return ModelConfig(
        model="random",
        seed=0,
        score_threshold=0.0,
        max_detections=100,
        min_size=min_size,
        max_size=max_size,
        precision=precision,
        device=device,
    )


def bench_network(loaded, images, args) -> list[dict]:
    """raw_detections images/s for each precision, batch size and memory format."""
    from segbatch.model import Segmenter

    rows = []
    for channels_last in (False, True):  # channels_last changes the module: last
        for precision in args.precisions:
            cfg = model_config(precision, args.min_size, args.max_size)
            seg = Segmenter(loaded, cfg, channels_last=channels_last)
            for batch in args.batch_sizes:
                n = max(batch, (args.network_images // batch) * batch)
                work = images[:n]

                def run(n: int = n, batch: int = batch, seg: Segmenter = seg, work: list = work) -> None:
                    for i in range(0, n, batch):
                        seg.raw_detections(work[i : i + batch])

                seg.raw_detections(work[:batch])  # warm-up: cudnn picks its kernels per shape
                t = timed(run)
                rows.append(
                    {
                        "what": "network",
                        "precision": precision,
                        "batch": batch,
                        "channels_last": channels_last,
                        "images": n,
                        "images_per_s": round(n / t, 2),
                        "ms_per_image": round(1000 * t / n, 2),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_full_forward(loaded, images, args) -> dict:
    """torchvision's model([x]) one image at a time, paste into full-image masks included."""
    import numpy as np
    import torch

    model = loaded.module.to(memory_format=torch.contiguous_format)
    n = min(len(images), 16)
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255).to(loaded.device) for im in images[:n]]
    with torch.inference_mode():
        model(tensors[:1])
        t = timed(lambda: [model([x]) for x in tensors])
    row = {
        "what": "torchvision model([x]) with paste",
        "precision": "fp32",
        "batch": 1,
        "images": n,
        "images_per_s": round(n / t, 2),
        "ms_per_image": round(1000 * t / n, 2),
    }
    print(json.dumps(row), flush=True)
    return row


def bench_decode(paths: list[str]) -> list[dict]:
    import torch
    import torchvision
    from torchvision.io import decode_jpeg

    from segbatch.model import decode_image

    data = [Path(p).read_bytes() for p in paths[:32]]
    decode_image(data[0], max_pixels=10**9)
    t_pil = timed(lambda: [decode_image(d, max_pixels=10**9) for d in data])
    rows = [
        {
            "what": "decode JPEG, Pillow, 1 CPU thread",
            "images": len(data),
            "ms_per_image": round(1000 * t_pil / len(data), 2),
        }
    ]
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        decode_jpeg(tensors[:8], device="cuda")
        t_gpu = timed(lambda: [decode_jpeg(tensors[i : i + 8], device="cuda") for i in range(0, len(tensors), 8)], 3)
        rows.append(
            {
                "what": f"decode JPEG, torchvision {torchvision.__version__} decode_jpeg on the GPU, batches of 8",
                "images": len(data),
                "ms_per_image": round(1000 * t_gpu / len(data), 2),
            }
        )
    except Exception as exc:  # nvjpeg missing from this build
        rows.append({"what": "decode JPEG on the GPU", "error": f"{type(exc).__name__}: {exc}"})
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def bench_postprocess(loaded, images, args) -> dict:
    """Segmenter.records of one image's 100 detections, on one CPU thread."""
    import torch

    from segbatch.model import Segmenter

    seg = Segmenter(loaded, model_config("fp32", args.min_size, args.max_size))
    raws = [{k: v.cpu() for k, v in r.items()} for r in seg.raw_detections(images[:4])]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for raw, im in zip(raws, images):
            seg.records(raw, im.shape[:2])
        t = timed(lambda: [seg.records(raw, im.shape[:2]) for raw, im in zip(raws, images)], 5) / len(raws)
    finally:
        torch.set_num_threads(threads)
    row = {
        "what": "postprocess 100 detections (box-local paste + RLE), 1 CPU thread",
        "detections": int(raws[0]["boxes"].shape[0]),
        "ms_per_image": round(1000 * t, 2),
    }
    print(json.dumps(row), flush=True)
    return row


def bench_pipeline(
    loaded, paths, args, precision: str, batch: int, channels_last: bool, encode: int | None, gpu_jpeg: bool | None
) -> dict:
    """ShardProcessor over local files: one actor's work, in this process."""
    from segbatch.engine import ShardProcessor
    from segbatch.model import Segmenter
    from segbatch.storage import Storage

    seg = Segmenter(loaded, model_config(precision, args.min_size, args.max_size), channels_last=channels_last)
    proc = ShardProcessor(
        seg,
        Storage(),
        batch_size=batch,
        max_bytes=1 << 30,
        max_pixels=10**9,
        io_threads=args.io_threads,
        encode_processes=encode,
        gpu_jpeg=gpu_jpeg,
        cpus=args.cpus,
    )
    try:
        proc.run(paths[: 2 * batch])  # warm-up
        n = len(paths)
        t0 = time.perf_counter()
        rows, stats = proc.run(paths)
        t = time.perf_counter() - t0
    finally:
        proc.close()
    assert len(rows) == n and all(r["status"] == "ok" for r in rows)
    row = {
        "what": "segbatch pipeline (ShardProcessor, in process)",
        "precision": precision,
        "batch": batch,
        "channels_last": channels_last,
        "images": n,
        "images_per_s": round(n / t, 2),
        "ms_per_image": round(1000 * t / n, 2),
        "stage_seconds": {k: round(v, 2) for k, v in stats.seconds.items()},
        "detections_per_image": stats.detections / n,
        "encode_processes": proc.encode_processes,
        "gpu_jpeg": proc.gpu_jpeg,
    }
    print(json.dumps(row), flush=True)
    return row


def bench_precision_accuracy(args) -> list[dict]:
    """The demo model at each precision on held-out scenes (seed 2026): mask AP, and the IoU of each
    fp32 mask with its best match (same class) at the other precision."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from segbatch.config import ModelConfig
    from segbatch.model import Segmenter, decode_image, load_model
    from segbatch.outputs import evaluate
    from segbatch.train import write_dataset

    folder = os.path.join(args.out, "heldout")
    gt = json.loads(
        Path(write_dataset(folder, args.accuracy_scenes, 2026, processes=min(16, os.cpu_count() or 1))).read_text()
    )
    images = {
        im["file_name"]: decode_image(Path(folder, im["file_name"]).read_bytes(), max_pixels=10**9)
        for im in gt["images"]
    }
    by_precision: dict[str, list[dict]] = {}
    rows = []
    for precision in ["fp32"] + [p for p in args.precisions if p != "fp32"]:
        cfg = ModelConfig(model="demo", precision=precision)
        seg = Segmenter(load_model(cfg), cfg)
        out = []
        for name, image in images.items():
            (dets,) = seg.segment([image])
            out.append({"uri": os.path.join(folder, name), "status": "ok", "detections": dets})
        by_precision[precision] = out
        figures = evaluate(out, gt)
        row = {
            "what": "demo model on held-out scenes",
            "precision": precision,
            "scenes": len(images),
            "mask_ap": round(figures["segm"]["AP"], 4),
            "box_ap": round(figures["bbox"]["AP"], 4),
        }
        if precision != "fp32":
            ious = []
            for ref_row, row_p in zip(by_precision["fp32"], out):
                for d in ref_row["detections"]:
                    same = [e for e in row_p["detections"] if e["label"] == d["label"]]
                    if not same:
                        ious.append(0.0)
                        continue
                    enc = lambda m: {"size": m["size"], "counts": m["counts"].encode()}  # noqa: E731
                    iou = mask_utils.iou([enc(e["mask"]) for e in same], [enc(d["mask"])], [0])
                    ious.append(float(np.max(iou)))
            row["mask_iou_vs_fp32_mean"] = round(float(np.mean(ious)), 4)
            row["mask_iou_vs_fp32_p05"] = round(float(np.percentile(ious, 5)), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--network-images", type=int, default=32)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument(
        "--pipeline",
        default="bf16:8:0:auto:auto,fp32:8:0:auto:auto",
        help="PRECISION:BATCH:CHANNELS_LAST(0/1):ENCODE_PROCESSES(auto/N):GPU_JPEG(auto/0/1),...",
    )
    ap.add_argument(
        "--cpus", type=float, default=8, help="CPUs the pipeline may assume it has (its automatic encoding processes)."
    )
    ap.add_argument(
        "--accuracy-scenes", type=int, default=100, help="Held-out demo scenes for the precision check (0: skip)."
    )
    ap.add_argument("--sections", default="decode,postprocess,full,network,pipeline,accuracy")
    args = ap.parse_args(argv)
    args.precisions = args.precisions.split(",")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import torch

    from segbatch.model import decode_image, load_model

    os.makedirs(args.out, exist_ok=True)
    width, height = common.parse_size(args.size)
    t0 = time.perf_counter()
    paths = make_images(os.path.join(args.out, "images"), args.images, width, height)
    print(f"{len(paths)} JPEGs of {width}x{height} in {time.perf_counter() - t0:.1f} s", flush=True)
    torch.backends.cudnn.benchmark = True
    loaded = load_model(model_config("fp32", args.min_size, args.max_size))
    images = [decode_image(Path(p).read_bytes(), max_pixels=10**9) for p in paths[: args.network_images]]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU smoke run)"
    results: dict = {"machine": common.machine_text(), "gpu": gpu, "size": args.size}
    sections = set(args.sections.split(","))
    if "decode" in sections:
        results["decode"] = bench_decode(paths)
    if "postprocess" in sections:
        results["postprocess"] = bench_postprocess(loaded, images, args)
    if "full" in sections:
        results["full_forward"] = bench_full_forward(loaded, images, args)
    if "network" in sections:
        results["network"] = bench_network(loaded, images, args)
    if "pipeline" in sections:
        results["pipeline"] = []
        for spec in filter(None, args.pipeline.split(",")):
            precision, batch, cl, encode, jpeg = spec.split(":")
            results["pipeline"].append(
                bench_pipeline(
                    loaded,
                    paths,
                    args,
                    precision,
                    int(batch),
                    cl == "1",
                    None if encode == "auto" else int(encode),
                    None if jpeg == "auto" else jpeg == "1",
                )
            )
    if "accuracy" in sections and args.accuracy_scenes:
        results["accuracy"] = bench_precision_accuracy(args)
    Path(args.out, "bench_gpu.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
