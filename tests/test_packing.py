"""Sign bit packing: round trips, the exact bit layout, and input validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from binarize.ops import pack_signs, unpack_signs
from binarize.ops.packing import packed_size

SETTINGS = settings(max_examples=40, deadline=None)
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


@SETTINGS
@given(shapes.flatmap(lambda s: arrays(np.float32, s, elements=st.floats(-5, 5, width=32))))
def test_round_trip_gives_signs(values):
    t = torch.from_numpy(values)
    packed = pack_signs(t)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(t.numel() / 8),)
    restored = unpack_signs(packed, t.shape)
    assert restored.shape == t.shape and restored.dtype == torch.float32
    assert torch.equal(restored, torch.where(t >= 0, 1.0, -1.0))


@SETTINGS
@given(shapes.flatmap(lambda s: arrays(np.int8, s, elements=st.sampled_from([-1, 1]))))
def test_pack_of_unpack_is_identity_on_sign_tensors(values):
    t = torch.from_numpy(values).float()
    assert torch.equal(unpack_signs(pack_signs(t), t.shape), t)
    assert torch.equal(pack_signs(unpack_signs(pack_signs(t), t.shape)), pack_signs(t))


def test_little_bit_order_layout():
    # element i -> bit (i % 8) of byte i // 8; element 0 is the least significant bit
    t = torch.tensor([1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 2.0, -3.0, 0.0])
    assert pack_signs(t).tolist() == [0b10000001, 0b00000010]


def test_zero_packs_as_plus_one_and_dtypes():
    t = torch.tensor([0.0, -0.0, -1e-30], dtype=torch.bfloat16)
    assert pack_signs(t).tolist() == [0b011]
    out = unpack_signs(pack_signs(t), (3,), dtype=torch.float16)
    assert out.dtype == torch.float16 and out.tolist() == [1.0, 1.0, -1.0]
    channels_last = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert torch.equal(pack_signs(channels_last), pack_signs(channels_last.contiguous()))


def test_validation_errors():
    with pytest.raises(ValueError, match="needs 2 bytes"):
        unpack_signs(torch.zeros(1, dtype=torch.uint8), (3, 4))
    with pytest.raises(ValueError, match="uint8"):
        unpack_signs(torch.zeros(2), (3, 4))
    with pytest.raises(ValueError, match="negative"):
        unpack_signs(torch.zeros(1, dtype=torch.uint8), (-1, 4))
    with pytest.raises(ValueError, match="torch.Tensor"):
        pack_signs([1.0, -1.0])
    assert packed_size(0) == 0 and packed_size(8) == 1 and packed_size(9) == 2
