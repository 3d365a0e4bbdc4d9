"""Throughput side by side (issue 4): segbatch against the network alone, a naive
script and a Ray Data pipeline, on the same images, model and threads.

Run (the full setting; ~4-6 minutes on an idle 2-core CPU, ~3-5 s per 1080p
image per method at fp32):

    python bench/bench_throughput.py --images 8 --images-small 2 --size 1920x1080 --threads 2 \
        --batch-size 2 --out BENCHMARKS-throughput.md

Smoke (a minute or two): ``--images 2 --images-small 1 --size 160x120 --min-size 64 --max-size 64``.

The stage
    ``--images`` JPEGs (quality 90) of ``--size``, made from skimage.data
    photographs (bundled, offline), are uploaded to a bucket of a moto S3
    server this script starts on 127.0.0.1; every method reads them from
    there. The model is torchvision's maskrcnn_resnet50_fpn with seeded
    random weights (COCO weights cannot be downloaded everywhere), built by
    ``segbatch.model.loading.load_model(ModelConfig(model="random", seed=0,
    score_threshold=0.0, max_detections=100, min_size, max_size))``: with a
    score threshold of 0 every image gets exactly 100 detections, the
    issue's 1080p/100-detection setting. Everything runs on the CPU with T
    threads: ``torch.set_num_threads(T)`` in (a) and (b), Ray actors with
    ``num_cpus=T`` in (c) and (d) (Ray sets OMP_NUM_THREADS=T in them; (c)
    reports what torch saw). The local Ray cluster of (c) and (d) has T+1
    logical CPUs so that Ray Data's read tasks (1 CPU each) can be scheduled
    beside the T-CPU actor; segbatch reads inside its actor and does not use
    the extra one.

The methods
    (a) network: ``Segmenter.raw_detections`` (transform, backbone, RPN, RoI
        heads; no paste, no encoding) on images decoded beforehand, in
        batches of ``--batch-size``: the ceiling.
    (b) naive script: for each image, s3fs read, PIL decode, ``model([x])``
        (torchvision's full forward, full-image paste included),
        ``masks > 0.5``, ``pycocotools.mask.encode`` of each mask; one image
        at a time; the rows written to one Parquet file at the end.
    (c) Ray Data, as Ray's batch inference guide shows:
        ``read_binary_files(s3 prefix, filesystem=pyarrow S3FileSystem)`` ->
        ``map_batches(actor class, compute=ActorPoolStrategy(size=1),
        num_cpus=T, batch_size=B)`` holding the torchvision model (full
        forward, paste included) and pycocotools encoding ->
        ``write_parquet`` to a local folder. (``concurrency=1`` is the older
        spelling of the same pool; Ray 2.51+ deprecates it.)
    (d) ``segbatch run s3://... DEST --model random --seed 0
        --score-threshold 0 --max-detections 100 --min-size --max-size
        --workers 1 --cpus-per-worker T --batch-size B --device cpu
        --precision P --address <the cluster of (c)>`` as a subprocess.
    ``--precision bf16`` applies to (a) and (d) only: a user of plain
    torchvision or Ray Data would not add autocast, so (b) and (c) stay fp32.

What is measured: marginal cost per image, start-up left out
    Each method runs the same job twice, on the first ``--images-small`` (N1)
    and on all ``--images`` (N2) images, each under its own S3 prefix, and
    the cost per image is (t(N2) - t(N1)) / (N2 - N1); images/s is its
    inverse. Choose N1 and N2 as multiples of ``--batch-size`` (the
    defaults 2 and 8 are), so that both runs are made of whole batches.
    What a run's t covers:
    (a), (b): the loop over the images, in one process that has built the
              model and run one untimed warm-up image (batch) already;
    (c):      the ``write_parquet`` call that executes the dataset: Ray Data
              planning, S3 listing and reads, a fresh actor (model built,
              first-batch warm-up), inference, encoding, writing. One cheap
              untimed Ray Data job runs first so Ray Data's own helper actors
              exist before either timed run;
    (d):      the ``segbatch run`` subprocess from start to exit: interpreter
              and imports, joining the cluster, planning, a fresh actor
              (model built, warm-up), the shard, commit.
    Everything constant per run (start-up, model building, warm-up) cancels
    in the difference; what is left is what one more image costs. (d) also
    reports, as a cross-check, the same difference over the worker's own
    shard seconds from segbatch's commit records (actor start excluded).

Peak memory
    Peak RSS (VmHWM from /proc) of each method's process: (a) and (b) each
    run in a child process of their own (the decoded images of (a) count);
    (c): the driver, i.e. the process that called ray.data; (d): the
    ``segbatch run`` process (from wait4). Ray actors: the largest VmHWM of
    the method's actors (pids from the GCS actor table), sampled every
    0.1 s; a high-water mark, so only growth in an actor's last 0.1 s can be
    missed. Ray's own daemons (GCS, raylet, object store) are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the checkout first on sys.path)

BUCKET = "segbatch-bench"
METHODS = "abcd"
TITLES = {
    "a": "(a) network only",
    "b": "(b) naive script",
    "c": "(c) Ray Data",
    "d": "(d) segbatch run",
}
WHAT = {
    "a": "Segmenter.raw_detections on decoded images: backbone, RPN, heads; no paste, no encoding",
    "b": "one image at a time: fsspec read, PIL decode, torchvision model([x]) with paste, > 0.5, pycocotools encode",
    "c": "read_binary_files -> map_batches(actor: torchvision model with paste + pycocotools) -> write_parquet",
    "d": "segbatch run SOURCE DEST --workers 1: threaded fetch/decode, batched network, box-local paste + RLE, Parquet",
}


# -- shared ----------------------------------------------------------------------------


def model_kwargs(args: argparse.Namespace, precision: str) -> dict:
    return {
        "model": "random",
        "seed": 0,
        "score_threshold": 0.0,
        "max_detections": 100,
        "min_size": args.min_size,
        "max_size": args.max_size,
        "precision": precision,
        "device": args.device,
    }


def prefix(n: int) -> str:
    return f"n{n:05d}/"


def source(args: argparse.Namespace, n: int) -> str:
    """Where the run over ``n`` images reads them: moto's S3, or a local folder (--storage local)."""
    if args.storage == "s3":
        return f"s3://{BUCKET}/{prefix(n)}"
    return os.path.join(args.work, "images", prefix(n))


