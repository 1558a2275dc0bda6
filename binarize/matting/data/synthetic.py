"""A procedural matting dataset: known alpha and foreground, generated on the fly with no download.

Each clip is a "person-like" foreground (head, torso and two thin swinging arms with soft edges of
a per-clip width, hair strands one to two pixels wide, sometimes a semi-transparent veil; painted in
skin tones, a hair cap and a plain or striped shirt, shaded and finely textured, as a subject in
focus) that moves, turns and scales smoothly over time, composited on a defocused textured background
(smooth colour noise plus gratings) that is either static or panning with a moving blurry distractor. Everything is evaluated
with vectorised numpy on pixel grids, so a 64-frame 512x288 clip takes about a second.

Samples have the VideoMatte format: ``(fgr [T, 3, H, W], pha [T, 1, H, W], bgr [T, 3, H, W])``, float32
in [0, 1], with ``composite(fgr, pha, bgr) = fgr * pha + bgr * (1 - pha)`` reproducing the layered image.
A clip depends only on ``(seed, split, index)``, so any worker can build any clip.
"""
from __future__ import annotations

import os
import pathlib
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["SyntheticMatting", "composite", "parse_size", "write_synthetic", "BACKGROUND_MODES"]

BACKGROUND_MODES = ("mixed", "static", "moving")
SizeLike = Union[int, str, Sequence[int]]


def parse_size(size: SizeLike) -> Tuple[int, int]:
    """``(width, height)`` from an int (square), a ``"WxH"`` string or a ``(width, height)`` pair."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must look like WIDTHxHEIGHT (e.g. 512x288), got {size!r}")
        width, height = int(parts[0]), int(parts[1])
    elif isinstance(size, (int, np.integer)):
        width = height = int(size)
    else:
        values = list(size)
        if len(values) != 2:
            raise ValueError(f"size must be (width, height), got {size!r}")
        width, height = int(values[0]), int(values[1])
    if width < 8 or height < 8:
        raise ValueError(f"size must be at least 8x8, got {width}x{height}")
    return width, height


def composite(fgr: Tensor, pha: Tensor, bgr: Tensor) -> Tensor:
    """Alpha-composite a foreground over a background: ``fgr * pha + bgr * (1 - pha)``."""
    return fgr * pha + bgr * (1 - pha)


# ----------------------------------------------------------------------------- textures


def _lerp_indices(coords: np.ndarray, cells: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left/right cell indices on a periodic grid and the right weight, for 1-D float grid coordinates."""
    floor = np.floor(coords)
    frac = (coords - floor).astype(np.float32)
    left = floor.astype(np.int64) % cells
    return left, (left + 1) % cells, frac


