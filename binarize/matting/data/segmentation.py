"""Person segmentation datasets for RVM/BiMatting's interleaved segmentation passes.

Layouts (as downloaded, RVM's ``dataset/coco.py``, ``spd.py``, ``youtubevis.py``)::

    COCO panoptic:      imgdir/NAME.jpg, anndir/NAME.png (panoptic PNG), annfile (panoptic JSON)
    Supervisely Person: imgdir/NAME.*, segdir/NAME.* (binary masks; paired in sorted order)
    YouTubeVIS:         videodir/VIDEO/NNNNN.jpg, annfile (instances JSON with per-frame RLE masks)

Every dataset yields ``(img [T, 3, H, W], seg [T, 1, H, W])`` in [0, 1]; the image sets give T = 1
so that all segmentation batches have the video shape. The person classes are COCO's person,
backpack and tie (ids 1, 27, 32) and YouTubeVIS's person (id 26), as in RVM.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from binarize.matting.data.augment import (
    SeededRandom,
    ValidFrameSampler,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    affine,
    random_affine_params,
    resized_crop,
    rgb_to_grayscale,
    target_crop_box,
    to_size,
)
from binarize.matting.data.backgrounds import load_image
from binarize.matting.data.imageio import list_images

__all__ = [
    "CocoPanopticDataset",
    "SuperviselyPersonDataset",
    "YouTubeVISDataset",
    "SegmentationAugmentation",
    "decode_rle",
    "COCO_PERSON_CATEGORIES",
    "YOUTUBEVIS_PERSON_CATEGORY",
]

PathLike = Union[str, os.PathLike]
SegTransform = Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]
COCO_PERSON_CATEGORIES = (1, 27, 32)  # person, backpack, tie
YOUTUBEVIS_PERSON_CATEGORY = 26


class SegmentationAugmentation(SeededRandom):
    """Augmentation of ``(img [T,3,H,W], seg [T,1,H,W])`` with one draw shared by all frames.

    Presets follow RVM: ``coco_train`` (affine +-20 deg, shift 0.1, shear 10; crop area 0.5-1, ratio
    0.7-1.3; flip; jitter 0.1), ``youtubevis_train`` (crop area 0.8-1, ratio 0.9-1.1; jitter 0.3/0.15;
    grayscale 0.05; flip) and ``valid`` (the largest centred crop of the output's aspect, resized).
    Crop ratios are relative to the output's aspect ratio (RVM's outputs are square). Masks are resampled with
    nearest neighbours, except for YouTubeVIS whose masks RVM resizes bilinearly.
    """

    def __init__(self, size: Any, affine_degrees: float = 0.0, affine_translate: float = 0.0,
                 affine_shear: float = 0.0, crop_scale: Tuple[float, float] = (1.0, 1.0),
                 crop_ratio: Tuple[float, float] = (1.0, 1.0), jitter: Tuple[float, float, float, float] = (0, 0, 0, 0),
                 prob_grayscale: float = 0.0, prob_hflip: float = 0.0, seg_mode: str = "nearest",
                 rng: Any = None) -> None:
        self.size = to_size(size)
        self.affine_degrees, self.affine_translate, self.affine_shear = affine_degrees, affine_translate, affine_shear
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.jitter = jitter
        self.prob_grayscale, self.prob_hflip = prob_grayscale, prob_hflip
        self.seg_mode = seg_mode
        self.rng: Optional[random.Random] = rng

    @classmethod
    def coco_train(cls, size: Any, **kw) -> SegmentationAugmentation:
        """RVM's COCO / Supervisely Person training augmentation."""
        return cls(size, 20.0, 0.1, 10.0, (0.5, 1.0), (0.7, 1.3), (0.1, 0.1, 0.1, 0.1), 0.0, 0.5, **kw)

    @classmethod
    def youtubevis_train(cls, size: Any, **kw) -> SegmentationAugmentation:
        """RVM's YouTubeVIS training augmentation."""
        return cls(size, 0.0, 0.0, 0.0, (0.8, 1.0), (0.9, 1.1), (0.3, 0.3, 0.3, 0.15), 0.05, 0.5,
                   seg_mode="bilinear", **kw)

    @classmethod
    def valid(cls, size: Any, **kw) -> SegmentationAugmentation:
        """No randomness: the largest centred crop of the output's aspect, resized."""
        return cls(size, **kw)

    def __call__(self, img: Tensor, seg: Tensor) -> Tuple[Tensor, Tensor]:
        rng = self.random
        h, w = img.shape[-2:]
        if self.affine_degrees or self.affine_translate or self.affine_shear:
            params = random_affine_params(rng, h, w, self.affine_degrees, self.affine_translate, (1.0, 1.0),
                                          self.affine_shear)
            img = affine(img, [params] * len(img))
            seg = affine(seg, [params] * len(seg), mode="nearest")
        box = target_crop_box(rng, h, w, self.size, self.crop_scale, self.crop_ratio)
        img = resized_crop(img, box, self.size)
        seg = resized_crop(seg, box, self.size, mode=self.seg_mode)
        if rng.random() < self.prob_hflip:
            img, seg = img.flip(-1), seg.flip(-1)
        img = self._color_jitter(img)
        if rng.random() < self.prob_grayscale:
            img = rgb_to_grayscale(img)
        return img.contiguous(), seg.contiguous()

    def _color_jitter(self, img: Tensor) -> Tensor:
        """torchvision ColorJitter semantics: factors in [1 - s, 1 + s] (hue shift in [-s, s]), random order."""
        brightness, contrast, saturation, hue = self.jitter
        ops: List[Callable[[Tensor], Tensor]] = []
        if brightness:
            f = self.random.uniform(max(0.0, 1 - brightness), 1 + brightness)
            ops.append(lambda x: adjust_brightness(x, f))
        if contrast:
            c = self.random.uniform(max(0.0, 1 - contrast), 1 + contrast)
            ops.append(lambda x: adjust_contrast(x, c))
        if saturation:
            s = self.random.uniform(max(0.0, 1 - saturation), 1 + saturation)
            ops.append(lambda x: adjust_saturation(x, s))
        if hue:
            shift = self.random.uniform(-hue, hue)
            ops.append(lambda x: adjust_hue(x, shift))
        self.random.shuffle(ops)
        for op in ops:
            img = op(img)
        return img