def image_fs(args: argparse.Namespace):
    """The fsspec filesystem of ``source``: s3fs on the moto endpoint, or the local one."""
    import fsspec

    if args.storage == "s3":
        return fsspec.filesystem("s3", **common.storage_options(args.endpoint))
    return fsspec.filesystem("file")


def image_paths(args: argparse.Namespace, fs, n: int) -> list[str]:
    return sorted(fs.find(source(args, n)))


def result_line(d: dict) -> None:
    print("RESULT " + json.dumps(d), flush=True)


def marginal(t_small: float, t_large: float, n_small: int, n_large: int) -> dict:
    per_image = (t_large - t_small) / (n_large - n_small)
    return {
        "t_small_s": round(t_small, 3),
        "t_large_s": round(t_large, 3),
        "s_per_image": round(per_image, 4),
        "images_per_s": round(1.0 / per_image, 4) if per_image > 0 else None,
    }


# -- (a) the network alone ------------------------------------------------------------------


def child_network(args: argparse.Namespace) -> None:
    import torch

    from segbatch.config import ModelConfig
    from segbatch.model import Segmenter, decode_image, load_model

    torch.set_num_threads(args.threads)
    fs = image_fs(args)
    cfg = ModelConfig(**model_kwargs(args, args.precision))
    seg = Segmenter(load_model(cfg), cfg)

    def load(n: int) -> list:
        return [decode_image(fs.cat_file(p), max_pixels=10**9) for p in image_paths(args, fs, n)]

    def run(images: list) -> tuple[float, list[int]]:
        counts = []
        t0 = time.perf_counter()
        for i in range(0, len(images), args.batch_size):
            # shape[0] is known on the host only once the GPU is done: each batch is waited for
            counts += [int(r["boxes"].shape[0]) for r in seg.raw_detections(images[i : i + args.batch_size])]
        return time.perf_counter() - t0, counts

    small, large = load(args.images_small), load(args.images)  # decoded before any timing
    run(small[: args.batch_size])  # warm-up
    t1, c1 = run(small)
    t2, c2 = run(large)
    result_line(
        {
            **marginal(t1, t2, len(small), len(large)),
            "precision": args.precision,
            "threads": torch.get_num_threads(),
            "detections": [min(c1 + c2), max(c1 + c2)],
            "peak_process_kib": common.status_kib("self"),
        }
    )


