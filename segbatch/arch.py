"""Mask R-CNN architectures segbatch knows how to build, by name.

A checkpoint names its architecture (or it is inferred from the state_dict's
keys), so loading one is: build the architecture, then load tensors into it.
No code is ever taken from a checkpoint.
"""

from __future__ import annotations

from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

ARCHITECTURES = ("resnet50_fpn", "resnet50_fpn_v2", "demo")


def build_architecture(arch: str, num_classes: int, **kwargs) -> MaskRCNN:
    """An untrained Mask R-CNN of the named architecture.

    kwargs go to torchvision's MaskRCNN (min_size, max_size,
    box_score_thresh, box_detections_per_img, ...).
    """
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
    if "roi_heads.box_head.fc6.weight" in keys and "backbone.body.layer4.2.conv3.weight" in keys:
        return "resnet50_fpn"
    if "roi_heads.box_head.5.weight" in keys or "rpn.head.conv.0.0.weight" in keys:
        return "resnet50_fpn_v2"
    raise ValueError(
        "cannot tell the architecture of this checkpoint from its keys; save it as "
        "{'arch': NAME, 'state_dict': ..., 'classes': [...]} with NAME one of " + ", ".join(ARCHITECTURES)
    )


def build_demo(num_classes: int, **kwargs) -> MaskRCNN:
    """A small Mask R-CNN (ResNet-18 FPN, narrow heads) that ships in the repository."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

    channels = 128
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5, returned_layers=[2, 3, 4])
    # narrow the FPN to `channels` outputs
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

    backbone.fpn = FeaturePyramidNetwork([128, 256, 512], channels, extra_blocks=LastLevelMaxPool())
    backbone.out_channels = channels
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    anchor_generator = AnchorGenerator(sizes=((32,), (64,), (128,), (256,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    box_roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    mask_roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=14, sampling_ratio=2)
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
