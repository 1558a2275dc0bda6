"""Packed implementations of ``BinaryConv2d`` / ``BinaryLinear``, installed with ``set_implementation``.

``PackedConv2d.from_layer(layer)`` reads what a layer computes — its input binarizer (plain sign,
a per-channel threshold, or XNOR's per-sample scale), its binarized weight (signs and one scale per
output channel), bias, padding value and ``post`` — and packs the weight bits once.  Calling the
object runs the layer's whole forward on the engine.  Modules that directly precede or follow the
layer (a learnable shift before it, BatchNorm / shifts / PReLU / ReLU after it) can be fused into
the packing step and the epilogue (see ``binarize.engine.fusion``).

Numbers: the popcount dot products are exact integers; the epilogue rounds like float32.  The one
place results can differ from the simulated layer: an activation that is exactly 0 after its shift
is +1 here, while ``torch.sign`` (the ``bimatting`` method) gives 0 (likewise a weight exactly equal
to its channel mean).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from binarize.engine.functional import (
    MAX_OPS,
    ChannelMix,
    Epilogue,
    PackedWeights,
    binary_conv2d,
    pack_weights,
)
from binarize.nn.layers import BinaryConv2d, BinaryLinear
from binarize.ops.binarizers import LearnableBias, RPReLU

IMPLEMENTATION_NAME = "packed"

# registry names of activation binarizers whose forward is sign(x) with sign(0) -> +1 or 0
_PLAIN_SIGN = {"sign", "approx_sign", "irnet_activation", "recu_activation", "bimatting_activation"}
_SCALE_TOLERANCE = 1e-5


class UnsupportedLayer(ValueError):
    """The layer computes something the packed engine cannot reproduce exactly (reason in the message)."""


TRACING_MESSAGE = ("a deployed model cannot be traced, compiled or exported (torch.jit.trace, torch.compile, "
                   "torch.export, torch.onnx): its packed "
                   "kernels run in C outside the tracer, so the trace would replay stale buffers; trace or "
                   "export the simulated model (before binarize.deploy) instead")


def refuse_tracing() -> None:
    """Raise a clear error under ``torch.jit.trace`` (the packed kernels are invisible to the tracer)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        raise RuntimeError(TRACING_MESSAGE)


@dataclass
class InputSpec:
    """How the layer binarizes its input: ``sign(x + bias)``, optionally times mean|x| per sample."""

    bias: Optional[torch.Tensor] = None
    sample_scale: bool = False


def input_spec(binarizer: nn.Module) -> InputSpec:
    """Describe an activation binarizer for the engine (UnsupportedLayer if it is not 1-bit sign-like).

    A user binarizer can opt in by defining ``packed_spec() -> {"threshold": Tensor|None,
    "sample_scale": bool}`` (bit = x - threshold >= 0, output optionally scaled by mean|x|).
    """
    if int(getattr(binarizer, "bits", 32)) != 1:
        raise UnsupportedLayer(f"input binarizer {type(binarizer).__name__} is not 1-bit")
    if hasattr(binarizer, "packed_spec"):
        spec = binarizer.packed_spec()
        threshold = spec.get("threshold")
        return InputSpec(None if threshold is None else -threshold.detach().reshape(-1).float(),
                         bool(spec.get("sample_scale", False)))
    name = getattr(binarizer, "registry_name", None)
    if name in _PLAIN_SIGN:
        return InputSpec()
    if name == "rsign":
        return InputSpec(bias=-binarizer.threshold.detach().reshape(-1).float())
    if name == "xnor_activation":
        return InputSpec(sample_scale=True)
    raise UnsupportedLayer(f"input binarizer {type(binarizer).__name__} has no packed equivalent")