def _default(transform: Optional[SegTransform], size: Any) -> SegTransform:
    return transform if transform is not None else SegmentationAugmentation.valid(size)


class CocoPanopticDataset(Dataset):
    """COCO panoptic images that contain a person; the mask covers person, backpack and tie segments."""

    def __init__(self, imgdir: PathLike, anndir: PathLike, annfile: PathLike, size: Any = 512,
                 transform: Optional[SegTransform] = None) -> None:
        self.imgdir, self.anndir = pathlib.Path(imgdir), pathlib.Path(anndir)
        for folder in (self.imgdir, self.anndir):
            if not folder.is_dir():
                raise FileNotFoundError(f"COCO folder not found: {folder}")
        annfile = pathlib.Path(annfile)
        if not annfile.is_file():
            raise FileNotFoundError(f"COCO panoptic annotation file not found: {annfile}")
        try:
            annotations = json.loads(annfile.read_text())["annotations"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{annfile} is not a COCO panoptic annotation file ({exc})") from None
        self.data = [a for a in annotations if any(s["category_id"] == 1 for s in a["segments_info"])]
        if not self.data:
            raise ValueError(f"no image with a person in {annfile}")
        self.size = to_size(size)
        self.transform = _default(transform, self.size)

    def __len__(self) -> int:
        return len(self.data)

    def _mask(self, data: Dict[str, Any]) -> Tensor:
        path = self.anndir / data["file_name"]
        try:
            with Image.open(path) as ann:
                ids = np.asarray(ann.convert("RGB"), dtype=np.int64)
        except FileNotFoundError:
            raise FileNotFoundError(f"panoptic mask not found: {path}") from None
        ids = ids[..., 0] + 256 * ids[..., 1] + 256 * 256 * ids[..., 2]
        person = [s["id"] for s in data["segments_info"] if s["category_id"] in COCO_PERSON_CATEGORIES]
        return torch.from_numpy(np.isin(ids, person).astype(np.float32))[None]

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        data = self.data[index]
        img = load_image(self.imgdir / data["file_name"].replace(".png", ".jpg"), "RGB")
        return self.transform(img[None], self._mask(data)[None])


class SuperviselyPersonDataset(Dataset):
    """Supervisely Person: images and binary person masks, paired by sorted order."""

    def __init__(self, imgdir: PathLike, segdir: PathLike, size: Any = 512,
                 transform: Optional[SegTransform] = None) -> None:
        self.imgdir, self.segdir = pathlib.Path(imgdir), pathlib.Path(segdir)
        self.img_files, self.seg_files = list_images(self.imgdir), list_images(self.segdir)
        if len(self.img_files) != len(self.seg_files):
            raise ValueError(f"Supervisely Person: {len(self.img_files)} images in {self.imgdir} but "
                             f"{len(self.seg_files)} masks in {self.segdir}")
        if not self.img_files:
            raise ValueError(f"no images found in {self.imgdir}")
        self.size = to_size(size)
        self.transform = _default(transform, self.size)

    def __len__(self) -> int:
        return len(self.img_files)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        img = load_image(self.imgdir / self.img_files[index], "RGB")
        seg = load_image(self.segdir / self.seg_files[index], "L")
        return self.transform(img[None], (seg > 0.5).float()[None])


def decode_rle(rle: Dict[str, Any]) -> np.ndarray:
    """Decode a COCO run-length mask (``counts`` as a list, or as COCO's compressed string) to ``[H, W]`` bool."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = _rle_from_string(counts)
    flat = np.zeros(h * w, dtype=bool)
    position, value = 0, False
    for run in counts:
        if value:
            flat[position:position + run] = True
        position += run
        value = not value
    return flat.reshape(w, h).T  # column-major, as COCO stores it


def _rle_from_string(text: str) -> List[int]:
    """COCO's compressed RLE: 5-bit groups with a continuation bit, counts after the second delta-coded."""
    counts: List[int] = []
    p = 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            p += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


class YouTubeVISDataset(Dataset):
    """YouTubeVIS videos with a person; a sample is ``seq_length`` frames with the union of person masks."""

    def __init__(self, videodir: PathLike, annfile: PathLike, size: Any = 512, seq_length: int = 15,
                 seq_sampler: Optional[Callable[[int], Sequence[int]]] = None,
                 transform: Optional[SegTransform] = None) -> None:
        self.videodir = pathlib.Path(videodir)
        if not self.videodir.is_dir():
            raise FileNotFoundError(f"YouTubeVIS video folder not found: {self.videodir}")
        annfile = pathlib.Path(annfile)
        if not annfile.is_file():
            raise FileNotFoundError(f"YouTubeVIS annotation file not found: {annfile}")
        try:
            data = json.loads(annfile.read_text())
            videos, annotations = data["videos"], data["annotations"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{annfile} is not a YouTubeVIS annotation file ({exc})") from None
        self.masks: Dict[int, List[List[Dict[str, Any]]]] = {}
        for ann in annotations:
            if ann["category_id"] != YOUTUBEVIS_PERSON_CATEGORY:
                continue
            frames = self.masks.setdefault(ann["video_id"], [[] for _ in ann["segmentations"]])
            for frame, mask in zip(frames, ann["segmentations"]):
                if mask is not None:
                    frame.append(mask)
        self.videos = {v["id"]: v for v in videos if v["id"] in self.masks}
        if not self.videos:
            raise ValueError(f"no video with a person in {annfile}")
        self.index = [(vid, f) for vid, v in self.videos.items() for f in range(len(v["file_names"]))]
        self.size = to_size(size)
        self.short_side = max(self.size)
        self.seq_length = int(seq_length)
        self.seq_sampler = seq_sampler if seq_sampler is not None else ValidFrameSampler()
        self.transform = _default(transform, self.size)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor]:
        video_id, start = self.index[index]
        video = self.videos[video_id]
        names = video["file_names"]
        imgs, segs = [], []
        for offset in self.seq_sampler(self.seq_length):
            frame = (start + offset) % len(names)
            img = load_image(self.videodir / names[frame], "RGB")
            mask = np.zeros((video["height"], video["width"]), dtype=bool)
            for rle in self.masks[video_id][frame]:
                mask |= decode_rle(rle)
            seg = torch.from_numpy(mask.astype(np.float32))[None]
            imgs.append(img)
            segs.append(seg)
        img, seg = torch.stack(imgs), torch.stack(segs)
        if min(img.shape[-2:]) > self.short_side:  # RVM shrinks large videos before augmenting
            scale = self.short_side / min(img.shape[-2:])
            hw = (int(img.shape[-2] * scale), int(img.shape[-1] * scale))
            img = torch.nn.functional.interpolate(img, size=hw, mode="bilinear", align_corners=False, antialias=True)
            seg = torch.nn.functional.interpolate(seg, size=hw, mode="nearest")
        return self.transform(img, seg)
