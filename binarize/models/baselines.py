"""The paper's binarized RVM baselines: ``rvm_<method>`` = ``binarize.convert(rvm_mobilenetv3(), method)``.

BiMatting (Qin et al., NeurIPS 2023, Table 1) compares against RVM-MobileNetV3 binarized with
classic BNN methods. Every 3x3 / 1x1 convolution becomes a ``BinaryConv2d`` of the method except
the layers that stay full precision under the usual policy (see ``FULL_PRECISION``):

- the backbone stem ``backbone.body.conv_stem`` (first layer: raw RGB input, ``keep_first``);
- the projection heads ``project_mat.conv`` and ``project_seg.conv`` (the outputs);
- the refiner's last 1x1 conv ``refiner.conv.6`` (the last layer, ``keep_last``: it emits the
  guided filter's coefficients A) and its fixed 3x3 box filter ``refiner.box_filter``
  (an averaging filter of constant 1/9 weights, not a learned feature extractor);

MobileNetV3's depthwise convolutions are binarized too, as in the paper: its Figure 1 gives
RVM-BNN 0.57 MB of storage, which only a conversion that binarizes them reaches (0.59 MB here,
``binarize.profile``; 0.94 MB with them in full precision). ``keep_depthwise=True`` keeps them
32-bit (one input channel per filter keeps little information after binarization), a stronger
baseline with 1.3-1.6x the storage; the comparisons in docs/matting.md measured before this
default changed used it.

``bgmv2_<method>`` do the same for Background Matting V2 (MobileNetV2 by default, ``backbone=`` for
ResNet-50/101): the stem, the base's output conv ``decoder.conv4`` (alpha, foreground, the error
map that selects the refined patches, the refiner's hidden channels), the refiner's output conv
``refiner.conv4`` and the depthwise convs stay full precision (see ``docs/models.md``).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from binarize.models.bgmv2 import bgmv2_mobilenetv2, bgmv2_resnet50, bgmv2_resnet101
from binarize.models.registry import register_model
from binarize.models.rvm import rvm_mobilenetv3

__all__ = ["FULL_PRECISION", "BGMV2_FULL_PRECISION", "METHODS", "binarized_rvm", "binarized_bgmv2"]

FULL_PRECISION = ("project_mat.conv", "project_seg.conv", "refiner.box_filter")
METHODS = ("bnn", "xnor", "dorefa", "bireal", "reactnet", "irnet", "recu")


def binarized_rvm(method: str, keep_depthwise: bool = False, **kwargs: Any) -> nn.Module:
    """RVM-MobileNetV3 (``rvm_mobilenetv3(**kwargs)``) converted with ``method``: the stem, heads and
    the refiner's output conv and box filter stay full precision, the depthwise convs too only when
    ``keep_depthwise`` (the paper binarizes them; see the module docstring)."""
    from binarize.convert import convert

    return convert(rvm_mobilenetv3(**kwargs), method=method, keep_first=True, keep_last=True,
                   keep_depthwise=keep_depthwise, skip=list(FULL_PRECISION), inplace=True)


@register_model
def rvm_bnn(keep_depthwise: bool = False, **kwargs: Any) -> nn.Module:
    """RVM binarized with BNN (Courbariaux et al. 2016): sign activations and weights."""
    return binarized_rvm("bnn", keep_depthwise, **kwargs)


@register_model
def rvm_xnor(keep_depthwise: bool = False, **kwargs: Any) -> nn.Module:
    """RVM binarized with XNOR-Net (Rastegari et al. 2016): scaled sign weights and activations."""
    return binarized_rvm("xnor", keep_depthwise, **kwargs)


@register_model
def rvm_dorefa(keep_depthwise: bool = False, **kwargs: Any) -> nn.Module:
    """RVM binarized with 1-bit DoReFa-Net (Zhou et al. 2016)."""
    return binarized_rvm("dorefa", keep_depthwise, **kwargs)


@register_model
def rvm_bireal(keep_depthwise: bool = False, **kwargs: Any) -> nn.Module:
    """RVM binarized with Bi-Real Net (Liu et al. 2018): ApproxSign, magnitude-aware weights."""
    return binarized_rvm("bireal", keep_depthwise, **kwargs)


@register_model
def rvm_reactnet(keep_depthwise: bool = False, **kwargs: Any) -> nn.Module:
    """RVM binarized with ReActNet (Liu et al. 2020): RSign, RPReLU."""
    return binarized_rvm("reactnet", keep_depthwise, **kwargs)


@register_model
def rvm_irnet(keep_depthwise: bool = False, **kwargs: Any) -> nn.Module:
    """RVM binarized with IR-Net (Qin et al. 2020): Libra-PB weights, EDE."""
    return binarized_rvm("irnet", keep_depthwise, **kwargs)


@register_model
def rvm_recu(keep_depthwise: bool = False, **kwargs: Any) -> nn.Module:
    """RVM binarized with ReCU (Xu et al. 2021): rectified clamp of the weights."""
    return binarized_rvm("recu", keep_depthwise, **kwargs)


# ----------------------------------------------------------------------------------------------
# BGMv2 baselines: bgmv2_<method> = convert(bgmv2_mobilenetv2(), method) (or another backbone)
# ----------------------------------------------------------------------------------------------
#: BGMv2 layers kept in full precision besides the stem (keep_first), the refiner's output conv
#: ``refiner.conv4`` (keep_last) and the depthwise convs (keep_depthwise): the base's output conv
#: ``decoder.conv4``, which emits alpha, the foreground residual, the error map that selects the
#: refined patches, and the refiner's 32 hidden channels.
BGMV2_FULL_PRECISION = ("decoder.conv4",)
_BGMV2_BACKBONES = {"mobilenetv2": bgmv2_mobilenetv2, "resnet50": bgmv2_resnet50, "resnet101": bgmv2_resnet101}


def binarized_bgmv2(method: str, backbone: str = "mobilenetv2", **kwargs: Any) -> nn.Module:
    """BGMv2 (``bgmv2_<backbone>(**kwargs)``) converted with ``method``: the stem, both output convs
    (``decoder.conv4``, ``refiner.conv4``) and the depthwise convs stay full precision."""
    from binarize.convert import convert

    if backbone not in _BGMV2_BACKBONES:
        raise ValueError(f"unknown BGMv2 backbone {backbone!r}; expected one of {', '.join(_BGMV2_BACKBONES)}")
    return convert(_BGMV2_BACKBONES[backbone](**kwargs), method=method, keep_first=True, keep_last=True,
                   keep_depthwise=True, skip=list(BGMV2_FULL_PRECISION), inplace=True)


def _register_bgmv2(method: str, paper: str) -> None:
    def factory(backbone: str = "mobilenetv2", **kwargs: Any) -> nn.Module:
        return binarized_bgmv2(method, backbone, **kwargs)

    name = f"bgmv2_{method}"
    factory.__name__ = factory.__qualname__ = name
    factory.takes_background = True  # type: ignore[attr-defined]  (a background-matting model)
    factory.__doc__ = (f"BGMv2 (MobileNetV2 unless ``backbone=``) binarized with {paper}; kwargs as "
                       "``bgmv2_mobilenetv2`` (refine_mode, backbone_scale, ...).")
    globals()[name] = register_model(factory)


for _method, _paper in (("bnn", "BNN (Courbariaux et al. 2016)"), ("xnor", "XNOR-Net (Rastegari et al. 2016)"),
                        ("dorefa", "1-bit DoReFa-Net (Zhou et al. 2016)"), ("bireal", "Bi-Real Net (Liu et al. 2018)"),
                        ("reactnet", "ReActNet (Liu et al. 2020)"), ("irnet", "IR-Net (Qin et al. 2020)"),
                        ("recu", "ReCU (Xu et al. 2021)")):
    _register_bgmv2(_method, _paper)