def weight_signs_and_scale(layer: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """The binarized weight as (sign booleans, one scale per output channel).

    Runs the layer's weight binarizer once; raises UnsupportedLayer when the result is not
    ``scale_o * (+-1)`` per output channel (zeros, ``torch.sign``'s sign(0), are allowed and become +1).
    """
    if int(getattr(layer.weight_binarizer, "bits", 32)) != 1:
        raise UnsupportedLayer(f"weight binarizer {type(layer.weight_binarizer).__name__} is not 1-bit")
    with torch.no_grad():
        wb = layer.weight_binarizer(layer.weight).detach().float().cpu()
    flat = wb.reshape(wb.shape[0], -1)
    magnitude = flat.abs()
    scale = magnitude.amax(dim=1)
    off_scale = (magnitude - scale[:, None]).abs() > _SCALE_TOLERANCE * scale[:, None]
    if bool((off_scale & (magnitude > 0)).any()):
        raise UnsupportedLayer("the binarized weight is not one scale times +-1 per output channel")
    return wb >= 0, scale


def _channel_vector(module: nn.Module, param: torch.Tensor, channels: int) -> torch.Tensor:
    vector = param.detach().float().reshape(-1)
    if vector.numel() == 1:
        vector = vector.expand(channels)
    if vector.numel() != channels:
        raise UnsupportedLayer(f"{type(module).__name__} has {vector.numel()} channels, expected {channels}")
    return vector.clone()


def epilogue_ops(module: nn.Module, channels: int) -> Optional[List[Tuple[str, Optional[torch.Tensor]]]]:
    """The per-channel epilogue ops equivalent to ``module`` in eval mode, or None if it has none."""
    # exact types only: a subclass (e.g. timm's BatchNormAct2d) may compute more than its parent
    kind = type(module)
    if kind is nn.Identity:
        return []
    if kind is LearnableBias and module.channels == channels:
        return [("add", _channel_vector(module, module.bias, channels))]
    if kind is nn.PReLU:
        if module.num_parameters not in (1, channels):
            return None
        return [("prelu", _channel_vector(module, module.weight, channels))]
    if kind is nn.ReLU:
        return [("relu", None)]
    if kind is nn.Sigmoid:
        return [("sigmoid", None)]
    if kind is nn.Tanh:
        return [("tanh", None)]
    if kind is RPReLU and module.shift_in.channels == channels:
        return [*epilogue_ops(module.shift_in, channels), *epilogue_ops(module.prelu, channels),
                *epilogue_ops(module.shift_out, channels)]
    if kind is nn.BatchNorm2d and not module.training and module.num_features == channels:
        if module.running_mean is None or module.running_var is None:
            return None
        inv_std = torch.rsqrt(module.running_var.detach().float() + module.eps)
        weight = module.weight.detach().float() if module.weight is not None else torch.ones(channels)
        bias = module.bias.detach().float() if module.bias is not None else torch.zeros(channels)
        mul = weight * inv_std
        return [("mul", mul), ("add", bias - module.running_mean.detach().float() * mul)]
    return None


# largest channel mix fused into a binary conv (in x out channels): beyond it a library GEMM is faster
_MAX_MIX = 64 * 64


def foldable_batchnorm(module: nn.Module, channels: int) -> bool:
    """True for an eval-mode, affine ``BatchNorm2d`` over ``channels`` with running statistics."""
    return (type(module) is nn.BatchNorm2d and not module.training and module.num_features == channels
            and module.affine and module.running_mean is not None and module.running_var is not None)


def fold_batchnorm(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The conv weight and bias with an eval BatchNorm after the conv folded in:
    ``w' = w * gamma / sigma``, ``b' = (b - mean) * gamma / sigma + beta``."""
    weight = weight.detach().float()
    bias = bias.detach().float() if bias is not None else torch.zeros(weight.shape[0])
    scale = bn.weight.detach().float() * torch.rsqrt(bn.running_var.detach().float() + bn.eps)
    weight = weight * scale.view(-1, *[1] * (weight.dim() - 1))
    bias = (bias - bn.running_mean.detach().float()) * scale + bn.bias.detach().float()
    return weight, bias


def is_pointwise(conv: nn.Conv2d) -> bool:
    """True for an unpadded, ungrouped 1x1 / stride-1 conv: one matrix product per pixel."""
    return (conv.kernel_size == (1, 1) and tuple(conv.stride) == (1, 1) and conv.groups == 1
            and not any(conv._reversed_padding_repeated_twice))


def channel_mix(modules: Tuple[nn.Module, ...], channels: int) -> Tuple[Optional[ChannelMix], int]:
    """A pointwise full-precision conv (with a BatchNorm and ReLU after it, optionally) at the head of
    ``modules`` as a :class:`ChannelMix` on ``channels`` inputs, and how many modules it covers."""
    if not modules:
        return None, 0
    conv = modules[0]
    if (type(conv) is not nn.Conv2d or not is_pointwise(conv) or conv.in_channels != channels
            or conv.in_channels * conv.out_channels > _MAX_MIX):
        return None, 0
    weight = conv.weight.detach().float()[:, :, 0, 0]
    bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
    used = 1
    if len(modules) > used and foldable_batchnorm(modules[used], conv.out_channels):
        weight, bias = fold_batchnorm(weight, bias, modules[used])
        used += 1
    relu = len(modules) > used and type(modules[used]) is nn.ReLU
    return ChannelMix(weight, bias, relu), used + int(relu)


def _merge_affine(scale: torch.Tensor, shift: Optional[torch.Tensor], ops: list) -> tuple:
    """Fold leading mul/add ops into (scale, shift) so the common case costs one multiply-add."""
    ops = list(ops)
    while ops and ops[0][0] in ("mul", "add"):
        name, arg = ops.pop(0)
        if name == "mul":
            scale = scale * arg
            shift = shift * arg if shift is not None else None
        else:
            shift = arg.clone() if shift is None else shift + arg
    return scale, shift, ops


class PackedConv2d:
    """Callable that runs a ``BinaryConv2d`` (and fused neighbours) on packed bits.

    Not an ``nn.Module`` on purpose: it lives outside the module tree, so the deployed model keeps
    its structure and state_dict keys.  ``num_threads`` None follows ``torch.get_num_threads()``.
    """

    implementation_name = IMPLEMENTATION_NAME

    def __init__(self, layer: BinaryConv2d, *, input_bias: Optional[torch.Tensor] = None,
                 tail: Tuple[nn.Module, ...] = (), num_threads: Optional[int] = None,
                 backend: str = "auto") -> None:
        left, right, top, bottom = layer._explicit_padding
        if left != right or top != bottom:
            raise UnsupportedLayer("asymmetric 'same' padding is not supported by the packed engine")
        padding = (top, left)
        self.spec = input_spec(layer.input_binarizer)
        if input_bias is not None:
            if self.spec.bias is not None:
                raise UnsupportedLayer("cannot fuse a shift into a thresholded input binarizer")
            self.spec.bias = input_bias.detach().float().reshape(-1).clone()
        positive, alpha = weight_signs_and_scale(layer)
        self.weights: PackedWeights = pack_weights(positive, layer.groups)
        self.stride = tuple(layer.stride)
        self.dilation = tuple(layer.dilation)
        self.padding = padding
        self.padding_mode = layer.padding_mode
        self.pad_value = float(layer.pad_value)
        if self.padding_mode == "zeros" and self.pad_value not in (0.0, 1.0, -1.0):
            raise UnsupportedLayer(f"pad_value {self.pad_value} is not 0 or +-1")
        if self.spec.sample_scale and self.pad_value != 0.0 and any(padding):
            raise UnsupportedLayer("XNOR-scaled inputs with +-1 padding are not representable")
        self.num_threads = num_threads
        self.backend = backend
        channels = layer.out_channels
        bias = layer.bias.detach().float().clone() if layer.bias is not None else None
        ops: list = []
        self.torch_post: Optional[nn.Module] = None
        self.fused = 0  # how many modules of ``tail`` the epilogue computes (the caller skips them)
        if self.spec.sample_scale:
            # mean|x| multiplies the whole dot product: the bias and post run in torch after it
            self.epilogue = Epilogue(scale=alpha)
            self.bias = bias
            self.torch_post = None if isinstance(layer.post, nn.Identity) else layer.post
            return
        post_ops = epilogue_ops(layer.post, channels)
        if post_ops is None:
            self.torch_post = layer.post
            tail = ()
        else:
            ops.extend(post_ops)
        scale, shift, ops = _merge_affine(alpha, bias, ops)
        for module in tail:
            extra = epilogue_ops(module, channels)
            if extra is None:
                break
            candidate = _merge_affine(scale, shift, ops + extra) if not ops else (scale, shift, ops + extra)
            if len(candidate[2]) > MAX_OPS:
                break
            scale, shift, ops = candidate
            self.fused += 1
        if len(ops) > MAX_OPS:
            raise UnsupportedLayer(f"the post module needs {len(ops)} epilogue ops, the kernel takes {MAX_OPS}")
        # a pointwise float conv right after the ops is computed on each tile too (its input map,
        # this layer's output, is then never written)
        mix, used = channel_mix(tuple(tail)[self.fused:], channels)
        self.fused += used
        self.bias = None
        self.epilogue = Epilogue(scale=scale, shift=shift, ops=ops, mix=mix)

    def __call__(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None,
                 zero_rest: bool = True, packed_input: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None, accumulate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer's output (and the fused tail's) for x [N, C, H, W] or [C, H, W].

        ``positions`` (flattened ``n*OH*OW + pixel``) computes only those outputs; the rest are 0
        (uninitialized with ``zero_rest=False``, for callers that read only those outputs).
        ``packed_input``: ``x`` already packed with this layer's input shift (``x`` then only gives
        the shape, see ``binary_conv2d``).  ``out`` and ``accumulate`` (batched input, positions,
        everything after the conv fused): ``out = y * accumulate + out`` at the positions, in place.
        """
        refuse_tracing()
        if packed_input is not None and (self.spec.sample_scale or self.padding_mode != "zeros"):
            raise ValueError("packed_input needs a plain-sign input binarizer and zero padding")
        if accumulate is not None and (self.spec.sample_scale or self.torch_post is not None or x.dim() != 4
                                       or out is None):
            raise ValueError("accumulate needs a batched input, out, and a layer whose post-ops are all fused")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        dtype = x.dtype
        padding = self.padding
        if self.padding_mode != "zeros" and any(padding):
            # non-zero padding modes pad the float input before binarization, like the simulation
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), mode=self.padding_mode)
            padding = (0, 0)
        floats = x if dtype == torch.float32 else x.float()  # (a no-op .float() is a dispatcher call)
        y = binary_conv2d(floats, self.weights, input_bias=self.spec.bias, stride=self.stride,
                          padding=padding, dilation=self.dilation, pad_value=self.pad_value,
                          epilogue=self.epilogue, positions=positions, num_threads=self.num_threads,
                          backend=self.backend, zero_rest=zero_rest or positions is None,
                          packed_input=packed_input, out=out, accumulate=accumulate)
        if self.spec.sample_scale:
            shifted = x if self.spec.bias is None else x + self.spec.bias.to(x.device).view(1, -1, 1, 1)
            y = y * shifted.float().abs().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
            if self.bias is not None:
                y = y + self.bias.to(y.device).view(1, -1, 1, 1)
        if self.torch_post is not None:
            y = self.torch_post(y)
        if dtype != torch.float32:  # the kernels and the float post-ops give float32
            y = y.to(dtype)
        return y.squeeze(0) if unbatched else y


