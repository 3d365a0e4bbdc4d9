"""Box-local pasting and RLE equal torchvision's full-image paste + pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from segbatch.model import box_mask_to_rle, class_map, detections_to_records, records_and_box_masks


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
    recs = detections_to_records(
        boxes, torch.tensor([1, 2]), torch.tensor([0.3, 0.9]), masks, (32, 32), 0.5, ["bg", "x", "y"]
    )
    assert [r["label_name"] for r in recs] == ["y", "x"]
    assert recs[0]["score"] == pytest.approx(0.9)


def test_mask_outside_image_is_empty():
    rle, area = box_mask_to_rle(np.ones((5, 5), bool), 40, 40, 32, 32)
    assert area == 0 and mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).sum() == 0


def _class_map_from_rles(records, h, w):
    """The former class map: every record's RLE decoded to a full [h, w] mask,
    painted in ascending score order."""
    dtype = np.uint8 if all(d["label"] < 256 for d in records) else np.uint16
    out = np.zeros((h, w), dtype)
    for d in sorted(records, key=lambda d: d["score"]):
        out[mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}).astype(bool)] = d[
            "label"
        ]
    return out


@pytest.mark.parametrize("seed,max_label", [(0, 90), (1, 300), (2, 5000), (3, 255)])
@pytest.mark.parametrize("h,w", [(1080, 1920), (61, 47)])
def test_class_map_from_box_masks_equals_decoded_rles(seed, max_label, h, w):
    """Overlapping masks, boxes running off every side or missing the image,
    tied scores, labels past a byte: pixel for pixel the RLE-decoding map."""
    g = torch.Generator().manual_seed(seed * 7919 + h)
    n = 80
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 1.4 - torch.tensor([w, h]) * 0.2
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.5 + 1
    boxes = torch.cat([xy, xy + wh], 1)  # not clipped: some start left/above, some end past the image
    boxes[0] = torch.tensor([-5.0, -5.0, w + 5.0, h + 5.0])  # over the whole image
    boxes[1] = torch.tensor([w + 3.0, 2.0, w + 20.0, 9.0])  # right of the image
    boxes[2] = torch.tensor([1.0, -30.0, 9.0, -2.0])  # above it
    masks = torch.rand(n, 1, 28, 28, generator=g)
    masks[3] = 0.0  # an empty mask
    scores = torch.rand(n, generator=g)
    scores[10:20] = scores[10]  # ties: the later record wins, as before
    labels = torch.randint(0, max_label + 1, (n,), generator=g)
    labels[4] = max_label
    records, box_masks = records_and_box_masks(boxes, labels, scores, masks, (h, w), 0.5, [])
    ours = class_map(records, box_masks, h, w)
    ref = _class_map_from_rles(records, h, w)
    assert ours.dtype == ref.dtype == (np.uint8 if max_label < 256 else np.uint16)
    assert ours.shape == (h, w)
    assert np.array_equal(ours, ref)
    assert len(np.unique(ours)) > 3  # overlaps really painted several classes


def test_class_map_of_no_detections_is_background():
    out = class_map([], [], 5, 7)
    assert out.dtype == np.uint8 and out.shape == (5, 7) and not out.any()
