"""binarize.nn: binary layers (BinaryConv2d, BinaryLinear), learnable shifts and block builders."""
from .blocks import CrossBlockShortcut, ElasticShortcutBlock, MaskedBranch, SparseAssistedPair
from .layers import BinaryConv2d, BinaryLinear, LearnableBias, RPReLU, RSign

__all__ = [
    "BinaryConv2d",
    "BinaryLinear",
    "CrossBlockShortcut",
    "ElasticShortcutBlock",
    "LearnableBias",
    "MaskedBranch",
    "RPReLU",
    "RSign",
    "SparseAssistedPair",
]
