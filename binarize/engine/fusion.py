"""Whole-model deployment: find what each binary layer can absorb, install packed implementations.

For every container module we look at how its children are called — the order of an
``nn.Sequential``, or a ``torch.fx`` trace of the container's forward with every child kept as a
leaf — and fuse, around each ``BinaryConv2d``:

- a preceding ``LearnableBias`` whose only consumer is the conv (through ``nn.Identity`` slots):
  its shift moves into the fused bias-add + sign + pack of the input;
- the following chain of single-consumer modules that are per-channel elementwise in eval mode
  (``BatchNorm2d``, ``LearnableBias``, ``PReLU``, ``ReLU``, ``RPReLU``): they move into the
  kernel's epilogue.

Fused neighbours keep their parameters and names; only their ``forward`` is replaced by a
pass-through on the deployed copy.  Masked branches (``MaskedBranch``) get a forward that runs
their binary convolution only at the positions where the mask is non-zero (dilated by the
receptive field of any later spatial conv), so the sparse decoder's savings become real.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from binarize.engine import _lib
from binarize.engine.blocks import block_layers, install_block
from binarize.engine.functional import (
    MAX_OPS,
    Epilogue,
    avg_pool2x2,
    concat_pack,
    gru_update,
    guided_apply,
    pointwise,
    upsample2x,
    upsample_concat_pack,
)
from binarize.engine.layers import (
    PackedConv2d,
    PackedLinear,
    UnsupportedLayer,
    epilogue_ops,
    fold_batchnorm,
    foldable_batchnorm,
    is_pointwise,
    refuse_tracing,
)
from binarize.nn.blocks import ElasticShortcutBlock, MaskedBranch, SparseAssistedPair
from binarize.nn.layers import BinaryConv2d, BinaryLinear
from binarize.ops.binarizers import LearnableBias, RPReLU


@dataclass
class DeployReport:
    """What ``deploy`` did: packed layers, fused neighbours, sparse branches, layers left simulated."""

    packed: List[str] = field(default_factory=list)
    fused: Dict[str, List[str]] = field(default_factory=dict)
    sparse: List[str] = field(default_factory=list)
    simulated: Dict[str, str] = field(default_factory=dict)
    resampling: List[str] = field(default_factory=list)

    def summary(self) -> str:
        fused = sum(len(names) for names in self.fused.values())
        return (f"{len(self.packed)} binary layers packed, {fused} neighbouring modules fused, "
                f"{len(self.sparse)} masked branches sparse, {len(self.resampling)} pooling / up-sampling "
                f"modules on the C kernels, {len(self.simulated)} layers left simulated")


# largest fraction of positions for which a masked branch's conv runs sparsely (measured on CPU:
# the packed kernel's cost per position barely changes, gathering float windows is slower; the C
# sparse float conv, four positions per pass, beat oneDNN's dense conv up to about 40% on
# BiMatting's 16 -> 16 output conv at 512x288, so a quarter leaves a margin)
SPARSE_LIMIT_PACKED = 0.5
SPARSE_LIMIT_FOLDED = 0.06
SPARSE_LIMIT_FOLDED_C = 0.25


class Passthrough:
    """Forward of a module whose work was fused into a neighbouring packed layer."""

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


@dataclass
class _Site:
    """One call of a child module inside a container: its input site and its consumers."""

    name: str
    module: nn.Module
    input: Optional[_Site] = None
    users: List[object] = field(default_factory=list)


def _sequential_sites(container: nn.Sequential) -> List[_Site]:
    sites: List[_Site] = []
    for name, child in container.named_children():
        site = _Site(name, child, sites[-1] if sites else None)
        if sites:
            sites[-1].users.append(site)
        sites.append(site)
    if sites:
        sites[-1].users.append("output")
    return sites


class _LeafTracer(torch.fx.Tracer):
    """Traces only the container's own forward: every submodule stays one call."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return True


