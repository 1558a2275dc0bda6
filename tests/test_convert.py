"""binarize.convert / unconvert: policy, report, shared modules, round trips, timm/torchvision models."""
from __future__ import annotations

import copy
import io
import json
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from binarize.convert import (
    REASON_DEPTHWISE,
    REASON_FIRST,
    REASON_LAST,
    REASON_SKIP,
    ConversionReport,
    convert,
    unconvert,
)
from binarize.nn import BinaryConv2d, BinaryLinear
from binarize.ops import list_methods

TIMM_MODELS = [
    ("resnet18", {}),
    ("mobilenetv3_large_100", {}),
    ("efficientnet_b0", {}),
    ("convnext_atto", {}),
    ("vit_tiny_patch16_224", {"img_size": 64}),
    ("regnetx_002", {}),
]


def _is_binary(m: nn.Module) -> bool:
    return isinstance(m, (BinaryConv2d, BinaryLinear))


def _plain_layers(model: nn.Module) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _forward_backward(model: nn.Module, x: torch.Tensor, train: bool = True) -> torch.Tensor:
    model.train(train)
    out = model(x)
    out.float().square().mean().backward()
    return out


def _check_policy(model: nn.Module, converted: nn.Module, report: ConversionReport) -> None:
    """Every conv/linear is either replaced by a binary layer or listed as kept with a reason."""
    before = _plain_layers(model)
    after = dict(converted.named_modules())
    kept = {k.name: k.reason for k in report.kept}
    replaced = {r.name for r in report.replaced}
    assert replaced and replaced.isdisjoint(kept)
    for name, layer in before.items():
        if name in replaced:
            assert _is_binary(after[name]), name
            assert torch.equal(after[name].weight, layer.weight)  # weights copied
        else:
            assert name in kept, f"{name} neither replaced nor reported kept"
            assert type(after[name]) is type(layer)
    for name, reason in kept.items():
        if reason == REASON_DEPTHWISE:
            assert before[name].groups == before[name].in_channels > 1


