"""Fused epilogues (residual operand, output packing) and whole-block deployment of ElasticShortcutBlock."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import randomize_stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from binarize.engine import Epilogue, available, binary_conv2d, deploy, deploy_report, pack_weights
from binarize.engine.blocks import ElasticShortcutForward, take_packed
from binarize.engine.functional import pack_activations, pack_activations_torch
from binarize.nn.blocks import ElasticShortcutBlock

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BACKENDS = ("c", "torch") if available() else ("torch",)


def _randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_stats(module, seed, mean_scale=0.3)


@FAST
@given(cin=st.integers(1, 130), out_blocks=st.integers(1, 3), res_div=st.sampled_from([1, 2, 3]),
       kernel=st.sampled_from([1, 3]), stride=st.integers(1, 2), n=st.integers(1, 2),
       h=st.integers(3, 9), w=st.integers(3, 9), seed=st.integers(0, 2**16))
def test_residual_epilogue_and_output_bits_match_formula(cin, out_blocks, res_div, kernel, stride, n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    out_channels = 3 * out_blocks * res_div + (seed % 5) * res_div  # any count the residual width divides
    x = torch.randn(n, cin, h, w, generator=g)
    bias = torch.randn(cin, generator=g) * 0.3
    positive = torch.randn(out_channels, cin, kernel, kernel, generator=g) >= 0
    padding = kernel // 2
    oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    residual = torch.randn(n, out_channels // res_div, oh, ow, generator=g)
    scale, shift, add, slope = (torch.rand(out_channels, generator=g), torch.randn(out_channels, generator=g),
                                torch.randn(out_channels, generator=g), torch.rand(out_channels, generator=g))
    epilogue = Epilogue(scale=scale, shift=shift, ops=[("residual", None), ("add", add), ("prelu", slope)])
    signs = torch.where(x + bias.view(1, -1, 1, 1) >= 0, 1.0, -1.0).double()
    dot = F.conv2d(signs, positive.double() * 2 - 1, None, stride, padding).float()
    y = dot * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) + residual.repeat(1, res_div, 1, 1)
    y = y + add.view(1, -1, 1, 1)
    expected = torch.where(y >= 0, y, y * slope.view(1, -1, 1, 1))
    next_bias = torch.randn(out_channels, generator=g) * 0.3
    words = n * oh * ow * math.ceil(out_channels / 64)
    for backend in BACKENDS:
        bits = torch.full((words,), 7, dtype=torch.int64)
        got = binary_conv2d(x, pack_weights(positive), input_bias=bias, stride=stride, padding=padding,
                            epilogue=epilogue, residual=residual, output_bits=bits, output_bits_bias=next_bias,
                            backend=backend)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        # the packed output is exactly what packing the float output would give
        assert torch.equal(bits.view(n, oh * ow, 1, -1), pack_activations_torch(got, next_bias))
        if backend == "c":
            assert torch.equal(bits.view(n, oh * ow, 1, -1), pack_activations(got, next_bias, 1))
            packed = pack_activations(x, bias, 1)
            again = binary_conv2d(torch.empty_like(x), pack_weights(positive), stride=stride, padding=padding,
                                  epilogue=epilogue, residual=residual, packed_input=packed.reshape(-1))
            assert torch.equal(again, got)  # x only gives the shape when the input comes packed


@FAST
@given(cin=st.integers(1, 70), operand=st.integers(1, 12), repeats=st.integers(1, 2), kernel=st.sampled_from([1, 3]),
       sparse=st.booleans(), n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_residual_halves_equal_the_mean_of_the_two_halves(cin, operand, repeats, kernel, sparse, n, h, w, seed):
    """A shrinking block's shortcut, read by the epilogue from the full map, bit-equal to averaging first."""
    g = torch.Generator().manual_seed(seed)
    out_channels = operand * repeats
    packed = pack_weights(torch.rand(out_channels, cin, kernel, kernel, generator=g) < 0.5)
    epilogue = Epilogue(scale=torch.rand(out_channels, generator=g), shift=torch.randn(out_channels, generator=g),
                        ops=[("residual", None), ("add", torch.randn(out_channels, generator=g)),
                             ("prelu", torch.rand(out_channels, generator=g))])
    x = torch.randn(n, cin, h, w, generator=g)
    full = torch.randn(n, 2 * operand, h, w, generator=g)
    mean = (full[:, :operand] + full[:, operand:]) / 2
    positions = torch.nonzero(torch.rand(n * h * w, generator=g) < 0.5).reshape(-1) if sparse else None
    for backend in BACKENDS:
        expected = binary_conv2d(x, packed, padding=kernel // 2, epilogue=epilogue, residual=mean,
                                 positions=positions, backend=backend)
        got = binary_conv2d(x, packed, padding=kernel // 2, epilogue=epilogue, residual=full, residual_halves=True,
                            positions=positions, backend=backend)
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="does not fit"):
        binary_conv2d(x, packed, padding=kernel // 2, epilogue=epilogue, residual=full[:, :1], residual_halves=True)


def test_residual_and_output_bits_errors():
    x = torch.randn(1, 8, 5, 5)
    weights = pack_weights(torch.rand(6, 8, 1, 1) > 0.5)
    with pytest.raises(ValueError, match="residual"):
        binary_conv2d(x, weights, epilogue=Epilogue(ops=[("residual", None)]))
    with pytest.raises(ValueError, match="does not fit"):
        binary_conv2d(x, weights, epilogue=Epilogue(ops=[("residual", None)]), residual=torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="output_bits needs a dense call"):
        binary_conv2d(x, weights, positions=torch.tensor([0, 3]), output_bits=torch.empty(25, dtype=torch.int64))
    if available():
        with pytest.raises(ValueError, match="packed_input"):
            binary_conv2d(x, weights, packed_input=torch.empty(3, dtype=torch.int64))
        with pytest.raises(ValueError, match="output_bits must be"):
            binary_conv2d(x, weights, output_bits=torch.empty(3, dtype=torch.int64))


@pytest.mark.parametrize("cin,cout,stride", [(16, 16, 1), (16, 32, 2), (32, 128, 1), (64, 32, 2), (40, 20, 1),
                                             (70, 70, 2)])
def test_deployed_elastic_block_matches_simulated(cin, cout, stride):
    block = _randomized(ElasticShortcutBlock(cin, cout, stride), seed=cin + cout)
    x = torch.randn(2, cin, 11, 13)
    with torch.no_grad():
        expected = block(x)
    deployed = deploy(block)
    assert isinstance(deployed.forward, ElasticShortcutForward)
    report = deploy_report(deployed)
    assert "binary_3x3" in report.packed and report.fused["binary_3x3"][:3] == ["move11", "bn1", "move12"]
    assert deployed.binary_3x3.implementation == "packed"  # direct calls of the conv still run packed
    with torch.no_grad():
        got = deployed(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _chain(seed: int = 3) -> nn.Sequential:
    return _randomized(nn.Sequential(ElasticShortcutBlock(32, 64, 2), ElasticShortcutBlock(64, 64, 1),
                                     ElasticShortcutBlock(64, 32, 1)), seed)


@pytest.mark.parametrize("size", [(17, 15), (5, 262)])  # 262: maps 131 wide, tiles of 128 pixels
def test_blocks_hand_packed_outputs_to_the_next_block(size):
    model = _chain()
    x = torch.randn(1, 32, *size)
    with torch.no_grad():
        expected = model(x)
        deployed = deploy(model)
        first = deployed(x)  # links each block to the block that consumes its output
        assert deployed[0].forward.pack_next is deployed[1].forward.input_bias
        assert deployed[1].forward.pack_next is deployed[2].forward.input_bias
        out0 = deployed[0](x)
        if available():
            words = take_packed(out0, deployed[1].forward.input_bias)
            assert words is not None and torch.equal(
                words.view(1, -1, 1, 1), pack_activations(out0, deployed[1].forward.input_bias, 1))
            assert take_packed(out0, deployed[2].forward.input_bias) is None  # another consumer's shift
        second = deployed(x)
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(first, second)


def test_in_place_change_between_blocks_invalidates_the_packed_output():
    model = _chain()
    x = torch.randn(1, 32, 9, 9)
    deployed = deploy(model)
    with torch.no_grad():
        deployed(x)
        out0 = deployed[0](x)
        out0.neg_()  # flips every sign: stale packed words would give a different result
        expected = model[1](out0.clone())
        got = deployed[1](out0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_inference_mode_skips_the_hand_off_and_stays_exact():
    model = _chain()
    x = torch.randn(1, 32, 9, 9)
    deployed = deploy(model)
    with torch.no_grad():
        expected = model(x)
    with torch.inference_mode():
        deployed(x)
        got = deployed(x)
        assert take_packed(deployed[0](x), deployed[1].forward.input_bias) is None
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_blocks_the_fused_forward_cannot_reproduce_are_packed_layer_by_layer():
    block = _randomized(ElasticShortcutBlock(16, 32, 1, method="xnor"))
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        expected = block(x)
    deployed = deploy(block)
    assert "forward" not in deployed.__dict__  # the generic per-layer deployment ran
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), expected, rtol=1e-4, atol=1e-4)


def test_deployed_block_rejects_wrong_channels():
    deployed = deploy(_randomized(ElasticShortcutBlock(16, 16, 1)))
    with pytest.raises(ValueError, match="expects \\[N, 16, H, W\\]"):
        deployed(torch.randn(1, 8, 5, 5))


# ------------------------------------------------------------------ up-sample + concatenate + pack
@pytest.mark.skipif(not available(), reason="C kernels not built")
@FAST
@given(n=st.integers(1, 2), low_channels=st.integers(0, 70), skip_channels=st.lists(st.integers(1, 40), max_size=3),
       h=st.integers(1, 7), w=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_upsample_concat_pack_equals_packing_the_concatenation(n, low_channels, skip_channels, h, w, seed):
    from binarize.engine.functional import upsample2x, upsample_concat_pack

    if low_channels + sum(skip_channels) == 0:
        skip_channels = [1]
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, low_channels, h, w, generator=g)
    skips = [torch.randn(n, c, 2 * h, 2 * w, generator=g) for c in skip_channels]
    concat = torch.cat([upsample2x(low), *skips], dim=1)
    biases = [torch.randn(concat.shape[1], generator=g) * 0.3, None]
    words = upsample_concat_pack(low, skips, biases)
    for got, bias in zip(words, biases):
        assert torch.equal(got, pack_activations(concat, bias, 1))
    # shapes it cannot take give None (the caller builds the concatenation instead)
    assert upsample_concat_pack(low, [torch.randn(n, 2, 2 * h + 1, 2 * w)], biases) is None


@pytest.mark.skipif(not available(), reason="C kernels not built")
@FAST
@given(n=st.integers(1, 2), part_channels=st.lists(st.integers(1, 70), min_size=1, max_size=4),
       h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_concat_pack_equals_packing_the_concatenation(n, part_channels, h, w, seed):
    from binarize.engine.functional import concat_pack

    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, c, h, w, generator=g) for c in part_channels]
    concat = torch.cat(parts, dim=1)
    biases = [torch.randn(concat.shape[1], generator=g) * 0.3, None]
    for got, bias in zip(concat_pack(parts, biases), biases):
        assert torch.equal(got, pack_activations(concat, bias, 1))
    # parts of another size give None (the caller builds the concatenation instead)
    assert concat_pack([*parts, torch.randn(n, 2, h + 1, w)], biases) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_recurrent_gates_read_the_packed_parts_without_building_the_concatenation(backend, monkeypatch):
    from binarize.engine import functional
    from binarize.models.bimatting_decoder import MaskedConvGRU

    gru = _randomized(MaskedConvGRU(6), 11)
    x = torch.randn(1, 3, 6, 9, 10)  # [B, T, C, H, W]
    mask = torch.zeros(1, 3, 1, 9, 10)
    mask[0, :, 0, 2:5, 3:8] = 0.5
    mask[0, 1, 0, 7, 9] = 1.0
    with torch.no_grad():
        expected = gru(x, None, mask)
    deployed = deploy(gru, backend=backend)
    calls = []
    original = functional.concat_pack
    monkeypatch.setattr("binarize.engine.fusion.concat_pack", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        got = deployed(x, None, mask)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    # two gates per frame take the fused path with the C kernels; the torch backend concatenates
    assert len(calls) == (6 if backend == "c" else 0)
    assert deployed.update_forward is not None and MaskedConvGRU.update_forward is None


@FAST
@given(size=st.integers(0, 70000), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_gru_update_equals_the_three_torch_ops_bit_for_bit(size, strided, seed):
    from binarize.engine.functional import gru_update

    g = torch.Generator().manual_seed(seed)
    h, c = torch.randn(size, generator=g), torch.randn(size, generator=g)
    z = torch.rand(2 * size, generator=g)[::2] if strided else torch.rand(size, generator=g)
    for backend in BACKENDS:  # a strided z takes the torch expression
        assert torch.equal(gru_update(h, z, c, backend=backend), (1 - z) * h + z * c)


# ------------------------------------------------------------------ channel mix (fused pointwise float conv)
@FAST
@given(cin=st.integers(1, 80), mid=st.integers(1, 40), out=st.integers(1, 40), kernel=st.sampled_from([1, 3]),
       groups=st.sampled_from([1, 2]), relu=st.booleans(), sparse=st.booleans(), n=st.integers(1, 2),
       h=st.integers(1, 9), w=st.integers(1, 13), seed=st.integers(0, 2**16))
def test_channel_mix_equals_a_pointwise_conv_after_the_epilogue(cin, mid, out, kernel, groups, relu, sparse, n, h, w,
                                                                 seed):
    from binarize.engine.functional import ChannelMix

    cin, mid = cin * groups, mid * groups
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g)
    positive = torch.randn(mid, cin // groups, kernel, kernel, generator=g) >= 0
    scale, shift = torch.rand(mid, generator=g), torch.randn(mid, generator=g)
    mix_weight, mix_bias = torch.randn(out, mid, generator=g) * 0.2, torch.randn(out, generator=g)
    signs = torch.where(x >= 0, 1.0, -1.0).double()
    dot = F.conv2d(signs, positive.double() * 2 - 1, None, 1, kernel // 2, 1, groups).float()
    y = (dot * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).clamp_min(0)
    expected = F.conv2d(y.double(), mix_weight.double()[:, :, None, None], mix_bias.double()).float()
    expected = expected.clamp_min(0) if relu else expected
    positions = torch.nonzero(torch.rand(n * h * w, generator=g) < 0.5).reshape(-1) if sparse else None
    epilogue = Epilogue(scale=scale, shift=shift, ops=[("relu", None)], mix=ChannelMix(mix_weight, mix_bias, relu))
    for backend in BACKENDS:
        got = binary_conv2d(x, pack_weights(positive, groups), padding=kernel // 2, epilogue=epilogue,
                            positions=positions, backend=backend)
        assert got.shape == (n, out, h, w)
        if positions is None:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
        else:  # the listed outputs, zeros elsewhere
            flat_got, flat_expected = got.transpose(0, 1).reshape(out, -1), expected.transpose(0, 1).reshape(out, -1)
            torch.testing.assert_close(flat_got[:, positions], flat_expected[:, positions], rtol=1e-5, atol=1e-4)
            rest = torch.ones(n * h * w, dtype=torch.bool)
            rest[positions] = False
            assert not bool(flat_got[:, rest].any())


def test_channel_mix_rejects_what_it_cannot_follow():
    from binarize.engine.functional import ChannelMix

    weights = pack_weights(torch.ones(8, 4, 1, 1, dtype=torch.bool))
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="channel mix takes 6 channels, the conv gives 8"):
        binary_conv2d(x, weights, epilogue=Epilogue(mix=ChannelMix(torch.ones(2, 6), torch.zeros(2))))
    with pytest.raises(ValueError, match="output_bits cannot follow a channel mix"):
        binary_conv2d(x, weights, epilogue=Epilogue(mix=ChannelMix(torch.ones(2, 8), torch.zeros(2))),
                      output_bits=torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match="needs as many biases"):
        ChannelMix(torch.ones(2, 8), torch.zeros(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_deploy_fuses_a_pointwise_float_conv_after_a_binary_conv(backend):
    from binarize.nn.blocks import shifted_binary_conv

    model = _randomized(nn.Sequential(*shifted_binary_conv(11, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                      nn.Conv2d(12, 7, 1), nn.BatchNorm2d(7), nn.ReLU(),
                                      nn.Conv2d(7, 5, 1)), 3).eval()
    x = torch.randn(2, 11, 9, 10)
    with torch.no_grad():
        expected = model(x)
    deployed = deploy(model, backend=backend)
    fused = deploy_report(deployed).fused
    # the first 1x1 conv with its BN and ReLU rides on the binary conv; the last stays a plain conv
    assert fused["2"] == ["0", "3", "4", "5", "6", "7"]
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), expected, rtol=1e-4, atol=1e-4)


def _output_block(seed: int = 5):
    from binarize.models.bimatting_decoder import OutputBlock

    return _randomized(OutputBlock(12, 3, 8), seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_pairs_read_the_packed_parts_without_building_the_concatenation(backend, monkeypatch):
    from binarize.engine import functional

    block = _output_block()
    x = torch.randn(1, 2, 12, 6, 7)  # [B, T, C, h, w]
    s = torch.rand(1, 2, 3, 12, 14)
    coarse = torch.zeros(2, 1, 3, 4)
    coarse[0, 0, 1, 1:3] = 1.0
    coarse[1, 0, 2, 0] = 1.0
    with torch.no_grad():
        expected = block(x, s, coarse)
    deployed = deploy(block, backend=backend)
    calls = []
    original = functional.upsample_concat_pack
    monkeypatch.setattr("binarize.engine.fusion.upsample_concat_pack",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        got = deployed(x, s, coarse)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the C kernels take the fused path; the torch backend builds the concatenation as before
    assert len(calls) == (1 if backend == "c" else 0)
    if backend == "c":  # a cropped up-sampling (odd skip size) falls back to the concatenation
        with torch.no_grad():
            odd = deployed(x, s[..., :13], coarse)
            torch.testing.assert_close(odd, block(x, s[..., :13], coarse), rtol=1e-4, atol=1e-4)
        assert len(calls) == 1


@pytest.mark.parametrize("op", ["sigmoid", "tanh"])
def test_gate_activations_in_the_epilogue_match_torch(op):
    """The kernels' vectorised sigmoid / tanh (conv epilogue, 8 lanes + scalar tail) stay within a
    couple of float32 ulps of PyTorch, over the whole range including saturation and tiny values."""
    from binarize.engine.functional import pointwise

    reference = getattr(torch, op)
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.randn(5000) * 3,
                   torch.tensor([0.0, -0.0, 1e-8, -1e-8, 0.6249, 0.6251, -0.6251, 88.0, -88.0, 95.0, -95.0])])
    exact = reference(x.double())
    tolerance = 3 * torch.finfo(torch.float32).eps * exact.abs().clamp_min(1e-30) + 1e-45
    got_pointwise = pointwise(x.view(1, 1, -1), Epilogue(ops=[(op, None)])).view(-1)
    assert bool(((got_pointwise.double() - exact).abs() <= tolerance).all())
    weights = pack_weights(torch.ones(8, 1, 1, 1, dtype=torch.bool))  # dot = +-1: y = scale * sign(x)
    inputs = torch.ones(1, 1, 1, x.numel())
    for backend in BACKENDS:
        got = binary_conv2d(inputs, weights, epilogue=Epilogue(scale=torch.full((8,), 1.0), shift=None,
                                                               ops=[("mul", torch.ones(8)), (op, None)]),
                            backend=backend)
        assert torch.allclose(got, reference(torch.ones(())).expand_as(got), rtol=0, atol=1e-7)
    # the full range through the conv epilogue: per-channel shifts place each input value
    shifts = x[: 8 * 1000].view(8, 1000)
    for column in range(0, 1000, 250):
        epilogue = Epilogue(scale=torch.zeros(8), shift=shifts[:, column].contiguous(), ops=[(op, None)])
        for backend in BACKENDS:
            got = binary_conv2d(torch.ones(1, 1, 3, 11), weights, epilogue=epilogue, backend=backend)
            want = reference(shifts[:, column].double()).view(1, 8, 1, 1).expand_as(got)
            assert torch.allclose(got.double(), want, rtol=3 * torch.finfo(torch.float32).eps, atol=1e-30)


def test_untraceable_pointwise_convs_run_as_one_gemm():
    from binarize.engine.fusion import FoldedConv2dForward

    class Head(nn.Module):  # branches on ndim: torch.fx cannot trace it, so no container fusion
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 4, 1)
            self.spatial = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            if x.ndim == 5:
                return self.forward(x.flatten(0, 1)).unflatten(0, x.shape[:2])
            return self.spatial(self.conv(x))

    head = Head().eval()
    x = torch.randn(2, 3, 16, 9, 7)
    with torch.no_grad():
        expected = head(x)
        deployed = deploy(head)
        got = deployed(x)
    assert isinstance(deployed.conv.__dict__.get("forward"), FoldedConv2dForward)
    assert "forward" not in deployed.spatial.__dict__  # only unpadded 1x1 convs become GEMMs
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ masked sum accumulated by the kernels
@FAST
@given(cin=st.integers(1, 70), cout=st.integers(1, 20), kernel=st.sampled_from([1, 3]), n=st.integers(1, 2),
       h=st.integers(1, 9), w=st.integers(1, 11), density=st.sampled_from([0.2, 1.0]), seed=st.integers(0, 2**16))
def test_binary_conv_accumulate_equals_product_then_sum_at_the_positions(cin, cout, kernel, n, h, w, density, seed):
    g = torch.Generator().manual_seed(seed)
    packed = pack_weights(torch.rand(cout, cin, kernel, kernel, generator=g) < 0.5)
    epilogue = Epilogue(scale=torch.rand(cout, generator=g) + 0.5, shift=torch.randn(cout, generator=g),
                        ops=[("prelu", torch.rand(cout, generator=g))])
    x = torch.randn(n, cin, h, w, generator=g)
    weight = torch.rand(n, 1, h, w, generator=g)
    positions = torch.nonzero(torch.rand(n * h * w, generator=g) < density).reshape(-1)
    start = torch.randn(n, cout, h, w, generator=g)
    for backend in BACKENDS:
        y = binary_conv2d(x, packed, padding=kernel // 2, epilogue=epilogue, backend=backend)
        expected = start.clone().permute(1, 0, 2, 3).reshape(cout, -1)
        flat_y = y.permute(1, 0, 2, 3).reshape(cout, -1)
        expected[:, positions] = flat_y[:, positions] * weight.reshape(-1)[positions] + expected[:, positions]
        expected = expected.reshape(cout, n, h, w).permute(1, 0, 2, 3)
        out = start.clone()
        got = binary_conv2d(x, packed, padding=kernel // 2, epilogue=epilogue, positions=positions, out=out,
                            accumulate=weight, backend=backend)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got, expected)  # bit for bit: the product, then the sum, as torch rounds them


def test_accumulate_rejects_what_it_cannot_follow():
    packed = pack_weights(torch.rand(4, 3, 3, 3) < 0.5)
    x, out = torch.randn(1, 3, 5, 5), torch.zeros(1, 4, 5, 5)
    with pytest.raises(ValueError, match="accumulate needs positions"):
        binary_conv2d(x, packed, padding=1, out=out, accumulate=torch.ones(25))
    with pytest.raises(ValueError, match="one per output pixel"):
        binary_conv2d(x, packed, padding=1, out=out, positions=torch.tensor([1, 2]), accumulate=torch.ones(24))


@FAST
@given(cin=st.integers(1, 9), cout=st.sampled_from([3, 8, 16]), relu=st.booleans(), h=st.integers(1, 14),
       w=st.integers(1, 14), seed=st.integers(0, 2**16))
def test_sparse_float_conv_accumulate_equals_product_then_sum(cin, cout, relu, h, w, seed):
    from binarize.engine.fusion import FoldedConv2dForward

    torch.manual_seed(seed)
    folded = FoldedConv2dForward(nn.Conv2d(cin, cout, 3, padding=1), None, relu)
    x = torch.randn(2, cin, h, w)
    weight = torch.rand(2, 1, h, w)
    positions = torch.nonzero(torch.rand(2 * h * w) < 0.5).reshape(-1)
    y = folded(x, positions=positions)
    start = torch.randn(2, cout, h, w)
    expected = start.clone().permute(1, 0, 2, 3).reshape(cout, -1)
    flat_y = y.permute(1, 0, 2, 3).reshape(cout, -1)
    expected[:, positions] = flat_y[:, positions] * weight.reshape(-1)[positions] + expected[:, positions]
    out = start.clone()
    got = folded._sparse_c(x, positions, out=out, accumulate=weight)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, expected.reshape(cout, 2, h, w).permute(1, 0, 2, 3))


@pytest.mark.skipif(not available(), reason="the fused masked sum needs the compiled kernels")
@pytest.mark.parametrize("branch", ["gate", "output"])
def test_sparse_pairs_add_the_masked_branch_inside_its_last_conv(branch, monkeypatch):
    """The pair's masked sum happens in the last conv's kernel, bit-identical to the gathered sum."""
    from binarize.engine.fusion import SparseMaskedForward
    from binarize.models.bimatting_decoder import binary_gate
    from binarize.nn.blocks import MaskedBranch, SparseAssistedPair, shifted_binary_conv

    torch.manual_seed(5)
    if branch == "gate":
        sparse, dense = binary_gate(10, 6, 3, nn.Sigmoid(), shift_after=True), binary_gate(10, 6, 1, nn.Sigmoid(), shift_after=True)
    else:
        def body(k):
            return [*shifted_binary_conv(10, 6, k, padding=k // 2), nn.BatchNorm2d(6), nn.ReLU(),
                    nn.Conv2d(6, 6, k, 1, k // 2, bias=False), nn.BatchNorm2d(6), nn.ReLU()]
        sparse, dense = body(3), body(1)
    pair = _randomized(SparseAssistedPair(MaskedBranch(*sparse), nn.Sequential(*dense)), seed=2)
    x = torch.randn(2, 10, 12, 13)
    mask = torch.zeros(2, 1, 12, 13)
    mask[0, :, 1:4, 2:7] = 0.25
    mask[1, :, 6:, 9:] = torch.rand(6, 4)
    with torch.no_grad():
        expected = pair(x, mask)
    deployed = deploy(pair)
    fused = []
    original = SparseMaskedForward._accumulate

    def spy(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        fused.append(result is not None)
        return result

    monkeypatch.setattr(SparseMaskedForward, "_accumulate", spy)
    got = deployed(x, mask)
    assert fused == [True]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(SparseMaskedForward, "_accumulate", lambda self, *a, **k: None)
    assert torch.equal(got, deployed(x, mask))  # the gathered path gives the same bits


# ------------------------------------------------------------------ guided filter's full-resolution step
@FAST
@given(n=st.integers(1, 2), channels=st.integers(1, 5), h=st.integers(1, 9), w=st.integers(1, 9),
       height=st.integers(1, 40), width=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_guided_apply_equals_resize_times_guide_plus_offset(n, channels, h, w, height, width, seed):
    from binarize.engine.functional import guided_apply

    g = torch.Generator().manual_seed(seed)
    slope, offset = torch.randn(n, channels, h, w, generator=g), torch.randn(n, channels, h, w, generator=g)
    guide, last = torch.rand(n, channels - 1, height, width, generator=g), torch.rand(n, 1, height, width, generator=g)
    size = (height, width)
    expected = (F.interpolate(slope, size, mode="bilinear", align_corners=False) * torch.cat([guide, last], 1)
                + F.interpolate(offset, size, mode="bilinear", align_corners=False))
    for backend in BACKENDS:
        got = guided_apply(slope, offset, guide, last, backend=backend)
        # PyTorch's own weights; the sums may round differently in the last bit
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        guided_apply(slope, offset, guide[:, :0] if channels > 1 else torch.rand(n, 1, height, width), last)


def test_deployed_refiner_runs_the_full_resolution_step_on_the_kernel(monkeypatch):
    from binarize.models import create_model
    from binarize.models.rvm_decoder import DeepGuidedFilterRefiner

    model = _randomized(create_model("bimatting"), seed=4)
    src = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        expected = model(src, downsample_ratio=0.5)
    deployed = deploy(model)
    assert deployed.refiner.full_resolution_forward is not None
    assert DeepGuidedFilterRefiner.full_resolution_forward is None  # the class slot stays empty
    calls = []
    kernel = deployed.refiner.full_resolution_forward
    monkeypatch.setattr(deployed.refiner, "full_resolution_forward", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        got = deployed(src, downsample_ratio=0.5)
    assert calls == [1]
    for g, e in zip(got[:2], expected[:2]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
