"""Datasets for video matting: the official layouts (VideoMatte240K, ImageMatte, backgrounds,
segmentation sets) with RVM-style augmentation, and a procedural synthetic set.

Submodules are imported lazily so that ``SyntheticMatting`` never imports PyAV or JSON loaders.
"""
from __future__ import annotations

from binarize._lazy import lazy_exports

_LAZY = {
    "SyntheticMatting": "binarize.matting.data.synthetic:SyntheticMatting",
    "composite": "binarize.matting.data.synthetic:composite",
    "parse_size": "binarize.matting.data.synthetic:parse_size",
    "write_synthetic": "binarize.matting.data.synthetic:write_synthetic",
    "VideoMatteDataset": "binarize.matting.data.videomatte:VideoMatteDataset",
    "VideoMatteTrainAugmentation": "binarize.matting.data.videomatte:VideoMatteTrainAugmentation",
    "VideoMatteValidAugmentation": "binarize.matting.data.videomatte:VideoMatteValidAugmentation",
    "ImageMatteDataset": "binarize.matting.data.imagematte:ImageMatteDataset",
    "ImageMatteAugmentation": "binarize.matting.data.imagematte:ImageMatteAugmentation",
    "BackgroundImageDataset": "binarize.matting.data.backgrounds:BackgroundImageDataset",
    "BackgroundVideoDataset": "binarize.matting.data.backgrounds:BackgroundVideoDataset",
    "BackgroundSource": "binarize.matting.data.backgrounds:BackgroundSource",
    "CocoPanopticDataset": "binarize.matting.data.segmentation:CocoPanopticDataset",
    "SuperviselyPersonDataset": "binarize.matting.data.segmentation:SuperviselyPersonDataset",
    "YouTubeVISDataset": "binarize.matting.data.segmentation:YouTubeVISDataset",
    "SegmentationAugmentation": "binarize.matting.data.segmentation:SegmentationAugmentation",
    "MotionAugmentation": "binarize.matting.data.augment:MotionAugmentation",
    "TrainFrameSampler": "binarize.matting.data.augment:TrainFrameSampler",
    "ValidFrameSampler": "binarize.matting.data.augment:ValidFrameSampler",
    "build_train_dataset": "binarize.matting.data.builders:build_train_dataset",
    "build_segmentation_datasets": "binarize.matting.data.builders:build_segmentation_datasets",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