# -- (b) the naive script -----------------------------------------------------------------------


def child_naive(args: argparse.Namespace) -> None:
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from pycocotools import mask as mask_utils
    from torchvision.transforms.functional import to_tensor

    from segbatch.config import ModelConfig
    from segbatch.model import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(**model_kwargs(args, "fp32")))
    model, device = loaded.module, loaded.device  # torchvision's MaskRCNN, eval mode
    fs = image_fs(args)
    out_dir = tempfile.mkdtemp(prefix="naive-", dir=args.work)

    def segment(path: str) -> dict:
        img = Image.open(io.BytesIO(fs.cat_file(path))).convert("RGB")
        with torch.inference_mode():
            out = model([to_tensor(img).to(device)])[0]
        masks = (out["masks"] > 0.5).squeeze(1).cpu().numpy()
        rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
        return {
            "uri": fs.unstrip_protocol(path),
            "width": img.width,
            "height": img.height,
            "labels": out["labels"].tolist(),
            "scores": out["scores"].tolist(),
            "boxes": out["boxes"].tolist(),
            "masks": [r["counts"].decode("ascii") for r in rles],
        }

    def run(n: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        rows = [segment(p) for p in image_paths(args, fs, n)]
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(out_dir, f"{n}.parquet"))
        return time.perf_counter() - t0, [len(r["masks"]) for r in rows]

    segment(image_paths(args, fs, args.images_small)[0])  # warm-up
    t1, c1 = run(args.images_small)
    t2, c2 = run(args.images_slow)
    result_line(
        {
            **marginal(t1, t2, args.images_small, args.images_slow),
            "precision": "fp32",
            "threads": torch.get_num_threads(),
            "detections": [min(c1 + c2), max(c1 + c2)],
            "peak_process_kib": common.status_kib("self"),
        }
    )


# -- (c) Ray Data and (d) segbatch, on one local Ray cluster ----------------------------------


class MaskRCNNPredictor:
    """The Ray Data actor a user writes: the torchvision model, full forward, pycocotools.

    Self-contained (imports inside), as Ray ships it by value to its workers.
    """

    def __init__(self, model_kwargs: dict):
        import torch

        from segbatch.config import ModelConfig
        from segbatch.model import load_model

        loaded = load_model(ModelConfig(**model_kwargs))
        self.model, self.device = loaded.module, loaded.device
        self.threads = torch.get_num_threads()

    def __call__(self, batch: dict) -> dict:
        import io

        import numpy as np
        import torch
        from PIL import Image
        from pycocotools import mask as mask_utils
        from torchvision.transforms.functional import to_tensor

        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in batch["bytes"]]
        with torch.inference_mode():
            outputs = self.model([to_tensor(img).to(self.device) for img in images])
        cols: dict[str, list] = {"labels": [], "scores": [], "boxes": [], "masks": []}
        for out in outputs:
            masks = (out["masks"] > 0.5).squeeze(1).cpu().numpy()
            rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
            cols["labels"].append(out["labels"].tolist())
            cols["scores"].append(out["scores"].tolist())
            cols["boxes"].append(out["boxes"].tolist())
            cols["masks"].append([r["counts"].decode("ascii") for r in rles])
        as_objects = {}
        for k, v in cols.items():
            arr = np.empty(len(v), dtype=object)
            arr[:] = v
            as_objects[k] = arr
        return {
            "uri": np.array(list(batch["path"])),
            "width": np.array([img.width for img in images], dtype=np.int32),
            "height": np.array([img.height for img in images], dtype=np.int32),
            **as_objects,
            "torch_threads": np.full(len(images), self.threads, dtype=np.int32),
        }


