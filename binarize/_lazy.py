"""Lazy package exports: ``name -> "module:attribute"``, imported on first access.

Keeps ``import binarize`` (and its subpackages) cheap: computing a metric never imports PyAV,
listing methods never imports fvcore.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """Return the ``__getattr__`` and ``__dir__`` for ``package`` that resolve ``exports`` lazily."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module_name, attr = target.split(":")
        value = getattr(importlib.import_module(module_name), attr)
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
