"""Shared helpers of the engine tests."""
from __future__ import annotations

import torch
from torch import nn


def randomize_stats(model: nn.Module, seed: int = 0, mean_scale: float = 0.1) -> nn.Module:
    """Non-trivial shifts, PReLU slopes and BatchNorm statistics (fresh layers are nearly identities),
    in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("bias") or "move" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * mean_scale)
    return model.eval()
