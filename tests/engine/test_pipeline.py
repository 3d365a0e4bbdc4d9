"""One shard through fetch, decode, infer and encode, in one process (no Ray)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from segbatch.config import ModelConfig
from segbatch.engine import Decoded, ShardProcessor, aspect_batches, fetch_and_decode
from segbatch.model import Segmenter, load_model
from segbatch.storage import Storage, output_name

from faultproxy import FaultProxy

CFG = ModelConfig(model="random", seed=1, score_threshold=0.0, max_detections=4, min_size=96, max_size=128)


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter(load_model(CFG), CFG)


@pytest.fixture(scope="module")
def uris(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("shard")
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
        arr = getattr(skdata, name)()
        path = root / f"{name}.png"
        Image.fromarray(arr).resize((arr.shape[1] // 4, arr.shape[0] // 4)).save(path)
        out.append(str(path))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return sorted(out + [str(root / "broken.jpg")])


@pytest.fixture(scope="module")
def jpeg_uris(tmp_path_factory) -> list[str]:
    """JPEGs the GPU path decodes (one turned by EXIF), and one whose header is fine but whose body is cut."""
    root = tmp_path_factory.mktemp("jpegs")
    for name, orientation in (("astronaut", 1), ("coffee", 6), ("rocket", 3)):
        arr = getattr(skdata, name)()
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(arr).resize((arr.shape[1] // 4, arr.shape[0] // 4)).save(
            root / f"{name}.jpg", exif=exif.tobytes()
        )
    whole = (root / "astronaut.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    return sorted(str(p) for p in root.iterdir())


def _run(segmenter: Segmenter, uris: list[str], encode_processes: int, batch_size: int = 2, **kw) -> list[dict]:
    proc = ShardProcessor(
        segmenter,
        Storage(),
        batch_size=batch_size,
        max_bytes=1 << 26,
        max_pixels=10**8,
        encode_processes=encode_processes,
        **kw,
    )
    try:
        rows, stats = proc.run(uris)
    finally:
        proc.close()
    assert stats.images == len(uris) and stats.errors == 1
    assert stats.seconds["encode"] > 0 and stats.seconds["infer"] > 0
    return rows


def test_jpegs_decoded_in_batches_as_the_gpu_path_does(segmenter, jpeg_uris) -> None:
    """The GPU path's logic, on the CPU: batched torchvision decoding, EXIF turns, and Pillow's
    error row for the JPEG the batched decoder refuses (torchvision and Pillow share libjpeg-turbo
    here, so the rows are identical; nvjpeg's pixels may differ by a few levels). Batches of one:
    the refused JPEG leaves a batch later on this path, and a batch's padding changes the numbers."""
    by_pillow = _run(segmenter, jpeg_uris, encode_processes=0, batch_size=1, gpu_jpeg=False)
    batched = _run(segmenter, jpeg_uris, encode_processes=0, batch_size=1, gpu_jpeg=True)
    assert batched == by_pillow
    cut = next(r for r in batched if r["uri"].endswith("cut.jpg"))
    assert cut["status"] == "error" and "truncated JPEG" in cut["error"]
    coffee = next(r for r in batched if r["uri"].endswith("coffee.jpg"))
    assert (coffee["height"], coffee["width"]) == (600 // 4, 400 // 4)  # turned upright by its EXIF orientation


def test_rows_equal_whether_encoded_in_a_thread_or_processes(segmenter, uris) -> None:
    in_thread = _run(segmenter, uris, encode_processes=0)
    in_processes = _run(segmenter, uris, encode_processes=2)
    assert [r["uri"] for r in in_thread] == uris  # one row per input, sorted by URI
    assert in_processes == in_thread
    broken = next(r for r in in_thread if r["uri"].endswith("broken.jpg"))
    assert broken["status"] == "error" and "JPEG" in broken["error"]
    ok = [r for r in in_thread if r["status"] == "ok"]
    assert all(len(r["detections"]) == 4 for r in ok)


def test_rows_equal_the_segmenter_on_each_image(segmenter, uris) -> None:
    """Batching and the pipeline's threads change nothing: each row is what segment([image]) gives."""
    from segbatch.model import decode_image

    rows = {r["uri"]: r for r in _run(segmenter, uris, encode_processes=0)}
    for uri in uris[:3]:
        if uri.endswith("broken.jpg"):
            continue
        image = decode_image(open(uri, "rb").read(), max_pixels=10**8)
        (expected,) = segmenter.segment([image])
        got = rows[uri]["detections"]
        assert [d["label"] for d in got] == [d["label"] for d in expected]
        assert [d["mask"]["counts"] for d in got] == [d["mask"]["counts"] for d in expected]


def test_aspect_batches_group_similar_shapes_and_keep_every_image() -> None:
    shapes = [(100, 200), (200, 100), (100, 210), (210, 100), (100, 190), (50, 50)]
    items = [Decoded(f"u{i}", image=np.zeros((*s, 3), np.uint8)) for i, s in enumerate(shapes)]
    batches = [[d.uri for d in b] for b in aspect_batches(items, batch_size=2, window=6)]
    # the oldest waiting image leads each batch (nothing starves), with its closest aspect ratio
    assert batches == [["u0", "u2"], ["u1", "u3"], ["u4", "u5"]]


def test_class_maps_of_images(segmenter, uris, tmp_path) -> None:
    """--semantic-out for images: a PNG per image, the best-scoring mask winning each pixel."""
    from pycocotools import mask as mask_utils

    rows = _run(segmenter, uris, encode_processes=0, semantic_out=str(tmp_path))
    for row in rows:
        png = tmp_path / output_name(row["uri"], ".png")
        if row["status"] != "ok":
            assert not png.exists()
            continue
        classes = np.asarray(Image.open(png))
        expected = np.zeros((row["height"], row["width"]), np.uint8)
        for d in sorted(row["detections"], key=lambda d: d["score"]):
            expected[
                mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}).astype(bool)
            ] = d["label"]
        assert np.array_equal(classes, expected)


