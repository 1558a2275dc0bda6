"""Deploy on whole converted models: deployed == simulated, inference-only contracts, dtypes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import binarize
from binarize.engine import deploy, deploy_report


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters far from a fresh layer's identity (as after training),
    so a wrongly fused ReLU or BatchNorm changes the outputs visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model.eval()


@pytest.mark.parametrize("activation", ["keep", "auto"])
def test_relu_called_at_several_sites_is_not_fused_torchvision_resnet18(activation):
    """torchvision's BasicBlock applies one ``self.relu`` object twice (after bn1 and after the add):
    fusing it into conv1's epilogue turned the second site into a pass-through (max error 1.0).
    With ``activation="keep"`` the ReLUs stay; the default policy replaces them."""
    torchvision = pytest.importorskip("torchvision")
    float_model = _trained_like(torchvision.models.resnet18(num_classes=10))
    model = binarize.convert(float_model, "reactnet", activation=activation).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    deployed = deploy(model)
    report = deploy_report(deployed)
    fused = [name for names in report.fused.values() for name in names]
    if activation == "keep":
        assert "layer1.0.relu" not in fused and "relu" in fused  # the stem's ReLU runs once: fused
    with torch.no_grad():
        expected, got = model(x), deployed(x)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _small_deployed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.PReLU(16),
                          nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    simulated = _trained_like(binarize.convert(model, "reactnet", activation="keep"))
    return simulated, deploy(simulated)


def test_tracing_a_deployed_model_raises_instead_of_recording_wrong_outputs():
    """The C kernels write into buffers the tracer sees as constants: the trace replayed garbage
    (1e26 off on its own input, 0.78 on another)."""
    simulated, deployed = _small_deployed()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(RuntimeError, match="cannot be traced"):
        torch.jit.trace(deployed, x)
    with pytest.raises(RuntimeError, match="cannot be traced"):
        torch.jit.trace(deployed[3], torch.randn(1, 16, 8, 8))  # a layer on its own, too
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), simulated(x), rtol=1e-4, atol=1e-4)  # still runs afterwards
    with pytest.raises(RuntimeError, match="cannot be scripted"):
        torch.jit.script(deployed)
    with pytest.raises(RuntimeError, match="cannot be traced, compiled or exported"):
        torch.export.export(deployed, (x,))  # was: "Cannot access data pointer of Tensor (FakeTensor)"
    traced = torch.jit.trace(simulated, x)  # the simulated model traces as before
    torch.testing.assert_close(traced(x + 1), simulated(x + 1))


def test_deployed_model_is_inference_only():
    simulated, deployed = _small_deployed()
    with pytest.raises(RuntimeError, match="inference-only"):
        deployed.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        deployed[3].train(True)
    assert deployed.eval() is deployed and not any(m.training for m in deployed.modules())
    assert deployed.train(False) is deployed
    import copy

    again = copy.deepcopy(deployed)
    with pytest.raises(RuntimeError, match="inference-only"):
        again.train()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x), simulated(x), rtol=1e-4, atol=1e-4)
    simulated.train()  # the original model is untouched


def test_deploy_half_precision_model():
    """The folded full-precision stem conv held float32 parameters and failed on float16 inputs."""
    torchvision = pytest.importorskip("torchvision")
    simulated = binarize.convert(_trained_like(torchvision.models.resnet18(num_classes=10)), "reactnet").eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = simulated(x)
        half = simulated.half()
        deployed = deploy(half)
        got, expected = deployed(x.half()), half(x.half())
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    # float16 rounding flips activation signs near zero in both models (different ones), and a deep
    # binary network amplifies each flip: the deployed model (float32 inside its kernels) is no
    # further from the float32 model than the simulated float16 model is
    sim_error = (expected.float() - reference).abs().mean()
    assert (got.float() - reference).abs().mean() <= 2 * sim_error + 0.02 * reference.abs().mean()
    assert sim_error < 0.3 * reference.abs().mean()


@pytest.mark.parametrize("name", ["regnet_x_400mf", "shufflenet_v2_x0_5", "mnasnet0_5"])
def test_deployed_equals_simulated_on_torchvision_models(name):
    """Grouped convs, channel shuffles / chunks, inverted residuals: with trained-like statistics the
    deployed model matches the simulated one to float rounding (also in every traced block)."""
    torchvision = pytest.importorskip("torchvision")
    from engine_helpers import randomize_stats

    torch.manual_seed(0)
    float_model = getattr(torchvision.models, name)(num_classes=10)
    model = randomize_stats(_trained_like(binarize.convert(float_model, "reactnet")))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    deployed = deploy(model)
    assert not deploy_report(deployed).simulated
    with torch.no_grad():
        expected, got = model(x), deployed(x)
    assert not torch.equal(expected[0], expected[1])  # the output depends on the input
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
