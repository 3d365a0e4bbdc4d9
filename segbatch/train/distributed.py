"""Training with Ray Train: each worker runs the loop of :func:`segbatch.train.train`
on its share of the data, gradients averaged by DistributedDataParallel."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from dataclasses import asdict, replace

from torch.utils.data import DataLoader

from segbatch.config import TrainConfig, TrainError
from segbatch.storage import Storage

from .checkpoint import build_trainable_model, resolve_arch, save_checkpoint
from .dataset import CocoInstances, collate
from .loop import prepare_process, run_training_loop


def _ray_train_loop(config: dict, storage_options: dict) -> None:
    """What each Ray Train worker runs: the same loop, on its share of the data.

    ``storage_options`` come bound to the function rather than in ``config``: the
    options may hold credentials, and Ray Train may record the config with the run
    (Train v1, ``RAY_TRAIN_V2_ENABLED=0``, writes it to each trial's ``params.json``).
    """
    import ray.train
    import ray.train.torch

    cfg = replace(TrainConfig(**config), storage_options=storage_options)
    prepare_process(cfg)
    storage = Storage(cfg.storage_options)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    dataset = CocoInstances(cfg.data, train=True, hflip=cfg.hflip, storage=storage)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= cfg.batch_size * ctx.get_world_size(),
        num_workers=cfg.loader_workers,
        collate_fn=collate,
    )
    # Adds a DistributedSampler when there is more than one worker; batches are
    # lists of dicts, moved to the device by the loop itself.
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(build_trainable_model(cfg, dataset.classes))
    sampler = getattr(loader, "sampler", None)
    set_epoch = sampler.set_epoch if hasattr(sampler, "set_epoch") else None
    scratch = tempfile.mkdtemp(prefix="segbatch-train-")
    ckpt_file = os.path.join(scratch, "model.pt")

    def on_epoch(epoch: int, record: dict) -> None:
        # Every worker reports (it is a barrier); rank 0 attaches the weights.
        metrics = {"epoch": epoch, "step": record.get("step", 0), "loss": record.get("loss", float("nan"))}
        checkpoint = None
        if rank == 0:
            # to this worker's scratch folder, which Ray Train copies to the run's storage
            save_checkpoint(model, cfg.arch, dataset.classes, ckpt_file, cfg.min_size, cfg.max_size, half=cfg.half)
            checkpoint = ray.train.Checkpoint.from_directory(scratch)
        ray.train.report(metrics, checkpoint=checkpoint)

    run_training_loop(
        cfg, model, loader, dataset.classes, device, None, rank == 0, None, on_epoch=on_epoch, set_epoch=set_epoch
    )
    shutil.rmtree(scratch, ignore_errors=True)


def train_distributed(cfg: TrainConfig) -> str:
    """Train with Ray Train (``cfg.workers`` workers, GPUs when ``cfg.use_gpu``).

    Connects to the running Ray instance (or starts a local one). Each
    worker runs the loop of :func:`segbatch.train.train` on its shard of the
    data, with gradients averaged by DistributedDataParallel; rank 0's weights
    are reported to Ray Train as a checkpoint at each epoch's end and the last
    one is copied to ``cfg.out``. On a multi-node cluster set
    ``cfg.storage_path`` to storage every node shares (``s3://...``).
    Returns ``cfg.out``. Evaluation (``cfg.eval_data``) is refused here: it
    runs in :func:`segbatch.train.train`'s single process.
    """
    if cfg.eval_data:
        raise TrainError(
            "--eval-data is measured by single-process training only: leave out --workers, or train with "
            "--workers and then measure the checkpoint with `segbatch run SOURCE DEST --model CKPT` and "
            "`segbatch eval DEST GT.json`"
        )
    cfg = resolve_arch(cfg)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_config = RunConfig(
        name=f"segbatch-train-{int(time.time())}",
        storage_path=cfg.storage_path or os.path.join(tempfile.gettempdir(), "segbatch-ray-train"),
    )
    trainer = TorchTrainer(
        functools.partial(_ray_train_loop, storage_options=cfg.storage_options),
        train_loop_config=asdict(replace(cfg, storage_options={})),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
        run_config=run_config,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        Storage(cfg.storage_options).upload_file(os.path.join(folder, "model.pt"), cfg.out)  # whole or absent
    return cfg.out
