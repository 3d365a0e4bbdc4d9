"""The RoI heads' NMS over top candidates: exactly torchvision's detections."""

from __future__ import annotations

import pytest
import torch
from skimage import data as skdata
from torchvision.ops import batched_nms

from segbatch.config import ModelConfig
from segbatch.model import batched_nms_top, load_model, use_top_candidate_nms


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("candidates", [1, 50, 1000])
def test_batched_nms_top_equals_batched_nms(seed: int, candidates: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 3000
    xy = torch.rand(n, 2, generator=g) * 500
    wh = torch.rand(n, 2, generator=g) * 120 + 2
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    labels = torch.randint(0, 20, (n,), generator=g)
    for keep_n in (1, 100, 2500):  # 2500 is more than survive: the candidate set must grow to all
        expected = batched_nms(boxes, scores, labels, 0.5)[:keep_n]
        got = batched_nms_top(boxes, scores, labels, 0.5, keep_n, candidates)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("threshold", [0.0, 0.01])
def test_model_detections_unchanged(threshold: float) -> None:
    """Random weights at a score threshold near 0: 90 classes of 1000 proposals all reach NMS."""
    cfg = ModelConfig(model="random", score_threshold=threshold, max_detections=100, min_size=256, max_size=320)
    model = load_model(cfg).module
    image = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).float() / 255
    with torch.inference_mode():
        (reference,) = model([image])
        (ours,) = use_top_candidate_nms(model)([image])
    assert len(reference["boxes"]) > 0
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(ours[key], reference[key]), key
