"""Full-precision Robust Video Matting (RVM) with a timm MobileNetV3-Large backbone.

Lin et al., "Robust High-Resolution Video Matting with Temporal Guidance", WACV 2022
(github.com/PeterL1n/RobustVideoMatting). The official model uses torchvision's MobileNetV3-Large
with its last stage at stride 1 / dilation 2 (output stride 16) and taps features at 1/2, 1/4,
1/8 and 1/16 (16, 24, 40, 960 channels). We build the same network from timm's
``mobilenetv3_large_100`` (``features_only``, ``output_stride=16``, torchvision's BatchNorm
eps 1e-3 / momentum 0.01) and give the first block of the dilated stage dilation 2 as torchvision
does (timm keeps dilation 1 on the block whose stride was removed). ``map_official_state_dict``
renames torchvision keys onto the timm backbone so official checkpoints load exactly.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from binarize.models.registry import register_model
from binarize.models.rvm_decoder import (
    LRASPP,
    DeepGuidedFilterRefiner,
    Projection,
    RecurrentDecoder,
    framewise,
)

__all__ = [
    "MobileNetV3LargeEncoder",
    "RobustVideoMatting",
    "rvm_mobilenetv3",
    "torchvision_to_timm_backbone_keys",
    "prepare_matting_input",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm features_only indices of the stages RVM taps: stage 0 (1/2, 16 ch), stage 1 (1/4, 24),
# stage 2 (1/8, 40) and the final 1x1 conv stage (1/16 at output stride 16, 960).
_OUT_INDICES = (0, 1, 2, 4)


class MobileNetV3LargeEncoder(nn.Module):
    """ImageNet-normalising MobileNetV3-Large feature extractor at output stride 16.

    ``body`` is timm's ``MobileNetV3Features``; ``forward(x)`` takes frames [N, 3, H, W] in [0, 1]
    and returns the four features [f1, f2, f3, f4] (strides 2, 4, 8, 16)."""

    channels = (16, 24, 40, 960)

    def __init__(self) -> None:
        super().__init__()
        self.body = timm.create_model(
            "mobilenetv3_large_100",
            features_only=True,
            pretrained=False,
            output_stride=16,
            out_indices=_OUT_INDICES,
            bn_eps=1e-3,
            bn_momentum=0.01,
        )
        _dilate_first_block_of_last_stage(self.body)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> List[Tensor]:
        return self.body((x - self.mean) / self.std)


def _dilate_first_block_of_last_stage(body: nn.Module) -> None:
    """Give the (now stride-1) depthwise conv of the first 1/16 block dilation 2, as torchvision does
    for RVM's ``InvertedResidualConfig(112, 5, 672, 160, True, "HS", 2, 2, 1)``."""
    conv = body.blocks[5][0].conv_dw
    if conv.stride != (1, 1) or conv.kernel_size != (5, 5):
        raise RuntimeError(f"unexpected timm MobileNetV3 layout: blocks.5.0.conv_dw is {conv}")
    conv.dilation = (2, 2)
    conv.padding = (4, 4)


def torchvision_to_timm_backbone_keys(body: nn.Module) -> Dict[str, str]:
    """Map torchvision MobileNetV3 module prefixes (``features.i...``) to timm module prefixes,
    derived from the block structure: features.0 is the stem, features.1..15 are the blocks in
    order (depthwise-separable, then inverted residuals with or without SE), features.16 the last
    1x1 conv."""
    prefixes = {"features.0.0": "conv_stem", "features.0.1": "bn1"}
    blocks = [(f"blocks.{i}.{j}", block) for i, stage in enumerate(body.blocks) for j, block in enumerate(stage)]
    for index, (ours, block) in enumerate(blocks, start=1):
        tv = f"features.{index}"
        kind = type(block).__name__
        if kind == "DepthwiseSeparableConv":
            names = {"block.0.0": "conv_dw", "block.0.1": "bn1", "block.1.0": "conv_pw", "block.1.1": "bn2"}
        elif kind == "InvertedResidual":
            names = {"block.0.0": "conv_pw", "block.0.1": "bn1", "block.1.0": "conv_dw", "block.1.1": "bn2"}
            if isinstance(block.se, nn.Identity):
                names.update({"block.2.0": "conv_pwl", "block.2.1": "bn3"})
            else:
                names.update(
                    {"block.2.fc1": "se.conv_reduce", "block.2.fc2": "se.conv_expand",
                     "block.3.0": "conv_pwl", "block.3.1": "bn3"}
                )
        elif kind == "ConvBnAct":
            names = {"0": "conv", "1": "bn1"}
        else:
            raise RuntimeError(f"unexpected timm MobileNetV3 block {ours}: {kind}")
        prefixes.update({f"{tv}.{a}": f"{ours}.{b}" for a, b in names.items()})
    return prefixes


