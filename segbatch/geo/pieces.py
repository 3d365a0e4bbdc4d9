"""A tile's detections as *pieces*: each mask cut to the tile and to its own pixels, in scene pixels.

A worker turns a tile's raw detections into rows of ``schema.TILE_DETECTION_TYPE``
(``tile_detections``); the scene's merge reads them back as ``Piece`` objects
(``tile_pieces``) and stitches them into the scene's ``Instance`` objects (``stitch.py``).

A Keypoint R-CNN has no masks: its piece's "mask" is its box, filled, over the box's whole
pixels (``box_extent``), so pieces are stitched by their boxes' agreement where tiles overlap,
and each carries its keypoints in scene pixels (the tile record's ``crop`` is null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segbatch.model import clip_box_mask, keypoint_records, label_name, paste_box_masks

from .grid import Window

DATA_MASK = "data_mask"  # the key of a tile's data mask beside its raw detections (``tile_detections``)


@dataclass
class Instance:
    """One object of the scene: its mask over its own extent, in scene pixels;
    ``mask`` covers rows/columns from (y0, x0). ``pieces``: how many tiles'
    pieces were joined into it."""

    label: int
    label_name: str
    score: float
    box: tuple[float, float, float, float]
    x0: int
    y0: int
    mask: np.ndarray  # [h, w] bool; a keypoint model's: its box, filled
    pieces: int = 1
    keypoints: list[dict[str, Any]] | None = None  # schema.KEYPOINT_TYPE in scene pixels; None for mask models

    @property
    def extent(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the mask's pixels, end exclusive."""
        return self.x0, self.y0, self.x0 + self.mask.shape[1], self.y0 + self.mask.shape[0]


@dataclass
class Piece(Instance):
    """What one tile saw of an object: an ``Instance`` of one piece, and the index of its tile."""

    tile: int = field(kw_only=True)


def tile_detections(
    raw: dict[str, np.ndarray], w: Window, mask_threshold: float, classes: list[str]
) -> list[dict[str, Any]]:
    """One tile's raw detections (tile pixels, 28x28 masks) as ``schema.TILE_DETECTION_TYPE``
    records in scene pixels, each mask pasted over its box and cut to its own pixels.

    raw[DATA_MASK] (when the scene has nodata): the tile's data mask; each
    mask is cut to it, and a detection left without a pixel is dropped.
    A keypoint model's raw detections (no masks) give records with their keypoints instead.
    """
    if "masks" not in raw:
        return _keypoint_tile_detections(raw, w, classes)
    import torch

    from .coverage import cut_to_data

    masks = raw["masks"][:, 0] if raw["masks"].ndim == 4 else raw["masks"]
    pasted = paste_box_masks(torch.from_numpy(masks).float(), torch.from_numpy(raw["boxes"]), mask_threshold)
    boxes, labels, scores = raw["boxes"].tolist(), raw["labels"].tolist(), raw["scores"].tolist()
    out = []
    valid = raw.get(DATA_MASK)
    for (binary, x0, y0), box, label, score in zip(pasted, boxes, labels, scores):
        if valid is not None:
            binary = cut_to_data(binary, x0, y0, valid)
        cut = crop_record(binary, x0, y0, w)
        if cut is None:
            continue
        sx, sy, crop = cut
        out.append(
            {
                "label": int(label),
                "label_name": label_name(classes, label),
                "score": float(score),
                "box": [box[0] + w.col, box[1] + w.row, box[2] + w.col, box[3] + w.row],
                "x0": sx,
                "y0": sy,
                "crop": crop,
            }
        )
    return out


def _keypoint_tile_detections(raw: dict[str, np.ndarray], w: Window, classes: list[str]) -> list[dict[str, Any]]:
    """A keypoint model's tile detections in scene pixels: box, keypoints, and the box's pixel
    extent as (x0, y0) (no crop: the piece's mask is its box)."""
    keypoints = keypoint_records(raw["keypoints"], raw["keypoints_scores"], dx=w.col, dy=w.row)
    out = []
    for box, label, score, kps in zip(raw["boxes"].tolist(), raw["labels"].tolist(), raw["scores"].tolist(), keypoints):
        scene_box = [box[0] + w.col, box[1] + w.row, box[2] + w.col, box[3] + w.row]
        x0, y0, _, _ = box_extent(scene_box)
        out.append(
            {
                "label": int(label),
                "label_name": label_name(classes, label),
                "score": float(score),
                "box": scene_box,
                "x0": x0,
                "y0": y0,
                "crop": None,
                "keypoints": kps,
            }
        )
    return out


def box_extent(box) -> tuple[int, int, int, int]:
    """(x0, y0, width, height) of the pixels a box (x1, y1, x2, y2) touches, at least one pixel each way."""
    x0, y0 = math.floor(box[0]), math.floor(box[1])
    return x0, y0, max(math.ceil(box[2]) - x0, 1), max(math.ceil(box[3]) - y0, 1)


def crop_record(binary: np.ndarray, x0: int, y0: int, w: Window) -> tuple[int, int, dict[str, Any]] | None:
    """A pasted mask (top-left at tile pixel (x0, y0)) cut to the tile and to its own
    pixels, as (scene x, scene y, RLE of the crop); None when nothing is left."""
    region, cx0, cy0 = clip_box_mask(binary, x0, y0, w.height, w.width)
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    if len(rows) == 0:  # off the tile, or no pixel of it on
        return None
    region = region[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    rle = mask_utils.encode(np.asfortranarray(region.astype(np.uint8)))
    crop = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return w.col + cx0 + int(cols[0]), w.row + cy0 + int(rows[0]), crop


def tile_pieces(records: list[dict[str, Any]], tile: int) -> list[Piece]:
    """A tile row's detections (``schema.TILE_DETECTION_TYPE``) as pieces."""
    out = []
    for d in records:
        crop = d["crop"]
        if crop is None:  # a keypoint model's: its box is its mask
            _, _, width, height = box_extent(d["box"])
            mask = np.ones((height, width), bool)
        else:
            mask = mask_utils.decode({"size": list(crop["size"]), "counts": crop["counts"].encode()}).astype(bool)
        kps = d.get("keypoints")
        out.append(
            Piece(
                d["label"],
                d["label_name"],
                d["score"],
                tuple(d["box"]),
                d["x0"],
                d["y0"],
                mask,
                keypoints=kps,
                tile=tile,
            )
        )
    return out
