"""A COCO instances dataset as torchvision's Mask R-CNN trains on it.

The dataset is a COCO instances JSON (``ground_truth.json``) whose images'
``file_name`` are relative to the folder holding the JSON. Both the JSON and
the images are read through :class:`segbatch.storage.Storage`, so ``data``
may be a local path or a URL (``s3://bucket/set/ground_truth.json``).
"""

from __future__ import annotations

import json
import os
import posixpath

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from segbatch.config import JobConfig, TrainError
from segbatch.model import DecodeError, decode_image
from segbatch.storage import Storage, join

# Largest image decoded for training: `segbatch run`'s --max-pixels default, so
# an image trained on is one inference would also take.
MAX_PIXELS = JobConfig.max_pixels


def read_coco(data: str, storage: Storage) -> dict:
    """The COCO JSON at ``data`` (a path or URL)."""
    return json.loads(storage.read_bytes(data))


def image_url(data: str, file_name: str) -> str:
    """An image's ``file_name`` relative to the folder of the JSON ``data`` (a path or URL);
    an absolute path or a URL is kept as it is."""
    if "://" in file_name or os.path.isabs(file_name):
        return file_name
    folder = posixpath.dirname(data)
    return join(folder, file_name) if folder else file_name  # a JSON in the working folder: names relative to it


def coco_classes(coco: dict) -> tuple[list[str], dict[int, int]]:
    """Class names (background first) and the map category id -> label.

    Labels are 1..K in the order of category id, so a dataset whose ids are
    already 1..K (as :mod:`segbatch.train.synth` writes) keeps them.
    """
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    return ["__background__"] + [c["name"] for c in cats], {c["id"]: i + 1 for i, c in enumerate(cats)}


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """A COCO annotation's ``segmentation`` (polygons, uncompressed or compressed RLE) as an
    ``height x width`` bool mask."""
    seg = ann["segmentation"]
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def _check_size(url: str, info: dict, height: int, width: int) -> None:
    """Refuse an image whose oriented size is not its COCO record's (when the record gives one)."""
    want = (info.get("width"), info.get("height"))
    if None in want or want == (width, height):
        return
    hint = ""
    if want == (height, width):
        hint = (
            " (the record has the stored, un-rotated size: its EXIF orientation turns it by 90 degrees;"
            " annotations must be in the oriented frame image viewers show, as COCO tools write them)"
        )
    raise TrainError(
        f"{url}: decoded as {width}x{height} after EXIF orientation, but its COCO image record "
        f"(id {info.get('id')}) says {want[0]}x{want[1]}{hint}"
    )


class CocoInstances(Dataset):
    """A COCO instances dataset as (image, target) pairs for torchvision's Mask R-CNN.

    ``image``: float32 ``3 x H x W`` in [0, 1]. ``target``: ``boxes``
    float32 ``N x 4`` (x1, y1, x2, y2), ``labels`` int64 ``N``, ``masks``
    uint8 ``N x H x W``, ``image_id`` int. Crowd annotations are skipped.
    ``storage`` reads the JSON and the images (a plain ``Storage()`` when None).
    """

    def __init__(
        self,
        data: str,
        train: bool = False,
        hflip: bool = False,
        limit: int | None = None,
        max_pixels: int = MAX_PIXELS,
        storage: Storage | None = None,
    ) -> None:
        self.data = data
        self.max_pixels = max_pixels
        self.storage = storage or Storage()
        self.coco = read_coco(data, self.storage)
        self.classes, self.label_of = coco_classes(self.coco)
        self.images = sorted(self.coco["images"], key=lambda im: im["id"])[:limit]
        self.anns: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in self.coco["annotations"]:
            if ann["image_id"] in self.anns and not ann.get("iscrowd", 0):
                self.anns[ann["image_id"]].append(ann)
        self.train = train
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.images[index]
        image = self._read_image(info)
        h, w = image.shape[:2]
        anns = self.anns[info["id"]]
        masks = np.stack([annotation_mask(a, h, w) for a in anns]) if anns else np.zeros((0, h, w), bool)
        labels = np.array([self.label_of[a["category_id"]] for a in anns], dtype=np.int64)
        if self.train and self.hflip and torch.rand(()) < 0.5:
            image, masks = image[:, ::-1], masks[:, :, ::-1]
        # Boxes from the masks, so they stay exact under flips.
        boxes = np.zeros((len(masks), 4), np.float32)
        keep = np.zeros(len(masks), bool)
        for i, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            if len(xs):
                boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                keep[i] = True
        target = {
            "boxes": torch.from_numpy(boxes[keep]),
            "labels": torch.from_numpy(labels[keep]),
            "masks": torch.from_numpy(np.ascontiguousarray(masks[keep]).astype(np.uint8)),
            "image_id": int(info["id"]),
        }
        # A writable copy: decode_image may hand back Pillow's read-only buffer.
        tensor = torch.from_numpy(np.array(image, order="C")).permute(2, 0, 1).float().div_(255)
        return tensor, target

    def url_of(self, info: dict) -> str:
        """The path or URL of the image of COCO image record ``info``."""
        return image_url(self.data, info["file_name"])

    def _read_image(self, info: dict) -> np.ndarray:
        """The record's image as ``segbatch run`` sees it: decoded by
        :func:`segbatch.model.decode_image`, EXIF orientation applied.

        Masks are drawn at the decoded size, so a record whose size differs
        would misplace them: refused, naming the file.
        """
        url = self.url_of(info)
        data = self.storage.read_bytes(url)
        try:
            image = decode_image(data, max_pixels=self.max_pixels)
        except DecodeError as exc:
            raise TrainError(f"{url}: {exc}") from None
        _check_size(url, info, image.shape[0], image.shape[1])
        return image


def collate(batch: list) -> tuple:
    """Lists of images and targets: Mask R-CNN takes images of varied sizes."""
    return tuple(zip(*batch))