def prepare_matting_input(
    src: Tensor, downsample_ratio: float
) -> Tuple[Tensor, bool]:
    """Validate a matting input and return it as [B, T, 3, H, W] plus whether it was 4-D."""
    if not isinstance(src, Tensor):
        raise ValueError(f"src must be a torch.Tensor, got {type(src).__name__}")
    if src.ndim not in (4, 5) or src.shape[-3] != 3:
        raise ValueError(f"src must be [B, T, 3, H, W] or [B, 3, H, W], got shape {tuple(src.shape)}")
    if not downsample_ratio > 0:
        raise ValueError(f"downsample_ratio must be > 0, got {downsample_ratio}")
    single = src.ndim == 4
    return (src.unsqueeze(1) if single else src), single


class RobustVideoMatting(nn.Module):
    """RVM-MobileNetV3: ``fgr, pha, *rec = model(src, *rec, downsample_ratio=1.0)``.

    ``src`` in [0, 1], [B, T, 3, H, W] or [B, 3, H, W] (outputs follow the input's layout), any H, W;
    ``rec`` are the four ConvGRU states (start with ``[None] * 4``). With ``downsample_ratio < 1``
    the network runs on a bilinearly downsampled frame and the Deep Guided Filter upsamples the
    result; ``segmentation_pass=True`` returns ``[seg, *rec]`` instead."""

    def __init__(self, aspp_channels: int = 128, decoder_channels: Tuple[int, ...] = (80, 40, 32, 16)):
        super().__init__()
        self.backbone = MobileNetV3LargeEncoder()
        f1, f2, f3, f4 = self.backbone.channels
        self.aspp = LRASPP(f4, aspp_channels)
        self.decoder = RecurrentDecoder([f1, f2, f3, aspp_channels], list(decoder_channels))
        self.project_mat = Projection(decoder_channels[-1], 4)
        self.project_seg = Projection(decoder_channels[-1], 1)
        self.refiner = DeepGuidedFilterRefiner(decoder_channels[-1])

    def forward(
        self,
        src: Tensor,
        r1: Optional[Tensor] = None,
        r2: Optional[Tensor] = None,
        r3: Optional[Tensor] = None,
        r4: Optional[Tensor] = None,
        downsample_ratio: float = 1.0,
        segmentation_pass: bool = False,
    ) -> List[Tensor]:
        src, single = prepare_matting_input(src, downsample_ratio)
        src_sm = _downsample(src, downsample_ratio) if downsample_ratio != 1 else src
        f1, f2, f3, f4 = (feature.unflatten(0, src_sm.shape[:2]) for feature in self.backbone(src_sm.flatten(0, 1)))
        f4 = framewise(self.aspp, f4)
        hid, rec = self.decoder(src_sm, f1, f2, f3, f4, [r1, r2, r3, r4])
        if segmentation_pass:
            outputs = [self.project_seg(hid)]
        else:
            fgr_residual, pha = self.project_mat(hid).split([3, 1], dim=2)
            if downsample_ratio != 1:
                fgr_residual, pha = self.refiner(src, src_sm, fgr_residual, pha, hid)
            outputs = [(fgr_residual + src).clamp(0.0, 1.0), pha.clamp(0.0, 1.0)]
        if single:
            outputs = [o.squeeze(1) for o in outputs]
        return [*outputs, *rec]

    def map_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Rename an official RVM (torchvision backbone) state dict to this model's keys; keys the
        map does not know pass through unchanged so the loader reports them."""
        prefixes = torchvision_to_timm_backbone_keys(self.backbone.body)
        mapped: Dict[str, Tensor] = {}
        for key, value in state_dict.items():
            mapped[_rename_backbone_key(key, prefixes)] = value
        return mapped


def _rename_backbone_key(key: str, prefixes: Mapping[str, str]) -> str:
    if not key.startswith("backbone.features."):
        return key
    module, _, leaf = key[len("backbone."):].rpartition(".")
    target = prefixes.get(module)
    return key if target is None else f"backbone.body.{target}.{leaf}"


def _downsample(x: Tensor, ratio: float) -> Tensor:
    """Bilinear resize of [B, T, C, H, W] by ``ratio`` (RVM's ``_interpolate``)."""
    b, t = x.shape[:2]
    y = F.interpolate(x.flatten(0, 1), scale_factor=ratio, mode="bilinear", align_corners=False,
                      recompute_scale_factor=False)
    return y.unflatten(0, (b, t))


@register_model
def rvm_mobilenetv3(**kwargs: Any) -> RobustVideoMatting:
    """Full-precision RVM with a MobileNetV3-Large backbone (3.75 M parameters)."""
    return RobustVideoMatting(**kwargs)
