"""Background datasets: still images and videos stored as frame folders (RVM's BackgroundImages and
BackgroundVideos layouts), plus the random background source the matting datasets composite on.

Layouts::

    background_image_dir/NAME.jpg                 any image files
    background_video_dir/CLIP/NNNN.jpg            one folder of frames per video (RVM's layout)
    background_video_dir/NAME.mp4                 or video files (decoded with PyAV)
"""
from __future__ import annotations

import os
import pathlib
import random
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from binarize.matting.data.augment import SeededRandom, ValidFrameSampler, to_size
from binarize.matting.data.imageio import list_images, list_subdirs

__all__ = ["BackgroundImageDataset", "BackgroundVideoDataset", "BackgroundSource", "load_image", "VIDEO_EXTENSIONS"]

PathLike = Union[str, os.PathLike]


def _downsample_if_needed(image: Image.Image, short_side: Optional[int], resample: int) -> Image.Image:
    """Shrink so the short side is ``short_side`` when it is larger (RVM's ``_downsample_if_needed``)."""
    w, h = image.size
    if short_side is not None and min(w, h) > short_side:
        scale = short_side / min(w, h)
        image = image.resize((max(1, int(scale * w)), max(1, int(scale * h))), resample)
    return image


def load_image(path: PathLike, mode: str = "RGB", short_side: Optional[int] = None) -> Tensor:
    """Read an image as a float ``[C, H, W]`` tensor in [0, 1] (``mode`` RGB or L), shrunk to ``short_side``."""
    try:
        with Image.open(path) as image:
            converted = image.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    resample = Image.NEAREST if mode == "1" else Image.BILINEAR
    converted = _downsample_if_needed(converted, short_side, resample)
    array = np.asarray(converted, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def _require_nonempty(items: Sequence[Any], what: str, where: PathLike) -> None:
    if not items:
        raise ValueError(f"no {what} found in {where}")


class BackgroundImageDataset(Dataset):
    """Still background images; item ``i`` is a ``[3, H, W]`` tensor (short side at most ``short_side``)."""

    def __init__(self, background_image_dir: PathLike, short_side: Optional[int] = None) -> None:
        self.root = pathlib.Path(background_image_dir)
        self.files = list_images(self.root)
        _require_nonempty(self.files, "background images", self.root)
        self.short_side = short_side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        return load_image(self.root / self.files[index], "RGB", self.short_side)


VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")


def _video_error(path: PathLike, exc: Exception) -> ValueError:
    return ValueError(f"cannot read background video {path}: {exc}")


def _count_video_frames(path: PathLike) -> int:
    """Frames in a video file: the container's count, or a full decode when it has none."""
    import av  # PyAV only when video files are used

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for _ in container.decode(stream))
    except (av.FFmpegError, IndexError) as exc:
        raise _video_error(path, exc) from None


