"""The RoI heads at inference, without the costs of low score thresholds and per-detection loops.

torchvision's ``RoIHeads.postprocess_detections`` runs class-wise NMS over
every (proposal, class) pair above the score threshold: at a threshold near
0 that is 1000 proposals x 90 classes = 90,000 boxes per image, which
``batched_nms`` splits into one NMS call per class (90 calls, each waiting on
the GPU). ``batched_nms_top`` gives exactly the same kept boxes from NMS over
the best-scoring candidates only; ``postprocess_detections`` is torchvision's
function with that one call changed.

torchvision's Keypoint R-CNN decodes heatmaps one detection at a time
(``heatmaps_to_keypoints``: two host syncs and a resize per detection, 100
round trips an image on a GPU). ``heatmaps_to_keypoints`` here computes the
same bicubic resize for every detection at once, as two batched matrix
products, for accelerators (on a CPU the loop is cheaper: see
``decode_heatmaps``); ``roi_heads_inference`` is ``RoIHeads.forward`` at
inference with both changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import RoIHeads, keypointrcnn_inference, maskrcnn_inference
from torchvision.ops import boxes as box_ops


def batched_nms_top(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, keep_n: int, candidates: int = 1000
) -> Tensor:
    """``torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)[:keep_n]``, computed on few boxes.

    boxes: [N, 4]; scores, idxs: [N]. Returns int64 indices, best score first.

    Whether greedy NMS keeps a box depends only on the higher-scoring boxes of
    its own class, and those are all among the ``k`` best boxes whenever the
    box is. So NMS over the ``k`` best boxes decides the fate of each of them
    exactly, and once ``keep_n`` of them are kept, no box outside can rank
    among the first ``keep_n``. ``k`` starts at ``candidates`` and grows
    fourfold until that holds (or covers every box). Only ties in score at
    the ``k``-th place can order boxes differently from torchvision.
    """
    n = scores.numel()
    k = max(candidates, keep_n)
    while k < n:
        top = scores.topk(k).indices
        keep = box_ops.batched_nms(boxes[top], scores[top], idxs[top], iou_threshold)
        if keep.numel() >= keep_n:
            return top[keep[:keep_n]]
        k *= 4
    return box_ops.batched_nms(boxes, scores, idxs, iou_threshold)[:keep_n]


def postprocess_detections(
    self: RoIHeads,
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: list[Tensor],
    image_shapes: list[tuple[int, int]],
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """torchvision's ``RoIHeads.postprocess_detections`` with ``batched_nms_top``.

    class_logits: [sum P_i, C]; box_regression: [sum P_i, 4 C]; proposals:
    per image [P_i, 4]. Returns per image boxes [D, 4], scores [D], labels [D].
    """
    device = class_logits.device
    num_classes = class_logits.shape[-1]
    boxes_per_image = [p.shape[0] for p in proposals]
    pred_boxes = self.box_coder.decode(box_regression, proposals).split(boxes_per_image, 0)
    pred_scores = F.softmax(class_logits, -1).split(boxes_per_image, 0)
    all_boxes, all_scores, all_labels = [], [], []
    for boxes, scores, image_shape in zip(pred_boxes, pred_scores, image_shapes):
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)
        # every (proposal, class) pair but the background is a candidate
        boxes = boxes[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        labels = labels[:, 1:].reshape(-1)
        inds = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms_top(boxes, scores, labels, self.nms_thresh, self.detections_per_img)
        all_boxes.append(boxes[keep])
        all_scores.append(scores[keep])
        all_labels.append(labels[keep])
    return all_boxes, all_scores, all_labels


def roi_heads_inference(
    heads: RoIHeads, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
) -> list[dict[str, Tensor]]:
    """``RoIHeads.forward`` in eval mode, with :func:`postprocess_detections` and the batched
    :func:`heatmaps_to_keypoints`.

    features: the FPN levels; proposals: per image [P_i, 4]. Returns per image
    {"boxes": [D, 4], "labels": [D], "scores": [D]} plus "masks" [D, 1, 28, 28]
    probabilities (a mask head) or "keypoints" [D, K, 3] and "keypoints_scores"
    [D, K] (a keypoint head), all in the resized image's pixels.
    """
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_shapes))
    class_logits, box_regression = heads.box_predictor(box_features)
    boxes, scores, labels = postprocess_detections(heads, class_logits, box_regression, proposals, image_shapes)
    result = [{"boxes": b, "labels": lab, "scores": s} for b, lab, s in zip(boxes, labels, scores)]
    if heads.has_mask():
        mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, boxes, image_shapes)))
        for r, probs in zip(result, maskrcnn_inference(mask_logits, labels)):
            r["masks"] = probs
    if heads.has_keypoint():
        heatmaps = heads.keypoint_head(heads.keypoint_roi_pool(features, boxes, image_shapes))
        heatmaps = heads.keypoint_predictor(heatmaps)
        for r, kps, kscores in zip(result, *decode_heatmaps(heatmaps, boxes)):
            r["keypoints"], r["keypoints_scores"] = kps, kscores
    return result


def decode_heatmaps(maps: Tensor, boxes: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Keypoints [D_i, K, 3] and their scores [D_i, K] per image from heatmaps [sum D_i, K, H, W].

    On an accelerator, :func:`heatmaps_to_keypoints` for all detections at once: torchvision's
    loop waits on the device twice and launches a dozen kernels per detection. On a CPU,
    torchvision's loop: there the arithmetic is the cost, and the loop resizes only each box's
    own pixels where the batch also resizes its padding (2-3x slower, ``bench/keypoints.py``).
    """
    if maps.device.type == "cpu":
        return keypointrcnn_inference(maps, boxes)
    keypoints, scores = heatmaps_to_keypoints(maps, torch.cat(boxes))
    counts = [len(b) for b in boxes]
    return list(keypoints.split(counts)), list(scores.split(counts))


