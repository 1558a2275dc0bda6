"""binarize.profile: FLOPs/BOPs/OPs against fvcore and formulas, parameters, storage, sparsity, errors."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from hypothesis import given, settings
from hypothesis import strategies as st

from binarize.convert import convert
from binarize.nn import BinaryConv2d, BinaryLinear
from binarize.ops import list_methods
from binarize.profile import ProfileReport, format_count, layer_macs, measure_latency, profile

TIMM_MODELS = [
    ("resnet18", {}),
    ("mobilenetv3_large_100", {}),
    ("convnext_atto", {}),
    ("vit_tiny_patch16_224", {"img_size": 64}),
    ("regnetx_002", {}),
]


def fvcore_counts(model: nn.Module, x: torch.Tensor) -> FlopCountAnalysis:
    analysis = FlopCountAnalysis(model.eval(), x)
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


@pytest.mark.parametrize("name,kwargs", TIMM_MODELS, ids=[n for n, _ in TIMM_MODELS])
def test_float_model_flops_equal_fvcore_total(name: str, kwargs: dict) -> None:
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    report = profile(model, x)
    assert report.flops == fvcore_counts(model, x).total()
    assert report.bops == 0 and report.binary_params == 0
    assert report.fp_params == sum(p.numel() for p in model.parameters())
    assert report.ops == report.flops and report.sparse_ops == report.flops
    assert report.storage_bytes == report.fp32_storage_bytes == 4 * report.fp_params


def test_converted_resnet_moves_macs_from_flops_to_bops() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    converted, conversion = convert(model, return_report=True)
    float_counts = fvcore_counts(model, x)
    replaced = [r.name for r in conversion.replaced]
    expected_bops = sum(float_counts.total(name) for name in replaced)
    report = profile(converted, x)
    assert report.bops == expected_bops > 0
    assert report.flops == float_counts.total() - expected_bops  # sign/abs/mean/RPReLU add nothing
    assert report.ops == pytest.approx(report.flops + report.bops / 64)
    binary_weights = sum(model.get_submodule(name).weight.numel() for name in replaced)
    assert report.binary_params == binary_weights
    all_params = sum(p.numel() for p in converted.parameters())
    assert report.fp_params == all_params - binary_weights  # BN, biases, RSign/RPReLU included
    assert report.storage_bytes == pytest.approx(binary_weights / 8 + 4 * (all_params - binary_weights))
    assert report.fp32_storage_bytes == 4 * all_params
    rows = {row.name: row for row in report.layers}
    assert rows["layer1.0.conv1"].bops == float_counts.total("layer1.0.conv1")
    assert rows["layer1.0.conv1"].input_bits == 1 and rows["layer1.0.conv1"].flops == 0
    assert rows["conv1"].flops == float_counts.total("conv1") and rows["conv1"].bops == 0


@pytest.mark.parametrize("method", list_methods())
def test_binarizer_ops_do_not_inflate_counts(method: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16 * 36, 32), nn.Linear(32, 4))
    x = torch.randn(2, 3, 6, 6)
    float_report = profile(model, x)
    report = profile(convert(model, method), x)
    conv_macs = 2 * (16 * 8 * 9) * 36
    linear_macs = 2 * (16 * 36) * 32
    assert report.bops == conv_macs + linear_macs
    assert report.flops == float_report.flops - report.bops


class OwnBinaryLayer(nn.Module):
    """A user's layer that is not one of ours but declares its precision."""

    def __init__(self, input_bits: int, weight_bits: int) -> None:
        super().__init__()
        self.input_bits, self.weight_bits = input_bits, weight_bits
        self.weight = nn.Parameter(torch.randn(6, 4, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(torch.sign(x), torch.sign(self.weight), padding=1)


@pytest.mark.parametrize("bits,binary", [((1, 1), True), ((1, 32), False), ((32, 1), False)])
def test_precision_read_from_attributes(bits: tuple, binary: bool) -> None:
    layer = OwnBinaryLayer(*bits)
    report = profile(layer, torch.randn(1, 4, 5, 5))
    macs = 6 * 4 * 9 * 25
    assert (report.bops, report.flops) == ((macs, 0) if binary else (0, macs))
    weight_is_binary = bits[1] == 1
    assert report.binary_params == (216 if weight_is_binary else 0)
    assert report.fp_params == (0 if weight_is_binary else 216)


def test_layer_macs_formula() -> None:
    assert layer_macs((8, 4, 3, 3), (2, 8, 5, 7)) == 2 * 8 * 4 * 9 * 35
    assert layer_macs((10, 20), (3, 7, 10)) == 21 * 200
    with pytest.raises(ValueError, match="3-D weight"):
        layer_macs((1, 2, 3), (1, 2))


class Masked(nn.Module):
    """Computes its conv only where the input is positive (simulated densely); records the density."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.mask_density = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x[:, :1] > 0).float()
        self.mask_density = float(mask.mean())
        return self.inner(x) * mask


class SparseNet(nn.Module):
    def __init__(self, nested: bool = False) -> None:
        super().__init__()
        self.dense = nn.Conv2d(4, 4, 3, padding=1)
        inner = nn.Sequential(BinaryConv2d(4, 4, 3, padding=1, method="bnn"), nn.Conv2d(4, 4, 1))
        if nested:
            inner = nn.Sequential(inner[0], Masked(inner[1]))
        self.masked = Masked(inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.masked(self.dense(x))


def test_sparse_figures_use_measured_density() -> None:
    torch.manual_seed(3)
    model = SparseNet()
    x = torch.randn(1, 4, 8, 8)
    report = profile(model, x)
    density = float((model.dense(x)[:, :1] > 0).float().mean())
    assert 0 < density < 1 and report.mask_densities == {"masked": pytest.approx(density)}
    dense_macs = 4 * 4 * 9 * 64
    assert report.bops == dense_macs and report.flops == dense_macs + 16 * 64
    assert report.sparse_bops == pytest.approx(dense_macs * density)
    assert report.sparse_flops == pytest.approx(dense_macs + 16 * 64 * density)
    assert report.sparse_ops == pytest.approx(report.sparse_flops + report.sparse_bops / 64)
    assumed = profile(model, x, assume_density=0.25)
    assert assumed.sparse_bops == pytest.approx(dense_macs * 0.25) and assumed.bops == report.bops


def test_nested_masks_nearest_density_wins() -> None:
    torch.manual_seed(4)
    model = SparseNet(nested=True)
    report = profile(model, torch.randn(1, 4, 8, 8))
    outer, inner = report.mask_densities["masked"], report.mask_densities["masked.inner.1"]
    assert report.sparse_bops == pytest.approx(4 * 4 * 9 * 64 * outer)
    assert report.sparse_flops == pytest.approx(4 * 4 * 9 * 64 + 16 * 64 * inner)


def test_wrong_input_shape_is_one_clear_line() -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(ValueError) as info:
        profile(model, torch.randn(1, 4, 32, 32))
    message = str(info.value)
    assert "\n" not in message and "[1, 4, 32, 32]" in message and "expects 3 input channels" in message
    mlp = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(ValueError, match="expects a last dimension of 5"):
        profile(mlp, torch.randn(2, 6))
    with pytest.raises(ValueError, match="example_inputs"):
        profile(mlp, "not a tensor")
    with pytest.raises(ValueError, match="assume_density"):
        profile(mlp, torch.randn(2, 5), assume_density=1.5)


class Recurrent(nn.Module):
    """Matting-style call: optional state arguments and a keyword option."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, state=None, scale: float = 1.0):
        y = self.conv(x) * scale
        if state is not None:
            y = y + state
        return [y, {"state": y}]


def test_non_tensor_inputs_and_forward_kwargs() -> None:
    model = Recurrent()
    x = torch.randn(1, 3, 8, 8)
    plain = profile(model, (x, None), scale=0.5)
    with_state = profile(model, (x, torch.zeros(1, 3, 8, 8)), scale=2.0)
    assert plain.flops == with_state.flops == 3 * 3 * 9 * 64
    assert plain.input_shapes == [[1, 3, 8, 8]]


def test_training_flags_restored_and_shared_layer_counted_per_call() -> None:
    shared = BinaryLinear(4, 4, method="bnn")
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.ReLU(), shared, nn.BatchNorm1d(4))
    model.train()
    model[4].eval()
    report = profile(model, torch.randn(3, 4))
    assert model.training and model[0].training and not model[4].training
    assert report.bops == 2 * 3 * 16 and report.binary_params == 16  # two calls, one weight


def test_compare_and_table_and_dict() -> None:
    base = ProfileReport(flops=4_000_000_000, bops=0, sparse_flops=4e9, sparse_bops=0, binary_params=0,
                         fp_params=1000)
    small = ProfileReport(flops=100_000_000, bops=6_400_000_000, sparse_flops=1e8, sparse_bops=3.2e9,
                          binary_params=8000, fp_params=100)
    savings = small.compare(base)
    assert savings.computation == pytest.approx(4e9 / (1e8 + 1e8))
    assert savings.sparse_computation == pytest.approx(4e9 / (1e8 + 5e7))
    assert savings.storage == pytest.approx(4000 / (1000 + 400))
    assert "20.0x (dense), 26.7x (sparse)" in str(savings)
    model = convert(timm.create_model("resnet18", pretrained=False, num_classes=10))
    report = profile(model, torch.randn(1, 3, 32, 32))
    text = report.table()
    lines = text.splitlines()
    assert "layer1.0.conv1" in text and "BinaryConv2d" in text and "total" in text
    header_width = len(lines[0])
    assert lines[1] == "-" * header_width
    assert " M" in text and " K" in text and "OPs = FLOPs + BOPs/64" in text
    row = next(line for line in lines if line.startswith("layer1.0.conv1 "))
    assert row.split()[1:3] == ["BinaryConv2d", "1/1"]
    assert next(line for line in lines if line.startswith("conv1 ")).split()[1:3] == ["Conv2d", "fp"]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["bops"] == report.bops and data["ops"] == pytest.approx(report.ops)
    assert len(data["layers"]) == len(report.layers)
    assert str(report).count("\n") < 8  # summary only


def test_format_count_units() -> None:
    assert format_count(4.57e9) == "4.57 G"
    assert format_count(38525) == "38.52 K"
    assert format_count(4_217_584) == "4.22 M"
    assert format_count(12) == "12"


def test_measure_latency_median_with_fake_timer() -> None:
    ticks = iter([0.0, 1.0, 1.0, 3.0, 3.0, 3.5, 3.5, 7.5])  # warmup 1s, then 2s, 0.5s, 4s
    model = nn.Linear(2, 2).train()
    latency = measure_latency(model, torch.randn(1, 2), runs=3, warmup=1, timer=lambda: next(ticks))
    assert latency == 2.0 and model.training
    with pytest.raises(ValueError, match="runs"):
        measure_latency(model, torch.randn(1, 2), runs=0)


class Vestigial(nn.Module):
    """Carries a parameter its forward never reads (like official BiMatting's channel_threshold)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.spare = nn.Parameter(torch.zeros(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class WithIdleParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = Vestigial()
        self.idle = Vestigial()  # not called in this forward: its conv still needs storage
        self.extra = nn.Linear(3, 3)  # not called either: kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_parameters_never_read_are_not_counted() -> None:
    report = profile(WithIdleParts(), torch.randn(1, 2, 4, 4))
    assert report.unused_params == 14  # both `spare`s: no Vestigial that ran read its `spare`
    assert report.fp_params == 6 + 6 + 12
    assert report.storage_bytes == 4 * 24
    assert "14 parameters never read" in report.table()
    rows = {row.name: row for row in report.layers}
    assert rows["used"].unused_params == 7 and rows["idle.conv"].fp_params == 6


# --------------------------------------------------------------------------- the zoo (issue 3, section 4)
@pytest.fixture(scope="module")
def zoo_reports() -> dict:
    """BiMatting and RVM profiled at the paper's 512x288 on the built-in synthetic frame."""
    from binarize.cli.profile import synthetic_frame
    from binarize.models import create_model

    torch.manual_seed(0)
    src = synthetic_frame(512, 288)
    reports = {}
    for name in ("bimatting", "rvm_mobilenetv3"):
        model = create_model(name).eval()
        reports[name] = profile(model, (src, None, None, None, None), downsample_ratio=1.0)
    return reports


def _g(value: float, digits: int = 2) -> float:
    return round(value / 1e9, digits)


def test_zoo_parameter_and_storage_counts(zoo_reports: dict) -> None:
    bim, rvm = zoo_reports["bimatting"], zoo_reports["rvm_mobilenetv3"]
    assert (bim.binary_params, bim.fp_params) == (4_217_584, 38_525)
    assert bim.unused_params == 9184  # the official checkpoint's vestigial channel_threshold
    assert (rvm.binary_params, rvm.fp_params) == (0, 3_748_633)
    assert bim.storage_bytes == 4_217_584 / 8 + 4 * 38_525
    assert round(bim.compare(rvm).storage, 1) == 22.0


def test_zoo_computation_counts(zoo_reports: dict) -> None:
    bim, rvm = zoo_reports["bimatting"], zoo_reports["rvm_mobilenetv3"]
    assert _g(rvm.flops) == 4.57 and rvm.bops == 0
    assert _g(bim.bops) == 6.93 and _g(bim.masked_bops) == 2.98
    conv_rows = [row for row in bim.layers if row.layer_type == "Conv2d"]
    assert _g(sum(r.flops for r in conv_rows)) == 0.40
    assert _g(sum(r.flops for r in conv_rows if r.masked)) == 0.34
    assert _g(bim.flops - sum(r.flops for r in conv_rows), 3) == 0.075  # BatchNorm, upsampling, pooling
    assert _g(bim.ops) == 0.59
    assert round(bim.compare(rvm).computation, 1) == 7.8


def test_zoo_sparsity_closes_the_gap(zoo_reports: dict) -> None:
    bim, rvm = zoo_reports["bimatting"], zoo_reports["rvm_mobilenetv3"]
    masked_ops = bim.masked_flops + bim.masked_bops / 64
    assert len(bim.mask_densities) == 10 and all(0.0 <= d <= 1.0 for d in bim.mask_densities.values())
    # sparse OPs = dense OPs - (1 - density) * masked OPs; solve for the paper's 12.4x
    density = 1 - (bim.ops - rvm.ops / 12.4) / masked_ops
    assert 0.42 <= density <= 0.47  # "about 44% of positions"
    expected = bim.ops - (1 - 0.44) * masked_ops
    assert rvm.ops / expected == pytest.approx(12.6, abs=0.05)


def test_package_level_profile_works_after_submodule_import() -> None:
    import binarize
    import binarize.profile as profile_module

    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    x = torch.randn(1, 3, 5, 5)
    assert binarize.profile(model, x).flops == profile_module(model, x).flops == 4 * 27 * 9


def test_layer_on_another_implementation_counts_like_the_simulated_one() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BinaryConv2d(8, 8, 3, padding=1, method="reactnet"))
    x = torch.randn(1, 3, 6, 6)
    simulated = profile(model, x)
    layer = model[1]
    frozen = torch.sign(layer.weight.detach()).clone()  # an engine reads its own packed copy
    layer.set_implementation(lambda t: F.conv2d(torch.sign(t), frozen, padding=1), name="packed")
    deployed = profile(model, x)
    assert deployed.bops == simulated.bops == 8 * 8 * 9 * 36  # from the hook, not from traced ops
    assert deployed.flops == simulated.flops
    assert (deployed.binary_params, deployed.fp_params) == (simulated.binary_params, simulated.fp_params)
    assert deployed.unused_params == 0


