"""BiMobileNet: BiMatting's binary encoder (Qin et al., NeurIPS 2023; official htqin/BiMatting).

A full-precision 3x3 stem (stride 2) followed by 17 elastic-shortcut binary blocks with widths
``[16 | 32, 64, 32 | 64, 128, 64 | 64, 128, 64 | 128, 256, 128 | 128, 256, 128 | 256 | 1024]``
(stride 2 at blocks 2, 5 and 11), and dense cross-block shortcuts over the spans (1, 3), (4, 6) and
(10, 12) whose middle block halves the resolution. The encoder returns features at 1/2, 1/4, 1/8
and 1/16 (outputs of blocks 0, 3, 9 and 17: 16, 32, 64 and 1024 channels).

The official forward lists the spans (1, 3), (4, 6), (7, 9), (10, 12), (13, 15) but only adds the
shortcut where the resolution changes inside the span, which never happens for (7, 9) and
(13, 15); we list the three effective spans.

``bimobilenet`` is the encoder as an ImageNet classifier (global average pool + a full-precision
1024 -> 1000 linear head), for backbone pre-training; its keys (``feature.*``, ``fc.*``) are those
of the official ``bimobilenet_best.pth.tar`` once its ``module.`` prefix is stripped.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

from binarize.models.registry import register_model
from binarize.nn.blocks import CrossBlockShortcut, ElasticShortcutBlock

__all__ = ["BiMobileNet", "BiMobileNetClassifier", "bimobilenet", "STAGE_CHANNELS"]

STAGE_CHANNELS: Tuple[int, ...] = (16, 32, 64, 32, 64, 128, 64, 64, 128, 64, 128, 256, 128, 128, 256, 128, 256, 1024)
STRIDE2_BLOCKS: Tuple[int, ...] = (2, 5, 11)
SHORTCUT_SPANS: Tuple[Tuple[int, int], ...] = ((1, 3), (4, 6), (10, 12))
FEATURE_TAPS: Tuple[int, ...] = (0, 3, 9, 17)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FirstConv(nn.Module):
    """Full-precision 3x3 stride-2 stem with BatchNorm (kept full precision: 3 input channels carry
    too little information to binarize, as in every BNN since XNOR-Net)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn1(self.conv1(x))


class BiMobileNet(nn.Module):
    """The BiMobileNet encoder: ``forward(x)`` -> ``[f1, f2, f3, f4]`` at 1/2, 1/4, 1/8, 1/16.

    ``x`` is RGB in [0, 1], ``[B, 3, H, W]`` or ``[B, T, 3, H, W]`` (features keep the time axis);
    it is ImageNet-normalised inside, as in the official encoder.
    """

    def __init__(self, method: str = "bimatting") -> None:
        super().__init__()
        self.feature = nn.ModuleList([FirstConv(3, STAGE_CHANNELS[0], 2)])
        for i in range(1, len(STAGE_CHANNELS)):
            stride = 2 if i in STRIDE2_BLOCKS else 1
            self.feature.append(ElasticShortcutBlock(STAGE_CHANNELS[i - 1], STAGE_CHANNELS[i], stride, method))
        self.shortcut = CrossBlockShortcut()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def run_blocks(self, x: Tensor, taps: Tuple[int, ...] = FEATURE_TAPS) -> List[Tensor]:
        """Normalise ``x`` ([N, 3, H, W]) and run every block, returning the outputs of ``taps``."""
        x = (x - self.mean) / self.std
        span_ends = {end: start for start, end in SHORTCUT_SPANS}
        span_starts = set(span_ends.values())
        saved: Dict[int, Tensor] = {}
        features = []
        for i, block in enumerate(self.feature):
            x = block(x)
            if i in span_starts:
                saved[i] = x
            if i in span_ends:
                x = self.shortcut(x, saved.pop(span_ends[i]))
            if i in taps:
                features.append(x)
        return features

    def forward(self, x: Tensor) -> List[Tensor]:
        if x.ndim == 5:
            batch, time = x.shape[:2]
            return [f.unflatten(0, (batch, time)) for f in self.run_blocks(x.flatten(0, 1))]
        return self.run_blocks(x)


class BiMobileNetClassifier(BiMobileNet):
    """BiMobileNet as an image classifier: encoder, global average pool, full-precision linear head.

    The head stays full precision (the usual BNN policy: the last layer decides the logits and
    holds few parameters). Input RGB in [0, 1], normalised inside like the encoder.
    """

    def __init__(self, num_classes: int = 1000, method: str = "bimatting") -> None:
        super().__init__(method)
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(STAGE_CHANNELS[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"BiMobileNetClassifier expects [B, 3, H, W] images, got {tuple(x.shape)}")
        (last,) = self.run_blocks(x, taps=(len(self.feature) - 1,))
        return self.fc(self.pool1(last).flatten(1))

    def map_official_state_dict(self, state_dict: Mapping[str, Any]) -> Dict[str, Tensor]:
        """Official pre-training checkpoints store ``{"state_dict": {"module.feature...": ...}}``;
        return the plain state dict with the ``module.`` prefix removed."""
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
            state_dict = state_dict["state_dict"]
        return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


@register_model
def bimobilenet(num_classes: int = 1000, **kwargs: Any) -> BiMobileNetClassifier:
    """BiMobileNet ImageNet classifier (BiMatting's encoder with a 1024 -> ``num_classes`` head)."""
    return BiMobileNetClassifier(num_classes=num_classes, **kwargs)