class ActorPeaks:
    """Samples the VmHWM of every live actor of this cluster until stopped."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peaks: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _actors(self) -> list[tuple[str, int]]:
        try:
            from ray._private import state  # the GCS table: no dashboard needed

            return [
                (a.get("ActorClassName", ""), int(a["Pid"]))
                for a in state.actors().values()
                if a.get("State") == "ALIVE" and a.get("Pid")
            ]
        except Exception:
            from ray.util.state import list_actors

            return [(a.class_name, int(a.pid)) for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.pid]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for name, pid in self._actors():
                    hwm = common.status_kib(pid)
                    if hwm:
                        self.peaks[(name, pid)] = max(self.peaks.get((name, pid), 0), hwm)
            except Exception:  # the GCS may be busy; try again
                pass
            self._stop.wait(self.interval)

    def peak(self, name_contains: str, exclude_pids: set[int] = frozenset()) -> tuple[int | None, set[int]]:
        pids = {pid for (name, pid) in self.peaks if name_contains in name and pid not in exclude_pids}
        values = [v for (name, pid), v in self.peaks.items() if pid in pids]
        return (max(values) if values else None), pids

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _ray_data_run(args: argparse.Namespace, fs, n: int, out: str) -> tuple[float, dict]:
    import pyarrow.parquet as pq
    import ray

    t0 = time.perf_counter()
    ds = ray.data.read_binary_files(source(args, n), filesystem=fs, include_paths=True)
    ds = ds.map_batches(
        MaskRCNNPredictor,
        fn_constructor_kwargs={"model_kwargs": model_kwargs(args, "fp32")},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=args.threads,
        num_gpus=1 if args.device == "cuda" else 0,
        batch_size=args.batch_size,
    )
    ds.write_parquet(out)
    elapsed = time.perf_counter() - t0
    table = pq.read_table(out, columns=["uri", "masks", "torch_threads"])
    counts = [len(m) for m in table.column("masks").to_pylist()]
    if table.num_rows != n:
        raise RuntimeError(f"Ray Data wrote {table.num_rows} rows for {n} images")
    return elapsed, {"detections": counts, "threads": sorted(set(table.column("torch_threads").to_pylist()))}


def _segbatch_run(args: argparse.Namespace, gcs: str, n: int, dest: str) -> tuple[float, dict]:
    from segbatch.engine import JobStore
    from segbatch.storage import Storage

    cmd = [
        sys.executable,
        "-m",
        "segbatch.cli",
        "run",
        source(args, n),
        dest,
        "--model",
        "random",
        "--seed",
        "0",
        "--score-threshold",
        "0",
        "--max-detections",
        "100",
        "--min-size",
        str(args.min_size),
        "--max-size",
        str(args.max_size),
        "--workers",
        "1",
        "--cpus-per-worker",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "--precision",
        args.precision,
        "--device",
        args.device,
        "--progress",
        "lines",
        "--address",
        gcs,
        "--gpus-per-worker",
        "1" if args.device == "cuda" else "0",
    ]
    if args.storage == "s3":
        cmd += ["--storage-options", json.dumps(common.storage_options(args.endpoint))]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    log_path = os.path.join(args.work, f"segbatch-run-{n}.log")
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=str(common.ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
        rc, maxrss = _wait4(proc, args.timeout)
        elapsed = time.perf_counter() - t0
    if rc != 0:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"segbatch run on {n} images exited {rc}:\n{tail}")
    store = JobStore(dest, Storage())
    summary = store.read_summary()
    records = store.commit_records()
    return elapsed, {
        "summary": summary.to_json() if summary else {},
        "shard_seconds": sum(r.seconds for r in records),
        "stage_seconds": {
            k: round(sum((r.stage_seconds or {}).get(k, 0.0) for r in records), 3)
            for k in ("fetch_decode", "infer", "encode")
        },
        "driver_peak_kib": maxrss,
    }


def _wait4(proc: subprocess.Popen, timeout: float) -> tuple[int, int]:
    """Wait for ``proc``; returns (exit status, its peak RSS in KiB)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, int(usage.ru_maxrss)
        if time.monotonic() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return -9, int(usage.ru_maxrss)
        time.sleep(0.05)


