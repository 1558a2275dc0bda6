"""convert's activation policy: binary layers must see inputs whose sign carries information, and
converted networks must learn (the regression tests for the ReLU collapse)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import binarize
from binarize.activation_policy import original_activation
from binarize.ops import list_methods, step_binarizers

METHODS = list_methods()


class ReLUNet(nn.Module):
    """A plain ReLU CNN for 8x8 digits: float stem and classifier, two binary-eligible convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.act0 = nn.ReLU()
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.bn0(self.stem(x)))
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class SharedReLUBlock(nn.Module):
    """torchvision's pattern: one ReLU object called at two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        x = self.relu(self.bn(self.conv(x)) + x)
        return self.head(x)


class FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(F.relu(self.stem(x))))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.head(self.conv(self.act(self.stem(x))))


def _digits(n: int = 512):
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.tensor(data.target[:n])


def _binary_inputs_with_negatives(model: nn.Module, x: torch.Tensor) -> list:
    """For each binary layer call of ``model(x)``: whether its input had a negative value."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(bool((args[0] < 0).any())))
             for m in model.modules() if hasattr(m, "input_bits")]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_converted_relu_network_depends_on_its_input(method: str) -> None:
    torch.manual_seed(0)
    model = binarize.convert(ReLUNet(), method).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a, b = model(x[:1]), model(x[1:])
    assert (a - b).abs().max() > 1e-3
    # and every binary layer really receives inputs of both signs
    seen = _binary_inputs_with_negatives(model, x)
    assert seen and all(seen)


def test_without_the_policy_the_binary_layers_see_only_non_negative_inputs() -> None:
    """The collapse the policy fixes: with activation='keep' the ReLU net ignores its input."""
    torch.manual_seed(0)
    model = binarize.convert(ReLUNet(), "bnn", activation="keep").eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x[:1]), model(x[1:]))


def test_policy_replaces_only_rectifiers_that_feed_binary_layers() -> None:
    model, report = binarize.convert(ReLUNet(), "reactnet", return_report=True)
    assert {a.name for a in report.activations} == {"act0", "act1"}
    # act2 feeds only the full-precision classifier (through the mean): kept as it was
    assert type(model.act2) is nn.ReLU
    assert type(model.act0) is nn.Identity and type(model.act1) is nn.Identity
    assert all("conv" in a.reason for a in report.activations)
    assert "act0" in str(report) and report.to_dict()["activations"][0]["new_type"] == "Identity"


def test_shared_relu_is_replaced_as_a_whole_and_unconvert_restores_it() -> None:
    original = SharedReLUBlock()
    model, report = binarize.convert(original, "bnn", return_report=True)
    assert [a.name for a in report.activations] == ["relu"]
    assert type(model.relu) is nn.Identity
    assert original_activation(model.relu) is not None
    restored = binarize.unconvert(model)
    assert type(restored.relu) is nn.ReLU and restored.relu.inplace
    assert restored.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(1, 3, 6, 6)
    assert torch.allclose(restored(x), original(x))


@pytest.mark.parametrize("policy, expected", [("prelu", nn.PReLU), ("hardtanh", nn.Hardtanh), ("identity", nn.Identity),
                                              ("keep", nn.ReLU), ("AUTO", nn.Identity)])
def test_policy_choices(policy: str, expected: type) -> None:
    model = binarize.convert(SharedReLUBlock(), "bnn", activation=policy)
    assert type(model.relu) is expected


def test_policy_accepts_a_factory_and_rejects_unknown_names() -> None:
    model = binarize.convert(SharedReLUBlock(), "bnn", activation=lambda old: nn.LeakyReLU(0.1))
    assert type(model.relu) is nn.LeakyReLU
    with pytest.raises(ValueError, match="unknown activation policy 'relu'"):
        binarize.convert(SharedReLUBlock(), "bnn", activation="relu")


def test_functional_relu_feeding_a_binary_layer_is_reported_and_warned() -> None:
    with pytest.warns(UserWarning, match="functional non-negative activation"):
        _, report = binarize.convert(FunctionalReLU(), "bnn", return_report=True)
    assert [f.feeds for f in report.functional_activations] == [("conv",)]
    assert report.activations == []


def test_untraceable_model_falls_back_to_every_rectifier() -> None:
    model, report = binarize.convert(Untraceable(), "bnn", return_report=True)
    assert type(model.act) is nn.Identity
    assert report.notes and "could not be traced" in report.notes[0]


def test_torchvision_resnet18_shared_relus_are_all_replaced() -> None:
    torchvision = pytest.importorskip("torchvision")
    model, report = binarize.convert(torchvision.models.resnet18(num_classes=10), "reactnet", return_report=True)
    names = {a.name for a in report.activations}
    assert names == {"relu"} | {f"layer{i}.{j}.relu" for i in range(1, 5) for j in range(2)}
    model.train()
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    grads = [m.weight.grad for m in model.modules() if hasattr(m, "input_bits")]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("method", METHODS)
def test_a_few_seconds_of_training_on_digits_learns(method: str) -> None:
    """Loss well below chance (ln 10 = 2.30) after 60 steps, for every method."""
    x, y = _digits()
    torch.manual_seed(0)
    model = binarize.convert(ReLUNet(), method)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    clip = getattr(binarize.ops, "clip_latent_weights", None)
    generator = torch.Generator().manual_seed(0)
    losses = []
    steps = 60
    for step in range(steps):
        index = torch.randint(0, len(x), (64,), generator=generator)
        step_binarizers(model, step / (steps - 1))
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if clip is not None:
            clip(model)
        losses.append(loss.item())
    final = sum(losses[-10:]) / 10
    assert math.isfinite(final)
    assert final < 0.5 * math.log(10), f"{method}: mean loss of the last 10 steps {final:.3f}"


