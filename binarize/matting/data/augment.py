"""RVM-style video augmentation on tensors: motion affine with easing, colour, noise, blur, sharpen, flip,
crop, pause, and frame-rate sampling.

The recipe and its probabilities follow RVM's ``dataset/augmentation.py`` (Lin et al., WACV 2022,
PeterL1n/RobustVideoMatting): a transform is drawn at two key frames and interpolated over the clip
through a random easing curve, so objects and cameras move smoothly, speed up, bounce or jump.
This is our own torch-only implementation (no torchvision, no easing_functions); frames are
``[T, C, H, W]`` float tensors in [0, 1]. Randomness comes from a ``random.Random`` (default: the
``random`` module, which DataLoader reseeds per worker), so a seeded generator reproduces a sample.

Conventions are torchvision's ``F.affine`` (which RVM calls): angles in degrees, positive turns
clockwise on screen (x right, y down); translations in pixels; shears in degrees; areas revealed by
an affine move are filled with 0.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "EASINGS",
    "random_easing",
    "lerp",
    "affine",
    "random_affine_params",
    "resized_crop",
    "target_crop_box",
    "random_resized_crop_params",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "adjust_sharpness",
    "gaussian_blur",
    "MotionAugmentation",
    "TrainFrameSampler",
    "ValidFrameSampler",
    "to_size",
]

Size = Union[int, Tuple[int, int]]
Rng = Any  # a random.Random, or the random module itself


def to_size(size: Size) -> Tuple[int, int]:
    """``(height, width)`` from an int (square) or an ``(height, width)`` pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


# ----------------------------------------------------------------------------- easing

def _bounce_out(t: float) -> float:
    if t < 4 / 11:
        return 121 * t * t / 16
    if t < 8 / 11:
        return 363 / 40 * t * t - 99 / 10 * t + 17 / 5
    if t < 9 / 10:
        return 4356 / 361 * t * t - 35442 / 1805 * t + 16061 / 1805
    return 54 / 5 * t * t - 513 / 25 * t + 268 / 25


def _in_out(ease_in: Callable[[float], float]) -> Callable[[float], float]:
    return lambda t: ease_in(2 * t) / 2 if t < 0.5 else 1 - ease_in(2 - 2 * t) / 2


def _out(ease_in: Callable[[float], float]) -> Callable[[float], float]:
    return lambda t: 1 - ease_in(1 - t)


_EASE_IN: Dict[str, Callable[[float], float]] = {
    "quad": lambda t: t**2,
    "cubic": lambda t: t**3,
    "quartic": lambda t: t**4,
    "quintic": lambda t: t**5,
    "sine": lambda t: 1 - math.cos(t * math.pi / 2),
    "circular": lambda t: 1 - math.sqrt(max(0.0, 1 - t * t)),
    "exponential": lambda t: 0.0 if t == 0 else 2 ** (10 * (t - 1)),
    "back": lambda t: t**3 - t * math.sin(t * math.pi),
    "elastic": lambda t: math.sin(13 * math.pi / 2 * t) * 2 ** (10 * (t - 1)),
    "bounce": lambda t: 1 - _bounce_out(1 - t),
}

#: Easing curves ``[0, 1] -> R`` with ``f(0) = 0`` and ``f(1) = 1`` (Penner's family, as RVM uses, plus a step).
EASINGS: Dict[str, Callable[[float], float]] = {"linear": lambda t: t, "step": lambda t: 0.0 if t < 0.5 else 1.0}
for _name, _fn in _EASE_IN.items():
    EASINGS[f"{_name}_in"] = _fn
    EASINGS[f"{_name}_out"] = _out(_fn)
    EASINGS[f"{_name}_in_out"] = _in_out(_fn)


def random_easing(rng: Rng = random) -> Callable[[float], float]:
    """Linear with probability 0.2, otherwise any other easing curve uniformly (RVM's choice)."""
    if rng.random() < 0.2:
        return EASINGS["linear"]
    return EASINGS[rng.choice(sorted(k for k in EASINGS if k != "linear"))]


def lerp(a: float, b: float, percentage: float) -> float:
    """Linear interpolation from ``a`` (0) to ``b`` (1)."""
    return a * (1 - percentage) + b * percentage


def _progress(t: int, frames: int) -> float:
    return t / (frames - 1) if frames > 1 else 0.0


# ----------------------------------------------------------------------------- geometry

