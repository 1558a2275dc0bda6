"""Loader of the compiled kernel library (``binarize/engine/_bitconv*.so``) through ctypes.

The library is built by ``pip install`` (setup.py, optional).  When it is missing, ``library()``
returns ``None`` once with a one-line warning and the engine uses its pure-PyTorch path.
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import pathlib
import sys
import warnings
from typing import Optional

KERNELS = {"auto": 0, "generic": 1, "popcnt": 2, "avx2": 3, "avx512": 4, "avx2_hybrid": 5, "avx2_nibble": 6}
KERNEL_NAMES = {value: name for name, value in KERNELS.items()}
_ABI_VERSION = 19

_state: dict = {"loaded": False, "lib": None, "warned": False}
_selections = 0  # set_kernel calls so far

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_int = ctypes.c_int


def _find_library_file() -> Optional[pathlib.Path]:
    """Path of the built extension next to this file, or None."""
    here = pathlib.Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_bitconv{suffix}"
        if candidate.exists():
            return candidate
    return None


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of every exported function."""
    lib.bz_kernel_available.argtypes, lib.bz_kernel_available.restype = [_int], _int
    lib.bz_set_kernel.argtypes, lib.bz_set_kernel.restype = [_int], _int
    lib.bz_active_kernel.argtypes, lib.bz_active_kernel.restype = [], _int
    lib.bz_openmp_enabled.argtypes, lib.bz_openmp_enabled.restype = [], _int
    lib.bz_abi_version.argtypes, lib.bz_abi_version.restype = [], _int
    lib.bz_pack.argtypes = [_ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _int]
    lib.bz_pack.restype = None
    lib.bz_conv.argtypes = [
        _ptr, _ptr, _i64, _i64, _i64, _ptr,  # in, x, x strides (n, c, pixel), x_bias
        _i64, _i64, _i64, _i64, _i64,  # N, H, W, G, CG
        _ptr, _ptr, _ptr, _int, _i64, _i64,  # w, wpc, tables, table_entry, O, OGP
        _i64, _i64, _i64, _i64, _i64, _i64, _i64, _i64,  # KH, KW, SH, SW, PH, PW, DH, DW
        _int, _i64, _i64,  # pad_mode, OH, OW
        _ptr, _ptr, _int, _ptr, _ptr,  # scale, shift, nops, ops, op_args
        _ptr, _i64, _int,  # residual, res_channels, res_halves
        _ptr, _ptr, _i64, _ptr,  # out, positions, npos, acc_weight
        _ptr, _ptr,  # out_bits, out_bias
        _ptr, _ptr, _i64, _int,  # mix_w, mix_b, mix_out, mix_relu
        _int,  # nthreads
    ]
    lib.bz_conv.restype = _int
    lib.bz_pointwise.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _int, _ptr, _ptr, _int]
    lib.bz_pointwise.restype = _int
    lib.bz_avgpool2x2.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _int]
    lib.bz_avgpool2x2.restype = _int
    lib.bz_upsample2x.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _i64, _int]
    lib.bz_upsample2x.restype = _int
    lib.bz_sparse_fconv.argtypes = [
        _ptr, _i64, _i64, _i64, _i64,  # x, N, C, H, W
        _ptr, _ptr, _i64, _i64, _i64,  # w [C][KH][KW][O], bias, O, KH, KW
        _i64, _i64, _i64, _i64, _i64, _i64,  # PH, PW, DH, DW, OH, OW
        _int, _ptr, _i64, _ptr, _ptr, _int,  # relu, positions, npos, acc_weight, out, nthreads
    ]
    lib.bz_sparse_fconv.restype = _int
    lib.bz_upsample_concat_pack.argtypes = [_ptr, _i64, _i64, _i64, _i64, _int, _ptr, _ptr, _int, _ptr, _ptr, _int]
    lib.bz_upsample_concat_pack.restype = _int
    lib.bz_concat_pack.argtypes = [_i64, _i64, _i64, _int, _ptr, _ptr, _int, _ptr, _ptr, _int]
    lib.bz_concat_pack.restype = _int
    lib.bz_gru_update.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _int]
    lib.bz_gru_update.restype = _int
    lib.bz_guided_apply.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr, _int]
    lib.bz_guided_apply.restype = _int
    lib.bz_masked_add.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _i64, _int]
    lib.bz_masked_add.restype = _int


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, or None (with a one-line warning, once) when it is not built."""
    if _state["loaded"]:
        return _state["lib"]
    _state["loaded"] = True
    path = _find_library_file()
    reason = "the C extension is not built"
    if path is not None and sys.byteorder == "little":
        try:
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            if lib.bz_abi_version() == _ABI_VERSION:
                _state["lib"] = lib
                return lib
            reason = f"{path.name} is from another version (rebuild it)"
        except (OSError, AttributeError) as exc:
            reason = f"{path.name} could not be loaded ({exc})"
    elif path is not None:
        reason = "the packed layout assumes a little-endian CPU"
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            f"binarize.engine: {reason}; using the slower pure-PyTorch fallback "
            "(build it with `pip install -e .` or `python setup.py build_ext --inplace`)",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


def available() -> bool:
    """True when the compiled kernels can be used."""
    return library() is not None


def set_kernel(name: str) -> str:
    """Force a kernel ("auto", "generic", "popcnt", "avx2", "avx2_hybrid", "avx2_nibble", "avx512"); returns
    the one that will run (one the CPU lacks falls back to the automatic choice)."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; available: {', '.join(KERNELS)}")
    lib = library()
    if lib is None:
        return "torch"
    global _selections
    _selections += 1
    return KERNEL_NAMES[lib.bz_set_kernel(KERNELS[name])]


def selections() -> int:
    """How many times ``set_kernel`` was called: a call plan made before a change is stale."""
    return _selections


def active_kernel() -> str:
    """Name of the kernel that runs now ("torch" without the compiled library)."""
    lib = library()
    return "torch" if lib is None else KERNEL_NAMES[lib.bz_active_kernel()]


def kernel_info() -> dict:
    """What runs here: the selected kernel, the kernels this CPU supports, and OpenMP."""
    lib = library()
    if lib is None:
        return {"backend": "torch", "kernel": "torch", "supported": [], "openmp": False}
    supported = [name for name, value in KERNELS.items() if value and lib.bz_kernel_available(value)]
    return {
        "backend": "c",
        "kernel": KERNEL_NAMES[lib.bz_active_kernel()],
        "supported": supported,
        "openmp": bool(lib.bz_openmp_enabled()),
    }
