"""One shard through fetch, decode, infer and encode, in one process (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from segbatch.config import ModelConfig
from segbatch.model import load_model
from segbatch.pipeline import Decoded, ShardProcessor, aspect_batches
from segbatch.predictor import Segmenter
from segbatch.storage import Storage

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
        Image.fromarray(arr).resize((arr.shape[1] // 4, arr.shape[0] // 4)).save(root / f"{name}.jpg", exif=exif.tobytes())
    whole = (root / "astronaut.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    return sorted(str(p) for p in root.iterdir())


def _run(segmenter: Segmenter, uris: list[str], encode_processes: int, batch_size: int = 2, **kw) -> list[dict]:
    proc = ShardProcessor(
        segmenter, Storage(), batch_size=batch_size, max_bytes=1 << 26, max_pixels=10**8,
        encode_processes=encode_processes, **kw,
    )  # fmt: skip
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
    from segbatch.decode import decode_image

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
        png = tmp_path / (Path(row["uri"]).stem + ".png")
        if row["status"] != "ok":
            assert not png.exists()
            continue
        classes = np.asarray(Image.open(png))
        expected = np.zeros((row["height"], row["width"]), np.uint8)
        for d in sorted(row["detections"], key=lambda d: d["score"]):
            expected[mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}).astype(bool)] = d["label"]
        assert np.array_equal(classes, expected)
