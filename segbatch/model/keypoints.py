"""Keypoint names and skeletons: COCO's person keypoints, and a checkpoint's own.

Also what turns Keypoint R-CNN's outputs into the rows' ``keypoints`` lists
(``schema.KEYPOINT_TYPE``): torchvision's keypoint head already decodes each
detection's heatmaps over its own box (``heatmaps_to_keypoints``: each
56x56 heatmap resized to the box only, its maximum taken there), so what is
left here is moving them to image (or scene) pixels and writing records.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from segbatch.errors import UsageError

from .masks import label_name

COCO_KEYPOINT_NAMES = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
    "left_ankle", "right_ankle")  # fmt: skip
# COCO's person skeleton as 0-based index pairs into COCO_KEYPOINT_NAMES
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
    (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))  # fmt: skip


class KeypointsError(UsageError, ValueError):
    """Keypoint names or a skeleton do not fit the model; the message says how to fix it."""


def read_keypoint_names(text: str, source: str = "--keypoints") -> list[str]:
    """A keypoints file: one name a line, in the model's keypoint order; blank trailing lines ignored."""
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise KeypointsError(f"{source} must name one keypoint a line, in the model's order, with no blank lines")
    return names


def default_skeleton(names: list[str] | tuple[str, ...]) -> list[list[int]] | None:
    """The skeleton to record for keypoints without one of their own: COCO's when the names
    are COCO's 17, else None (segbatch never guesses which keypoints are joined)."""
    return [list(pair) for pair in COCO_SKELETON] if tuple(names) == COCO_KEYPOINT_NAMES else None


def check_skeleton(skeleton: Any, num_keypoints: int, source: str) -> list[list[int]]:
    """A checkpoint's skeleton as 0-based [i, j] pairs, each index a keypoint of the model."""
    try:
        pairs = [[int(i), int(j)] for i, j in skeleton]
    except (TypeError, ValueError):
        raise KeypointsError(f"{source}: its skeleton must be a list of [i, j] pairs of keypoint indices") from None
    bad = [p for p in pairs if not all(0 <= k < num_keypoints for k in p)]
    if bad:
        raise KeypointsError(
            f"{source}: skeleton pairs {bad[:3]} name keypoints outside 0..{num_keypoints - 1} (indices are 0-based)"
        )
    return pairs


def keypoint_records(keypoints: np.ndarray, scores: np.ndarray, dx: float = 0.0, dy: float = 0.0) -> list[list[dict]]:
    """Per detection, its keypoints as ``schema.KEYPOINT_TYPE`` dicts, one per keypoint name in order.

    keypoints: [N, K, 3] (x, y, v) as torchvision returns them, in image pixels;
    scores: [N, K] (torchvision's ``keypoints_scores``); (dx, dy) is added to
    x and y (a tile's offset in its scene). ``visible`` is v > 0, COCO's convention.
    """
    keypoints = np.asarray(keypoints, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    out = []
    for kps, kscores in zip(keypoints.tolist(), scores.tolist()):
        out.append([{"x": x + dx, "y": y + dy, "score": s, "visible": v > 0} for (x, y, v), s in zip(kps, kscores)])
    return out


def keypoint_detection_records(raw: dict, class_names: list[str]) -> list[dict[str, Any]]:
    """A Keypoint R-CNN's raw detections of one image (tensors or numpy arrays, original pixels)
    to the ``detections`` structs: no mask, no area; ``keypoints`` per detection. Best score first."""
    scores = np.asarray(_numpy(raw["scores"]), np.float32)
    order = np.argsort(-scores, kind="stable")
    boxes = np.asarray(_numpy(raw["boxes"]))[order].tolist()
    labels = np.asarray(_numpy(raw["labels"]))[order].tolist()
    keypoints = keypoint_records(_numpy(raw["keypoints"])[order], _numpy(raw["keypoints_scores"])[order])
    return [
        {
            "label": int(label),
            "label_name": label_name(class_names, int(label)),
            "score": float(score),
            "box": [float(v) for v in box],
            "mask": None,
            "area": None,
            "keypoints": kps,
        }
        for box, label, score, kps in zip(boxes, labels, scores[order].tolist(), keypoints)
    ]


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)  # a torch.Tensor
