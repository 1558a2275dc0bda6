"""The packed engine: kernels against the simulated layers, fallback == C, fusion, sparsity, deploy."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import randomize_stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from binarize.engine import (
    Epilogue,
    PackedConv2d,
    PackedLinear,
    _lib,
    available,
    binary_conv2d,
    binary_linear,
    deploy,
    deploy_report,
    functional,
    kernel_info,
    pack_weights,
    set_kernel,
)
from binarize.engine.functional import nibble_tables, pack_activations
from binarize.nn import BinaryConv2d, BinaryLinear, LearnableBias
from binarize.nn.blocks import MaskedBranch, SparseAssistedPair, shifted_binary_conv

needs_c = pytest.mark.skipif(not available(), reason="C kernels not built (python setup.py build_ext --inplace)")
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_dot(x, positive, bias, stride, padding, dilation, groups, pad_value):
    """sum of sign(x + bias) * sign(w) over the (padded) window, in float64 (exact integers)."""
    v = x if bias is None else x + bias.view(1, -1, 1, 1)
    signs = torch.where(v >= 0, 1.0, -1.0).double()
    if pad_value:
        signs = F.pad(signs, (padding[1], padding[1], padding[0], padding[0]), value=pad_value)
        padding = (0, 0)
    return F.conv2d(signs, positive.double() * 2 - 1, None, stride, padding, dilation, groups)


conv_cases = st.fixed_dictionaries({
    "groups": st.sampled_from([1, 1, 2, 3]),
    "cg": st.sampled_from([1, 3, 16, 63, 64, 65, 100, 130]),
    "og": st.sampled_from([1, 5, 8, 9, 17]),
    "kernel": st.tuples(st.integers(1, 4), st.integers(1, 4)),
    "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "padding": st.tuples(st.integers(0, 3), st.integers(0, 3)),
    "pad_value": st.sampled_from([0.0, 1.0, -1.0]),
    "size": st.tuples(st.integers(1, 2), st.integers(4, 11), st.integers(4, 11)),
    "seed": st.integers(0, 2**16),
})


def _make_case(case):
    g = torch.Generator().manual_seed(case["seed"])
    n, h, w = case["size"]
    c = case["groups"] * case["cg"]
    x = torch.randn(n, c, h, w, generator=g)
    bias = torch.randn(c, generator=g) * 0.3
    positive = torch.randn(case["og"] * case["groups"], case["cg"], *case["kernel"], generator=g) >= 0
    return x, bias, positive


def _too_small(case) -> bool:
    _, h, w = case["size"]
    kh, kw = case["kernel"]
    eff_h = case["dilation"][0] * (kh - 1) + 1
    eff_w = case["dilation"][1] * (kw - 1) + 1
    return h + 2 * case["padding"][0] < eff_h or w + 2 * case["padding"][1] < eff_w


@needs_c
@FAST
@given(case=conv_cases)
def test_kernels_match_exact_integer_dot_products(case):
    if _too_small(case):
        return
    x, bias, positive = _make_case(case)
    packed = pack_weights(positive, case["groups"])
    expected = reference_dot(x, positive, bias, case["stride"], case["padding"], case["dilation"],
                             case["groups"], case["pad_value"]).float()
    kwargs = dict(input_bias=bias, stride=case["stride"], padding=case["padding"],
                  dilation=case["dilation"], pad_value=case["pad_value"])
    info = kernel_info()
    try:
        for kernel in info["supported"]:
            set_kernel(kernel)
            assert torch.equal(binary_conv2d(x, packed, backend="c", **kwargs), expected), kernel
    finally:
        set_kernel("auto")
    assert torch.equal(binary_conv2d(x, packed, backend="torch", **kwargs), expected)


table_cases = st.fixed_dictionaries({
    "cin": st.sampled_from([1, 3, 4, 5, 16, 35, 64, 67, 130]),  # 67, 130: nibbles past the first word
    "cout": st.sampled_from([1, 8, 13, 16, 40]),
    "kernel": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "stride": st.tuples(st.integers(1, 2), st.integers(1, 3)),
    "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "padding": st.tuples(st.integers(0, 2), st.integers(0, 2)),
    "pad_value": st.sampled_from([0.0, 0.0, 1.0, -1.0]),
    # widths past 32, 64 and 128: tiles of several (and unpaired) 32-pixel vectors, rows split over
    # tiles, the 128-pixel tiles of maps at least 128 wide
    "size": st.tuples(st.integers(1, 3), st.integers(3, 13), st.integers(3, 140)),
    "channels_last": st.booleans(),
    "nonfinite": st.booleans(),  # +-inf and NaN inputs: sign(NaN) is -1 (bit 0) in every path
    "selectors": st.booleans(),  # the shared tables (large layers) instead of the layer's own
    "seed": st.integers(0, 2**16),
})


@needs_c
@FAST
@given(case=table_cases)
def test_table_kernel_equals_popcount_kernel_and_torch(case):
    """avx2_nibble (nibble planes + VPSHUFB tables, the layer's own or selectors of the shared ones)
    against the popcount kernel and the float conv, from floats (contiguous or channels-last, with an
    input shift, finite or not) and from packed words, with a fused epilogue: the same bits."""
    if "avx2_nibble" not in kernel_info()["supported"]:
        pytest.skip("the table kernel needs AVX2")
    if _too_small(case):
        return
    n, h, w = case["size"]
    kh, kw = case["kernel"]
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(n, case["cin"], h, w, generator=g)
    if case["nonfinite"]:
        special = torch.tensor([float("inf"), -float("inf"), float("nan")])
        where = torch.rand(x.shape, generator=g) < 0.2
        x[where] = special[torch.randint(0, 3, (int(where.sum()),), generator=g)]
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(case["cin"], generator=g) * 0.3
    positive = torch.randn(case["cout"], case["cin"], kh, kw, generator=g) >= 0
    weights = pack_weights(positive)
    epilogue = Epilogue(scale=torch.rand(case["cout"], generator=g) + 0.5, shift=torch.randn(case["cout"], generator=g),
                        ops=[("prelu", torch.rand(case["cout"], generator=g) * 0.3)])
    kwargs = dict(input_bias=bias, stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                  pad_value=case["pad_value"], epilogue=epilogue)
    packed = pack_activations(x, bias, groups=1)
    results = {}
    own_max = functional.OWN_TABLES_MAX_BYTES
    functional.OWN_TABLES_MAX_BYTES = 0 if case["selectors"] else own_max
    try:
        for kernel in ("avx2_hybrid", "avx2_nibble"):
            set_kernel(kernel)
            results[kernel] = binary_conv2d(x, weights, backend="c", **kwargs)
            results[kernel + " packed"] = binary_conv2d(x, weights, backend="c", packed_input=packed, **kwargs)
    finally:
        set_kernel("auto")
        functional.OWN_TABLES_MAX_BYTES = own_max
    if (kh, kw) != (1, 1):  # 1x1 convs count with the word kernels: no tables
        assert weights.nibble_tables.dim() == (4 if case["selectors"] else 5)  # the form under test was used
    expected = binary_conv2d(x, weights, backend="torch", **kwargs)
    for name, y in results.items():
        assert torch.equal(y, expected), name


def test_nibble_tables_hold_popcounts_of_xor():
    """Entry i of output o, tap t, nibble k = popcount(i XOR the weight's bits 4k..4k+3 of tap t);
    as selectors, the offset 16 * w of that table among the shared ones."""
    g = torch.Generator().manual_seed(3)
    positive = torch.randn(13, 7, 3, 2, generator=g) >= 0  # 7 channels: the last nibble has 3
    taps = positive.permute(0, 2, 3, 1).reshape(13, 6, 7)  # [o][tap][channel], tap = kh * KW + kw
    bits = torch.cat([taps.reshape(13, 42), torch.zeros(3, 42, dtype=torch.bool)])  # 13 outputs padded to 16
    tables = nibble_tables(bits, 6)
    selectors = nibble_tables(bits, 6, selectors=True)
    assert tables.shape == (16 // 4, 6, 2, 4, 16) and tables.dtype == torch.uint8
    assert selectors.shape == (16 // 4, 6, 2, 4) and selectors.dtype == torch.uint8
    for o in range(13):
        for t in range(6):
            for k in range(2):
                weight = sum(int(b) << j for j, b in enumerate(taps[o, t, 4 * k: 4 * k + 4]))
                assert tables[o // 4, t, k, o % 4].tolist() == [bin(i ^ weight).count("1") for i in range(16)]
                assert selectors[o // 4, t, k, o % 4] == 16 * weight


@needs_c
def test_large_layers_keep_selectors_of_the_shared_tables():
    """Own tables up to OWN_TABLES_MAX_BYTES; a 256 -> 256 3x3 layer (2.4 MB of own tables) keeps
    1-byte selectors, and both forms give the popcount kernel's bits."""
    if "avx2_nibble" not in kernel_info()["supported"]:
        pytest.skip("the table kernel needs AVX2")
    g = torch.Generator().manual_seed(5)
    small = pack_weights(torch.randn(16, 16, 3, 3, generator=g) >= 0)
    large = pack_weights(torch.randn(256, 256, 3, 3, generator=g) >= 0)
    x = torch.randn(1, 256, 6, 37, generator=g)
    try:
        set_kernel("avx2_nibble")
        binary_conv2d(x[:, :16], small, padding=1)
        y = binary_conv2d(x, large, padding=1)
        set_kernel("avx2_hybrid")
        expected = binary_conv2d(x, large, padding=1)
    finally:
        set_kernel("auto")
    assert small.nibble_tables.shape == (4, 9, 4, 4, 16)  # 9 KB: its own
    assert large.nibble_tables.shape == (64, 9, 64, 4)  # 147 KB of selectors instead of 2.4 MB
    assert torch.equal(y, expected)


@needs_c
def test_nibble_tables_are_built_by_the_first_dense_call_only():
    if "avx2_nibble" not in kernel_info()["supported"]:
        pytest.skip("the table kernel needs AVX2")
    g = torch.Generator().manual_seed(4)
    positive = torch.randn(13, 7, 3, 2, generator=g) >= 0
    x = torch.randn(1, 7, 9, 8, generator=g)
    weights = pack_weights(positive)
    try:
        set_kernel("avx2_hybrid")
        binary_conv2d(x, weights, padding=1, backend="c")
        assert weights.nibble_tables is None  # another kernel selected: nothing built
        set_kernel("avx2_nibble")
        binary_conv2d(x, weights, padding=1, positions=torch.tensor([0, 5, 17]), backend="c")
        assert weights.nibble_tables is None  # sparse calls never use them
        binary_conv2d(x, weights, padding=1, backend="c")
        bits = positive.permute(0, 2, 3, 1).reshape(13, 42)
        expected = nibble_tables(torch.cat([bits, torch.zeros(3, 42, dtype=torch.bool)]), 6)
        assert torch.equal(weights.nibble_tables, expected)
        assert pack_weights(positive[:, :, :1, :1]).dense_tables() is None  # 1x1: the word kernels
        assert pack_weights(torch.ones(4, 2, 3, 3, dtype=torch.bool), groups=2).dense_tables() is None
    finally:
        set_kernel("auto")


@needs_c
def test_every_supported_kernel_is_reported_and_selectable():
    info = kernel_info()
    assert info["backend"] == "c" and "generic" in info["supported"]
    assert info["kernel"] in info["supported"]
    try:
        assert set_kernel("generic") == "generic"
    finally:
        set_kernel("auto")
    with pytest.raises(ValueError, match="unknown kernel"):
        set_kernel("sse9")


@needs_c
def test_pack_activations_layout_and_channels_last():
    x = torch.randn(2, 70, 3, 5)
    bias = torch.randn(70)
    words = pack_activations(x, bias, groups=1)
    assert words.shape == (2, 15, 1, 2)
    bits = (x + bias.view(1, -1, 1, 1) >= 0).permute(0, 2, 3, 1).reshape(2, 15, 70)
    as_unsigned = [int(v) & (2**64 - 1) for v in words.reshape(-1).tolist()]
    for index, value in enumerate(as_unsigned):
        n, p, word = index // 30, (index // 2) % 15, index % 2
        expected = sum(1 << b for b in range(64) if word * 64 + b < 70 and bits[n, p, word * 64 + b])
        assert value == expected
    cl = pack_activations(x.contiguous(memory_format=torch.channels_last), bias, groups=1)
    assert torch.equal(cl, words)


def _avoid_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.full_like(x, 1e-3), x)


@FAST
@given(case=conv_cases, method=st.sampled_from(["bnn", "reactnet", "bimatting", "bireal", "irnet", "dorefa",
                                               "recu"]))
def test_packed_conv_equals_simulated_binary_conv(case, method):
    if _too_small(case) or (method == "recu" and case["cg"] * case["kernel"][0] * case["kernel"][1] == 1):
        return  # (ReCU's weight variance over a single element is NaN in the simulation itself)
    x, _, _ = _make_case(case)
    torch.manual_seed(case["seed"])
    layer = BinaryConv2d(case["groups"] * case["cg"], case["og"] * case["groups"], case["kernel"],
                         stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                         groups=case["groups"], bias=case["seed"] % 2 == 0, method=method,
                         pad_value=case["pad_value"]).eval()
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() <= 2:
                p.normal_(0, 0.3)
        expected = layer(_avoid_zero(x))
    impl = PackedConv2d(layer)
    got = impl(_avoid_zero(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()) + 1e-6)
    fallback = PackedConv2d(layer, backend="torch")(_avoid_zero(x))
    torch.testing.assert_close(fallback, got, rtol=0, atol=1e-6 * float(got.abs().max()) + 1e-7)


@pytest.mark.parametrize("method", ["xnor", "reactnet"])
def test_packed_linear_equals_simulated_on_tokens(method):
    layer = BinaryLinear(67, 13, method=method).eval()
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
    x = torch.randn(3, 5, 67)
    with torch.no_grad():
        expected = layer(x)
    got = PackedLinear(layer)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    layer.set_implementation(PackedLinear(layer), "packed")
    assert layer.implementation == "packed"
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_xnor_conv_and_reflect_padding():
    x = torch.randn(2, 20, 9, 7)
    for kwargs in ({"method": "xnor"}, {"method": "bnn", "padding_mode": "reflect"}):
        layer = BinaryConv2d(20, 11, 3, padding=1, bias=True, **kwargs).eval()
        with torch.no_grad():
            expected = layer(x)
        torch.testing.assert_close(PackedConv2d(layer)(x), expected, rtol=1e-5, atol=1e-5)


def test_binary_linear_function_matches_matmul_of_signs():
    x = torch.randn(4, 200)
    positive = torch.randn(9, 200) >= 0
    packed = pack_weights(positive[:, :, None, None])
    scale = torch.rand(9)
    y = binary_linear(x, packed, epilogue=Epilogue(scale=scale))
    signs = torch.where(x >= 0, 1.0, -1.0)
    expected = (signs @ (positive.float() * 2 - 1).t()) * scale
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


def test_epilogue_ops_match_formula():
    x = torch.randn(2, 10, 6, 6)
    positive = torch.randn(7, 10, 3, 3) >= 0
    packed = pack_weights(positive)
    scale, shift, add, slope = torch.rand(7), torch.randn(7), torch.randn(7), torch.rand(7)
    epilogue = Epilogue(scale=scale, shift=shift, ops=[("prelu", slope), ("add", add), ("relu", None)])
    dot = reference_dot(x, positive, None, (1, 1), (1, 1), (1, 1), 1, 0.0).float()
    y = dot * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    y = torch.where(y >= 0, y, y * slope.view(1, -1, 1, 1)) + add.view(1, -1, 1, 1)
    expected = y.clamp_min(0)
    for backend in ("c", "torch") if available() else ("torch",):
        got = binary_conv2d(x, packed, padding=1, epilogue=epilogue, backend=backend)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_positions_compute_only_the_listed_outputs():
    x = torch.randn(2, 33, 8, 9)
    packed = pack_weights(torch.randn(12, 33, 3, 3) >= 0)
    dense = binary_conv2d(x, packed, padding=1)
    positions = torch.tensor([0, 5, 71, 72, 100, 143])
    for backend in ("c", "torch") if available() else ("torch",):
        sparse = binary_conv2d(x, packed, padding=1, positions=positions, backend=backend)
        flat_sparse, flat_dense = sparse.permute(0, 2, 3, 1).reshape(-1, 12), dense.permute(0, 2, 3, 1).reshape(-1, 12)
        assert torch.equal(flat_sparse[positions], flat_dense[positions])
        keep = torch.ones(144, dtype=torch.bool)
        keep[positions] = False
        assert torch.count_nonzero(flat_sparse[keep]) == 0


def test_zero_activation_is_plus_one_in_the_engine():
    """The documented difference: torch.sign(0) = 0 in the simulated bimatting layer, +1 packed."""
    layer = BinaryConv2d(4, 3, 1, bias=False, method="bimatting").eval()
    x = torch.zeros(1, 4, 2, 2)
    with torch.no_grad():
        simulated = layer(x)
        centred = layer.weight - layer.weight.mean(dim=(1, 2, 3), keepdim=True)
        alpha = centred.abs().mean(dim=(1, 2, 3))
        expected = (torch.where(centred >= 0, 1.0, -1.0).sum(dim=(1, 2, 3)) * alpha).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.count_nonzero(simulated) == 0
    torch.testing.assert_close(PackedConv2d(layer)(x), expected, rtol=1e-6, atol=1e-6)


def _randomize_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_stats(model, seed)


def _unit(cin: int, cout: int, k: int) -> list:
    return [*shifted_binary_conv(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), LearnableBias(cout),
            nn.PReLU(cout)]


def test_deploy_fuses_shift_batchnorm_prelu_and_keeps_keys():
    model = _randomize_stats(nn.Sequential(*_unit(70, 40, 3), *_unit(40, 24, 1)))
    x = torch.randn(2, 70, 10, 12)
    with torch.no_grad():
        expected = model(x)
    deployed = deploy(model)
    report = deploy_report(deployed)
    assert report.packed == ["2", "8"] and not report.simulated
    assert report.fused["2"] == ["0", "3", "4", "5"]
    assert list(deployed.state_dict()) == list(model.state_dict())
    assert deployed[2].implementation == "packed" and model[2].implementation == "simulated"
    torch.testing.assert_close(deployed(x), expected, rtol=1e-4, atol=1e-4)
    twice = copy.deepcopy(deployed)
    torch.testing.assert_close(twice(x), expected, rtol=1e-4, atol=1e-4)


class _BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm subclass that does more than BatchNorm (like timm's BatchNormAct2d)."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


def test_subclassed_neighbours_are_not_fused():
    model = _randomize_stats(nn.Sequential(BinaryConv2d(12, 10, 3, padding=1, method="bnn"), _BatchNormAct(10),
                                           nn.Conv2d(10, 6, 3, padding=1), _BatchNormAct(6)))
    x = torch.randn(2, 12, 7, 6)
    with torch.no_grad():
        expected = model(x)
    deployed = deploy(model)
    assert deploy_report(deployed).fused == {}
    torch.testing.assert_close(deployed(x), expected, rtol=1e-4, atol=1e-4)


class _Block(nn.Module):
    """A non-Sequential container: fusion goes through an fx trace of its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.move = LearnableBias(32)
        self.conv = BinaryConv2d(32, 32, 3, padding=1, bias=False, method="bimatting")
        self.bn = nn.BatchNorm2d(32)
        self.act = nn.PReLU(32)

    def forward(self, x):
        return self.act(x + self.bn(self.conv(self.move(x))))


class _ChainBlock(nn.Module):
    """A residual add followed by shift -> PReLU -> shift: the chain runs as one pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = BinaryConv2d(24, 24, 3, padding=1, bias=False, method="bimatting")
        self.move12 = LearnableBias(24)
        self.prelu1 = nn.PReLU(24)
        self.move13 = LearnableBias(24)

    def forward(self, x):
        out = self.move13(self.prelu1(self.move12(x + self.conv(x))))
        return out + x


def test_elementwise_chains_run_as_one_pass():
    model = _randomize_stats(nn.Sequential(_ChainBlock(), nn.BatchNorm2d(24), nn.ReLU(), nn.PReLU(24)))
    x = torch.randn(2, 24, 6, 7)
    with torch.no_grad():
        expected = model(x)
    deployed = deploy(model)
    report = deploy_report(deployed)
    assert report.fused["0.move12"] == ["0.prelu1", "0.move13"]
    assert report.fused["1"] == ["2", "3"]
    torch.testing.assert_close(deployed(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(deploy(model, backend="torch")(x), expected, rtol=1e-5, atol=1e-5)


def test_deploy_fuses_inside_traced_blocks():
    model = _randomize_stats(nn.Sequential(_Block(), _Block()))
    x = torch.randn(1, 32, 9, 9)
    with torch.no_grad():
        expected = model(x)
    deployed = deploy(model)
    report = deploy_report(deployed)
    assert report.fused["0.conv"] == ["0.move", "0.bn"]  # the PReLU also sees the shortcut: not fused
    torch.testing.assert_close(deployed(x), expected, rtol=1e-4, atol=1e-4)


def test_sparse_masked_branch_matches_dense_and_skips_outside_the_mask():
    pair = SparseAssistedPair(MaskedBranch(*_unit(21, 16, 3)), nn.Sequential(*_unit(21, 16, 1)))
    pair = _randomize_stats(pair)
    x = torch.randn(2, 21, 12, 16)
    mask = torch.zeros(2, 1, 12, 16)
    mask[0, :, 2:5, 3:9] = 0.5
    mask[1, :, 7:, :4] = 1.0
    with torch.no_grad():
        expected = pair(x, mask)
    deployed = deploy(pair)
    assert deploy_report(deployed).sparse == ["sparse"]
    torch.testing.assert_close(deployed(x, mask), expected, rtol=1e-4, atol=1e-4)
    assert deployed.sparse.mask_density == pytest.approx(float((mask != 0).float().mean()))
    # the packed conv really ran only inside the mask: its raw output is zero elsewhere
    impl = deployed.sparse[2].__dict__["_impl"]
    positions = torch.nonzero(mask.reshape(-1)).reshape(-1)
    raw = impl(x, positions=positions)
    assert torch.count_nonzero(raw * (mask == 0)) == 0


def _output_branch(cin: int, cout: int, k: int) -> list:
    """OutputBlock-style branch: binary conv, BN, ReLU, then a full-precision conv, BN, ReLU."""
    return [*shifted_binary_conv(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def test_full_precision_conv_folding_and_sparse_second_conv():
    pair = _randomize_stats(SparseAssistedPair(MaskedBranch(*_output_branch(19, 8, 3)),
                                               nn.Sequential(*_output_branch(19, 8, 1))))
    x = torch.randn(2, 19, 14, 11)
    mask = torch.zeros(2, 1, 14, 11)
    mask[0, :, 3:6, 2:9] = 0.7
    mask[1, :, :2, 8:] = 1.0
    with torch.no_grad():
        expected = pair(x, mask)
    deployed = deploy(pair)
    report = deploy_report(deployed)
    # dense branch: the fp 1x1 conv (with its BN and ReLU) becomes the binary conv's channel mix
    assert report.fused["dense.2"] == ["dense.0", "dense.3", "dense.4", "dense.5", "dense.6", "dense.7"]
    assert deployed.dense[2]._impl.epilogue.mix.relu
    assert report.fused["sparse.5"] == ["sparse.6", "sparse.7"]  # BN and ReLU folded into the fp 3x3 conv
    torch.testing.assert_close(deployed(x, mask), expected, rtol=1e-4, atol=1e-4)
    # the fp 3x3 conv's sparse path computes exactly the listed positions
    folded = deployed.sparse[5].forward
    feature = torch.randn(2, 8, 14, 11)
    dense = folded(feature)
    positions = torch.tensor([0, 13, 150, 153, 307])
    sparse = folded(feature, positions=positions)
    flat_sparse = sparse.permute(0, 2, 3, 1).reshape(-1, 8)
    torch.testing.assert_close(flat_sparse[positions], dense.permute(0, 2, 3, 1).reshape(-1, 8)[positions],
                               rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(flat_sparse) == torch.count_nonzero(flat_sparse[positions])


def test_deploy_converted_timm_resnet18():
    timm = pytest.importorskip("timm")
    import binarize

    float_model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    model = _randomize_stats(binarize.convert(float_model, method="reactnet"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    deployed = deploy(model)
    report = deploy_report(deployed)
    assert len(report.packed) == sum(isinstance(m, (BinaryConv2d, BinaryLinear)) for m in model.modules())
    assert not report.simulated
    got = deployed(x)
    # rounding differences can flip a sign deep in the network; outputs stay close
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_deploy_bimatting_close_to_simulated():
    from binarize.models import create_model

    torch.manual_seed(0)
    model = _randomize_stats(create_model("bimatting"))
    src = torch.rand(1, 2, 3, 64, 96)
    with torch.no_grad():
        expected = model(src, *[None] * 4)
    deployed = deploy(model)
    report = deploy_report(deployed)
    assert not report.simulated and len(report.sparse) >= 6
    with torch.no_grad():
        got = deployed(src, *[None] * 4)
        again = deployed(src, *got[2:])
        expected_again = model(src, *expected[2:])
    for a, b in zip(list(got) + list(again), list(expected) + list(expected_again)):
        assert a.shape == b.shape
        assert (a - b).abs().mean() < 1e-4
        assert (a - b).abs().max() < 0.05


def test_fallback_warns_once_and_matches(monkeypatch):
    layer = BinaryConv2d(19, 6, 3, padding=1, method="reactnet").eval()
    x = torch.randn(1, 19, 7, 7)
    with torch.no_grad():
        expected = layer(x)
    monkeypatch.setattr(_lib, "_state", {"loaded": False, "lib": None, "warned": False})
    monkeypatch.setattr(_lib, "_find_library_file", lambda: None)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch fallback"):
        deployed = deploy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = deployed(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_c
def test_call_plans_read_the_tensors_of_each_call():
    """A dense call shaped like an earlier one reuses its checked arguments (a plan), yet reads the
    new call's data, residual, given output and packed words, and gives the torch backend's floats."""
    g = torch.Generator().manual_seed(11)
    weights = pack_weights(torch.randn(6, 5, 3, 3, generator=g) >= 0)
    bias = torch.randn(5, generator=g)
    epilogue = Epilogue(scale=torch.rand(6, generator=g) + 0.5, shift=torch.randn(6, generator=g),
                        ops=[("residual", None)])

    def conv(x, **kw):
        return binary_conv2d(x, weights, input_bias=bias, padding=1, epilogue=epilogue, **kw)

    for _ in range(3):
        x, residual = torch.randn(2, 5, 7, 9, generator=g), torch.randn(2, 6, 7, 9, generator=g)
        expected = conv(x, residual=residual, backend="torch")
        assert torch.equal(conv(x, residual=residual), expected)
        out = torch.full((2, 6, 7, 9), float("nan"))
        assert conv(x, residual=residual, out=out) is out and torch.equal(out, expected)
        words = pack_activations(x, bias, groups=1).reshape(-1)
        assert torch.equal(conv(torch.empty(x.shape, device="meta"), residual=residual, packed_input=words), expected)
    assert len(weights.plans) == 3  # float input, a given output, packed input: one plan each

    x = torch.randn(2, 5, 7, 9, generator=g)
    with pytest.raises(ValueError, match="packed_input must be"):  # another word count misses the plans
        conv(torch.empty(x.shape, device="meta"), residual=torch.zeros(2, 6, 7, 9), packed_input=words[:-1])
    with pytest.raises(ValueError, match="residual of shape"):
        conv(x, residual=torch.zeros(2, 6, 7, 8))
    half = x.double()  # converted inputs are checked and converted on every call, never planned
    assert torch.equal(conv(half, residual=residual), conv(x, residual=residual, backend="torch"))
    assert len(weights.plans) == 3
    for width in range(1, 2 * functional.MAX_PLANS):
        x = torch.randn(1, 5, 4, width, generator=g)
        assert torch.equal(binary_conv2d(x, weights, padding=1), binary_conv2d(x, weights, padding=1, backend="torch"))
    assert len(weights.plans) <= functional.MAX_PLANS


@needs_c
def test_a_grouped_conv_with_a_channel_mix_reuses_one_plan():
    """A channel mix after a grouped conv runs as the conv without its mix, then the mix: the conv
    part is the same epilogue object on every call, so it keeps a single plan."""
    from binarize.engine.functional import ChannelMix

    g = torch.Generator().manual_seed(5)
    weights = pack_weights(torch.randn(6, 2, 3, 3, generator=g) >= 0, groups=2)
    epilogue = Epilogue(scale=torch.rand(6, generator=g) + 0.5, ops=[("relu", None)],
                        mix=ChannelMix(torch.randn(3, 6, generator=g), torch.randn(3, generator=g)))
    assert epilogue.without_mix() is epilogue.without_mix()
    for _ in range(4):
        x = torch.randn(1, 4, 5, 6, generator=g)
        expected = binary_conv2d(x, weights, padding=1, epilogue=epilogue, backend="torch")
        assert torch.equal(binary_conv2d(x, weights, padding=1, epilogue=epilogue), expected)
    assert len(weights.plans) == 1
    assert copy.deepcopy(epilogue)._without_mix is None


@needs_c
def test_copies_of_packed_weights_build_their_own_plans():
    """Plans hold raw addresses of the weights' tensors, so neither a deep copy nor a pickle takes them."""
    import pickle

    weights = pack_weights(torch.randn(8, 4, 3, 3) >= 0)
    x = torch.randn(1, 4, 6, 6)
    expected = binary_conv2d(x, weights, padding=1)
    assert len(weights.plans) == 1
    for clone in (copy.deepcopy(weights), pickle.loads(pickle.dumps(weights))):
        assert clone.plans == {}
        assert torch.equal(binary_conv2d(x, clone, padding=1), expected)
        (plan,) = clone.plans.values()
        assert plan.keep[0] is clone and plan.template[11] == clone.words.data_ptr()


def test_bad_inputs_give_clear_errors():
    packed = pack_weights(torch.randn(4, 8, 3, 3) >= 0)
    with pytest.raises(ValueError, match="input has 9 channels"):
        binary_conv2d(torch.randn(1, 9, 5, 5), packed)
    with pytest.raises(ValueError, match="pad_value"):
        binary_conv2d(torch.randn(1, 8, 5, 5), packed, pad_value=0.5)
    with pytest.raises(ValueError, match="too small"):
        binary_conv2d(torch.randn(1, 8, 1, 1), packed)
    with pytest.raises(ValueError, match="4-D"):
        binary_conv2d(torch.randn(8, 5), packed)
    with pytest.raises(ValueError, match="nn.Module"):
        deploy("resnet18")
    with pytest.raises(ValueError, match="backend"):
        deploy(nn.Identity(), backend="gpu")
    with pytest.raises(ValueError, match="epilogue op"):
        Epilogue(ops=[("softplus", None)])
    with pytest.raises(ValueError, match="already deployed"):
        deploy(deploy(nn.Sequential(BinaryConv2d(4, 4, 1), nn.BatchNorm2d(4))))


def test_loading_weights_into_a_deployed_model_is_refused():
    """The kernels hold packed copies of the weights: a later load_state_dict (whole model or one
    module) raises instead of leaving them stale, and the outputs stay those of the deployed weights."""
    torch.manual_seed(0)
    model = nn.Sequential(BinaryConv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)).eval()
    other = nn.Sequential(BinaryConv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)).eval()
    deployed = deploy(model)
    x = torch.randn(1, 4, 7, 7)
    before = deployed(x)
    with pytest.raises(RuntimeError, match="load the checkpoint into the original model"):
        deployed.load_state_dict(other.state_dict())
    with pytest.raises(RuntimeError, match="packed weights stale"):
        deployed[0].load_state_dict(other[0].state_dict())
    assert torch.equal(deployed(x), before)
    model.load_state_dict(other.state_dict())  # the original model still loads
    assert torch.allclose(deploy(model)(x), other(x), atol=1e-4)


def test_deployed_bimatting_through_convert_video(tmp_path):
    """A deployed model is a drop-in for convert_video: same alpha as the simulated model."""
    import numpy as np
    from PIL import Image

    from binarize.matting.inference import convert_video
    from binarize.models import create_model

    frames = tmp_path / "frames"
    frames.mkdir()
    g = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(g.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(frames / f"{index:04d}.png")
    model = _randomize_stats(create_model("bimatting"))
    outputs = {}
    for name, candidate in (("simulated", model), ("packed", deploy(model))):
        convert_video(candidate, frames, output_alpha=tmp_path / name, output_type="png_sequence", progress=False)
        outputs[name] = np.stack([np.asarray(Image.open(tmp_path / name / f"{i:04d}.png"), dtype=np.int64)
                                  for i in range(2)])
    assert outputs["packed"].shape == outputs["simulated"].shape
    assert np.abs(outputs["packed"] - outputs["simulated"]).mean() < 0.5  # 8-bit alpha levels


@needs_c
@FAST
@given(planes=st.integers(1, 5), height=st.integers(1, 19), width=st.integers(1, 19))
def test_avg_pool2x2_kernel_equals_torch_bit_for_bit(planes, height, width):
    from binarize.engine.functional import avg_pool2x2

    x = torch.randn(1, planes, height, width)
    expected = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    assert torch.equal(avg_pool2x2(x), expected)
    assert torch.equal(avg_pool2x2(x, backend="torch"), expected)


@needs_c
@FAST
@given(planes=st.integers(1, 5), height=st.integers(1, 19), width=st.integers(1, 19))
def test_upsample2x_kernel_matches_torch_bilinear(planes, height, width):
    from binarize.engine.functional import upsample2x

    x = torch.randn(2, planes, height, width)
    expected = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    got = upsample2x(x)
    assert got.shape == expected.shape
    # same 0.25 / 0.75 weights; the float sums may round differently in the last bit
    torch.testing.assert_close(got, expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps * x.abs().max().item())


def test_deploy_moves_pooling_and_upsampling_to_the_kernels():
    model = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True), nn.Upsample(scale_factor=2, mode="bilinear"),
                          nn.AvgPool2d(2, 2), nn.Upsample(scale_factor=3, mode="bilinear")).eval()
    deployed = deploy(model)
    assert deploy_report(deployed).resampling == ["0", "1"]  # the others are not 2x2 ceil-mode / 2x
    x = torch.randn(1, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-6, atol=1e-6)


@needs_c
@FAST
@given(cin=st.integers(1, 9), cout=st.sampled_from([3, 8, 16, 24, 40]), k=st.sampled_from([1, 3, 5]),
       dilation=st.integers(1, 2), relu=st.booleans(), height=st.integers(1, 20), width=st.integers(1, 20),
       density=st.sampled_from([0.4, 1.0]), seed=st.integers(0, 2**16))
def test_sparse_float_conv_kernel_matches_dense_conv_at_positions(cin, cout, k, dilation, relu, height, width,
                                                                  density, seed):
    # maps large enough for runs of four interior positions (the vectorised path) and small ones
    # where every window crosses the border
    from binarize.engine.fusion import FoldedConv2dForward

    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=True)
    folded = FoldedConv2dForward(conv, None, relu)
    x = torch.randn(2, cin, height, width)
    dense = folded(x)
    positions = torch.nonzero(torch.rand(dense[:, :1].numel()) < density).reshape(-1)
    assert folded.sparse_in_c(x)
    got = folded(x, positions=positions)
    expected = torch.zeros_like(dense).permute(1, 0, 2, 3).reshape(cout, -1)
    expected[:, positions] = dense.permute(1, 0, 2, 3).reshape(cout, -1)[:, positions]
    expected = expected.reshape(cout, 2, height, width).permute(1, 0, 2, 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_sparse_pair_with_gate_activation_adds_only_inside_the_mask(backend):
    from binarize.engine.fusion import SparsePairForward
    from binarize.models.bimatting_decoder import binary_gate

    torch.manual_seed(3)
    pair = SparseAssistedPair(MaskedBranch(*binary_gate(10, 6, 3, nn.Sigmoid(), shift_after=True)),
                              nn.Sequential(*binary_gate(10, 6, 1, nn.Sigmoid(), shift_after=True)))
    pair = _randomize_stats(pair)
    x = torch.randn(2, 10, 9, 11)
    mask = torch.zeros(2, 1, 9, 11)
    mask[0, :, 1:4, 2:7] = 0.25
    mask[1, :, 5:, 6:] = 1.0
    with torch.no_grad():
        expected = pair(x, mask)
        deployed = deploy(pair, backend=backend)
        assert isinstance(deployed.__dict__["forward"], SparsePairForward)
        got = deployed(x, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # outside the mask the pair is exactly its dense branch
    with torch.no_grad():
        dense = deployed.dense(x)
    assert torch.equal(got * (mask == 0), dense * (mask == 0))


def test_keep_freed_memory_is_idempotent_on_glibc():
    import platform

    from binarize.engine import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first is True
