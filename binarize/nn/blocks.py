"""Block builders for BiMatting-style binary networks (Qin et al., "BiMatting", NeurIPS 2023).

- :func:`shifted_binary_conv`: the learnable shift -> sign -> binary convolution unit every binary
  convolution of BiMatting starts with.
- :class:`ElasticShortcutBlock`: the shrinkable / elastic-shortcut block of the BiMobileNet encoder
  (a 3x3 binary conv with a real-valued shortcut, then a 1x1 stage that keeps, doubles, quadruples
  or halves the channels while every binary conv keeps a real-valued shortcut of its own width).
- :class:`CrossBlockShortcut`: the dense shortcut that carries a block's output across a
  down-sampling span of blocks.
- :class:`MaskedBranch` and :class:`SparseAssistedPair`: the decoder's sparse-assisted pair, a
  3x3 branch evaluated only inside a mask plus a dense 1x1 branch. The masked branch records the
  fraction of positions it computed (``mask_density``), which ``binarize.profile`` reads to count
  the sparse cost.

The module and attribute names follow the official code (htqin/BiMatting) so that official
state dicts load with (almost) the same keys; the code itself is our own.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from binarize.nn.layers import BinaryConv2d, LearnableBias

__all__ = [
    "binary_conv",
    "shifted_binary_conv",
    "ElasticShortcutBlock",
    "CrossBlockShortcut",
    "MaskedBranch",
    "SparseAssistedPair",
]


def binary_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    bias: bool = False,
    method: str = "bimatting",
) -> BinaryConv2d:
    """A binary convolution that binarizes its own input and weights with ``method``.

    With the ``bimatting`` method the input is ``torch.sign``-ed (sign(0) = 0) and zero-padded
    after binarization, exactly like the official ``BinaryActivation`` + ``BiConv2d`` pair.
    """
    return BinaryConv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias, method=method
    )


def shifted_binary_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    padding: int = 0,
    bias: bool = False,
    method: str = "bimatting",
) -> List[nn.Module]:
    """The three modules [learnable shift, sign slot, binary conv] that open every BiMatting unit.

    The middle ``nn.Identity`` marks where the official code applies ``sign``; our
    :class:`BinaryConv2d` binarizes its input itself (so ``profile`` sees a 1-bit input), and the
    slot keeps the official ``nn.Sequential`` indices (``.0`` shift, ``.2`` conv) in state dicts.
    """
    return [
        LearnableBias(in_channels),
        nn.Identity(),
        binary_conv(in_channels, out_channels, kernel_size, padding=padding, bias=bias, method=method),
    ]


class ElasticShortcutBlock(nn.Module):
    """BiMatting's shrinkable / elastic-shortcut binary block (official ``BasicBlock``).

    Stage 1: ``y = shift(prelu(shift(pool?(x) + bn1(conv3x3(sign(shift(x)))))))``, the 3x3 binary
    conv keeps the block's input width and a real-valued shortcut (2x2 average-pooled, ceil mode,
    when ``stride == 2``). Stage 2 maps ``C -> out_channels`` with 1x1 binary convs, each added to a
    real-valued shortcut of its own width, then ``shift, PReLU, shift``:

    - ``C -> C``: ``bn2(pw(sign(shift(y)))) + y``;
    - ``C -> kC`` (k = 2 or 4): k parallel ``C -> C`` convs, each ``bn2_i(pw_i(.)) + y``, concatenated;
    - ``C -> C/2``: one ``C -> C/2`` conv plus the shortcut averaged over the two channel halves.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, method: str = "bimatting"):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ElasticShortcutBlock: stride must be 1 or 2, got {stride}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.expansion, self.shrink = _stage2_shape(in_channels, out_channels)
        norm = nn.BatchNorm2d

        self.move11 = LearnableBias(in_channels)
        self.binary_3x3 = BinaryConv2d(
            in_channels, in_channels, 3, stride=stride, padding=1, bias=False, method=method
        )
        self.bn1 = norm(in_channels)
        self.move12 = LearnableBias(in_channels)
        self.prelu1 = nn.PReLU(in_channels)
        self.move13 = LearnableBias(in_channels)

        self.move21 = LearnableBias(in_channels)
        width = out_channels if self.shrink else in_channels
        for name, bn_name in self._stage2_names():
            setattr(self, name, BinaryConv2d(in_channels, width, 1, bias=False, method=method))
            setattr(self, bn_name, norm(width))
        self.move22 = LearnableBias(out_channels)
        self.prelu2 = nn.PReLU(out_channels)
        self.move23 = LearnableBias(out_channels)
        if stride == 2:
            self.pooling = nn.AvgPool2d(2, 2, ceil_mode=True)

    def _stage2_names(self) -> List[tuple]:
        """(conv, batch-norm) attribute names of the 1x1 stage, as in the official checkpoints."""
        if self.expansion == 1 and not self.shrink:
            return [("binary_pw", "bn2")]
        return [(f"binary_pw_down{i}", f"bn2_{i}") for i in range(1, self.expansion + 1)]

    def forward(self, x: Tensor) -> Tensor:
        out1 = self.bn1(self.binary_3x3(self.move11(x)))
        shortcut = self.pooling(x) if self.stride == 2 else x
        out1 = self.move13(self.prelu1(self.move12(shortcut + out1)))

        out2 = self.move21(out1)
        if self.shrink:
            half = self.out_channels
            halves_mean = sum(out1.split(half, dim=1)) / 2
            out = self.bn2_1(self.binary_pw_down1(out2)) + halves_mean
        else:
            branches = [
                getattr(self, bn_name)(getattr(self, name)(out2)) + out1
                for name, bn_name in self._stage2_names()
            ]
            out = branches[0] if len(branches) == 1 else torch.cat(branches, dim=1)
        return self.move23(self.prelu2(self.move22(out)))

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}, stride={self.stride}"