def _decode_video_frames(path: PathLike, wanted: Sequence[int]) -> dict:
    """Decode the frames of index ``wanted`` (decoding from the start up to the last one) as RGB arrays."""
    import av

    wanted_set, last, out = set(wanted), max(wanted), {}
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                if index in wanted_set:
                    out[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
    except (av.FFmpegError, IndexError) as exc:
        raise _video_error(path, exc) from None
    missing = wanted_set - set(out)
    if missing:
        raise _video_error(path, RuntimeError(f"frame {min(missing)} could not be decoded"))
    return out


class BackgroundVideoDataset(Dataset):
    """Background videos: frame folders (RVM's layout) or video files (decoded with PyAV, lazily imported).

    Item ``i`` is video ``i``'s first ``seq_length`` frames ``[T, 3, H, W]``; ``frames(clip, offsets,
    start)`` reads any frames (indices wrap around the video's length). Video files are decoded from
    their start up to the last frame needed, so long videos are better stored as frame folders.
    """

    def __init__(self, background_video_dir: PathLike, seq_length: int = 1, short_side: Optional[int] = None) -> None:
        self.root = pathlib.Path(background_video_dir)
        folders = list_subdirs(self.root)
        files = sorted(p.name for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        self.clips = folders + files
        _require_nonempty(self.clips, "background videos (frame folders or video files)", self.root)
        self.frame_names: List[Optional[List[str]]] = [list_images(self.root / c) for c in folders] + [None] * len(files)
        empty = [c for c, names in zip(self.clips, self.frame_names) if names is not None and not names]
        if empty:
            raise ValueError(f"background video folder {self.root / empty[0]} has no frames")
        self.seq_length = seq_length
        self.short_side = short_side
        self._counts: dict = {}

    def __len__(self) -> int:
        return len(self.clips)

    def frame_count(self, clip: int) -> int:
        """Number of frames of video ``clip``."""
        names = self.frame_names[clip]
        if names is not None:
            return len(names)
        if clip not in self._counts:
            count = _count_video_frames(self.root / self.clips[clip])
            if count == 0:
                raise ValueError(f"background video {self.root / self.clips[clip]} has no frames")
            self._counts[clip] = count
        return self._counts[clip]

    def frames(self, clip: int, offsets: Sequence[int], start: int = 0) -> Tensor:
        """Frames ``(start + offset) % length`` of video ``clip`` as ``[len(offsets), 3, H, W]``."""
        count = self.frame_count(clip)
        indices = [(start + i) % count for i in offsets]
        names = self.frame_names[clip]
        path = self.root / self.clips[clip]
        if names is not None:
            return torch.stack([load_image(path / names[i], "RGB", self.short_side) for i in indices])
        decoded = _decode_video_frames(path, indices)
        images = []
        for i in indices:
            image = _downsample_if_needed(Image.fromarray(decoded[i]), self.short_side, Image.BILINEAR)
            images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return torch.stack(images)

    def __getitem__(self, index: int) -> Tensor:
        return self.frames(index, range(self.seq_length))


class BackgroundSource(SeededRandom):
    """Random backgrounds for a training sequence: with probability 0.5 a still image repeated over
    the sequence, otherwise consecutive frames of a random video from a random start (RVM)."""

    def __init__(self, background_image_dir: Optional[PathLike], background_video_dir: Optional[PathLike],
                 short_side: Optional[int] = None, rng: Any = None) -> None:
        if background_image_dir is None and background_video_dir is None:
            raise ValueError("need background_image_dir or background_video_dir (or both)")
        self.images = BackgroundImageDataset(background_image_dir, short_side) if background_image_dir else None
        self.videos = BackgroundVideoDataset(background_video_dir, 1, short_side) if background_video_dir else None
        self.rng: Optional[random.Random] = rng

    def __len__(self) -> int:
        return (len(self.images) if self.images else 0) + (len(self.videos) if self.videos else 0)

    def sample(self, seq_length: int, seq_sampler: Callable[[int], Sequence[int]]) -> Tensor:
        use_image = self.videos is None or (self.images is not None and self.random.random() < 0.5)
        if use_image:
            image = self.images[self.random.randrange(len(self.images))]
            return image[None].expand(seq_length, -1, -1, -1).contiguous()
        clip = self.random.randrange(len(self.videos))
        count = self.videos.frame_count(clip)
        start = self.random.randrange(max(1, count - seq_length))
        return self.videos.frames(clip, seq_sampler(seq_length), start)


def setup_sequences(dataset: Any, size: Any, seq_length: int, seq_sampler: Optional[Callable[[int], Any]],
                    transform: Optional[Callable[..., Any]], default_transform: Callable[[Any], Any],
                    background_image_dir: Optional[PathLike], background_video_dir: Optional[PathLike]) -> None:
    """The sampling set-up shared by the matte datasets composited on backgrounds: output size,
    frames per sample, frame sampler, transform (``default_transform(size)`` when None) and the
    background source (whose frames are shrunk to the output's long side)."""
    if int(seq_length) < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    dataset.size = to_size(size)
    dataset.short_side = max(dataset.size)
    dataset.seq_length = int(seq_length)
    dataset.seq_sampler = seq_sampler if seq_sampler is not None else ValidFrameSampler()
    dataset.transform = transform if transform is not None else default_transform(dataset.size)
    dataset.backgrounds = BackgroundSource(background_image_dir, background_video_dir, dataset.short_side)