def _affine_theta(angle: float, translate: Tuple[float, float], scale: float, shear: Tuple[float, float],
                  height: int, width: int) -> Tensor:
    """``affine_grid`` matrix (output -> input, normalised coordinates) of a centred affine transform."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    # rotation-scale-shear R(rot) S(scale) SHy(sy) SHx(sx) on centred pixel coordinates (x right, y down),
    # the matrix torchvision's F.affine uses, so RVM's parameter ranges mean the same here
    forward = torch.tensor([
        [math.cos(rot - sy) / math.cos(sy), -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)],
        [math.sin(rot - sy) / math.cos(sy), -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)],
    ], dtype=torch.float64) * scale
    inverse = torch.linalg.inv(forward)
    d = torch.diag(torch.tensor([width / 2, height / 2], dtype=torch.float64))
    d_inv = torch.diag(torch.tensor([2 / width, 2 / height], dtype=torch.float64))
    linear = d_inv @ inverse @ d
    offset = -(d_inv @ inverse @ torch.tensor(translate, dtype=torch.float64))
    return torch.cat([linear, offset[:, None]], dim=1).float()


def affine(frames: Tensor, params: Sequence[Tuple[float, Tuple[float, float], float, Tuple[float, float]]],
           mode: str = "bilinear") -> Tensor:
    """Apply one ``(angle, (tx, ty), scale, (shear_x, shear_y))`` per frame to ``[T, C, H, W]`` frames."""
    t, _, h, w = frames.shape
    if len(params) != t:
        raise ValueError(f"need one affine parameter set per frame: {len(params)} for {t} frames")
    theta = torch.stack([_affine_theta(*p, height=h, width=w) for p in params]).to(frames.dtype)
    grid = F.affine_grid(theta, list(frames.shape), align_corners=False)
    return F.grid_sample(frames, grid, mode=mode, padding_mode="zeros", align_corners=False)


def random_affine_params(rng: Rng, height: int, width: int, degrees: float = 10.0, translate: float = 0.1,
                         scale: Tuple[float, float] = (0.9, 1.1), shear: float = 5.0):
    """Draw ``(angle, (tx, ty), scale, (shear_x, 0))`` like torchvision's ``RandomAffine.get_params``."""
    angle = rng.uniform(-degrees, degrees)
    tx = round(rng.uniform(-translate * width, translate * width))
    ty = round(rng.uniform(-translate * height, translate * height))
    return angle, (float(tx), float(ty)), rng.uniform(*scale), (rng.uniform(-shear, shear), 0.0)


def random_resized_crop_params(rng: Rng, height: int, width: int, scale: Tuple[float, float] = (1.0, 1.0),
                               ratio: Tuple[float, float] = (0.9, 1.1)) -> Tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop with a random area fraction and log-uniform aspect ratio."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the central crop with the nearest allowed ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def target_crop_box(rng: Rng, height: int, width: int, size: Size, scale: Tuple[float, float] = (1.0, 1.0),
                    ratio: Tuple[float, float] = (1.0, 1.0)) -> Tuple[int, int, int, int]:
    """A crop box for an output of ``size``: its aspect ratio is the output's times a factor from ``ratio``
    and its area a fraction ``scale`` of the image (RVM's crops, whose targets are square). With
    ``scale == ratio == (1, 1)`` it is the deterministic largest centred crop of the output's aspect."""
    out_h, out_w = to_size(size)
    target = out_w / out_h
    if tuple(scale) == (1.0, 1.0) and tuple(ratio) == (1.0, 1.0):
        ch, cw = (height, min(width, round(height * target))) if width / height >= target \
            else (min(height, round(width / target)), width)
        return (height - ch) // 2, (width - cw) // 2, max(ch, 1), max(cw, 1)
    return random_resized_crop_params(rng, height, width, scale, (ratio[0] * target, ratio[1] * target))


def resized_crop(frames: Tensor, box: Tuple[int, int, int, int], size: Size, mode: str = "bilinear") -> Tensor:
    """Crop ``box = (top, left, h, w)`` of ``[T, C, H, W]`` frames and resize it to ``size``."""
    top, left, h, w = box
    crop = frames[..., top:top + h, left:left + w]
    out_h, out_w = to_size(size)
    if (h, w) == (out_h, out_w):
        return crop.contiguous()
    if mode == "nearest":
        return F.interpolate(crop, size=(out_h, out_w), mode="nearest")
    return F.interpolate(crop, size=(out_h, out_w), mode="bilinear", align_corners=False,
                         antialias=out_h < h or out_w < w).clamp(0, 1)


# ----------------------------------------------------------------------------- colour and filters

