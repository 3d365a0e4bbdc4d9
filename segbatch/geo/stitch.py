"""Stitching a scene: the tiles' pieces that are one object, joined into one instance.

``stitch_instances`` finds the pieces that are one object: two pieces of
the same class from overlapping tiles whose masks agree inside the pixels
both tiles saw (IoU at least 0.5 there) are the same object, seen twice in
the overlap or in parts across a seam. Candidate pairs come from a spatial
index (shapely's STRtree), so the cost grows with the number of objects, not
its square. Groups are joined strongest agreement first, and never so that
a group holds two pieces of one tile: the model's own NMS already told those
apart, and refusing them stops the chains that glue neighbouring objects
into one (detectree2's over-merging). First, though, a piece lying mostly
(80%) inside another piece of its tile and class is taken as part of it:
near a tile's edge the model may report an object twice, once whole and once
cut, with boxes too different for its NMS; neighbours never lie inside each
other.

Keypoint models' pieces are their boxes (``pieces.py``): they are stitched by their boxes'
agreement in the shared pixels, but never absorbed within a tile (a person's box often lies
mostly inside another's in a crowd; the model's NMS already told them apart). A joined
object keeps, keypoint by keypoint, the one its pieces scored best: across a seam, each
piece sees best the keypoints on its own side (a piece cut by its tile's edge scores the
keypoints it cannot see low, wherever its box puts them).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from segbatch.model import clip_box_mask, paint_box_mask

from .grid import Window
from .pieces import Instance, Piece


def stitch_instances(pieces: list[Piece], windows: list[Window], iou_threshold: float = 0.5) -> list[Instance]:
    """Join the pieces that are one object (see the module docstring); best score first.

    pieces: every tile's detections; windows: the tiles, indexed by ``Piece.tile``.
    """
    if not pieces:
        return []
    from shapely import STRtree, box

    if all(p.keypoints is None for p in pieces):
        pieces = _absorb_within_tiles(pieces)
    extents = [box(*p.extent) for p in pieces]
    left, right = STRtree(extents).query(extents, predicate="intersects")
    edges = []
    for i, j in zip(left.tolist(), right.tolist()):
        a, b = pieces[i], pieces[j]
        if i >= j or a.tile == b.tile or a.label != b.label:
            continue
        shared = windows[a.tile].intersection(windows[b.tile])
        if shared is None:
            continue
        iou = _agreement(a, b, shared)
        if iou >= iou_threshold:
            edges.append((iou, i, j))
    # Strongest agreement first, never two pieces of one tile in a group.
    groups = _Groups(len(pieces))
    tiles = [{p.tile} for p in pieces]
    for _, i, j in sorted(edges, key=lambda e: (-e[0], e[1], e[2])):
        ri, rj = groups.root(i), groups.root(j)
        if ri != rj and not (tiles[ri] & tiles[rj]):
            groups.join(ri, rj)
            tiles[ri] |= tiles[rj]
    instances = [_join(g) for g in groups.members(pieces)]
    instances.sort(key=lambda inst: (-inst.score, inst.y0, inst.x0))
    return instances


def _agreement(a: Piece, b: Piece, shared: Window) -> float:
    """IoU of two pieces' masks inside ``shared``, the pixels both their tiles saw."""
    # the shared window, cut to where either piece has pixels
    x0, y0, x1, y1 = box_union([a.extent, b.extent])
    cut = shared.intersection(Window(x0, y0, x1 - x0, y1 - y0))
    if cut is None:
        return 0.0
    ma, mb = np.zeros((cut.height, cut.width), bool), np.zeros((cut.height, cut.width), bool)
    paint_box_mask(ma, a.mask, a.x0, a.y0, True, cut.col, cut.row)
    paint_box_mask(mb, b.mask, b.x0, b.y0, True, cut.col, cut.row)
    union = np.count_nonzero(ma | mb)
    return np.count_nonzero(ma & mb) / union if union else 0.0


def _absorb_within_tiles(pieces: list[Piece], share: float = 0.8) -> list[Piece]:
    """Join each piece to another of its tile and class that holds ``share`` of its pixels."""
    from shapely import STRtree, box

    extents = [box(*p.extent) for p in pieces]
    left, right = STRtree(extents).query(extents, predicate="intersects")
    groups = _Groups(len(pieces))
    for i, j in zip(left.tolist(), right.tolist()):
        a, b = pieces[i], pieces[j]
        if i >= j or a.tile != b.tile or a.label != b.label:
            continue
        if _overlap(a, b) >= share * min(np.count_nonzero(a.mask), np.count_nonzero(b.mask)):
            groups.join(groups.root(i), groups.root(j))
    out = []
    for g in groups.members(pieces):
        if len(g) == 1:
            out.append(g[0])
            continue
        # one piece of its tile again: it counts as one piece when the tiles' pieces are joined
        j = _join(g)
        out.append(Piece(j.label, j.label_name, j.score, j.box, j.x0, j.y0, j.mask, tile=g[0].tile))
    return out


class _Groups:
    """Union-find over indices 0..n-1."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def root(self, k: int) -> int:
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def join(self, keep: int, other: int) -> None:
        """Join the group of root ``other`` into that of root ``keep``."""
        self.parent[other] = keep

    def members(self, items: list) -> list[list]:
        groups: dict[int, list] = {}
        for k, item in enumerate(items):
            groups.setdefault(self.root(k), []).append(item)
        return list(groups.values())


def _overlap(a: Piece, b: Piece) -> int:
    """Pixels two masks share, in scene pixels."""
    # a's part over b's extent, then b's part over the same pixels (all of them b's)
    ra, cx0, cy0 = clip_box_mask(a.mask, a.x0, a.y0, b.mask.shape[0], b.mask.shape[1], b.x0, b.y0)
    if ra.size == 0:
        return 0
    rb = clip_box_mask(b.mask, b.x0, b.y0, ra.shape[0], ra.shape[1], cx0, cy0)[0]
    return int(np.count_nonzero(ra & rb))


def _join(group: list[Piece]) -> Instance:
    """One instance of a group's pieces: their masks' union over their joint extent, the best one's
    label and score, the boxes' union."""
    best = max(group, key=lambda p: p.score)
    x0, y0, x1, y1 = box_union(p.extent for p in group)
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    for p in group:
        paint_box_mask(mask, p.mask, p.x0, p.y0, True, x0, y0)
    keypoints = join_keypoints([p.keypoints for p in group]) if best.keypoints is not None else None
    box = box_union(p.box for p in group)
    return Instance(best.label, best.label_name, best.score, box, x0, y0, mask, len(group), keypoints)


def join_keypoints(sets: list[list[dict]]) -> list[dict]:
    """Keypoint by keypoint, the best-scoring of the pieces' (the first of equal scores)."""
    return [dict(max(candidates, key=lambda k: k["score"])) for candidates in zip(*sets)]


def box_union(boxes: Iterable[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    """The smallest (x0, y0, x1, y1) holding every one of ``boxes`` (at least one)."""
    x0s, y0s, x1s, y1s = zip(*boxes)
    return min(x0s), min(y0s), max(x1s), max(y1s)