def _traced_sites(container: nn.Module, free: Optional[set] = None) -> Optional[List[_Site]]:
    """Call sites of a container's children from an fx trace, or None when it cannot be traced.

    ``free`` (ids of modules still free to fuse): a module this forward calls at several sites, or
    a descendant it calls directly (``self.block.relu(x)``, so that module also runs outside its own
    parent's data flow), is removed from it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _LeafTracer().trace(container)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: no fusion here
        return None
    children = dict(container.named_children())
    sites: Dict[torch.fx.Node, _Site] = {}
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    if free is not None:
        for target, count in calls.items():
            if count > 1 or target not in children:
                try:
                    free.discard(id(container.get_submodule(target)))
                except AttributeError:
                    pass
    for node in graph.nodes:
        # a child called at several sites (torchvision's ``self.relu`` in BasicBlock/Bottleneck) is
        # shared between data flows: it gets no site at all, so no neighbour sees it as its single
        # consumer or producer (its users and inputs read "other") and it is never fused
        if node.op != "call_module" or node.target not in children or calls[node.target] != 1:
            continue
        site = _Site(node.target, children[node.target])
        if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], torch.fx.Node):
            site.input = sites.get(node.args[0])
        sites[node] = site
    for node, site in sites.items():
        site.users = [sites.get(user, "other") for user in node.users]
    return list(sites.values())


def _container_sites(container: nn.Module, free: Optional[set] = None) -> Optional[List[_Site]]:
    if isinstance(container, nn.Sequential) and (
        type(container).forward is nn.Sequential.forward or isinstance(container, MaskedBranch)
    ):
        return _sequential_sites(container)
    return _traced_sites(container, free)


def _fusable_head(site: _Site, single_use: set) -> Optional[_Site]:
    """The LearnableBias feeding ``site`` only (through Identity slots), or None."""
    current = site.input
    while current is not None and type(current.module) is nn.Identity and current.users == [site]:
        site, current = current, current.input
    if (current is not None and type(current.module) is LearnableBias and current.users == [site]
            and id(current.module) in single_use and current.module.channel_dim == 1):
        return current
    return None


def _opens_binary_conv(site: _Site) -> bool:
    """True for a shift that feeds a binary conv (through Identity slots): it belongs to that conv."""
    current = site
    while len(current.users) == 1 and isinstance(current.users[0], _Site):
        current = current.users[0]
        if isinstance(current.module, BinaryConv2d):
            return True
        if not isinstance(current.module, nn.Identity):
            return False
    return False


def _fusable_tail(site: _Site, single_use: set) -> List[_Site]:
    """The chain of single-consumer modules after ``site`` (candidates for the epilogue)."""
    tail: List[_Site] = []
    current = site
    while len(current.users) == 1 and isinstance(current.users[0], _Site):
        nxt = current.users[0]
        if nxt.input is not current or id(nxt.module) not in single_use:
            break
        if isinstance(nxt.module, LearnableBias) and _opens_binary_conv(nxt):
            break
        tail.append(nxt)
        current = nxt
    return tail


def _install_conv(layer: BinaryConv2d, name: str, report: DeployReport, options: dict, consumed: set,
                  head: Optional[_Site] = None, tail: Sequence[_Site] = (), prefix: str = "") -> bool:
    """Pack one conv (fusing ``head``/``tail`` where possible); False if it stays simulated.

    ``consumed``: ids of modules still free to fuse; the fused ones are removed from it.
    """
    input_bias = None
    if head is not None:
        head_bias = head.module.bias
        if head_bias.numel() == layer.in_channels:
            input_bias = head_bias
    try:
        impl = PackedConv2d(layer, input_bias=input_bias, tail=tuple(s.module for s in tail), **options)
    except UnsupportedLayer as exc:
        if input_bias is None:
            report.simulated[name] = str(exc)
            return False
        try:  # e.g. a thresholded binarizer: pack without fusing the shift
            impl, head = PackedConv2d(layer, tail=tuple(s.module for s in tail), **options), None
        except UnsupportedLayer as exc2:
            report.simulated[name] = str(exc2)
            return False
    if head is not None and input_bias is not None:
        consumed.discard(id(head.module))
        head.module.forward = Passthrough()
        report.fused.setdefault(name, []).append(prefix + head.name)
    for site in list(tail)[: impl.fused]:
        consumed.discard(id(site.module))
        site.module.forward = Passthrough()
        report.fused.setdefault(name, []).append(prefix + site.name)
    layer.set_implementation(impl, "packed")
    report.packed.append(name)
    return True


class FoldedConv2dForward:
    """Forward of a full-precision ``nn.Conv2d`` with the BatchNorm (and ReLU) after it folded in.

    ``w' = w * gamma / sigma``, ``b' = (b - mean) * gamma / sigma + beta``; unpadded 1x1 convs run as
    one matrix product.  ``positions`` (flattened ``n*OH*OW + pixel``) computes only those outputs
    by gathering their windows (the rest are 0): the sparse path of masked branches.
    """

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], relu: bool, backend: str = "auto") -> None:
        weight = conv.weight.detach().float()
        bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_channels)
        if bn is not None:
            weight, bias = fold_batchnorm(weight, bias, bn)
        self.weight, self.bias, self.relu = weight.contiguous(), bias.contiguous(), relu
        self.stride, self.padding = tuple(conv.stride), conv.padding
        self.dilation, self.groups = tuple(conv.dilation), conv.groups
        self.padding_mode = conv.padding_mode
        self.explicit_padding = [int(p) for p in conv._reversed_padding_repeated_twice]
        self.pointwise = is_pointwise(conv)
        self.matrix = weight.reshape(weight.shape[0], -1).contiguous()
        self.tap_major = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()
        self.channel_major = weight.permute(1, 2, 3, 0).contiguous()  # [C][KH][KW][O] for the C kernel
        self.backend = backend

    def _follow(self, device: torch.device) -> None:
        """Keep the folded parameters on the input's device (moved once, not per call)."""
        if self.weight.device != device:
            for name in ("weight", "bias", "matrix", "tap_major", "channel_major"):
                setattr(self, name, getattr(self, name).to(device))

    def __call__(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None,
                 zero_rest: bool = True) -> torch.Tensor:
        refuse_tracing()
        if x.dtype != torch.float32 and x.is_floating_point():
            # a half / bfloat16 model: the folded parameters are float32, so compute there and round
            # back (as the packed layers do)
            return self(x.float(), positions, zero_rest).to(x.dtype)
        self._follow(x.device)
        if positions is not None and x.dim() == 4 and self.groups == 1 and self.stride == (1, 1):
            y = self._sparse_c(x, positions, zero_rest)
            if y is not None:
                return y
            y = self._sparse(x, positions)
        elif self.pointwise and x.dim() == 4:
            n, c, h, w = x.shape
            matrix, rows = self.matrix.to(x.dtype), x.reshape(n, c, h * w)
            y = torch.empty(n, matrix.shape[0], h * w, dtype=x.dtype)
            for sample in range(n):  # one GEMM per sample (faster than a batched matmul here)
                torch.addmm(self.bias.to(x.dtype).view(-1, 1), matrix, rows[sample], out=y[sample])
            y = y.reshape(n, -1, h, w)
        else:
            if self.padding_mode != "zeros":
                x = F.pad(x, self.explicit_padding, mode=self.padding_mode)
                y = F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
            else:
                y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y.clamp_min_(0) if self.relu else y

    def sparse_in_c(self, x: torch.Tensor) -> bool:
        """True when ``positions`` calls on ``x`` run the C kernel (cheap enough for denser masks)."""
        return (self.backend != "torch" and _lib.library() is not None and x.dtype == torch.float32
                and x.device.type == "cpu" and self.padding_mode == "zeros" and self.groups == 1
                and self.stride == (1, 1))

    def _sparse_c(self, x: torch.Tensor, positions: torch.Tensor, zero_rest: bool = True,
                  out: Optional[torch.Tensor] = None, accumulate: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The sparse convolution by the C kernel (ReLU included), or None when it cannot run;
        outputs off ``positions`` are 0, or uninitialized with ``zero_rest=False``.  With ``out``
        (contiguous float32) and ``accumulate`` (one float32 weight per output pixel): ``out = y *
        accumulate + out`` at the positions, in place (a sparse-assisted pair's masked sum)."""
        if not self.sparse_in_c(x):
            return None
        n, c, h, w = x.shape
        out_channels, _, kh, kw = self.weight.shape
        left, right, top, bottom = self.explicit_padding
        oh = h + top + bottom - self.dilation[0] * (kh - 1)
        ow = w + left + right - self.dilation[1] * (kw - 1)
        x = x.contiguous()
        positions = positions.to(torch.int64).contiguous()
        if out is None:
            out = x.new_zeros(n, out_channels, oh, ow) if zero_rest else x.new_empty(n, out_channels, oh, ow)
        elif out.shape != (n, out_channels, oh, ow) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of shape {(n, out_channels, oh, ow)}")
        if accumulate is not None:
            if accumulate.numel() != n * oh * ow:
                raise ValueError(f"accumulate needs {n * oh * ow} weights (one per output pixel), "
                                 f"got {accumulate.numel()}")
            accumulate = accumulate.to(torch.float32).contiguous()
        status = _lib.library().bz_sparse_fconv(
            x.data_ptr(), n, c, h, w, self.channel_major.data_ptr(), self.bias.data_ptr(), out_channels, kh, kw,
            top, left, self.dilation[0], self.dilation[1], oh, ow, int(self.relu), positions.data_ptr(),
            positions.numel(), accumulate.data_ptr() if accumulate is not None else None, out.data_ptr(),
            torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"bz_sparse_fconv rejected its arguments (status {status})")
        return out

    def _sparse(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        out_channels, _, kh, kw = self.weight.shape
        left, right, top, bottom = self.explicit_padding
        oh = h + top + bottom - self.dilation[0] * (kh - 1)
        ow = w + left + right - self.dilation[1] * (kw - 1)
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        padded = F.pad(x, self.explicit_padding, mode=mode) if any(self.explicit_padding) else x
        hp, wp = padded.shape[-2:]
        batch, pixel = positions // (oh * ow), positions % (oh * ow)
        rows, cols = pixel // ow, pixel % ow
        taps_h = torch.arange(kh, device=x.device) * self.dilation[0]
        taps_w = torch.arange(kw, device=x.device) * self.dilation[1]
        window = (taps_h.view(-1, 1) * wp + taps_w.view(1, -1)).reshape(-1)
        index = (batch * hp * wp + rows * wp + cols).view(-1, 1) + window.view(1, -1)
        # channels-last rows, so each gathered window tap is one contiguous run of C floats
        table = padded.permute(0, 2, 3, 1).reshape(-1, c)
        columns = table.index_select(0, index.reshape(-1)).reshape(positions.numel(), kh * kw * c)
        values = torch.addmm(self.bias.to(x.dtype), columns, self.tap_major.to(x.dtype).t())
        out = x.new_zeros(n, out_channels, oh * ow)
        out[batch, :, pixel] = values
        return out.view(n, out_channels, oh, ow)


def _active_map(mask: torch.Tensor, info: dict) -> torch.Tensor:
    """Where a mask is non-zero in any channel ([N, 1, H, W] bool), once per mask."""
    if "active" not in info:
        active = mask != 0
        info["active"] = active.any(dim=1, keepdim=True) if active.dim() == 4 else active
    return info["active"]


def _positions(info: dict, active: torch.Tensor, radius: int) -> torch.Tensor:
    """Flattened positions of the active map grown by ``radius`` pixels, once per mask and radius."""
    positions: Dict[int, torch.Tensor] = info.setdefault("positions", {})
    if radius not in positions:
        grown = _dilate(active, radius) if radius else active
        positions[radius] = torch.nonzero(grown.reshape(-1)).reshape(-1)
    return positions[radius]


def _dilate(active: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a boolean [N, 1, H, W] map by ``radius`` pixels (square window), by shifted ORs."""
    for _ in range(radius):
        grown = active.clone()
        grown[..., 1:, :] |= active[..., :-1, :]
        grown[..., :-1, :] |= active[..., 1:, :]
        wide = grown.clone()
        wide[..., :, 1:] |= grown[..., :, :-1]
        wide[..., :, :-1] |= grown[..., :, 1:]
        active = wide
    return active


def _install_folded(conv: nn.Conv2d, name: str, report: DeployReport, consumed: set, tail: Sequence[_Site],
                    prefix: str, backend: str = "auto") -> None:
    """Fold a following eval BatchNorm (and a ReLU after it) into a full-precision conv's forward."""
    bn, relu, fused = None, False, []
    chain = list(tail)
    if chain and foldable_batchnorm(chain[0].module, conv.out_channels):
        bn = chain.pop(0).module
        fused.append(tail[0])
    if chain and type(chain[0].module) is nn.ReLU:
        relu = True
        fused.append(chain[0])
    if not fused and not (conv.kernel_size == (1, 1)):
        return
    conv.forward = FoldedConv2dForward(conv, bn, relu, backend)
    for site in fused:
        consumed.discard(id(site.module))
        site.module.forward = Passthrough()
        report.fused.setdefault(name, []).append(prefix + site.name)


_MASK_INFO_ATTR = "_binarize_mask_info"


def _mask_info(mask: torch.Tensor) -> dict:
    """Facts about a mask shared by every sparse branch that reads it in one forward (density,
    active map, position lists): cached on the mask's base tensor, keyed by the view's geometry
    and dropped when the tensor's version changes.  Inference tensors (no version) get no cache."""
    if mask.is_inference():
        return {}
    base = mask._base if mask._base is not None else mask
    cache = getattr(base, _MASK_INFO_ATTR, None)
    if cache is None or cache[0] != base._version:
        cache = (base._version, {})
        setattr(base, _MASK_INFO_ATTR, cache)
    key = (mask.storage_offset(), tuple(mask.shape), tuple(mask.stride()), mask.dtype)
    return cache[1].setdefault(key, {})


def _record_density(branch: MaskedBranch, mask: torch.Tensor, info: dict) -> None:
    """``branch.record_density(mask)``, computed once per mask."""
    if "density" in info:
        branch.mask_density = info["density"]
    else:
        branch.record_density(mask)
        info["density"] = branch.mask_density


class SparseMaskedForward:
    """Forward of a deployed ``MaskedBranch``: ``body(x) * mask`` where every convolution of the body
    (the packed binary conv and folded full-precision ones) computes only the positions inside the
    mask, grown by the receptive field of the convolutions after it; the rest runs on the maps."""

    def __init__(self, branch: MaskedBranch, conv_index: int) -> None:
        self.branch = branch
        self.conv_index = conv_index
        children = list(branch)
        self.radius_after: Dict[int, int] = {}
        radius = 0
        for index in range(len(children) - 1, conv_index - 1, -1):
            module = children[index]
            if isinstance(module, nn.Conv2d):
                self.radius_after[index] = radius
                dilation = module.dilation[0] if isinstance(module.dilation, tuple) else module.dilation
                radius += (max(module.kernel_size) // 2) * dilation

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        refuse_tracing()
        info = _mask_info(mask)
        _record_density(self.branch, mask, info)
        x, _, _ = self._run(x, mask, len(self.branch), info=info)
        return x * mask

    def _run(self, x: torch.Tensor, mask: torch.Tensor, stop: int, gathered: bool = False,
             info: Optional[dict] = None, packed_input: Optional[torch.Tensor] = None) -> tuple:
        """Children ``[0, stop)`` with the convolutions sparse; returns (x, active map, usable).

        ``gathered``: the caller reads the result only at the mask's positions, so the last
        convolution (at ``stop - 1``) need not zero the outputs it skips.  ``packed_input``: the
        binary conv's input already packed (``x`` then only gives the shape)."""
        children = list(self.branch)
        for module in children[: self.conv_index]:
            x = module(x)
        info = {} if info is None else info
        usable = mask.dim() == 4 and mask.shape[0] == x.shape[0] and mask.shape[-2:] == x.shape[-2:]
        active = _active_map(mask, info)
        for index in range(self.conv_index, stop):
            module = children[index]
            impl = module.__dict__.get("_impl") if isinstance(module, BinaryConv2d) else module.forward
            extra = {"packed_input": packed_input} if index == self.conv_index and packed_input is not None else {}
            sparse_ok = (usable and index in self.radius_after and tuple(module.stride) == (1, 1)
                         and isinstance(impl, (PackedConv2d, FoldedConv2dForward)))
            if sparse_ok:
                selected = _positions(info, active, self.radius_after[index])
                # gathering windows only pays below some density; above it the dense path is cheaper
                if isinstance(impl, PackedConv2d):
                    limit = SPARSE_LIMIT_PACKED
                else:
                    limit = SPARSE_LIMIT_FOLDED_C if impl.sparse_in_c(x) else SPARSE_LIMIT_FOLDED
                if selected.numel() <= limit * active.numel():
                    x = impl(x, positions=selected, zero_rest=not (gathered and index == stop - 1), **extra)
                    continue
            x = impl(x, **extra) if extra else module(x)
        return x, active, usable

    def masked_add(self, x: torch.Tensor, mask: torch.Tensor, dense: torch.Tensor,
                   packed_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``body(x) * mask + dense`` computing the body's per-position tail (activations, shifts)
        and the masked sum only at the mask's non-zero positions (the rest of ``dense`` is kept).
        ``packed_input``: the binary conv's input already packed (callers check ``accepts_packed``)."""
        branch = self.branch
        info = _mask_info(mask)
        _record_density(branch, mask, info)
        stop = self.tail_start
        if stop is None or mask.dim() != 4 or mask.shape[1] != 1 or dense.dim() != 4:
            return self(x, mask) + dense
        usable = mask.shape[0] == x.shape[0] and mask.shape[-2:] == x.shape[-2:] and x.dim() == 4
        if usable:
            summed = self._accumulate(x, mask, dense, info, packed_input)
            if summed is not None:
                return summed
        y, active, usable = self._run(x, mask, stop, gathered=usable, info=info, packed_input=packed_input)
        if not usable or y.shape != dense.shape:
            return self(x, mask) + dense  # not the shapes of a sparse-assisted pair: the plain sum
        n, c, h, w = y.shape
        positions = _positions(info, active, 0)  # the mask's non-zero positions (it has one channel)
        # the values at the positions as a [1, C, K, 1] map, so per-channel modules apply unchanged
        columns = y.transpose(0, 1).reshape(c, n * h * w).index_select(1, positions)
        columns = columns.view(1, c, -1, 1)
        for module in list(branch)[stop:]:
            columns = module(columns)
        weights = mask.reshape(-1).index_select(0, positions)
        out = dense.clone() if dense.data_ptr() == x.data_ptr() else dense.contiguous()
        values = columns.reshape(c, -1)
        lib = _lib.library()
        if lib is not None and out.dtype == values.dtype == weights.dtype == torch.float32 and out.device.type == "cpu":
            values, weights = values.contiguous(), weights.contiguous()
            lib.bz_masked_add(out.data_ptr(), n, c, h * w, values.data_ptr(), weights.data_ptr(),
                              positions.data_ptr(), positions.numel(), torch.get_num_threads())
            return out
        batch, pixel = positions // (h * w), positions % (h * w)
        flat = out.view(n, c, h * w)
        # (body * mask) + dense, element by element as in the float model
        flat[batch, :, pixel] = (values * weights).t() + flat[batch, :, pixel]
        return out

    def _accumulate(self, x: torch.Tensor, mask: torch.Tensor, dense: torch.Tensor, info: dict,
                    packed_input: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``body(x) * mask + dense`` when everything after the body's last convolution is fused
        into it and that convolution is the packed binary conv (the gates) or a sparse float conv
        (the output block): its kernel adds ``y * mask`` straight into ``dense`` at the mask's
        positions (no output map, gathers or separate sum).  None when that does not apply."""
        children = list(self.branch)
        last = self.tail_start - 1
        module = children[last]
        impl = module.__dict__.get("_impl") if isinstance(module, BinaryConv2d) else module.__dict__.get("forward")
        if (not all(isinstance(m.__dict__.get("forward"), Passthrough) for m in children[self.tail_start:])
                or self.radius_after.get(last) != 0 or _lib.library() is None
                or mask.dtype != torch.float32 or dense.dtype != torch.float32 or dense.device.type != "cpu"
                or dense.data_ptr() == x.data_ptr()):
            return None
        if isinstance(impl, PackedConv2d) and last == self.conv_index:
            if (impl.torch_post is not None or impl.spec.sample_scale or impl.backend == "torch"
                    or tuple(impl.stride) != (1, 1) or impl.padding_mode != "zeros"
                    or dense.shape != (x.shape[0], impl.weights.out_channels, *x.shape[-2:])):
                return None
            for module in children[: self.conv_index]:
                x = module(x)
            limit = SPARSE_LIMIT_PACKED
        elif isinstance(impl, FoldedConv2dForward) and last > self.conv_index and packed_input is None:
            left, right, top, bottom = impl.explicit_padding
            kh, kw = impl.weight.shape[-2:]
            if (impl.backend == "torch" or not impl.sparse_in_c(x) or dense.shape[1] != impl.weight.shape[0]
                    or top + bottom != impl.dilation[0] * (kh - 1) or left + right != impl.dilation[1] * (kw - 1)):
                return None
            limit = SPARSE_LIMIT_FOLDED_C
        else:
            return None
        active = _active_map(mask, info)
        positions = _positions(info, active, 0)
        if positions.numel() > limit * active.numel():
            return None  # dense enough for the dense conv and gathers (the general path)
        out = dense.contiguous()
        if isinstance(impl, PackedConv2d):
            extra = {"packed_input": packed_input} if packed_input is not None else {}
            return impl(x, positions=positions, out=out, accumulate=mask, **extra)
        y, _, _ = self._run(x, mask, last, info=info)  # the convolutions before the last one
        if y.shape[-2:] != dense.shape[-2:]:
            return self(x, mask) + dense  # not the shapes of a sparse-assisted pair: the plain sum
        return impl._sparse_c(y, positions, out=out, accumulate=mask)

    def accepts_packed(self, x_shape: Sequence[int], mask: torch.Tensor) -> bool:
        """True when ``masked_add`` takes the sparse path (no dense fallback) for inputs of this
        shape, so its binary conv can read a packed input."""
        return (self.tail_start is not None and mask.dim() == 4 and mask.shape[1] == 1 and len(x_shape) == 4
                and mask.shape[0] == x_shape[0] and tuple(mask.shape[-2:]) == tuple(x_shape[-2:])
                and isinstance(list(self.branch)[self.conv_index].__dict__.get("_impl"), PackedConv2d))

    @property
    def tail_start(self) -> Optional[int]:
        """Index after the branch's last convolution when every module after it is per-position
        (elementwise activations, per-channel shifts / BatchNorm, fused pass-throughs), else None."""
        if "_tail_start" not in self.__dict__:
            children = list(self.branch)
            last = max((i for i, m in enumerate(children) if isinstance(m, nn.Conv2d)), default=None)
            ok = last is not None and all(_per_position(m) for m in children[last + 1:])
            self.__dict__["_tail_start"] = last + 1 if ok else None
        return self.__dict__["_tail_start"]


_PER_POSITION = (nn.Sigmoid, nn.Tanh, nn.ReLU, nn.PReLU, nn.Identity, LearnableBias, nn.BatchNorm2d, RPReLU)


def _per_position(module: nn.Module) -> bool:
    """True for a module whose output at a pixel depends on that pixel alone, per channel."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, (Passthrough, PointwiseChainForward)):
        return True
    if type(module) is nn.BatchNorm2d:
        return not module.training
    if type(module) is LearnableBias:
        return module.channel_dim == 1
    if type(module) is RPReLU:
        return module.channel_dim == 1
    return type(module) in _PER_POSITION


class SparsePairForward:
    """Forward of a ``SparseAssistedPair`` whose masked branch is sparse: ``dense(x)`` plus the
    masked branch added only at the mask's positions (no full-size product, sum or activation)."""

    def __init__(self, pair: nn.Module) -> None:
        self.pair = pair

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dense = self.pair.dense(x)
        return self.pair.sparse.forward.masked_add(x, mask, dense)


class ConcatPairForward:
    """``pair(cat(parts, 1), mask)`` whose two binary convs read bits packed straight from the parts,
    so the concatenation is never built or read: BiMatting's decoder up-samples, concatenates the
    encoder feature and image (``upsample_concat``), and its recurrent gates concatenate input and
    state (``concat``) before a sparse-assisted pair.

    Installed as ``pair.upsample_concat_forward`` and ``pair.concat_forward``; both return None when
    they cannot take the inputs (the caller then builds the concatenation)."""

    def __init__(self, pair: SparseAssistedPair, num_threads: Optional[int]) -> None:
        self.pair = pair
        self.num_threads = num_threads
        self.dense_index = _first_packed_conv(pair.dense)

    def upsample_concat(self, upsample: nn.Module, low: torch.Tensor, skips: Sequence[torch.Tensor],
                        mask: torch.Tensor) -> Optional[torch.Tensor]:
        """``pair(cat([upsample(low), *skips], 1), mask)`` (``upsample`` a deployed bilinear 2x)."""
        resample = upsample.__dict__.get("forward")
        if (not isinstance(resample, ResampleForward) or resample.kind != "upsample" or resample.backend == "torch"
                or low.dim() != 4 or not skips or any(s.dim() != 4 for s in skips)):
            return None
        n, low_channels, h, w = low.shape
        shape = (n, low_channels + sum(s.shape[1] for s in skips), 2 * h, 2 * w)
        return self._run(shape, mask, lambda biases: upsample_concat_pack(low, skips, biases, self.num_threads))

    def concat(self, parts: Sequence[torch.Tensor], mask: torch.Tensor) -> Optional[torch.Tensor]:
        """``pair(cat(parts, 1), mask)``."""
        if not parts or any(p.dim() != 4 for p in parts):
            return None
        n, _, h, w = parts[0].shape
        shape = (n, sum(p.shape[1] for p in parts), h, w)
        return self._run(shape, mask, lambda biases: concat_pack(parts, biases, self.num_threads))

    def _run(self, shape: tuple, mask: torch.Tensor, pack) -> Optional[torch.Tensor]:
        sparse = self.pair.sparse.__dict__.get("forward")
        if (self.dense_index is None or not isinstance(sparse, SparseMaskedForward)
                or not sparse.accepts_packed(shape, mask)):
            return None
        dense_children = list(self.pair.dense)
        dense_impl = dense_children[self.dense_index].__dict__["_impl"]
        sparse_impl = list(self.pair.sparse)[sparse.conv_index].__dict__["_impl"]
        if "torch" in (dense_impl.backend, sparse_impl.backend):
            return None  # packed inputs need the C kernels
        words = pack([dense_impl.spec.bias, sparse_impl.spec.bias])
        if words is None:
            return None
        meta = torch.empty(shape, device="meta")
        dense = dense_impl(meta, packed_input=words[0])
        for module in dense_children[self.dense_index + 1:]:
            dense = module(dense)
        return sparse.masked_add(meta, mask, dense, packed_input=words[1])


def _first_packed_conv(branch: nn.Module) -> Optional[int]:
    """Index of a branch's first module when it is a packed binary conv with only pass-through
    modules (fused shifts, sign slots) before it; else None."""
    if not isinstance(branch, nn.Sequential):
        return None
    for index, module in enumerate(branch):
        if isinstance(module, BinaryConv2d):
            impl = module.__dict__.get("_impl")
            if isinstance(impl, PackedConv2d) and not impl.spec.sample_scale and impl.padding_mode == "zeros":
                return index
            return None
        if not (type(module) is nn.Identity or isinstance(module.__dict__.get("forward"), Passthrough)):
            return None
    return None


def _install_sparse(branch: MaskedBranch, name: str, report: DeployReport) -> None:
    for index, module in enumerate(branch):
        if isinstance(module, BinaryConv2d):
            if isinstance(module.__dict__.get("_impl"), PackedConv2d):
                branch.forward = SparseMaskedForward(branch, index)
                report.sparse.append(name)
            return
        if not isinstance(module, (nn.Identity, LearnableBias)):
            return  # something spatial before the conv: keep the dense masked forward


_CHAINABLE = (LearnableBias, nn.PReLU, nn.ReLU, nn.BatchNorm2d, RPReLU)


def _chain_channels(module: nn.Module) -> Optional[int]:
    """Channel count a per-channel module fixes (None for ReLU / a single-slope PReLU)."""
    if type(module) is LearnableBias:
        return module.channels if module.channel_dim == 1 else -1
    if type(module) is RPReLU:
        return module.shift_in.channels if module.channel_dim == 1 else -1
    if type(module) is nn.BatchNorm2d:
        return module.num_features
    if type(module) is nn.PReLU and module.num_parameters > 1:
        return module.num_parameters
    return None


def _chainable(site: _Site, free: set) -> bool:
    module = site.module
    return (type(module) in _CHAINABLE and id(module) in free and not module.training
            and _chain_channels(module) != -1)


class PointwiseChainForward:
    """Forward of the first module of a chain of per-channel elementwise modules (shifts, PReLU,
    ReLU, eval BatchNorm): the whole chain in one pass over the map (the others pass through)."""

    def __init__(self, ops: list, channels: int, num_threads: Optional[int], backend: str) -> None:
        self.epilogue = Epilogue(ops=ops)
        self.channels = channels
        self.num_threads, self.backend = num_threads, backend

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        refuse_tracing()
        return pointwise(x, self.epilogue, self.num_threads, self.backend)


def _install_chains(sites: Sequence[_Site], free: set, report: DeployReport, prefix: str, options: dict) -> None:
    """Collapse runs of two or more single-consumer per-channel modules into one pass."""
    for site in sites:
        if not _chainable(site, free):
            continue
        previous = site.input
        if previous is not None and _chainable(previous, free) and previous.users == [site]:
            continue  # not the start of its run
        chain = [site]
        while len(chain[-1].users) == 1 and isinstance(chain[-1].users[0], _Site):
            nxt = chain[-1].users[0]
            if nxt.input is not chain[-1] or not _chainable(nxt, free):
                break
            chain.append(nxt)
        counts = [c for c in (_chain_channels(s.module) for s in chain) if c is not None]
        if not counts or len(set(counts)) != 1:
            continue
        channels = counts[0]
        while len(chain) >= 2:
            ops = [op for s in chain for op in (epilogue_ops(s.module, channels) or [None])]
            if None not in ops and len(ops) <= MAX_OPS:
                break
            chain.pop()
        if len(chain) < 2:
            continue
        chain[0].module.forward = PointwiseChainForward(ops, channels, **options)
        for member in chain:
            free.discard(id(member.module))
        for member in chain[1:]:
            member.module.forward = Passthrough()
        report.fused.setdefault(prefix + chain[0].name, []).extend(prefix + s.name for s in chain[1:])


class ResampleForward:
    """Forward of a 2x2 ceil-mode ``nn.AvgPool2d`` or a 2x bilinear ``nn.Upsample`` on the C kernels
    (BiMobileNet's shortcut pooling, the decoder's image pyramid and up-sampling)."""

    def __init__(self, kind: str, num_threads: Optional[int], backend: str) -> None:
        self.kind, self.num_threads, self.backend = kind, num_threads, backend

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        refuse_tracing()
        if x.dim() != 4:
            return (F.avg_pool2d(x, 2, 2, ceil_mode=True) if self.kind == "pool"
                    else F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        if self.kind == "pool":
            return avg_pool2x2(x.contiguous(), self.num_threads, self.backend)
        return upsample2x(x.contiguous(), self.num_threads, self.backend)

    def concat(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """``cat([up(x) cropped to the skips' size, *skips], dim=1)`` with the up-sampled map written
        straight into the concatenation (the decoder's ``upsample_concat`` hook)."""
        height, width = skips[-1].shape[-2:]
        lib = _lib.library() if self.backend != "torch" else None
        n, c, h, w = x.shape
        if (lib is None or 2 * h != height or 2 * w != width or x.dtype != torch.float32 or x.device.type != "cpu"
                or any(s.dim() != 4 or s.shape[0] != n or s.shape[-2:] != (height, width) for s in skips)):
            return torch.cat([self(x)[:, :, :height, :width], *skips], dim=1)
        x = x.contiguous()
        out = x.new_empty(n, c + sum(s.shape[1] for s in skips), height, width)
        threads = self.num_threads or torch.get_num_threads()
        for sample in range(n):
            status = lib.bz_upsample2x(x[sample].data_ptr(), out[sample].data_ptr(), c, h, w, height * width, threads)
            if status != 0:
                raise RuntimeError(f"bz_upsample2x rejected its arguments (status {status})")
        start = c
        for skip in skips:
            out[:, start:start + skip.shape[1]].copy_(skip)
            start += skip.shape[1]
        return out


def _as_pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _resample_kind(module: nn.Module) -> Optional[str]:
    """"pool" / "upsample" for the exact module configurations the C kernels reproduce, else None."""
    if type(module) is nn.AvgPool2d:
        if (_as_pair(module.kernel_size) == (2, 2) and _as_pair(module.stride) == (2, 2)
                and _as_pair(module.padding) == (0, 0)
                and module.ceil_mode and module.divisor_override is None):
            return "pool"
    if type(module) is nn.Upsample and module.mode == "bilinear" and not module.align_corners \
            and module.size is None and module.recompute_scale_factor in (None, False):
        factor = module.scale_factor
        factors = tuple(factor) if isinstance(factor, (tuple, list)) else (factor, factor)
        if all(f is not None and float(f) == 2.0 for f in factors):
            return "upsample"
    return None


def _install_resampling(model: nn.Module, report: DeployReport, options: dict) -> None:
    for name, module in model.named_modules():
        kind = _resample_kind(module)
        if kind is not None:
            module.forward = ResampleForward(kind, **options)
            if kind == "upsample":
                module.upsample_concat = module.forward.concat
            report.resampling.append(name)


def _install_blocks(model: nn.Module, report: DeployReport, options: dict, single_use: set, done: set) -> None:
    """Whole-block forwards for the blocks the engine knows (``ElasticShortcutBlock``)."""
    for name, module in model.named_modules():
        if type(module) is not ElasticShortcutBlock or id(module) not in single_use:
            continue
        layers = block_layers(module)
        if any(id(layer) not in single_use for _, layer in layers):
            continue  # a layer shared with another block: pack layer by layer
        try:
            install_block(module, **options)
        except UnsupportedLayer:
            continue  # the generic per-layer deployment handles it
        prefix = f"{name}." if name else ""
        fused = report.fused.setdefault(prefix + "binary_3x3", [])
        for attr, layer in layers:
            single_use.discard(id(layer))
            if isinstance(layer, BinaryConv2d):
                done.add(id(layer))
                report.packed.append(prefix + attr)
            else:
                fused.append(prefix + attr)


def deploy_modules(model: nn.Module, *, fuse: bool = True, sparse: bool = True,
                   num_threads: Optional[int] = None, backend: str = "auto") -> DeployReport:
    """Install packed implementations on every binary layer of ``model`` in place (eval mode)."""
    report = DeployReport()
    options = {"num_threads": num_threads, "backend": backend}
    names = {id(m): n for n, m in model.named_modules()}
    counts: Dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    single_use = {key for key, count in counts.items() if count == 1}
    done: set = set()
    if fuse:
        _install_blocks(model, report, options, single_use, done)
        for container_name, container in list(model.named_modules()):
            children = list(container.children())
            if not any(isinstance(child, nn.Conv2d) for child in children) and \
                    sum(type(child) in _CHAINABLE for child in children) < 2:
                continue
            sites = _container_sites(container, single_use)
            if sites is None:
                continue
            prefix = f"{container_name}." if container_name else ""
            for site in sites:
                layer = site.module
                if type(layer) is nn.Conv2d and id(layer) not in done and id(layer) in single_use:
                    done.add(id(layer))
                    _install_folded(layer, names[id(layer)], report, single_use,
                                    _fusable_tail(site, single_use), prefix, backend)
                    continue
                if not isinstance(layer, BinaryConv2d) or id(layer) in done or id(layer) not in single_use:
                    continue
                done.add(id(layer))
                _install_conv(layer, names[id(layer)], report, options, single_use,
                              _fusable_head(site, single_use), _fusable_tail(site, single_use), prefix)
            _install_chains(sites, single_use, report, prefix, options)
    for name, module in model.named_modules():
        if id(module) in done:
            continue
        if isinstance(module, BinaryConv2d):
            _install_conv(module, name, report, options, single_use)
        elif isinstance(module, BinaryLinear):
            try:
                module.set_implementation(PackedLinear(module, **options), "packed")
                report.packed.append(name)
            except UnsupportedLayer as exc:
                report.simulated[name] = str(exc)
    if sparse:
        for name, module in model.named_modules():
            if isinstance(module, MaskedBranch):
                _install_sparse(module, name, report)
        for module in model.modules():
            if type(module) is SparseAssistedPair and isinstance(module.sparse.__dict__.get("forward"),
                                                                 SparseMaskedForward):
                module.forward = SparsePairForward(module)
                if fuse:
                    fused = ConcatPairForward(module, num_threads)
                    module.upsample_concat_forward = fused.upsample_concat
                    module.concat_forward = fused.concat
    if fuse:
        _install_resampling(model, report, options)
        _install_pointwise_gemms(model, backend)
        _install_kernel_slots(model, options)
    return report


#: kernel slots a model's modules may declare as class attributes set to None (the models never
#: import the engine): recurrent state updates ``(1 - z) * h + z * c`` (BiMatting's ConvGRUs,
#: bit-identical to the three PyTorch ops) and the guided filter's full-resolution step
_KERNEL_SLOTS = {"update_forward": gru_update, "full_resolution_forward": guided_apply}


def _install_kernel_slots(model: nn.Module, options: dict) -> None:
    """Fill the empty kernel slots (``_KERNEL_SLOTS``) of the model's modules with the C kernels."""
    for module in model.modules():
        for slot, kernel in _KERNEL_SLOTS.items():
            if slot not in module.__dict__ and getattr(type(module), slot, False) is None:
                setattr(module, slot, functools.partial(kernel, **options))


def _install_pointwise_gemms(model: nn.Module, backend: str) -> None:
    """Unpadded 1x1 full-precision convs that no traced container reached (e.g. a projection head
    whose forward branches on ``x.ndim``) also run as one GEMM (2x faster than oneDNN's 1x1 conv
    on a 16 -> 4 full-resolution map here; equal up to float summation order)."""
    for module in model.modules():
        if type(module) is nn.Conv2d and "forward" not in module.__dict__ and module.kernel_size == (1, 1):
            forward = FoldedConv2dForward(module, None, False, backend)
            if forward.pointwise:
                module.forward = forward
