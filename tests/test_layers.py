"""BinaryConv2d / BinaryLinear and the learnable shifts: values against direct formulas, round trips."""
from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from binarize import ops
from binarize.nn import BinaryConv2d, BinaryLinear, LearnableBias, RPReLU, RSign

SETTINGS = settings(max_examples=25, deadline=None)
METHODS = ["bnn", "xnor", "dorefa", "bireal", "reactnet", "irnet", "recu", "bimatting"]


def _sign(x):
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _bireal_weight(w):
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True) * _sign(w)


# ------------------------------------------------------------------------------------------------
# BinaryConv2d against F.conv2d on explicitly binarized, explicitly padded inputs
# ------------------------------------------------------------------------------------------------
@st.composite
def conv_configs(draw):
    groups = draw(st.integers(1, 3))
    return dict(
        in_channels=groups * draw(st.integers(1, 3)),
        out_channels=groups * draw(st.integers(1, 3)),
        kernel_size=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])),
    )


@SETTINGS
@given(conv_configs(), st.sampled_from([0.0, 1.0, -1.0]), st.integers(0, 2**16))
def test_binary_conv_equals_conv_of_binarized_padded_input(config, pad_value, seed):
    torch.manual_seed(seed)
    layer = BinaryConv2d(**config, method="bireal", pad_value=pad_value)
    if layer.bias is not None:
        nn.init.normal_(layer.bias)
    x = torch.randn(2, config["in_channels"], 7, 6)
    ph, pw = config["padding"]
    if config["padding_mode"] == "zeros":
        xb = F.pad(_sign(x), (pw, pw, ph, ph), value=pad_value)
    else:  # other modes pad the float input, then binarize
        xb = _sign(F.pad(x, (pw, pw, ph, ph), mode=config["padding_mode"]))
    expected = F.conv2d(xb, _bireal_weight(layer.weight.detach()), layer.bias, config["stride"], 0,
                        config["dilation"], config["groups"])
    out = layer(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_zero_padding_is_applied_after_binarization():
    layer = BinaryConv2d(1, 1, 3, padding=1, bias=False, method="bnn")
    nn.init.constant_(layer.weight, 1.0)
    x = torch.full((1, 1, 3, 3), 0.7)
    # pad 0: a corner sees 4 ones; pad +1: 9 ones; pad -1: 4 - 5 = -1
    assert layer(x)[0, 0, 0, 0].item() == 4.0
    layer.pad_value = 1.0
    assert layer(x)[0, 0, 0, 0].item() == 9.0
    layer.pad_value = -1.0
    assert layer(x)[0, 0, 0, 0].item() == -1.0


def test_same_padding_and_channels_last():
    layer = BinaryConv2d(3, 4, 4, padding="same", method="bnn")
    x = torch.randn(2, 3, 9, 8)
    out = layer(x)
    assert out.shape == (2, 4, 9, 8)
    # "same" with an even kernel pads 1 before and 2 after (torch's convention)
    expected = F.conv2d(F.pad(_sign(x), (1, 2, 1, 2)), _sign(layer.weight.detach()), layer.bias)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), out)


def test_bimatting_conv_equals_official_formulation():
    layer = BinaryConv2d(6, 8, 3, padding=1, bias=False, method="bimatting")
    nn.init.normal_(layer.weight, std=0.3)
    x = torch.randn(2, 6, 5, 5)
    x[0, 0, 0, 0] = 0.0
    w = layer.weight.detach()
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    wb = centred.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.sign(centred)
    expected = F.conv2d(torch.sign(x), wb, None, 1, 1)  # the official conv pads sign(x) with zeros
    torch.testing.assert_close(layer(x), expected)
    assert layer.channel_threshold.shape == (1, 6, 1, 1)
    assert set(layer.state_dict()) == {"weight", "channel_threshold"}


def test_bimatting_conv_loads_official_keys_strictly(fixtures_dir):
    manifest = json.loads((fixtures_dir / "bimatting_official_state_dict.json").read_text())
    shapes = {name: shape for name, shape, _ in manifest}
    prefix = "backbone.feature.1.binary_3x3."
    official = {key[len(prefix):]: torch.randn(shapes[key]) for key in shapes if key.startswith(prefix)}
    out_c, in_c, kh, kw = shapes[prefix + "weight"]
    layer = BinaryConv2d(in_c, out_c, (kh, kw), padding=1, bias=False, method="bimatting")
    layer.load_state_dict(official, strict=True)
    torch.testing.assert_close(layer.channel_threshold, official["channel_threshold"])


# ------------------------------------------------------------------------------------------------
# every method: round trips, copies, scripting, gradients
# ------------------------------------------------------------------------------------------------
def _conv(method, **kw):
    torch.manual_seed(0)
    return BinaryConv2d(4, 6, 3, stride=1, padding=1, method=method, **kw)


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


