"""Datasets for video matting: the official layouts (VideoMatte240K, ImageMatte, backgrounds,
segmentation sets) with RVM-style augmentation, and a procedural synthetic set.

Submodules are imported lazily so that ``SyntheticMatting`` never imports PyAV or JSON loaders.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SyntheticMatting": "synthetic",
    "composite": "synthetic",
    "parse_size": "synthetic",
    "write_synthetic": "synthetic",
    "VideoMatteDataset": "videomatte",
    "VideoMatteTrainAugmentation": "videomatte",
    "VideoMatteValidAugmentation": "videomatte",
    "ImageMatteDataset": "imagematte",
    "ImageMatteAugmentation": "imagematte",
    "BackgroundImageDataset": "backgrounds",
    "BackgroundVideoDataset": "backgrounds",
    "BackgroundSource": "backgrounds",
    "CocoPanopticDataset": "segmentation",
    "SuperviselyPersonDataset": "segmentation",
    "YouTubeVISDataset": "segmentation",
    "SegmentationAugmentation": "segmentation",
    "MotionAugmentation": "augment",
    "TrainFrameSampler": "augment",
    "ValidFrameSampler": "augment",
    "build_train_dataset": "builders",
    "build_segmentation_datasets": "builders",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'binarize.matting.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"binarize.matting.data.{module_name}"), name)
    globals()[name] = value
    return value
