"""The model: architectures, loading weights, the predictor, RoI heads, box-local masks and RLE, keypoints,
and image decoding (CPU and GPU JPEG). Runs in plain Python: no Ray here.
"""

from .arch import build_architecture
from .decode import DecodeError, DecodeInterrupted, decode_image, decode_peak_bytes, image_size
from .jpeg import JpegHeader, decode_jpegs, jpeg_header
from .keypoints import (
    COCO_KEYPOINT_NAMES,
    COCO_SKELETON,
    KeypointsError,
    keypoint_detection_records,
    keypoint_records,
    read_keypoint_names,
)
from .loading import (
    CHECKPOINT_FORMAT,
    ModelError,
    ModelSpec,
    build_model,
    hub_weights_path,
    load_hub_weights,
    load_model,
    parse_checkpoint,
    resolve_model,
)
from .masks import (
    box_mask_records,
    box_mask_runs,
    box_mask_to_rle,
    class_map,
    class_map_dtype,
    clip_box_mask,
    detections_to_records,
    encode_runs,
    label_name,
    paint_box_mask,
    paint_class_map,
    paste_box_masks,
    records_and_box_masks,
)
from .predictor import Segmenter, is_out_of_memory
from .roi_heads import batched_nms_top, heatmaps_to_keypoints, roi_heads_inference

__all__ = [
    "CHECKPOINT_FORMAT",
    "COCO_KEYPOINT_NAMES",
    "COCO_SKELETON",
    "KeypointsError",
    "keypoint_detection_records",
    "keypoint_records",
    "read_keypoint_names",
    "DecodeError",
    "DecodeInterrupted",
    "JpegHeader",
    "ModelError",
    "ModelSpec",
    "Segmenter",
    "batched_nms_top",
    "box_mask_records",
    "box_mask_runs",
    "box_mask_to_rle",
    "build_architecture",
    "build_model",
    "class_map",
    "class_map_dtype",
    "clip_box_mask",
    "decode_image",
    "decode_jpegs",
    "decode_peak_bytes",
    "detections_to_records",
    "encode_runs",
    "heatmaps_to_keypoints",
    "hub_weights_path",
    "image_size",
    "is_out_of_memory",
    "jpeg_header",
    "label_name",
    "load_hub_weights",
    "load_model",
    "paint_box_mask",
    "paint_class_map",
    "parse_checkpoint",
    "paste_box_masks",
    "records_and_box_masks",
    "resolve_model",
    "roi_heads_inference",
]
