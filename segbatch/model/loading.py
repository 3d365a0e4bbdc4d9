"""Building and loading Mask R-CNN: coco, coco-v2, demo, random, checkpoints;
and Keypoint R-CNN: keypoint-coco, keypoint-random, checkpoints.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors and
plain containers only, never code. Accepted forms:

- segbatch's own: ``{"format": "segbatch-checkpoint-1", "arch", "classes",
  "min_size", "max_size", "state_dict"}`` (what ``segbatch train`` writes),
  and for Keypoint R-CNN optionally ``"keypoint_names"`` and ``"skeleton"``
  (0-based [i, j] pairs);
- torchvision's reference scripts: ``{"model": state_dict, ...}``;
- a bare torchvision Mask R-CNN or Keypoint R-CNN ``state_dict``.

A keypoint model's names come from ``--keypoints FILE``, else the checkpoint,
else COCO's when it has 17 keypoints (torchvision's reference scripts train
COCO's), else ``keypoint_0``...; its skeleton from the checkpoint, else COCO's
when the names are COCO's, else none.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from segbatch.config import ModelConfig
from segbatch.errors import UsageError

from .arch import ARCHITECTURES, KEYPOINT_ARCHITECTURES, build_architecture, infer_architecture
from .keypoints import COCO_KEYPOINT_NAMES, KeypointsError, check_skeleton, default_skeleton, read_keypoint_names

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "segbatch-checkpoint-1"
DEFAULT_SIZES = (800, 1333)


class ModelError(UsageError, RuntimeError):
    """The model cannot be built or loaded; the message says how to fix it."""


@dataclass
class LoadedModel:
    """A Mask R-CNN ready for inference, with what the output rows need."""

    module: nn.Module
    classes: list[str]  # index = label; 0 is the background
    model_id: str  # "coco", "demo", or the checkpoint's URI
    weights_hash: str
    min_size: int
    max_size: int
    device: torch.device
    keypoint_names: list[str] | None = None  # a Keypoint R-CNN's, in its order; None for Mask R-CNN


def resolve_device(requested: str) -> torch.device:
    """``auto`` is the GPU when the process has one, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but torch sees no GPU here; use --device cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass
class ModelSpec:
    """Everything needed to build the model, resolved once by the driver and
    shipped to the workers (so no worker downloads or re-reads weights)."""

    model_id: str
    arch: str
    state_dict: dict[str, torch.Tensor] | None  # None: seeded random weights
    classes: list[str]
    min_size: int
    max_size: int
    weights_hash: str
    seed: int = 0
    keypoint_names: list[str] | None = None  # a Keypoint R-CNN's, in its order; None for Mask R-CNN
    skeleton: list[list[int]] | None = None  # 0-based [i, j] pairs into keypoint_names; None: not known

    def result_fields(self, cfg: ModelConfig) -> dict:
        """What determines the rows: recorded in DEST and every file's metadata.
        (Keypoint names only for keypoint models, so Mask R-CNN's result keys stay as they were.)"""
        fields = {
            **cfg.result_fields(),
            "min_size": self.min_size,
            "max_size": self.max_size,
            "weights_hash": self.weights_hash,
            "classes": self.classes,
        }
        if self.keypoint_names is not None:
            fields["keypoint_names"] = self.keypoint_names
        return fields


def resolve_model(cfg: ModelConfig, read_bytes=None) -> ModelSpec:
    """Find the weights and classes ``cfg.model`` names, checking they fit.

    read_bytes: ``url -> bytes`` for checkpoints and class files (segbatch's
    Storage, so object storage URLs and storage options work).
    """
    read_bytes = read_bytes or _read_local
    name = cfg.model
    extras: dict = {}
    if name in ("coco", "coco-v2", "keypoint-coco"):
        arch, state_dict, classes, sizes, weights_hash = _torchvision_weights(name)
        if name == "keypoint-coco":
            extras = {"keypoint_names": list(COCO_KEYPOINT_NAMES)}
    elif name == "random":
        arch, state_dict, classes, sizes = "resnet50_fpn", None, _coco_categories(), DEFAULT_SIZES
        weights_hash = f"random-seed{cfg.seed}"
    elif name == "keypoint-random":  # seeded random Keypoint R-CNN weights: tests and offline smoke runs
        arch, state_dict, classes, sizes = "keypoint_resnet50_fpn", None, _keypoint_categories(), DEFAULT_SIZES
        weights_hash = f"keypoint-random-seed{cfg.seed}"
        extras = {"keypoint_names": list(COCO_KEYPOINT_NAMES)}
    else:
        data = _demo_bytes() if name == "demo" else _read_checkpoint(read_bytes, name)
        arch, state_dict, classes, sizes, extras = _parse_checkpoint(data, source=name)
        weights_hash = hashlib.sha256(data).hexdigest()[:16]

    num_classes = (
        int(state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0]) if state_dict is not None else len(classes)
    )
    if cfg.classes:
        classes = read_class_names(read_bytes(cfg.classes).decode("utf-8"), source=cfg.classes)
    if classes is None:
        classes = ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]
    if len(classes) != num_classes:
        raise ModelError(
            f"the model has {num_classes} classes (background included) but "
            f"{cfg.classes or 'its class list'} names {len(classes)}; give a --classes file "
            f"with {num_classes} lines, line 0 the background"
        )
    keypoint_names, skeleton = _resolve_keypoints(cfg, arch, state_dict, extras, read_bytes, name)
    if state_dict is not None:  # the shipped demo stores fp16 to stay small
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    return ModelSpec(
        model_id=name,
        arch=arch,
        state_dict=state_dict,
        classes=classes,
        min_size=cfg.min_size or sizes[0],
        max_size=cfg.max_size or sizes[1],
        weights_hash=weights_hash,
        seed=cfg.seed,
        keypoint_names=keypoint_names,
        skeleton=skeleton,
    )


