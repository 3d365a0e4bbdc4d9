"""Box and mask AP of a model (or a saved checkpoint) on a COCO dataset while training.

The model's outputs become the rows ``segbatch run`` writes (one per image,
detections from :func:`segbatch.model.box_mask_records`) and are scored by
:func:`segbatch.outputs.evaluate`, as ``segbatch eval`` scores a DEST: one
way of turning detections into COCO results and of matching them to the
ground truth, so AP while training is the AP a run of the checkpoint would get.
"""

from __future__ import annotations

import torch
from torch import nn

from segbatch.config import ModelConfig
from segbatch.model import box_mask_records, build_architecture, label_name
from segbatch.outputs import evaluate
from segbatch.storage import Storage

from .checkpoint import load_checkpoint
from .dataset import CocoInstances

# Soft masks thresholded as `segbatch run` thresholds them by default.
MASK_THRESHOLD = ModelConfig.mask_threshold


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    classes: list[str],
    data: str,
    max_images: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    storage: Storage | None = None,
) -> dict[str, float]:
    """Box and mask AP of ``model`` on the COCO dataset ``data`` (its first ``max_images`` images by id).

    ``classes``: the model's class names (index = label), matched to the
    dataset's categories by name. Returns ``{"mask_ap", "mask_ap50",
    "mask_ap75", "box_ap", "box_ap50", "box_ap75", "images"}`` (AP over IoU
    0.50:0.95, all areas, 100 detections). The model is left in the mode it came in.
    """
    dataset = CocoInstances(data, limit=max_images, storage=storage)
    inner = getattr(model, "module", model)  # unwrap DistributedDataParallel
    was_training = inner.training
    inner.eval()
    rows = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        outputs = inner([img.to(device) for img, _ in items])
        for info, (image, _), out in zip(dataset.images[start:], items, outputs):
            rows.append(_result_row(dataset.url_of(info), image.shape[-2:], out, classes))
    if was_training:
        inner.train()
    ids = {im["id"] for im in dataset.images}
    # The ground truth of the evaluated images only: pycocotools copies and indexes all it is given.
    ground_truth = {
        **dataset.coco,
        "images": dataset.images,
        "annotations": [a for a in dataset.coco["annotations"] if a["image_id"] in ids],
    }
    figures = evaluate(rows, ground_truth)
    stats: dict[str, float] = {"images": len(dataset)}
    for iou_type, key in (("segm", "mask"), ("bbox", "box")):
        f = figures[iou_type]
        stats.update({f"{key}_ap": f["AP"], f"{key}_ap50": f["AP50"], f"{key}_ap75": f["AP75"]})
    return stats


def evaluate_checkpoint(
    path: str, data: str, max_images: int | None = None, device: str = "cpu", storage: Storage | None = None
) -> dict[str, float]:
    """:func:`evaluate_model` for a saved ``segbatch-checkpoint-1``, at the input size stored in it."""
    ckpt = load_checkpoint(path, storage)
    model = build_architecture(ckpt["arch"], len(ckpt["classes"]), min_size=ckpt["min_size"], max_size=ckpt["max_size"])
    model.load_state_dict(ckpt["state_dict"])
    return evaluate_model(model.to(device), ckpt["classes"], data, max_images, device, storage=storage)


def _result_row(uri: str, size: tuple[int, int], out: dict[str, torch.Tensor], classes: list[str]) -> dict:
    """One image's model output as the row ``segbatch run`` writes for it.

    size: the image's (H, W); out: torchvision's eval output, ``boxes`` [N, 4],
    ``labels`` [N], ``scores`` [N], ``masks`` [N, 1, H, W] soft masks already
    pasted into the image, each handed to ``box_mask_records`` as a box mask
    over the whole image.
    """
    height, width = size
    binaries = (out["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy()
    labels = out["labels"].cpu().tolist()
    detections = box_mask_records(
        [(m, 0, 0) for m in binaries],
        labels,
        [label_name(classes, label) for label in labels],
        out["scores"].cpu().tolist(),
        out["boxes"].cpu().tolist(),
        height,
        width,
    )
    return {"uri": uri, "status": "ok", "detections": detections}
