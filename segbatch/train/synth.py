"""Seeded synthetic scenes with exact COCO instance ground truth.

Two kinds of scene, sharing one class list:

- ``shelf``: bottles, cans and boxes standing side by side on shelf boards,
  touching and partly overlapping, under uneven lighting;
- ``aerial``: roofs, trees and vehicles seen from above on a textured ground.

Objects are painted one after another; a later object hides what lies under
it, so each instance's mask is the set of pixels it still owns once the whole
scene is painted (its *visible* mask). Placements that would hide more than
half of an earlier object are rejected, so every labelled instance is mostly
visible and learnable.

The same ``(seed, index)`` always gives the same scene: each scene draws from
its own ``numpy.random.Generator`` seeded with ``[seed, index]``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CLASSES: list[str] = ["__background__", "bottle", "can", "box", "roof", "tree", "vehicle"]
KINDS: tuple[str, ...] = ("shelf", "aerial")

_LABEL = {name: i for i, name in enumerate(CLASSES)}
# An earlier instance must keep at least this share of its own pixels visible.
_MIN_VISIBLE_SHARE = 0.5
# Instances smaller than this (in visible pixels) are not labelled; placements
# are sized so that this rarely happens.
_MIN_AREA = 60


@dataclass
class _Shape:
    """One object before compositing: its full (unoccluded) mask and its look."""

    label: int
    mask: np.ndarray  # H x W bool: every pixel of the object
    paint: np.ndarray  # H x W x 3 uint8: the object's colours (used only where mask)


class _Scene:
    """A canvas plus an instance-id map that records who owns each pixel."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image.astype(np.float32)  # H x W x 3, painted in float, clipped at the end
        self.owner = np.zeros(image.shape[:2], dtype=np.int32)  # 0: background, k: instance k
        self.labels: list[int] = []  # labels[k - 1] is instance k's class
        self.full_area: list[int] = []

    def try_add(self, shape: _Shape) -> bool:
        """Paint ``shape`` on top unless it would hide too much of an earlier instance."""
        area = int(shape.mask.sum())
        if area < _MIN_AREA:
            return False
        covered = self.owner[shape.mask]
        if covered.size and covered.max() > 0:
            counts = np.bincount(self.owner.ravel(), minlength=len(self.labels) + 1)
            lost = np.bincount(covered, minlength=len(self.labels) + 1)
            for k in np.nonzero(lost[1:])[0] + 1:
                if counts[k] - lost[k] < _MIN_VISIBLE_SHARE * self.full_area[k - 1]:
                    return False
        self.labels.append(shape.label)
        self.full_area.append(area)
        self.owner[shape.mask] = len(self.labels)
        self.image[shape.mask] = shape.paint[shape.mask]
        return True

    def finish(self, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
        """Light the scene, add sensor noise, and cut out the visible masks."""
        h, w = self.owner.shape
        # Uneven lighting: a random linear gradient times a global gain, so the
        # same object looks different across scenes and across the image.
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.cos(angle) * (xx / w - 0.5) + np.sin(angle) * (yy / h - 0.5)
        light = rng.uniform(0.75, 1.15) * (1.0 + rng.uniform(0.0, 0.45) * ramp)
        image = self.image * light[..., None]
        image += rng.normal(0.0, rng.uniform(2.0, 7.0), size=image.shape)
        image = np.clip(image, 0, 255).astype(np.uint8)
        instances = []
        for k, label in enumerate(self.labels, start=1):
            visible = self.owner == k
            if visible.sum() >= _MIN_AREA:
                instances.append({"label": label, "mask": visible})
        return image, instances


def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float = 30.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) + rng.uniform(-amount, amount, size=3), 0, 255)


def _random_colour(rng: np.random.Generator, lo: int = 30, hi: int = 230) -> np.ndarray:
    return rng.uniform(lo, hi, size=3).astype(np.float32)


def _layer(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw, Image.Image, ImageDraw.ImageDraw]:
    """A fresh RGB paint layer and its L-mode mask layer, with their drawers."""
    paint = Image.new("RGB", (width, height))
    mask = Image.new("L", (width, height))
    return paint, ImageDraw.Draw(paint), mask, ImageDraw.Draw(mask)


