"""Mask operations for sparse-assisted binary computation (BiMatting, Qin et al. 2023)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["incoherent_mask"]


def incoherent_mask(alpha: torch.Tensor, factor: int = 2, threshold: float = 0.01) -> torch.Tensor:
    """Mask of the pixels where the binary alpha ``M = alpha > 0`` is not recovered by resizing.

    Follows the official BiMatting ``get_incoherent_mask``: ``M_ud`` is M bilinearly resized
    (``align_corners=False``) to (H // factor, W // factor) and back to (H, W); the mask is
    ``|M - M_ud| >= threshold`` (0.01). Accepts [B, 1, H, W] or [B, T, 1, H, W] and returns a float
    tensor of 0/1 of the same shape (float32 unless alpha is floating point).
    """
    if not isinstance(alpha, torch.Tensor):
        raise ValueError(f"incoherent_mask expects a tensor, got {type(alpha).__name__}")
    if alpha.dim() not in (4, 5):
        raise ValueError(f"incoherent_mask expects [B, 1, H, W] or [B, T, 1, H, W], got shape {tuple(alpha.shape)}")
    if int(factor) != factor or factor < 1:
        raise ValueError(f"incoherent_mask factor must be a positive integer, got {factor}")
    factor = int(factor)
    height, width = alpha.shape[-2:]
    if height < factor or width < factor:
        raise ValueError(f"incoherent_mask: alpha of size {height}x{width} is smaller than factor {factor}")
    mask = (alpha > 0).float().flatten(0, alpha.dim() - 4)
    small = F.interpolate(mask, (height // factor, width // factor), mode="bilinear", align_corners=False)
    recovered = F.interpolate(small, (height, width), mode="bilinear", align_corners=False)
    result = ((mask - recovered).abs() >= threshold).float().reshape(alpha.shape)
    return result.to(alpha.dtype) if alpha.is_floating_point() else result
