"""Training a Mask R-CNN on a COCO-format dataset in this process: the loop, its
learning-rate schedule and its time budget.

:func:`run_training_loop` is the loop both :func:`train` and the Ray Train
workers (:mod:`segbatch.train.distributed`) run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from segbatch.config import TrainConfig
from segbatch.storage import Storage

from .checkpoint import build_trainable_model, resolve_arch, save_checkpoint
from .dataset import CocoInstances, collate
from .evaluation import evaluate_model

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]

# Steps timed before a time budget sets the run's length (the first ones are slow: warm-up, caches).
_BUDGET_PROBE_STEPS = (10, 40)


def prepare_process(cfg: TrainConfig) -> None:
    """Threads and seed of this training process (the driver's, or one Ray Train worker's)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)


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


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW at ``cfg.lr``, with weight decay on the weights only."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            # No weight decay on norms and biases: it only fights their scale.
            (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )


class TimeBudget:
    """Fits a run into ``seconds``: times steps ``_BUDGET_PROBE_STEPS`` and, once
    they are done, cuts the run's total steps to what the rest of the budget
    allows. A tenth of the budget is kept for evaluations and checkpoints.

    ``clock`` is injectable so that the policy is tested without sleeping.
    """

    def __init__(self, seconds: float, device: torch.device, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.device = device
        self.clock = clock
        self.start = clock()
        self._probe_start = 0.0

    def total_after(self, step: int, total: int) -> int:
        """The run's total steps once ``step`` steps are done (``total``: the current plan)."""
        first, last = _BUDGET_PROBE_STEPS
        if step == first:
            self._probe_start = self.clock()
        if step != last:
            return total
        now = self.clock()
        per_step = (now - self._probe_start) / (last - first)
        fits = _agreed_steps(step + int((0.9 * self.seconds - (now - self.start)) / per_step), self.device)
        if fits >= total:
            return total
        log.info("time budget %.0f s: %d steps of %d (%.3f s a step)", self.seconds, fits, total, per_step)
        return max(step, fits)


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


def run_training_loop(
    cfg: TrainConfig,
    model: nn.Module,
    loader: DataLoader,
    classes: list[str],
    device: torch.device,
    on_progress: ProgressFn | None,
    is_main: bool,
    save: Callable[..., None] | None,
    on_epoch: Callable[[int, dict], None] | None = None,
    set_epoch: Callable[[int], None] | None = None,
) -> dict:
    """The training loop both :func:`train` and the Ray Train workers run.

    ``classes`` name the model's labels (for evaluation); ``save(best=False)``
    writes the checkpoint (main process only). Returns the last progress record.
    """
    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    optimizer = _optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, lambda: total))
    storage = Storage(cfg.storage_options)
    model.train()
    step, start = 0, time.monotonic()
    budget = TimeBudget(cfg.time_budget_s, device) if cfg.time_budget_s else None
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
            if budget is not None:
                total = budget.total_after(step, total)
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
            eval_due = (step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch) or last
            save_due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or end_of_epoch or last
            if is_main and cfg.eval_data and eval_due:
                stats = evaluate_model(model, classes, cfg.eval_data, cfg.eval_images, device, storage=storage)
                if on_progress is not None:
                    on_progress({"event": "eval", "epoch": epoch, "step": step, "steps": total, **stats})
                if save is not None and stats["mask_ap"] > best:
                    best = stats["mask_ap"]
                    save(best=True)
            if is_main and save is not None and save_due:
                save()
            if last:
                break
        if on_epoch is not None:
            on_epoch(epoch, record)
        if step >= total:
            break
    return record


def best_path(out: str) -> str:
    """Where the best checkpoint by mask AP is kept beside ``out``: ``model.pt`` -> ``model.best.pt``."""
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
    prepare_process(cfg)
    storage = Storage(cfg.storage_options)
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    dataset = CocoInstances(cfg.data, train=True, hflip=cfg.hflip, storage=storage)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= cfg.batch_size,
        num_workers=cfg.loader_workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=cfg.loader_workers > 0,
        pin_memory=device.type == "cuda",
    )
    model = build_trainable_model(cfg, dataset.classes).to(device)

    def save(best: bool = False) -> None:
        save_checkpoint(
            model,
            cfg.arch,
            dataset.classes,
            best_path(cfg.out) if best else cfg.out,
            cfg.min_size,
            cfg.max_size,
            half=cfg.half,
            storage=storage,
        )

    run_training_loop(cfg, model, loader, dataset.classes, device, on_progress, True, save)
    return cfg.out