def child_ray(args: argparse.Namespace) -> None:
    import ray

    methods = args.methods
    ray.init(
        address="local",
        num_cpus=args.threads + 1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    gcs = ray.get_runtime_context().gcs_address
    sampler = ActorPeaks()
    results: dict[str, dict] = {}
    try:
        if "c" in methods:
            import ray.data

            fs = common.pyarrow_s3(args.endpoint) if args.storage == "s3" else None
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            # untimed: Ray Data's helper actors and pyarrow's S3 client come up once
            ray.data.read_binary_files(source(args, args.images_small), filesystem=fs).map_batches(
                lambda b: {"n": [len(x) for x in b["bytes"]]}
            ).write_parquet(tempfile.mkdtemp(prefix="raydata-warm-", dir=args.work))
            t1, x1 = _ray_data_run(args, fs, args.images_small, tempfile.mkdtemp(prefix="raydata-", dir=args.work))
            t2, x2 = _ray_data_run(args, fs, args.images_slow, tempfile.mkdtemp(prefix="raydata-", dir=args.work))
            time.sleep(0.3)  # one more sample
            actor_peak, seen = sampler.peak("MapBatches(MaskRCNNPredictor)")
            counts = x1["detections"] + x2["detections"]
            results["c"] = {
                **marginal(t1, t2, args.images_small, args.images_slow),
                "precision": "fp32",
                "threads": sorted(set(x1["threads"] + x2["threads"])),
                "detections": [min(counts), max(counts)],
                "peak_process_kib": common.status_kib("self"),
                "peak_actor_kib": actor_peak,
                "actors_seen": len(seen),
            }
        if "d" in methods:
            _, before = sampler.peak("SegmentWorker")
            t1, y1 = _segbatch_run(args, gcs, args.images_small, os.path.join(args.work, "dest-small"))
            t2, y2 = _segbatch_run(args, gcs, args.images, os.path.join(args.work, "dest-large"))
            time.sleep(0.3)
            actor_peak, seen = sampler.peak("SegmentWorker", exclude_pids=before)
            rows = [y["summary"].get("rows", 0) for y in (y1, y2)]
            if rows != [args.images_small, args.images] or any(y["summary"].get("errors") for y in (y1, y2)):
                raise RuntimeError(f"segbatch run wrote {rows} rows ({[y['summary'] for y in (y1, y2)]})")
            dets = [y["summary"].get("detections", 0) for y in (y1, y2)]
            worker = marginal(y1["shard_seconds"], y2["shard_seconds"], args.images_small, args.images)
            results["d"] = {
                **marginal(t1, t2, args.images_small, args.images),
                "precision": args.precision,
                "threads": [args.threads],
                "rows": rows,
                "errors": [y["summary"].get("errors") for y in (y1, y2)],
                "detections_per_image": [round(d / r, 2) if r else None for d, r in zip(dets, rows)],
                "worker_s_per_image": worker["s_per_image"],
                "worker_images_per_s": worker["images_per_s"],
                "stage_seconds": [y1["stage_seconds"], y2["stage_seconds"]],
                "peak_process_kib": max(y1["driver_peak_kib"], y2["driver_peak_kib"]),
                "peak_actor_kib": actor_peak,
                "actors_seen": len(seen),
            }
    finally:
        sampler.stop()
        ray.shutdown()
    result_line(results)


# -- the parent: images, S3, children, the table ---------------------------------------------------


def run_child(kind: str, args: argparse.Namespace, endpoint: str, work: str) -> dict:
    """Run one child (this script with --child KIND) in its own session; returns its RESULT."""
    cmd = [sys.executable, __file__, "--child", kind, "--endpoint", endpoint, "--work", work] + _common_argv(args)
    env = dict(os.environ, **common.aws_env(), RAY_TMPDIR=tempfile.mkdtemp(prefix="sbt", dir="/tmp"))
    env["PYTHONPATH"] = os.pathsep.join([str(common.ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for name in ("RAY_ADDRESS", "OMP_NUM_THREADS"):  # Ray sets OMP_NUM_THREADS from num_cpus only where it is unset
        env.pop(name, None)
    log_path = os.path.join(work, f"child-{kind}.log")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=args.timeout * 3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        finally:
            deadline = time.monotonic() + 20
            while common.session_pids(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            for pid in common.session_pids(proc.pid):  # this child's own Ray processes, if any linger
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = Path(log_path).read_text(errors="replace")[-4000:]
        raise SystemExit(f"bench_throughput: the {kind} child failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(lines[-1][len("RESULT ") :])
    wall = round(time.perf_counter() - started, 1)
    for r in result.values() if kind == "ray" else [result]:
        r["child_wall_s"] = wall  # the whole child: imports, start-up, both runs
    return result


def _common_argv(args: argparse.Namespace) -> list[str]:
    return [
        "--images",
        str(args.images),
        "--images-small",
        str(args.images_small),
        "--size",
        args.size,
        "--images-slow",
        str(args.images_slow),
        "--device",
        args.device,
        "--storage",
        args.storage,
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "--precision",
        args.precision,
        "--min-size",
        str(args.min_size),
        "--max-size",
        str(args.max_size),
        "--methods",
        args.methods,
        "--timeout",
        str(args.timeout),
    ]


def upload_images(endpoint: str, args: argparse.Namespace) -> int:
    """The images under one prefix per run size (N1, N2 and the slow methods' N2; each the first
    images of the largest), on the moto server or in a local folder; returns JPEG bytes total."""
    width, height = common.parse_size(args.size)
    if args.storage == "s3":
        client = common.boto_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
    total = 0
    count = max(args.images, args.images_slow)
    with ProcessPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        jpegs = pool.map(common.photo_jpeg, range(count), [width] * count, [height] * count, chunksize=8)
    for i, data in enumerate(jpegs):
        total += len(data)
        for n in {args.images_small, args.images, args.images_slow}:
            if i >= n:
                continue
            if args.storage == "s3":
                client.put_object(Bucket=BUCKET, Key=f"{prefix(n)}img{i:05d}.jpg", Body=data)
            else:
                Path(source(args, n)).mkdir(parents=True, exist_ok=True)
                Path(source(args, n), f"img{i:05d}.jpg").write_bytes(data)
    return total


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    d = results.get("d", {}).get("images_per_s")
    header = (
        "| method | what runs | precision | s/image | images/s | (d) / this | peak RSS process (MiB) "
        "| peak RSS actor (MiB) | t(N1) s | t(N2) s |\n"
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [header]
    for m in METHODS:
        r = results.get(m)
        if r is None:
            continue
        ips = r.get("images_per_s")
        ratio = f"{d / ips:.2f}" if d and ips else "-"
        lines.append(
            f"| {TITLES[m]} | {WHAT[m]} | {r.get('precision')} | {r['s_per_image']:.3f} | "
            f"{ips if ips is None else f'{ips:.3f}'} | {ratio} | {common.mib(r.get('peak_process_kib'))} | "
            f"{common.mib(r.get('peak_actor_kib'))} | {r['t_small_s']:.2f} | {r['t_large_s']:.2f} |"
        )
    return "\n".join(lines)


def ratios_text(results: dict[str, dict]) -> str:
    d = results.get("d", {}).get("images_per_s")
    parts = []
    for m in "abc":
        other = results.get(m, {}).get("images_per_s")
        if d and other:
            parts.append(f"d/{m} = {d / other:.2f}")
    return ", ".join(parts) if parts else "-"


def report(results: dict, args: argparse.Namespace, jpeg_bytes: int, wall: float) -> str:
    width, height = common.parse_size(args.size)
    cmd = "python bench/bench_throughput.py " + shlex.join(args.argv)
    notes = []
    for m in METHODS:
        r = results.get(m)
        if not r:
            continue
        dets = r.get("detections") or r.get("detections_per_image")
        child = "the Ray child process, (c) and (d) together" if m in "cd" else "its child process"
        notes.append(
            f"- {TITLES[m]}: detections per image {dets}; torch threads {r.get('threads')}; "
            f"{child} (imports, start-up, both runs) took {r.get('child_wall_s', '-')} s"
        )
    if args.images_small % args.batch_size or args.images % args.batch_size:
        notes.append(
            f"- N1 = {args.images_small} or N2 = {args.images} is not a multiple of the batch size "
            f"{args.batch_size}: a partial batch makes the difference less clean"
        )
    if "d" in results:
        r = results["d"]
        notes.append(
            f"- (d) cross-check from segbatch's commit records (the worker's own shard seconds, actor start "
            f"excluded): {r['worker_s_per_image']:.3f} s/image; stage seconds (N1 run, N2 run): {r['stage_seconds']}; "
            f"rows {r['rows']}, error rows {r['errors']}"
        )
    return "\n".join(
        [
            "## Throughput: segbatch against the network alone, a naive script and Ray Data",
            "",
            f"`{cmd}`",
            "",
            f"- Machine: {common.machine_text()}",
            f"- Images: {args.images} JPEGs of {width}x{height} (quality 90, skimage.data photos), "
            f"{jpeg_bytes / max(args.images, args.images_slow) / 1024:.0f} KiB each on average, "
            + ("on a moto S3 server on 127.0.0.1" if args.storage == "s3" else "in a local folder"),
            f"- Model: maskrcnn_resnet50_fpn, seeded random weights (seed 0), score threshold 0, 100 detections "
            f"per image, min/max size {args.min_size}/{args.max_size}; {_device_text(args)}, "
            f"{args.threads} CPU threads; batch size "
            f"{args.batch_size} for (a), (c), (d); --precision {args.precision} for (a) and (d), fp32 for (b) and (c)",
            f"- Marginal cost per image: (t(N2) - t(N1)) / (N2 - N1) with N1 = {args.images_small}, "
            f"N2 = {args.images}"
            + (f" ({args.images_slow} for (b) and (c))" if args.images_slow != args.images else "")
            + "; start-up, model building and warm-up cancel (see the script's docstring)",
            f"- Whole benchmark: {wall:.0f} s",
            "",
            table(results, args),
            "",
            f"Throughput ratios: {ratios_text(results)}.",
            "",
            *notes,
            "",
        ]
    )


def _device_text(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        import torch

        return f"one GPU ({torch.cuda.get_device_name()})"
    return "CPU"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--images", type=int, default=8, help="N2: images of the larger run (and in all).")
    ap.add_argument("--images-small", type=int, default=2, help="N1: images of the smaller run.")
    ap.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT of the JPEGs.")
    cores = len(os.sched_getaffinity(0))
    ap.add_argument("--threads", type=int, default=min(4, cores), help="T: torch threads / actor CPUs [min(4, cores)].")
    ap.add_argument("--batch-size", type=int, default=2, help="B: images per forward in (a), (c) and (d).")
    ap.add_argument(
        "--images-slow", type=int, default=None, help="N2 of (b) and (c), when they are much slower [--images]."
    )
    ap.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="For (a) and (d); (b) and (c) stay fp32."
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU for every method.")
    ap.add_argument(
        "--storage", choices=["s3", "local"], default="s3", help="Read the images from moto's S3 or a local folder."
    )
    ap.add_argument("--min-size", type=int, default=800)
    ap.add_argument("--max-size", type=int, default=1333)
    ap.add_argument("--methods", default=METHODS, help="Which of a, b, c, d to run (default all).")
    ap.add_argument("--timeout", type=float, default=1800.0, help="Seconds one run of one method may take.")
    ap.add_argument("--out", default=None, help="Write the markdown report here (e.g. BENCHMARKS-throughput.md).")
    ap.add_argument("--json", action="store_true", help="Print the results as JSON after the table.")
    ap.add_argument("--child", choices=["a", "b", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.images_slow = args.images_slow or args.images
    if not (1 <= args.images_small < min(args.images, args.images_slow)):
        ap.error("need 1 <= --images-small < --images and --images-slow")
    if set(args.methods) - set(METHODS) or not args.methods:
        ap.error("--methods takes letters of abcd")
    common.parse_size(args.size)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        os.environ.update(common.aws_env())
        {"a": child_network, "b": child_naive, "ray": child_ray}[args.child](args)
        return {}

    started = time.perf_counter()
    work = args.work = tempfile.mkdtemp(prefix="segbatch-bench-throughput-")
    os.environ.update(common.aws_env())
    server, endpoint = common.start_moto() if args.storage == "s3" else (None, "")
    results: dict[str, dict] = {}
    try:
        print(f"making {max(args.images, args.images_slow)} images of {args.size} ...", file=sys.stderr, flush=True)
        jpeg_bytes = upload_images(endpoint, args)
        for kind in ("a", "b"):
            if kind in args.methods:
                print(f"running {TITLES[kind]} ...", file=sys.stderr, flush=True)
                results[kind] = run_child(kind, args, endpoint, work)
        if set("cd") & set(args.methods):
            names = " and ".join(TITLES[m] for m in "cd" if m in args.methods)
            print(f"running {names} ...", file=sys.stderr, flush=True)
            results.update(run_child("ray", args, endpoint, work))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    text = report(results, args, jpeg_bytes, time.perf_counter() - started)
    print(text)
    if args.json:
        print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(text)
        print(f"written to {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