@pytest.mark.parametrize("method", METHODS)
def test_every_method_forward_backward_and_grads(method):
    layer = _randomise(_conv(method))
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    out = layer(x)
    assert out.shape == (2, 6, 6, 6)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        if name == "channel_threshold":
            assert p.grad is None  # the official BiMatting forward never reads it
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert layer.input_bits == 1 and layer.weight_bits == 1


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_and_deepcopy_round_trip(method):
    layer = _randomise(_conv(method))
    ops.step_binarizers(layer, 0.6)
    x = torch.randn(2, 4, 5, 5)
    expected = layer(x)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = _conv(method)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    ops.step_binarizers(fresh, 0.6)
    torch.testing.assert_close(fresh(x), expected)
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x), expected)
    assert clone.weight.data_ptr() != layer.weight.data_ptr()


@pytest.mark.parametrize("method", METHODS)
def test_script_and_trace(method):
    layer = _randomise(_conv(method)).eval()
    x = torch.randn(1, 4, 5, 5)
    expected = layer(x)
    scripted = torch.jit.script(layer)
    torch.testing.assert_close(scripted(x), expected)
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), expected)
    # the trace keeps the straight-through gradients even though x did not require grad
    x_eager, x_traced = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    layer(x_eager).square().sum().backward()
    traced(x_traced).square().sum().backward()
    torch.testing.assert_close(x_traced.grad, x_eager.grad)
    linear = _randomise(BinaryLinear(4, 3, method=method)).eval()
    tokens = torch.randn(2, 5, 4)
    torch.testing.assert_close(torch.jit.script(linear)(tokens), linear(tokens))


@pytest.mark.parametrize("method", METHODS)
def test_from_float_to_float_round_trip(method):
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, bias=True, padding_mode="reflect")
    layer = BinaryConv2d.from_float(conv, method)
    assert isinstance(layer, nn.Conv2d) and layer.method == method
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)
    assert layer.weight.data_ptr() != conv.weight.data_ptr()  # a copy, not a share
    back = layer.to_float()
    assert type(back) is nn.Conv2d
    x = torch.randn(1, 4, 9, 9)
    torch.testing.assert_close(back(x), conv(x))

    linear = nn.Linear(5, 3)
    blin = BinaryLinear.from_float(linear, method)
    assert isinstance(blin, nn.Linear) and torch.equal(blin.weight, linear.weight)
    back_linear = blin.to_float()
    assert type(back_linear) is nn.Linear
    torch.testing.assert_close(back_linear(torch.ones(2, 5)), linear(torch.ones(2, 5)))


def test_from_float_keeps_dtype_and_rejects_wrong_types():
    conv = nn.Conv2d(2, 3, 1).double()
    layer = BinaryConv2d.from_float(conv, "reactnet")
    assert layer.weight.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer(torch.randn(1, 2, 3, 3, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="expects an nn.Conv2d"):
        BinaryConv2d.from_float(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="expects an nn.Linear"):
        BinaryLinear.from_float(nn.Conv2d(2, 2, 1))


# ------------------------------------------------------------------------------------------------
# construction, precision attributes, implementation switch, repr
# ------------------------------------------------------------------------------------------------
def test_method_resolution_and_errors():
    with pytest.raises(ValueError, match="unknown method 'nope'.*reactnet"):
        BinaryConv2d(2, 2, 1, method="nope")
    with pytest.raises(ValueError, match="needs both"):
        BinaryConv2d(2, 2, 1, method=None)
    with pytest.raises(ValueError, match="nn.Module"):
        BinaryLinear(2, 2, input_binarizer="sign")
    layer = BinaryLinear(2, 2, method=None, input_binarizer=ops.get_binarizer("identity"),
                         weight_binarizer=ops.get_binarizer("sign", kind="weight"))
    assert layer.method == "custom" and layer.input_bits == 32 and layer.weight_bits == 1
    assert isinstance(layer.post, nn.Identity) and layer.pad_value == 0.0
    custom = ops.Method("test_layers_method", "approx_sign", "dorefa_weight", pad_value=-1.0)
    conv = BinaryConv2d(2, 2, 3, padding=1, method=custom)
    assert conv.method == "test_layers_method" and conv.pad_value == -1.0


def test_explicit_binarizers_override_the_method():
    layer = BinaryConv2d(3, 3, 1, method="reactnet", input_binarizer=ops.get_binarizer("identity"))
    assert layer.input_bits == 32 and layer.weight_bits == 1
    assert isinstance(layer.weight_binarizer, ops.BiRealWeight) and isinstance(layer.post, RPReLU)
    x = torch.randn(1, 3, 2, 2)
    expected = layer.post(F.conv2d(x, _bireal_weight(layer.weight.detach()), layer.bias))
    torch.testing.assert_close(layer(x), expected)


def test_reactnet_layer_structure():
    layer = BinaryConv2d(4, 6, 3, padding=1, method="reactnet")
    assert isinstance(layer.input_binarizer, RSign) and layer.input_binarizer.threshold.shape == (4,)
    keys = set(layer.state_dict())
    assert {"weight", "bias", "input_binarizer.threshold", "post.shift_in.bias", "post.prelu.weight",
            "post.shift_out.bias"} <= keys
    assert "channel_threshold" not in keys
    text = repr(layer)
    assert "method=reactnet" in text and "pad_value=0" in text and "implementation=simulated" in text


def test_set_implementation_swaps_forward_not_structure():
    layer = _conv("bnn")
    keys = list(layer.state_dict())
    calls = []

    def fake_impl(x):
        calls.append(x.shape)
        return torch.zeros(1)

    layer.set_implementation(fake_impl, name="packed")
    assert layer.implementation == "packed"
    assert layer(torch.randn(1, 4, 3, 3)).tolist() == [0.0] and calls == [(1, 4, 3, 3)]
    assert list(layer.state_dict()) == keys and "_impl" not in dict(layer.named_modules())
    clone = copy.deepcopy(layer)
    assert clone.implementation == "packed"
    layer.set_implementation(None)
    assert layer.implementation == "simulated" and layer(torch.randn(1, 4, 3, 3)).shape == (1, 6, 3, 3)
    with pytest.raises(ValueError, match="callable"):
        layer.set_implementation(42)
    linear = BinaryLinear(3, 2, method="bnn")
    linear.set_implementation(lambda x: x * 2)
    assert linear.implementation == "custom" and linear(torch.ones(1, 3)).tolist() == [[2.0, 2.0, 2.0]]


# ------------------------------------------------------------------------------------------------
# BinaryLinear on 2-D and 3-D inputs
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.booleans(),
       st.integers(0, 2**16))
