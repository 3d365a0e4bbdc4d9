"""COCO results export and box/mask AP against COCO ground truth (pycocotools)."""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def match_images(rows: list[dict[str, Any]], gt_images: list[dict[str, Any]]) -> dict[str, int]:
    """Row URI -> ground-truth image id, by file name.

    A ground-truth ``file_name`` may be a bare name or a relative path
    (``images/scene-00001.png``); the longest such suffix of the URI wins.
    """
    by_name: dict[str, int] = {}
    for img in gt_images:
        name = img["file_name"].replace("\\", "/").lstrip("./")
        by_name[name] = img["id"]
    out = {}
    for row in rows:
        parts = row["uri"].replace("\\", "/").split("/")
        for k in range(len(parts)):
            suffix = "/".join(parts[k:])
            if suffix in by_name:
                out[row["uri"]] = by_name[suffix]
                break
    return out


def coco_results(rows: list[dict[str, Any]], image_ids: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Rows to COCO results (``loadRes`` format): one dict per detection.

    image_ids: URI -> image id (from ``match_images``); without it, ids are
    1.. in URI order. Rows without an id (not in the ground truth) are left out.
    """
    if image_ids is None:
        image_ids = {r["uri"]: i + 1 for i, r in enumerate(sorted(rows, key=lambda r: r["uri"]))}
    results = []
    for row in rows:
        image_id = image_ids.get(row["uri"])
        if image_id is None or row["status"] != "ok":
            continue
        for det in row["detections"]:
            x1, y1, x2, y2 = det["box"]
            results.append(
                {
                    "image_id": image_id,
                    "category_id": det["label"],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": det["score"],
                    "segmentation": {"size": list(det["mask"]["size"]), "counts": det["mask"]["counts"]},
                }
            )
    return results


def evaluate(rows: list[dict[str, Any]], ground_truth: dict[str, Any]) -> dict[str, Any]:
    """Box and mask AP of ``rows`` against a COCO ground-truth dict.

    Returns {"images_matched", "images_ground_truth", "bbox": {...}, "segm": {...}}
    with AP, AP50, AP75, APs, APm, APl, AR100 per IoU type.
    """
    gt = _coco_from_dict(ground_truth)
    ids = match_images(rows, ground_truth["images"])
    results = coco_results(rows, ids)
    out: dict[str, Any] = {"images_matched": len(ids), "images_ground_truth": len(ground_truth["images"])}
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
    for iou_type in ("bbox", "segm"):
        if not results:
            out[iou_type] = {n: 0.0 for n in names}
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = sorted(set(ids.values()))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {n: max(float(v), 0.0) for n, v in zip(names, ev.stats)}
    return out


def _coco_from_dict(data: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(json.dumps(data))  # COCO mutates what it is given
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def gt_folder(gt_url: str) -> str:
    """The folder a ground-truth file's relative ``file_name``s are relative to."""
    return posixpath.dirname(gt_url)