@pytest.mark.parametrize("name,kwargs", TIMM_MODELS, ids=[n for n, _ in TIMM_MODELS])
def test_timm_models_convert_forward_backward(name: str, kwargs: dict) -> None:
    model = timm.create_model(name, pretrained=False, **kwargs)
    for module in model.modules():  # undo timm's zero-init of residual norms so every branch gets a gradient
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
    converted, report = convert(model, "reactnet", return_report=True)
    _check_policy(model, converted, report)
    reasons = {k.name: k.reason for k in report.kept}
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    layers = list(_plain_layers(model))
    assert reasons[convs[0]] == REASON_FIRST
    assert reasons[layers[-1]] == REASON_LAST
    assert converted.binarize_report is report
    out = _forward_backward(converted, torch.randn(2, 3, 64, 64), train=True)
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    # BatchNorm batch statistics over 2x2 maps can cancel the gradient exactly; check it with running stats
    converted.zero_grad()
    _forward_backward(converted, torch.randn(2, 3, 64, 64), train=False)
    grads = [m.weight.grad for m in converted.modules() if _is_binary(m)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_mobilenet_keeps_depthwise_unless_asked() -> None:
    model = timm.create_model("mobilenetv3_large_100", pretrained=False)
    depthwise = {n for n, m in _plain_layers(model).items() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1}
    _, report = convert(model, return_report=True)
    assert {k.name for k in report.kept if k.reason == REASON_DEPTHWISE} == depthwise
    converted, report = convert(model, keep_depthwise=False, return_report=True)
    assert all(_is_binary(converted.get_submodule(n)) for n in depthwise)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models(name: str) -> None:
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    converted, report = convert(model, "bireal", return_report=True)
    _check_policy(model, converted, report)
    out = _forward_backward(converted, torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)


class Nested(nn.Module):
    """User module with nested containers and a block shared by two parents."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        shared = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.ModuleList([shared, nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU())])
        self.branches = nn.ModuleDict({"a": shared, "b": nn.Conv2d(16, 16, 3, padding=1, groups=16)})
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.branches["a"](self.stages[0](x))  # the shared block runs twice
        x = self.branches["b"](self.stages[1](x))
        return self.head(x.mean((2, 3), keepdim=True))


def test_user_module_nested_containers_and_sharing() -> None:
    model = Nested()
    converted, report = convert(model, return_report=True)
    assert converted.stages[0] is converted.branches["a"]  # still shared
    assert _is_binary(converted.stages[0][0])
    shared_rows = [r for r in report.replaced if "branches.a.0" in (r.name, *r.aliases)]
    assert len(shared_rows) == 1 and set(shared_rows[0].aliases) == {"branches.a.0"}
    assert sorted(r.name for r in report.replaced) == ["head.1", "stages.0.0", "stages.1.0"]
    assert {k.name: k.reason for k in report.kept} == {
        "stem": REASON_FIRST, "branches.b": REASON_DEPTHWISE, "head.3": REASON_LAST,
    }
    out = _forward_backward(converted, torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 5)
    assert converted.stages[0][0].weight.grad is not None


def test_original_untouched_and_inplace() -> None:
    model = Nested()
    before = copy.deepcopy(model.state_dict())
    converted = convert(model)
    assert converted is not model
    assert not any(_is_binary(m) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same = convert(model, inplace=True)
    assert same is model and _is_binary(model.stages[0][0])


def test_skip_globs_and_predicate() -> None:
    model = Nested()
    _, report = convert(model, skip="stages.*", return_report=True)
    assert {k.name for k in report.kept if k.reason == REASON_SKIP} == {"stages.0.0", "stages.1.0"}
    with pytest.warns(UserWarning, match="'nothing\\*' matches no"):
        _, report = convert(model, skip=["head.1", "nothing*"], return_report=True)
    assert [k.name for k in report.kept if k.reason == REASON_SKIP] == ["head.1"]
    # a shared module matches through any of its names
    _, report = convert(model, skip="branches.a.*", return_report=True)
    assert [k.name for k in report.kept if k.reason == REASON_SKIP] == ["stages.0.0"]
    _, report = convert(model, skip=lambda name, m: isinstance(m, nn.Linear), return_report=True)
    assert {k.name for k in report.kept if k.reason == REASON_SKIP} == {"head.1", "head.3"}  # skip is checked first
    with pytest.raises(ValueError, match="skip"):
        convert(model, skip=[3])


def test_keep_first_and_last_flags() -> None:
    model = Nested()
    converted = convert(model, keep_first=False, keep_last=False)
    assert _is_binary(converted.stem) and _is_binary(converted.head[3])
    assert not _is_binary(converted.branches["b"])  # depthwise still kept


def test_mlp_first_layer_is_first_linear() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    _, report = convert(mlp, return_report=True)
    assert [(k.name, k.reason) for k in report.kept] == [("0", REASON_FIRST), ("4", REASON_LAST)]
    assert [r.name for r in report.replaced] == ["2"]


def test_unknown_method_lists_available() -> None:
    with pytest.raises(ValueError) as info:
        convert(Nested(), "nope")
    message = str(info.value)
    assert "nope" in message and all(m in message for m in list_methods())


def test_nothing_to_convert_warns_with_empty_report() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="nothing to convert"):
        converted, report = convert(model, return_report=True)
    assert report.replaced == [] and report.num_kept == 2
    with pytest.warns(UserWarning, match="nothing to convert"):
        _, report = convert(nn.Sequential(nn.ReLU()), return_report=True)
    assert report.replaced == [] and report.kept == []


def test_already_binary_layers_are_left_alone() -> None:
    converted = convert(Nested())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, report = convert(converted, keep_first=False, keep_last=False, return_report=True)
    assert {r.name for r in report.replaced} == {"stem", "head.3"}
    assert again.stages[0][0].method == "reactnet"


def test_multihead_attention_out_proj_kept() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.Linear(8, 16), layer, nn.Linear(16, 3))
    converted, report = convert(model, return_report=True)
    reasons = {k.name: k.reason for k in report.kept}
    assert "functionally" in reasons["1.self_attn.out_proj"]
    assert {r.name for r in report.replaced} == {"1.linear1", "1.linear2"}
    assert _forward_backward(converted, torch.randn(2, 5, 8)).shape == (2, 5, 3)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_gives_one_bit_layers(method: str) -> None:
    converted, report = convert(Nested(), method, return_report=True)
    assert report.method == method
    layers = [m for m in converted.modules() if _is_binary(m)]
    assert len(layers) == 3 and all(m.input_bits == 1 and m.weight_bits == 1 for m in layers)
    assert _forward_backward(converted, torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_deepcopy_and_state_dict_round_trip() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    converted = convert(model).eval()
    x = torch.randn(1, 3, 32, 32)
    expected = converted(x)
    clone = copy.deepcopy(converted)
    assert torch.equal(clone(x), expected) and clone.binarize_report.num_replaced > 0
    fresh = convert(timm.create_model("resnet18", pretrained=False, num_classes=7)).eval()
    buffer = io.BytesIO()
    torch.save(converted.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert torch.equal(fresh(x), expected)


def test_trace_timm_resnet18() -> None:
    converted = convert(timm.create_model("resnet18", pretrained=False, num_classes=5)).eval()
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(converted, x, check_trace=False)
    y = torch.randn(1, 3, 48, 48)
    assert torch.allclose(traced(y), converted(y), atol=1e-5)


class Scriptable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(self.body(x).mean(dim=(2, 3))))


@pytest.mark.parametrize("method", ["reactnet", "bnn", "bimatting"])
def test_script_small_user_module(method: str) -> None:
    converted = convert(Scriptable(), method).eval()
    assert _is_binary(converted.body[2]) and _is_binary(converted.fc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(converted)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(scripted(x), converted(x), atol=1e-6)


def test_unconvert_restores_float_model() -> None:
    model = Nested().eval()
    converted = convert(model, keep_first=False)
    restored = unconvert(converted)
    assert not any(_is_binary(m) for m in restored.modules())
    assert any(_is_binary(m) for m in converted.modules())  # not in place by default
    assert restored.stages[0] is restored.branches["a"]
    assert not hasattr(restored, "binarize_report")
    assert restored.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(restored.eval()(x), model(x))
    assert unconvert(converted, inplace=True) is converted and not _is_binary(converted.stem)


def test_report_text_and_dict() -> None:
    _, report = convert(Nested(), return_report=True)
    text = str(report)
    assert "3 replaced, 3 kept" in text
    for row in report.replaced + report.kept:
        assert row.name in text
    assert REASON_DEPTHWISE in text and "-> BinaryConv2d" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["method"] == "reactnet" and len(data["replaced"]) == 3 and len(data["kept"]) == 3


def test_root_layer_itself() -> None:
    conv = nn.Conv2d(4, 4, 3)
    binary = convert(conv, keep_first=False, keep_last=False)
    assert isinstance(binary, BinaryConv2d) and torch.equal(binary.weight, conv.weight)
    assert isinstance(unconvert(binary), nn.Conv2d) and not _is_binary(unconvert(binary))


@settings(max_examples=15, deadline=None)
@given(widths=st.lists(st.integers(1, 6), min_size=1, max_size=5), keep_first=st.booleans(), keep_last=st.booleans())
def test_convert_unconvert_round_trip_property(widths: list, keep_first: bool, keep_last: bool) -> None:
    dims = [3, *widths, 2]
    layers = [nn.Linear(a, b) for a, b in zip(dims, dims[1:])]
    model = nn.Sequential(*layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted, report = convert(model, keep_first=keep_first, keep_last=keep_last, return_report=True)
    n = len(layers)
    expected_kept = {0} if keep_first else set()
    expected_kept |= {n - 1} if keep_last else set()
    assert {int(k.name) for k in report.kept} == expected_kept
    assert {int(r.name) for r in report.replaced} == set(range(n)) - expected_kept
    assert converted(torch.randn(4, 3)).shape == (4, 2)
    restored = unconvert(converted)
    assert all(type(m) is nn.Linear for m in restored)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)


def test_package_level_call_works_after_submodule_import() -> None:
    import binarize
    import binarize.convert as convert_module

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    converted, report = binarize.convert(model, "bnn", return_report=True)  # whichever object is bound
    assert convert_module(model, "bnn").binarize_report.num_replaced == report.num_replaced == 1
    assert isinstance(binarize.unconvert(converted)[1], nn.Conv2d)


def test_method_object_and_string_padding() -> None:
    from binarize.ops import Method

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect"),
                          nn.Conv2d(4, 4, 3, padding="same"), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    converted, report = convert(model, Method("my_sign", "sign", "sign"), return_report=True)
    assert report.method == "my_sign" and [r.name for r in report.replaced] == ["1", "2"]
    x = torch.randn(1, 3, 8, 8)
    # with sign binarizers and no scale the layer is exactly conv(sign(pad(x)), sign(W)) + b
    h = model[0](x)
    padded = F.pad(h, (1, 1, 1, 1), mode="reflect")
    expected = F.conv2d(torch.sign(padded), torch.sign(model[1].weight), model[1].bias)
    assert torch.allclose(converted[1](h), expected, atol=1e-5)
    assert converted(x).shape == (1, 2)
    with pytest.raises(ValueError, match="method must be"):
        convert(model, 42)


class HeadFirst(nn.Module):
    """Registers its classifier first and its stem last."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_first_and_last_in_call_order_with_example_inputs() -> None:
    model = HeadFirst().train()
    _, by_registration = convert(model, return_report=True)
    assert {k.name: k.reason for k in by_registration.kept} == {"body": REASON_FIRST, "stem": REASON_LAST}
    converted, by_call = convert(model, example_inputs=torch.randn(1, 3, 6, 6), return_report=True)
    assert {k.name: k.reason for k in by_call.kept} == {"stem": REASON_FIRST, "head": REASON_LAST}
    assert [r.name for r in by_call.replaced] == ["body"]
    assert converted.training and converted.stem.training  # modes restored after the probing forward
    with pytest.raises(ValueError, match="example_inputs failed"):
        convert(model, example_inputs=torch.randn(1, 5, 6, 6))


class _FunctionalAttention(nn.Module):
    """Reads its projections' weights through ``F.linear`` (as torchvision's swin attention does)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return F.linear(attn @ v, self.proj.weight, self.proj.bias)


class _HiddenRead(nn.Module):
    """Reads its child's weight in a way no source scan sees (only a forward reveals it)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.inner = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(self, "inn" + "er")
        return F.linear(x, layer.weight, layer.bias)


def _mlp_around(block: nn.Module, dim: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.Linear(dim, dim), block, nn.Linear(dim, dim), nn.Linear(dim, 2))


def test_layers_read_functionally_are_kept_not_reported_replaced() -> None:
    model = _mlp_around(_FunctionalAttention())
    converted, report = convert(model, return_report=True)
    kept = {k.name: k.reason for k in report.kept}
    assert "functionally" in kept["2.qkv"] and "functionally" in kept["2.proj"]
    assert {r.name for r in report.replaced} == {"1", "3"}
    assert type(converted[2].qkv) is nn.Linear
    # every replaced layer really runs: removing its binarization changes the output
    x = torch.randn(3, 5, 8)
    assert not torch.allclose(converted.eval()(x), model.eval()(x))


def test_uncalled_layers_are_found_by_the_example_forward() -> None:
    model = _mlp_around(_HiddenRead())
    _, report = convert(model, return_report=True)
    assert "2.inner" in {r.name for r in report.replaced}  # the source gives nothing away
    _, report = convert(model, return_report=True, example_inputs=torch.randn(2, 8))
    kept = {k.name: k.reason for k in report.kept}
    assert "never called" in kept["2.inner"] and "_HiddenRead" in kept["2.inner"]
    assert {r.name for r in report.replaced} == {"1", "3"}


def test_transformer_encoder_fast_path_does_not_bypass_binary_layers() -> None:
    """In eval mode without gradients nn.TransformerEncoderLayer's fast path read linear1/linear2's
    weights directly: the converted layers were bypassed (outputs differed by 0.25)."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.Linear(8, 16), layer, nn.Linear(16, 3))
    converted, report = convert(model, return_report=True)
    assert {"1.linear1", "1.linear2"} <= {r.name for r in report.replaced}
    converted.eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        fast = converted(x)
    torch.testing.assert_close(fast, converted(x).detach())
    # the float model keeps its fast path
    assert model[1].activation_relu_or_gelu


def test_swin_t_attention_projections_kept() -> None:
    torchvision = pytest.importorskip("torchvision")
    _, report = convert(torchvision.models.swin_t(num_classes=4), return_report=True)
    kept = {k.name: k.reason for k in report.kept}
    assert "functionally" in kept["features.1.0.attn.qkv"] and "functionally" in kept["features.5.1.attn.proj"]
    assert "features.1.0.mlp.0" in {r.name for r in report.replaced}


def test_layers_never_considered_are_listed_as_kept() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3)
            self.body = nn.Conv2d(8, 8, 3)
            self.c1 = nn.Conv1d(8, 8, 3)
            self.c3 = nn.Conv3d(8, 8, 1)
            self.up = nn.ConvTranspose2d(8, 8, 2)
            self.rnn = nn.LSTM(8, 8)
            self.gru = nn.GRU(8, 8)
            self.attn = nn.MultiheadAttention(8, 2)
            self.head = nn.Linear(8, 2)

    _, report = convert(Mixed(), return_report=True)
    kept = {k.name: (k.layer_type, k.reason) for k in report.kept}
    for name, kind in [("c1", "Conv1d"), ("c3", "Conv3d"), ("up", "ConvTranspose2d"), ("rnn", "LSTM"),
                       ("gru", "GRU")]:
        assert kept[name][0] == kind and "no binary counterpart" in kept[name][1], name
    assert "in_proj_weight" in kept["attn"][1]
    assert "functionally" in kept["attn.out_proj"][1]
    assert {r.name for r in report.replaced} == {"body"}
    assert "no binary counterpart" in str(report) and report.to_dict()["kept"]


def test_skip_glob_matching_nothing_warns() -> None:
    with pytest.warns(UserWarning, match="'stages.9.*' matches no"):
        convert(Nested(), skip=["stages.0.*", "stages.9.*"])
    with pytest.warns(UserWarning, match="'stages' matches no"):  # a container name: its layers are not skipped
        convert(Nested(), skip="stages")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert(Nested(), skip="stages.*")
        convert(Nested(), skip=lambda name, module: False)


def test_method_names_are_case_insensitive() -> None:
    converted, report = convert(Nested(), "ReActNet", return_report=True)
    assert report.method == "reactnet"
    assert all(m.method == "reactnet" for m in converted.modules() if _is_binary(m))
    assert convert(Nested(), "BNN").binarize_report.method == "bnn"


def test_parametrized_and_weight_norm_layers_are_kept() -> None:
    from torch.nn.utils import parametrizations, spectral_norm, weight_norm

    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)], nn.Linear(8, 2))
    parametrizations.weight_norm(model[1])
    parametrizations.orthogonal(model[2])
    weight_norm(model[3])
    spectral_norm(model[4])
    x = torch.randn(4, 8)
    expected = model.eval()(x)
    # old-style weight_norm / spectral_norm hooks make the model impossible to deep-copy: inplace
    converted, report = convert(model, return_report=True, inplace=True)
    kept = {k.name: k.reason for k in report.kept}
    assert "parametrize (_WeightNorm)" in kept["1"] and "parametrize (_Orthogonal)" in kept["2"]
    assert "WeightNorm hook" in kept["3"] and "SpectralNorm hook" in kept["4"]
    assert {r.name for r in report.replaced} == {"5"}
    assert not _is_binary(converted[1]) and hasattr(converted[1], "parametrizations")
    converted[5] = unconvert(converted[5])
    torch.testing.assert_close(converted.eval()(x), expected)  # the kept layers still compute their weights


def test_profile_counts_a_binary_weight_read_as_floats_in_full_precision() -> None:
    """A binary layer whose parent reads its latent weight through ``F.linear`` computes in float:
    ``profile`` stores that weight at 32 bits (it counted it at 1 bit)."""
    import binarize

    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.read = BinaryLinear(64, 32)
            self.called = BinaryLinear(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.called(F.linear(x, self.read.weight, self.read.bias))

    cost = binarize.profile(Parent(), torch.randn(2, 64))
    assert cost.binary_params == 32 * 16
    rows = {layer.name: layer for layer in cost.layers}
    assert rows["read"].binary_params == 0 and rows["read"].fp_params == 64 * 32 + 32
    assert cost.bops == 2 * 32 * 16 and cost.flops >= 2 * 64 * 32
