"""binarize.nn: binary layers (BinaryConv2d, BinaryLinear), learnable shifts and block builders."""
from .layers import BinaryConv2d, BinaryLinear, LearnableBias, RPReLU, RSign

__all__ = ["BinaryConv2d", "BinaryLinear", "LearnableBias", "RPReLU", "RSign"]