def test_class_maps_of_images_with_one_name_in_two_folders(segmenter, uris, tmp_path) -> None:
    """store1/shelf_001.png and store2/shelf_001.png each keep their own class map."""
    twins = []
    images = [next(u for u in uris if u.endswith(name)) for name in ("astronaut.png", "chelsea.png")]  # two shapes
    for folder, source in zip(("store1", "store2"), images):
        (tmp_path / folder).mkdir()
        twins.append(str(tmp_path / folder / "shelf_001.png"))
        Path(twins[-1]).write_bytes(Path(source).read_bytes())
    proc = ShardProcessor(
        segmenter,
        Storage(),
        batch_size=2,
        max_bytes=1 << 26,
        max_pixels=10**8,
        encode_processes=0,
        semantic_out=str(tmp_path / "classes"),
    )
    try:
        rows, _ = proc.run(twins)
    finally:
        proc.close()
    maps = [np.asarray(Image.open(tmp_path / "classes" / output_name(r["uri"], ".png"))) for r in rows]
    assert len(list((tmp_path / "classes").iterdir())) == 2
    assert [m.shape for m in maps] == [(r["height"], r["width"]) for r in rows] and maps[0].shape != maps[1].shape


def test_a_broken_gpu_decoder_is_turned_off_once(segmenter, jpeg_uris, monkeypatch, caplog) -> None:
    """The decoder refuses a batch Pillow decodes whole: the decoder is at fault, not the
    files, so it is turned off with one warning instead of failing every batch."""
    import segbatch.engine.pipeline as pipeline

    calls = []

    def broken(datas, headers, device):
        calls.append(len(datas))
        raise RuntimeError("nvjpeg: no decoder on this device")

    good = [u for u in jpeg_uris if not u.endswith("cut.jpg")]
    by_pillow = _run(segmenter, jpeg_uris, encode_processes=0, batch_size=1, gpu_jpeg=False)
    monkeypatch.setattr(pipeline, "decode_jpegs", broken)
    proc = ShardProcessor(
        segmenter, Storage(), batch_size=1, max_bytes=1 << 26, max_pixels=10**8, encode_processes=0, gpu_jpeg=True
    )
    try:
        with caplog.at_level(logging.WARNING, logger="segbatch.engine.pipeline"):
            rows, _ = proc.run(good)
    finally:
        proc.close()
    assert calls == [1] and not proc.gpu_jpeg
    assert rows == [r for r in by_pillow if r["uri"] in good]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "turned off" in warning and "nvjpeg: no decoder" in warning