def rgb_to_grayscale(img: Tensor) -> Tensor:
    """ITU-R 601 luma of ``[..., 3, H, W]`` as 3 equal channels."""
    luma = 0.299 * img[..., 0:1, :, :] + 0.587 * img[..., 1:2, :, :] + 0.114 * img[..., 2:3, :, :]
    return luma.expand_as(img).contiguous()


def adjust_brightness(img: Tensor, factor: float) -> Tensor:
    """Scale intensities by ``factor`` (clipped to [0, 1])."""
    return (img * factor).clamp(0, 1)


def adjust_contrast(img: Tensor, factor: float) -> Tensor:
    """Blend with the image's mean grey level: 0 gives flat grey, 1 the image, > 1 more contrast."""
    mean = rgb_to_grayscale(img)[..., :1, :, :].mean(dim=(-3, -2, -1), keepdim=True)
    return (img * factor + mean * (1 - factor)).clamp(0, 1)


def adjust_saturation(img: Tensor, factor: float) -> Tensor:
    """Blend with the grayscale image: 0 gives grey, 1 the image, > 1 more saturated."""
    return (img * factor + rgb_to_grayscale(img) * (1 - factor)).clamp(0, 1)


def adjust_hue(img: Tensor, shift: float) -> Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]) through the HSV colour space."""
    r, g, b = img.unbind(-3)
    maxc, _ = img.max(dim=-3)
    minc, _ = img.min(dim=-3)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift) % 1.0
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    # HSV -> RGB: channel n takes v - v s max(0, min(k, 4 - k, 1)) with k = (n + 6 h) mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + hue * 6) % 6
        out.append(maxc - maxc * sat * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, dim=-3)


def adjust_sharpness(img: Tensor, factor: float) -> Tensor:
    """Blend with a 3x3 smoothed copy (weights 1,1,1/1,5,1/1,1,1 over 13; border kept), like PIL/torchvision."""
    shape = img.shape
    flat = img.reshape(-1, 1, shape[-2], shape[-1])
    if shape[-1] <= 2 or shape[-2] <= 2:
        return img
    kernel = torch.ones(1, 1, 3, 3, dtype=img.dtype, device=img.device)
    kernel[0, 0, 1, 1] = 5.0
    smooth = flat.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(flat, kernel / 13.0)
    out = flat * factor + smooth * (1 - factor)
    return out.clamp(0, 1).reshape(shape)


def gaussian_blur(img: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[..., H, W]`` with reflect padding."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    shape = img.shape
    flat = img.reshape(-1, 1, shape[-2], shape[-1])
    half = kernel_size // 2
    x = torch.arange(-half, half + 1, dtype=img.dtype, device=img.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    pad_h, pad_w = min(half, shape[-2] - 1), min(half, shape[-1] - 1)
    if pad_w > 0:
        flat = F.conv2d(F.pad(flat, (pad_w, pad_w, 0, 0), mode="reflect"),
                        kernel[half - pad_w:half + pad_w + 1].view(1, 1, 1, -1))
    if pad_h > 0:
        flat = F.conv2d(F.pad(flat, (0, 0, pad_h, pad_h), mode="reflect"),
                        kernel[half - pad_h:half + pad_h + 1].view(1, 1, -1, 1))
    return flat.reshape(shape)


# ----------------------------------------------------------------------------- the recipe

class SeededRandom:
    """Mixin for classes drawing from ``self.rng`` (a ``random.Random``) or, when it is None, from
    the ``random`` module, which is not stored on the instance so that it pickles for spawned
    DataLoader workers."""

    rng: Optional[random.Random] = None

    @property
    def random(self) -> Any:
        """The generator in use."""
        return self.rng if self.rng is not None else random


class MotionAugmentation(SeededRandom):
    """RVM's video matting augmentation of ``(fgr [T,3,H,W], pha [T,1,H,W], bgr [T,3,H,W])``.

    In order, each with its probability: foreground motion affine; background motion affine (p/2)
    and joint motion affine (p/2); a still affine (foreground scale 0.5-1, background 1-1.5, if
    ``static_affine``); a crop of aspect ratio in ``aspect_ratio_range`` resized to ``size``
    ``(height, width)``; horizontal flips (foreground and background apart); film-grain noise; eased
    colour jitter; grayscale; sharpening (factor 0-8); eased Gaussian blur (p/3 each: foreground,
    background, both); a pause that freezes a run of frames.
    """

    def __init__(self, size: Size, prob_fgr_affine: float = 0.0, prob_bgr_affine: float = 0.0,
                 prob_noise: float = 0.0, prob_color_jitter: float = 0.0, prob_grayscale: float = 0.0,
                 prob_sharpness: float = 0.0, prob_blur: float = 0.0, prob_hflip: float = 0.0,
                 prob_pause: float = 0.0, static_affine: bool = True,
                 aspect_ratio_range: Tuple[float, float] = (0.9, 1.1), rng: Optional[random.Random] = None) -> None:
        self.size = to_size(size)
        self.prob_fgr_affine = prob_fgr_affine
        self.prob_bgr_affine = prob_bgr_affine
        self.prob_noise = prob_noise
        self.prob_color_jitter = prob_color_jitter
        self.prob_grayscale = prob_grayscale
        self.prob_sharpness = prob_sharpness
        self.prob_blur = prob_blur
        self.prob_hflip = prob_hflip
        self.prob_pause = prob_pause
        self.static_affine = static_affine
        self.aspect_ratio_range = aspect_ratio_range
        self.rng: Optional[random.Random] = rng

    # presets (RVM's VideoMatteTrainAugmentation / ImageMatteAugmentation / valid)
    @classmethod
    def videomatte_train(cls, size: Size, **kw) -> MotionAugmentation:
        """RVM's VideoMatte training probabilities."""
        return cls(size, 0.3, 0.3, 0.1, 0.3, 0.02, 0.1, 0.02, 0.5, 0.03, **kw)

    @classmethod
    def imagematte_train(cls, size: Size, **kw) -> MotionAugmentation:
        """RVM's ImageMatte training probabilities (still mattes need the motion affine)."""
        return cls(size, 0.95, 0.3, 0.05, 0.3, 0.03, 0.05, 0.02, 0.5, 0.03, **kw)

    @classmethod
    def valid(cls, size: Size, **kw) -> MotionAugmentation:
        """No randomness but the still affine and crop of RVM's validation preset (``static_affine=False``
        here by default, so validation samples are a deterministic centre crop)."""
        kw.setdefault("static_affine", False)
        kw.setdefault("aspect_ratio_range", (1.0, 1.0))
        return cls(size, **kw)

    def __call__(self, fgr: Tensor, pha: Tensor, bgr: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        rng = self.random
        if rng.random() < self.prob_fgr_affine:
            fgr, pha = self._motion_affine(fgr, pha)
        if rng.random() < self.prob_bgr_affine / 2:
            (bgr,) = self._motion_affine(bgr)
        if rng.random() < self.prob_bgr_affine / 2:
            fgr, pha, bgr = self._motion_affine(fgr, pha, bgr)
        if self.static_affine:
            fgr, pha = self._static_affine(fgr, pha, scale=(0.5, 1.0))
            (bgr,) = self._static_affine(bgr, scale=(1.0, 1.5))
        fgr, pha = self._crop(fgr, pha)
        (bgr,) = self._crop(bgr)
        if rng.random() < self.prob_hflip:
            fgr, pha = fgr.flip(-1), pha.flip(-1)
        if rng.random() < self.prob_hflip:
            bgr = bgr.flip(-1)
        if rng.random() < self.prob_noise:
            fgr, bgr = self._noise(fgr, bgr)
        if rng.random() < self.prob_color_jitter:
            fgr = self._color_jitter(fgr)
        if rng.random() < self.prob_color_jitter:
            bgr = self._color_jitter(bgr)
        if rng.random() < self.prob_grayscale:
            fgr, bgr = rgb_to_grayscale(fgr), rgb_to_grayscale(bgr)
        if rng.random() < self.prob_sharpness:
            factor = rng.random() * 8
            fgr, pha, bgr = (adjust_sharpness(x, factor) for x in (fgr, pha, bgr))
        if rng.random() < self.prob_blur / 3:
            fgr, pha = self._blur(fgr, pha)
        if rng.random() < self.prob_blur / 3:
            (bgr,) = self._blur(bgr)
        if rng.random() < self.prob_blur / 3:
            fgr, pha, bgr = self._blur(fgr, pha, bgr)
        if rng.random() < self.prob_pause:
            fgr, pha, bgr = self._pause(fgr, pha, bgr)
        return fgr.contiguous(), pha.contiguous(), bgr.contiguous()

    def _static_affine(self, *clips: Tensor, scale: Tuple[float, float]) -> List[Tensor]:
        h, w = clips[0].shape[-2:]
        params = random_affine_params(self.random, h, w, degrees=10, translate=0.1, scale=scale, shear=5)
        return [affine(c, [params] * len(c)) for c in clips]

    def _motion_affine(self, *clips: Tensor) -> List[Tensor]:
        h, w = clips[0].shape[-2:]
        start = random_affine_params(self.random, h, w)
        end = random_affine_params(self.random, h, w)
        easing = random_easing(self.random)
        frames = len(clips[0])
        params = []
        for t in range(frames):
            p = easing(_progress(t, frames))
            params.append((lerp(start[0], end[0], p),
                           (lerp(start[1][0], end[1][0], p), lerp(start[1][1], end[1][1], p)),
                           lerp(start[2], end[2], p),
                           (lerp(start[3][0], end[3][0], p), lerp(start[3][1], end[3][1], p))))
        return [affine(c, params) for c in clips]

    def _crop(self, *clips: Tensor) -> List[Tensor]:
        h, w = clips[0].shape[-2:]
        box = target_crop_box(self.random, h, w, self.size, (1.0, 1.0), self.aspect_ratio_range)
        return [resized_crop(c, box, self.size) for c in clips]

    def _noise(self, *clips: Tensor) -> List[Tensor]:
        grain = self.random.random() * 3 + 1
        monochrome = self.random.random() < 0.5
        generator = torch.Generator().manual_seed(self.random.randrange(2**62))
        out = []
        for clip in clips:
            t, c, h, w = clip.shape
            noise = torch.randn((t, 1 if monochrome else c, max(1, round(h / grain)), max(1, round(w / grain))),
                                generator=generator)
            noise = noise * (self.random.random() * 0.2 / grain)
            if grain != 1:
                noise = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)
            out.append((clip + noise.to(clip.dtype)).clamp(0, 1))
        return out

    def _color_jitter(self, clip: Tensor) -> Tensor:
        draws = [self.random.gauss(0, 0.1) for _ in range(8)]
        bright_a, bright_b, contrast_a, contrast_b, sat_a, sat_b, hue_a, hue_b = draws
        strength = self.random.random() * 0.2
        easing = random_easing(self.random)
        frames = []
        for t in range(len(clip)):
            p = easing(_progress(t, len(clip))) * strength
            x = adjust_brightness(clip[t], max(1 + lerp(bright_a, bright_b, p), 0.1))
            x = adjust_contrast(x, max(1 + lerp(contrast_a, contrast_b, p), 0.1))
            x = adjust_saturation(x, max(1 + lerp(sat_a, sat_b, p), 0.1))
            x = adjust_hue(x, min(0.5, max(-0.5, lerp(hue_a, hue_b, p) * 0.1)))
            frames.append(x)
        return torch.stack(frames)

    def _blur(self, *clips: Tensor) -> List[Tensor]:
        start, end = self.random.random() * 10, self.random.random() * 10
        easing = random_easing(self.random)
        frames = len(clips[0])
        out = [c.clone() for c in clips]
        for t in range(frames):
            sigma = max(lerp(start, end, easing(_progress(t, frames))), 0.0)
            if sigma > 0:
                size = int(sigma * 2)
                size += 1 if size % 2 == 0 else 0
                for clip in out:
                    clip[t] = gaussian_blur(clip[t], size, sigma)
        return out

    def _pause(self, *clips: Tensor) -> List[Tensor]:
        frames = len(clips[0])
        if frames < 2:
            return list(clips)
        start = self.random.randrange(frames - 1)
        length = self.random.randrange(frames - start)
        out = [c.clone() for c in clips]
        for clip in out:
            clip[start + 1:start + length] = clip[start]
        return out


class TrainFrameSampler(SeededRandom):
    """Frame offsets of a training sequence: a random speed (0.5x-5x, frame-rate change), a random
    shift and, half of the time, reversed (RVM)."""

    def __init__(self, speeds: Sequence[float] = (0.5, 1, 2, 3, 4, 5), rng: Optional[random.Random] = None):
        self.speeds = tuple(speeds)
        self.rng: Optional[random.Random] = rng

    def __call__(self, seq_length: int) -> List[int]:
        speed = self.random.choice(self.speeds)
        shift = self.random.randrange(seq_length)
        frames = [int(f * speed) + shift for f in range(seq_length)]
        if self.random.random() < 0.5:
            frames = frames[::-1]
        return frames


class ValidFrameSampler:
    """Consecutive frames ``0 .. seq_length - 1``."""

    def __call__(self, seq_length: int) -> List[int]:
        return list(range(seq_length))
