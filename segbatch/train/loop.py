"""Training a Mask R-CNN on a COCO-format dataset, locally or with Ray Train.

The dataset is a COCO instances JSON (``ground_truth.json``) whose images'
``file_name`` are relative to the folder holding the JSON. Both the JSON and
the images are read through ``fsspec``, so ``data`` may be a local path or a
URL (``s3://bucket/set/ground_truth.json``).

Checkpoints (``segbatch-checkpoint-1``) are plain dicts of tensors, strings
and ints, written with ``torch.save`` and read with
``torch.load(weights_only=True)``::

    {"format": "segbatch-checkpoint-1", "arch": str, "classes": [str, ...],
     "min_size": int, "max_size": int, "state_dict": {name: tensor}}

``classes[0]`` is the background. Floating-point tensors may be stored as
float16 (``half=True``; the shipped demo model is) to halve the file;
:func:`load_checkpoint` casts them back to float32.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import fsspec
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import nn
from torch.utils.data import DataLoader, Dataset

from segbatch.errors import UsageError
from segbatch.model import build_architecture
from segbatch.config import JobConfig
from segbatch.model import DecodeError, decode_image
from segbatch.model import CHECKPOINT_FORMAT, ModelError, parse_checkpoint

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]

# Largest image decoded for training: `segbatch run`'s --max-pixels default, so
# an image trained on is one inference would also take.
MAX_PIXELS = JobConfig.max_pixels


class TrainError(UsageError, ValueError):
    """The training run cannot be set up as asked; the message says what to change."""


@dataclass
class TrainConfig:
    """What :func:`train` and :func:`train_distributed` need.

    ``workers`` is the number of Ray Train workers (``train_distributed``
    only); ``loader_workers`` the DataLoader processes of each.
    """

    data: str  # path/URL of the COCO ground-truth JSON
    out: str  # path/URL of the checkpoint to write
    arch: str | None = None  # None: the --init checkpoint's, else "demo"
    epochs: int = 10
    batch_size: int = 4
    lr: float = 6e-4  # AdamW peak learning rate
    min_size: int = 256
    max_size: int = 320
    workers: int = 1
    use_gpu: bool = False
    seed: int = 0
    init: str | None = None  # checkpoint to start from
    weight_decay: float = 1e-4
    warmup_steps: int = 300
    clip_grad_norm: float = 5.0
    max_steps: int | None = None  # stop early (tests, smoke runs)
    time_budget_s: float | None = None  # fit the run (and its learning-rate schedule) into this many seconds
    loader_workers: int = 0
    hflip: bool = True  # random horizontal flips while training
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    half: bool = False  # store float tensors as float16
    eval_data: str | None = None  # COCO JSON to measure mask/box AP on
    eval_every: int = 0  # steps; 0: at the end of each epoch (when eval_data)
    eval_images: int = 50
    threads: int | None = None  # torch.set_num_threads for this process
    storage_path: str | None = None  # Ray Train run storage (shared by all nodes)
    extra: dict = field(default_factory=dict)  # kwargs for the MaskRCNN constructor


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    model: nn.Module,
    arch: str,
    classes: list[str],
    path: str,
    min_size: int,
    max_size: int,
    half: bool = False,
) -> str:
    """Write ``model``'s weights as a ``segbatch-checkpoint-1`` to ``path`` (local or URL).

    With ``half``, floating-point tensors are stored as float16. A local file
    is written to a temporary name and renamed, so it is whole or absent.
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
    if "://" not in path or path.startswith("file://"):
        local = path[len("file://") :] if path.startswith("file://") else path
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        tmp = f"{local}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, local)
    else:
        with fsspec.open(path, "wb") as f:
            f.write(buf.getvalue())
    return path


