"""Methods: named recipes pairing an activation binarizer with a weight binarizer (plus extras).

A method is what ``BinaryConv2d(..., method="reactnet")`` and ``binarize.convert`` take. Each
built-in cites its paper; ``docs/binarizers.md`` tabulates them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

from torch import nn

from .binarizers import Binarizer, RPReLU, check_progress, get_binarizer, get_binarizer_class

__all__ = ["Method", "register_method", "get_method", "list_methods", "step_binarizers", "resolve_method"]

BinarizerSpec = Union[str, Callable[..., Binarizer]]


def _accepts(factory: Callable, name: str) -> bool:
    """Whether ``factory`` takes a keyword argument ``name`` (or **kwargs)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _build(spec: BinarizerSpec, channels: int, channel_dim: int, kind: str) -> Binarizer:
    """Instantiate a binarizer from a registry name or a factory, passing what it accepts."""
    factory = get_binarizer_class(spec) if isinstance(spec, str) else spec
    kwargs = {}
    if _accepts(factory, "channels"):
        kwargs["channels"] = channels
    if channel_dim != 1 and _accepts(factory, "channel_dim"):
        kwargs["channel_dim"] = channel_dim
    if isinstance(spec, str) and factory.kind != kind and _accepts(factory, "kind"):
        kwargs["kind"] = kind
    binarizer = get_binarizer(spec, **kwargs) if isinstance(spec, str) else factory(**kwargs)
    if not isinstance(binarizer, nn.Module) or not hasattr(binarizer, "bits"):
        raise ValueError(f"{spec!r} did not build a binarizer module with a `bits` attribute")
    return binarizer


@dataclass(frozen=True)
class Method:
    """A named binarization recipe.

    ``activation`` / ``weight``: registry names or factories (called with ``channels`` and
    ``channel_dim`` when they accept them). ``pad_value``: the value zero padding uses after
    binarization. ``post``: optional factory ``post(channels)`` of a module applied after the
    layer (RPReLU for ReActNet). ``channel_threshold``: conv layers own an unused
    ``channel_threshold`` [1, C_in, 1, 1] parameter (official BiMatting checkpoints have one).
    ``clip_weights``: the latent float weights are clipped to [-1, 1] after each optimizer step
    (BinaryNet); ``make_weight`` marks the weight binarizer (``clip_latent``) and
    :func:`binarize.ops.clip_latent_weights` does the clipping, so a trainer needs no method names.
    """

    name: str
    activation: BinarizerSpec
    weight: BinarizerSpec
    pad_value: float = 0.0
    post: Optional[Callable[..., nn.Module]] = None
    paper: str = ""
    channel_threshold: bool = False
    clip_weights: bool = False

    def make_activation(self, channels: int, channel_dim: int = 1) -> Binarizer:
        """Input binarizer for a layer with ``channels`` input channels (``channel_dim`` -1 for tokens)."""
        return _build(self.activation, channels, channel_dim, "activation")

    def make_weight(self, channels: int) -> Binarizer:
        """Weight binarizer for a layer with ``channels`` output channels."""
        binarizer = _build(self.weight, channels, 1, "weight")
        if self.clip_weights:
            binarizer.clip_latent = True
        return binarizer

    def make_post(self, channels: int, channel_dim: int = 1) -> Optional[nn.Module]:
        """Module applied after the layer's output (``None`` when the method has none)."""
        if self.post is None:
            return None
        if channel_dim != 1 and _accepts(self.post, "channel_dim"):
            return self.post(channels, channel_dim=channel_dim)
        return self.post(channels)


_METHODS: Dict[str, Method] = {}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Register ``method`` under ``method.name`` (ValueError on a duplicate unless ``overwrite``)."""
    if not isinstance(method, Method):
        raise ValueError(f"register_method expects a binarize.ops.Method, got {type(method).__name__}")
    if method.name in _METHODS and not overwrite:
        raise ValueError(f"method {method.name!r} is already registered")
    for spec in (method.activation, method.weight):
        if isinstance(spec, str):
            get_binarizer_class(spec)  # unknown binarizer name -> ValueError now, not at layer build
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name`` (ValueError listing the available ones if unknown)."""
    method = _METHODS.get(name)
    if method is None:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return method


def resolve_method(method: Union[str, Method]) -> Method:
    """Accept a method name or a ``Method`` object and return the ``Method``."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        return get_method(method)
    raise ValueError(f"method must be a name or a binarize.ops.Method, got {type(method).__name__}")


def list_methods() -> List[str]:
    """Sorted names of the registered methods."""
    return sorted(_METHODS)


def step_binarizers(model: nn.Module, progress: float) -> int:
    """Call ``step(progress)`` on every binarizer in ``model``; returns how many were stepped."""
    progress = check_progress(progress)
    count = 0
    for module in model.modules():
        if isinstance(module, Binarizer):
            module.step(progress)
            count += 1
    return count


for _method in (
    Method("bnn", "sign", "sign", clip_weights=True,
           paper="Courbariaux et al. 2016, Binarized Neural Networks (arXiv:1602.02830)"),
    Method("xnor", "xnor_activation", "xnor_weight", clip_weights=True,
           paper="Rastegari et al. 2016, XNOR-Net (ECCV)"),
    Method("dorefa", "sign", "dorefa_weight",
           paper="Zhou et al. 2016, DoReFa-Net (arXiv:1606.06160)"),
    Method("bireal", "approx_sign", "bireal_weight",
           paper="Liu et al. 2018, Bi-Real Net (ECCV)"),
    Method("reactnet", "rsign", "bireal_weight", post=RPReLU,
           paper="Liu et al. 2020, ReActNet (ECCV)"),
    Method("irnet", "irnet_activation", "irnet_weight",
           paper="Qin et al. 2020, IR-Net: Forward and Backward Information Retention (CVPR)"),
    Method("recu", "recu_activation", "recu_weight",
           paper="Xu et al. 2021, ReCU: Reviving the Dead Weights in Binary Neural Networks (ICCV)"),
    Method("bimatting", "bimatting_activation", "bimatting_weight", channel_threshold=True,
           paper="Qin et al. 2023, BiMatting: Efficient Video Matting via Binarization (NeurIPS)"),
    Method("fda", "fda_activation", "fda_weight",
           paper="Xu et al. 2021, Learning Frequency Domain Approximation for Binary Neural Networks (NeurIPS)"),
    Method("xnorpp", "sign", "xnorpp_weight",
           paper="Bulat & Tzimiropoulos 2019, XNOR-Net++: Improved Binary Neural Networks (BMVC)"),
    Method("swishsign", "swishsign", "sign",
           paper="Darabi et al. 2018, BNN+: Improved Binary Network Training (arXiv:1812.11800); Larq SwishSign"),
    Method("heaviside", "heaviside", "sign",
           paper="Larq SteHeaviside (Geiger & Team Plumerai 2020, Larq, JOSS): {0, 1} activations"),
    Method("progressive", "progressive", "sign",
           paper="bitorch ProgressiveSign (hpi-xnor/bitorch): hard tanh annealed into sign"),
):
    register_method(_method)
del _method