def _sample_grid(grid: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinearly sample a periodic ``[C, g, g]`` grid on the separable lattice ``ys x xs`` -> ``[C, H, W]``.

    Axis-aligned sampling interpolates rows then columns: two cheap gathers instead of per-pixel ones
    (and no BLAS threads, which stall on a busy machine).
    """
    top, bottom, fy = _lerp_indices(ys, grid.shape[1])
    rows = grid[:, top, :] * (1 - fy)[:, None] + grid[:, bottom, :] * fy[:, None]  # [C, H, g]
    left, right, fx = _lerp_indices(xs, grid.shape[2])
    return rows[:, :, left] * (1 - fx) + rows[:, :, right] * fx


@dataclass
class _Texture:
    """Two octaves of smooth periodic colour noise plus an oriented grating, defined on the whole plane."""

    coarse: np.ndarray  # [3, 8, 8]
    fine: np.ndarray  # [3, 16, 16]
    cell: float  # pixels per coarse cell
    wave: Tuple[float, float]  # (y, x) wave vector of the grating, radians per pixel
    grating_amp: float
    tint: np.ndarray  # [3]

    @classmethod
    def random(cls, rng: np.random.Generator, scale: float, palette: np.ndarray, coarse_std: float = 0.18,
               fine_std: float = 0.08) -> _Texture:
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(0.05, 0.4)
        return cls(
            coarse=(palette[:, None, None] + rng.normal(0, coarse_std, (3, 8, 8))).astype(np.float32),
            fine=rng.normal(0, fine_std, (3, 16, 16)).astype(np.float32),
            cell=float(scale / 4),
            wave=(float(freq * np.sin(angle)), float(freq * np.cos(angle))),
            grating_amp=float(rng.uniform(0.0, 0.12)),
            tint=(1 + rng.uniform(-0.1, 0.1, (3, 1, 1))).astype(np.float32),
        )

    def sample(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Colours ``[3, len(ys), len(xs)]`` on the lattice of plane coordinates ``ys x xs`` (pixels)."""
        colour = _sample_grid(self.coarse, ys / self.cell, xs / self.cell)
        colour += _sample_grid(self.fine, ys / (self.cell / 4), xs / (self.cell / 4))
        ay, ax = self.wave[0] * ys, self.wave[1] * xs  # sin(a + b) = sin a cos b + cos a sin b
        wave = np.outer(np.sin(ay), np.cos(ax)) + np.outer(np.cos(ay), np.sin(ax))
        colour += (self.grating_amp * wave.astype(np.float32))[None] * self.tint
        return colour


class _Canvas:
    """A texture rendered once over every integer offset a clip needs; frames are crops of it.

    ``crop(oy, ox)`` equals ``texture.sample(ys - oy, xs - ox)`` for integer offsets, so moving content
    costs a slice per frame instead of a resampling.
    """

    def __init__(self, texture: _Texture, offsets: np.ndarray, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.min_y, self.min_x = int(offsets[:, 0].min()), int(offsets[:, 1].min())
        span_y = int(offsets[:, 0].max()) - self.min_y + height
        span_x = int(offsets[:, 1].max()) - self.min_x + width
        ys = np.arange(span_y, dtype=np.float32) - float(offsets[:, 0].max())
        xs = np.arange(span_x, dtype=np.float32) - float(offsets[:, 1].max())
        self.max_y, self.max_x = int(offsets[:, 0].max()), int(offsets[:, 1].max())
        self.pixels = texture.sample(ys, xs)

    def crop(self, oy: int, ox: int) -> np.ndarray:
        top, left = self.max_y - int(oy), self.max_x - int(ox)
        return self.pixels[:, top:top + self.height, left:left + self.width]


# ----------------------------------------------------------------------------- shapes


def _ellipse_distance(u: np.ndarray, v: np.ndarray, cy: float, cx: float, ry: float, rx: float,
                      angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance (pixels, negative inside) to a rotated ellipse."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    dy, dx = u - float(cy), v - float(cx)
    ey = (c * dy - s * dx) * (1.0 / ry)
    ex = (s * dy + c * dx) * (1.0 / rx)
    return (np.sqrt(ey * ey + ex * ex) - 1.0) * float(min(ry, rx))


def _soft_edge(distance: np.ndarray, width: float) -> np.ndarray:
    """Alpha from a signed distance: 1 inside, 0 outside, a smoothstep ramp ``width`` pixels wide."""
    t = np.clip(0.5 - distance * (1.0 / float(width)), 0.0, 1.0)
    return (t * t * (3 - 2 * t)).astype(np.float32)


def _splat(points_y: np.ndarray, points_x: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Accumulate bilinear weights of sub-pixel points into an image (anti-aliased thin curves)."""
    h, w = shape
    y0 = np.floor(points_y).astype(np.int64)
    x0 = np.floor(points_x).astype(np.int64)
    wy = points_y - y0
    wx = points_x - x0
    acc = np.zeros(h * w, np.float64)
    for dy, dx, weight in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx),
                           (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        acc += np.bincount(yy[ok] * w + xx[ok], weights=weight[ok], minlength=h * w)
    return acc.reshape(h, w).astype(np.float32)


# Natural hair and skin tones (RGB in [0, 1]); clothing takes any colour.
_SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.90, 0.70, 0.55], [0.78, 0.57, 0.42], [0.62, 0.43, 0.30],
                        [0.45, 0.30, 0.20], [0.30, 0.20, 0.14]], np.float32)
_HAIR_TONES = np.array([[0.06, 0.05, 0.04], [0.20, 0.12, 0.07], [0.40, 0.25, 0.12], [0.75, 0.60, 0.35],
                        [0.55, 0.22, 0.08], [0.70, 0.70, 0.70]], np.float32)


@dataclass
class _Actor:
    """Per-clip parameters of the moving foreground."""

    scale: float
    center: np.ndarray  # [2] start position (y, x) in pixels
    amplitude: np.ndarray  # [2]
    speed: np.ndarray  # [2] radians per frame
    phase: np.ndarray  # [2]
    turn: float  # max rotation (radians)
    edge: float  # soft edge width (pixels)
    texture: _Texture  # zero-mean fabric / skin detail, added to the part colours
    skin: np.ndarray  # [3] head, neck (and bare arms)
    shirt: np.ndarray  # [3]
    stripe: np.ndarray  # [3] second shirt colour (stripes)
    stripe_freq: float  # radians per pixel of object height; 0: a plain shirt
    sleeves: bool  # arms in the shirt's colour, else bare skin
    hair_colour: np.ndarray
    hair_angles: np.ndarray
    hair_lengths: np.ndarray
    hair_bends: np.ndarray
    hair_opacity: float
    veil_alpha: float  # 0: no veil
    veil_colour: np.ndarray
    arm_swing: float


def _random_actor(rng: np.random.Generator, width: int, height: int) -> _Actor:
    scale = min(width, height) * rng.uniform(0.4, 0.52)
    strands = int(rng.integers(12, 40))
    skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.9, 1.08, 3)
    hair = _HAIR_TONES[rng.integers(len(_HAIR_TONES))] * rng.uniform(0.85, 1.15, 3)
    return _Actor(
        scale=scale,
        center=np.array([height * rng.uniform(0.6, 0.72), width * rng.uniform(0.35, 0.65)]),
        amplitude=np.array([height * rng.uniform(0.02, 0.06), width * rng.uniform(0.05, 0.2)]),
        speed=rng.uniform(0.05, 0.25, 2),
        phase=rng.uniform(0, 2 * np.pi, 2),
        turn=float(rng.uniform(0.0, 0.25)),
        edge=float(rng.uniform(1.0, 5.0)),
        texture=_Texture.random(rng, scale / 2, np.zeros(3, np.float32), coarse_std=0.05, fine_std=0.06),
        skin=np.clip(skin, 0, 1).astype(np.float32),
        shirt=rng.uniform(0.05, 0.95, 3).astype(np.float32),
        stripe=rng.uniform(0.05, 0.95, 3).astype(np.float32),
        stripe_freq=float(rng.uniform(0.4, 1.2) if rng.random() < 0.4 else 0.0),
        sleeves=bool(rng.random() < 0.6),
        hair_colour=np.clip(hair, 0, 1).astype(np.float32),
        hair_angles=rng.uniform(-2.6, -0.5, strands),  # upper half of the head (y grows downwards)
        hair_lengths=rng.uniform(0.15, 0.45, strands) * scale,
        hair_bends=rng.uniform(-0.6, 0.6, strands),
        hair_opacity=float(rng.uniform(0.5, 0.95)),
        veil_alpha=float(rng.uniform(0.3, 0.7)) if rng.random() < 0.5 else 0.0,
        veil_colour=rng.uniform(0.3, 1.0, 3).astype(np.float32),
        arm_swing=float(rng.uniform(0.1, 0.5)),
    )


def _actor_center(actor: _Actor, t: int) -> np.ndarray:
    return actor.center + actor.amplitude * np.sin(actor.speed * t + actor.phase)


def _actor_layers(actor: _Actor, t: int, ys: np.ndarray, xs: np.ndarray, texture: _Canvas):
    """Colour and alpha layers (back to front) of the actor at frame ``t`` on the pixel lattice ``ys x xs``.

    The body is one opaque layer (the union of head, neck, torso and arms, with one soft edge); its
    colour is painted per part, as a person looks: skin-toned head and neck with a hair cap, a plain
    or striped shirt, arms in sleeves or bare, all shaded darker towards the outline (a rounded body
    lit from the front) and carrying a fine zero-mean texture that follows the subject."""
    r = actor.scale
    center = _actor_center(actor, t)
    angle = float(actor.turn * np.sin(0.11 * t + actor.phase[0]))
    zoom = float(1.0 + 0.08 * np.sin(0.07 * t + actor.phase[1]))
    c, s = float(np.cos(angle)), float(np.sin(angle))
    dy = ((ys - float(center[0])) / zoom)[:, None]
    dx = ((xs - float(center[1])) / zoom)[None, :]
    u, v = c * dy + s * dx, -s * dy + c * dx  # rotated object coordinates (pixels)

    swing = actor.arm_swing * np.sin(0.2 * t + actor.phase[1])
    head = _ellipse_distance(u, v, -0.55 * r, 0.0, 0.24 * r, 0.2 * r)
    neck = _ellipse_distance(u, v, -0.3 * r, 0.0, 0.12 * r, 0.08 * r)
    torso = _ellipse_distance(u, v, 0.35 * r, 0.0, 0.55 * r, 0.38 * r)
    arms = np.minimum(_ellipse_distance(u, v, 0.2 * r, -0.55 * r, 0.5 * r, 0.05 * r, 0.5 + swing),
                      _ellipse_distance(u, v, 0.2 * r, 0.55 * r, 0.5 * r, 0.05 * r, -0.5 - swing))
    distance = np.minimum.reduce([head, neck, torso, arms])
    body_alpha = _soft_edge(distance * zoom, actor.edge)

    # part colours: the shirt (plain or striped in object coordinates), arms, skin, a hair cap
    shirt = actor.shirt[:, None, None]
    if actor.stripe_freq > 0:
        band = _soft_edge(-3.0 * np.sin(u * (12.0 * actor.stripe_freq / r)), 1.0)  # 2-4 stripes on the torso
        shirt = shirt + (actor.stripe[:, None, None] - shirt) * band[None]
    arm_colour = actor.shirt if actor.sleeves else actor.skin
    colour = np.where((arms < torso)[None], arm_colour[:, None, None], shirt)
    skin_part = (np.minimum(head, neck) < np.minimum(torso, arms))[None]
    colour = np.where(skin_part, actor.skin[:, None, None], colour)
    cap = (head < 0) & (u < -0.6 * r - 0.08 * r * np.cos(3.0 * v / r))  # hair on top of the head
    colour = np.where(cap[None], actor.hair_colour[:, None, None], colour)
    shade = 0.7 + 0.3 * np.clip(-distance / (0.15 * r), 0.0, 1.0)  # darker towards the outline
    # the texture follows the object's translation (to the pixel), not its small turn and zoom
    body_colour = np.clip(colour * shade[None] + texture.crop(*np.round(center)), 0, 1).astype(np.float32)
    layers = [(body_colour, body_alpha)]

    if actor.veil_alpha > 0:
        veil = _soft_edge(_ellipse_distance(u, v, 0.45 * r, 0.25 * r, 0.3 * r, 0.45 * r) * zoom, 3.0)
        layers.append((actor.veil_colour[:, None, None], veil * actor.veil_alpha))

    layers.append((actor.hair_colour[:, None, None],
                   _hair_alpha(actor, t, center, angle, zoom, (len(ys), len(xs)))))
    return body_colour, layers


def _hair_alpha(actor: _Actor, t: int, center: np.ndarray, angle: float, zoom: float,
                shape: Tuple[int, int]) -> np.ndarray:
    """Hair strands: curved one-pixel curves from the head outline, swaying over time."""
    r = actor.scale
    head = np.array([-0.55 * r, 0.0])
    steps = max(8, int(actor.hair_lengths.max() * 2))  # ~0.5 px spacing
    s = np.linspace(0.0, 1.0, steps)[None, :]
    theta = actor.hair_angles[:, None]
    sway = 0.3 * np.sin(0.25 * t + actor.hair_angles[:, None] * 3)
    bend = (actor.hair_bends[:, None] + sway) * s**2
    root_y = head[0] + 0.22 * r * np.sin(theta)
    root_x = head[1] + 0.2 * r * np.cos(theta)
    length = actor.hair_lengths[:, None] * s
    py = root_y + length * np.sin(theta + bend)
    px = root_x + length * np.cos(theta + bend)
    c, sn = np.cos(angle), np.sin(angle)
    img_y = center[0] + zoom * (c * py - sn * px)
    img_x = center[1] + zoom * (sn * py + c * px)
    density = _splat(img_y.ravel(), img_x.ravel(), shape) / (steps / (actor.hair_lengths.mean() + 1e-6))
    return ((1.0 - np.exp(-3.0 * density)) * actor.hair_opacity).astype(np.float32)


def _over(layers) -> Tuple[np.ndarray, np.ndarray]:
    """Porter-Duff "over" of (colour, alpha) layers listed back to front -> premultiplied colour, alpha."""
    colour, alpha = layers[0]
    premult = colour * alpha
    for colour, a in layers[1:]:
        premult = colour * a + premult * (1 - a)
        alpha = a + alpha * (1 - a)
    return premult, alpha


# ----------------------------------------------------------------------------- background


@dataclass
class _Scene:
    texture: _Texture
    velocity: np.ndarray  # pan in pixels per frame (y, x); zero for a static background
    blob_colour: np.ndarray
    blob_start: np.ndarray
    blob_velocity: np.ndarray
    blob_radius: float


def _pan(scene: _Scene, t: int) -> np.ndarray:
    """Integer offset of the background texture at frame ``t`` (the camera pans whole pixels)."""
    return -np.round(scene.velocity * t)


def _random_scene(rng: np.random.Generator, width: int, height: int, moving: bool) -> _Scene:
    scale = max(width, height) * rng.uniform(0.3, 0.8)
    speed = rng.uniform(0.5, 3.0) if moving else 0.0
    direction = rng.uniform(0, 2 * np.pi)
    return _Scene(
        # a defocused backdrop: the fine octave is weaker than on the subject, as behind a person in focus
        texture=_Texture.random(rng, scale, rng.uniform(0.15, 0.85, 3).astype(np.float32),
                                fine_std=float(rng.uniform(0.01, 0.06))),
        velocity=speed * np.array([np.sin(direction), np.cos(direction)]),
        blob_colour=rng.uniform(0, 1, 3).astype(np.float32),
        blob_start=np.array([rng.uniform(0, height), rng.uniform(0, width)]),
        blob_velocity=rng.uniform(-3, 3, 2) if moving else np.zeros(2),
        blob_radius=float(min(width, height) * rng.uniform(0.08, 0.2)),
    )


def _background(scene: _Scene, t: int, texture: _Canvas, out: np.ndarray) -> None:
    """Render background frame ``t`` into ``out [3, H, W]``: the panned texture and the distractor blob."""
    np.clip(texture.crop(*_pan(scene, t)), 0, 1, out=out)
    height, width = out.shape[1:]
    cy, cx = scene.blob_start + scene.blob_velocity * t
    reach = scene.blob_radius * 1.3 + 1  # the soft edge ends 0.3 radius outside
    top, bottom = max(0, int(cy - reach)), min(height, int(cy + reach) + 1)
    left, right = max(0, int(cx - reach)), min(width, int(cx + reach) + 1)
    if top >= bottom or left >= right:
        return
    ys = np.arange(top, bottom, dtype=np.float32) - float(cy)
    xs = np.arange(left, right, dtype=np.float32) - float(cx)
    blob = _soft_edge(np.hypot(ys[:, None], xs[None, :]) - scene.blob_radius, scene.blob_radius * 0.6)
    region = out[:, top:bottom, left:right]
    region += (scene.blob_colour[:, None, None] - region) * blob


# ----------------------------------------------------------------------------- dataset


class SyntheticMatting(Dataset):
    """Procedural video matting clips with exact alpha and foreground (no download needed).

    Args:
        clips: number of clips (the dataset length).
        frames: frames per clip (T).
        size: ``(width, height)`` like PIL, a ``"WxH"`` string, or an int for a square.
        seed: base seed; clip ``i`` depends only on ``(seed, split, i)``.
        background: ``"static"`` (still textured image), ``"moving"`` (panning texture and a moving
            distractor) or ``"mixed"`` (each clip picks one at random).
        split: name mixed into the seed so that e.g. ``"train"`` and ``"eval"`` clips differ.
        transform: optional ``(fgr, pha, bgr) -> (fgr, pha, bgr)`` applied to each item (e.g.
            ``MotionAugmentation.videomatte_train((h, w))``); ``generate`` is never transformed.

    Items are ``(fgr [T, 3, H, W], pha [T, 1, H, W], bgr [T, 3, H, W])`` float32 tensors in [0, 1].
    """

    def __init__(self, clips: int = 8, frames: int = 16, size: SizeLike = (512, 288), seed: int = 0,
                 background: str = "mixed", split: str = "train",
                 transform: Optional[Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]] = None) -> None:
        if int(clips) < 1:
            raise ValueError(f"clips must be >= 1, got {clips}")
        if int(frames) < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        if background not in BACKGROUND_MODES:
            raise ValueError(f"background must be one of {', '.join(BACKGROUND_MODES)}, got {background!r}")
        self.clips = int(clips)
        self.frames = int(frames)
        self.width, self.height = parse_size(size)
        self.seed = int(seed)
        self.background = background
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return self.clips

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), index])

    def is_moving(self, index: int) -> bool:
        """Whether clip ``index`` has a moving background."""
        if self.background != "mixed":
            return self.background == "moving"
        return bool(self._rng(index).random() < 0.5)

    def generate(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clip ``index`` as float32 numpy arrays ``fgr [T, 3, H, W]``, ``pha [T, 1, H, W]``, ``bgr [T, 3, H, W]``."""
        if not 0 <= index < self.clips:
            raise IndexError(f"clip index {index} out of range for {self.clips} clips")
        moving = self.is_moving(index)
        rng = self._rng(index)
        rng.random()  # the draw used by is_moving
        actor = _random_actor(rng, self.width, self.height)
        scene = _random_scene(rng, self.width, self.height, moving)
        ys = np.arange(self.height, dtype=np.float32)
        xs = np.arange(self.width, dtype=np.float32)
        times = range(self.frames)
        actor_texture = _Canvas(actor.texture, np.array([np.round(_actor_center(actor, t)) for t in times]),
                                self.height, self.width)
        scene_texture = _Canvas(scene.texture, np.array([_pan(scene, t) for t in times]),
                                self.height, self.width)
        fgr = np.empty((self.frames, 3, self.height, self.width), np.float32)
        pha = np.empty((self.frames, 1, self.height, self.width), np.float32)
        bgr = np.empty_like(fgr)
        for t in range(self.frames):
            body_colour, layers = _actor_layers(actor, t, ys, xs, actor_texture)
            premult, alpha = _over(layers)
            # un-premultiply where visible; elsewhere the foreground is the body's own texture
            np.copyto(fgr[t], body_colour)
            np.divide(premult, alpha, out=fgr[t], where=alpha > 1e-6)
            np.clip(fgr[t], 0, 1, out=fgr[t])
            np.clip(alpha, 0, 1, out=pha[t, 0])
            if t > 0 and not moving:
                bgr[t] = bgr[0]  # a still background: render it once
            else:
                _background(scene, t, scene_texture, bgr[t])
        return fgr, pha, bgr

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor, Tensor]:
        if index < 0:
            index += self.clips
        fgr, pha, bgr = self.generate(index)
        sample = torch.from_numpy(fgr), torch.from_numpy(pha), torch.from_numpy(bgr)
        return self.transform(*sample) if self.transform is not None else sample

    @staticmethod
    def composite(fgr: Tensor, pha: Tensor, bgr: Tensor) -> Tensor:
        """Alpha-composite a sample: ``fgr * pha + bgr * (1 - pha)``."""
        return composite(fgr, pha, bgr)

    def __repr__(self) -> str:
        return (f"SyntheticMatting(clips={self.clips}, frames={self.frames}, size=({self.width}, "
                f"{self.height}), seed={self.seed}, background={self.background!r}, split={self.split!r})")


# ----------------------------------------------------------------------------- writer


def _frame_name(index: int, ext: str) -> str:
    return f"{index:04d}.{ext}"


def _write_clip(sample: Tuple[np.ndarray, np.ndarray, np.ndarray], folders: dict, ext: str, bar) -> None:
    """Write one clip's frames into ``folders`` (keys among fgr, pha, bgr, com) as 8-bit images."""
    from binarize.matting.data.imageio import save_gray, save_rgb

    fgr, pha, bgr = sample
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for t in range(len(pha)):
        name = _frame_name(t, ext)
        if "fgr" in folders:
            save_rgb(folders["fgr"] / name, fgr[t])
        if "pha" in folders:
            save_gray(folders["pha"] / name, pha[t])
        if "bgr" in folders:
            save_rgb(folders["bgr"] / name, bgr[t])
        if "com" in folders:
            save_rgb(folders["com"] / name, fgr[t] * pha[t] + bgr[t] * (1 - pha[t]))
        bar.update(1)


def write_synthetic(out: Union[str, os.PathLike], clips: int = 8, frames: int = 16,
                    size: SizeLike = (512, 288), seed: int = 0, eval_clips: Optional[int] = None,
                    motion_clips: int = 0, image_format: str = "png", overwrite: bool = False,
                    progress: bool = True) -> pathlib.Path:
    """Write a synthetic dataset to ``out`` in the VideoMatte240K training layout and the evaluation layout.

    Written (``W x H`` from ``size``, ``EXT`` from ``image_format``, clips and frames numbered ``0000``...)::

        out/synthetic.json                                    parameters, to regenerate the same data
        out/train/fgr/CLIP/NNNN.EXT, out/train/pha/CLIP/NNNN.EXT    training clips (split "train")
        out/backgrounds/images/CLIP.EXT                       first background frame of each training clip
        out/backgrounds/videos/CLIP/NNNN.EXT                  every background frame of each training clip
        out/videomatte_WxH/videomatte_static/CLIP/{com,fgr,pha,bgr}/NNNN.png   held-out clips, still background
        out/videomatte_WxH/videomatte_motion/CLIP/{com,fgr,pha,bgr}/NNNN.png   (only if motion_clips > 0)

    Evaluation clips always use PNG (lossless, as the official 512x288 set). Everything is written to a
    temporary sibling folder that is renamed to ``out`` at the end, so a failed run leaves nothing under
    ``out``; an existing non-empty ``out`` is an error unless ``overwrite`` is set.
    """
    import json
    import shutil

    from tqdm import tqdm

    from binarize._atomic import atomic_folder

    out = pathlib.Path(out)
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    eval_clips = clips if eval_clips is None else int(eval_clips)
    if eval_clips < 0 or motion_clips < 0:
        raise ValueError("eval_clips and motion_clips must be >= 0")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"output {out} already exists and is not empty (use overwrite / --overwrite)")
    width, height = parse_size(size)
    train = SyntheticMatting(clips, frames, (width, height), seed, background="mixed", split="train")
    still = SyntheticMatting(max(eval_clips, 1), frames, (width, height), seed, "static", split="eval")
    moving = SyntheticMatting(max(motion_clips, 1), frames, (width, height), seed, "moving", split="eval-motion")
    bench = f"videomatte_{width}x{height}"

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        total = frames * (clips + eval_clips + motion_clips)
        with tqdm(total=total, desc="synthetic frames", unit="frame", disable=not progress) as bar:
            for i in range(clips):
                clip = f"{i:04d}"
                sample = train.generate(i)
                folders = {k: tmp / "train" / k / clip for k in ("fgr", "pha")}
                folders["bgr"] = tmp / "backgrounds" / "videos" / clip
                _write_clip(sample, folders, image_format, bar)
                (tmp / "backgrounds" / "images").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folders["bgr"] / _frame_name(0, image_format),
                                tmp / "backgrounds" / "images" / f"{clip}.{image_format}")
            for dataset, generator, count in (("videomatte_static", still, eval_clips),
                                              ("videomatte_motion", moving, motion_clips)):
                for i in range(count):
                    base = tmp / bench / dataset / f"{i:04d}"
                    _write_clip(generator.generate(i), {k: base / k for k in ("com", "fgr", "pha", "bgr")}, "png", bar)
        meta = {"generator": "binarize.matting.data.SyntheticMatting", "clips": clips, "frames": frames,
                "size": [width, height], "seed": seed, "eval_clips": eval_clips, "motion_clips": motion_clips,
                "image_format": image_format, "splits": {"train": "train", "videomatte_static": "eval",
                                                         "videomatte_motion": "eval-motion"}}
        (tmp / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