def test_warnings_free_on_a_plain_cnn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        binarize.convert(ReLUNet(), "reactnet")


# binary layers whose output no matting output uses (BiMatting's auxiliary 1/16 projection input)
_UNUSED_BY_MATTING = ("decoder.decode4.conv.",)
# BNN has no scale and MobileNetV3's squeeze-excitation has no BatchNorm between its two 1x1 convs:
# the expand conv's input is a sum of +-1 products far beyond |x| = 1, where BNN's clipped STE
# (Courbariaux et al. 2016) passes nothing back to the squeeze conv. A property of the method on this
# block, not of the conversion; every other binary layer of rvm_bnn gets a gradient.
_BNN_SQUEEZE = ("backbone.body.blocks.2.0.se.conv_reduce", "backbone.body.blocks.2.2.se.conv_reduce")


@pytest.mark.parametrize("name", ["rvm_bnn", "rvm_xnor", "rvm_dorefa", "rvm_bireal", "rvm_reactnet", "rvm_irnet",
                                  "rvm_recu", "bimatting"])
def test_matting_models_have_finite_nonzero_gradients_at_initialisation(name: str) -> None:
    from binarize.matting.data.synthetic import SyntheticMatting
    from binarize.models import create_model

    fgr, pha, bgr = (torch.as_tensor(a) for a in SyntheticMatting(clips=1, frames=2, size=(96, 64)).generate(0))
    src = (fgr * pha + bgr * (1 - pha))[None]
    torch.manual_seed(0)
    model = create_model(name).train()
    out_fgr, out_pha = model(src, downsample_ratio=0.5)[:2]
    loss = (out_pha - pha[None]).abs().mean() + (out_fgr - fgr[None]).abs().mean()
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), param_name
    for layer_name, layer in model.named_modules():
        if name == "rvm_bnn" and layer_name in _BNN_SQUEEZE:
            continue
        if hasattr(layer, "input_bits") and not layer_name.startswith(_UNUSED_BY_MATTING):
            grad = layer.weight.grad
            assert grad is not None and grad.abs().max() > 0, f"{name}: no gradient reaches {layer_name}"


class SqueezeExciteNet(nn.Module):
    """An EfficientNet-like block: SiLU, a squeeze-excite whose reduce layer sees the spatial mean of
    the SiLU output (almost always > 0), and a sigmoid-gated product feeding a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.SiLU()
        self.se_reduce = nn.Conv2d(16, 4, 1)
        self.se_act = nn.SiLU()
        self.se_expand = nn.Conv2d(4, 16, 1)
        self.gate = nn.Sigmoid()
        self.gated = nn.Conv2d(16, 16, 1)
        self.project = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(self.stem(x))))
        scale = self.gate(self.se_expand(self.se_act(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        x = self.project(x * scale) + self.gated(scale.expand_as(x))
        return self.head(x.mean((2, 3)))


def test_squeeze_excite_reduce_and_gate_fed_layers_are_kept_with_a_reason() -> None:
    """The mean of a SiLU map (before the policy: both signs pixel by pixel) binarizes to all +1, and
    so does a sigmoid: those layers stay full precision, reported; the others are binarized."""
    torch.manual_seed(0)
    model, report = binarize.convert(SqueezeExciteNet(), "bnn", return_report=True)
    kept = {k.name: k.reason for k in report.kept}
    assert "spatial mean of a SiLU output" in kept["se_reduce"]
    assert "gate's output" in kept["gated"]
    assert type(model.se_reduce) is nn.Conv2d and type(model.gated) is nn.Conv2d
    assert {r.name for r in report.replaced} == {"conv", "se_expand", "project"}
    # what they would have seen: a spatial mean of SiLU maps is > 0 on (almost) every channel
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        pooled = SqueezeExciteNet().act(torch.randn(8, 16, 8, 8)).mean((2, 3))
    assert (pooled > 0).float().mean() > 0.95
    model.train()
    seen = _binary_inputs_with_negatives(model, x)
    assert len(seen) == 3 and all(seen)


class SplitAttentionNet(nn.Module):
    """ResNeSt's split attention: ReLU, a sum over the radix groups, then binary layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Conv2d(16, 16, 1)
        self.out = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(self.stem(x)))
        groups = x.reshape(x.shape[0], 2, 16, *x.shape[2:])
        attention = torch.softmax(self.fc(groups.sum(dim=1).mean((2, 3), keepdim=True)), dim=1)
        x = self.out((groups * attention.unsqueeze(1)).sum(dim=1))
        return self.head(x.mean((2, 3)))


def test_a_rectifier_reaching_binary_layers_through_sums_is_replaced() -> None:
    model, report = binarize.convert(SplitAttentionNet(), "bnn", return_report=True)
    assert [a.name for a in report.activations] == ["act"]
    assert {r.name for r in report.replaced} == {"conv", "fc", "out"}
