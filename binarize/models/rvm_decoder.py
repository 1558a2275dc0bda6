"""Robust Video Matting heads: LR-ASPP, the recurrent ConvGRU decoder, projections and the
Deep Guided Filter refiner.

Architecture from Lin et al., "Robust High-Resolution Video Matting with Temporal Guidance"
(WACV 2022, github.com/PeterL1n/RobustVideoMatting, ``model/decoder.py``, ``model/lraspp.py``,
``model/deep_guided_filter.py``). Module and parameter names follow the official ones so that an
official state dict maps onto these modules unchanged (only the backbone is renamed).

Every block takes time-series tensors ``[B, T, C, H, W]``: per-frame work runs on the flattened
``[B*T, C, H, W]`` batch and only the ConvGRU walks along T.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LRASPP",
    "ConvGRU",
    "BottleneckBlock",
    "UpsamplingBlock",
    "OutputBlock",
    "RecurrentDecoder",
    "Projection",
    "DeepGuidedFilterRefiner",
    "framewise",
]


def framewise(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a per-frame ``module`` to ``x`` of shape [B, T, C, H, W] by folding T into the batch."""
    b, t = x.shape[:2]
    return module(x.flatten(0, 1)).unflatten(0, (b, t))


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> List[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, 1, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(True),
    ]


class LRASPP(nn.Module):
    """Lite R-ASPP (MobileNetV3 paper): a 1x1 conv branch gated by a global-pool sigmoid branch."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.aspp1 = nn.Sequential(*_conv_bn_relu(in_channels, out_channels, 1))
        self.aspp2 = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, H, W] (frames already folded into the batch)."""
        return self.aspp1(x) * self.aspp2(x)


