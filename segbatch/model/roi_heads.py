"""The RoI heads' last step, without the cost of low score thresholds.

torchvision's ``RoIHeads.postprocess_detections`` runs class-wise NMS over
every (proposal, class) pair above the score threshold: at a threshold near
0 that is 1000 proposals x 90 classes = 90,000 boxes per image, which
``batched_nms`` splits into one NMS call per class (90 calls, each waiting on
the GPU). ``batched_nms_top`` gives exactly the same kept boxes from NMS over
the best-scoring candidates only; ``postprocess_detections`` is torchvision's
function with that one call changed, and ``use_top_candidate_nms`` installs
it on a model.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.roi_heads import RoIHeads
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


def use_top_candidate_nms(model: MaskRCNN) -> MaskRCNN:
    """Make ``model.roi_heads`` use :func:`postprocess_detections` (same results, less NMS)."""
    model.roi_heads.postprocess_detections = types.MethodType(postprocess_detections, model.roi_heads)
    return model
