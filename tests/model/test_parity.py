"""segbatch's masks equal what a user gets from torchvision directly.

Reference: ``model([img])`` with the same seeded weights, sizes and
thresholds, ``masks > mask_threshold``, encoded with pycocotools.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from skimage import data as skdata

from segbatch.config import ModelConfig
from segbatch.model import Segmenter, load_model


def _synthetic(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8)
    for _ in range(8):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        img[y : y + rng.integers(10, h // 2), x : x + rng.integers(10, w // 2)] = rng.integers(0, 255, 3)
    return img


IMAGES = {
    "astronaut": lambda: skdata.astronaut(),
    "chelsea": lambda: skdata.chelsea(),
    "coffee": lambda: skdata.coffee(),
    "rocket": lambda: skdata.rocket(),
    "synthetic-wide": lambda: _synthetic(1, 150, 410),
    "synthetic-tall": lambda: _synthetic(2, 333, 97),
}


@pytest.fixture(scope="module")
def random_model():
    # score threshold 0: seeded random weights score every class near 1/91
    cfg = ModelConfig(model="random", seed=7, score_threshold=0.0, min_size=256, max_size=320, max_detections=40)
    return cfg, load_model(cfg)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_masks_match_torchvision(random_model, name):
    cfg, loaded = random_model
    image = IMAGES[name]()
    ours = Segmenter(loaded, cfg).segment([image])[0]

    with torch.inference_mode():
        ref = loaded.module([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    ref_masks = (ref["masks"][:, 0] > cfg.mask_threshold).numpy()

    assert len(ours) == len(ref["scores"]) > 0
    np.testing.assert_allclose([d["score"] for d in ours], ref["scores"].numpy(), rtol=1e-6)
    assert [d["label"] for d in ours] == ref["labels"].tolist()
    np.testing.assert_allclose([d["box"] for d in ours], ref["boxes"].numpy(), rtol=1e-6, atol=1e-4)
    h, w = image.shape[:2]
    for det, ref_mask in zip(ours, ref_masks):
        decoded = mask_utils.decode({"size": det["mask"]["size"], "counts": det["mask"]["counts"].encode()})
        assert decoded.shape == (h, w)
        assert det["area"] == int(decoded.sum())
        assert _iou(decoded.astype(bool), ref_mask) >= 0.99
        # the same paste: the RLE is identical, not merely close
        ref_rle = mask_utils.encode(np.asfortranarray(ref_mask.astype(np.uint8)))
        assert det["mask"]["counts"] == ref_rle["counts"].decode()
        assert det["label_name"] == loaded.classes[det["label"]]
