"""The model zoo: registry, RVM, BGMv2, binarized RVM baselines, BiMatting, BiMobileNet, checkpoint I/O.

Importing this package registers every built-in model with ``register_model``.
"""
from __future__ import annotations

from binarize.models import baselines, bgmv2, rvm  # noqa: F401  (register rvm_mobilenetv3, the bgmv2_* models and the rvm_* baselines)
from binarize.models.bimatting import BiMatting, load_official_bimatting  # noqa: F401  (registers bimatting, bimobilenet)
from binarize.models.checkpoint import load, load_official, read_config, save, save_pretrained
from binarize.models.registry import create_model, is_model, list_models, register_model

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "is_model",
    "save",
    "load",
    "save_pretrained",
    "load_official",
    "read_config",
]
