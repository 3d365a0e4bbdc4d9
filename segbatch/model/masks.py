"""Mask R-CNN outputs to rows: boxes, scores and 28x28 masks to COCO RLE.

torchvision pastes every 28x28 mask into a full-image float tensor
(``paste_masks_in_image``); thresholding and pycocotools' full-frame
encoding follow. For 100 detections on a 1080p image that is 200M floats
written and read. Here each mask is resized only over its own box, exactly
as torchvision does it (same padding, same integer box, same bilinear
interpolation), thresholded there, and turned into run lengths directly:
COCO RLE is column-major, so columns outside the box are runs of zeros and
only the box's own pixels are ever touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils


def expand_boxes(boxes: torch.Tensor, scale: float) -> torch.Tensor:
    """Boxes [N, 4] (x1, y1, x2, y2) grown about their centres by ``scale``."""
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
    centre = (boxes[:, 2:] + boxes[:, :2]) * 0.5
    return torch.cat([centre - half, centre + half], dim=1)


def paste_box_masks(
    masks: torch.Tensor, boxes: torch.Tensor, threshold: float, padding: int = 1
) -> list[tuple[np.ndarray, int, int]]:
    """Threshold each mask at full resolution over its own box only.

    masks: [N, M, M] probabilities; boxes: [N, 4] in image pixels.
    Returns per detection ``(binary [h, w] bool, x0, y0)``: the pasted mask
    over the integer box whose top-left corner is (x0, y0), before clipping
    to the image. Bit-identical to torchvision's ``paste_masks_in_image``
    followed by ``> threshold`` over that box.
    """
    if masks.shape[0] == 0:
        return []
    m = masks.shape[-1]
    padded = F.pad(masks[:, None], (padding,) * 4).cpu()  # [N, 1, M+2p, M+2p]
    int_boxes = expand_boxes(boxes.float(), float(m + 2 * padding) / m).to(torch.int64).tolist()
    out = []
    for mask, (x0, y0, x1, y1) in zip(padded.unbind(0), int_boxes):
        w = max(x1 - x0 + 1, 1)
        h = max(y1 - y0 + 1, 1)
        resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)
        out.append((resized.numpy()[0, 0] > threshold, x0, y0))  # numpy's compare: no dispatch per mask
    return out


def box_mask_to_rle(binary: np.ndarray, x0: int, y0: int, height: int, width: int) -> tuple[dict[str, Any], int]:
    """A mask given over a box, to COCO compressed RLE of the whole image.

    binary: [h, w] bool with its top-left pixel at (x0, y0) of a
    ``height`` x ``width`` image; parts outside the image are dropped.
    Returns ``({"size": [height, width], "counts": str}, area)``.
    """
    runs, area = box_mask_runs(binary, x0, y0, height, width)
    return encode_runs([runs], height, width)[0], area


def clip_box_mask(
    binary: np.ndarray, x0: int, y0: int, height: int, width: int, col: int = 0, row: int = 0
) -> tuple[np.ndarray, int, int]:
    """The part of a box mask inside a window: ``height`` x ``width`` pixels from (col, row).

    binary: [h, w] with its top-left pixel at (x0, y0), in the window's own
    coordinates (an image's pixels when (col, row) is (0, 0), a scene's for a
    tile or a block); possibly partly or wholly outside the window.
    Returns ``(region [h', w'] view, cx0, cy0)``, region's top-left at
    (cx0, cy0) in those coordinates; h' or w' is 0 when the box misses the window.
    """
    h, w = binary.shape
    cy0, cx0 = max(y0, row), max(x0, col)
    # ends clamped to the starts: a box past the window would otherwise give
    # negative slice ends, which numpy counts from the far side
    cy1, cx1 = max(min(y0 + h, row + height), cy0), max(min(x0 + w, col + width), cx0)
    return binary[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0], cx0, cy0


def paint_box_mask(canvas: np.ndarray, binary: np.ndarray, x0: int, y0: int, value, col: int = 0, row: int = 0) -> None:
    """Set ``value`` on the pixels of ``canvas`` where a box mask is on.

    canvas: [H, W], the window whose top-left is (col, row); binary: [h, w]
    bool with its top-left pixel at (x0, y0) in the same coordinates; the
    parts off the canvas are dropped, the canvas's other pixels untouched.
    """
    region, cx0, cy0 = clip_box_mask(binary, x0, y0, canvas.shape[0], canvas.shape[1], col, row)
    canvas[cy0 - row : cy0 - row + region.shape[0], cx0 - col : cx0 - col + region.shape[1]][region] = value


def box_mask_runs(binary: np.ndarray, x0: int, y0: int, height: int, width: int) -> tuple[list[int], int]:
    """Like ``box_mask_to_rle``, but the uncompressed COCO run lengths
    (column-major, zeros first) and the area."""
    region, cx0, cy0 = clip_box_mask(binary, x0, y0, height, width)
    if region.size == 0:
        return [height * width], 0
    cy1, cx1 = cy0 + region.shape[0], cx0 + region.shape[1]
    area = int(region.sum())
    if area == 0:
        return [height * width], 0
    # Column-major order, one zero row above and below each column so runs
    # never join across columns; the padding rows map onto real zero pixels
    # (or the previous/next column's zeros), except when the box spans the
    # full height, where columns are contiguous already.
    full_height = cy0 == 0 and cy1 == height
    pad = 0 if full_height else 1
    cols = np.zeros((cx1 - cx0, cy1 - cy0 + 2 * pad), dtype=np.int8)
    cols[:, pad : pad + cy1 - cy0] = region.T
    # A zero before and after the sequence: the image starts with a zero run
    # and the last run of ones ends where the box's columns end.
    flat = np.concatenate([[0], cols.ravel(), [0]])
    change = np.flatnonzero(flat[1:] != flat[:-1])  # index (in cols) where a new run starts
    col, row = np.divmod(change, cols.shape[1])
    full_index = (col + cx0) * height + (row - pad + cy0)
    counts = np.diff(np.concatenate([[0], full_index, [height * width]]))
    if counts[-1] == 0:  # the ones reach the image's last pixel
        counts = counts[:-1]
    return counts.tolist(), area


def encode_runs(runs: list[list[int]], height: int, width: int) -> list[dict[str, Any]]:
    """Uncompressed run lengths of masks of one image to COCO compressed RLE,
    in one call of pycocotools (its compression, not ours)."""
    if not runs:
        return []
    rles = mask_utils.frPyObjects([{"size": [height, width], "counts": r} for r in runs], height, width)
    return [{"size": [height, width], "counts": rle["counts"].decode("ascii")} for rle in rles]


def label_name(names: list[str], label: int) -> str:
    """The name of class ``label``: ``names[label]``, or the number itself when ``names`` has no such entry."""
    return names[label] if 0 <= label < len(names) else str(label)


def box_mask_records(
    box_masks: list[tuple[np.ndarray, int, int]],
    labels: list[int],
    label_names: list[str],
    scores: list[float],
    boxes: list[list[float]],
    height: int,
    width: int,
) -> list[dict[str, Any]]:
    """Detections given as box masks, to the ``detections`` column's structs of a
    ``height`` x ``width`` image (each mask as COCO RLE of the whole image, with its area).

    box_masks: ``(binary [h, w] bool, x0, y0)`` per detection (parts off the
    image dropped); the other lists in the same order, boxes as (x1, y1, x2, y2).
    """
    runs_and_areas = [box_mask_runs(binary, x0, y0, height, width) for binary, x0, y0 in box_masks]
    rles = encode_runs([runs for runs, _ in runs_and_areas], height, width)
    return [
        {
            "label": int(label),
            "label_name": name,
            "score": float(score),
            "box": [float(v) for v in box],
            "mask": rle,
            "area": area,
        }
        for rle, (_, area), box, label, name, score in zip(rles, runs_and_areas, boxes, labels, label_names, scores)
    ]


def records_and_box_masks(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    masks: torch.Tensor,
    image_size: tuple[int, int],
    mask_threshold: float,
    class_names: list[str],
) -> tuple[list[dict[str, Any]], list[tuple[np.ndarray, int, int]]]:
    """One image's detections to the ``detections`` column's structs, and with
    them the box masks their RLEs were encoded from (for ``class_map``).

    boxes: [N, 4] in original image pixels; labels, scores: [N];
    masks: [N, 1, M, M] or [N, M, M] probabilities (torchvision's RoI head
    output before pasting); image_size: (height, width).
    Records sorted best score first (torchvision already returns them so);
    box masks ``(binary [h, w] bool, x0, y0)`` per record, in the records'
    order, as ``paste_box_masks`` gives them.
    """
    height, width = image_size
    if masks.dim() == 4:
        masks = masks[:, 0]
    order = torch.argsort(scores, descending=True, stable=True)
    boxes, labels, scores, masks = boxes[order], labels[order], scores[order], masks[order]
    pasted = paste_box_masks(masks.float(), boxes, mask_threshold)
    labels_list = labels.tolist()
    names = [label_name(class_names, label) for label in labels_list]
    records = box_mask_records(pasted, labels_list, names, scores.tolist(), boxes.tolist(), height, width)
    return records, pasted


def detections_to_records(*detections, **options) -> list[dict[str, Any]]:
    """``records_and_box_masks``'s records alone (same arguments), for callers that paint no class map."""
    return records_and_box_masks(*detections, **options)[0]