def test_a_bad_file_leaves_the_gpu_decoder_on(segmenter, jpeg_uris) -> None:
    cut = [u for u in jpeg_uris if u.endswith("cut.jpg")]
    proc = ShardProcessor(
        segmenter, Storage(), batch_size=1, max_bytes=1 << 26, max_pixels=10**8, encode_processes=0, gpu_jpeg=True
    )
    try:
        (row,), _ = proc.run(cut)
    finally:
        proc.close()
    assert row["status"] == "error" and proc.gpu_jpeg


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_encoding_processes_die_with_a_killed_worker() -> None:
    """A SIGKILLed (or OOM-killed) actor runs no cleanup: its encoders, busy or not, must not run on."""
    script = textwrap.dedent("""
        import multiprocessing, os, time
        from concurrent.futures import ProcessPoolExecutor
        from segbatch.engine.pipeline import _start_encoder

        if __name__ == "__main__":
            pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start_encoder, initargs=(os.getpid(),))
            for _ in range(2):
                pool.submit(time.sleep, 600)  # a long encoding
            while len(pool._processes) < 2:
                time.sleep(0.05)
            print(*pool._processes, flush=True)
            time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(p) for p in parent.stdout.readline().split()]
        time.sleep(5)  # let them import torch and run their initializer
        assert len(children) == 2 and all(_alive(c) for c in children)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    leftover = [c for c in children if _alive(c)]
    for c in leftover:
        os.kill(c, signal.SIGKILL)
    assert not leftover, "encoding processes outlived their worker"


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for whoever adopted it to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_storage_that_keeps_failing_fails_the_shard_not_the_image(s3, s3_server, uris) -> None:
    """An outage that outlasts the retries is raised (the driver retries the shard);
    a missing or damaged file still costs its row. The image is not at fault."""
    png = Path(uris[0]).read_bytes()
    s3.put("ok.png", png)
    with FaultProxy(s3_server, rate=1.0, modes=("slowdown",)) as proxy:
        down = Storage(s3.options_via(proxy.endpoint), retries=2, backoff_s=0.01, max_backoff_s=0.02)
        fs, _ = down.fs(s3.url())
        fs.retries, fs.config_kwargs = 1, {"retries": {"total_max_attempts": 1}}  # only segbatch's own retries
        fs.connect(refresh=True)
        with pytest.raises(OSError):
            fetch_and_decode(s3.url("ok.png"), down, max_bytes=1 << 26, max_pixels=10**8)
    up = Storage(s3.storage_options)
    assert fetch_and_decode(s3.url("ok.png"), up, max_bytes=1 << 26, max_pixels=10**8).image is not None
    missing = fetch_and_decode(s3.url("gone.png"), up, max_bytes=1 << 26, max_pixels=10**8)
    assert missing.error_row["status"] == "error" and "not found" in missing.error_row["error"]
    s3.put("cut.png", png[: len(png) // 3])
    cut = fetch_and_decode(s3.url("cut.png"), up, max_bytes=1 << 26, max_pixels=10**8)
    assert cut.error_row["status"] == "error"


def test_class_map_png_from_encode_rows_equals_decoded_rles(tmp_path) -> None:
    """encode_rows' class map (painted from box masks) is, pixel for pixel, the one
    its rows' RLEs give when decoded: overlaps, boxes off the image, labels past a byte (uint16)."""
    from pycocotools import mask as mask_utils

    from segbatch.engine import encode_rows

    rng = np.random.default_rng(5)
    h, w, n = 90, 130, 40
    xy = rng.uniform([-20, -20], [w + 5, h + 5], size=(n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 60, size=(n, 2))], axis=1).astype(np.float32)
    raw = {
        "boxes": boxes,
        "labels": rng.integers(1, 400, size=n),
        "scores": np.round(rng.uniform(0, 1, size=n), 1).astype(np.float32),  # rounded: tied scores too
        "masks": rng.uniform(0, 1, size=(n, 1, 28, 28)).astype(np.float32),
    }
    uri = str(tmp_path / "frame.png")
    rows, _ = encode_rows([(uri, h, w, raw)], 0.5, [], semantic=(Storage(), str(tmp_path / "classes")))
    classes = np.asarray(Image.open(tmp_path / "classes" / output_name(uri, ".png")))
    expected = np.zeros((h, w), np.uint16)
    for d in sorted(rows[0]["detections"], key=lambda d: d["score"]):
        expected[
            mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}).astype(bool)
        ] = d["label"]
    assert expected.max() >= 256 and len(np.unique(expected)) > 5
    assert np.array_equal(classes, expected)
