"""incoherent_mask against a direct computation with an independent bilinear resize."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from binarize.ops import incoherent_mask


def _resize_axis(a: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Bilinear resize along one axis, half-pixel centres (align_corners=False), edges clamped."""
    in_size = a.shape[axis]
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    shape = [1] * a.ndim
    shape[axis] = out_size
    frac = frac.reshape(shape)
    return np.take(a, lo, axis=axis) * (1 - frac) + np.take(a, hi, axis=axis) * frac


def _direct_mask(alpha: np.ndarray, factor: int) -> np.ndarray:
    m = (alpha > 0).astype(np.float64)
    h, w = m.shape[-2:]
    small = _resize_axis(_resize_axis(m, h // factor, -2), w // factor, -1)
    back = _resize_axis(_resize_axis(small, h, -2), w, -1)
    return (np.abs(m - back) >= 0.01).astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2), st.integers(2, 12), st.integers(2, 12), st.sampled_from([2, 3, 4]), st.data())
def test_matches_direct_computation(batch, height, width, factor, data):
    height, width = max(height, factor), max(width, factor)
    alpha = data.draw(arrays(np.float32, (batch, 1, height, width),
                             elements=st.sampled_from([0.0, 0.0, 0.3, 1.0, -0.2])))
    mask = incoherent_mask(torch.from_numpy(alpha), factor)
    assert mask.shape == alpha.shape and mask.dtype == torch.float32
    np.testing.assert_array_equal(mask.numpy(), _direct_mask(alpha, factor))


def test_flat_regions_are_coherent_and_edges_are_not():
    alpha = torch.zeros(1, 1, 8, 8)
    assert incoherent_mask(alpha).sum() == 0
    assert incoherent_mask(torch.ones(1, 1, 8, 8)).sum() == 0
    alpha[..., :, 4:] = 0.7  # a vertical edge between columns 3 and 4
    mask = incoherent_mask(alpha)
    assert mask[0, 0, :, 0].sum() == 0 and mask[0, 0, :, 7].sum() == 0
    assert mask[0, 0, :, 3:5].sum() > 0


def test_time_series_and_dtypes():
    torch.manual_seed(0)
    alpha = torch.rand(2, 3, 1, 6, 10) - 0.5
    mask = incoherent_mask(alpha)
    assert mask.shape == alpha.shape
    torch.testing.assert_close(mask.flatten(0, 1), incoherent_mask(alpha.flatten(0, 1)))
    assert incoherent_mask(alpha.double()).dtype == torch.float64
    assert incoherent_mask(alpha > 0).dtype == torch.float32
    torch.testing.assert_close(incoherent_mask(alpha > 0), mask)


def test_errors():
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        incoherent_mask(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="smaller than factor"):
        incoherent_mask(torch.zeros(1, 1, 1, 5))
    with pytest.raises(ValueError, match="positive integer"):
        incoherent_mask(torch.zeros(1, 1, 4, 4), factor=0)
