"""One shard through fetch, decode, infer and encode, in one process (no Ray)."""

from __future__ import annotations

import io

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


def _run(segmenter: Segmenter, uris: list[str], encode_processes: int) -> list[dict]:
    proc = ShardProcessor(
        segmenter, Storage(), batch_size=2, max_bytes=1 << 26, max_pixels=10**8, encode_processes=encode_processes
    )
    try:
        rows, stats = proc.run(uris)
    finally:
        proc.close()
    assert stats.images == len(uris) and stats.errors == 1
    assert stats.seconds["encode"] > 0 and stats.seconds["infer"] > 0
    return rows


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
