"""COCO results export and box, mask and keypoint AP against COCO ground truth (pycocotools)."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

from segbatch.errors import UsageError

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
# pycocotools' summary of keypoint AP (OKS): no small objects, 20 detections an image
KEYPOINT_AP_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


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
    keypoint_names: list[str] | tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Rows to COCO results (``loadRes`` format): one dict per detection.

    image_ids: URI -> image id (from ``match_images``); without it, ids are
    1.. in URI order. Rows without an id (not in the ground truth) are left out.
    categories: the ground truth's ``categories``; a detection takes the id of
    the category named as its ``label_name`` (a trained model numbers its
    classes 1..K, the dataset's ids may be 1, 3, 18), else its ``label``.

    Each result has ``bbox`` and ``score``; ``segmentation`` (RLE) when the
    detection has a mask; ``keypoints`` ``[x1, y1, v1, ...]`` when it has
    keypoints (see ``coco_keypoints``). keypoint_names: the model's (the file
    metadata's); when the result's category in ``categories`` lists its own
    ``keypoints``, the keypoints are written in that order, matched by name.
    """
    if image_ids is None:
        image_ids = {r["uri"]: i + 1 for i, r in enumerate(sorted(rows, key=lambda r: r["uri"]))}
    id_of = category_ids(categories)
    orders = keypoint_orders(categories, keypoint_names)
    results = []
    for row in rows:
        image_id = image_ids.get(row["uri"])
        if image_id is None or row["status"] != "ok":
            continue
        for det in row["detections"]:
            x1, y1, x2, y2 = det["box"]
            category_id = id_of.get(det["label_name"], det["label"])
            result = {
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": det["score"],
            }
            if det.get("mask") is not None:  # null for keypoint-only models
                result["segmentation"] = {"size": list(det["mask"]["size"]), "counts": det["mask"]["counts"]}
            if det.get("keypoints") is not None:  # null for mask models
                result.update(coco_keypoints(det["keypoints"], orders.get(category_id)))
            results.append(result)
    return results


def coco_keypoints(keypoints: list[dict[str, Any]], order: list[int] | None = None) -> dict[str, list[float]]:
    """A detection's keypoints as COCO results: ``keypoints`` ``[x1, y1, v1, ...]`` and
    ``keypoint_scores`` (the model's score of each, beside them).

    v is the visibility flag, 1 where the model calls the keypoint visible, else 0:
    COCO's results format asks for a flag there (pycocotools' keypoint AP ignores a
    detection's v; its drawing, ``showAnns``, draws points with v > 0), and Keypoint
    R-CNN's scores are unbounded logits, often negative, so a score as v would hide
    keypoints. ``order``: which of ``keypoints`` goes k-th (the ground truth's order).
    """
    picked = keypoints if order is None else [keypoints[i] for i in order]
    flat: list[float] = []
    for kp in picked:
        flat += [kp["x"], kp["y"], 1 if kp["visible"] else 0]
    return {"keypoints": flat, "keypoint_scores": [kp["score"] for kp in picked]}


def keypoint_orders(
    categories: list[dict[str, Any]] | None, keypoint_names: list[str] | tuple[str, ...] | None
) -> dict[int, list[int] | None]:
    """Category id -> the model's keypoint index for each of the category's own keypoints
    (its ``keypoints`` names), None where the orders are the same or cannot be compared.

    Raises EvaluationError when a category's keypoints are not the model's: OKS would
    compare a nose with an ankle.
    """
    out: dict[int, list[int] | None] = {}
    if not keypoint_names:
        return out
    names = list(keypoint_names)
    for cat in categories or []:
        theirs = cat.get("keypoints")
        if not theirs or list(theirs) == names:
            continue
        if sorted(theirs) != sorted(names):
            missing = sorted(set(theirs) - set(names))
            extra = sorted(set(names) - set(theirs))
            raise EvaluationError(
                f"the ground truth's category {cat.get('name')!r} has keypoints {list(theirs)}, the model "
                f"{names}; {'the model lacks ' + str(missing) + '; ' if missing else ''}"
                f"{'the ground truth lacks ' + str(extra) + '; ' if extra else ''}"
                "evaluate against ground truth of the model's keypoints (or run a model trained on them)"
            )
        out[cat["id"]] = [names.index(n) for n in theirs]
    return out


