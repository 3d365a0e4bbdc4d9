"""Box-local pasting and RLE equal torchvision's full-image paste + pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segbatch.postprocess import box_mask_to_rle, detections_to_records


def _reference(masks, boxes, h, w, threshold):
    pasted = paste_masks_in_image(masks, boxes, (h, w))[:, 0] > threshold
    return [mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8))) for m in pasted]


@pytest.mark.parametrize("h,w", [(1080, 1920), (97, 333), (64, 64)])
def test_identical_rle_to_reference(h, w):
    g = torch.Generator().manual_seed(h + w)
    n = 60
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.6 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[0] = torch.tensor([0.0, 0.0, w, h])  # the whole image
    boxes[1] = torch.tensor([3.0, 0.0, w / 4, h])  # full height: contiguous columns
    boxes[2] = torch.tensor([w - 2.0, h - 2.0, w, h])  # a corner sliver
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)  # as the model clips them
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    masks = torch.rand(n, 1, 28, 28, generator=g)
    masks[3] = 0.0  # an empty mask
    scores = torch.linspace(0.99, 0.1, n)
    labels = torch.randint(1, 5, (n,), generator=g)
    ours = detections_to_records(boxes, labels, scores, masks, (h, w), 0.5, ["bg", "a", "b", "c", "d"])
    for det, ref in zip(ours, _reference(masks, boxes, h, w, 0.5)):
        assert det["mask"]["counts"] == ref["counts"].decode()
        assert det["mask"]["size"] == [h, w]
        assert det["area"] == int(mask_utils.area(ref))


def test_sorted_by_score_and_names():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])
    masks = torch.ones(2, 1, 28, 28)
    recs = detections_to_records(boxes, torch.tensor([1, 2]), torch.tensor([0.3, 0.9]), masks, (32, 32), 0.5, ["bg", "x", "y"])
    assert [r["label_name"] for r in recs] == ["y", "x"]
    assert recs[0]["score"] == pytest.approx(0.9)


def test_mask_outside_image_is_empty():
    rle, area = box_mask_to_rle(np.ones((5, 5), bool), 40, 40, 32, 32)
    assert area == 0 and mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).sum() == 0
