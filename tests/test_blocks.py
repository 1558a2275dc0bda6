"""Block builders of binarize.nn.blocks against direct computations from their formulas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from binarize.nn import BinaryConv2d, LearnableBias
from binarize.nn.blocks import (
    CrossBlockShortcut,
    ElasticShortcutBlock,
    MaskedBranch,
    SparseAssistedPair,
    shifted_binary_conv,
)


# ------------------------------------------------------------------------------------------------
# direct formulas (BiMatting, Qin et al. 2023; official htqin/BiMatting BasicBlock / BiConv2d)
# ------------------------------------------------------------------------------------------------
def ref_binary_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """sign(x) (sign(0) = 0) convolved, zero-padded after binarization, with
    alpha * sign(W - mean W) where alpha = mean |W - mean W| per output channel."""
    w = conv.weight
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    alpha = centred.abs().mean(dim=(1, 2, 3), keepdim=True)
    return F.conv2d(torch.sign(x), alpha * torch.sign(centred), conv.bias, conv.stride, conv.padding)


def ref_bn(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    view = (1, -1, 1, 1)
    scale = bn.weight.view(view) / torch.sqrt(bn.running_var.view(view) + bn.eps)
    return (x - bn.running_mean.view(view)) * scale + bn.bias.view(view)


def ref_prelu(x: torch.Tensor, prelu: nn.PReLU) -> torch.Tensor:
    return torch.where(x >= 0, x, prelu.weight.view(1, -1, 1, 1) * x)


def ref_avgpool_ceil(x: torch.Tensor) -> torch.Tensor:
    """2x2 stride-2 average over the windows that fit, partial windows averaging their valid pixels."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, -(-h // 2), -(-w // 2))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = x[:, :, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2].mean(dim=(2, 3))
    return out


def ref_elastic_block(block: ElasticShortcutBlock, x: torch.Tensor) -> torch.Tensor:
    out1 = ref_bn(ref_binary_conv(x + block.move11.bias, block.binary_3x3), block.bn1)
    shortcut = ref_avgpool_ceil(x) if block.stride == 2 else x
    y = ref_prelu(out1 + shortcut + block.move12.bias, block.prelu1) + block.move13.bias
    z = y + block.move21.bias
    c, out = block.in_channels, block.out_channels
    if out == c:
        stage2 = ref_bn(ref_binary_conv(z, block.binary_pw), block.bn2) + y
    elif out == c // 2:
        stage2 = ref_bn(ref_binary_conv(z, block.binary_pw_down1), block.bn2_1) + (y[:, :out] + y[:, out:]) / 2
    else:
        parts = [
            ref_bn(ref_binary_conv(z, getattr(block, f"binary_pw_down{i}")), getattr(block, f"bn2_{i}")) + y
            for i in range(1, out // c + 1)
        ]
        stage2 = torch.cat(parts, dim=1)
    return ref_prelu(stage2 + block.move22.bias, block.prelu2) + block.move23.bias


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters and BatchNorm statistics, eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "weight" in name else 0.2))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


# ------------------------------------------------------------------------------------------------
# elastic-shortcut block
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_channels,out_channels,stride", [
    (8, 8, 1), (8, 16, 1), (8, 16, 2), (4, 16, 1), (16, 8, 1), (8, 4, 2), (8, 8, 2),
])
def test_elastic_block_matches_formula(in_channels, out_channels, stride):
    block = randomize(ElasticShortcutBlock(in_channels, out_channels, stride), seed=in_channels + out_channels)
    x = torch.randn(2, in_channels, 9, 7)
    with torch.no_grad():
        got = block(x)
        want = ref_elastic_block(block, x)
    assert got.shape == (2, out_channels, 5 if stride == 2 else 9, 4 if stride == 2 else 7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_channels,out_channels,names", [
    (8, 8, ["binary_pw", "bn2"]),
    (8, 16, ["binary_pw_down1", "binary_pw_down2", "bn2_1", "bn2_2"]),
    (8, 32, [f"binary_pw_down{i}" for i in range(1, 5)] + [f"bn2_{i}" for i in range(1, 5)]),
    (8, 4, ["binary_pw_down1", "bn2_1"]),
])
def test_elastic_block_official_names_and_shapes(in_channels, out_channels, names):
    block = ElasticShortcutBlock(in_channels, out_channels)
    children = dict(block.named_children())
    for name in names:
        assert name in children
    width = out_channels if out_channels < in_channels else in_channels
    conv = children[names[0]]
    assert isinstance(conv, BinaryConv2d) and conv.weight.shape == (width, in_channels, 1, 1)
    assert block.move22.bias.shape == (1, out_channels, 1, 1)
    assert block.binary_3x3.weight.shape == (in_channels, in_channels, 3, 3)


