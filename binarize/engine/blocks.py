"""Whole-block deployment of ``ElasticShortcutBlock`` (BiMobileNet's block) on the packed engine.

The block is two binary convolutions wrapped in per-channel and shortcut arithmetic::

    out1 = move13(prelu1(move12(pool?(x) + bn1(conv3x3(sign(move11(x)))))))
    out  = move23(prelu2(move22(bn2_i(pw_i(sign(move21(out1)))) + shortcut)))

Deployed, each convolution's epilogue computes everything after its dot product — BatchNorm, the
shortcut add (the kernel's ``residual`` operand), shifts and PReLU — and packs its own output for
the next convolution while the tile is in cache, so the block makes two passes over memory
instead of about ten.  The parallel 1x1 convolutions of a widening block run as one convolution
whose outputs are already the concatenation.  A block's output can also be packed for the block
that consumes it (linked on the first call, checked by identity and tensor version on every
call), which saves the next block its packing pass.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from binarize.engine import _lib
from binarize.engine.functional import Epilogue, avg_pool2x2, binary_conv2d, pack_weights
from binarize.engine.layers import (
    PackedConv2d,
    UnsupportedLayer,
    _merge_affine,
    epilogue_ops,
    input_spec,
    weight_signs_and_scale,
)
from binarize.nn.blocks import ElasticShortcutBlock
from binarize.nn.layers import BinaryConv2d

_BITS_ATTR = "_binarize_packed"
_PRODUCER_ATTR = "_binarize_producer"


def attach_packed(tensor: torch.Tensor, bias: torch.Tensor, words: torch.Tensor) -> None:
    """Remember that ``words`` are ``tensor`` packed with ``bias`` (valid while it is unmodified).

    Tensors made under ``torch.inference_mode`` have no version counter, so an in-place change
    could not be noticed: they carry no words (run under ``torch.no_grad`` to get the saving).
    """
    if not tensor.is_inference():
        setattr(tensor, _BITS_ATTR, (bias, tensor._version, words))


def take_packed(tensor: torch.Tensor, bias: torch.Tensor) -> Optional[torch.Tensor]:
    """The words attached to ``tensor`` for exactly this ``bias`` tensor, if still valid."""
    if tensor.is_inference():
        return None
    entry = getattr(tensor, _BITS_ATTR, None)
    if entry is None or entry[0] is not bias or entry[1] != tensor._version:
        return None
    return entry[2]


def _ops(module: nn.Module, channels: int) -> list:
    ops = epilogue_ops(module, channels)
    if ops is None:
        raise UnsupportedLayer(f"{type(module).__name__} has no per-channel epilogue equivalent")
    return ops


def _plain_sign_conv(conv: BinaryConv2d, kernel: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight signs and scales of a conv whose input is a plain sign and whose output is the dot product."""
    spec = input_spec(conv.input_binarizer)
    if spec.bias is not None or spec.sample_scale:
        raise UnsupportedLayer("the block's convs must binarize their input with a plain sign")
    if conv.bias is not None or not isinstance(conv.post, nn.Identity):
        raise UnsupportedLayer("the block's convs must have no bias and no post module")
    if conv.kernel_size != (kernel, kernel) or conv.groups != 1 or conv.dilation != (1, 1):
        raise UnsupportedLayer("unexpected conv geometry in the block")
    if conv.padding_mode != "zeros" or (kernel > 1 and conv.pad_value != 0.0):
        raise UnsupportedLayer("the block's 3x3 conv must pad with zeros")
    return weight_signs_and_scale(conv)


def _bias_vector(module: nn.Module) -> torch.Tensor:
    return module.bias.detach().float().reshape(-1).contiguous()