def _resolve_keypoints(cfg: ModelConfig, arch: str, state_dict, extras: dict, read_bytes, source: str):
    """(keypoint names, skeleton) of a keypoint model, checked against its head; (None, None) for Mask R-CNN."""
    if arch not in KEYPOINT_ARCHITECTURES:
        if cfg.keypoints:
            raise ModelError(
                f"--keypoints names keypoints, but {source} is a Mask R-CNN ({arch}) with no keypoint head; "
                "leave --keypoints out, or give a Keypoint R-CNN: --model keypoint-coco or its checkpoint"
            )
        return None, None
    if state_dict is not None:
        num = int(state_dict["roi_heads.keypoint_predictor.kps_score_lowres.weight"].shape[1])
    else:
        num = len(extras.get("keypoint_names") or COCO_KEYPOINT_NAMES)
    names = extras.get("keypoint_names")
    if cfg.keypoints:
        names = read_keypoint_names(read_bytes(cfg.keypoints).decode("utf-8"), source=cfg.keypoints)
    elif names is None:
        names = list(COCO_KEYPOINT_NAMES) if num == len(COCO_KEYPOINT_NAMES) else [f"keypoint_{i}" for i in range(num)]
    names = list(names)
    if len(names) != num:
        raise ModelError(
            f"the model has {num} keypoints but {cfg.keypoints or 'its keypoint list'} names {len(names)}; "
            f"give a --keypoints file with {num} lines, one name a line in the model's order"
        )
    try:
        skeleton = extras.get("skeleton")
        skeleton = check_skeleton(skeleton, num, source) if skeleton is not None else default_skeleton(names)
    except KeypointsError as exc:
        raise ModelError(str(exc)) from None
    return names, skeleton


