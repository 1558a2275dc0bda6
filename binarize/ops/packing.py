"""Sign bit packing for compact checkpoints: one bit per element, little bit order.

Bit i of the packed stream is 1 when ``t.flatten()[i] >= 0`` (so exact zeros pack as +1), byte
k holds elements 8k..8k+7 with element 8k in the least significant bit (numpy ``bitorder="little"``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["pack_signs", "unpack_signs", "packed_size"]


def packed_size(numel: int) -> int:
    """Number of bytes needed to pack ``numel`` signs."""
    return (int(numel) + 7) // 8


def pack_signs(t: torch.Tensor) -> torch.Tensor:
    """Pack the signs of ``t`` into a 1-D uint8 tensor of ``ceil(numel / 8)`` bytes (bit = t >= 0)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"pack_signs expects a torch.Tensor, got {type(t).__name__}")
    bits = (t.detach() >= 0).flatten().cpu().numpy()
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_signs(packed: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``pack_signs``: a tensor of ``shape`` holding +1 (bit set) or -1."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"unpack_signs: negative dimension in shape {shape}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"unpack_signs expects a uint8 tensor, got {got}")
    numel = math.prod(shape)
    if packed.numel() != packed_size(numel):
        raise ValueError(
            f"unpack_signs: {packed.numel()} bytes cannot hold shape {shape} "
            f"(needs {packed_size(numel)} bytes for {numel} signs)"
        )
    bits = np.unpackbits(packed.flatten().cpu().numpy(), count=numel, bitorder="little")
    signs = torch.from_numpy(bits.astype(np.int8) * 2 - 1).to(dtype)
    return signs.reshape(shape)
