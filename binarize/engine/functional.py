"""Packed binary convolution on tensors: weight packing, fused sign+pack, XNOR-popcount conv.

Two backends give the same numbers: the compiled kernels (``_bitconv``, through ctypes) and a
pure-PyTorch fallback that convolves the +-1 signs in float and rounds the (exact) integer dot
products.  Activations are binarized as ``x + bias >= 0 -> +1`` (the engine has no zero), weights
arrive as sign booleans with their per-output-channel scale folded into the epilogue.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from binarize.engine import _lib

OUT_BLOCK = 8  # output channels interleaved in the packed weights (OB in csrc/bitconv.h)
PAD_MODES = {0.0: 0, 1.0: 1, -1.0: -1}
OP_CODES = {"add": 1, "mul": 2, "prelu": 3, "relu": 4, "residual": 5, "sigmoid": 6, "tanh": 7}
MAX_OPS = 8

Pair = Tuple[int, int]


@dataclass
class PackedWeights:
    """Sign bits of a conv weight in the kernel layout [G][OGP/8][LW][8] plus what padding needs.

    ``words`` holds the bits of each output channel's taps back to back (tap-major, channels
    inner); ``tap_popcount[o, t]`` is the number of +1 weights of tap t (the zero-padding
    correction); ``signs`` keeps the +-1 float weight for the PyTorch fallback.  ``nibble_tables``
    feeds the AVX2 table kernel (see :func:`nibble_tables`); ``dense_tables`` builds it on the
    first dense call that can use it, so layers that only run sparse never hold it.
    """

    words: torch.Tensor
    tap_popcount: torch.Tensor
    signs: torch.Tensor
    out_channels: int
    groups: int
    kernel_size: Pair
    nibble_tables: Optional[torch.Tensor] = None
    plans: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def in_channels_per_group(self) -> int:
        return self.signs.shape[1]

    @property
    def padded_out_per_group(self) -> int:
        return self.tap_popcount.shape[0] // self.groups

    def dense_tables(self) -> Optional[torch.Tensor]:
        """The nibble tables for a dense call, or None where the table kernel does not apply
        (groups, 1x1 kernels, another kernel selected); built once.  Tables of up to
        ``OWN_TABLES_MAX_BYTES`` are the layer's own (16 bytes per 4 weight bits); larger layers
        keep 1-byte selectors of 16 shared tables instead, so their weights stay in the L2 cache."""
        if self.nibble_tables is None and self.groups == 1 and self.kernel_size != (1, 1) \
                and _lib.active_kernel() == "avx2_nibble":
            bits = _tap_major_bits(self.signs > 0, 1, self.padded_out_per_group)
            taps = self.kernel_size[0] * self.kernel_size[1]
            own_bytes = bits.shape[1] * taps * math.ceil(self.in_channels_per_group / 4) * 16
            self.nibble_tables = nibble_tables(bits[0], taps, selectors=own_bytes > OWN_TABLES_MAX_BYTES)
        return self.nibble_tables

    def __getstate__(self) -> dict:
        # call plans hold raw addresses of this object's tensors: a copy builds its own
        state = dict(self.__dict__)
        state["plans"] = {}
        return state


def _tap_major_bits(positive: torch.Tensor, groups: int, padded_out: int) -> torch.Tensor:
    """Weight signs [O, C/groups, KH, KW] (True = +1) as [groups, padded_out, KH*KW*C/groups] bits,
    tap-major with channels inner; padded output channels are all -1 (their results are discarded)."""
    out_channels, cg, kh, kw = positive.shape
    bits = positive.detach().to("cpu", torch.bool).permute(0, 2, 3, 1).reshape(groups, out_channels // groups,
                                                                                 kh * kw * cg)
    return F.pad(bits, (0, 0, 0, padded_out - out_channels // groups))


def _pack_words(bits: torch.Tensor) -> np.ndarray:
    """Boolean CPU tensor [..., K] -> uint64 words [..., ceil(K/64)], bit i of word j = element
    64*j + i (little-endian), tail bits zero."""
    bits = F.pad(bits, (0, math.ceil(bits.shape[-1] / 64) * 64 - bits.shape[-1]))
    return np.packbits(bits.numpy(), axis=-1, bitorder="little").view(np.uint64)


_NIBBLE_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(16)], dtype=torch.uint8)

#: a layer whose own nibble tables would take more bytes than this keeps 1-byte selectors of the
#: kernel's 16 shared tables instead: tables that outgrow the L2 cache (512 KB per core here, shared
#: with the planes and the outputs) are re-read from L3 or memory for every tile, which cost the
#: 256 -> 256 layer 14%, while the extra load per look-up costs small layers 2-5%
OWN_TABLES_MAX_BYTES = 192 * 1024


def nibble_tables(bits: torch.Tensor, taps: int, selectors: bool = False) -> torch.Tensor:
    """Look-up tables of the AVX2 table kernel from weight bits [OGP, taps * C] (True = +1).

    Entry ``i`` of output ``o``, tap ``t``, nibble ``k`` (channels 4k..4k+3) is
    ``popcount(i XOR w)`` with ``w`` the 4 weight bits there, so one byte shuffle counts 4 channels
    of 32 pixels.  Layout [OGP/4][taps][ceil(C/4)][4][16] uint8 (4 outputs side by side).  With
    ``selectors`` each 16-byte table is replaced by ``16 * w``, its offset among the kernel's 16
    shared tables (row ``w`` holds ``popcount(i XOR w)``): [OGP/4][taps][ceil(C/4)][4], a 16th of
    the bytes for one more load per look-up.
    """
    ogp = bits.shape[0]
    channels = bits.shape[1] // taps
    nibbles = math.ceil(channels / 4)
    b = F.pad(bits.reshape(ogp, taps, channels), (0, 4 * nibbles - channels)).reshape(ogp, taps, nibbles, 4)
    weight = (b.to(torch.int64) << torch.arange(4)).sum(-1)
    if selectors:
        return (16 * weight).to(torch.uint8).reshape(ogp // 4, 4, taps, nibbles).permute(0, 2, 3, 1).contiguous()
    table = _NIBBLE_POPCOUNT[torch.arange(16) ^ weight[..., None]]
    return table.reshape(ogp // 4, 4, taps, nibbles, 16).permute(0, 2, 3, 1, 4).contiguous()


def pack_weights(positive: torch.Tensor, groups: int = 1) -> PackedWeights:
    """Pack a boolean weight-sign tensor [O, C/groups, KH, KW] (True = +1) once, at deploy."""
    if positive.dim() != 4:
        raise ValueError(f"pack_weights expects a 4-D [O, C/groups, KH, KW] tensor, got {tuple(positive.shape)}")
    out_channels, cg, kh, kw = positive.shape
    if out_channels % groups:
        raise ValueError(f"out_channels={out_channels} is not divisible by groups={groups}")
    og = out_channels // groups
    ogp = math.ceil(og / OUT_BLOCK) * OUT_BLOCK
    taps = kh * kw
    bits = _tap_major_bits(positive, groups, ogp)
    n_words = math.ceil(taps * cg / 64)
    packed = _pack_words(bits)  # tail bits are zero, as in the activations
    packed = packed.reshape(groups, ogp // OUT_BLOCK, OUT_BLOCK, n_words).transpose(0, 1, 3, 2)
    words = torch.from_numpy(np.ascontiguousarray(packed).view(np.int64).copy())
    tap_popcount = bits[..., : taps * cg].reshape(groups, ogp, taps, cg).sum(-1, dtype=torch.int32)
    signs = positive.detach().to("cpu", torch.float32) * 2 - 1
    return PackedWeights(
        words=words,
        tap_popcount=tap_popcount.reshape(groups * ogp, taps).contiguous(),
        signs=signs.contiguous(),
        out_channels=out_channels,
        groups=groups,
        kernel_size=(kh, kw),
    )


@dataclass
class ChannelMix:
    """A full-precision 1x1 convolution fused after an epilogue's ops: ``y' = weight @ y + bias``
    per pixel, then ReLU if ``relu`` (a binary conv followed by a small pointwise float conv, as in
    BiMatting's output block).  The C kernels compute it on each tile while its outputs are in
    cache, so the binary conv's own output map is never written; sums round in another order than
    PyTorch's (float rounding, like any two GEMMs)."""

    weight: torch.Tensor
    bias: torch.Tensor
    relu: bool = False

    def __post_init__(self) -> None:
        self.weight = self.weight.detach().to("cpu", torch.float32).contiguous()
        if self.weight.dim() != 2:
            raise ValueError(f"a channel mix weight is [out, in], got shape {tuple(self.weight.shape)}")
        self.bias = _vector(self.bias)
        if self.bias.numel() != self.weight.shape[0]:
            raise ValueError(f"a channel mix of {self.weight.shape[0]} outputs needs as many biases, "
                             f"got {self.bias.numel()}")

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    def apply_torch(self, y: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(y.device, y.dtype)[:, :, None, None]
        y = F.conv2d(y, weight, self.bias.to(y.device, y.dtype))
        return y.clamp_min(0) if self.relu else y


@dataclass
class Epilogue:
    """Per-output-channel float work fused after the integer dot product.

    ``y = dot * scale + shift`` (two roundings, no FMA), then each op of ``ops`` in order:
    ("add", v), ("mul", v), ("prelu", slope) with per-channel vectors, ("relu", None), or
    ("residual", None): add the float map passed to the conv as ``residual`` (a shortcut),
    ("sigmoid", None) or ("tanh", None) (the C kernels' vectorised versions are within ~2 ulp of
    PyTorch's, like any two libm implementations).  ``mix``: a :class:`ChannelMix` after the ops
    (the conv then returns ``mix.out_channels`` channels).
    """

    scale: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None
    ops: List[Tuple[str, Optional[torch.Tensor]]] = field(default_factory=list)
    mix: Optional[ChannelMix] = None

    def __post_init__(self) -> None:
        if len(self.ops) > MAX_OPS:
            raise ValueError(f"an epilogue takes at most {MAX_OPS} ops, got {len(self.ops)}")
        for name, _ in self.ops:
            if name not in OP_CODES:
                raise ValueError(f"unknown epilogue op {name!r}; available: {', '.join(OP_CODES)}")
        self.scale = _vector(self.scale)
        self.shift = _vector(self.shift)
        self.ops = [(name, _vector(arg)) for name, arg in self.ops]
        self._c_args = None
        self._without_mix: Optional[Epilogue] = None

    def c_arguments(self) -> tuple:
        """ctypes arrays describing the ops (built once and cached)."""
        if self._c_args is None:
            codes = (ctypes.c_int * MAX_OPS)(*[OP_CODES[name] for name, _ in self.ops])
            pointers = (ctypes.c_void_p * MAX_OPS)(
                *[arg.data_ptr() if arg is not None else None for _, arg in self.ops]
            )
            self._c_args = (len(self.ops), codes, pointers)
        return self._c_args

    def apply_torch(self, dot: torch.Tensor, channel_dim: int = 1,
                    residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same arithmetic as the C epilogue, on a float tensor of dot products."""
        shape = [1] * dot.dim()
        shape[channel_dim] = -1

        def vec(value: torch.Tensor) -> torch.Tensor:
            return value.to(dot.device).view(shape)

        y = dot
        if self.scale is not None:
            y = y * vec(self.scale)
        if self.shift is not None:
            y = y + vec(self.shift)
        for name, arg in self.ops:
            if name == "add":
                y = y + vec(arg)
            elif name == "mul":
                y = y * vec(arg)
            elif name == "prelu":
                y = torch.where(y >= 0, y, y * vec(arg))
            elif name == "residual":
                y = y + _repeat_channels(residual, y.shape[1])
            elif name == "sigmoid":
                y = torch.sigmoid(y)
            elif name == "tanh":
                y = torch.tanh(y)
            else:
                y = torch.where(y > 0, y, torch.zeros((), dtype=y.dtype, device=y.device))
        return y if self.mix is None else self.mix.apply_torch(y)

    def without_mix(self) -> Epilogue:
        """The same epilogue up to its ops (no channel mix); made once, so that calls through it
        (grouped or sparse convs with a mix) reuse one object and its call plans."""
        if self.mix is None:
            return self
        if self._without_mix is None:
            self._without_mix = Epilogue(scale=self.scale, shift=self.shift, ops=list(self.ops))
        return self._without_mix

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_c_args"] = None
        state["_without_mix"] = None
        return state

    def __deepcopy__(self, memo: dict) -> Epilogue:
        import copy

        clone = Epilogue.__new__(Epilogue)
        clone.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        return clone


def _repeat_channels(residual: Optional[torch.Tensor], channels: int) -> torch.Tensor:
    """The residual operand for ``channels`` outputs: output channel o reads channel o % RC."""
    if residual is None:
        raise ValueError("the epilogue has a 'residual' op but no residual tensor was given")
    repeats = channels // residual.shape[1]
    return residual if repeats == 1 else residual.repeat(1, repeats, 1, 1)


def _vector(value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-channel vector as a contiguous float32 CPU tensor (itself when it already is one: this
    runs on every kernel call)."""
    if value is None:
        return None
    if (value.dim() == 1 and value.dtype == torch.float32 and value.device.type == "cpu"
            and not value.requires_grad and value.is_contiguous()):
        return value
    return value.detach().to("cpu", torch.float32).reshape(-1).contiguous()


_NO_EPILOGUE = Epilogue()  # the epilogue of a call that gives none (one object: it keys call plans)


def _pair(value) -> Pair:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _num_threads(num_threads: Optional[int]) -> int:
    return int(num_threads) if num_threads else torch.get_num_threads()


def _flat_pixels(x: torch.Tensor) -> torch.Tensor:
    """float32 [N, C, H, W] whose pixels are one evenly strided axis (contiguous and channels-last
    inputs as they are), as the kernels address them: x[n*s0 + c*s1 + pixel*s3]."""
    if x.dtype != torch.float32:
        x = x.float()
    if x.stride(2) != x.shape[3] * x.stride(3):
        x = x.contiguous()
    return x


def pack_activations(x: torch.Tensor, bias: Optional[torch.Tensor], groups: int,
                     num_threads: Optional[int] = None) -> torch.Tensor:
    """Fused ``x + bias >= 0`` and pack: [N, C, H, W] float -> int64 words [N, H*W, G, ceil(C/G/64)].

    Needs the compiled library.  Contiguous and channels-last inputs are read in place.
    """
    lib = _lib.library()
    if lib is None:
        raise RuntimeError("pack_activations needs the compiled kernels (binarize.engine.available())")
    n, c, h, w = x.shape
    x = _flat_pixels(x)
    words_per_group = math.ceil(c // groups / 64)
    out = torch.empty(n * h * w * groups * words_per_group + 1, dtype=torch.int64)
    bias_ptr = None
    if bias is not None:
        bias = _vector(bias)
        bias_ptr = bias.data_ptr()
    lib.bz_pack(x.data_ptr(), n, c, h * w, x.stride(0), x.stride(1), x.stride(3), bias_ptr, groups,
                out.data_ptr(), _num_threads(num_threads))
    return out[:-1].view(n, h * w, groups, words_per_group)


def pack_activations_torch(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``pack_activations`` (one group) without the compiled library: the same int64 words."""
    n, c, h, w = x.shape
    if bias is not None:
        x = x + _vector(bias).to(x.device).view(1, -1, 1, 1)
    packed = _pack_words((x >= 0).permute(0, 2, 3, 1).reshape(n, h * w, c).cpu())
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int64)).reshape(n, h * w, 1, -1)


def binary_conv2d(
    x: torch.Tensor,
    weights: PackedWeights,
    *,
    input_bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    pad_value: float = 0.0,
    epilogue: Optional[Epilogue] = None,
    positions: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    num_threads: Optional[int] = None,
    backend: str = "auto",
    zero_rest: bool = True,
    residual: Optional[torch.Tensor] = None,
    packed_input: Optional[torch.Tensor] = None,
    output_bits: Optional[torch.Tensor] = None,
    output_bits_bias: Optional[torch.Tensor] = None,
    accumulate: Optional[torch.Tensor] = None,
    residual_halves: bool = False,
) -> torch.Tensor:
    """Binary convolution ``epilogue(conv(sign(x + input_bias), sign(W)))`` of a [N, C, H, W] input.

    Padded positions hold ``pad_value`` in the binarized domain: 0 (exact zero padding: they
    contribute nothing) or +-1.  ``positions`` (int64, flattened ``n*OH*OW + oh*OW + ow``) limits the
    work to those outputs; the others keep the values of ``out`` (zeros when ``out`` is None, left
    uninitialized with ``zero_rest=False`` for callers that read only the listed outputs).
    ``backend``: "auto" (C when built), "c" or "torch".

    Fusion with neighbours (C backend; the torch backend gives the same floats):
    ``residual`` [N, RC, OH, OW] (RC divides the output channels) is the operand of the epilogue's
    ("residual", None) ops (with ``residual_halves`` it has 2 * RC channels and the operand is the
    mean of its two halves, ``(r[:, :RC] + r[:, RC:]) / 2``: a shrinking block's shortcut);
    ``packed_input`` is ``pack_activations(x, input_bias)`` made earlier (skips packing; ``x`` still
    gives the shape and may be a ``meta`` tensor); ``output_bits`` (int64, ``N * OH*OW * ceil(O/64)``
    words, dense calls without groups) receives the output packed again for the next binary layer,
    bit = ``y + output_bits_bias >= 0``.  ``accumulate`` (float32, ``N * OH*OW`` values, e.g. a
    [N, 1, OH, OW] mask; with ``positions``) adds instead of storing: ``out = y * accumulate + out``
    at the listed positions, a sparse-assisted pair's masked sum with the same rounding as the two
    torch operations.  Returns the float output.
    """
    # a dense call shaped like an earlier one reuses its checked arguments (its plan, see _ConvPlan)
    key = None
    if positions is None and accumulate is None and backend != "torch":
        key = _plan_key(x, input_bias, stride, padding, dilation, pad_value, epilogue, out, num_threads, backend,
                        residual, packed_input, output_bits, output_bits_bias, residual_halves)
        try:
            plan = weights.plans.get(key) if key is not None else None
        except TypeError:  # unhashable arguments: no plan
            key = plan = None
        if plan is not None:
            return plan.run(x, packed_input, out, residual, output_bits)
    if x.dim() != 4:
        raise ValueError(f"binary_conv2d expects a 4-D [N, C, H, W] input, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    groups = weights.groups
    cg = weights.in_channels_per_group
    if c != cg * groups:
        raise ValueError(f"input has {c} channels, the packed weight expects {cg * groups}")
    if float(pad_value) not in PAD_MODES:
        raise ValueError(f"pad_value must be 0, 1 or -1 in the binarized domain, got {pad_value}")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = weights.kernel_size
    oh = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input {h}x{w} is too small for kernel {kh}x{kw} with padding {padding}")
    epilogue = epilogue or _NO_EPILOGUE
    out_channels = weights.out_channels
    if epilogue.mix is not None:
        if epilogue.mix.in_channels != weights.out_channels:
            raise ValueError(f"the channel mix takes {epilogue.mix.in_channels} channels, the conv gives "
                             f"{weights.out_channels}")
        if output_bits is not None:
            raise ValueError("output_bits cannot follow a channel mix")
        out_channels = epilogue.mix.out_channels
    # with packed_input, x may be a 'meta' tensor that only gives the shape (nothing was built)
    device = packed_input.device if packed_input is not None and x.device.type == "meta" else x.device
    if out is None:
        allocate = torch.zeros if positions is not None and zero_rest else torch.empty
        out = allocate(n, out_channels, oh, ow, device=device)
    elif out.shape != (n, out_channels, oh, ow) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {(n, out_channels, oh, ow)}")
    if backend not in ("auto", "c", "torch"):
        raise ValueError(f"backend must be 'auto', 'c' or 'torch', got {backend!r}")
    if backend == "c" and device.type != "cpu":
        raise ValueError(f"the C kernels run on the CPU; the input is on {device}")
    # the kernels read CPU memory; tensors on other devices take the (same-result) torch path
    use_c = device.type == "cpu" and (backend == "c" or (backend == "auto" and _lib.library() is not None))
    if x.device.type == "meta" and not use_c:
        raise ValueError("a 'meta' input (shape only) needs packed_input and the C kernels")
    if residual is not None:
        operand_channels = residual.shape[1] // 2 if residual_halves else residual.shape[1]
        if residual.device != device:
            raise ValueError(f"residual is on {residual.device}, the input on {device}")
        if (residual.shape[0] != n or residual.shape[2:] != (oh, ow) or operand_channels == 0
                or weights.out_channels % operand_channels or (residual_halves and residual.shape[1] % 2)):
            raise ValueError(f"residual of shape {tuple(residual.shape)} does not fit the output "
                             f"{(n, weights.out_channels, oh, ow)}")
        residual = residual.float().contiguous()
        if residual_halves and not use_c:
            residual = (residual[:, :operand_channels] + residual[:, operand_channels:]) / 2
            residual_halves = False
    elif any(name == "residual" for name, _ in epilogue.ops):
        raise ValueError("the epilogue has a 'residual' op but no residual tensor was given")
    if output_bits is not None and (positions is not None or groups != 1):
        raise ValueError("output_bits needs a dense call (no positions) without groups")
    if accumulate is not None:
        if positions is None or epilogue.mix is not None:
            raise ValueError("accumulate needs positions and no channel mix")
        if accumulate.numel() != n * oh * ow:
            raise ValueError(f"accumulate has {accumulate.numel()} values, expected one per output pixel "
                             f"({n * oh * ow})")
        accumulate = accumulate.to(device=device, dtype=torch.float32).contiguous()
    if use_c and epilogue.mix is not None and (positions is not None or groups != 1):
        # the kernels mix channels on dense ungrouped tiles only: mix the binary conv's output here
        y = binary_conv2d(x, weights, input_bias=input_bias, stride=stride, padding=padding, dilation=dilation,
                          pad_value=pad_value, epilogue=epilogue.without_mix(), positions=positions,
                          num_threads=num_threads, backend=backend, zero_rest=False, residual=residual,
                          packed_input=packed_input, residual_halves=residual_halves)
        return _scatter(out, epilogue.mix.apply_torch(y), positions)
    args = (x, weights, input_bias, stride, padding, dilation, pad_value, epilogue, positions, out, residual)
    if use_c:
        return _conv_c(*args, num_threads=_num_threads(num_threads), packed_input=packed_input,
                       output_bits=output_bits, output_bits_bias=output_bits_bias, accumulate=accumulate,
                       residual_halves=residual_halves, key=key)
    y = _conv_torch(*args, accumulate=accumulate)
    if output_bits is not None:
        output_bits.copy_(pack_activations_torch(y, output_bits_bias).reshape(output_bits.shape))
    return y


def _conv_c(x, weights, input_bias, stride, padding, dilation, pad_value, epilogue, positions, out, residual,
            num_threads: int, packed_input: Optional[torch.Tensor] = None,
            output_bits: Optional[torch.Tensor] = None,
            output_bits_bias: Optional[torch.Tensor] = None,
            accumulate: Optional[torch.Tensor] = None, residual_halves: bool = False,
            key: Optional[tuple] = None) -> torch.Tensor:
    lib = _lib.library()
    if lib is None:
        raise RuntimeError("backend='c' requested but the compiled kernels are not available")
    n, c, h, w = x.shape
    words = n * h * w * weights.groups * math.ceil(c // weights.groups / 64)
    floats = floats_bias = None  # float input: the kernel binarizes it (x + input_bias >= 0) itself
    # what the plan's key names by identity and its template by address, held alive with it
    keep = [weights, weights.words, weights.tap_popcount, epilogue, epilogue.scale, epilogue.shift, input_bias,
            output_bits_bias]
    if packed_input is not None:
        if packed_input.dtype != torch.int64 or packed_input.numel() != words or not packed_input.is_contiguous():
            raise ValueError(f"packed_input must be {words} contiguous int64 words for input {tuple(x.shape)}")
    else:
        floats = _flat_pixels(x)
        floats_bias = _vector(input_bias) if input_bias is not None else None
        if floats is not x or floats_bias is not input_bias:
            key = None  # converted copies: a later call must convert its own
    bits_bias_ptr = None
    if output_bits is not None:
        expected = n * out.shape[2] * out.shape[3] * math.ceil(weights.out_channels / 64)
        if output_bits.dtype != torch.int64 or output_bits.numel() != expected or not output_bits.is_contiguous():
            raise ValueError(f"output_bits must be {expected} contiguous int64 words")
        if output_bits_bias is not None:
            bits_bias = _vector(output_bits_bias)
            if bits_bias.numel() != weights.out_channels:
                raise ValueError(f"output_bits_bias has {bits_bias.numel()} values, expected "
                                 f"{weights.out_channels}")
            if bits_bias is not output_bits_bias:
                keep.append(bits_bias)
                key = None
            bits_bias_ptr = bits_bias.data_ptr()
    if positions is not None:
        positions = positions.to(torch.int64).contiguous()
        if positions.numel() == 0:
            return out
    kh, kw = weights.kernel_size
    nops, codes, pointers = epilogue.c_arguments()
    mix = epilogue.mix
    tables = weights.dense_tables() if positions is None else None
    keep += [tables, floats_bias] + ([mix.weight, mix.bias] if mix is not None else [])
    template = (
        None, None,  # _IN, _FLOATS: the call's packed words or floats
        *((floats.stride(0), floats.stride(1), floats.stride(3)) if floats is not None else (0, 0, 0)),
        floats_bias.data_ptr() if floats_bias is not None else None,
        n, h, w, weights.groups, weights.in_channels_per_group,
        weights.words.data_ptr(), weights.tap_popcount.data_ptr(),
        tables.data_ptr() if tables is not None else None,
        (16 if tables.dim() == 5 else 1) if tables is not None else 0, weights.out_channels,
        weights.padded_out_per_group, kh, kw, stride[0], stride[1], padding[0], padding[1],
        dilation[0], dilation[1], PAD_MODES[float(pad_value)], out.shape[2], out.shape[3],
        epilogue.scale.data_ptr() if epilogue.scale is not None else None,
        epilogue.shift.data_ptr() if epilogue.shift is not None else None,
        nops, codes, pointers,
        None,  # _RESIDUAL
        (residual.shape[1] >> int(residual_halves)) if residual is not None else 0, int(residual_halves),
        None, None, 0, None,  # _OUT, _POSITIONS, npos, _ACCUMULATE
        None,  # _OUT_BITS
        bits_bias_ptr,
        mix.weight.data_ptr() if mix is not None else None, mix.bias.data_ptr() if mix is not None else None,
        mix.out_channels if mix is not None else 0, int(mix.relu) if mix is not None else 0,
        num_threads,
    )
    plan = _ConvPlan(lib.bz_conv, template, tuple(out.shape), tuple(keep))
    if key is not None:
        if len(weights.plans) >= MAX_PLANS:
            weights.plans.clear()
        weights.plans[key] = plan
    return plan.run(floats, packed_input, out, residual, output_bits, positions, accumulate)


# where bz_conv takes the tensors that change from call to call
_IN, _FLOATS, _RESIDUAL, _OUT, _POSITIONS, _NPOS, _ACCUMULATE, _OUT_BITS = 0, 1, 33, 36, 37, 38, 39, 40
MAX_PLANS = 8  # call plans kept per layer (a layer sees one or two input shapes in a video)


@dataclass(eq=False)
class _ConvPlan:
    """A checked ``bz_conv`` argument list with the call's own tensors left out.

    ``binary_conv2d`` checks and converts every argument on a layer's first call of a kind; the
    plan keeps the result under a key of everything checked (shapes, dtypes, devices, layouts,
    and the identities of the layer's constant tensors, which ``keep`` holds alive), so a later
    dense call of that kind only allocates its output and calls the kernel.  Python's checks
    would otherwise be up to 40% of a small layer's time (see docs/performance.md).
    """

    call: Callable[..., int]
    template: tuple
    out_shape: tuple
    keep: tuple

    def run(self, x, packed_input, out, residual, output_bits, positions=None, accumulate=None) -> torch.Tensor:
        if out is None:
            out = torch.empty(self.out_shape)
        args = list(self.template)
        if packed_input is not None:
            args[_IN] = packed_input.data_ptr()
        else:
            args[_FLOATS] = x.data_ptr()
        args[_OUT] = out.data_ptr()
        if residual is not None:
            args[_RESIDUAL] = residual.data_ptr()
        if output_bits is not None:
            args[_OUT_BITS] = output_bits.data_ptr()
        if positions is not None:
            args[_POSITIONS], args[_NPOS] = positions.data_ptr(), positions.numel()
            if accumulate is not None:
                args[_ACCUMULATE] = accumulate.data_ptr()
        status = self.call(*args)
        if status != 0:
            raise RuntimeError(f"bz_conv rejected its arguments (status {status})")
        return out


def _tensor_key(t: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if t is None else (t.shape, t.dtype, t.device, t.is_contiguous())


def _plan_key(x, input_bias, stride, padding, dilation, pad_value, epilogue, out, num_threads, backend, residual,
              packed_input, output_bits, output_bits_bias, residual_halves) -> Optional[tuple]:
    """Everything a dense call's checks depend on (shapes, dtypes, devices, layouts, and the
    identities of the layer's constant tensors), or None when the residual would need converting
    (not float32 and contiguous).  Unhashable arguments (padding as a list) fail the look-up instead."""
    if residual is not None and (residual.dtype != torch.float32 or not residual.is_contiguous()):
        return None
    return (x.shape, x.dtype, x.device, x.stride() if packed_input is None else _tensor_key(packed_input),
            _tensor_key(out), _tensor_key(residual), _tensor_key(output_bits), id(input_bias), id(epilogue),
            id(output_bits_bias), stride, padding, dilation, pad_value, residual_halves,
            num_threads or torch.get_num_threads(), backend, _lib.selections())


def _conv_torch(x, weights, input_bias, stride, padding, dilation, pad_value, epilogue, positions,
                out, residual=None, accumulate=None) -> torch.Tensor:
    x = x.float()
    if input_bias is not None:
        x = x + _vector(input_bias).to(x.device).view(1, -1, 1, 1)
    signs = torch.where(x >= 0, 1.0, -1.0)
    if pad_value != 0:
        signs = F.pad(signs, (padding[1], padding[1], padding[0], padding[0]), value=float(pad_value))
        padding = (0, 0)
    dot = F.conv2d(signs, weights.signs.to(signs.device), None, stride, padding, dilation, weights.groups).round_()
    return _scatter(out, epilogue.apply_torch(dot, residual=residual), positions, accumulate)


def _scatter(out: torch.Tensor, y: torch.Tensor, positions: Optional[torch.Tensor],
             accumulate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out`` holding ``y`` (all of it, or its values at the flattened ``positions``); with
    ``accumulate`` (one weight per output pixel) ``out = y * accumulate + out`` there instead."""
    if positions is None:
        return out.copy_(y)
    flat_out = out.view(out.shape[0], out.shape[1], -1)
    flat_y = y.reshape(y.shape[0], y.shape[1], -1)
    ohw = flat_y.shape[2]
    positions = positions.to(device=out.device, dtype=torch.int64)
    batch, pixel = positions // ohw, positions % ohw
    values = flat_y[batch, :, pixel]
    if accumulate is not None:
        weights = accumulate.reshape(-1).to(out.device).index_select(0, positions)
        values = values * weights.view(-1, 1) + flat_out[batch, :, pixel]
    flat_out[batch, :, pixel] = values
    return out


def pointwise(x: torch.Tensor, epilogue: Epilogue, num_threads: Optional[int] = None,
              backend: str = "auto") -> torch.Tensor:
    """Apply an epilogue's per-channel ops to a float [N, C, ...] tensor in one pass (a new tensor).

    Only ``epilogue.ops`` are used (scale/shift must be None).  Same arithmetic as ``apply_torch``.
    """
    if epilogue.scale is not None or epilogue.shift is not None:
        raise ValueError("pointwise applies the ops of an epilogue without scale/shift")
    lib = _lib.library() if backend != "torch" else None
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 2 or \
            not x.is_contiguous():
        return epilogue.apply_torch(x)
    out = torch.empty_like(x)
    nops, codes, pointers = epilogue.c_arguments()
    n, c = x.shape[0], x.shape[1]
    status = lib.bz_pointwise(x.data_ptr(), out.data_ptr(), n, c, x[0, 0].numel(), nops, codes, pointers,
                              _num_threads(num_threads))
    if status != 0:
        raise RuntimeError(f"bz_pointwise rejected its arguments (status {status})")
    return out


def _c_ready(x: torch.Tensor, backend: str):
    """The kernel library when ``x`` can go to it (a contiguous float32 CPU map), else None."""
    lib = _lib.library() if backend != "torch" else None
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() < 3 or \
            not x.is_contiguous():
        return None
    return lib


def avg_pool2x2(x: torch.Tensor, num_threads: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """2x2 / stride-2 average pooling with ceil mode and no padding of an [..., H, W] map.

    Equals ``F.avg_pool2d(x, 2, 2, ceil_mode=True)`` bit for bit (the C pass sums each window in
    the same order and divides by the number of valid values), about 10x faster on CPU.
    """
    lib = _c_ready(x, backend)
    if lib is None:
        return F.avg_pool2d(x, 2, 2, ceil_mode=True)
    h, w = x.shape[-2:]
    out = x.new_empty(*x.shape[:-2], (h + 1) // 2, (w + 1) // 2)
    status = lib.bz_avgpool2x2(x.data_ptr(), out.data_ptr(), x[..., 0, 0].numel(), h, w, _num_threads(num_threads))
    if status != 0:
        raise RuntimeError(f"bz_avgpool2x2 rejected its arguments (status {status})")
    return out


def gru_update(h: torch.Tensor, z: torch.Tensor, c: torch.Tensor, num_threads: Optional[int] = None,
               backend: str = "auto") -> torch.Tensor:
    """A GRU's state update ``(1 - z) * h + z * c`` in one pass (PyTorch's rounding: each product and
    the sum rounded separately, so the result equals the three-op expression bit for bit)."""
    lib = _lib.library() if backend != "torch" else None
    tensors = (h, z, c)
    if (lib is None or any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
                           for t in tensors) or not (h.shape == z.shape == c.shape)):
        return (1 - z) * h + z * c
    out = torch.empty_like(h)
    status = lib.bz_gru_update(h.data_ptr(), z.data_ptr(), c.data_ptr(), out.data_ptr(), h.numel(),
                               _num_threads(num_threads))
    if status != 0:
        raise RuntimeError(f"bz_gru_update rejected its arguments (status {status})")
    return out


def guided_apply(slope: torch.Tensor, offset: torch.Tensor, guide: torch.Tensor, guide_last: torch.Tensor,
                 num_threads: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """A guided filter's full-resolution step in one pass: ``resize(slope) * cat([guide, guide_last], 1)
    + resize(offset)``, ``resize`` being ``F.interpolate(..., size=guide.shape[-2:], mode="bilinear",
    align_corners=False)``.  ``slope``/``offset`` [N, C, h, w], ``guide`` [N, C-1, H, W], ``guide_last``
    [N, 1, H, W].  Neither the resized maps nor the concatenated guide are built.  The resize uses
    PyTorch's source indices and weights; its sums may round differently in the last bit (as in
    ``upsample2x``), about 6x faster than the torch expression at 1920x1080."""
    n, channels, h, w = slope.shape
    height, width = guide.shape[-2:]
    if (offset.shape != slope.shape or guide.dim() != 4 or guide.shape[:2] != (n, channels - 1)
            or guide_last.shape != (n, 1, height, width)):
        raise ValueError(f"guided_apply: slope/offset {tuple(slope.shape)}/{tuple(offset.shape)} do not fit guide "
                         f"{tuple(guide.shape)} and guide_last {tuple(guide_last.shape)}")
    tensors = (slope, offset, guide, guide_last)
    lib = _lib.library() if backend != "torch" else None
    if lib is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        size = (height, width)
        resized = [F.interpolate(t, size, mode="bilinear", align_corners=False) for t in (slope, offset)]
        return resized[0] * torch.cat([guide, guide_last], dim=1) + resized[1]
    slope, offset, guide, guide_last = (t.contiguous() for t in tensors)
    out = slope.new_empty(n, channels, height, width)
    status = lib.bz_guided_apply(slope.data_ptr(), offset.data_ptr(), n, channels, h, w, guide.data_ptr(),
                                 guide_last.data_ptr(), height, width, out.data_ptr(), _num_threads(num_threads))
    if status != 0:
        raise RuntimeError(f"bz_guided_apply rejected its arguments (status {status})")
    return out


def upsample2x(x: torch.Tensor, num_threads: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """Bilinear 2x up-sampling (``align_corners=False``) of an [..., H, W] map.

    Same weights as ``F.interpolate(x, scale_factor=2, mode="bilinear")`` (0.25 / 0.75, edges
    clamped); the float sums may round differently in the last bit.  About 4x faster on CPU.
    """
    lib = _c_ready(x, backend)
    if lib is None:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    out = x.new_empty(*x.shape[:-2], 2 * h, 2 * w)
    status = lib.bz_upsample2x(x.data_ptr(), out.data_ptr(), x[..., 0, 0].numel(), h, w, 4 * h * w,
                               _num_threads(num_threads))
    if status != 0:
        raise RuntimeError(f"bz_upsample2x rejected its arguments (status {status})")
    return out


def upsample_concat_pack(low: torch.Tensor, skips: Sequence[torch.Tensor],
                         biases: Sequence[Optional[torch.Tensor]],
                         num_threads: Optional[int] = None) -> Optional[List[torch.Tensor]]:
    """``pack_activations(cat([upsample2x(low), *skips], 1), bias)`` for each bias, in one pass that
    never builds the concatenation (the decoder's up-sample + skip + binary conv pattern).

    ``low`` [N, CL, h, w]; every skip [N, SC, 2h, 2w].  Returns one int64 word tensor
    [N, 4hw, 1, ceil(C/64)] per bias, or None when the C kernels cannot take these tensors.
    """
    if low.dim() != 4:
        return None
    n, _, h, w = low.shape
    return _pack_parts(low, skips, biases, (n, 2 * h, 2 * w), num_threads)


def concat_pack(parts: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                num_threads: Optional[int] = None) -> Optional[List[torch.Tensor]]:
    """``pack_activations(cat(parts, 1), bias)`` for each bias, in one pass over the parts (the
    concatenation is never built: a recurrent gate's ``cat([x, h])``).  Parts [N, C_k, H, W];
    returns one int64 word tensor [N, HW, 1, ceil(C/64)] per bias, or None when the C kernels
    cannot take these tensors."""
    if not parts or parts[0].dim() != 4:
        return None
    n, _, h, w = parts[0].shape
    return _pack_parts(None, parts, biases, (n, h, w), num_threads)


def _pack_parts(low: Optional[torch.Tensor], parts: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]],
                size: Tuple[int, int, int], num_threads: Optional[int]) -> Optional[List[torch.Tensor]]:
    """Packed words of cat([upsample2x(low) if low is given, *parts], 1) (all [N, C, H, W] at ``size``
    (N, H, W)) for each bias, by the C kernels; None when they cannot take these tensors."""
    lib = _lib.library()
    tensors = ([] if low is None else [low]) + list(parts)
    if (lib is None or not 1 <= len(biases) <= 4 or not 1 <= len(tensors) <= 9 or len(parts) > 8
            or any(t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 4 for t in tensors)):
        return None
    n, height, width = size
    if any(p.shape[0] != n or tuple(p.shape[2:]) != (height, width) for p in parts):
        return None
    tensors = [t.contiguous() for t in tensors]
    parts = tensors[len(tensors) - len(parts):]
    channels = sum(t.shape[1] for t in tensors)
    vectors = [None if b is None else _vector(b) for b in biases]
    if any(v is not None and v.numel() != channels for v in vectors):
        raise ValueError(f"every bias needs {channels} values (the concatenation's channels)")
    words = math.ceil(channels / 64)
    pixels = height * width
    outs = [torch.empty(n * pixels * words + 1, dtype=torch.int64) for _ in biases]
    part_ptrs = (ctypes.c_void_p * max(1, len(parts)))(*[t.data_ptr() for t in parts])
    part_channels = (ctypes.c_int64 * max(1, len(parts)))(*[t.shape[1] for t in parts])
    bias_ptrs = (ctypes.c_void_p * len(vectors))(*[None if v is None else v.data_ptr() for v in vectors])
    out_ptrs = (ctypes.c_void_p * len(outs))(*[o.data_ptr() for o in outs])
    threads = _num_threads(num_threads)
    if low is None:
        status = lib.bz_concat_pack(n, height, width, len(parts), part_ptrs, part_channels, len(vectors), bias_ptrs,
                                    out_ptrs, threads)
    else:
        status = lib.bz_upsample_concat_pack(tensors[0].data_ptr(), n, low.shape[1], low.shape[2], low.shape[3],
                                             len(parts), part_ptrs, part_channels, len(vectors), bias_ptrs, out_ptrs,
                                             threads)
    if status != 0:
        raise RuntimeError(f"packing the concatenation: the C kernel rejected its arguments (status {status})")
    return [o[:-1].view(n, pixels, 1, words) for o in outs]


def binary_linear(
    x: torch.Tensor,
    weights: PackedWeights,
    *,
    input_bias: Optional[torch.Tensor] = None,
    epilogue: Optional[Epilogue] = None,
    num_threads: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Binary linear layer on [..., C] inputs: a 1x1 binary convolution over the flattened rows."""
    if weights.kernel_size != (1, 1) or weights.groups != 1:
        raise ValueError("binary_linear expects weights packed from an [O, C, 1, 1] tensor with groups=1")
    lead: Sequence[int] = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1], 1, 1)
    y = binary_conv2d(rows, weights, input_bias=input_bias, epilogue=epilogue, num_threads=num_threads,
                      backend=backend)
    return y.reshape(*lead, weights.out_channels)
