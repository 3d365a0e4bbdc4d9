"""Mask R-CNN (and Keypoint R-CNN) architectures segbatch knows how to build, by name.

A checkpoint names its architecture (or it is inferred from the state_dict's
keys), so loading one is: build the architecture, then load tensors into it.
No code is ever taken from a checkpoint.
"""

from __future__ import annotations

from torchvision.models.detection import (
    KeypointRCNN,
    MaskRCNN,
    keypointrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)

from segbatch.config import ARCHITECTURES

KEYPOINT_ARCHITECTURES = ("keypoint_resnet50_fpn",)  # those with a keypoint head and no mask head


def build_architecture(
    arch: str, num_classes: int, num_keypoints: int | None = None, **kwargs
) -> MaskRCNN | KeypointRCNN:
    """An untrained Mask R-CNN (or Keypoint R-CNN) of the named architecture.

    kwargs go to torchvision's MaskRCNN or KeypointRCNN (min_size, max_size,
    box_score_thresh, box_detections_per_img, ...); num_keypoints is for
    keypoint architectures only (17, COCO's, when None).
    """
    if arch == "keypoint_resnet50_fpn":
        return keypointrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=num_classes, num_keypoints=num_keypoints or 17, **kwargs
        )
    if arch == "resnet50_fpn":
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    if arch == "resnet50_fpn_v2":
        return maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    if arch == "demo":
        return build_demo(num_classes, **kwargs)
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def infer_architecture(state_dict_keys) -> str:
    """The architecture of a plain torchvision state_dict, from its keys."""
    keys = set(state_dict_keys)
    if "roi_heads.keypoint_predictor.kps_score_lowres.weight" in keys:
        if "roi_heads.box_head.fc6.weight" in keys and "backbone.body.layer4.2.conv3.weight" in keys:
            return "keypoint_resnet50_fpn"
        raise ValueError("this Keypoint R-CNN state_dict is not torchvision's keypointrcnn_resnet50_fpn")
    if "roi_heads.box_head.fc6.weight" in keys and "backbone.body.layer4.2.conv3.weight" in keys:
        return "resnet50_fpn"
    # v2's conv box head and two-conv RPN head (every current Mask R-CNN has rpn.head.conv.0.0).
    if "roi_heads.box_head.5.weight" in keys or "rpn.head.conv.1.0.weight" in keys:
        return "resnet50_fpn_v2"
    # The fix (segbatch's own checkpoint format) is named by model.parse_checkpoint, which knows that format.
    raise ValueError(
        "cannot tell the architecture of this state_dict from its keys "
        "(torchvision's resnet50_fpn, resnet50_fpn_v2 and keypoint_resnet50_fpn are recognised)"
    )


def build_demo(num_classes: int, **kwargs) -> MaskRCNN:
    """A small Mask R-CNN that ships in the repository, trainable from scratch on a CPU.

    Backbone: ResNet-18's stem and layers 1-3 (layer 4 holds 8.4M of its
    11.7M parameters and adds a stride-32 level that small objects do not
    need) with trainable BatchNorm (frozen BatchNorm, torchvision's default,
    would never learn statistics from scratch). FPN of 96 channels on strides
    4/8/16 plus a max-pooled stride-32 level. Narrow heads: a 256-wide box MLP
    and a 4-conv, 96-channel mask head. About 4.8M parameters (9.7 MB as
    float16). Inputs of 256-320 pixels; anchors 16-128 pixels.

    kwargs go to torchvision's MaskRCNN; the RPN and RoI sampling sizes below
    are defaults that keep CPU training and inference fast, and any of them
    can be overridden.
    """
    from torch import nn
    from torchvision.models import resnet18
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.ops import MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    channels = 96
    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2"},
        in_channels_list=[64, 128, 256],
        out_channels=channels,
        extra_blocks=LastLevelMaxPool(),
    )
    # One anchor size per level ("0", "1", "2", "pool"), three aspect ratios.
    anchor_generator = AnchorGenerator(sizes=((16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    box_roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
    mask_roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=14, sampling_ratio=2)
    for key, value in (
        ("rpn_pre_nms_top_n_train", 1000),
        ("rpn_post_nms_top_n_train", 500),
        ("rpn_pre_nms_top_n_test", 500),
        ("rpn_post_nms_top_n_test", 300),
        ("box_batch_size_per_image", 128),
    ):
        kwargs.setdefault(key, value)
    return MaskRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchor_generator,
        box_roi_pool=box_roi_pool,
        box_head=TwoMLPHead(channels * 7 * 7, 256),
        box_predictor=_box_predictor(256, num_classes),
        mask_roi_pool=mask_roi_pool,
        mask_head=MaskRCNNHeads(channels, [channels] * 4, 1),
        mask_predictor=_mask_predictor(channels, num_classes),
        **kwargs,
    )


def _box_predictor(in_channels: int, num_classes: int):
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    return FastRCNNPredictor(in_channels, num_classes)


def _mask_predictor(in_channels: int, num_classes: int):
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    return MaskRCNNPredictor(in_channels, in_channels, num_classes)
