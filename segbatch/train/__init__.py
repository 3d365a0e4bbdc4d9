"""Training: synthetic COCO scenes, the training loop and Ray Train.
"""

from .loop import CHECKPOINT_FORMAT, CocoInstances, TrainConfig, TrainError, build_model, evaluate, load_checkpoint, resolve_arch, save_checkpoint, train, train_distributed
from .synth import CLASSES, generate_scene, scene_rng, write_aerial_raster, write_dataset

__all__ = ["CHECKPOINT_FORMAT", "CLASSES", "CocoInstances", "TrainConfig", "TrainError", "build_model", "evaluate", "generate_scene", "load_checkpoint", "resolve_arch", "save_checkpoint", "scene_rng", "train", "train_distributed", "write_aerial_raster", "write_dataset"]
