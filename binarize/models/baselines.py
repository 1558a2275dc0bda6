"""The paper's binarized RVM baselines: ``rvm_<method>`` = ``binarize.convert(rvm_mobilenetv3(), method)``.

BiMatting (Qin et al., NeurIPS 2023, Table 1) compares against RVM-MobileNetV3 binarized with
classic BNN methods. Every 3x3 / 1x1 convolution becomes a ``BinaryConv2d`` of the method except
the layers that stay full precision under the usual policy (see ``FULL_PRECISION``):

- the backbone stem ``backbone.body.conv_stem`` (first layer: raw RGB input, ``keep_first``);
- the projection heads ``project_mat.conv`` and ``project_seg.conv`` (the outputs);
- the refiner's last 1x1 conv ``refiner.conv.6`` (the last layer, ``keep_last``: it emits the
  guided filter's coefficients A) and its fixed 3x3 box filter ``refiner.box_filter``
  (an averaging filter of constant 1/9 weights, not a learned feature extractor);
- MobileNetV3's depthwise convolutions (``keep_depthwise``: one input channel per filter
  keeps too little information after binarization).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from binarize.models.registry import register_model
from binarize.models.rvm import rvm_mobilenetv3

__all__ = ["FULL_PRECISION", "METHODS", "binarized_rvm"]

FULL_PRECISION = ("project_mat.conv", "project_seg.conv", "refiner.box_filter")
METHODS = ("bnn", "xnor", "dorefa", "bireal", "reactnet", "irnet", "recu")


def binarized_rvm(method: str, **kwargs: Any) -> nn.Module:
    """RVM-MobileNetV3 converted with ``method`` (stem, heads, refiner output/box filter and
    depthwise convs stay full precision)."""
    from binarize.convert import convert

    return convert(rvm_mobilenetv3(**kwargs), method=method, keep_first=True, keep_last=True,
                   keep_depthwise=True, skip=list(FULL_PRECISION), inplace=True)


@register_model
def rvm_bnn(**kwargs: Any) -> nn.Module:
    """RVM binarized with BNN (Courbariaux et al. 2016): sign activations and weights."""
    return binarized_rvm("bnn", **kwargs)


@register_model
def rvm_xnor(**kwargs: Any) -> nn.Module:
    """RVM binarized with XNOR-Net (Rastegari et al. 2016): scaled sign weights and activations."""
    return binarized_rvm("xnor", **kwargs)


@register_model
def rvm_dorefa(**kwargs: Any) -> nn.Module:
    """RVM binarized with 1-bit DoReFa-Net (Zhou et al. 2016)."""
    return binarized_rvm("dorefa", **kwargs)


@register_model
def rvm_bireal(**kwargs: Any) -> nn.Module:
    """RVM binarized with Bi-Real Net (Liu et al. 2018): ApproxSign, magnitude-aware weights."""
    return binarized_rvm("bireal", **kwargs)


@register_model
def rvm_reactnet(**kwargs: Any) -> nn.Module:
    """RVM binarized with ReActNet (Liu et al. 2020): RSign, RPReLU."""
    return binarized_rvm("reactnet", **kwargs)


@register_model
def rvm_irnet(**kwargs: Any) -> nn.Module:
    """RVM binarized with IR-Net (Qin et al. 2020): Libra-PB weights, EDE."""
    return binarized_rvm("irnet", **kwargs)


@register_model
def rvm_recu(**kwargs: Any) -> nn.Module:
    """RVM binarized with ReCU (Xu et al. 2021): rectified clamp of the weights."""
    return binarized_rvm("recu", **kwargs)
