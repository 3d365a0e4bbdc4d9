"""COCO results export and box/mask AP against COCO ground truth (pycocotools)."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segbatch.errors import UsageError

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


class EvaluationError(UsageError, ValueError):
    """Rows and ground truth cannot be paired; the message names the file and the fix."""


def match_images(rows: list[dict[str, Any]], gt_images: list[dict[str, Any]]) -> dict[str, int]:
    """Row URI -> ground-truth image id, by file name.

    A ground-truth ``file_name`` may be a bare name or a relative path
    (``images/scene-00001.png``); the longest such suffix of the URI wins.
    Raises EvaluationError when a ground-truth name fits two rows
    (``train/a.jpg`` and ``val/a.jpg`` for ``a.jpg``), or names two images:
    one image's detections would be scored against the other's objects.
    """
    by_name: dict[str, list[int]] = {}
    for img in gt_images:
        by_name.setdefault(_clean_name(img["file_name"]), []).append(img["id"])
    out: dict[str, int] = {}
    claimed: dict[str, str] = {}  # ground-truth name -> the URI it was matched to
    for row in rows:
        name = _longest_suffix(row["uri"], by_name)
        if name is None:
            continue
        if len(by_name[name]) > 1:
            raise EvaluationError(
                f"the ground truth names {len(by_name[name])} images {name!r}; give each image a unique file_name"
            )
        if name in claimed:
            raise EvaluationError(
                f"ground-truth image {name!r} matches both {claimed[name]} and {row['uri']}; write the "
                "ground truth's file_name with enough of the path to tell them apart (e.g. val/a.jpg)"
            )
        claimed[name] = row["uri"]
        out[row["uri"]] = by_name[name][0]
    return out


def _clean_name(file_name: str) -> str:
    name = file_name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _longest_suffix(uri: str, names: dict[str, Any]) -> str | None:
    parts = uri.replace("\\", "/").split("/")
    for k in range(len(parts)):
        suffix = "/".join(parts[k:])
        if suffix in names:
            return suffix
    return None


def category_ids(categories: list[dict[str, Any]] | None) -> dict[str, int]:
    """Class name -> COCO category id, for names the ground truth gives once."""
    seen: dict[str, list[int]] = {}
    for cat in categories or []:
        seen.setdefault(cat["name"], []).append(cat["id"])
    return {name: ids[0] for name, ids in seen.items() if len(ids) == 1}


def coco_results(
    rows: list[dict[str, Any]],
    image_ids: dict[str, int] | None = None,
    categories: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Rows to COCO results (``loadRes`` format): one dict per detection.

    image_ids: URI -> image id (from ``match_images``); without it, ids are
    1.. in URI order. Rows without an id (not in the ground truth) are left out.
    categories: the ground truth's ``categories``; a detection takes the id of
    the category named as its ``label_name`` (a trained model numbers its
    classes 1..K, the dataset's ids may be 1, 3, 18), else its ``label``.
    """
    if image_ids is None:
        image_ids = {r["uri"]: i + 1 for i, r in enumerate(sorted(rows, key=lambda r: r["uri"]))}
    id_of = category_ids(categories)
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
                    "category_id": id_of.get(det["label_name"], det["label"]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": det["score"],
                    "segmentation": {"size": list(det["mask"]["size"]), "counts": det["mask"]["counts"]},
                }
            )
    return results


def evaluate(rows: list[dict[str, Any]], ground_truth: dict[str, Any]) -> dict[str, Any]:
    """Box and mask AP of ``rows`` against a COCO ground-truth dict.

    Returns {"images_matched", "images_ground_truth", "bbox": {...}, "segm": {...}}
    with AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100 per IoU type.
    """
    ids = match_images(rows, ground_truth["images"])
    results = coco_results(rows, ids, ground_truth.get("categories"))
    return {
        "images_matched": len(ids),
        "images_ground_truth": len(ground_truth["images"]),
        **score(ground_truth, results, sorted(set(ids.values()))),
    }


def score(
    ground_truth: dict[str, Any], results: list[dict[str, Any]], image_ids: list[int]
) -> dict[str, dict[str, float]]:
    """COCOeval of ``results`` on the images ``image_ids``: {"bbox": {...}, "segm": {...}}."""
    gt = _coco_from_dict(ground_truth)
    out: dict[str, dict[str, float]] = {}
    for iou_type in ("bbox", "segm"):
        if not results:
            out[iou_type] = {n: 0.0 for n in AP_NAMES}
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {n: max(float(v), 0.0) for n, v in zip(AP_NAMES, ev.stats)}
    return out


def _coco_from_dict(data: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(json.dumps(data))  # COCO mutates what it is given
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