def test_binary_linear_xnor_per_sample_scale(batch, tokens, fin, fout, three_d, seed):
    torch.manual_seed(seed)
    layer = BinaryLinear(fin, fout, method="xnor")
    x = torch.randn(batch, tokens, fin) if three_d else torch.randn(batch, fin)
    dims = tuple(range(1, x.dim()))
    xb = x.abs().mean(dim=dims, keepdim=True) * _sign(x)
    wb = layer.weight.detach().abs().mean(dim=1, keepdim=True) * _sign(layer.weight.detach())
    torch.testing.assert_close(layer(x), F.linear(xb, wb, layer.bias))


def test_binary_linear_reactnet_tokens():
    layer = _randomise(BinaryLinear(4, 3, method="reactnet"))
    x = torch.randn(2, 5, 4, requires_grad=True)
    threshold = layer.input_binarizer.threshold.detach()
    xb = _sign(x.detach() - threshold)
    y = F.linear(xb, _bireal_weight(layer.weight.detach()), layer.bias)
    post = layer.post
    slope = post.prelu.weight.detach()
    z = y + post.shift_in.bias.detach().flatten()
    expected = torch.where(z >= 0, z, slope * z) + post.shift_out.bias.detach().flatten()
    out = layer(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert layer.input_binarizer.threshold.grad is not None and x.grad is not None


# ------------------------------------------------------------------------------------------------
# LearnableBias, RPReLU, RSign
# ------------------------------------------------------------------------------------------------
def test_learnable_bias_shape_and_value():
    module = LearnableBias(3)
    assert module.bias.shape == (1, 3, 1, 1) and list(module.state_dict()) == ["bias"]
    with torch.no_grad():
        module.bias.copy_(torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1))
    assert module(torch.zeros(1, 3, 2, 2))[0, :, 1, 1].tolist() == [1.0, 2.0, 3.0]
    assert module(torch.zeros(2, 3)).tolist() == [[1.0, 2.0, 3.0]] * 2
    tokens = LearnableBias(3, channel_dim=-1)
    tokens.load_state_dict(module.state_dict())
    assert tokens(torch.zeros(1, 2, 3))[0, 1].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="positive channel count"):
        LearnableBias(0)


def test_rprelu_formula():
    module = RPReLU(2)
    with torch.no_grad():
        module.shift_in.bias.copy_(torch.tensor([0.5, -0.5]).view(1, 2, 1, 1))
        module.prelu.weight.copy_(torch.tensor([0.1, 0.2]))
        module.shift_out.bias.copy_(torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))
    x = torch.tensor([-1.0, 1.0]).view(1, 2, 1, 1)
    # channel 0: -1 + 0.5 = -0.5 -> 0.1 * -0.5 + 1 = 0.95; channel 1: 1 - 0.5 = 0.5 -> 0.5 + 2 = 2.5
    torch.testing.assert_close(module(x).flatten(), torch.tensor([0.95, 2.5]))
    assert set(module.state_dict()) == {"shift_in.bias", "prelu.weight", "shift_out.bias"}
    tokens = RPReLU(2, channel_dim=-1)
    tokens.load_state_dict(module.state_dict())
    torch.testing.assert_close(tokens(torch.tensor([[[-1.0, 1.0]]])).flatten(), torch.tensor([0.95, 2.5]))


def test_rsign_is_a_binarizer_exported_by_nn():
    module = RSign(3)
    assert isinstance(module, ops.Binarizer) and module.bits == 1
    assert module(torch.tensor([[-0.1, 0.0, 0.1]]).view(1, 3, 1, 1)).flatten().tolist() == [-1.0, 1.0, 1.0]
