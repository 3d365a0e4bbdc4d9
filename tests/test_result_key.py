"""The result key: every option that can change a row is in it, nothing else is,
and a checkpoint is known by its weights' hash, not by where it lies."""

from __future__ import annotations

import dataclasses
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segbatch.config import JobConfig, ModelConfig
from segbatch.engine import JobError, prepare
from segbatch.storage import Storage

from s3util import S3Bucket


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of two small images and the shipped demo checkpoint copied to a local path."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    weights = tmp_path / "models" / "v1.pt"
    weights.parent.mkdir()
    with resources.as_file(resources.files("segbatch") / "assets" / "demo.pt") as demo:
        shutil.copyfile(demo, weights)
    return images, weights


def _cfg(images: Path, dest: Path, weights: str, **changes) -> JobConfig:
    cfg = JobConfig(source=str(images), dest=str(dest), model=ModelConfig(model=weights), progress="none")
    return dataclasses.replace(cfg, **changes)


def test_same_weights_under_another_path_or_uri_resume(setup, tmp_path: Path, s3: S3Bucket):
    images, weights = setup
    dest = tmp_path / "out"
    storage = Storage(s3.storage_options)
    _, _, key, _ = prepare(_cfg(images, dest, str(weights)), storage)

    moved = tmp_path / "elsewhere" / "renamed.pt"
    moved.parent.mkdir()
    shutil.copyfile(weights, moved)
    assert prepare(_cfg(images, dest, str(moved)), storage)[2] == key
    uri = s3.put("models/release-3.pt", weights.read_bytes())
    assert prepare(_cfg(images, dest, uri), storage)[2] == key

    other = tmp_path / "elsewhere" / "retrained.pt"  # other weights: refused, naming the hash that changed
    other.write_bytes(weights.read_bytes() + b"\0")  # still a valid zip checkpoint, another hash
    with pytest.raises(JobError, match=r"weights_hash: \w+ -> \w+.*--overwrite"):
        prepare(_cfg(images, dest, str(other)), storage)


@pytest.mark.parametrize(
    "change, shown",
    [
        ({"batch_size": 4}, "batch_size: 2 -> 4"),
        ({"max_pixels": 1_000_000}, "max_pixels: 178956970 -> 1000000"),
        ({"max_bytes": 1 << 20}, "max_bytes: 536870912 -> 1048576"),
        ({"decode": "cpu"}, "decode: auto -> cpu"),
        ({"semantic_out": "CLASSMAPS"}, "semantic_out: (not set) -> "),
        ({"objects_crs": "EPSG:4326"}, "objects_crs: (not set) -> EPSG:4326"),
        ({"model": ModelConfig(score_threshold=0.3)}, "score_threshold: 0.5 -> 0.3"),
    ],
)
def test_changed_options_that_change_rows_are_refused(setup, tmp_path: Path, change, shown):
    images, weights = setup
    dest, storage = tmp_path / "out", Storage()
    prepare(_cfg(images, dest, str(weights)), storage)
    if "semantic_out" in change:
        change = {"semantic_out": str(tmp_path / "classmaps")}
    if "model" in change:
        change = {"model": dataclasses.replace(change["model"], model=str(weights))}
    with pytest.raises(JobError, match="other options that change rows") as refused:
        prepare(_cfg(images, dest, str(weights), **change), storage)
    message = str(refused.value)
    assert shown in message and "--overwrite" in message and "previous options" in message
    # the other options are not named: only what changed
    assert message.count(" -> ") == 1, message


def test_options_that_cannot_change_rows_resume(setup, tmp_path: Path):
    images, weights = setup
    dest, storage = tmp_path / "out", Storage()
    key = prepare(_cfg(images, dest, str(weights)), storage)[2]
    same = _cfg(
        images,
        dest,
        str(weights),
        workers=3,
        io_threads=9,
        cpus_per_worker=2.0,
        retries=7,
        io_retries=2,
        shard_size=5,
        stall_timeout_s=30.0,
        progress="lines",
        count_by=r"(?P<name>\d)",
        encode_processes=1,
        stac_asset="thumbnail",  # picks a STAC source's images, as SOURCE does; not how rows are made
    )
    assert prepare(same, storage)[2] == key
    device = dataclasses.replace(same, model=dataclasses.replace(same.model, device="cpu"))
    assert prepare(device, storage)[2] == key
