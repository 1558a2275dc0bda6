"""ImageMatte: still image mattes (Distinctions-646 and Adobe Image Matting) turned into sequences.

Layout (RVM's ``ImageMatte/train``; D646 and AIM may be merged in one folder or given as several)::

    imagematte_dir/fgr/NAME.jpg
    imagematte_dir/pha/NAME.jpg      same names as fgr

An item repeats one foreground over ``seq_length`` frames on a random background; motion comes from
the augmentation (RVM's ``ImageMatteAugmentation`` applies the motion affine with probability 0.95).
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from torch import Tensor
from torch.utils.data import Dataset

from binarize.matting.data.augment import MotionAugmentation
from binarize.matting.data.backgrounds import load_image, setup_sequences
from binarize.matting.data.imageio import list_images

__all__ = ["ImageMatteDataset", "ImageMatteAugmentation"]

PathLike = Union[str, os.PathLike]


def ImageMatteAugmentation(size) -> MotionAugmentation:  # noqa: N802  (RVM's class name)
    """RVM's ImageMatte training augmentation (foreground motion affine 0.95, ...) to ``size``."""
    return MotionAugmentation.imagematte_train(size)


class ImageMatteDataset(Dataset):
    """Image mattes as sequences ``(fgr [T,3,H,W], pha [T,1,H,W], bgr [T,3,H,W])`` on random backgrounds.

    ``imagematte_dir`` is one folder or a list of folders (e.g. D646 and AIM), each with ``fgr/`` and
    ``pha/``. The length is ``max(#mattes, #background images + #background videos)`` as in RVM, so a
    small matte set still sees every background once per epoch. Other arguments as ``VideoMatteDataset``;
    the default transform is ``ImageMatteAugmentation(size)`` (still images need the motion).
    """

    def __init__(self, imagematte_dir: Union[PathLike, Sequence[PathLike]],
                 background_image_dir: Optional[PathLike] = None, background_video_dir: Optional[PathLike] = None,
                 size: Any = 512, seq_length: int = 15, seq_sampler: Optional[Callable[[int], Sequence[int]]] = None,
                 transform: Optional[Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]] = None) -> None:
        roots = [imagematte_dir] if isinstance(imagematte_dir, (str, os.PathLike)) else list(imagematte_dir)
        self.items: List[Tuple[pathlib.Path, str]] = []
        for root in map(pathlib.Path, roots):
            for kind in ("fgr", "pha"):
                if not (root / kind).is_dir():
                    raise FileNotFoundError(f"ImageMatte folder {root} has no {kind}/ sub-folder")
            names = list_images(root / "fgr")
            missing = sorted(set(names) - set(list_images(root / "pha")))
            if missing:
                raise ValueError(f"no alpha for {missing[:3]} in {root / 'pha'}")
            self.items += [(root, n) for n in names]
        if not self.items:
            raise ValueError(f"no image mattes found in {', '.join(map(str, roots))}")
        setup_sequences(self, size, seq_length, seq_sampler, transform, ImageMatteAugmentation,
                        background_image_dir, background_video_dir)

    def __len__(self) -> int:
        return max(len(self.items), len(self.backgrounds))

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor, Tensor]:
        bgr = self.backgrounds.sample(self.seq_length, self.seq_sampler)
        root, name = self.items[index % len(self.items)]
        fgr = load_image(root / "fgr" / name, "RGB", self.short_side)
        pha = load_image(root / "pha" / name, "L", self.short_side)
        t = self.seq_length
        return self.transform(fgr[None].expand(t, -1, -1, -1).contiguous(),
                              pha[None].expand(t, -1, -1, -1).contiguous(), bgr)
