"""Checkpoints: writing and reading ``segbatch-checkpoint-1``, and the model a run starts from.

Checkpoints are plain dicts of tensors, strings and ints, written with
``torch.save`` and read with ``torch.load(weights_only=True)``::

    {"format": "segbatch-checkpoint-1", "arch": str, "classes": [str, ...],
     "min_size": int, "max_size": int, "state_dict": {name: tensor}}

``classes[0]`` is the background. Floating-point tensors may be stored as
float16 (``half=True``; the shipped demo model is) to halve the file;
:func:`load_checkpoint` casts them back to float32. Every read and write goes
through :class:`segbatch.storage.Storage` (a plain ``Storage()`` when none is given).
"""

from __future__ import annotations

import io
import logging
from dataclasses import replace

import torch
from torch import nn

from segbatch.config import TrainConfig, TrainError
from segbatch.model import CHECKPOINT_FORMAT, ModelError, build_architecture, parse_checkpoint
from segbatch.storage import Storage

log = logging.getLogger(__name__)


def _as_float32(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with every floating-point tensor as float32 (a half checkpoint trains and loads in float32)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}


def save_checkpoint(
    model: nn.Module,
    arch: str,
    classes: list[str],
    path: str,
    min_size: int,
    max_size: int,
    half: bool = False,
    storage: Storage | None = None,
) -> str:
    """Write ``model``'s weights as a ``segbatch-checkpoint-1`` to ``path`` (local or URL).

    With ``half``, floating-point tensors are stored as float16. The file is
    whole or absent (``Storage.write_bytes``): a reader of a checkpoint
    rewritten every epoch never sees a part.
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if half and tensor.is_floating_point():
            tensor = tensor.half()
        state[name] = tensor.clone()
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "classes": list(classes),
        "min_size": int(min_size),
        "max_size": int(max_size),
        "state_dict": state,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    (storage or Storage()).write_bytes(path, buf.getvalue())
    return path


def load_checkpoint(path: str, storage: Storage | None = None) -> dict:
    """Read a ``segbatch-checkpoint-1`` (no code is run: ``weights_only=True``).

    Returns the checkpoint dict with every floating-point tensor of its
    ``state_dict`` as float32.
    """
    data = (storage or Storage()).read_bytes(path)
    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    ckpt["state_dict"] = _as_float32(ckpt["state_dict"])
    return ckpt


def read_init(path: str, storage: Storage | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """The architecture and float32 state_dict of an ``--init`` checkpoint, in
    any form ``segbatch run --model`` takes (see :mod:`segbatch.model.loading`)."""
    try:
        data = (storage or Storage()).read_bytes(path)
    except FileNotFoundError:
        raise ModelError(f"--init {path}: no such checkpoint") from None
    arch, state_dict, _, _ = parse_checkpoint(data, source=path)
    return arch, _as_float32(state_dict)


def resolve_arch(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its architecture settled: the ``--init`` checkpoint's when
    ``cfg.arch`` is None, else ``cfg.arch`` (refused if the checkpoint's differs:
    none of its tensors would load and training would silently start from scratch).
    Keypoint R-CNN is refused: segbatch trains on masks, and its keypoint head would learn nothing."""
    from segbatch.model.arch import KEYPOINT_ARCHITECTURES

    if cfg.arch in KEYPOINT_ARCHITECTURES:
        raise TrainError(
            f"segbatch train trains Mask R-CNN only, not {cfg.arch}; train Keypoint R-CNN with torchvision's "
            "reference scripts and run it with --model CHECKPOINT [--keypoints FILE]"
        )
    if not cfg.init:
        return replace(cfg, arch=cfg.arch or "demo")
    arch, _ = read_init(cfg.init, Storage(cfg.storage_options))
    if arch in KEYPOINT_ARCHITECTURES:
        return resolve_arch(replace(cfg, arch=arch))
    if cfg.arch and cfg.arch != arch:
        raise TrainError(
            f"--init {cfg.init} holds a {arch} model but --arch is {cfg.arch}; leave out --arch (or give --arch {arch})"
        )
    return replace(cfg, arch=arch)


def build_trainable_model(cfg: TrainConfig, classes: list[str]) -> nn.Module:
    """The model a training run starts from: the architecture ``cfg.arch`` for
    ``classes``, with the tensors of ``cfg.init`` that fit (when given).

    Tensors of ``init`` whose shape differs (the class-specific predictors,
    when the class list changed) are left at their fresh initialisation; how
    many loaded is logged, and an ``init`` none of whose tensors fit is refused.
    (:func:`segbatch.model.build_model` is inference's: every tensor must fit there.)
    """
    arch = cfg.arch or "demo"
    model = build_architecture(arch, len(classes), min_size=cfg.min_size, max_size=cfg.max_size, **cfg.extra)
    if cfg.init:
        _, init_state = read_init(cfg.init, Storage(cfg.storage_options))
        own = model.state_dict()
        state = {k: v for k, v in init_state.items() if k in own and own[k].shape == v.shape}
        if not state:
            raise TrainError(f"none of the {len(init_state)} tensors of --init {cfg.init} fit architecture {arch}")
        model.load_state_dict(state, strict=False)
        log.info(
            "--init %s: loaded %d of the model's %d tensors, %d of the checkpoint's skipped (names or shapes differ)",
            *(cfg.init, len(state), len(own), len(init_state) - len(state)),
        )
    return model
