"""Binary layers: ``BinaryConv2d`` and ``BinaryLinear``, drop-in subclasses of the torch layers.

A layer owns its *what* (latent float weights, binarizers, padding value, ``post`` module) and
delegates *how* to an implementation: ``"simulated"`` (float ops, differentiable, the default)
or any callable installed with ``set_implementation`` (the packed engine). Switching the
implementation never changes structure, names or state_dict keys.

``LearnableBias``, ``RSign`` and ``RPReLU`` are defined in ``binarize.ops`` (methods build them and
ops may not import nn) and re-exported here.
"""

from typing import Any, Callable, Optional, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import nn

from binarize.ops.binarizers import Binarizer, LearnableBias, RPReLU, RSign
from binarize.ops.methods import Method, resolve_method

__all__ = ["BinaryConv2d", "BinaryLinear", "LearnableBias", "RSign", "RPReLU"]

SIMULATED = "simulated"


class _BinaryLayerMixin:
    """Shared plumbing: binarizers from a method, precision properties, implementation switch."""

    __jit_unused_properties__ = ["input_bits", "weight_bits"]
    # parameters kept only so official checkpoints load strictly; no forward reads them, so compact
    # checkpoints do not store them (official BiMatting's channel_threshold)
    vestigial_parameters = ("channel_threshold",)

    def _setup_binary(
        self,
        method: Union[str, Method, None],
        input_binarizer: Optional[nn.Module],
        weight_binarizer: Optional[nn.Module],
        pad_value: Optional[float],
        in_channels: int,
        out_channels: int,
        channel_dim: int,
        device: Any,
        dtype: Any,
    ) -> Optional[Method]:
        if method is None and (input_binarizer is None or weight_binarizer is None):
            raise ValueError("method=None needs both input_binarizer and weight_binarizer")
        recipe = resolve_method(method) if method is not None else None
        self.method = recipe.name if recipe is not None else "custom"
        if input_binarizer is None:
            input_binarizer = recipe.make_activation(in_channels, channel_dim=channel_dim)
        if weight_binarizer is None:
            weight_binarizer = recipe.make_weight(out_channels)
        for role, binarizer in (("input_binarizer", input_binarizer), ("weight_binarizer", weight_binarizer)):
            if not isinstance(binarizer, nn.Module):
                raise ValueError(f"{role} must be an nn.Module (a binarize.ops.Binarizer), got {type(binarizer).__name__}")
        post = recipe.make_post(out_channels, channel_dim=channel_dim) if recipe is not None else None
        self.input_binarizer = input_binarizer.to(device=device, dtype=dtype)
        self.weight_binarizer = weight_binarizer.to(device=device, dtype=dtype)
        self.post = (post if post is not None else nn.Identity()).to(device=device, dtype=dtype)
        if pad_value is None:
            pad_value = recipe.pad_value if recipe is not None else 0.0
        self.pad_value = float(pad_value)
        self.implementation = SIMULATED
        self.__dict__["_impl"] = None
        return recipe

    # -- precision --------------------------------------------------------------------------
    @property
    def input_bits(self) -> int:
        """Precision of the layer's input, read from its input binarizer (32 if it declares none)."""
        return int(getattr(self.input_binarizer, "bits", 32))

    @property
    def weight_bits(self) -> int:
        """Precision of the layer's weights, read from its weight binarizer (32 if it declares none)."""
        return int(getattr(self.weight_binarizer, "bits", 32))

    # -- implementation switch ---------------------------------------------------------------
    def set_implementation(self, impl: Optional[Callable[[torch.Tensor], torch.Tensor]], name: Optional[str] = None) -> None:
        """Run ``impl(x)`` instead of the simulated forward (``None`` restores the simulation).

        ``impl`` is stored outside the module tree, so state_dict keys and structure never change.
        ``name`` (default: ``impl.implementation_name`` or ``"custom"``) becomes ``self.implementation``.
        """
        if impl is not None and not callable(impl):
            raise ValueError(f"implementation must be callable or None, got {type(impl).__name__}")
        self.__dict__["_impl"] = impl
        if impl is None:
            self.implementation = SIMULATED
        else:
            self.implementation = name or str(getattr(impl, "implementation_name", "custom"))

    @torch.jit.unused
    def _run_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__["_impl"](x)

    def _binary_repr(self) -> str:
        return f"method={self.method}, pad_value={self.pad_value:g}, implementation={self.implementation}"


_Layer = TypeVar("_Layer", bound=nn.Module)


