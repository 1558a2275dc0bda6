"""Background-matting models in the video tool: the captured background frame (BGMv2).

A background-matting model (``takes_background = True``, e.g. ``bgmv2_mobilenetv2``) keeps the
official call ``pha, fgr, *rest = model(src, bgr)`` on images ``[N, 3, H, W]``: ``convert_video``
gives it each chunk of frames with the background captured by the same camera, either one image
(a fixed camera) or a video read frame by frame alongside the input. The outputs, writers and
metrics are those of every other matting model. Checks here run before any decoding or writing:

- a background-matting model without a background frame, or a background frame given to a model
  that takes none, is refused (:func:`check_background_use`);
- a background frame of another size than the input, or a background video with fewer frames
  than the input declares, is refused (:func:`check_background_frame`); there is no resizing,
  since a background captured at another framing would not line up with the input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from binarize.matting.video import IMAGE_EXTENSIONS, PathLike, check_source, open_source

__all__ = ["takes_background", "check_background_use", "check_background_frame", "CapturedBackground"]


def takes_background(model: Any) -> bool:
    """True for a background-matting model (or registry factory) that declares ``takes_background``."""
    return bool(getattr(model, "takes_background", False))


def _name(model: Any) -> str:
    return str(getattr(model, "model_name", None) or getattr(model, "__name__", None) or type(model).__name__)


def check_background_use(model: Any, background_frame: Optional[PathLike],
                         downsample_ratio: Optional[float] = None) -> None:
    """One-line ``ValueError`` unless ``model`` (a model or a registry factory) and
    ``background_frame`` go together; for a background-matting model ``downsample_ratio`` (its
    ``backbone_scale``) must be at most 0.5."""
    if takes_background(model):
        if background_frame is None:
            raise ValueError(f"model {_name(model)!r} mattes against a captured background: give the background "
                             "frame (background_frame=..., binarize matte --background-frame bg.png)")
        if downsample_ratio is not None and not 0 < downsample_ratio <= 0.5:
            raise ValueError(f"downsample_ratio is {_name(model)!r}'s backbone_scale and must be in (0, 0.5], "
                             f"got {downsample_ratio}")
    elif background_frame is not None:
        raise ValueError(f"model {_name(model)!r} takes no background frame; background_frame "
                         "(--background-frame) is for background-matting models such as bgmv2_mobilenetv2")


def check_background_frame(background_frame: PathLike, input_source: PathLike) -> None:
    """The background frame (an image, or a video matched frame by frame) opens, has the input's
    size and, for a video, at least as many frames as the input declares; else a one-line error."""
    check_source(background_frame)
    with open_source(input_source) as source, open_source(background_frame) as background:
        if (background.width, background.height) != (source.width, source.height):
            raise ValueError(f"background frame {str(background_frame)!r} is {background.width}x{background.height} "
                             f"but the input is {source.width}x{source.height}; capture it at the input's size")
        if (not _is_still(background_frame) and background.num_frames and source.num_frames
                and background.num_frames < source.num_frames):
            raise ValueError(f"background video {str(background_frame)!r} has {background.num_frames} frames but "
                             f"the input has {source.num_frames}; give an image or a video at least as long")


def _is_still(path: PathLike) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


class CapturedBackground:
    """The captured background of one conversion: ``matte(model, src)`` runs the model on a chunk
    ``src [1, T, 3, H, W]`` with the next ``T`` background frames and returns ``fgr, pha`` shaped
    like the chunk. Sides that are not multiples of 4 (BGMv2 needs them) are replicate-padded and
    cropped back; ``scale`` is the model's ``backbone_scale`` for this run."""

    def __init__(self, path: PathLike, scale: Optional[float], device: torch.device, dtype: torch.dtype) -> None:
        self.path, self.scale, self.device, self.dtype = Path(path), scale, device, dtype
        self._still: Optional[torch.Tensor] = None
        self._frames: Optional[Iterator[np.ndarray]] = None
        self._used = 0
        if _is_still(self.path):
            with open_source(self.path) as image:
                self._still = self._tensor(next(iter(image))[None])
        else:
            self._source = open_source(self.path)
            self._frames = iter(self._source)

    def _tensor(self, frames: np.ndarray) -> torch.Tensor:
        frames = np.require(frames, requirements=["C", "W"])
        return torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).contiguous().to(self.dtype).div(255)

    def _next(self, count: int) -> torch.Tensor:
        if self._still is not None:
            return self._still.expand(count, -1, -1, -1)
        assert self._frames is not None
        frames = []
        for _ in range(count):
            frame = next(self._frames, None)
            if frame is None:
                raise ValueError(f"background video {str(self.path)!r} ran out after {self._used} frames; "
                                 "give an image or a video at least as long as the input")
            frames.append(frame)
            self._used += 1
        return self._tensor(np.stack(frames))

    def matte(self, model: torch.nn.Module, src: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``fgr [1, T, 3, H, W], pha [1, T, 1, H, W]`` of ``model(src, bgr)`` for the chunk ``src``."""
        images = src[0]
        bgr = self._next(images.shape[0])
        h, w = images.shape[-2:]
        pad = (0, -w % 4, 0, -h % 4)
        if any(pad):
            images, bgr = F.pad(images, pad, mode="replicate"), F.pad(bgr, pad, mode="replicate")
        previous = getattr(model, "backbone_scale", None)
        if self.scale is not None and previous is not None:
            model.backbone_scale = self.scale
        try:
            pha, fgr = model(images, bgr)[:2]
        finally:
            if self.scale is not None and previous is not None:
                model.backbone_scale = previous
        return fgr[None, :, :, :h, :w], pha[None, :, :, :h, :w]

    def close(self) -> None:
        """Release the background video, if one is open."""
        if self._frames is not None:
            self._source.close()
