"""Video matting application: inference, metrics, data, losses, training and evaluation.

Submodules are imported lazily so that, e.g., computing metrics never imports PyAV.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "convert_video": "binarize.matting.inference:convert_video",
    "SyntheticMatting": "binarize.matting.data:SyntheticMatting",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'binarize.matting' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value
