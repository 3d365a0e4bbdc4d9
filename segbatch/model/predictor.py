"""A predictor that hides the plumbing: RGB arrays in, detection records out.

It runs torchvision's Mask R-CNN stage by stage (transform, backbone, RPN,
RoI heads as ``roi_heads.roi_heads_inference`` computes them) and stops before
``transform.postprocess`` pastes masks into full-image tensors; ``masks.py``
does that part over each box only. A Keypoint R-CNN runs the same way: its
RoI heads decode each detection's heatmaps over its own box, and only the
resize back to the original image (``resize_keypoints``, as
``transform.postprocess`` does) is left.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torchvision.models.detection.transform import resize_boxes, resize_keypoints

from segbatch.config import ModelConfig

from .keypoints import keypoint_detection_records
from .loading import LoadedModel
from .masks import detections_to_records
from .precision import effective_precision
from .roi_heads import roi_heads_inference

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_out_of_memory(exc: BaseException) -> bool:
    """The model ran out of memory (the GPU's, or the host's): smaller batches may fit."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


class Segmenter:
    """Segments batches of images with one resident model."""

    def __init__(self, loaded: LoadedModel, cfg: ModelConfig, channels_last: bool = False):
        self.loaded = loaded
        self.cfg = cfg
        self.device = loaded.device
        if cfg.precision == "fp16" and self.device.type == "cpu":
            # CPU fp16 kernels are slow or missing for several ops; bf16 is the CPU's half type.
            raise ValueError("--precision fp16 needs a GPU; on the CPU use --precision bf16")
        self.precision = effective_precision(cfg.precision, self.device, cfg.force_precision)
        self.channels_last = channels_last
        loaded.module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def free_cached_memory(self) -> None:
        """Hand the GPU memory torch caches back to the device, so that a retry after an
        out-of-memory error gets what the failed batch left in the cache."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _autocast(self):
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def to_tensor(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[H, W, 3] uint8 array (or a [3, H, W] uint8 tensor, as the GPU
        decoder gives) to [3, H, W] float in [0, 1] on the model's device.

        The copy to the GPU is made as uint8 (a quarter of the bytes), then
        converted there; not through ``pin_memory()``, which page-locks a
        fresh buffer (a system call) for every image. The result is contiguous
        whatever the input's layout, so both inputs give the same numbers
        (kernels for other strides round differently).
        """
        if isinstance(image, torch.Tensor):
            t = image.to(self.device)
        else:
            if not image.flags.writeable or not image.flags.c_contiguous:
                image = np.array(image)  # decode's arrays are read-only views of Pillow's buffer
            t = torch.from_numpy(image).permute(2, 0, 1).to(self.device)
        return t.contiguous().float().div_(255.0)

    @torch.inference_mode()
    def raw_detections(self, images: list[np.ndarray | torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The network's outputs before any pasting.

        Returns per image {"boxes": [N, 4] in original pixels, "labels": [N],
        "scores": [N], "masks": [N, 1, 28, 28] probabilities}; a Keypoint R-CNN's
        have "keypoints" [N, K, 3] (x, y, visibility) in original pixels and
        "keypoints_scores" [N, K] in place of "masks".
        """
        if not images:
            return []
        model = self.loaded.module
        tensors = [self.to_tensor(img) for img in images]
        original_sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]
        with self._autocast():
            batch, _ = model.transform(tensors)
            pixels = (
                batch.tensors.contiguous(memory_format=torch.channels_last) if self.channels_last else batch.tensors
            )
            features = model.backbone(pixels)
            proposals, _ = model.rpn(batch, features)
            # torchvision's detections, without NMS over every class of every proposal or a loop per keypoint detection
            detections = roi_heads_inference(model.roi_heads, features, proposals, batch.image_sizes)
        out = []
        for det, resized, original in zip(detections, batch.image_sizes, original_sizes):
            raw = {
                "boxes": resize_boxes(det["boxes"].float(), resized, original),
                "labels": det["labels"],
                "scores": det["scores"].float(),
            }
            if "masks" in det:
                raw["masks"] = det["masks"].float()
            if "keypoints" in det:
                raw["keypoints"] = resize_keypoints(det["keypoints"].float(), resized, original)
                raw["keypoints_scores"] = det["keypoints_scores"].float()
            out.append(raw)
        return out

    def records(self, raw: dict[str, torch.Tensor], image_size: tuple[int, int]) -> list[dict[str, Any]]:
        """One image's raw detections to the rows' ``detections`` structs."""
        if "masks" not in raw:
            return keypoint_detection_records(raw, self.loaded.classes)
        return detections_to_records(
            raw["boxes"].cpu(),
            raw["labels"].cpu(),
            raw["scores"].cpu(),
            raw["masks"].cpu(),
            image_size,
            self.cfg.mask_threshold,
            self.loaded.classes,
        )

    def segment(self, images: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """A batch of [H, W, 3] uint8 RGB images to their detection records."""
        raws = self.raw_detections(images)
        return [self.records(raw, img.shape[:2]) for raw, img in zip(raws, images)]