def bicubic_resize_matrices(in_size: int, out_sizes: Tensor, out_max: int) -> Tensor:
    """Per output length, the matrix of ``F.interpolate(mode="bicubic", align_corners=False)`` along one axis.

    out_sizes: [N] int64. Returns [N, out_max, in_size] float32: row ``i`` of
    matrix ``n`` holds the weights of the input samples that output sample
    ``i`` of a resize to ``out_sizes[n]`` takes (PyTorch's cubic convolution,
    A = -0.75, source index (i + 0.5) * in / out - 0.5, clamped at the
    borders); rows at or past ``out_sizes[n]`` are zero.
    """
    device = out_sizes.device
    scale = in_size / out_sizes.to(torch.float32)  # [N]
    dst = torch.arange(out_max, device=device, dtype=torch.float32)
    src = scale[:, None] * (dst[None, :] + 0.5) - 0.5  # [N, out_max]
    first = src.floor()
    t = (src - first)[..., None]  # [N, out_max, 1]
    a = -0.75
    # the cubic convolution kernel at distances 1 + t, t, 1 - t, 2 - t from the four taps
    near = torch.cat([t, 1 - t], -1)
    far = torch.cat([1 + t, 2 - t], -1)
    near_w = ((a + 2) * near - (a + 3)) * near * near + 1
    far_w = ((a * far - 5 * a) * far + 8 * a) * far - 4 * a
    weights = torch.stack([far_w[..., 0], near_w[..., 0], near_w[..., 1], far_w[..., 1]], -1)  # [N, out_max, 4]
    weights = weights * (dst[None, :] < out_sizes[:, None])[..., None]
    taps = (first.to(torch.int64)[..., None] + torch.arange(-1, 3, device=device)).clamp(0, in_size - 1)
    matrices = torch.zeros(len(out_sizes), out_max, in_size, device=device, dtype=torch.float32)
    return matrices.scatter_add_(2, taps, weights)


def heatmaps_to_keypoints(maps: Tensor, rois: Tensor, max_elements: int = 1 << 25) -> tuple[Tensor, Tensor]:
    """torchvision's ``heatmaps_to_keypoints`` for every detection at once.

    maps: [N, K, H, W] heatmap logits; rois: [N, 4] boxes (x1, y1, x2, y2).
    Returns keypoints [N, K, 3] (x, y, 1) and their heatmap scores [N, K].

    As torchvision does it, each detection's heatmaps are resized bicubically
    to its box's size (ceil of width and height), the maximum taken there
    (first in row-major order on ties) and its pixel centre mapped into the
    box. The resize is the matrix product ``rows @ maps @ cols.T``, with every
    detection padded to the largest box of its group and the padding kept out
    of the maximum; groups of similar sizes are formed so that at most
    ``max_elements`` resized values exist at once. Scores agree with
    torchvision's to float rounding (the sums run in another order), and
    keypoints exactly but for ties that rounding breaks.
    """
    n, k, h, w = maps.shape
    if n == 0:
        return maps.new_zeros((0, k, 3), dtype=torch.float32), maps.new_zeros((0, k), dtype=torch.float32)
    rois = rois.float()
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    out_w = widths.ceil().to(torch.int64)
    out_h = heights.ceil().to(torch.int64)
    keypoints = torch.ones(n, k, 3, device=maps.device, dtype=torch.float32)
    scores = torch.empty(n, k, device=maps.device, dtype=torch.float32)
    sizes = torch.stack([out_h, out_w], 1).tolist()  # the only host sync
    for group in _similar_size_groups(sizes, k, max_elements):
        idx = torch.tensor(group, device=maps.device)
        gh, gw = max(sizes[i][0] for i in group), max(sizes[i][1] for i in group)
        rows = bicubic_resize_matrices(h, out_h[idx], gh)  # [G, gh, H]
        cols = bicubic_resize_matrices(w, out_w[idx], gw)  # [G, gw, W]
        resized = rows[:, None] @ maps[idx].float() @ cols[:, None].transpose(-1, -2)  # [G, K, gh, gw]
        inside = (torch.arange(gh, device=maps.device)[None, :, None] < out_h[idx][:, None, None]) & (
            torch.arange(gw, device=maps.device)[None, None, :] < out_w[idx][:, None, None]
        )  # [G, gh, gw]
        resized = resized.masked_fill(~inside[:, None], float("-inf"))
        best, pos = resized.flatten(2).max(dim=2)  # [G, K]: max gives the first maximum, as argmax does
        x_int, y_int = pos % gw, pos // gw
        keypoints[idx, :, 0] = (x_int.float() + 0.5) * (widths[idx] / out_w[idx])[:, None] + rois[idx, 0, None]
        keypoints[idx, :, 1] = (y_int.float() + 0.5) * (heights[idx] / out_h[idx])[:, None] + rois[idx, 1, None]
        scores[idx] = best
    return keypoints, scores


def _similar_size_groups(sizes: list[list[int]], k: int, max_elements: int) -> list[list[int]]:
    """Indices into ``sizes`` ([h, w] each) in groups of similar sizes, padded, each under ``max_elements``."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], i))
    groups: list[list[int]] = []
    group: list[int] = []
    gh = gw = 0
    for i in order:
        h, w = max(gh, sizes[i][0]), max(gw, sizes[i][1])
        if group and (len(group) + 1) * k * h * w > max_elements:
            groups.append(group)
            group, h, w = [], sizes[i][0], sizes[i][1]
        group.append(i)
        gh, gw = h, w
    groups.append(group)
    return groups
