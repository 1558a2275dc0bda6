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


def test_relu_called_at_several_sites_is_not_fused_torchvision_resnet18():
    """torchvision's BasicBlock applies one ``self.relu`` object twice (after bn1 and after the add):
    fusing it into conv1's epilogue turned the second site into a pass-through (max error 1.0)."""
    torchvision = pytest.importorskip("torchvision")
    float_model = _trained_like(torchvision.models.resnet18(num_classes=10))
    model = binarize.convert(float_model, "reactnet").eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    deployed = deploy(model)
    report = deploy_report(deployed)
    fused = [name for names in report.fused.values() for name in names]
    assert "layer1.0.relu" not in fused and "relu" in fused  # the stem's ReLU runs once: fused
    with torch.no_grad():
        expected, got = model(x), deployed(x)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