class ConvGRU(nn.Module):
    """Convolutional GRU on half of a block's channels: reset/update gates from ``ih`` and the
    candidate state from ``hh`` applied to ``[x, r * h]`` (RVM, Sec. 3.1)."""

    def __init__(self, channels: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.ih = nn.Sequential(nn.Conv2d(channels * 2, channels * 2, kernel_size, padding=padding), nn.Sigmoid())
        self.hh = nn.Sequential(nn.Conv2d(channels * 2, channels, kernel_size, padding=padding), nn.Tanh())

    def step(self, x: Tensor, h: Tensor) -> Tensor:
        """One time step: x, h of shape [B, C, H, W] -> new hidden state."""
        r, z = self.ih(torch.cat([x, h], dim=1)).split(self.channels, dim=1)
        c = self.hh(torch.cat([x, r * h], dim=1))
        return (1 - z) * h + z * c

    def forward(self, x: Tensor, h: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """x: [B, T, C, H, W]; h: [B, C, H, W] or None (zeros). Returns (outputs over T, last state)."""
        if h is None:
            h = x.new_zeros((x.size(0), x.size(2), x.size(3), x.size(4)))
        outputs = []
        for xt in x.unbind(dim=1):
            h = self.step(xt, h)
            outputs.append(h)
        return stack_time(outputs), h


def stack_time(frames: Sequence[Tensor]) -> Tensor:
    """Per-frame maps [B, ...] stacked along a new time axis 1; a single frame is a view (no copy:
    streaming inference runs one frame per call)."""
    return frames[0].unsqueeze(1) if len(frames) == 1 else torch.stack(list(frames), dim=1)


class BottleneckBlock(nn.Module):
    """1/16 block: the second half of the LR-ASPP channels go through a ConvGRU."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.gru = ConvGRU(channels // 2)

    def forward(self, x: Tensor, r: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        a, b = x.split(self.channels // 2, dim=2)
        b, r = self.gru(b, r)
        return torch.cat([a, b], dim=2), r


class UpsamplingBlock(nn.Module):
    """Upsample x2, crop to the skip size, concat [x, skip feature, downsampled image], 3x3 conv,
    ConvGRU on half of the channels."""

    def __init__(self, in_channels: int, skip_channels: int, src_channels: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = nn.Sequential(*_conv_bn_relu(in_channels + skip_channels + src_channels, out_channels, 3))
        self.gru = ConvGRU(out_channels // 2)

    def forward(self, x: Tensor, f: Tensor, s: Tensor, r: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        b, t, _, h, w = s.shape
        x = self.upsample(x.flatten(0, 1))[:, :, :h, :w]
        x = self.conv(torch.cat([x, f.flatten(0, 1), s.flatten(0, 1)], dim=1)).unflatten(0, (b, t))
        a, g = x.split(self.out_channels // 2, dim=2)
        g, r = self.gru(g, r)
        return torch.cat([a, g], dim=2), r


class OutputBlock(nn.Module):
    """Full-resolution block: upsample, concat the image, two 3x3 conv-BN-ReLU (no recurrence)."""

    def __init__(self, in_channels: int, src_channels: int, out_channels: int):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = nn.Sequential(
            *_conv_bn_relu(in_channels + src_channels, out_channels, 3),
            *_conv_bn_relu(out_channels, out_channels, 3),
        )

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        b, t, _, h, w = s.shape
        x = self.upsample(x.flatten(0, 1))[:, :, :h, :w]
        return self.conv(torch.cat([x, s.flatten(0, 1)], dim=1)).unflatten(0, (b, t))


class RecurrentDecoder(nn.Module):
    """RVM decoder: bottleneck GRU at 1/16, three upsampling GRU blocks (1/8, 1/4, 1/2) and the
    output block at full resolution of the (possibly downsampled) input."""

    def __init__(self, feature_channels: Sequence[int], decoder_channels: Sequence[int]):
        super().__init__()
        self.avgpool = nn.AvgPool2d(2, 2, count_include_pad=False, ceil_mode=True)
        self.decode4 = BottleneckBlock(feature_channels[3])
        self.decode3 = UpsamplingBlock(feature_channels[3], feature_channels[2], 3, decoder_channels[0])
        self.decode2 = UpsamplingBlock(decoder_channels[0], feature_channels[1], 3, decoder_channels[1])
        self.decode1 = UpsamplingBlock(decoder_channels[1], feature_channels[0], 3, decoder_channels[2])
        self.decode0 = OutputBlock(decoder_channels[2], 3, decoder_channels[3])

    def forward(
        self, s0: Tensor, f1: Tensor, f2: Tensor, f3: Tensor, f4: Tensor, rec: Sequence[Optional[Tensor]]
    ) -> Tuple[Tensor, List[Tensor]]:
        """All tensors [B, T, C, H, W]; rec = [r1, r2, r3, r4]. Returns (hidden, [r1, r2, r3, r4])."""
        s1 = framewise(self.avgpool, s0)
        s2 = framewise(self.avgpool, s1)
        s3 = framewise(self.avgpool, s2)
        r1, r2, r3, r4 = rec
        x4, r4 = self.decode4(f4, r4)
        x3, r3 = self.decode3(x4, f3, s3, r3)
        x2, r2 = self.decode2(x3, f2, s2, r2)
        x1, r1 = self.decode1(x2, f1, s1, r1)
        x0 = self.decode0(x1, s0)
        return x0, [r1, r2, r3, r4]


class Projection(nn.Module):
    """1x1 conv head (``project_mat``: foreground residual + alpha; ``project_seg``: segmentation)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return framewise(self.conv, x)


class DeepGuidedFilterRefiner(nn.Module):
    """Deep Guided Filter (Wu et al., CVPR 2018) as used by RVM: local linear coefficients A, b
    computed at low resolution from box-filtered statistics and the hidden features, upsampled
    bilinearly and applied to the full-resolution image. Subclasses change only the coefficient
    network (``coefficient_net``), e.g. BiMatting's binary one."""

    #: optional one-pass implementation of the full-resolution step ``resize(slope) * cat([src,
    #: mean], 1) + resize(offset)``, called as ``(slope, offset, src, mean)``; ``binarize.deploy``
    #: installs the engine's kernel here (the models never import the engine)
    full_resolution_forward: Optional[Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = None

    def __init__(self, hid_channels: int = 16):
        super().__init__()
        self.box_filter = nn.Conv2d(4, 4, kernel_size=3, padding=1, bias=False, groups=4)
        with torch.no_grad():
            self.box_filter.weight.fill_(1.0 / 9.0)
        self.conv = self.coefficient_net(hid_channels)

    @staticmethod
    def coefficient_net(hid_channels: int) -> nn.Sequential:
        """Maps ``[cov_xy, var_x, hid]`` (4 + 4 + hid channels) to the 4 slopes A."""
        return nn.Sequential(
            *_conv_bn_relu(4 * 2 + hid_channels, hid_channels, 1),
            *_conv_bn_relu(hid_channels, hid_channels, 1),
            nn.Conv2d(hid_channels, 4, kernel_size=1, bias=True),
        )

    def forward(
        self, fine_src: Tensor, base_src: Tensor, base_fgr: Tensor, base_pha: Tensor, base_hid: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """All inputs [B, T, C, H, W]; returns refined (fgr residual, alpha) at the fine size."""
        b, t = fine_src.shape[:2]
        fgr, pha = self.refine_frames(*(v.flatten(0, 1) for v in (fine_src, base_src, base_fgr, base_pha, base_hid)))
        return fgr.unflatten(0, (b, t)), pha.unflatten(0, (b, t))

    def refine_frames(self, fine_src: Tensor, base_src: Tensor, base_fgr: Tensor, base_pha: Tensor,
                      base_hid: Tensor) -> Tuple[Tensor, Tensor]:
        """The same on frames ``[N, C, H, W]``."""
        fine_mean = fine_src.mean(1, keepdim=True)
        base_x = torch.cat([base_src, base_src.mean(1, keepdim=True)], dim=1)
        base_y = torch.cat([base_fgr, base_pha], dim=1)
        mean_x = self.box_filter(base_x)
        mean_y = self.box_filter(base_y)
        cov_xy = self.box_filter(base_x * base_y) - mean_x * mean_y
        var_x = self.box_filter(base_x * base_x) - mean_x * mean_x
        slope = self.conv(torch.cat([cov_xy, var_x, base_hid], dim=1))
        offset = mean_y - slope * mean_x
        if self.full_resolution_forward is not None:
            out = self.full_resolution_forward(slope, offset, fine_src, fine_mean)
        else:
            size = fine_src.shape[2:]
            slope = F.interpolate(slope, size, mode="bilinear", align_corners=False)
            offset = F.interpolate(offset, size, mode="bilinear", align_corners=False)
            out = slope * torch.cat([fine_src, fine_mean], dim=1) + offset
        fgr, pha = out.split([3, 1], dim=1)
        return fgr, pha
