"""segbatch: batch instance segmentation of image archives with Mask R-CNN on Ray."""

__version__ = "0.1.0"