def test_elastic_block_zero_activation_gives_zero_sign():
    """sign(0) = 0: an input exactly cancelled by the learnable shift contributes nothing to the
    3x3 binary conv, so stage 1 reduces to BN of zero plus the shortcut."""
    block = randomize(ElasticShortcutBlock(4, 4), seed=3)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        block.move11.bias.copy_(-x.mean(dim=(2, 3), keepdim=True))
        x_const = x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
        conv_out = block.binary_3x3(block.move11(x_const))
    assert torch.count_nonzero(conv_out) == 0


def test_elastic_block_rejects_unsupported_widths():
    with pytest.raises(ValueError, match="out_channels in"):
        ElasticShortcutBlock(8, 24)
    with pytest.raises(ValueError, match="stride"):
        ElasticShortcutBlock(8, 8, stride=3)


def test_elastic_block_backward_reaches_every_parameter():
    block = ElasticShortcutBlock(4, 8, stride=2).train()
    block(torch.randn(2, 4, 6, 6)).square().mean().backward()
    for name, p in block.named_parameters():
        if name.endswith("channel_threshold"):  # official parameter, unused by the forward
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ------------------------------------------------------------------------------------------------
# dense cross-block shortcut
# ------------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(h=st.integers(2, 9), w=st.integers(2, 9), c=st.integers(1, 4))
def test_cross_block_shortcut_adds_ceil_pooled_features(h, w, c):
    earlier = torch.randn(1, c, h, w)
    x = torch.randn(1, c, -(-h // 2), -(-w // 2))
    got = CrossBlockShortcut()(x, earlier)
    torch.testing.assert_close(got, x + ref_avgpool_ceil(earlier))


def test_cross_block_shortcut_rejects_mismatch():
    with pytest.raises(ValueError, match="do not match"):
        CrossBlockShortcut()(torch.randn(1, 4, 3, 3), torch.randn(1, 8, 6, 6))


# ------------------------------------------------------------------------------------------------
# sparse-assisted pair
# ------------------------------------------------------------------------------------------------
def _unit(in_channels: int, out_channels: int, kernel_size: int) -> list:
    return [*shifted_binary_conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.BatchNorm2d(out_channels)]


def test_shifted_binary_conv_layout():
    shift, slot, conv = shifted_binary_conv(6, 4, 3, padding=1, bias=True)
    assert isinstance(shift, LearnableBias) and shift.bias.shape == (1, 6, 1, 1)
    assert isinstance(slot, nn.Identity)
    assert isinstance(conv, BinaryConv2d) and conv.padding == (1, 1) and conv.bias is not None
    assert conv.input_bits == 1 and conv.weight_bits == 1
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(conv(slot(shift(x))), ref_binary_conv(x + shift.bias, conv))


@settings(max_examples=10, deadline=None)
@given(density=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_masked_branch_and_pair_match_formula(density, seed):
    g = torch.Generator().manual_seed(seed)
    sparse = MaskedBranch(*_unit(5, 3, 3))
    dense = nn.Sequential(*_unit(5, 3, 1))
    pair = randomize(SparseAssistedPair(sparse, dense), seed)
    x = torch.randn(2, 5, 6, 7, generator=g)
    binary = (torch.rand(2, 1, 6, 7, generator=g) < density).float()
    mask = binary * torch.rand(2, 1, 6, 7, generator=g).clamp_min(0.1)  # fractional, like a resized mask
    assert sparse.mask_density is None
    with torch.no_grad():
        got = pair(x, mask)
        want = nn.Sequential(*sparse)(x) * mask + dense(x)
    torch.testing.assert_close(got, want)
    assert sparse.mask_density == pytest.approx(float(binary.mean()))
    assert not hasattr(pair, "mask_density")  # the dense 1x1 branch must not be scaled by profile


def test_pair_with_empty_mask_is_the_dense_branch():
    pair = randomize(SparseAssistedPair(MaskedBranch(*_unit(4, 4, 3)), nn.Sequential(*_unit(4, 4, 1))))
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(pair(x, torch.zeros(1, 1, 5, 5)), pair.dense(x))
    assert pair.sparse.mask_density == 0.0


def test_pair_wraps_a_plain_module():
    pair = SparseAssistedPair(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1))
    assert isinstance(pair.sparse, MaskedBranch)
    x, mask = torch.randn(1, 2, 4, 4), torch.ones(1, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(pair(x, mask), pair.sparse[0](x) + pair.dense(x))
    assert pair.sparse.mask_density == 1.0
