"""A tile's detections as *pieces*: each mask cut to the tile and to its own pixels, in scene pixels.

A worker turns a tile's raw detections into rows of ``schema.TILE_DETECTION_TYPE``
(``tile_detections``); the scene's merge reads them back as ``Piece`` objects
(``tile_pieces``) and stitches them into the scene's ``Instance`` objects (``stitch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segbatch.model import clip_box_mask, label_name, paste_box_masks

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
    mask: np.ndarray  # [h, w] bool
    pieces: int = 1

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
    """
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
        mask = mask_utils.decode({"size": list(crop["size"]), "counts": crop["counts"].encode()}).astype(bool)
        out.append(Piece(d["label"], d["label_name"], d["score"], tuple(d["box"]), d["x0"], d["y0"], mask, tile=tile))
    return out
