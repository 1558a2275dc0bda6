"""Small image-folder helpers shared by the datasets, the synthetic writer and the evaluator.

Images are read with Pillow and returned as float32 arrays in [0, 1] (8-bit values / 255, 16-bit / 65535);
folders are listed in sorted order and only image files count, so stray files such as ``.DS_Store``
never shift frame numbering.
"""
from __future__ import annotations

import os
import pathlib
from typing import List, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "list_images", "list_subdirs", "read_gray", "read_rgb", "save_gray", "save_rgb",
           "to_uint8"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PathLike = Union[str, os.PathLike]


def list_images(folder: PathLike) -> List[str]:
    """Sorted names of the image files in ``folder`` (FileNotFoundError if it is not a directory)."""
    path = pathlib.Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    return sorted(p.name for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def list_subdirs(folder: PathLike) -> List[str]:
    """Sorted names of the sub-directories of ``folder`` (hidden ones skipped)."""
    path = pathlib.Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"folder not found: {path}")
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _open(path: PathLike) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    return image


def read_gray(path: PathLike) -> np.ndarray:
    """A single-channel image as float32 ``[H, W]`` in [0, 1] (colour images are converted to L)."""
    image = _open(path)
    if image.mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.float32) / 255.0


def read_rgb(path: PathLike) -> np.ndarray:
    """A colour image as float32 ``[H, W, 3]`` in [0, 1] (16-bit grayscale scaled by 1/65535, not clipped)."""
    image = _open(path)
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Round values in [0, 1] to 8 bits (clipped)."""
    return np.clip(np.rint(np.asarray(array, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def _save(image: Image.Image, path: PathLike) -> None:
    path = pathlib.Path(path)
    if path.suffix.lower() == ".png":
        image.save(path, compress_level=1)
    elif path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)


def save_gray(path: PathLike, array: np.ndarray) -> None:
    """Save ``[H, W]`` (or ``[1, H, W]``) values in [0, 1] as an 8-bit grayscale image."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    _save(Image.fromarray(to_uint8(arr)), path)


def save_rgb(path: PathLike, array: np.ndarray) -> None:
    """Save ``[3, H, W]`` or ``[H, W, 3]`` values in [0, 1] as an 8-bit RGB image."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    _save(Image.fromarray(to_uint8(arr)), path)
