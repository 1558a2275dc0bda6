"""Video matting application: inference, metrics, data, losses, training and evaluation.

Submodules are imported lazily so that, e.g., computing metrics never imports PyAV.
"""
from __future__ import annotations

from binarize._lazy import lazy_exports

_LAZY = {
    "convert_video": "binarize.matting.inference:convert_video",
    "matte_clip": "binarize.matting.inference:matte_clip",
    "SyntheticMatting": "binarize.matting.data:SyntheticMatting",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
