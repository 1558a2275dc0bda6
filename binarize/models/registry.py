"""timm-style model registry: ``register_model``, ``create_model``, ``list_models``.

A model is registered by decorating a factory ``fn(**kwargs) -> nn.Module``; its name is the
function's name (or the name given to ``register_model("name")``). ``create_model`` records the
registry name and the keyword arguments on the model (``model.model_name``,
``model.model_kwargs``) so that a compact checkpoint can rebuild it from the file alone, attaches
``save_pretrained`` and optionally loads a checkpoint:

- an official PyTorch state dict (``.pth``/``.pt``/``.ckpt``): loaded with
  ``torch.load(weights_only=True)`` and mapped onto the model with the model's own key map
  (a ``map_official_state_dict(state_dict) -> state_dict`` method, see ``checkpoint.py``);
- our compact ``.safetensors`` file written by ``binarize.save``;
- a ``save_pretrained`` directory (``model.safetensors`` + ``config.json``).
"""
from __future__ import annotations

import fnmatch
import os
import types
from typing import Any, Callable, Dict, List, Optional, TypeVar, Union, overload

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "is_model", "model_factory"]

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

_MODELS: Dict[str, Factory] = {}


@overload
def register_model(fn: F) -> F: ...


@overload
def register_model(fn: str) -> Callable[[F], F]: ...


def register_model(fn: Union[F, str]) -> Union[F, Callable[[F], F]]:
    """Register a model factory under its function name (``@register_model``) or a given name
    (``@register_model("name")``); registering a name twice with a different factory is an error."""
    if isinstance(fn, str):
        name = fn

        def decorator(factory: F) -> F:
            _add(name, factory)
            return factory

        return decorator
    _add(fn.__name__, fn)
    return fn


def _add(name: str, factory: Factory) -> None:
    if not callable(factory):
        raise ValueError(f"register_model: {name!r} is not callable")
    existing = _MODELS.get(name)
    if existing is not None and _qualname(existing) != _qualname(factory):
        raise ValueError(f"register_model: model {name!r} is already registered by {_qualname(existing)}")
    _MODELS[name] = factory


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _ensure_builtin_models() -> None:
    """Import the zoo so that built-in models are registered even if only this module was imported."""
    import binarize.models  # noqa: F401  (registers the built-in models on import)


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Sorted names of the registered models, optionally filtered by an fnmatch ``pattern``
    (e.g. ``"rvm_*"``)."""
    _ensure_builtin_models()
    names = sorted(_MODELS)
    if pattern is not None:
        names = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    return names


def is_model(name: str) -> bool:
    """True when ``name`` is a registered model."""
    _ensure_builtin_models()
    return name in _MODELS


def model_factory(name: str) -> Factory:
    """The registered factory for ``name``; unknown name -> ``ValueError`` listing the models."""
    _ensure_builtin_models()
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(sorted(_MODELS))}") from None


def create_model(
    name: str, checkpoint: Optional[Union[str, os.PathLike]] = None, **kwargs: Any
) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` and optionally load ``checkpoint``
    (official ``.pth`` state dict, compact ``.safetensors`` file, or ``save_pretrained`` directory)."""
    factory = model_factory(name)
    if checkpoint is not None:
        kwargs = _kwargs_with_checkpoint_config(name, checkpoint, kwargs)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
    tag_model(model, name, kwargs)
    if checkpoint is not None:
        from binarize.models.checkpoint import load_checkpoint_into

        load_checkpoint_into(model, checkpoint)
    return model


def _kwargs_with_checkpoint_config(
    name: str, checkpoint: Union[str, os.PathLike], kwargs: Dict[str, Any]
) -> Dict[str, Any]:
    """For a compact checkpoint: check it holds ``name`` and start from its recorded kwargs
    (explicit ``kwargs`` win)."""
    from binarize.models.checkpoint import is_compact, read_config

    if not os.path.exists(checkpoint) or not is_compact(checkpoint):
        return kwargs
    config = read_config(checkpoint)
    if config["model"] != name:
        raise ValueError(f"{checkpoint} holds model {config['model']!r}, not {name!r}")
    return {**config["kwargs"], **kwargs}


def tag_model(model: nn.Module, name: str, kwargs: Dict[str, Any]) -> nn.Module:
    """Record the registry entry on ``model`` and attach ``save_pretrained`` (idempotent)."""
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    if not hasattr(model, "save_pretrained"):
        from binarize.models.checkpoint import save_pretrained

        model.save_pretrained = types.MethodType(save_pretrained, model)
    return model