def _stage2_shape(in_channels: int, out_channels: int) -> tuple:
    """(number of parallel 1x1 convs, shrink?) for a ``C -> out`` elastic stage; ValueError otherwise."""
    if out_channels in (in_channels, 2 * in_channels, 4 * in_channels):
        return out_channels // in_channels, False
    if 2 * out_channels == in_channels:
        return 1, True
    raise ValueError(
        f"ElasticShortcutBlock supports out_channels in (C, 2C, 4C, C/2) for C={in_channels}, "
        f"got {out_channels}"
    )


class CrossBlockShortcut(nn.Module):
    """Dense cross-block shortcut of BiMobileNet: ``x + avgpool2x2(earlier)``.

    ``earlier`` is the output of the first block of a span whose middle block halves the
    resolution (2x2 average pooling, ceil mode, brings it to ``x``'s resolution); channel counts
    must agree. Parameter-free.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pooling = nn.AvgPool2d(2, 2, ceil_mode=True)

    def forward(self, x: Tensor, earlier: Tensor) -> Tensor:
        pooled = self.pooling(earlier)
        if pooled.shape != x.shape:
            raise ValueError(
                f"CrossBlockShortcut: pooled earlier features {tuple(pooled.shape)} do not match "
                f"{tuple(x.shape)}"
            )
        return x + pooled


class MaskedBranch(nn.Sequential):
    """A branch evaluated only inside a mask: ``forward(x, mask) = body(x) * mask``.

    ``mask`` ([N, 1, H, W], values in [0, 1], possibly fractional after resizing) selects where the
    branch contributes; positions where it is 0 need not be computed, so a sparse implementation
    costs ``mask_density`` times the dense MACs. ``mask_density`` is the fraction of non-zero mask
    positions on the last forward (``None`` before the first); ``binarize.profile`` reads it.
    This module holds only the masked layers, so its MACs are exactly the sparse ones.
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.mask_density: Optional[float] = None

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        self.record_density(mask)
        return super().forward(x) * mask

    def record_density(self, mask: Tensor) -> None:
        """Store the fraction of positions where ``mask`` is non-zero (over batch and space)."""
        self.mask_density = float((mask != 0).float().mean())


class SparseAssistedPair(nn.Module):
    """BiMatting's sparse-assisted pair: ``sparse(x) * mask + dense(x)``.

    ``sparse`` (a :class:`MaskedBranch`, typically a binary 3x3 unit) runs only inside the
    incoherent mask; ``dense`` (typically the same unit with a 1x1 kernel) runs everywhere, so the
    output stays defined outside the mask at a fraction of the 3x3 cost. The pair itself does not
    expose ``mask_density`` (its dense branch is dense); ``pair.sparse.mask_density`` does.
    """

    def __init__(self, sparse: nn.Module, dense: nn.Module) -> None:
        super().__init__()
        self.sparse = sparse if isinstance(sparse, MaskedBranch) else MaskedBranch(sparse)
        self.dense = dense

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.sparse(x, mask) + self.dense(x)