@settings(max_examples=25, deadline=None)
@given(
    groups=st.integers(1, 3), in_per_group=st.integers(1, 3), out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
    size=st.integers(5, 9), batch=st.integers(1, 2), method=st.sampled_from(["bnn", "reactnet", "xnor"]),
)
def test_binary_conv_bops_equal_fvcore_conv_macs(groups, in_per_group, out_per_group, kernel, stride, padding,
                                                dilation, size, batch, method) -> None:
    conv = nn.Conv2d(groups * in_per_group, groups * out_per_group, kernel, stride, padding, dilation, groups)
    x = torch.randn(batch, groups * in_per_group, size, size + 1)
    binary = BinaryConv2d.from_float(conv, method=method)
    report = profile(binary, x)
    assert report.bops == fvcore_counts(conv, x).total() and report.flops == 0
    assert report.binary_params == conv.weight.numel()


@settings(max_examples=10, deadline=None)
@given(rows=st.lists(st.integers(1, 4), min_size=1, max_size=3), features=st.integers(1, 6), out=st.integers(1, 6))
def test_binary_linear_bops_equal_fvcore_linear_macs(rows, features, out) -> None:
    linear = nn.Linear(features, out)
    x = torch.randn(*rows, features)
    report = profile(BinaryLinear.from_float(linear, method="bnn"), x)
    assert report.bops == fvcore_counts(linear, x).total() and report.flops == 0


class PooledScaleSign(nn.Module):
    """A binarizer (declares bits and kind) whose scale uses an op fvcore counts (adaptive pooling)."""

    bits = 1
    kind = "activation"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x) * F.adaptive_avg_pool2d(x.abs(), 1)


def test_ops_inside_binarizers_are_reported_apart() -> None:
    from binarize.ops import SignSTE

    layer = BinaryConv2d(4, 6, 3, padding=1, input_binarizer=PooledScaleSign(),
                         weight_binarizer=SignSTE(kind="weight"), method=None)
    x = torch.randn(2, 4, 5, 5)
    assert fvcore_counts(layer, x).total("input_binarizer") == x.numel()  # fvcore does count it
    report = profile(layer, x)
    assert report.binarizer_flops == x.numel()
    assert report.flops == 0 and report.bops == 2 * 6 * 4 * 9 * 25


def test_profiling_shows_no_deprecation_warning_from_fvcore_import():
    """fvcore.nn scripts a loss on import, which torch deprecates; a profile (a fresh process, so
    fvcore is imported by it) raises no FutureWarning even with warnings as errors."""
    import subprocess
    import sys

    code = ("import torch\nfrom binarize.profile import profile\n"
            "profile(torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8))\n")
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