def _shape(label: str, paint: Image.Image, mask: Image.Image) -> _Shape:
    return _Shape(_LABEL[label], np.asarray(mask) > 127, np.asarray(paint))


def _rotated_rect(cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    """Corners of a w x h rectangle centred on (cx, cy), turned by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    pts = []
    for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
        pts.append((cx + c * dx - s * dy, cy + s * dx + c * dy))
    return pts


def _tup(c: np.ndarray) -> tuple[int, int, int]:
    return int(c[0]), int(c[1]), int(c[2])


# ----------------------------------------------------------------------------- shelf


def _bottle(rng: np.random.Generator, size: tuple[int, int], x0: int, bottom: int, w: int, h: int) -> _Shape:
    paint, pd, mask, md = _layer(*size)
    body = _random_colour(rng)
    neck_w = max(5, int(w * rng.uniform(0.35, 0.5)))
    neck_h = int(h * rng.uniform(0.22, 0.32))
    cx = x0 + w / 2
    top = bottom - h
    shoulder = top + neck_h
    for d, fill in ((md, 255), (pd, _tup(body))):
        d.rounded_rectangle((x0, shoulder, x0 + w - 1, bottom - 1), radius=max(2, w // 3), fill=fill)
        d.rectangle((cx - neck_w / 2, top, cx + neck_w / 2 - 1, shoulder + w // 3), fill=fill)
    # A cap and a paper label: the inside detail a detector can key on.
    pd.rectangle((cx - neck_w / 2, top, cx + neck_w / 2 - 1, top + max(2, neck_h // 4)), fill=_tup(_random_colour(rng)))
    label_top = shoulder + (bottom - shoulder) * rng.uniform(0.25, 0.4)
    label_bot = label_top + (bottom - shoulder) * rng.uniform(0.25, 0.4)
    pd.rectangle((x0, label_top, x0 + w - 1, label_bot), fill=_tup(_random_colour(rng)))
    # A highlight strip on the left side suggests a round body.
    hl = np.clip(body + 60, 0, 255)
    pd.rectangle((x0 + w * 0.2, shoulder + 3, x0 + w * 0.3, bottom - 4), fill=_tup(hl))
    return _shape("bottle", paint, mask)


def _can(rng: np.random.Generator, size: tuple[int, int], x0: int, bottom: int, w: int, h: int) -> _Shape:
    paint, pd, mask, md = _layer(*size)
    body = _random_colour(rng)
    eh = max(4, int(w * rng.uniform(0.25, 0.35)))  # ellipse height of the rim
    top = bottom - h
    for d, fill in ((md, 255), (pd, _tup(body))):
        d.rectangle((x0, top + eh // 2, x0 + w - 1, bottom - eh // 2), fill=fill)
        d.ellipse((x0, bottom - eh, x0 + w - 1, bottom - 1), fill=fill)
    rim = _jitter(rng, (200, 200, 205), 25)
    md.ellipse((x0, top, x0 + w - 1, top + eh), fill=255)
    pd.ellipse((x0, top, x0 + w - 1, top + eh), fill=_tup(rim))
    pd.ellipse((x0 + 2, top + 1, x0 + w - 3, top + eh - 1), fill=_tup(rim * 0.8))
    band = _random_colour(rng)
    mid = top + h * rng.uniform(0.4, 0.55)
    pd.rectangle((x0, mid, x0 + w - 1, mid + h * 0.15), fill=_tup(band))
    return _shape("can", paint, mask)


def _box(rng: np.random.Generator, size: tuple[int, int], x0: int, bottom: int, w: int, h: int) -> _Shape:
    paint, pd, mask, md = _layer(*size)
    body = _random_colour(rng)
    top = bottom - h
    md.rectangle((x0, top, x0 + w - 1, bottom - 1), fill=255)
    pd.rectangle((x0, top, x0 + w - 1, bottom - 1), fill=_tup(body))
    # A darker side face and a printed panel.
    side = max(2, int(w * rng.uniform(0.12, 0.22)))
    pd.rectangle((x0 + w - side, top, x0 + w - 1, bottom - 1), fill=_tup(body * 0.65))
    pd.rectangle((x0 + 3, top + h * 0.2, x0 + w - side - 3, top + h * 0.5), fill=_tup(_random_colour(rng)))
    return _shape("box", paint, mask)


def _shelf_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[dict]]:
    wall = _jitter(rng, (200, 195, 185), 40)
    image = np.empty((height, width, 3), np.float32)
    image[:] = wall
    scene = _Scene(image)
    rows = int(rng.integers(2, 4))
    row_h = height / rows
    board_colour = _jitter(rng, (110, 85, 60), 35)
    for r in range(rows):
        board_h = int(rng.integers(6, 11))
        bottom = int((r + 1) * row_h) - board_h
        # The board is background: a band of shelf colour with a lit front edge.
        scene.image[bottom : bottom + board_h] = board_colour
        scene.image[bottom : bottom + 2] = np.clip(board_colour + 50, 0, 255)
        space = bottom - int(r * row_h) - 4
        x = int(rng.integers(-8, 12))
        while x < width - 10:
            kind = rng.choice(["bottle", "can", "box"], p=[0.35, 0.3, 0.35])
            if kind == "bottle":
                w, h = int(rng.integers(14, 27)), int(space * rng.uniform(0.6, 0.98))
                make = _bottle
            elif kind == "can":
                w, h = int(rng.integers(16, 31)), int(space * rng.uniform(0.32, 0.5))
                make = _can
            else:
                w, h = int(rng.integers(24, 61)), int(space * rng.uniform(0.35, 0.9))
                make = _box
            h = max(h, 14)
            if rng.random() < 0.1:  # an empty gap on the shelf
                x += int(rng.integers(10, 40))
                continue
            # A product sits slightly in front of or behind the shelf edge.
            foot = bottom + int(rng.integers(0, 3))
            if scene.try_add(make(rng, (width, height), x, foot, w, h)):
                # Touching (0), apart (> 0) or overlapping (< 0) the next product.
                x += w + int(rng.integers(-w // 3, 6))
            else:
                x += int(rng.integers(4, 12))
    return scene.finish(rng)


# ----------------------------------------------------------------------------- aerial


def _ground(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Low-frequency colour blotches: grass, soil and pavement."""
    base = _jitter(rng, rng.choice([(95, 120, 70), (140, 125, 95), (120, 120, 110)]), 20)
    coarse = rng.normal(0.0, 18.0, size=(height // 32 + 2, width // 32 + 2, 3)).astype(np.float32)
    coarse_img = Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    image = base + (np.asarray(coarse_img, np.float32) - 128)
    # A road or two: background too, with straight edges like roofs have.
    for _ in range(int(rng.integers(0, 3))):
        road = Image.new("L", (width, height))
        d = ImageDraw.Draw(road)
        if rng.random() < 0.5:
            y = rng.uniform(0, height)
            d.line((0, y, width, y + rng.uniform(-40, 40)), fill=255, width=int(rng.integers(10, 22)))
        else:
            x = rng.uniform(0, width)
            d.line((x, 0, x + rng.uniform(-40, 40), height), fill=255, width=int(rng.integers(10, 22)))
        image[np.asarray(road) > 127] = _jitter(rng, (90, 90, 95), 15)
    return image


def _roof(rng: np.random.Generator, size: tuple[int, int]) -> _Shape:
    width, height = size
    paint, pd, mask, md = _layer(width, height)
    w, h = rng.uniform(28, 75), rng.uniform(24, 60)
    cx, cy = rng.uniform(10, width - 10), rng.uniform(10, height - 10)
    angle = rng.uniform(0, math.pi)
    colour = _jitter(rng, rng.choice([(165, 60, 50), (120, 120, 125), (90, 70, 60), (190, 170, 150)]), 25)
    outline = _rotated_rect(cx, cy, w, h, angle)
    if rng.random() < 0.35:
        # An L-shaped house: the rectangle plus a wing.
        wing = _rotated_rect(
            cx + math.cos(angle) * w * 0.35 - math.sin(angle) * h * 0.5,
            cy + math.sin(angle) * w * 0.35 + math.cos(angle) * h * 0.5,
            w * 0.3,
            h * 0.8,
            angle,
        )
        for d, fill in ((md, 255), (pd, _tup(colour * 0.85))):
            d.polygon(wing, fill=fill)
    for d, fill in ((md, 255), (pd, _tup(colour))):
        d.polygon(outline, fill=fill)
    # Two roof planes: the half on one side of the ridge is darker (sun angle).
    half = _rotated_rect(cx - math.sin(angle) * h / 4, cy + math.cos(angle) * h / 4, w, h / 2, angle)
    pd.polygon(half, fill=_tup(colour * 0.75))
    return _shape("roof", paint, mask)


def _tree(rng: np.random.Generator, size: tuple[int, int]) -> _Shape:
    width, height = size
    paint, pd, mask, md = _layer(width, height)
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    r = rng.uniform(8, 18)
    colour = _jitter(rng, (40, 85, 35), 18)
    blobs = [(cx, cy, r)]
    for _ in range(int(rng.integers(2, 6))):
        a, d = rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 0.8) * r
        blobs.append((cx + d * math.cos(a), cy + d * math.sin(a), r * rng.uniform(0.5, 0.85)))
    for bx, by, br in blobs:
        md.ellipse((bx - br, by - br, bx + br, by + br), fill=255)
        pd.ellipse((bx - br, by - br, bx + br, by + br), fill=_tup(colour))
    highlight = _tup(np.clip(colour + 25, 0, 255))
    for bx, by, br in blobs:  # lit crowns
        pd.ellipse((bx - br * 0.6, by - br * 0.6, bx + br * 0.2, by + br * 0.2), fill=highlight)
    return _shape("tree", paint, mask)


def _vehicle(rng: np.random.Generator, size: tuple[int, int]) -> _Shape:
    width, height = size
    paint, pd, mask, md = _layer(width, height)
    length, breadth = rng.uniform(20, 30), rng.uniform(11, 15)
    cx, cy = rng.uniform(8, width - 8), rng.uniform(8, height - 8)
    angle = rng.uniform(0, 2 * math.pi)
    colour = rng.choice([(220, 220, 225), (30, 30, 35), (180, 30, 30), (40, 60, 160), (200, 200, 60)])
    colour = _jitter(rng, colour, 20)
    body = _rotated_rect(cx, cy, length, breadth, angle)
    md.polygon(body, fill=255)
    pd.polygon(body, fill=_tup(colour))
    # Windscreen: a dark band toward the front.
    off = length * 0.18
    glass = _rotated_rect(cx + math.cos(angle) * off, cy + math.sin(angle) * off, length * 0.18, breadth * 0.8, angle)
    pd.polygon(glass, fill=(25, 30, 40))
    return _shape("vehicle", paint, mask)


def _aerial_scene(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[dict]]:
    scene = _Scene(_ground(rng, width, height))
    size = (width, height)
    scale = width * height / (320 * 256)
    # Roofs first, then vehicles, then trees (canopies overhang roofs and cars).
    for make, n in ((_roof, rng.integers(3, 9)), (_vehicle, rng.integers(2, 9)), (_tree, rng.integers(3, 12))):
        placed, tries = 0, 0
        target = int(n * scale)
        while placed < target and tries < 4 * target:
            tries += 1
            placed += scene.try_add(make(rng, size))
    return scene.finish(rng)


# ----------------------------------------------------------------------------- API


def generate_scene(rng: np.random.Generator, kind: str, width: int, height: int) -> tuple[np.ndarray, list[dict]]:
    """One synthetic scene and its instances.

    Returns ``(image, instances)``: ``image`` is ``height x width x 3`` uint8
    RGB; each instance is ``{"label": int, "mask": height x width bool}`` with
    ``label`` an index into :data:`CLASSES` and ``mask`` the pixels where that
    instance is visible (masks never overlap).
    """
    if kind == "shelf":
        return _shelf_scene(rng, width, height)
    if kind == "aerial":
        return _aerial_scene(rng, width, height)
    raise ValueError(f"unknown scene kind {kind!r}; known: {', '.join(KINDS)}")


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for scene ``index`` of a dataset made with ``seed``."""
    return np.random.default_rng([seed, index])


def coco_annotation(mask: np.ndarray, label: int, ann_id: int, image_id: int) -> dict:
    """A COCO annotation (compressed RLE, bbox ``[x, y, w, h]``) for an H x W bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": label,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "bbox": [x, y, w, h],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
    }


def _write_scene(args: tuple[str, int, int, str, int, int]) -> tuple[dict, list[tuple[np.ndarray, int]]]:
    """Scene ``index``: its PNG written, its image record and its instances' RLEs."""
    out_dir, seed, index, kind, width, height = args
    image, instances = generate_scene(scene_rng(seed, index), kind, width, height)
    file_name = f"images/scene-{index:05d}.png"
    Image.fromarray(image).save(os.path.join(out_dir, file_name))
    info = {"id": index + 1, "file_name": file_name, "width": width, "height": height, "kind": kind}
    return info, [coco_annotation(inst["mask"], inst["label"], 0, index + 1) for inst in instances]


def write_dataset(
    out_dir: str,
    count: int,
    seed: int,
    kinds: Sequence[str] = KINDS,
    size: tuple[int, int] = (320, 256),
    processes: int = 1,
) -> str:
    """Write ``count`` scenes to ``out_dir/images/scene-NNNNN.png`` and their COCO ground truth.

    Scene ``i`` is of kind ``kinds[i % len(kinds)]`` and ``size`` is
    ``(width, height)``. Returns the path of ``out_dir/ground_truth.json``,
    whose ``file_name`` entries are relative to ``out_dir`` (``images/...``);
    category ids are indices into :data:`CLASSES`. Each scene depends only on
    ``(seed, i)``, so ``processes`` > 1 draws them in parallel and writes the
    same files.
    """
    width, height = size
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    jobs = [(out_dir, seed, i, kinds[i % len(kinds)], width, height) for i in range(count)]
    if processes > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(processes) as pool:
            scenes = list(pool.map(_write_scene, jobs, chunksize=8))
    else:
        scenes = [_write_scene(job) for job in jobs]
    images, annotations = [], []
    for info, anns in scenes:
        images.append(info)
        for ann in anns:
            annotations.append({**ann, "id": len(annotations) + 1})
    coco = {
        "info": {"description": f"segbatch synthetic scenes, seed {seed}", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for i, name in enumerate(CLASSES) if i > 0],
    }
    path = os.path.join(out_dir, "ground_truth.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(coco, f)
    os.replace(tmp, path)
    return path


def write_aerial_raster(
    path: str,
    width: int,
    height: int,
    seed: int,
    block: int = 512,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (500_000.0, 4_500_000.0),
    pixel_size: float = 0.5,
    keep_truth: bool = True,
) -> list[dict]:
    """A large georeferenced aerial scene: a tiled, compressed GeoTIFF written block by block.

    Each ``block`` x ``block`` square is an aerial scene of its own (seeded by
    ``(seed, block index)``), so any size is drawn without holding the scene
    in memory; objects near a square's edge are cut there like any object at
    an image's edge. ``origin`` is the map position of the top-left corner in
    ``crs`` (UTM 33N by default), ``pixel_size`` in the CRS's units.

    Returns the ground truth (empty without ``keep_truth``): per instance
    ``{"label", "x0", "y0", "mask"}``, ``mask`` a bool array cut to the
    instance's pixels, whose top-left pixel is the scene's (x0, y0).
    """
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": crs,
        "transform": from_origin(origin[0], origin[1], pixel_size, pixel_size),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "photometric": "RGB",
    }
    truth: list[dict] = []
    with rasterio.open(path, "w", **profile) as dst:
        for bi, row in enumerate(range(0, height, block)):
            for bj, col in enumerate(range(0, width, block)):
                w, h = min(block, width - col), min(block, height - row)
                image, instances = generate_scene(scene_rng(seed, bi * 100_000 + bj), "aerial", w, h)
                dst.write(image.transpose(2, 0, 1), window=Window(col, row, w, h))
                for inst in instances if keep_truth else ():
                    rows, cols = np.flatnonzero(inst["mask"].any(1)), np.flatnonzero(inst["mask"].any(0))
                    crop = inst["mask"][rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
                    x0, y0 = col + int(cols[0]), row + int(rows[0])
                    truth.append({"label": inst["label"], "x0": x0, "y0": y0, "mask": crop})
    return truth


def main(argv: list[str] | None = None) -> None:
    """``python -m segbatch.train.synth OUT_DIR --count N --seed S [--kinds shelf,aerial] [--size 320x256]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m segbatch.train.synth", description="Write synthetic COCO scenes.")
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--size", default="320x256", help="WIDTHxHEIGHT")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    write_dataset(args.out_dir, args.count, args.seed, tuple(args.kinds.split(",")), (width, height), args.processes)


if __name__ == "__main__":
    main()