class ElasticShortcutForward:
    """Forward of a deployed ``ElasticShortcutBlock``: the whole block as two packed convolutions.

    Raises ``UnsupportedLayer`` at construction when the block's layers are not the plain-sign,
    BatchNorm / shift / PReLU kind the fused epilogues reproduce (deploy then packs its layers one by one).
    """

    def __init__(self, block: ElasticShortcutBlock, num_threads: Optional[int] = None,
                 backend: str = "auto") -> None:
        if block.training:
            raise UnsupportedLayer("the block is in training mode")
        self.block_repr = repr(block.extra_repr())
        self.stride = block.stride
        self.shrink = block.shrink
        self.in_channels, self.out_channels = block.in_channels, block.out_channels
        self.num_threads, self.backend = num_threads, backend
        channels = block.in_channels
        positive, alpha = _plain_sign_conv(block.binary_3x3, 3)
        stage1 = (_ops(block.bn1, channels) + [("residual", None)] + _ops(block.move12, channels)
                  + _ops(block.prelu1, channels) + _ops(block.move13, channels))
        scale, shift, ops = _merge_affine(alpha, None, stage1)
        self.conv1 = pack_weights(positive)
        self.epilogue1 = Epilogue(scale=scale, shift=shift, ops=ops)
        self.input_bias = _bias_vector(block.move11)
        self.middle_bias = _bias_vector(block.move21)

        signs: List[torch.Tensor] = []
        scales: List[torch.Tensor] = []
        shifts: List[torch.Tensor] = []
        for conv_name, bn_name in block._stage2_names():
            conv, bn = getattr(block, conv_name), getattr(block, bn_name)
            positive, alpha = _plain_sign_conv(conv, 1)
            scale, shift, rest = _merge_affine(alpha, None, _ops(bn, conv.out_channels))
            if rest or shift is None:
                raise UnsupportedLayer("the 1x1 stage's norm is not an affine BatchNorm")
            signs.append(positive)
            scales.append(scale)
            shifts.append(shift)
        out = block.out_channels
        stage2 = ([("residual", None)] + _ops(block.move22, out) + _ops(block.prelu2, out)
                  + _ops(block.move23, out))
        self.conv2 = pack_weights(torch.cat(signs, dim=0))
        self.epilogue2 = Epilogue(scale=torch.cat(scales), shift=torch.cat(shifts), ops=stage2)
        #: shift of the block consuming this block's output (set on the first call that links them)
        self.pack_next: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        return f"ElasticShortcutForward({self.block_repr})"

    def _use_c(self, x: torch.Tensor) -> bool:
        return (self.backend != "torch" and x.device.type == "cpu" and x.dtype == torch.float32
                and _lib.library() is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ElasticShortcutBlock({self.block_repr}) expects [N, {self.in_channels}, H, W], "
                             f"got {tuple(x.shape)}")
        dtype = x.dtype
        x = x.float()
        producer = getattr(x, _PRODUCER_ATTR, None)
        if producer is not None and producer.pack_next is None:
            producer.pack_next = self.input_bias
        use_c = self._use_c(x)
        options = {"num_threads": self.num_threads, "backend": self.backend}
        n, c, h, w = x.shape
        shortcut = avg_pool2x2(x.contiguous(), **options) if self.stride == 2 else x
        oh, ow = shortcut.shape[-2:]
        out1 = torch.empty(n, c, oh, ow)
        middle_bits = torch.empty(n * oh * ow * math.ceil(c / 64), dtype=torch.int64) if use_c else None
        binary_conv2d(x, self.conv1, input_bias=self.input_bias, stride=self.stride, padding=1,
                      epilogue=self.epilogue1, residual=shortcut, out=out1,
                      packed_input=take_packed(x, self.input_bias) if use_c else None,
                      output_bits=middle_bits, output_bits_bias=self.middle_bias, **options)
        out = torch.empty(n, self.out_channels, oh, ow)
        next_bias = self.pack_next if use_c and not out1.is_inference() else None
        out_bits = (torch.empty(n * oh * ow * math.ceil(self.out_channels / 64), dtype=torch.int64)
                    if next_bias is not None else None)
        # a shrinking block's shortcut, the mean of out1's two channel halves, is read by the epilogue
        binary_conv2d(out1, self.conv2, input_bias=self.middle_bias, epilogue=self.epilogue2, residual=out1,
                      residual_halves=self.shrink, out=out, packed_input=middle_bits, output_bits=out_bits,
                      output_bits_bias=next_bias, **options)
        if out_bits is not None:
            attach_packed(out, next_bias, out_bits)
        setattr(out, _PRODUCER_ATTR, self)
        return out if dtype == torch.float32 else out.to(dtype)


def block_layers(block: ElasticShortcutBlock) -> List[Tuple[str, nn.Module]]:
    """(attribute name, module) of every layer whose work the deployed block forward does."""
    names = ["move11", "binary_3x3", "bn1", "move12", "prelu1", "move13", "move21", "move22", "prelu2", "move23"]
    for conv_name, bn_name in block._stage2_names():
        names += [conv_name, bn_name]
    return [(name, getattr(block, name)) for name in names]


def install_block(block: ElasticShortcutBlock, num_threads: Optional[int], backend: str) -> ElasticShortcutForward:
    """Install the fused forward on ``block`` (UnsupportedLayer leaves it untouched).

    Each binary conv also gets its own packed implementation, so calling it directly still runs
    on the engine.
    """
    forward = ElasticShortcutForward(block, num_threads=num_threads, backend=backend)
    convs = [module for _, module in block_layers(block) if isinstance(module, BinaryConv2d)]
    impls = [PackedConv2d(conv, num_threads=num_threads, backend=backend) for conv in convs]
    for conv, impl in zip(convs, impls):
        conv.set_implementation(impl, "packed")
    block.forward = forward
    return forward