def evaluate(
    rows: list[dict[str, Any]],
    ground_truth: dict[str, Any],
    keypoint_names: list[str] | tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Box, mask and keypoint AP of ``rows`` against a COCO ground-truth dict.

    Returns {"images_matched", "images_ground_truth", "bbox": {...}, "segm": {...},
    "keypoints": {...}}: bbox and segm with AP, AP50, AP75, APs, APm, APl, AR1, AR10,
    AR100; keypoints (pycocotools' ``iouType="keypoints"``, OKS) with AP, AP50, AP75,
    APm, APl, AR, AR50, AR75, ARm, ARl. ``segm`` is left out for a keypoint-only
    model's rows (no masks), ``keypoints`` for a mask model's or when the ground truth
    has no category with ``keypoints``. keypoint_names: the model's (the file
    metadata's ``keypoint_names``), to match the ground truth's keypoints by name.
    """
    ids = match_images(rows, ground_truth["images"])
    results = coco_results(rows, ids, ground_truth.get("categories"), keypoint_names)
    kinds = ["bbox"]
    has_masks = any("segmentation" in r for r in results)
    has_keypoints = keypoint_names is not None or any("keypoints" in r for r in results)
    if has_masks or not has_keypoints:  # a mask model's rows (with no detections at all, too)
        kinds.append("segm")
    if has_keypoints and keypoint_category_ids(ground_truth):
        kinds.append("keypoints")
    return {
        "images_matched": len(ids),
        "images_ground_truth": len(ground_truth["images"]),
        **score(ground_truth, results, sorted(set(ids.values())), tuple(kinds)),
    }


def keypoint_category_ids(ground_truth: dict[str, Any]) -> list[int]:
    """The ground truth's categories that have keypoints (COCO: ``person``)."""
    return [c["id"] for c in ground_truth.get("categories") or [] if c.get("keypoints")]


def oks_sigmas(num_keypoints: int) -> np.ndarray:
    """Per-keypoint OKS sigmas: COCO's for 17 keypoints (pycocotools' own), else each
    keypoint COCO's mean sigma: pycocotools knows no others, and a uniform sigma
    scores every keypoint as an average body joint."""
    coco = Params(iouType="keypoints").kpt_oks_sigmas
    return coco if num_keypoints == len(coco) else np.full(num_keypoints, float(coco.mean()))


def score(
    ground_truth: dict[str, Any],
    results: list[dict[str, Any]],
    image_ids: list[int],
    kinds: tuple[str, ...] = ("bbox", "segm"),
) -> dict[str, dict[str, float]]:
    """COCOeval of ``results`` on the images ``image_ids``, per IoU type in ``kinds``
    (``bbox``, ``segm``, ``keypoints``): {"bbox": {...}, ...}."""
    gt = _coco_from_dict(ground_truth)
    out: dict[str, dict[str, float]] = {}
    for iou_type in kinds:
        names = KEYPOINT_AP_NAMES if iou_type == "keypoints" else AP_NAMES
        mine = [r for r in results if _IOU_FIELD[iou_type] in r]
        if not mine:
            out[iou_type] = {n: 0.0 for n in names}
            continue
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
            dt = gt.loadRes(json.loads(json.dumps(mine)))  # loadRes adds to what it is given
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = image_ids
            if iou_type == "keypoints":
                ev.params.catIds = keypoint_category_ids(ground_truth)
                ev.params.kpt_oks_sigmas = oks_sigmas(_keypoint_count(ground_truth, mine))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out[iou_type] = {n: max(float(v), 0.0) for n, v in zip(names, ev.stats)}
    return out


def _keypoint_count(ground_truth: dict[str, Any], results: list[dict[str, Any]]) -> int:
    """How many keypoints the results and the ground truth's keypoint categories both have."""
    counts = {len(r["keypoints"]) // 3 for r in results}
    counts |= {len(c["keypoints"]) for c in ground_truth.get("categories") or [] if c.get("keypoints")}
    if len(counts) > 1:
        raise EvaluationError(
            f"the results and the ground truth's categories have {sorted(counts)} keypoints: OKS needs the same "
            "keypoints on both sides; evaluate against ground truth of the model's keypoints"
        )
    return counts.pop()


_IOU_FIELD = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}


def _coco_from_dict(data: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(json.dumps(data))  # COCO mutates what it is given
    with_keypoints = set(keypoint_category_ids(data))
    for ann in coco.dataset.get("annotations", []):
        if ann.get("category_id") in with_keypoints and "num_keypoints" not in ann:
            # COCO's files always give it; pycocotools' keypoint eval needs it (0: the object is ignored)
            ann["num_keypoints"] = sum(1 for v in (ann.get("keypoints") or [])[2::3] if v > 0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
