"""Make a submodule callable as the function of the same name.

``binarize.convert`` and ``binarize.profile`` are both a submodule and the function users call.
Importing the submodule binds the *module* as the package attribute, shadowing the lazily exported
function; making the module callable keeps ``binarize.convert(model)`` working whatever was
imported first.
"""
from __future__ import annotations

import sys
import types
from typing import Any


def make_module_callable(module_name: str, function_name: str) -> None:
    """Calling ``sys.modules[module_name]`` calls its ``function_name``."""
    module = sys.modules[module_name]

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, function_name)(*args, **kwargs)

    module.__class__ = _CallableModule