def build_model(spec: ModelSpec, cfg: ModelConfig) -> LoadedModel:
    """The module for ``spec``, in eval mode, on the device ``cfg.device`` resolves to."""
    if spec.state_dict is None:
        torch.manual_seed(spec.seed)  # seeded weights: the same model in every process
    keypoints = {"num_keypoints": len(spec.keypoint_names)} if spec.keypoint_names is not None else {}
    module = build_architecture(
        spec.arch,
        len(spec.classes),
        **keypoints,
        min_size=spec.min_size,
        max_size=spec.max_size,
        box_score_thresh=cfg.score_threshold,
        box_detections_per_img=cfg.max_detections,
    )
    if spec.state_dict is not None:
        missing, unexpected = module.load_state_dict(spec.state_dict, strict=False)
        if missing or unexpected:
            raise ModelError(
                f"checkpoint {spec.model_id} does not fit architecture {spec.arch}: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
    device = resolve_device(cfg.device)
    module.eval().to(device)
    return LoadedModel(
        module,
        spec.classes,
        spec.model_id,
        spec.weights_hash,
        spec.min_size,
        spec.max_size,
        device,
        spec.keypoint_names,
    )


def load_model(cfg: ModelConfig, read_bytes=None) -> LoadedModel:
    """resolve_model then build_model, in one process."""
    return build_model(resolve_model(cfg, read_bytes), cfg)


def parse_checkpoint(data: bytes, source: str = "checkpoint"):
    """Checkpoint bytes to (arch, state_dict, classes or None, (min_size, max_size))."""
    return _parse_checkpoint(data, source)[:4]


def _parse_checkpoint(data: bytes, source: str = "checkpoint"):
    """``parse_checkpoint``'s answer, and a dict of what a keypoint checkpoint of segbatch's
    format adds (``keypoint_names``, ``skeleton``; empty when it has none)."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, disallowed globals
        raise ModelError(
            f"cannot load checkpoint {source} as tensors only ({type(exc).__name__}: {str(exc)[:300]}); "
            "segbatch never runs code from a checkpoint: save a state_dict with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(obj, dict):
        raise ModelError(f"checkpoint {source} holds a {type(obj).__name__}, not a state_dict")
    if obj.get("format") == CHECKPOINT_FORMAT:
        sizes = (int(obj.get("min_size") or DEFAULT_SIZES[0]), int(obj.get("max_size") or DEFAULT_SIZES[1]))
        extras = {k: obj[k] for k in ("keypoint_names", "skeleton") if obj.get(k) is not None}
        if "keypoint_names" in extras:
            extras["keypoint_names"] = [str(n) for n in extras["keypoint_names"]]
        classes = list(obj["classes"]) if obj.get("classes") else None
        return obj["arch"], obj["state_dict"], classes, sizes, extras
    state_dict = obj["model"] if isinstance(obj.get("model"), dict) else obj
    if "roi_heads.box_predictor.cls_score.weight" not in state_dict:
        raise ModelError(
            f"checkpoint {source} is not a Mask R-CNN or Keypoint R-CNN state_dict (no roi_heads.box_predictor weights)"
        )
    try:
        arch = infer_architecture(state_dict.keys())
    except ValueError as exc:
        raise ModelError(
            f"checkpoint {source}: {exc}; save it as {{'format': '{CHECKPOINT_FORMAT}', 'arch': NAME, "
            f"'state_dict': STATE_DICT, 'classes': [NAMES] (optional), 'min_size': INT, 'max_size': INT (optional)}} "
            f"with NAME one of {', '.join(ARCHITECTURES)}"
        ) from None
    return arch, state_dict, None, DEFAULT_SIZES, {}


def read_class_names(text: str, source: str = "--classes") -> list[str]:
    """A class file: one name a line, line 0 the background; blank trailing lines ignored."""
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if len(names) < 2:
        raise ModelError(
            f"{source} names {len(names)} classes; it needs the background on line 0 and at least one class"
        )
    return names


def _coco_categories() -> list[str]:
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    return list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def _keypoint_categories() -> list[str]:
    from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights

    return list(KeypointRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def _torchvision_weights(name: str):
    from torchvision.models.detection import (
        KeypointRCNN_ResNet50_FPN_Weights,
        MaskRCNN_ResNet50_FPN_V2_Weights,
        MaskRCNN_ResNet50_FPN_Weights,
    )

    weights, arch = {
        "coco": (MaskRCNN_ResNet50_FPN_Weights.COCO_V1, "resnet50_fpn"),
        "coco-v2": (MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1, "resnet50_fpn_v2"),
        "keypoint-coco": (KeypointRCNN_ResNet50_FPN_Weights.COCO_V1, "keypoint_resnet50_fpn"),
    }[name]
    # Never weights.get_state_dict(): it unpickles the cached file with weights_only=False, unchecked.
    path = hub_weights_path(weights.url)
    if not path.exists():
        _download_weights(weights.url, path, name)
    state_dict = load_hub_weights(path, name)
    weights_hash = expected_hash_prefix(path.name)  # checked against the file by load_hub_weights
    return arch, state_dict, list(weights.meta["categories"]), DEFAULT_SIZES, weights_hash


def hub_weights_path(url: str) -> Path:
    """Where torch.hub keeps the file of ``url`` (``$TORCH_HOME/hub/checkpoints/NAME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def expected_hash_prefix(file_name: str) -> str:
    """The SHA-256 prefix torchvision puts in its files' names (``NAME-HEX.pth``)."""
    match = torch.hub.HASH_REGEX.search(file_name)
    if not match or not match.group(1):
        raise ModelError(f"{file_name} carries no hash in its name (NAME-HEX.pth); cannot check it")
    return match.group(1)


def load_hub_weights(path: Path, name: str = "torchvision") -> dict[str, torch.Tensor]:
    """A torchvision weights file: its SHA-256 checked against the hex in its
    name, then read as tensors only (``weights_only=True``), so a corrupt or
    planted file is refused and no code in it ever runs."""
    expected = expected_hash_prefix(path.name)
    fix = (
        f"delete {path} and run again to download it, or copy the file of that name from a machine with "
        "internet access (torchvision downloads it there on first use)"
    )
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(expected):
        raise ModelError(
            f"{name} weights file {path} is corrupt or not torchvision's: its SHA-256 starts "
            f"{digest[: len(expected)]}, its name says {expected}; {fix}"
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, a truncated zip
        raise ModelError(
            f"cannot load {name} weights file {path} as tensors only ({type(exc).__name__}: {str(exc)[:200]}); {fix}"
        ) from None


def _download_weights(url: str, path: Path, name: str) -> None:
    """Download to ``path``, checked against the hash in its name before it lands
    there (torch.hub writes a temporary file and moves it once it matches)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=expected_hash_prefix(path.name), progress=False)
    except Exception as exc:  # URLError, socket errors, HTTP errors, a hash mismatch
        raise ModelError(
            f"cannot download torchvision's {name} weights from {url} ({type(exc).__name__}: {str(exc)[:200]}); "
            f"without internet access here, download that URL on a machine that has it and copy the file to {path}, "
            "or pass a checkpoint: --model PATH_OR_URI [--classes FILE], or use --model demo"
        ) from None


def _demo_bytes() -> bytes:
    path = resources.files("segbatch") / "assets" / "demo.pt"
    if not path.is_file():
        raise ModelError(
            "the demo model is missing from this installation (segbatch/assets/demo.pt); reinstall segbatch"
        )
    return path.read_bytes()


def _read_checkpoint(read_bytes, uri: str) -> bytes:
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        raise ModelError(
            f"--model {uri}: no such checkpoint. Use coco, coco-v2, keypoint-coco, demo, random, "
            "or a path/URI of a state_dict"
        ) from None


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