def class_map_dtype(labels: Iterable[int]) -> type[np.unsignedinteger]:
    """A class map's pixel type: uint8, or uint16 when a label does not fit in a byte."""
    return np.uint8 if all(label < 256 for label in labels) else np.uint16


def paint_class_map(
    box_masks: list[tuple[np.ndarray, int, int]],
    labels: list[int],
    scores: list[float],
    height: int,
    width: int,
    col: int = 0,
    row: int = 0,
    dtype: type[np.unsignedinteger] | None = None,
) -> np.ndarray:
    """The class map [height, width] of the window from (col, row), 0 the background.

    box_masks: ``(binary [h, w] bool, x0, y0)`` per detection, in the window's
    coordinates (parts outside it dropped); labels, scores: in the same order.
    Where masks overlap the best score wins (equal scores: the later one).
    Each mask is painted over its own box only, never a full-window mask.
    dtype: ``class_map_dtype(labels)`` when None (a block of a larger map
    passes the whole map's).
    """
    out = np.zeros((height, width), class_map_dtype(labels) if dtype is None else dtype)
    for i in sorted(range(len(labels)), key=lambda i: scores[i]):  # best last: it paints over the others
        binary, x0, y0 = box_masks[i]
        paint_box_mask(out, binary, x0, y0, labels[i], col, row)
    return out


def class_map(
    records: list[dict[str, Any]], box_masks: list[tuple[np.ndarray, int, int]], height: int, width: int
) -> np.ndarray:
    """A per-pixel class map of one image from its detections' box masks.

    records: ``label`` and ``score`` of each detection; box_masks: their
    ``(binary [h, w] bool, x0, y0)`` in the same order, as
    ``records_and_box_masks`` gives them (parts off the image dropped).
    Returns [height, width], 0 the background; where masks overlap the best
    score wins (equal scores: the later record). No score threshold here:
    every record paints. uint8, or uint16 when a label does not fit in a byte.
    """
    labels, scores = [d["label"] for d in records], [d["score"] for d in records]
    return paint_class_map(box_masks, labels, scores, height, width)
