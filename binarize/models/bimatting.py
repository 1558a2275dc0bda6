"""BiMatting: real-time video matting with 1-bit weights and activations (Qin et al., NeurIPS 2023).

Our implementation of the official architecture (htqin/BiMatting ``model/``), which derives from
Robust Video Matting (Lin et al., WACV 2022, PeterL1n/RobustVideoMatting): the
:class:`~binarize.models.bimobilenet.BiMobileNet` encoder, a binary LR-ASPP, the sparse-assisted
recurrent decoder (:mod:`binarize.models.bimatting_decoder`), full-precision projection heads and
a binary Deep Guided Filter refiner. Official checkpoints load through :func:`map_official_key`
(identity except that the decoder's sparse-assisted pairs group ``conv``/``conv_1x1``,
``ih``/``ih_1x1`` and ``hh``/``hh_1x1`` as ``.sparse``/``.dense``).

Call: ``fgr, pha, *rec = model(src, *rec, downsample_ratio=1.0)``; see :meth:`BiMatting.forward`.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from binarize.models.bimatting_decoder import Projection, SparseRecurrentDecoder, binary_unit
from binarize.models.bimobilenet import BiMobileNet
from binarize.models.checkpoint import load_official
from binarize.models.registry import register_model
from binarize.models.rvm_decoder import DeepGuidedFilterRefiner
from binarize.nn.blocks import shifted_binary_conv

__all__ = [
    "BiMatting",
    "BinaryLRASPP",
    "BinaryDeepGuidedFilterRefiner",
    "bimatting",
    "load_official_bimatting",
    "map_official_key",
    "to_official_key",
    "MIN_SIDE",
]

#: The official network needs the 1/16 feature map to be at least 2 pixels on each side (its
#: incoherent mask halves that map); inputs (after ``downsample_ratio``) with a side shorter than
#: this are replicate-padded to ``PAD_SIDE`` and the outputs cropped back.
MIN_SIDE = 17
PAD_SIDE = 32


class BinaryLRASPP(nn.Module):
    """Binary Lite R-ASPP: ``aspp1(x) * aspp2(x)`` where ``aspp1`` is a binary 1x1 unit
    (shift, sign, conv, BN, shift, PReLU) and ``aspp2`` a global-pool binary 1x1 conv + sigmoid."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.aspp1 = nn.Sequential(*binary_unit(in_channels, out_channels, 1))
        self.aspp2 = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), *shifted_binary_conv(in_channels, out_channels, 1), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 5:
            return self.forward(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return self.aspp1(x) * self.aspp2(x)


class BinaryDeepGuidedFilterRefiner(DeepGuidedFilterRefiner):
    """Deep Guided Filter (Wu et al., CVPR 2018, as used by RVM) with a binary coefficient network.

    On the low-resolution pass: box-filtered means of the image x (RGB + grey) and of the output y
    (fgr residual + alpha), ``cov_xy`` and ``var_x``; a network maps ``[cov_xy, var_x, hid]`` to the
    slope ``A``; ``b = mean_y - A * mean_x``; ``A`` and ``b`` are bilinearly upsampled and applied
    to the full-resolution image: ``out = A * x_fine + b``. The network's two hidden 1x1 convs
    are binary, its last conv (24 -> 16 -> 16 -> 4 outputs) stays full precision.
    """

    @staticmethod
    def coefficient_net(hid_channels: int) -> nn.Sequential:
        return nn.Sequential(
            *binary_unit(4 * 2 + hid_channels, hid_channels, 1),
            *binary_unit(hid_channels, hid_channels, 1),
            nn.Conv2d(hid_channels, 4, kernel_size=1, bias=True),
        )


class BiMatting(nn.Module):
    """The BiMatting network (official ``MattingNetwork('bimobilenet', 'deep_guided_filter')``).

    Precision: every convolution is 1-bit in weights and activations except the encoder stem,
    the full-precision second conv of each output-block branch, the projection heads, the
    refiner's box filter and last conv (all small, and they produce or consume image values).
    BatchNorm, PReLU and the learnable shifts are full precision (per-channel, cheap).
    """

    def __init__(self) -> None:
        super().__init__()
        self.backbone = BiMobileNet()
        self.aspp = BinaryLRASPP(1024, 128)
        self.decoder = SparseRecurrentDecoder([16, 32, 64, 128], [80, 40, 32, 16])
        self.project_mat = Projection(16, 4)
        self.project_seg = Projection(16, 1)
        self.refiner = BinaryDeepGuidedFilterRefiner()

    def forward(self, src: Tensor, r1: Optional[Tensor] = None, r2: Optional[Tensor] = None,
                r3: Optional[Tensor] = None, r4: Optional[Tensor] = None, downsample_ratio: float = 1.0,
                segmentation_pass: bool = False, return_aux: bool = False) -> List[Tensor]:
        """Matte ``src`` (RGB in [0, 1], ``[B, T, 3, H, W]`` or ``[B, 3, H, W]``).

        Returns ``[fgr, pha, r1, r2, r3, r4]`` (``fgr``/``pha`` shaped like ``src``; pass ``r1..r4``
        to the next call), ``[fgr, pha, fgr_s, pha_s, r1, r2, r3, r4]`` with ``return_aux=True``
        (``fgr_s``/``pha_s``: the auxiliary 1/16 outputs), or ``[seg, r1..r4]`` with
        ``segmentation_pass=True``. With ``downsample_ratio < 1`` the network runs on the image
        resized by that factor and the Deep Guided Filter brings the result back to full size.
        """
        single_frame = _check_source(src, downsample_ratio)
        if single_frame:
            src = src.unsqueeze(1)
        src_sm = _resize_frames(src, downsample_ratio) if downsample_ratio != 1 else src
        hid, coarse, rec = self._run_core(src_sm, [r1, r2, r3, r4])
        if segmentation_pass:
            return [_squeeze_time(self.project_seg(hid), single_frame), *rec]

        fgr_residual, pha = self.project_mat(hid).split([3, 1], dim=2)
        if downsample_ratio != 1:
            fgr_residual, pha = self.refiner(src, src_sm, fgr_residual, pha, hid)
        fgr = (fgr_residual + src).clamp(0.0, 1.0)
        pha = pha.clamp(0.0, 1.0)
        outputs = [_squeeze_time(fgr, single_frame), _squeeze_time(pha, single_frame)]
        if return_aux:
            fgr_residual_s, pha_s = coarse.split([3, 1], dim=2)
            src_s = _resize_frames(src, size=fgr_residual_s.shape[-2:])
            fgr_s = (fgr_residual_s + src_s).clamp(0.0, 1.0)
            outputs += [_squeeze_time(fgr_s, single_frame), _squeeze_time(pha_s.clamp(0.0, 1.0), single_frame)]
        return [*outputs, *rec]

    def _run_core(self, src_sm: Tensor, rec: List[Optional[Tensor]]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """Encoder, LR-ASPP and decoder on the (down-sampled) frames, padded if they are too small;
        returns the hidden map and the coarse projection cropped back, and the new states."""
        height, width = src_sm.shape[-2:]
        padded = _pad_to_min_side(src_sm)
        f1, f2, f3, f4 = self.backbone(padded)
        f4 = self.aspp(f4)
        hid, coarse, *new_rec = self.decoder(padded, f1, f2, f3, f4, *rec, self.project_mat)
        if padded is not src_sm:
            hid = hid[..., :height, :width]
            coarse = coarse[..., : -(-height // 16), : -(-width // 16)]
        return hid, coarse, new_rec

    def map_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Rename the keys of an official state dict to ours (see :func:`map_official_key`)."""
        return {map_official_key(key): value for key, value in state_dict.items()}

    def official_state_dict(self) -> Dict[str, Tensor]:
        """Our state dict under the official key names (loadable by the official code)."""
        return {to_official_key(key): value for key, value in self.state_dict().items()}


def _check_source(src: Tensor, downsample_ratio: float) -> bool:
    """Validate the input; True when it is a single frame batch ``[B, 3, H, W]``."""
    if not isinstance(src, Tensor) or src.ndim not in (4, 5) or src.shape[-3] != 3:
        shape = tuple(src.shape) if isinstance(src, Tensor) else type(src).__name__
        raise ValueError(f"BiMatting expects src shaped [B, T, 3, H, W] or [B, 3, H, W], got {shape}")
    if not src.is_floating_point():
        raise ValueError(f"BiMatting expects a floating-point src in [0, 1], got dtype {src.dtype}")
    if not 0 < downsample_ratio <= 1:
        raise ValueError(f"downsample_ratio must be in (0, 1], got {downsample_ratio}")
    height, width = src.shape[-2:]
    if int(height * downsample_ratio) < 1 or int(width * downsample_ratio) < 1:
        raise ValueError(
            f"downsample_ratio={downsample_ratio} shrinks a {height}x{width} input to nothing"
        )
    return src.ndim == 4


def _resize_frames(x: Tensor, scale_factor: Optional[float] = None,
                   size: Optional[Tuple[int, int]] = None) -> Tensor:
    """Bilinear resize of [B, T, C, H, W] frames by ``scale_factor`` (used as given, not recomputed
    from the output size, as in the official code) or to ``size``."""
    frames = x.flatten(0, 1)
    if size is not None:
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
    else:
        frames = F.interpolate(frames, scale_factor=scale_factor, mode="bilinear", align_corners=False,
                               recompute_scale_factor=False)
    return frames.unflatten(0, x.shape[:2])


def _pad_to_min_side(x: Tensor) -> Tensor:
    """Replicate-pad [B, T, C, H, W] frames to ``PAD_SIDE`` on any side shorter than ``MIN_SIDE``."""
    height, width = x.shape[-2:]
    pad_h = PAD_SIDE - height if height < MIN_SIDE else 0
    pad_w = PAD_SIDE - width if width < MIN_SIDE else 0
    if pad_h == 0 and pad_w == 0:
        return x
    frames = F.pad(x.flatten(0, 1), (0, pad_w, 0, pad_h), mode="replicate")
    return frames.unflatten(0, x.shape[:2])


def _squeeze_time(x: Tensor, single_frame: bool) -> Tensor:
    return x.squeeze(1) if single_frame else x


# ------------------------------------------------------------------------------------------------
# official checkpoints
# ------------------------------------------------------------------------------------------------
_PAIR_KEY = re.compile(r"^decoder\.decode([0-3])\.(conv|gru\.ih|gru\.hh)(_1x1)?\.")
_OUR_PAIR_KEY = re.compile(r"^decoder\.decode([0-3])\.(conv|gru\.ih|gru\.hh)\.(sparse|dense)\.")


def map_official_key(key: str) -> str:
    """Official key -> ours: ``decoder.decodeN.{conv,gru.ih,gru.hh}[_1x1].*`` (N = 0..3) become
    ``....sparse.*`` (3x3 branch) / ``....dense.*`` (1x1 branch); every other key is unchanged."""
    return _PAIR_KEY.sub(lambda m: f"decoder.decode{m[1]}.{m[2]}.{'dense' if m[3] else 'sparse'}.", key)


def to_official_key(key: str) -> str:
    """Our key -> the official one (inverse of :func:`map_official_key`)."""
    return _OUR_PAIR_KEY.sub(lambda m: f"decoder.decode{m[1]}.{m[2]}{'_1x1' if m[3] == 'dense' else ''}.", key)


def load_official_bimatting(checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]],
                            model: Optional[BiMatting] = None) -> BiMatting:
    """Load an official BiMatting checkpoint (a ``.pth`` path read with ``weights_only=True``, or a
    state dict) strictly into ``model`` (a new :class:`BiMatting` by default); return it in eval mode.

    A missing, unexpected or mis-shaped key raises ``ValueError`` naming the source and the first
    offending keys (official key names are mapped with :func:`map_official_key` first).
    """
    model = BiMatting() if model is None else model
    source = "official BiMatting state dict" if isinstance(checkpoint, Mapping) else None
    load_official(model, checkpoint, source=source)
    return model.eval()


@register_model
def bimatting(**kwargs: Any) -> BiMatting:
    """BiMatting (NeurIPS 2023): binary video matting, official architecture; loads official checkpoints."""
    if kwargs:
        raise ValueError(f"bimatting takes no keyword arguments, got {sorted(kwargs)}")
    return BiMatting()
