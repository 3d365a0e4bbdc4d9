"""Overlay pictures: masks, boxes, labels and scores drawn on their images, and the
skeletons of keypoint models (a line per joined pair, a dot per keypoint)."""

from __future__ import annotations

import bisect
import colorsys
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils


def class_colour(label: int) -> tuple[int, int, int]:
    """A stable, distinct colour per class id (golden-ratio hues)."""
    h = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


log = logging.getLogger(__name__)


def decode_mask(mask: dict[str, Any]) -> np.ndarray:
    """A row's COCO RLE to an [h, w] bool array."""
    return mask_utils.decode({"size": list(mask["size"]), "counts": mask["counts"].encode()}).astype(bool)


def render_overlay(
    image: np.ndarray,
    row: dict[str, Any],
    alpha: float = 0.45,
    min_score: float = 0.0,
    skeleton: tuple[tuple[int, int], ...] = (),
) -> Image.Image:
    """[H, W, 3] uint8 image + its result row -> an RGB picture.

    Masks are blended in their class colour, outlined by their box, and
    labelled ``name score``; best scores are drawn last so they stay on top.
    Keypoints (of keypoint models) are drawn over them: ``skeleton``'s pairs
    (the file metadata's) as lines where both ends are visible, and a dot at
    each visible keypoint; keypoints the model calls not visible are not drawn.
    """
    canvas = image.astype(np.float32).copy()
    detections = [d for d in row["detections"] if d["score"] >= min_score]
    for det in reversed(detections):
        if det.get("mask") is None:
            continue  # a keypoint-only model's detection
        m = decode_mask(det["mask"])
        if m.shape != canvas.shape[:2]:
            continue  # a row of another image size: never draw it misplaced
        canvas[m] = canvas[m] * (1 - alpha) + np.array(class_colour(det["label"])) * alpha
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for det in reversed(detections):
        colour = class_colour(det["label"])
        x1, y1, x2, y2 = det["box"]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = f"{det['label_name']} {det['score']:.2f}"
        tx, ty = x1 + 2, max(y1 - 12, 0)
        box = draw.textbbox((tx, ty), text)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=colour)
    for det in reversed(detections):
        if det.get("keypoints"):
            draw_skeleton(draw, det["keypoints"], skeleton, class_colour(det["label"]))
    if row["status"] != "ok":
        draw.text((4, 4), f"error: {row['error']}", fill=(255, 64, 64))
    return out


def draw_skeleton(
    draw: ImageDraw.ImageDraw,
    keypoints: list[dict[str, Any]],
    skeleton: tuple[tuple[int, int], ...],
    colour: tuple[int, int, int],
    width: int = 3,
    radius: int = 3,
) -> None:
    """One detection's limbs (``skeleton`` pairs of visible keypoints) and keypoints (dots,
    outlined in black so they show on any colour)."""
    for i, j in skeleton:
        if i < len(keypoints) and j < len(keypoints) and keypoints[i]["visible"] and keypoints[j]["visible"]:
            a, b = keypoints[i], keypoints[j]
            draw.line([(a["x"], a["y"]), (b["x"], b["y"])], fill=colour, width=width)
    for kp in keypoints:
        if kp["visible"]:
            x, y = kp["x"], kp["y"]
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(0, 0, 0))


def pick_uris(dataset: pads.Dataset, count: int, uris: tuple[str, ...] = (), seed: int = 0) -> set[str]:
    """The URIs named by ``uris`` (a full URI or a file name), else a seeded sample of ``count``.

    Only the ``uri`` column is read, a record batch at a time, so picking
    costs a batch of memory however many rows the dataset holds.
    """
    if uris:
        return _named_uris(dataset, uris)
    return _sampled_uris(dataset, count, seed)


def _named_uris(dataset: pads.Dataset, uris: tuple[str, ...]) -> set[str]:
    """The dataset's URIs equal to one of ``uris`` or ending in ``/`` + one of them."""
    wanted = pa.array(sorted(set(uris)), pa.string())
    uri = pads.field("uri")
    # (?s): a newline in a URI must not stop the match short of the last slash.
    name = pc.replace_substring_regex(uri, pattern="(?s)^.*/", replacement="")
    found = dataset.to_table(columns=["uri"], filter=uri.isin(wanted) | name.isin(wanted))
    return set(found.column("uri").to_pylist())


def _sampled_uris(dataset: pads.Dataset, count: int, seed: int) -> set[str]:
    """``count`` URIs drawn uniformly (seeded: the same seed picks the same rows).

    Positions are drawn from the row count (read from the files' footers),
    then looked up in the ``uri`` column batch by batch in the dataset's
    order; ``random.sample`` only uses the population's length and
    indexing, so this picks what sampling the whole list of rows would.
    """
    total = dataset.count_rows()
    positions = sorted(random.Random(seed).sample(range(total), min(count, total)))
    picked: set[str] = set()
    start = 0
    for batch in dataset.to_batches(columns=["uri"]):
        if not positions or start > positions[-1]:
            break  # every position looked up: the rest need not be read
        end = start + batch.num_rows
        inside = positions[bisect.bisect_left(positions, start) : bisect.bisect_left(positions, end)]
        if inside:
            offsets = pa.array([p - start for p in inside], pa.int64())
            picked.update(batch.column("uri").take(offsets).to_pylist())
        start = end
    return picked


def render_rows(
    dest: str, storage, count: int = 8, uris: tuple[str, ...] = (), seed: int = 0, min_score: float = 0.0
) -> Iterator[tuple[str, Image.Image]]:
    """(URI, overlay picture) for some of DEST's rows; images that cannot be read are skipped (logged)."""
    from segbatch.model import decode_image

    from .results import keypoint_layout, results_dataset

    dataset = results_dataset(dest, storage)
    picked = pick_uris(dataset, count, uris, seed)
    if not picked:
        return
    layout = keypoint_layout(dest, storage)
    skeleton = layout.skeleton if layout else ()
    for row in sorted(_rows_for(dataset, picked), key=lambda r: r["uri"]):
        try:
            image = decode_image(storage.read_bytes(row["uri"]), max_pixels=10**9)
        except Exception as exc:  # the image may be the broken one the row reports
            log.warning("cannot render %s: %s", row["uri"], exc)
            continue
        yield row["uri"], render_overlay(image, row, min_score=min_score, skeleton=skeleton)


def _rows_for(dataset: pads.Dataset, uris: set[str]) -> list[dict[str, Any]]:
    """Whole rows (masks included) of the given URIs only."""
    table = dataset.to_table(filter=pads.field("uri").isin(pa.array(sorted(uris))))
    return table.to_pylist()
