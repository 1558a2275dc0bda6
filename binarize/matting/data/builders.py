"""Training sets as RVM's ``train.py`` builds them, from a mapping of folder paths (the trainer's config).

Matting ``paths`` keys: ``videomatte`` (VideoMatte240K ``train`` folder), ``imagematte`` (one folder
or a list, e.g. D646 and AIM), ``background_images``, ``background_videos``.
Segmentation ``paths``: ``youtubevis: {videodir, annfile}``, ``coco_panoptic: {imgdir, anndir,
annfile}``, ``spd: {imgdir, segdir}``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

from torch.utils.data import ConcatDataset, Dataset

from binarize.matting.data.augment import MotionAugmentation, TrainFrameSampler
from binarize.matting.data.imagematte import ImageMatteDataset
from binarize.matting.data.segmentation import (
    CocoPanopticDataset,
    SegmentationAugmentation,
    SuperviselyPersonDataset,
    YouTubeVISDataset,
)
from binarize.matting.data.videomatte import VideoMatteDataset

__all__ = ["build_train_dataset", "build_segmentation_datasets"]


def _need(paths: Mapping[str, Any], key: str, where: str) -> Any:
    value = paths.get(key)
    if not value:
        raise ValueError(f"{where} needs paths.{key}")
    return value


def build_train_dataset(name: str, paths: Mapping[str, Any], size: Any, seq_length: int) -> Dataset:
    """RVM's training set ``name`` (``videomatte`` or ``imagematte``) at ``size`` with its augmentation
    and the frame-rate sampler (speeds 0.5x-5x, shifts, reversal)."""
    backgrounds = dict(background_image_dir=paths.get("background_images"),
                       background_video_dir=paths.get("background_videos"))
    if name == "videomatte":
        return VideoMatteDataset(_need(paths, "videomatte", name), **backgrounds, size=size, seq_length=seq_length,
                                 seq_sampler=TrainFrameSampler(),
                                 transform=MotionAugmentation.videomatte_train(size))
    if name == "imagematte":
        return ImageMatteDataset(_need(paths, "imagematte", name), **backgrounds, size=size, seq_length=seq_length,
                                 seq_sampler=TrainFrameSampler(),
                                 transform=MotionAugmentation.imagematte_train(size))
    raise ValueError(f"unknown training set {name!r} (known: videomatte, imagematte)")


def build_segmentation_datasets(paths: Mapping[str, Any], size: Any, seq_length: int) -> Tuple[Dataset, Dataset]:
    """``(video_set, image_set)`` for the interleaved segmentation passes (RVM): YouTubeVIS clips at
    normal speed, and COCO panoptic plus Supervisely Person images (T = 1), each with RVM's augmentation."""
    vis: Dict[str, Any] = _need(paths, "youtubevis", "segmentation")
    video_set = YouTubeVISDataset(_need(vis, "videodir", "youtubevis"), _need(vis, "annfile", "youtubevis"),
                                  size=size, seq_length=seq_length, seq_sampler=TrainFrameSampler(speeds=(1,)),
                                  transform=SegmentationAugmentation.youtubevis_train(size))
    images: List[Dataset] = []
    if paths.get("coco_panoptic"):
        coco = paths["coco_panoptic"]
        images.append(CocoPanopticDataset(_need(coco, "imgdir", "coco_panoptic"), _need(coco, "anndir", "coco_panoptic"),
                                          _need(coco, "annfile", "coco_panoptic"), size=size,
                                          transform=SegmentationAugmentation.coco_train(size)))
    if paths.get("spd"):
        spd = paths["spd"]
        images.append(SuperviselyPersonDataset(_need(spd, "imgdir", "spd"), _need(spd, "segdir", "spd"), size=size,
                                               transform=SegmentationAugmentation.coco_train(size)))
    if not images:
        raise ValueError("segmentation needs paths.coco_panoptic or paths.spd for the image passes")
    return video_set, ConcatDataset(images)