def load_checkpoint(path: str) -> dict:
    """Read a ``segbatch-checkpoint-1`` (no code is run: ``weights_only=True``).

    Returns the checkpoint dict with every floating-point tensor of its
    ``state_dict`` as float32.
    """
    with fsspec.open(path, "rb") as f:
        ckpt = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    ckpt["state_dict"] = {
        k: (v.float() if v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()
    }
    return ckpt


# ----------------------------------------------------------------------------- data


def _read_json(url: str) -> dict:
    with fsspec.open(url, "r") as f:
        return json.load(f)


def _join(base: str, name: str) -> str:
    """``name`` relative to the folder of ``base`` (a path or URL)."""
    if "://" in name or os.path.isabs(name):
        return name
    return posixpath.join(posixpath.dirname(base), name) if "://" in base else os.path.join(os.path.dirname(base), name)


def coco_classes(coco: dict) -> tuple[list[str], dict[int, int]]:
    """Class names (background first) and the map category id -> label.

    Labels are 1..K in the order of category id, so a dataset whose ids are
    already 1..K (as :mod:`segbatch.train.synth` writes) keeps them.
    """
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    return ["__background__"] + [c["name"] for c in cats], {c["id"]: i + 1 for i, c in enumerate(cats)}


def _ann_mask(ann: dict, height: int, width: int) -> np.ndarray:
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
        hint = (" (the record has the stored, un-rotated size: its EXIF orientation turns it by 90 degrees;"
                " annotations must be in the oriented frame image viewers show, as COCO tools write them)")  # fmt: skip
    raise TrainError(
        f"{url}: decoded as {width}x{height} after EXIF orientation, but its COCO image record "
        f"(id {info.get('id')}) says {want[0]}x{want[1]}{hint}"
    )


class CocoInstances(Dataset):
    """A COCO instances dataset as (image, target) pairs for torchvision's Mask R-CNN.

    ``image``: float32 ``3 x H x W`` in [0, 1]. ``target``: ``boxes``
    float32 ``N x 4`` (x1, y1, x2, y2), ``labels`` int64 ``N``, ``masks``
    uint8 ``N x H x W``, ``image_id`` int. Crowd annotations are skipped.
    """

    def __init__(
        self, data: str, train: bool = False, hflip: bool = False, limit: int | None = None, max_pixels: int = MAX_PIXELS
    ) -> None:
        self.data = data
        self.max_pixels = max_pixels
        self.coco = _read_json(data)
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
        masks = np.stack([_ann_mask(a, h, w) for a in anns]) if anns else np.zeros((0, h, w), bool)
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

    def _read_image(self, info: dict) -> np.ndarray:
        """The record's image as ``segbatch run`` sees it: decoded by
        :func:`segbatch.model.decode.decode_image`, EXIF orientation applied.

        Masks are drawn at the decoded size, so a record whose size differs
        would misplace them: refused, naming the file.
        """
        url = _join(self.data, info["file_name"])
        with fsspec.open(url, "rb") as f:
            data = f.read()
        try:
            image = decode_image(data, max_pixels=self.max_pixels)
        except DecodeError as exc:
            raise TrainError(f"{url}: {exc}") from None
        _check_size(url, info, image.shape[0], image.shape[1])
        return image


def collate(batch: list) -> tuple:
    """Lists of images and targets: Mask R-CNN takes images of varied sizes."""
    return tuple(zip(*batch))


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    classes: list[str],
    data: str,
    max_images: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
) -> dict[str, float]:
    """Box and mask AP of ``model`` on a COCO dataset, with :mod:`segbatch.outputs.evaluation`.

    ``classes``: the model's class names (index = label), matched to the
    dataset's categories by name. Returns ``{"mask_ap", "mask_ap50",
    "mask_ap75", "box_ap", "box_ap50", "box_ap75", "images"}`` (AP over IoU
    0.50:0.95, all areas, 100 detections).
    """
    from segbatch.outputs import evaluation as coco_eval

    dataset = CocoInstances(data, limit=max_images)
    inner = getattr(model, "module", model)
    was_training = inner.training
    inner.eval()
    rows = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        outputs = inner([img.to(device) for img, _ in items])
        rows += [_as_row(target["image_id"], out, classes) for (_, target), out in zip(items, outputs)]
    if was_training:
        inner.train()
    ids = {im["id"] for im in dataset.images}
    gt_json = {
        **dataset.coco,
        "images": dataset.images,
        "annotations": [a for a in dataset.coco["annotations"] if a["image_id"] in ids],
    }
    results = coco_eval.coco_results(rows, {r["uri"]: r["image_id"] for r in rows}, dataset.coco["categories"])
    figures = coco_eval.score(gt_json, results, sorted(ids))
    stats: dict[str, float] = {"images": len(dataset)}
    for iou_type, key in (("segm", "mask"), ("bbox", "box")):
        f = figures[iou_type]
        stats.update({f"{key}_ap": f["AP"], f"{key}_ap50": f["AP50"], f"{key}_ap75": f["AP75"]})
    return stats


