"""Video matting metrics with the exact definitions and units of the official evaluation.

The definitions follow the low-resolution evaluator of RVM (PeterL1n/RobustVideoMatting,
``evaluation/evaluate_lr.py``), which BiMatting (htqin/BiMatting, NeurIPS 2023) reuses unchanged;
``grad(..., normalize=False)`` gives the high-resolution variant (``evaluate_hr.py``). This is our own
numpy/scipy implementation (no OpenCV): the official numbers are reproduced to float32 rounding.

Every function takes one frame as an ``H x W`` float array in [0, 1] (``fgr_*``: ``H x W x 3``) and
computes in float32, as the official evaluator does after reading 8-bit images:

===========  =====================================================================  =======
metric       definition                                                              unit
===========  =====================================================================  =======
``mad``      mean |pred - true|                                                      x 1e3
``mse``      mean (pred - true)^2                                                    x 1e3
``grad``     sum (|G(pred)| - |G(true)|)^2, G = 9x9 derivative of Gaussian, s=1.4    / 1e3
``conn``     sum |phi(pred) - phi(true)|, thresholds 0..1 step 0.1, 4-connectivity   / 1e3
``dtssd``    sqrt(mean ((pred_t - pred_t-1) - (true_t - true_t-1))^2)                x 1e2
``fgr_mad``  ``mad`` over the RGB values of pixels where true alpha > 0               x 1e3
``fgr_mse``  ``mse`` over the RGB values of pixels where true alpha > 0               x 1e3
===========  =====================================================================  =======

The first frame of a clip has no temporal difference; the official evaluator records a dtSSD of 0
for it and includes that 0 in the mean (see :func:`dtssd_sequence`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from scipy import ndimage

__all__ = [
    "mad",
    "mse",
    "grad",
    "conn",
    "dtssd",
    "dtssd_sequence",
    "fgr_mad",
    "fgr_mse",
    "gaussian_gradient_filters",
    "ALPHA_METRICS",
    "FOREGROUND_METRICS",
    "METRICS",
    "frame_metrics",
]

ArrayLike = np.ndarray


def _as_alpha(name: str, x: ArrayLike) -> np.ndarray:
    """Return ``x`` as a float32 ``H x W`` array, or raise a ValueError naming the argument."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be an H x W alpha array, got shape {tuple(arr.shape)}")
    return arr


def _check_same_shape(**arrays: np.ndarray) -> None:
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        desc = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"shape mismatch: {desc}")


def mad(pred: ArrayLike, true: ArrayLike) -> float:
    """Mean absolute difference x 1e3 (any matching shapes; alpha or colour values in [0, 1])."""
    p = np.asarray(pred, dtype=np.float32)
    t = np.asarray(true, dtype=np.float32)
    _check_same_shape(pred=p, true=t)
    if p.size == 0:
        return 0.0
    return float(np.abs(p - t).mean() * 1e3)


def mse(pred: ArrayLike, true: ArrayLike) -> float:
    """Mean squared difference x 1e3 (any matching shapes; alpha or colour values in [0, 1])."""
    p = np.asarray(pred, dtype=np.float32)
    t = np.asarray(true, dtype=np.float32)
    _check_same_shape(pred=p, true=t)
    if p.size == 0:
        return 0.0
    return float(((p - t) ** 2).mean() * 1e3)


@lru_cache(maxsize=8)
def gaussian_gradient_filters(sigma: float = 1.4, epsilon: float = 1e-2) -> Tuple[np.ndarray, np.ndarray]:
    """The official Grad filters: a Gaussian along rows times its derivative along columns.

    The half size is ``ceil(sigma * sqrt(-2 ln(sqrt(2 pi) sigma epsilon)))`` (4 for sigma 1.4, so 9 x 9),
    the x filter is normalised to unit L2 norm and the y filter is its transpose (RVM evaluate_lr.py).
    """
    half = float(np.ceil(sigma * np.sqrt(-2.0 * np.log(np.sqrt(2.0 * np.pi) * sigma * epsilon))))
    offsets = np.arange(-half, half + 1.0)
    gauss = np.exp(-(offsets**2) / (2.0 * sigma**2)) / (sigma * np.sqrt(2.0 * np.pi))
    dgauss = -offsets * gauss / sigma**2
    filter_x = np.outer(gauss, dgauss)  # [i, j] = g(i) * g'(j)
    filter_x /= np.sqrt((filter_x**2).sum())
    filter_x.setflags(write=False)
    filter_y = filter_x.T.copy()
    filter_y.setflags(write=False)
    return filter_x, filter_y


