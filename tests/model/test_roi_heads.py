"""The RoI heads at inference (segbatch/model/roi_heads.py): NMS over top candidates and the batched
keypoint decode give torchvision's detections and keypoints."""

from __future__ import annotations

import pytest
import torch
from skimage import data as skdata
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.ops import batched_nms

from segbatch.config import ModelConfig
from segbatch.model import batched_nms_top, heatmaps_to_keypoints, load_model, roi_heads_inference
from segbatch.model.roi_heads import bicubic_resize_matrices


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


def _heads_both_ways(model, images: list[torch.Tensor]):
    """torchvision's ``model.roi_heads(...)`` and ``roi_heads_inference`` on the same features and proposals."""
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features)
    reference, _ = model.roi_heads(features, proposals, batch.image_sizes)
    return reference, roi_heads_inference(model.roi_heads, features, proposals, batch.image_sizes)


@pytest.mark.parametrize("threshold", [0.0, 0.01])
def test_model_detections_unchanged(threshold: float) -> None:
    """Random weights at a score threshold near 0: 90 classes of 1000 proposals all reach NMS."""
    cfg = ModelConfig(model="random", score_threshold=threshold, max_detections=100, min_size=256, max_size=320)
    model = load_model(cfg).module
    image = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1).float() / 255
    with torch.inference_mode():
        (reference,), (ours,) = _heads_both_ways(model, [image])
    assert len(reference["boxes"]) > 0
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(ours[key], reference[key]), key


def test_keypoint_heads_unchanged_over_a_batch() -> None:
    cfg = ModelConfig(
        model="keypoint-random", seed=3, score_threshold=0.0, max_detections=20, min_size=160, max_size=192
    )
    model = load_model(cfg).module
    images = [torch.from_numpy(im()).permute(2, 0, 1).float() / 255 for im in (skdata.astronaut, skdata.coffee)]
    with torch.inference_mode():
        references, ours = _heads_both_ways(model, images)
    for reference, got in zip(references, ours):
        assert len(reference["boxes"]) == 20
        for key in ("boxes", "labels", "scores", "keypoints", "keypoints_scores"):
            assert torch.equal(got[key], reference[key]), key


def test_bicubic_resize_matrices_are_torch_interpolate() -> None:
    """Each matrix product reproduces ``F.interpolate(mode="bicubic")``, enlarging and shrinking."""
    g = torch.Generator().manual_seed(0)
    grid = torch.randn(56, 56, generator=g, dtype=torch.float64).float()
    sizes = torch.tensor([1, 2, 7, 56, 57, 200, 311])
    rows = bicubic_resize_matrices(56, sizes, 311)
    for n, size in enumerate(sizes.tolist()):
        expected = torch.nn.functional.interpolate(grid[None, None], size=(size, 56), mode="bicubic")[0, 0]
        torch.testing.assert_close(rows[n, :size] @ grid, expected, rtol=1e-5, atol=1e-5)
        assert not rows[n, size:].any()  # the padding rows take nothing


def _boxes(n: int, g: torch.Generator, largest: float = 300.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 500
    wh = torch.rand(n, 2, generator=g) * largest
    wh[:3] = torch.tensor([[0.2, 0.4], [1.0, 1.0], [2.5, 0.9]])[: min(n, 3)]  # under a pixel, exactly one, odd
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("max_elements", [1, 1 << 16, 1 << 25])  # one detection a group, some, all at once
def test_batched_heatmap_decode_is_torchvisions(max_elements: int) -> None:
    g = torch.Generator().manual_seed(max_elements)
    maps = torch.randn(40, 17, 56, 56, generator=g)
    boxes = _boxes(40, g)
    expected_kps, expected_scores = tv_roi_heads.heatmaps_to_keypoints(maps, boxes)
    kps, scores = heatmaps_to_keypoints(maps, boxes, max_elements=max_elements)
    assert torch.equal(kps, expected_kps)  # same pixel picked, same coordinates
    torch.testing.assert_close(scores, expected_scores, rtol=1e-4, atol=1e-4)


def test_batched_heatmap_decode_breaks_ties_as_torchvision() -> None:
    """Flat heatmaps: every pixel ties exactly, and the first in row-major order wins, padding or not."""
    maps = torch.zeros(3, 2, 56, 56)
    maps[1, 1, 40, 12] = 5.0  # one peak beside the ties, in the group's widest box
    boxes = torch.tensor([[5.0, 5.0, 105.0, 55.0], [0.0, 0.0, 300.0, 20.0], [10.0, 10.0, 10.5, 11.0]])
    expected_kps, expected_scores = tv_roi_heads.heatmaps_to_keypoints(maps, boxes)
    kps, scores = heatmaps_to_keypoints(maps, boxes)
    assert torch.equal(kps, expected_kps)
    torch.testing.assert_close(scores, expected_scores)


def test_batched_heatmap_decode_of_no_detections() -> None:
    kps, scores = heatmaps_to_keypoints(torch.zeros(0, 17, 56, 56), torch.zeros(0, 4))
    assert kps.shape == (0, 17, 3) and scores.shape == (0, 17)
