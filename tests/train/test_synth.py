"""The synthetic scene generator: reproducible, exact masks, valid COCO."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segbatch.train import CLASSES, generate_scene, scene_rng, write_dataset


@pytest.mark.parametrize("kind", ["shelf", "aerial"])
def test_scene_is_reproducible_and_masks_are_disjoint(kind: str) -> None:
    image_a, inst_a = generate_scene(np.random.default_rng(7), kind, 160, 128)
    image_b, inst_b = generate_scene(np.random.default_rng(7), kind, 160, 128)
    assert image_a.shape == (128, 160, 3) and image_a.dtype == np.uint8
    assert np.array_equal(image_a, image_b)
    assert [i["label"] for i in inst_a] == [i["label"] for i in inst_b]
    assert all(np.array_equal(a["mask"], b["mask"]) for a, b in zip(inst_a, inst_b))
    assert inst_a, "a scene has objects"
    stack = np.stack([i["mask"] for i in inst_a])
    assert stack.dtype == bool and stack.shape[1:] == (128, 160)
    assert stack.sum(0).max() == 1, "visible masks never overlap"
    assert all(1 <= i["label"] < len(CLASSES) for i in inst_a)
    other, _ = generate_scene(np.random.default_rng(8), kind, 160, 128)
    assert not np.array_equal(image_a, other)


def test_unknown_kind() -> None:
    with pytest.raises(ValueError):
        generate_scene(np.random.default_rng(0), "underwater", 64, 64)


def test_write_dataset(tmp_path) -> None:
    gt_path = write_dataset(str(tmp_path / "d"), 4, seed=3, size=(160, 128))
    assert gt_path == os.path.join(str(tmp_path / "d"), "ground_truth.json")
    # Scenes drawn in parallel processes are the same scenes, numbered alike.
    again = write_dataset(str(tmp_path / "e"), 4, seed=3, size=(160, 128), processes=2)
    assert json.load(open(gt_path)) == json.load(open(again))
    for name in sorted(os.listdir(tmp_path / "d" / "images")):
        assert (tmp_path / "d" / "images" / name).read_bytes() == (tmp_path / "e" / "images" / name).read_bytes()

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(gt_path)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES[1:]
    assert {coco.imgs[i]["kind"] for i in coco.getImgIds()} == {"shelf", "aerial"}
    for index, image_id in enumerate(sorted(coco.getImgIds())):
        info = coco.imgs[image_id]
        assert info["file_name"] == f"images/scene-{index:05d}.png"
        pixels = np.asarray(Image.open(tmp_path / "d" / info["file_name"]))
        assert pixels.shape == (128, 160, 3)
        # The PNG is lossless: the pixels are the generator's own.
        image, instances = generate_scene(scene_rng(3, index), info["kind"], 160, 128)
        assert np.array_equal(pixels, image)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(instances)
        for ann, inst in zip(anns, instances):
            decoded = mask_utils.decode(coco.annToRLE(ann)).astype(bool)
            assert np.array_equal(decoded, inst["mask"])
            assert ann["category_id"] == inst["label"] and ann["iscrowd"] == 0
            assert ann["area"] == inst["mask"].sum()
            ys, xs = np.nonzero(inst["mask"])
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