def _copy_parameters(source: nn.Module, layer: _Layer) -> _Layer:
    """Copy ``source``'s weight (and bias, if any) into ``layer``, keeping the weight's
    ``requires_grad`` (both directions: from_float and to_float)."""
    with torch.no_grad():
        layer.weight.copy_(source.weight)
        if source.bias is not None:
            layer.bias.copy_(source.bias)
    layer.weight.requires_grad_(source.weight.requires_grad)
    return layer


class BinaryConv2d(_BinaryLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` with binarized input and weights.

    Simulated forward: ``xb = input_binarizer(x)``; ``wb = weight_binarizer(weight)``; pad ``xb``
    explicitly with ``pad_value`` (padding_mode ``"zeros"``; other modes pad the float input
    *before* binarization); conv with padding 0; ``+ bias``; ``post``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        method: Union[str, Method, None] = "reactnet",
        input_binarizer: Optional[Binarizer] = None,
        weight_binarizer: Optional[Binarizer] = None,
        pad_value: Optional[float] = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        recipe = self._setup_binary(method, input_binarizer, weight_binarizer, pad_value, in_channels,
                                    out_channels, 1, device, dtype)
        if recipe is not None and recipe.channel_threshold:
            # official BiMatting BiConv2d carries this parameter; its forward never reads it
            self.channel_threshold = nn.Parameter(torch.zeros(1, in_channels, 1, 1, device=device, dtype=dtype))
        self._explicit_padding = [int(p) for p in self._reversed_padding_repeated_twice]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.implementation != "simulated":
            return self._run_impl(x)
        return self.post(self._simulated_conv(x))

    def _simulated_conv(self, x: torch.Tensor) -> torch.Tensor:
        pad = self._explicit_padding
        has_pad = any(p != 0 for p in pad)
        if self.padding_mode != "zeros" and has_pad:
            xb = self.input_binarizer(F.pad(x, pad, mode=self.padding_mode))
        else:
            xb = self.input_binarizer(x)
            if has_pad:
                xb = F.pad(xb, pad, mode="constant", value=self.pad_value)
        wb = self.weight_binarizer(self.weight)
        return F.conv2d(xb, wb, self.bias, self.stride, 0, self.dilation, self.groups)

    @classmethod
    def from_float(cls, module: nn.Conv2d, method: Union[str, Method, None] = "reactnet", **kwargs: Any) -> "BinaryConv2d":
        """A BinaryConv2d with ``module``'s configuration and a copy of its weight and bias."""
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"BinaryConv2d.from_float expects an nn.Conv2d, got {type(module).__name__}")
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        layer = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, padding,
                    module.dilation, module.groups, module.bias is not None, module.padding_mode,
                    device=module.weight.device, dtype=module.weight.dtype, method=method, **kwargs)
        return _copy_parameters(module, layer)

    def to_float(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` with this layer's configuration and a copy of its latent weights."""
        padding = self.padding if isinstance(self.padding, str) else tuple(self.padding)
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        return _copy_parameters(self, conv)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._binary_repr()


class BinaryLinear(_BinaryLayerMixin, nn.Linear):
    """``nn.Linear`` with binarized input and weights; input [..., in_features] (2-D, or 3-D tokens).

    Simulated forward: ``post(F.linear(input_binarizer(x), weight_binarizer(weight), bias))``.
    Per-channel binarizer parameters and ``post`` act on the last dim (``channel_dim=-1``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        method: Union[str, Method, None] = "reactnet",
        input_binarizer: Optional[Binarizer] = None,
        weight_binarizer: Optional[Binarizer] = None,
        pad_value: Optional[float] = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_binary(method, input_binarizer, weight_binarizer, pad_value, in_features, out_features, -1,
                           device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.implementation != "simulated":
            return self._run_impl(x)
        xb = self.input_binarizer(x)
        wb = self.weight_binarizer(self.weight)
        return self.post(F.linear(xb, wb, self.bias))

    @classmethod
    def from_float(cls, module: nn.Linear, method: Union[str, Method, None] = "reactnet", **kwargs: Any) -> "BinaryLinear":
        """A BinaryLinear with ``module``'s shape and a copy of its weight and bias."""
        if not isinstance(module, nn.Linear):
            raise ValueError(f"BinaryLinear.from_float expects an nn.Linear, got {type(module).__name__}")
        layer = cls(module.in_features, module.out_features, module.bias is not None,
                    device=module.weight.device, dtype=module.weight.dtype, method=method, **kwargs)
        return _copy_parameters(module, layer)

    def to_float(self) -> nn.Linear:
        """The plain ``nn.Linear`` with a copy of this layer's latent weights."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        return _copy_parameters(self, linear)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._binary_repr()
