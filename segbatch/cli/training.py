"""``segbatch train``: fine-tune or train Mask R-CNN, in this process or on Ray Train workers."""

from __future__ import annotations

import sys

import click

from segbatch.config import ARCHITECTURES, TrainConfig

from . import options
from .options import config_option


@click.command()
@click.argument("data")
@config_option(TrainConfig, "out", "--out", required=True, help="Checkpoint to write (path or URL).")
@config_option(
    TrainConfig,
    "arch",
    "--arch",
    type=click.Choice(ARCHITECTURES),
    help="[default: the --init checkpoint's, else demo]",
)
@config_option(TrainConfig, "epochs", "--epochs", type=int)
@config_option(TrainConfig, "batch_size", "--batch-size", type=int)
@config_option(TrainConfig, "lr", "--lr", type=float, help="AdamW's peak learning rate.")
@config_option(TrainConfig, "min_size", "--min-size", type=int)
@config_option(TrainConfig, "max_size", "--max-size", type=int)
@config_option(
    TrainConfig,
    "init",
    "--init",
    help="A checkpoint to start from (fine-tuning): any that `segbatch run --model` takes, "
    "e.g. torchvision's COCO state_dict.",
)
@config_option(
    TrainConfig,
    "eval_data",
    "--eval-data",
    help="COCO ground truth to measure mask AP on after each epoch (not with --workers).",
)
@click.option("--workers", type=int, default=0, help="Ray Train workers (0: train in this process).")
@config_option(TrainConfig, "use_gpu", "--gpu", "use_gpu", is_flag=True, help="Ray Train workers on GPUs.")
@config_option(TrainConfig, "seed", "--seed", type=int)
@config_option(TrainConfig, "half", "--half", is_flag=True, help="Store the weights as float16 (half the file).")
@config_option(
    TrainConfig,
    "loader_workers",
    "--loader-workers",
    type=int,
    help="DataLoader processes reading and decoding the images.",
)
@config_option(
    TrainConfig,
    "time_budget_s",
    "--time-budget",
    "time_budget_s",
    type=float,
    help="Seconds: fewer steps (and a schedule that fits) when the epochs would take longer.",
)
@options.storage_options
def train(data: str, workers: int, storage_options: dict | None, **fields) -> None:
    """Fine-tune or train Mask R-CNN on a COCO dataset (DATA: its JSON).

    Writes a checkpoint that `segbatch run --model` takes as it is. With
    --workers N, training runs on N Ray Train workers (TorchTrainer).
    """
    from segbatch.train import train as train_local
    from segbatch.train import train_distributed

    cfg = TrainConfig(data=data, workers=max(workers, 1), storage_options=storage_options or {}, **fields)
    path = train_distributed(cfg) if workers else _train_with_bar(cfg, train_local)
    click.echo(f"checkpoint written to {path}; use it with: segbatch run SOURCE DEST --model {path}", err=True)


def _train_with_bar(cfg, train_local) -> str:
    """Train in this process with a progress bar and a line per evaluation."""
    from tqdm import tqdm

    bar = None

    def on_progress(event: dict) -> None:
        nonlocal bar
        if event.get("event") == "eval":
            tqdm.write(
                f"epoch {event['epoch']}: mask AP {event['mask_ap']:.3f}, box AP {event['box_ap']:.3f}", file=sys.stderr
            )
            return
        if bar is None:
            bar = tqdm(total=event["steps"], unit="step", file=sys.stderr, dynamic_ncols=True)
        bar.update(event["step"] - bar.n)
        bar.set_postfix(loss=f"{event['loss']:.3f}", epoch=event["epoch"], refresh=False)

    try:
        return train_local(cfg, on_progress)
    finally:
        if bar is not None:
            bar.close()
