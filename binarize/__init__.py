"""binarize: 1-bit neural networks for PyTorch.

Top-level conveniences are imported lazily so that ``import binarize`` stays cheap and the
package reads top-down (ops -> nn -> convert/profile -> models -> matting/engine -> cli).
"""
from __future__ import annotations

from binarize._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> "module:attribute"
_LAZY = {
    "convert": "binarize.convert:convert",
    "unconvert": "binarize.convert:unconvert",
    "ConversionReport": "binarize.convert:ConversionReport",
    "profile": "binarize.profile:profile",
    "ProfileReport": "binarize.profile:ProfileReport",
    "create_model": "binarize.models:create_model",
    "list_models": "binarize.models:list_models",
    "save": "binarize.models.checkpoint:save",
    "load": "binarize.models.checkpoint:load",
    "deploy": "binarize.engine:deploy",
    "clip_latent_weights": "binarize.ops:clip_latent_weights",
}

__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