class PackedLinear:
    """Callable that runs a ``BinaryLinear`` on packed bits (a 1x1 binary convolution over rows)."""

    implementation_name = IMPLEMENTATION_NAME

    def __init__(self, layer: BinaryLinear, *, num_threads: Optional[int] = None, backend: str = "auto") -> None:
        self.spec = input_spec(layer.input_binarizer)
        channel_dim = getattr(layer.input_binarizer, "channel_dim", -1)
        if channel_dim not in (-1, None) and self.spec.bias is not None:
            raise UnsupportedLayer("BinaryLinear with a threshold on a non-last channel dim")
        positive, alpha = weight_signs_and_scale(layer)
        self.weights = pack_weights(positive[:, :, None, None], 1)
        self.num_threads = num_threads
        self.backend = backend
        bias = layer.bias.detach().float().clone() if layer.bias is not None else None
        post_ops = epilogue_ops(layer.post, layer.out_features) if not self.spec.sample_scale else None
        self.torch_post = None if post_ops is not None else layer.post
        if self.spec.sample_scale:
            self.epilogue, self.bias = Epilogue(scale=alpha), bias
        else:
            scale, shift, ops = _merge_affine(alpha, bias, list(post_ops))
            self.epilogue, self.bias = Epilogue(scale=scale, shift=shift, ops=ops), None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        refuse_tracing()
        dtype = x.dtype
        rows = x.reshape(-1, x.shape[-1]).float()
        y = binary_conv2d(rows[:, :, None, None], self.weights, input_bias=self.spec.bias,
                          epilogue=self.epilogue, num_threads=self.num_threads, backend=self.backend)
        y = y.reshape(*x.shape[:-1], self.weights.out_channels)
        if self.spec.sample_scale:
            # XNOR's per-sample scale: mean |x| over every non-batch dim of the original input
            scale = x.float().abs().mean(dim=list(range(1, x.dim())), keepdim=True)
            y = y * scale
            if self.bias is not None:
                y = y + self.bias.to(y.device)
        if self.torch_post is not None:
            y = self.torch_post(y)
        return y if y.dtype == dtype else y.to(dtype)
