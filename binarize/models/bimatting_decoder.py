"""BiMatting's sparse-assisted recurrent decoder (Qin et al., NeurIPS 2023; official htqin/BiMatting
``model/bidecoder.py``), built on RVM's recurrent decoder (Lin et al., WACV 2022).

- :class:`BottleneckBlock` (1/16): a binary ConvGRU on half of the channels, and a binary 3x3 unit
  producing the 16-channel hidden map from which the coarse (auxiliary) alpha is projected.
- The coarse alpha gives the *incoherent mask*: positions where the binary mask ``alpha > 0``
  differs from its bilinear half-resolution round trip (edges of the matte).
- :class:`UpsamplingBlock` (1/8, 1/4, 1/2): upsample, concatenate the encoder feature and the
  down-sampled image, then a sparse-assisted pair (binary 3x3 unit inside the mask, resized
  bilinearly to the block's resolution, plus a dense binary 1x1 unit), and a
  :class:`MaskedConvGRU` whose gates are sparse-assisted pairs as well.
- :class:`OutputBlock` (full resolution): the same pair with two convs per branch (a binary conv
  and a full-precision conv), no recurrence.

Every block works on ``[B, T, C, H, W]`` tensors; the recurrent states are ``[B, C, H, W]``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from binarize.models.rvm_decoder import stack_time
from binarize.nn.blocks import MaskedBranch, SparseAssistedPair, shifted_binary_conv
from binarize.nn.layers import LearnableBias
from binarize.ops import incoherent_mask

__all__ = [
    "SparseRecurrentDecoder",
    "BottleneckBlock",
    "UpsamplingBlock",
    "OutputBlock",
    "ConvGRU",
    "MaskedConvGRU",
    "Projection",
]


def binary_unit(in_channels: int, out_channels: int, kernel_size: int) -> List[nn.Module]:
    """shift -> sign -> binary conv (no bias) -> BatchNorm -> shift -> PReLU (official indices 0..5)."""
    return [
        *shifted_binary_conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
        LearnableBias(out_channels),
        nn.PReLU(out_channels),
    ]


def binary_gate(in_channels: int, out_channels: int, kernel_size: int, activation: nn.Module,
                shift_after: bool) -> List[nn.Module]:
    """A ConvGRU gate: shift -> sign -> binary conv (with bias) -> [shift] -> sigmoid/tanh."""
    layers = shifted_binary_conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
    if shift_after:
        layers.append(LearnableBias(out_channels))
    layers.append(activation)
    return layers


def _check_state(h: Tensor, expected: Sequence[int], name: str) -> None:
    if tuple(h.shape) != tuple(expected):
        raise ValueError(
            f"recurrent state {name} has shape {tuple(h.shape)}, expected {tuple(expected)} "
            f"(pass the states returned by the previous call on frames of the same size)"
        )


class ConvGRU(nn.Module):
    """Binary ConvGRU (dense): ``r, z = sigmoid(ih([x, h]))``, ``c = tanh(hh([x, r * h]))``,
    ``h = (1 - z) * h + z * c``, iterated over the time axis of ``x`` ([B, T, C, H, W])."""

    # ``(h, z, c) -> (1 - z) * h + z * c`` in one pass, set by binarize.engine.deploy (None: three ops)
    update_forward: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None

    def __init__(self, channels: int, state_name: str = "r") -> None:
        super().__init__()
        self.channels = channels
        self.state_name = state_name
        self.ih = nn.Sequential(*binary_gate(channels * 2, channels * 2, 3, nn.Sigmoid(), shift_after=False))
        self.hh = nn.Sequential(*binary_gate(channels * 2, channels, 3, nn.Tanh(), shift_after=False))

    def step(self, x: Tensor, h: Tensor) -> Tensor:
        r, z = self.ih(torch.cat([x, h], dim=1)).split(self.channels, dim=1)
        c = self.hh(torch.cat([x, r * h], dim=1))
        return _update(self, h, z, c)

    def forward(self, x: Tensor, h: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        h = _initial_state(x, h, self.state_name)
        outputs = []
        for t in range(x.shape[1]):
            h = self.step(x[:, t], h)
            outputs.append(h)
        return stack_time(outputs), h


class MaskedConvGRU(nn.Module):
    """Binary ConvGRU whose gates are sparse-assisted pairs (3x3 inside the mask + dense 1x1):
    ``r, z = ih.sparse([x, h]) * m + ih.dense([x, h])``, ``c = hh.sparse([x, r*h]) * m + hh.dense([x, r*h])``
    (each gate's own sigmoid/tanh inside each branch, as in the official ``ConvGRU_Up``)."""

    update_forward: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None  # as in ConvGRU

    def __init__(self, channels: int, state_name: str = "r") -> None:
        super().__init__()
        self.channels = channels
        self.state_name = state_name
        self.ih = SparseAssistedPair(
            MaskedBranch(*binary_gate(channels * 2, channels * 2, 3, nn.Sigmoid(), shift_after=True)),
            nn.Sequential(*binary_gate(channels * 2, channels * 2, 1, nn.Sigmoid(), shift_after=True)),
        )
        self.hh = SparseAssistedPair(
            MaskedBranch(*binary_gate(channels * 2, channels, 3, nn.Tanh(), shift_after=True)),
            nn.Sequential(*binary_gate(channels * 2, channels, 1, nn.Tanh(), shift_after=True)),
        )

    def step(self, x: Tensor, h: Tensor, mask: Tensor) -> Tensor:
        r, z = _pair_on_concat(self.ih, [x, h], mask).split(self.channels, dim=1)
        c = _pair_on_concat(self.hh, [x, r * h], mask)
        return _update(self, h, z, c)

    def forward(self, x: Tensor, h: Optional[Tensor], mask: Tensor) -> Tuple[Tensor, Tensor]:
        """``x`` [B, T, C, H, W], ``mask`` [B, T, 1, H, W] (frame t of sample b uses its own mask)."""
        h = _initial_state(x, h, self.state_name)
        outputs = []
        for t in range(x.shape[1]):
            h = self.step(x[:, t], h, mask[:, t])
            outputs.append(h)
        # the per-frame calls each recorded one frame's density; keep the whole clip's instead
        self.ih.sparse.record_density(mask)
        self.hh.sparse.record_density(mask)
        return stack_time(outputs), h


def _update(gru: nn.Module, h: Tensor, z: Tensor, c: Tensor) -> Tensor:
    """The GRU state update ``(1 - z) * h + z * c`` (by the deployed one-pass kernel when set)."""
    if gru.update_forward is not None:
        return gru.update_forward(h, z, c)
    return (1 - z) * h + z * c


def _initial_state(x: Tensor, h: Optional[Tensor], name: str) -> Tensor:
    expected = (x.shape[0], x.shape[2], x.shape[3], x.shape[4])
    if h is None:
        return torch.zeros(expected, device=x.device, dtype=x.dtype)
    _check_state(h, expected, name)
    return h


class BottleneckBlock(nn.Module):
    """1/16 stage: ConvGRU on the second half of the channels, then a binary 3x3 unit to 16 channels
    (``x_out``, the input of the auxiliary projection)."""

    def __init__(self, channels: int, out_channels: int = 16) -> None:
        super().__init__()
        self.channels = channels
        self.gru = ConvGRU(channels // 2, state_name="r4")
        self.conv = nn.Sequential(*binary_unit(channels, out_channels, 3))

    def forward(self, x: Tensor, r: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        a, b = x.split(self.channels // 2, dim=2)
        b, r = self.gru(b, r)
        x = torch.cat([a, b], dim=2)
        x_out = self.conv(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return x, r, x_out


def _upsample_concat(upsample: nn.Module, x: Tensor, skips: Sequence[Tensor]) -> Tensor:
    """Upsample ``x`` ([B, T, C, h, w]) 2x, crop to the skips' size and concatenate (flattened [BT, ...])."""
    height, width = skips[-1].shape[-2:]
    fused = getattr(upsample, "upsample_concat", None)  # set by binarize.engine.deploy (one pass, no copy)
    if fused is not None:
        return fused(x.flatten(0, 1), [s.flatten(0, 1) for s in skips])
    x = upsample(x.flatten(0, 1))[:, :, :height, :width]
    return torch.cat([x, *[s.flatten(0, 1) for s in skips]], dim=1)


def _pair_on_upsampled(pair: SparseAssistedPair, upsample: nn.Module, x: Tensor, skips: Sequence[Tensor],
                       coarse_mask: Tensor) -> Tuple[Tensor, Tensor]:
    """``pair(cat([upsample(x), *skips]), mask)`` on flattened [BT, ...] maps, and the mask (the coarse
    incoherent mask resized to the skips' size).  A deployed pair may take the parts directly
    (``upsample_concat_forward``, set by binarize.engine.deploy: the concatenation is never built)."""
    mask = _resize_mask(coarse_mask, skips[-1].shape[-2:])
    fused = getattr(pair, "upsample_concat_forward", None)
    if fused is not None:
        out = fused(upsample, x.flatten(0, 1), [s.flatten(0, 1) for s in skips], mask)
        if out is not None:
            return out, mask
    return pair(_upsample_concat(upsample, x, skips), mask), mask


def _pair_on_concat(pair: SparseAssistedPair, parts: Sequence[Tensor], mask: Tensor) -> Tensor:
    """``pair(cat(parts, 1), mask)``; a deployed pair may take the parts directly (``concat_forward``,
    set by binarize.engine.deploy: the concatenation is never built)."""
    fused = getattr(pair, "concat_forward", None)
    if fused is not None:
        out = fused(parts, mask)
        if out is not None:
            return out
    return pair(torch.cat(list(parts), dim=1), mask)


def _resize_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinearly resize the coarse incoherent mask (values become fractional at the edges)."""
    return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)


class UpsamplingBlock(nn.Module):
    """Upsample + skip + image, a sparse-assisted binary pair, and a masked ConvGRU on half the channels."""

    def __init__(self, in_channels: int, skip_channels: int, src_channels: int, out_channels: int,
                 state_name: str = "r") -> None:
        super().__init__()
        self.out_channels = out_channels
        total = in_channels + skip_channels + src_channels
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = SparseAssistedPair(
            MaskedBranch(*binary_unit(total, out_channels, 3)), nn.Sequential(*binary_unit(total, out_channels, 1))
        )
        self.gru = MaskedConvGRU(out_channels // 2, state_name=state_name)

    def forward(self, x: Tensor, f: Tensor, s: Tensor, r: Optional[Tensor], coarse_mask: Tensor
                ) -> Tuple[Tensor, Tensor]:
        batch, time = s.shape[:2]
        x, mask = _pair_on_upsampled(self.conv, self.upsample, x, [f, s], coarse_mask)
        x = x.unflatten(0, (batch, time))
        a, b = x.split(self.out_channels // 2, dim=2)
        b, r = self.gru(b, r, mask.unflatten(0, (batch, time)))
        return torch.cat([a, b], dim=2), r


class OutputBlock(nn.Module):
    """Full-resolution block: upsample + image, then a sparse-assisted pair whose branches are
    binary conv -> BN -> ReLU -> full-precision conv -> BN -> ReLU (3x3 masked, 1x1 dense)."""

    def __init__(self, in_channels: int, src_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = SparseAssistedPair(
            MaskedBranch(*self._branch(in_channels + src_channels, out_channels, 3)),
            nn.Sequential(*self._branch(in_channels + src_channels, out_channels, 1)),
        )

    @staticmethod
    def _branch(in_channels: int, out_channels: int, kernel_size: int) -> List[nn.Module]:
        padding = kernel_size // 2
        return [
            *shifted_binary_conv(in_channels, out_channels, kernel_size, padding=padding),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size, 1, padding, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]

    def forward(self, x: Tensor, s: Tensor, coarse_mask: Tensor) -> Tensor:
        batch, time = s.shape[:2]
        x, _ = _pair_on_upsampled(self.conv, self.upsample, x, [s], coarse_mask)
        return x.unflatten(0, (batch, time))


class Projection(nn.Module):
    """Full-precision 1x1 projection head (hidden features -> fgr residual + alpha, or segmentation)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 5:
            return self.conv(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return self.conv(x)


class SourcePyramid(nn.Module):
    """The image at 1/2, 1/4, 1/8 (2x2 average pooling, ceil mode, padding excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.avgpool = nn.AvgPool2d(2, 2, count_include_pad=False, ceil_mode=True)

    def forward(self, s0: Tensor) -> List[Tensor]:
        batch, time = s0.shape[:2]
        levels, s = [], s0.flatten(0, 1)
        for _ in range(3):
            s = self.avgpool(s)
            levels.append(s.unflatten(0, (batch, time)))
        return levels


class SparseRecurrentDecoder(nn.Module):
    """The whole decoder: bottleneck -> coarse alpha -> incoherent mask -> three upsampling blocks
    -> output block. Returns ``hid`` (16 channels, full resolution), the coarse projection
    (``project(x_out)``: fgr residual + alpha at 1/16) and the states ``r1..r4``."""

    def __init__(self, feature_channels: Sequence[int] = (16, 32, 64, 128),
                 decoder_channels: Sequence[int] = (80, 40, 32, 16)) -> None:
        super().__init__()
        fc, dc = feature_channels, decoder_channels
        self.avgpool = SourcePyramid()
        self.decode4 = BottleneckBlock(fc[3])
        self.decode3 = UpsamplingBlock(fc[3], fc[2], 3, dc[0], state_name="r3")
        self.decode2 = UpsamplingBlock(dc[0], fc[1], 3, dc[1], state_name="r2")
        self.decode1 = UpsamplingBlock(dc[1], fc[0], 3, dc[2], state_name="r1")
        self.decode0 = OutputBlock(dc[2], 3, dc[3])

    def forward(self, s0: Tensor, f1: Tensor, f2: Tensor, f3: Tensor, f4: Tensor,
                r1: Optional[Tensor], r2: Optional[Tensor], r3: Optional[Tensor], r4: Optional[Tensor],
                project_mat: nn.Module) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        s1, s2, s3 = self.avgpool(s0)
        x4, r4, x4_out = self.decode4(f4, r4)
        coarse = project_mat(x4_out)
        coarse_alpha = coarse[:, :, 3:4].clamp(0.0, 1.0)
        mask = incoherent_mask(coarse_alpha.flatten(0, 1), factor=2)
        x3, r3 = self.decode3(x4, f3, s3, r3, mask)
        x2, r2 = self.decode2(x3, f2, s2, r2, mask)
        x1, r1 = self.decode1(x2, f1, s1, r1, mask)
        x0 = self.decode0(x1, s0, mask)
        return x0, coarse, r1, r2, r3, r4
