"""VideoMatte240K (and any dataset in its layout, e.g. ``binarize data synth``'s ``train`` folder).

Layout (RVM's ``VideoMatte240K_JPEG_SD/train``)::

    videomatte_dir/fgr/CLIP/NNNNN.jpg
    videomatte_dir/pha/CLIP/NNNNN.jpg      same clip and frame names as fgr

Each item is a sequence of ``seq_length`` frames starting every ``seq_length`` frames of a clip
(RVM's indexing), composited later on a random background: ``(fgr [T,3,H,W], pha [T,1,H,W],
bgr [T,3,H,W])`` in [0, 1] after ``transform`` (default: a deterministic centre crop to ``size``).
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from binarize.matting.data.augment import MotionAugmentation
from binarize.matting.data.backgrounds import load_image, setup_sequences
from binarize.matting.data.imageio import list_images, list_subdirs

__all__ = ["VideoMatteDataset", "VideoMatteTrainAugmentation", "VideoMatteValidAugmentation"]

PathLike = Union[str, os.PathLike]
Transform = Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]


def VideoMatteTrainAugmentation(size) -> MotionAugmentation:  # noqa: N802  (RVM's class name)
    """RVM's VideoMatte training augmentation (affine 0.3, noise 0.1, jitter 0.3, ...) to ``size``."""
    return MotionAugmentation.videomatte_train(size)


def VideoMatteValidAugmentation(size) -> MotionAugmentation:  # noqa: N802
    """No random augmentation: a centre crop to the aspect ratio of ``size``, resized to ``size``."""
    return MotionAugmentation.valid(size)


class VideoMatteDataset(Dataset):
    """Video matting clips in the VideoMatte240K layout, each on a random image or video background.

    Args:
        videomatte_dir: folder holding ``fgr/`` and ``pha/``.
        background_image_dir, background_video_dir: background sources (at least one).
        size: output ``(height, width)`` (or int); frames larger than that are first shrunk so their
            short side is ``max(size)`` (RVM's ``_downsample_if_needed``).
        seq_length: frames per sample (T).
        seq_sampler: frame offsets of a sample (``TrainFrameSampler()`` for training; default consecutive).
        transform: ``(fgr, pha, bgr) -> (fgr, pha, bgr)`` on tensors; default ``VideoMatteValidAugmentation(size)``.
    """

    def __init__(self, videomatte_dir: PathLike, background_image_dir: Optional[PathLike] = None,
                 background_video_dir: Optional[PathLike] = None, size: Any = 512, seq_length: int = 15,
                 seq_sampler: Optional[Callable[[int], Sequence[int]]] = None,
                 transform: Optional[Transform] = None) -> None:
        self.root = pathlib.Path(videomatte_dir)
        for kind in ("fgr", "pha"):
            if not (self.root / kind).is_dir():
                raise FileNotFoundError(f"VideoMatte folder {self.root} has no {kind}/ sub-folder")
        self.clips = list_subdirs(self.root / "fgr")
        if not self.clips:
            raise ValueError(f"no clips found in {self.root / 'fgr'}")
        self.frames: List[List[str]] = []
        for clip in self.clips:
            names = list_images(self.root / "fgr" / clip)
            if not names:
                raise ValueError(f"clip {self.root / 'fgr' / clip} has no frames")
            missing = sorted(set(names) - set(list_images(self.root / "pha" / clip)))
            if missing:
                raise ValueError(f"clip {clip}: no alpha for {missing[:3]} in {self.root / 'pha' / clip}")
            self.frames.append(names)
        setup_sequences(self, size, seq_length, seq_sampler, transform, VideoMatteValidAugmentation,
                        background_image_dir, background_video_dir)
        self.index = [(c, start) for c in range(len(self.clips)) for start in range(0, len(self.frames[c]), self.seq_length)]

    def __len__(self) -> int:
        return len(self.index)

    def _load_clip(self, index: int) -> Tuple[Tensor, Tensor]:
        clip, start = self.index[index]
        names = self.frames[clip]
        fgr, pha = [], []
        for offset in self.seq_sampler(self.seq_length):
            name = names[(start + offset) % len(names)]
            fgr.append(load_image(self.root / "fgr" / self.clips[clip] / name, "RGB", self.short_side))
            pha.append(load_image(self.root / "pha" / self.clips[clip] / name, "L", self.short_side))
        return torch.stack(fgr), torch.stack(pha)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor, Tensor]:
        bgr = self.backgrounds.sample(self.seq_length, self.seq_sampler)
        fgr, pha = self._load_clip(index)
        return self.transform(fgr, pha, bgr)
