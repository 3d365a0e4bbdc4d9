"""Training: synthetic COCO scenes, the dataset, checkpoints, the training loop, evaluation while
training and Ray Train.
"""

from segbatch.config import TrainConfig, TrainError
from segbatch.model import CHECKPOINT_FORMAT

from .checkpoint import build_trainable_model, load_checkpoint, read_init, resolve_arch, save_checkpoint
from .dataset import CocoInstances, coco_classes, collate
from .distributed import train_distributed
from .evaluation import evaluate_checkpoint, evaluate_model
from .loop import train
from .synth import CLASSES, generate_scene, scene_rng, write_aerial_raster, write_dataset

__all__ = [
    "CHECKPOINT_FORMAT",
    "CLASSES",
    "CocoInstances",
    "TrainConfig",
    "TrainError",
    "build_trainable_model",
    "coco_classes",
    "collate",
    "evaluate_checkpoint",
    "evaluate_model",
    "generate_scene",
    "load_checkpoint",
    "read_init",
    "resolve_arch",
    "save_checkpoint",
    "scene_rng",
    "train",
    "train_distributed",
    "write_aerial_raster",
    "write_dataset",
]