def _minmax_normalize(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the image's min and max; a constant image becomes all zeros (as cv2 does)."""
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= np.finfo(np.float64).eps:
        return np.zeros_like(x)
    return ((x.astype(np.float64) - lo) * (1.0 / (hi - lo))).astype(np.float32)


def _gradient_magnitude(x: np.ndarray, sigma: float) -> np.ndarray:
    filter_x, filter_y = gaussian_gradient_filters(sigma)
    # cv2.filter2D is a correlation; BORDER_REPLICATE is scipy's "nearest" mode.
    gx = ndimage.correlate(x.astype(np.float64), filter_x, mode="nearest")
    gy = ndimage.correlate(x.astype(np.float64), filter_y, mode="nearest")
    return np.sqrt(gx**2 + gy**2).astype(np.float32)


def grad(pred: ArrayLike, true: ArrayLike, sigma: float = 1.4, normalize: bool = True) -> float:
    """Gradient error / 1e3: squared difference of Gaussian-gradient magnitudes, summed over pixels.

    ``normalize=True`` (the low-resolution protocol) min-max normalises each image first;
    the official high-resolution evaluator skips that step (``normalize=False``).
    """
    p = _as_alpha("pred", pred)
    t = _as_alpha("true", true)
    _check_same_shape(pred=p, true=t)
    if normalize:
        p, t = _minmax_normalize(p), _minmax_normalize(t)
    diff = _gradient_magnitude(t, sigma) - _gradient_magnitude(p, sigma)
    return float((diff**2).sum() / 1000)


_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 4-connected component of ``mask`` (the first one on a tie)."""
    labels, count = ndimage.label(mask, structure=_FOUR_CONNECTED)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def conn(pred: ArrayLike, true: ArrayLike, step: float = 0.1) -> float:
    """Connectivity error / 1e3 (Rhemann et al. 2009, as implemented in RVM's evaluator).

    For each threshold in 0.1..1 the largest 4-connected component of ``pred >= t & true >= t`` is
    found; a pixel's level is the last threshold before it left that component. ``phi = 1 - d`` with
    ``d = alpha - level`` where ``d >= 0.15`` (else ``phi = 1``); the error sums ``|phi_pred - phi_true|``.
    """
    p = _as_alpha("pred", pred)
    t = _as_alpha("true", true)
    _check_same_shape(pred=p, true=t)
    thresholds = np.arange(0, 1 + step, step)  # float64, compared with float32 alphas as upstream
    level = -np.ones_like(t)
    for i in range(1, len(thresholds)):
        omega = _largest_component((t >= thresholds[i]) & (p >= thresholds[i]))
        level[(level == -1) & ~omega] = thresholds[i - 1]
    level[level == -1] = 1
    true_diff = t - level
    pred_diff = p - level
    true_phi = 1 - true_diff * (true_diff >= 0.15)
    pred_phi = 1 - pred_diff * (pred_diff >= 0.15)
    return float(np.sum(np.abs(true_phi - pred_phi)) / 1000)


def dtssd(pred_t: ArrayLike, pred_tm1: ArrayLike, true_t: ArrayLike, true_tm1: ArrayLike) -> float:
    """Temporal-gradient error x 1e2 between frames t-1 and t: sqrt of the mean squared difference of
    the predicted and true frame-to-frame changes (Erofeev et al. 2015, RVM's units)."""
    arrays = {
        "pred_t": _as_alpha("pred_t", pred_t),
        "pred_tm1": _as_alpha("pred_tm1", pred_tm1),
        "true_t": _as_alpha("true_t", true_t),
        "true_tm1": _as_alpha("true_tm1", true_tm1),
    }
    _check_same_shape(**arrays)
    d = (arrays["pred_t"] - arrays["pred_tm1"]) - (arrays["true_t"] - arrays["true_tm1"])
    return float(np.sqrt(np.sum(d**2) / d.size) * 1e2)


def dtssd_sequence(pred: ArrayLike, true: ArrayLike) -> np.ndarray:
    """Per-frame dtSSD of a ``T x H x W`` clip: 0 for the first frame (as the official evaluator)."""
    p = np.asarray(pred, dtype=np.float32)
    t = np.asarray(true, dtype=np.float32)
    if p.ndim != 3:
        raise ValueError(f"pred must be a T x H x W alpha clip, got shape {tuple(p.shape)}")
    _check_same_shape(pred=p, true=t)
    values = [0.0] + [dtssd(p[i], p[i - 1], t[i], t[i - 1]) for i in range(1, len(p))]
    return np.asarray(values, dtype=np.float64)


def _foreground_pixels(pred_fgr: ArrayLike, true_fgr: ArrayLike, true_pha: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred_fgr, dtype=np.float32)
    t = np.asarray(true_fgr, dtype=np.float32)
    a = _as_alpha("true_pha", true_pha)
    _check_same_shape(pred_fgr=p, true_fgr=t)
    if p.ndim != 3 or p.shape[:2] != a.shape:
        raise ValueError(
            f"foreground must be H x W x C matching alpha {tuple(a.shape)}, got {tuple(p.shape)}"
        )
    mask = a > 0
    return p[mask], t[mask]


def fgr_mad(pred_fgr: ArrayLike, true_fgr: ArrayLike, true_pha: ArrayLike) -> float:
    """Foreground MAD x 1e3 over the colour values of pixels where the true alpha is > 0."""
    return mad(*_foreground_pixels(pred_fgr, true_fgr, true_pha))


def fgr_mse(pred_fgr: ArrayLike, true_fgr: ArrayLike, true_pha: ArrayLike) -> float:
    """Foreground MSE x 1e3 over the colour values of pixels where the true alpha is > 0."""
    return mse(*_foreground_pixels(pred_fgr, true_fgr, true_pha))


# Names used by the evaluator, CSV columns and the official spreadsheet.
ALPHA_METRICS = ("pha_mad", "pha_mse", "pha_grad", "pha_conn", "pha_dtssd")
FOREGROUND_METRICS = ("fgr_mad", "fgr_mse")
METRICS = ALPHA_METRICS + FOREGROUND_METRICS

_PAIRWISE: Dict[str, Callable[..., float]] = {"pha_mad": mad, "pha_mse": mse, "pha_conn": conn}


def frame_metrics(
    names: Tuple[str, ...],
    pred_pha: np.ndarray,
    true_pha: np.ndarray,
    prev: Optional[Tuple[np.ndarray, np.ndarray]] = None,
    pred_fgr: Optional[np.ndarray] = None,
    true_fgr: Optional[np.ndarray] = None,
    grad_normalize: bool = True,
) -> Dict[str, float]:
    """All requested metrics of one frame; ``prev`` is ``(pred_pha, true_pha)`` of the previous frame
    (``None`` on the first frame, whose dtSSD is 0)."""
    out: Dict[str, float] = {}
    for name in names:
        if name in _PAIRWISE:
            out[name] = _PAIRWISE[name](pred_pha, true_pha)
        elif name == "pha_grad":
            out[name] = grad(pred_pha, true_pha, normalize=grad_normalize)
        elif name == "pha_dtssd":
            out[name] = 0.0 if prev is None else dtssd(pred_pha, prev[0], true_pha, prev[1])
        elif name in FOREGROUND_METRICS:
            if pred_fgr is None or true_fgr is None:
                raise ValueError(f"{name} needs the predicted and true foreground")
            fn = fgr_mad if name == "fgr_mad" else fgr_mse
            out[name] = fn(pred_fgr, true_fgr, true_pha)
        else:
            raise ValueError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
    return out