def _as_row(image_id: int, out: dict[str, torch.Tensor], classes: list[str]) -> dict:
    """One image's model output as a result row (what :mod:`segbatch.outputs.evaluation` reads)."""
    masks = (out["masks"][:, 0] > 0.5).cpu().numpy()  # soft masks, thresholded at 0.5 as inference does
    detections = []
    for box, score, label, m in zip(out["boxes"].cpu().tolist(), out["scores"].cpu().tolist(), out["labels"].cpu().tolist(), masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        detections.append(
            {"box": box, "score": float(score), "label": int(label), "label_name": classes[int(label)],
             "mask": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}}  # fmt: skip
        )
    return {"uri": str(image_id), "image_id": image_id, "status": "ok", "detections": detections}


# ----------------------------------------------------------------------------- training


def read_init(path: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The architecture and float32 state_dict of an ``--init`` checkpoint, in
    any form ``segbatch run --model`` takes (see :mod:`segbatch.model.loading`)."""
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ModelError(f"--init {path}: no such checkpoint") from None
    arch, state_dict, _, _ = parse_checkpoint(data, source=path)
    return arch, {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}


def resolve_arch(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its architecture settled: the ``--init`` checkpoint's when
    ``cfg.arch`` is None, else ``cfg.arch`` (refused if the checkpoint's differs:
    none of its tensors would load and training would silently start from scratch)."""
    from dataclasses import replace

    if not cfg.init:
        return replace(cfg, arch=cfg.arch or "demo")
    arch, _ = read_init(cfg.init)
    if cfg.arch and cfg.arch != arch:
        raise TrainError(f"--init {cfg.init} holds a {arch} model but --arch is {cfg.arch}; leave out --arch (or give --arch {arch})")
    return replace(cfg, arch=arch)


def build_model(cfg: TrainConfig, classes: list[str]) -> nn.Module:
    """The architecture ``cfg.arch`` for ``classes``, from ``cfg.init`` when given.

    Tensors of ``init`` whose shape differs (the class-specific predictors,
    when the class list changed) are left at their fresh initialisation; how
    many loaded is logged, and an ``init`` none of whose tensors fit is refused.
    """
    arch = cfg.arch or "demo"
    model = build_architecture(arch, len(classes), min_size=cfg.min_size, max_size=cfg.max_size, **cfg.extra)
    if cfg.init:
        _, init_state = read_init(cfg.init)
        own = model.state_dict()
        state = {k: v for k, v in init_state.items() if k in own and own[k].shape == v.shape}
        if not state:
            raise TrainError(f"none of the {len(init_state)} tensors of --init {cfg.init} fit architecture {arch}")
        model.load_state_dict(state, strict=False)
        log.info("--init %s: loaded %d of the model's %d tensors, %d of the checkpoint's skipped (names or shapes differ)",
                 cfg.init, len(state), len(own), len(init_state) - len(state))  # fmt: skip
    return model


def _schedule(cfg: TrainConfig, total_steps: Callable[[], int]) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 5% of the peak learning rate by
    step ``total_steps()`` (read at every step: a time budget may shorten it)."""

    def factor(step: int) -> float:
        total = total_steps()
        warmup = max(1, min(cfg.warmup_steps, total // 5))
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return factor


# Steps timed before a time budget sets the run's length (the first ones are slow: warm-up, caches).
_BUDGET_PROBE_STEPS = (10, 40)


def _run(
    cfg: TrainConfig,
    model: nn.Module,
    loader: DataLoader,
    classes: list[str],
    device: torch.device,
    on_progress: ProgressFn | None,
    is_main: bool,
    save: Callable[[], None] | None,
    on_epoch: Callable[[int, dict], None] | None = None,
    set_epoch: Callable[[int], None] | None = None,
) -> dict:
    """The training loop both :func:`train` and the Ray Train workers run.

    ``classes`` name the model's labels (for evaluation); ``save`` writes the
    checkpoint (main process only). Returns the last progress record.
    """
    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # No weight decay on norms and biases: it only fights their scale.
            (no_decay if p.ndim <= 1 else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, lambda: total))
    model.train()
    step, start = 0, time.monotonic()
    best = -1.0
    record: dict = {}
    for epoch in range(cfg.epochs):
        if set_epoch is not None:
            set_epoch(epoch)
        for images, targets in loader:
            images = [img.to(device) for img in images]
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if cfg.time_budget_s and step == _BUDGET_PROBE_STEPS[0]:
                probe_start = time.monotonic()
            if cfg.time_budget_s and step == _BUDGET_PROBE_STEPS[1]:
                # Evaluations and checkpoints take time too: a tenth of the budget is kept for them.
                per_step = (time.monotonic() - probe_start) / (_BUDGET_PROBE_STEPS[1] - _BUDGET_PROBE_STEPS[0])
                fits = _agreed_steps(step + int((0.9 * cfg.time_budget_s - (time.monotonic() - start)) / per_step), device)
                if fits < total:
                    log.info("time budget %.0f s: %d steps of %d (%.3f s a step)", cfg.time_budget_s, fits, total, per_step)
                    total = max(step, fits)
            record = {
                "epoch": epoch,
                "step": step,
                "steps": total,
                "loss": float(loss.item()),
                "loss_components": {k: float(v.item()) for k, v in losses.items()},
                "lr": optimizer.param_groups[0]["lr"],
                "elapsed_s": time.monotonic() - start,
            }
            if on_progress is not None and is_main:
                on_progress(record)
            last = step == total
            end_of_epoch = step % steps_per_epoch == 0
            if is_main and cfg.eval_data and ((cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch) or last):
                stats = evaluate(model, classes, cfg.eval_data, cfg.eval_images, device)
                if on_progress is not None:
                    on_progress({"event": "eval", "epoch": epoch, "step": step, "steps": total, **stats})
                if save is not None and stats["mask_ap"] > best:
                    best = stats["mask_ap"]
                    save(best=True)  # type: ignore[call-arg]
            if is_main and save is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or end_of_epoch or last):
                save()
            if last:
                break
        if on_epoch is not None:
            on_epoch(epoch, record)
        if step >= total:
            break
    return record


def _agreed_steps(steps: int, device: torch.device) -> int:
    """The fewest of every Ray Train worker's ``steps``: each times its own
    steps, and one that stopped earlier would leave the others waiting forever
    in DistributedDataParallel's all-reduce. ``steps`` itself in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return steps
    agreed = torch.tensor([steps], dtype=torch.int64, device=device)  # on the device: NCCL takes no CPU tensors
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return int(agreed.item())


def _best_path(out: str) -> str:
    root, ext = os.path.splitext(out)
    return f"{root}.best{ext or '.pt'}"


def train(cfg: TrainConfig, on_progress: ProgressFn | None = None) -> str:
    """Train ``cfg.arch`` on ``cfg.data`` in this process; returns the checkpoint path.

    ``on_progress`` gets, after every step, ``{"epoch", "step", "steps",
    "loss", "loss_components": {name: float}, "lr", "elapsed_s"}``, and after
    each evaluation (when ``cfg.eval_data``) ``{"event": "eval", "epoch",
    "step", "steps", "mask_ap", "box_ap", ...}``. The checkpoint at
    ``cfg.out`` is rewritten at each epoch's end (and every
    ``cfg.checkpoint_every`` steps); with ``eval_data``, the best one by mask
    AP is also kept at ``<out>.best.pt``.
    """
    cfg = resolve_arch(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    dataset = CocoInstances(cfg.data, train=True, hflip=cfg.hflip)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(dataset) >= cfg.batch_size,
        num_workers=cfg.loader_workers, collate_fn=collate, generator=generator,
        persistent_workers=cfg.loader_workers > 0, pin_memory=device.type == "cuda",
    )
    model = build_model(cfg, dataset.classes).to(device)

    def save(best: bool = False) -> None:
        save_checkpoint(model, cfg.arch, dataset.classes, _best_path(cfg.out) if best else cfg.out,
                        cfg.min_size, cfg.max_size, half=cfg.half)

    _run(cfg, model, loader, dataset.classes, device, on_progress, True, save)
    return cfg.out


def _ray_train_loop(config: dict) -> None:
    """What each Ray Train worker runs: the same loop, on its share of the data."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    dataset = CocoInstances(cfg.data, train=True, hflip=cfg.hflip)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=len(dataset) >= cfg.batch_size * ctx.get_world_size(),
        num_workers=cfg.loader_workers, collate_fn=collate,
    )
    # Adds a DistributedSampler when there is more than one worker; batches are
    # lists of dicts, moved to the device by the loop itself.
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(build_model(cfg, dataset.classes))
    sampler = getattr(loader, "sampler", None)
    set_epoch = sampler.set_epoch if hasattr(sampler, "set_epoch") else None
    scratch = tempfile.mkdtemp(prefix="segbatch-train-")
    ckpt_file = os.path.join(scratch, "model.pt")

    def on_epoch(epoch: int, record: dict) -> None:
        # Every worker reports (it is a barrier); rank 0 attaches the weights.
        metrics = {"epoch": epoch, "step": record.get("step", 0), "loss": record.get("loss", float("nan"))}
        checkpoint = None
        if rank == 0:
            save_checkpoint(model, cfg.arch, dataset.classes, ckpt_file, cfg.min_size, cfg.max_size, half=cfg.half)
            checkpoint = ray.train.Checkpoint.from_directory(scratch)
        ray.train.report(metrics, checkpoint=checkpoint)

    _run(cfg, model, loader, dataset.classes, device, None, rank == 0, None, on_epoch=on_epoch, set_epoch=set_epoch)
    shutil.rmtree(scratch, ignore_errors=True)


def train_distributed(cfg: TrainConfig) -> str:
    """Train with Ray Train (``cfg.workers`` workers, GPUs when ``cfg.use_gpu``).

    Connects to the running Ray instance (or starts a local one). Each
    worker runs the loop of :func:`train` on its shard of the data, with
    gradients averaged by DistributedDataParallel; rank 0's weights are
    reported to Ray Train as a checkpoint at each epoch's end and the last
    one is copied to ``cfg.out``. On a multi-node cluster set
    ``cfg.storage_path`` to storage every node shares (``s3://...``).
    Returns ``cfg.out``. Evaluation (``cfg.eval_data``) is refused here: it
    runs in :func:`train`'s single process.
    """
    if cfg.eval_data:
        raise TrainError(
            "--eval-data is measured by single-process training only: leave out --workers, or train with "
            "--workers and then measure the checkpoint with `segbatch run SOURCE DEST --model CKPT` and `segbatch eval DEST GT.json`"
        )
    cfg = resolve_arch(cfg)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_config = RunConfig(
        name=f"segbatch-train-{int(time.time())}",
        storage_path=cfg.storage_path or os.path.join(tempfile.gettempdir(), "segbatch-ray-train"),
    )
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
        run_config=run_config,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, "model.pt"), "rb") as src, fsspec.open(cfg.out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return cfg.out


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    """``python -m segbatch.train.loop --data GT.json --out model.pt [...]``."""
    parser = argparse.ArgumentParser(prog="python -m segbatch.train.loop", description=__doc__.splitlines()[0])
    defaults = TrainConfig(data="", out="")
    for name, value in asdict(defaults).items():
        if name in ("extra",):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif name in ("data", "out"):
            parser.add_argument(flag, required=True)
        else:
            kind = type(value) if value is not None else {"max_steps": int, "threads": int, "time_budget_s": float}.get(name, str)
            parser.add_argument(flag, type=kind, default=value)
    parser.add_argument("--distributed", action="store_true", help="run with Ray Train")
    args = vars(parser.parse_args(argv))
    distributed = args.pop("distributed")
    cfg = TrainConfig(**args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    def report(rec: dict) -> None:
        if rec.get("event") == "eval":
            log.info("eval step %d: %s", rec["step"], json.dumps({k: round(v, 4) for k, v in rec.items() if isinstance(v, float)}))
        elif rec["step"] % 20 == 0 or rec["step"] == rec["steps"]:
            parts = " ".join(f"{k.replace('loss_', '')}={v:.3f}" for k, v in rec["loss_components"].items())
            log.info("epoch %d step %d/%d loss %.3f (%s) lr %.2e %.0fs", rec["epoch"], rec["step"], rec["steps"],
                     rec["loss"], parts, rec["lr"], rec["elapsed_s"])

    try:
        path = train_distributed(cfg) if distributed else train(cfg, report)
    except (TrainError, ModelError) as exc:
        parser.error(str(exc))
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
