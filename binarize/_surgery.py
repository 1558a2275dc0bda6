"""Module-tree surgery shared by ``convert`` (layers) and its activation policy (activations).

Both swap module objects in place and must keep a module shared by several parents shared, so
both look modules up by object identity, never by name.
"""
from __future__ import annotations

from typing import Dict, List

from torch import nn


def module_names(model: nn.Module) -> Dict[int, List[str]]:
    """Every name under which each module object appears (shared modules have several)."""
    names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def replace_modules(model: nn.Module, replacements: Dict[int, nn.Module]) -> nn.Module:
    """Swap module objects (keyed by ``id``) in every parent slot, so shared modules stay shared;
    returns the new root (``model`` itself unless the root was replaced)."""
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[key] = replacements[id(child)]
    return replacements.get(id(model), model)
