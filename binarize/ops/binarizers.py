"""Binarizers: small modules that map a float tensor to a (scaled) 1-bit tensor.

Each binarizer documents four things: its forward (values), its backward (the surrogate
gradient), its scale, and its sign(0) convention. Straight-through estimators are written as
``sign(x) + d * (x - x.detach())`` with ``d`` the detached surrogate derivative: the residual is
exactly zero in the forward pass (so the forward value is exactly the binarized value) and its
gradient is ``d``. This form is TorchScript-scriptable and exportable (no autograd.Function);
inputs must be finite (an infinite input gives NaN through ``inf - inf``).

Conventions shared by every method except ``bimatting``: sign(0) = +1 (``x >= 0 -> +1``, as in
BNN, Courbariaux et al. 2016, Eq. 1), which is also what the packed engine computes. ``bimatting``
uses ``torch.sign`` (sign(0) = 0) for parity with the official checkpoints.

The learnable shifts used by methods (``LearnableBias``, ``RPReLU``) live here too because ops
may not import nn; ``binarize.nn`` re-exports them.
"""

import math
from typing import Callable, Dict, List, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Binarizer",
    "register_binarizer",
    "get_binarizer",
    "list_binarizers",
    "sign_plus",
    "straight_through",
    "straight_through_identity",
    "needs_grad",
    "clipped_ste_grad",
    "approx_sign_grad",
    "ede_grad",
    "ede_schedule",
    "recu_tau_schedule",
    "fourier_sign_grad",
    "swish_sign_grad",
    "fda_schedule",
    "clip_latent_weights",
    "Identity",
    "SignSTE",
    "XNORWeight",
    "XNORActivation",
    "DoReFaWeight",
    "ApproxSign",
    "BiRealWeight",
    "RSign",
    "IRNetWeight",
    "IRNetActivation",
    "ReCUWeight",
    "ReCUActivation",
    "BiMattingWeight",
    "BiMattingActivation",
    "DoReFaActivation",
    "Heaviside",
    "SwishSign",
    "ProgressiveSign",
    "FDAActivation",
    "FDAWeight",
    "NoiseAdaptation",
    "XNORPPWeight",
    "LearnableBias",
    "RPReLU",
]

_KINDS = ("activation", "weight")


# --------------------------------------------------------------------------------------------
# base class and registry
# --------------------------------------------------------------------------------------------
class Binarizer(nn.Module):
    """Base class of every binarizer.

    ``bits`` is the precision of the output (1 for a binarizer, 32 for identity) and ``kind`` says
    whether it binarizes activations or weights; layers and ``binarize.profile`` read these
    attributes, never class names. ``step(progress)`` advances a training schedule.
    ``clip_latent`` (weight binarizers): the layer's latent float weights are clipped to [-1, 1]
    after each optimizer step by :func:`clip_latent_weights` (BinaryNet); methods declaring
    ``clip_weights=True`` set it on the weight binarizers they build.
    """

    bits: int = 1
    kind: str = "activation"
    clip_latent: bool = False

    def __init__(self, kind: Optional[str] = None) -> None:
        super().__init__()
        if kind is not None:
            if kind not in _KINDS:
                raise ValueError(f"binarizer kind must be one of {_KINDS}, got {kind!r}")
            self.kind = kind

    def step(self, progress: float) -> None:
        """Advance the training schedule to ``progress`` in [0, 1] (default: nothing to do)."""
        check_progress(progress)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, kind={self.kind!r}"


def check_progress(progress: float) -> float:
    """Validate a training progress value (fraction of training done) and return it as float."""
    progress = float(progress)
    if not 0.0 <= progress <= 1.0 or math.isnan(progress):
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    return progress


_REGISTRY: Dict[str, Type[Binarizer]] = {}


def register_binarizer(name: str) -> Callable[[Type[Binarizer]], Type[Binarizer]]:
    """Class decorator registering a ``Binarizer`` subclass under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"binarizer name must be a non-empty string, got {name!r}")

    def decorator(cls: Type[Binarizer]) -> Type[Binarizer]:
        if not (isinstance(cls, type) and issubclass(cls, Binarizer)):
            raise ValueError(f"register_binarizer({name!r}) expects a Binarizer subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"binarizer {name!r} is already registered ({_REGISTRY[name].__name__})")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def get_binarizer(name: str, **kwargs) -> Binarizer:
    """Return a new instance of the binarizer registered as ``name``."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown binarizer {name!r}; available: {', '.join(list_binarizers())}")
    return cls(**kwargs)


def get_binarizer_class(name: str) -> Type[Binarizer]:
    """Return the class registered as ``name`` (ValueError if unknown)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown binarizer {name!r}; available: {', '.join(list_binarizers())}")
    return cls


def list_binarizers() -> List[str]:
    """Sorted names of all registered binarizers."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------
# functional helpers
# --------------------------------------------------------------------------------------------
def sign_plus(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1: ``+1 where x >= 0 else -1`` (also for -0.0), in x's dtype.

    ``x + 0.0`` turns -0.0 into +0.0 (IEEE 754), then copysign reads the sign bit; this is several
    times faster than ``torch.where(x >= 0, 1, -1)`` on CPU.
    """
    return torch.copysign(torch.ones((), dtype=x.dtype, device=x.device), x + 0.0)


def needs_grad(x: torch.Tensor) -> bool:
    """Whether autograd may differentiate through ``x`` (else binarizers skip the STE arithmetic).

    Always true while tracing, so that a trace records the differentiable graph whatever the
    example input's ``requires_grad`` and grad mode (and trace checks see one graph).
    """
    if torch.jit.is_tracing():
        return True
    return x.requires_grad and torch.is_grad_enabled()


def straight_through(value: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Return ``value`` in the forward pass with d(out)/dx = ``grad`` (elementwise) in the backward."""
    return value.detach() + grad.detach() * (x - x.detach())


def straight_through_identity(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Return ``value`` in the forward pass with d(out)/dx = 1 (the plain straight-through estimator)."""
    return value.detach() + (x - x.detach())


def clipped_ste_grad(x: torch.Tensor) -> torch.Tensor:
    """Clipped straight-through derivative (BNN): 1 where |x| <= 1, else 0."""
    return (x.abs() <= 1).to(x.dtype)


def approx_sign_grad(x: torch.Tensor) -> torch.Tensor:
    """ApproxSign derivative (Bi-Real Net, Liu et al. 2018, Eq. 4): max(0, 2 - 2|x|)."""
    return torch.clamp(2 - 2 * x.abs(), min=0)


def ede_grad(x: torch.Tensor, k: float, t: float) -> torch.Tensor:
    """IR-Net Error Decay Estimator derivative (Qin et al. 2020, Eq. 11): k * t * (1 - tanh^2(t x))."""
    th = torch.tanh(x * t)
    return k * t * (1 - th * th)


def ede_schedule(progress: float, t_min: float = 0.1, t_max: float = 10.0) -> tuple:
    """IR-Net's (k, t) at a training progress: t = T_min * 10^(p * log10(T_max / T_min)), k = max(1/t, 1)."""
    p = check_progress(progress)
    t = t_min * 10 ** (p * math.log10(t_max / t_min))
    return max(1.0 / t, 1.0), t


def recu_tau_schedule(progress: float, tau_min: float = 0.85, tau_max: float = 0.99) -> float:
    """ReCU's exponential tau schedule (Xu et al. 2021): tau_min + (tau_max - tau_min)(e^p - 1)/(e - 1)."""
    p = check_progress(progress)
    return tau_min + (tau_max - tau_min) * (math.exp(p) - 1.0) / (math.e - 1.0)


def fourier_sign_grad(x: torch.Tensor, n: int, omega: float = 0.1) -> torch.Tensor:
    """FDA's derivative of the Fourier series of sign (Xu et al. 2021, NeurIPS; official code as copied in BiBench).

    sign(x) ~ (4/pi) sum_{i=0}^{n} sin((2i+1) omega x) / (2i+1), so the surrogate derivative is
    ``(4 omega / pi) sum_{i=0}^{n} cos((2i+1) omega x)``, zeroed where |x| > 1 (as the code).
    The sum is evaluated in closed form, sin(2(n+1) theta) / (2 sin theta) with theta = omega x
    (its limit n + 1 at theta = 0).
    """
    theta = x * omega
    small = theta.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(theta), theta)
    series = torch.where(small, torch.full_like(theta, float(n + 1)),
                         torch.sin(2 * (n + 1) * safe) / (2 * torch.sin(safe)))
    return (4 * omega / math.pi) * series * (x.abs() <= 1).to(x.dtype)


def fda_schedule(progress: float, n_min: int = 9, n_max: int = 18, noise_max: float = 0.1) -> tuple:
    """FDA's (n, noise scale) at a training progress p: n = n_min + floor(p (n_max - n_min)),
    noise scale = noise_max (1 + cos(pi p)) / 2 (the official code: 9 -> 18 terms, 0.1 -> 0)."""
    p = check_progress(progress)
    return int(n_min + math.floor(p * (n_max - n_min))), noise_max * 0.5 * (1.0 + math.cos(math.pi * p))


def swish_sign_grad(x: torch.Tensor, beta: float = 5.0) -> torch.Tensor:
    """Derivative of BNN+'s SignSwish (Darabi et al. 2018), as Larq / bitorch ``SwishSign``:
    beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)), written as
    2 beta s (1 - s) (2 + beta x (1 - 2 s)) with s = sigmoid(beta x) (the same function, finite
    for any finite x; beta x is clamped to +-60 where the derivative is below 1e-24)."""
    z = torch.clamp(x * beta, -60.0, 60.0)
    s = torch.sigmoid(z)
    return 2 * beta * s * (1 - s) * (2 + z * (1 - 2 * s))


def _per_output_mean_abs(w: torch.Tensor) -> torch.Tensor:
    """mean |w| over all dims but the first (output channel), keeping dims for broadcasting."""
    if w.dim() < 2:
        return w.abs().mean().reshape([1] * max(w.dim(), 1))
    return w.abs().mean(dim=list(range(1, w.dim())), keepdim=True)


def _channel_shape(x: torch.Tensor, channel_dim: int) -> List[int]:
    """Broadcast shape [1, .., C, .., 1] putting -1 at ``channel_dim`` of ``x``."""
    shape = [1] * x.dim()
    dim = channel_dim if channel_dim >= 0 else x.dim() + channel_dim
    shape[dim] = -1
    return shape


# --------------------------------------------------------------------------------------------
# binarizers
# --------------------------------------------------------------------------------------------
@register_binarizer("identity")
class Identity(Binarizer):
    """Full precision pass-through (bits = 32): forward x, backward identity, no scale."""

    bits = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@register_binarizer("sign")
class SignSTE(Binarizer):
    """BNN sign with the clipped straight-through estimator (Courbariaux et al. 2016).

    Forward: +1 if x >= 0 else -1 (sign(0) = +1). Scale: none.
    Backward: grad * 1{|x| <= 1}. Used for activations (default) or weights (``kind="weight"``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = sign_plus(x)
        if not needs_grad(x):
            return value
        return straight_through(value, x, clipped_ste_grad(x))


@register_binarizer("xnor_weight")
class XNORWeight(Binarizer):
    """XNOR-Net weight binarizer (Rastegari et al. 2016, Eq. 4-7).

    Forward: alpha_o * sign(W) with alpha_o = mean|W_o| per output channel; sign(0) = +1.
    Backward (default, ``detach_scale=False``): the paper's form, differentiating through alpha as
    the authors' code does (``updateBinaryGradWeight``):
    dL/dW = g * alpha * 1{|W| <= 1} + sign(W) * mean_o(g * sign(W)). The code then multiplies the
    whole gradient by n (1 - 1/C_in), a learning-rate rescaling left out here.
    ``detach_scale=True``: BiBench's form, the scale detached and the straight-through estimator
    written as clamp(W, -1, 1) (no alpha factor): dL/dW = g * 1{|W| <= 1}.
    The default is the paper's: the method is named after it, and it is the exact derivative of
    the forward through the scale (with the clipped STE for sign).
    """

    kind = "weight"

    def __init__(self, detach_scale: bool = False) -> None:
        super().__init__()
        self.detach_scale = bool(detach_scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = _per_output_mean_abs(w)
        value = sign_plus(w)
        if not needs_grad(w):
            return alpha * value
        if self.detach_scale:
            return straight_through(alpha * value, w, clipped_ste_grad(w))
        return alpha * straight_through(value, w, clipped_ste_grad(w))

    def extra_repr(self) -> str:
        return f"detach_scale={self.detach_scale}, " + super().extra_repr()


@register_binarizer("xnor_activation")
class XNORActivation(Binarizer):
    """XNOR-Net activation binarizer with a per-sample scale (Rastegari et al. 2016, Sec. 3.2).

    Forward: K_b * sign(A) with K_b = mean|A_b| over every non-batch dim (C, H, W for images,
    N, C for tokens); sign(0) = +1. The paper's per-position K map is simplified to one scalar
    per sample (as BiBench). Backward (default): clipped STE through sign, and the gradient flows
    through K (not detached). ``detach_scale=True``: BiBench's form, g * 1{|A| <= 1}.
    """

    def __init__(self, detach_scale: bool = False) -> None:
        super().__init__()
        self.detach_scale = bool(detach_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"xnor_activation expects a batched tensor [B, ...], got shape {x.shape}")
        scale = x.abs().mean(dim=list(range(1, x.dim())), keepdim=True)
        value = sign_plus(x)
        if not needs_grad(x):
            return scale * value
        if self.detach_scale:
            return straight_through(scale * value, x, clipped_ste_grad(x))
        return scale * straight_through(value, x, clipped_ste_grad(x))

    def extra_repr(self) -> str:
        return f"detach_scale={self.detach_scale}, " + super().extra_repr()


@register_binarizer("dorefa_weight")
class DoReFaWeight(Binarizer):
    """1-bit DoReFa-Net weights (Zhou et al. 2016, Eq. 7).

    Forward: E(|W|) * sign(W) with one scalar E(|W|) = mean|W| over the whole tensor; sign(0) = +1.
    Backward: plain straight-through (dL/dW = dL/dW_b), as in the paper; the scale is detached.
    """

    kind = "weight"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = w.abs().mean().detach()
        value = scale * sign_plus(w)
        if not needs_grad(w):
            return value
        return straight_through_identity(value, w)


@register_binarizer("approx_sign")
class ApproxSign(Binarizer):
    """Bi-Real Net ApproxSign (Liu et al. 2018, Eq. 3-4).

    Forward: +1 if x >= 0 else -1 (sign(0) = +1); no scale.
    Backward: the derivative of the piecewise polynomial, grad * max(0, 2 - 2|x|).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = sign_plus(x)
        if not needs_grad(x):
            return value
        return straight_through(value, x, approx_sign_grad(x))


@register_binarizer("bireal_weight")
class BiRealWeight(Binarizer):
    """Bi-Real Net magnitude-aware weights (Liu et al. 2018, Eq. 6; also ReActNet's weights).

    Forward: alpha_o * sign(W), alpha_o = mean|W_o| per output channel, DETACHED; sign(0) = +1.
    Backward: clipped straight-through, grad * 1{|W| <= 1} (as in the Bi-Real/ReActNet code).
    """

    kind = "weight"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = _per_output_mean_abs(w).detach()
        value = alpha * sign_plus(w)
        if not needs_grad(w):
            return value
        return straight_through(value, w, clipped_ste_grad(w))


@register_binarizer("rsign")
class RSign(Binarizer):
    """ReActNet RSign (Liu et al. 2020, Eq. 1): sign with a learnable per-channel threshold.

    Forward: +1 if x >= threshold_c else -1. The paper assigns -1 at x == threshold; we use +1
    there (like every non-bimatting method and the packed engine); ties have measure zero.
    Scale: none. Backward: ApproxSign, grad * max(0, 2 - 2|x - threshold|), to x and to threshold
    (with the opposite sign). ``threshold`` has shape [channels]; ``channel_dim`` is 1 for images
    [B, C, H, W] and -1 for tokens [B, N, C].
    """

    def __init__(self, channels: int, channel_dim: int = 1, kind: Optional[str] = None) -> None:
        super().__init__(kind)
        if int(channels) <= 0:
            raise ValueError(f"RSign needs a positive channel count, got {channels}")
        self.channels = int(channels)
        self.channel_dim = int(channel_dim)
        self.threshold = nn.Parameter(torch.zeros(self.channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = x - self.threshold.to(x.dtype).reshape(_channel_shape(x, self.channel_dim))
        value = sign_plus(shifted)
        if not needs_grad(shifted):
            return value
        return straight_through(value, shifted, approx_sign_grad(shifted))

    def extra_repr(self) -> str:
        return f"{self.channels}, channel_dim={self.channel_dim}, " + super().extra_repr()


class _EDEMixin:
    """IR-Net's Error Decay Estimator state: t from T_min to T_max, k = max(1/t, 1)."""

    def _init_ede(self, t_min: float, t_max: float) -> None:
        if not 0 < t_min < t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.k, self.t = ede_schedule(0.0, self.t_min, self.t_max)

    def step(self, progress: float) -> None:
        """Set (k, t) for the training progress (IR-Net Eq. 12)."""
        self.k, self.t = ede_schedule(progress, self.t_min, self.t_max)


@register_binarizer("irnet_weight")
class IRNetWeight(_EDEMixin, Binarizer):
    """IR-Net Libra-PB weights with the EDE backward (Qin et al. 2020, Eq. 8-12).

    Forward: W_std = (W - mean_o W) / std_o(W) (per output channel, unbiased std as in the IR-Net
    code), then 2^round(log2(mean|W_std|_o)) * sign(W_std); the power-of-two scale is detached;
    sign(0) = +1. Backward: EDE k*t*(1 - tanh^2(t W_std)) through the standardisation (autograd).
    ``step(progress)`` moves t from ``t_min`` to ``t_max``.
    """

    kind = "weight"

    def __init__(self, t_min: float = 0.1, t_max: float = 10.0) -> None:
        super().__init__()
        self._init_ede(t_min, t_max)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        flat = w.reshape(w.shape[0], -1)
        correction = 1 if flat.shape[1] > 1 else 0
        centred = flat - flat.mean(dim=1, keepdim=True)
        std = centred.std(dim=1, keepdim=True, correction=correction)
        standard = centred / std.clamp_min(1e-12)
        scale = torch.pow(2.0, torch.round(torch.log2(standard.abs().mean(dim=1, keepdim=True)))).detach()
        binary = sign_plus(standard)
        if needs_grad(standard):
            binary = straight_through(binary, standard, ede_grad(standard, self.k, self.t))
        return (scale * binary).reshape(w.shape)

    def extra_repr(self) -> str:
        return f"k={self.k:.4g}, t={self.t:.4g}, " + super().extra_repr()


@register_binarizer("irnet_activation")
class IRNetActivation(_EDEMixin, Binarizer):
    """IR-Net activations: sign forward (sign(0) = +1), no scale, EDE backward k*t*(1 - tanh^2(t x))."""

    def __init__(self, t_min: float = 0.1, t_max: float = 10.0) -> None:
        super().__init__()
        self._init_ede(t_min, t_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = sign_plus(x)
        if not needs_grad(x):
            return value
        return straight_through(value, x, ede_grad(x, self.k, self.t))

    def extra_repr(self) -> str:
        return f"k={self.k:.4g}, t={self.t:.4g}, " + super().extra_repr()


@register_binarizer("recu_weight")
class ReCUWeight(Binarizer):
    """ReCU weights (Xu et al. 2021, "ReCU: Reviving the Dead Weights in BNNs", Eq. 6-14).

    Forward (as the official z-hXu/ReCU code): W0 = W - mean_o W; W1 = W0 / (sqrt(var_o W0 + 1e-5) /
    (2 sqrt 2)); clamp W1 to [-Q, Q] with Q = -mean|W1| * ln(2 - 2 tau) (the tau quantile of a
    Laplace fit, i.e. [Q(1-tau), Q(tau)]); output alpha_o * sign(clamped), sign(0) = +1, where
    alpha [channels] is the learned per-output-channel scale (the paper scales the conv output;
    folding it into the weight is the same for a linear layer). Backward: identity STE through
    sign, zero outside the clamp, through the standardisation; alpha gets its own gradient; Q is
    detached. ``tau`` (buffer) follows ``recu_tau_schedule`` via ``step``; starts at tau_min.
    ``alpha`` starts at 1 (the official code draws it from U(0, 1); a BatchNorm usually follows).
    A layer with one weight per output channel (depthwise 1x1, ``Linear(1, n)``) uses the biased
    variance (0) where the official unbiased one is NaN.
    """

    kind = "weight"

    def __init__(self, channels: int, tau_min: float = 0.85, tau_max: float = 0.99) -> None:
        super().__init__()
        if int(channels) <= 0:
            raise ValueError(f"ReCU needs a positive output channel count, got {channels}")
        if not 0.5 < tau_min <= tau_max < 1.0:
            raise ValueError(f"need 0.5 < tau_min <= tau_max < 1, got {tau_min}, {tau_max}")
        self.channels = int(channels)
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.alpha = nn.Parameter(torch.ones(self.channels))
        self.register_buffer("tau", torch.tensor(self.tau_min))

    def step(self, progress: float) -> None:
        """Set tau for the training progress (ReCU's exponential schedule)."""
        self.tau.fill_(recu_tau_schedule(progress, self.tau_min, self.tau_max))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and w.shape[0] != self.channels:
            raise ValueError(f"ReCU binarizer built for {self.channels} output channels, got weight of shape {w.shape}")
        dims = list(range(1, w.dim()))
        # one weight per output channel: the official unbiased variance is 0/0 = NaN; use 0 (the
        # centred weight is exactly 0, so the layer outputs alpha_o * (+1) and stays finite)
        count = 1
        for d in dims:
            count *= w.shape[d]
        correction = 1 if count > 1 else 0
        centred = w - w.mean(dim=dims, keepdim=True)
        variance = centred.var(dim=dims, keepdim=True, correction=correction)
        standard = centred / (torch.sqrt(variance + 1e-5) / (2 * math.sqrt(2)))
        q = (-standard.abs().mean() * torch.log(2 - 2 * self.tau.to(w.dtype))).detach()
        clamped = torch.maximum(torch.minimum(standard, q), -q)
        binary = sign_plus(clamped)
        if needs_grad(clamped):
            binary = straight_through_identity(binary, clamped)
        return self.alpha.to(w.dtype).reshape([-1] + [1] * (w.dim() - 1)) * binary

    def extra_repr(self) -> str:
        return f"{self.channels}, tau={float(self.tau):.4g}, " + super().extra_repr()


@register_binarizer("recu_activation")
class ReCUActivation(Binarizer):
    """ReCU activations (official z-hXu/ReCU code): sign forward (sign(0) = +1), no scale.

    Training mode: a0 = x / s with s = sqrt(var(x) + 1e-5), the unbiased variance per sample over
    C, H, W (``channel_dim=1``, convolutions) or per token over the features (``channel_dim=-1``,
    ``BinaryLinear``, as the official ``ReCULinear``); sign(a0) == sign(x). Backward: ApproxSign on
    a0, h = g * max(0, 2 - 2|a0|), then (``through_std=True``, the default, as the official code's
    autograd) through the division:
    dL/dx = h / s - (x - mu) * sum(h * x) / ((N - 1) s^3), the sums over the normalised group.
    ``through_std=False``: dL/dx = h (the standardisation only selects the estimator's window).
    Eval mode: ApproxSign on x itself, as the official code. One element per group: biased
    variance (0) instead of the official NaN.
    """

    def __init__(self, channel_dim: int = 1, through_std: bool = True) -> None:
        super().__init__()
        self.channel_dim = int(channel_dim)
        self.through_std = bool(through_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = sign_plus(x)
        if not needs_grad(x):
            return value
        if not (self.training and x.dim() >= 2):
            return straight_through(value, x, approx_sign_grad(x))
        dims = list(range(1, x.dim())) if self.channel_dim == 1 else [x.dim() - 1]
        count = 1
        for d in dims:
            count *= x.shape[d]
        correction = 1 if count > 1 else 0
        normalised = x / torch.sqrt(x.var(dim=dims, keepdim=True, correction=correction) + 1e-5)
        if not self.through_std:
            return straight_through(value, x, approx_sign_grad(normalised.detach()))
        return straight_through(value, normalised, approx_sign_grad(normalised))

    def extra_repr(self) -> str:
        return f"channel_dim={self.channel_dim}, through_std={self.through_std}, " + super().extra_repr()


@register_binarizer("bimatting_weight")
class BiMattingWeight(Binarizer):
    """BiMatting weights (Qin et al. 2023, NeurIPS; official htqin/BiMatting ``BiConv2d``).

    Forward: W' = W - mean_o(W) per output channel, then alpha_o * sign(W') with
    alpha_o = mean|W'_o| DETACHED, ``torch.sign`` semantics (sign(0) = 0).
    Backward: straight through clamp(W', -1, 1): dL/dW' = g * 1{|W'| <= 1}, then through the
    centring, dL/dW = m - mean_o(m) with m = g * 1{|W'| <= 1}.
    """

    kind = "weight"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        dims = list(range(1, w.dim()))
        centred = w - w.mean(dim=dims, keepdim=True) if dims else w - w.mean()
        alpha = _per_output_mean_abs(centred).detach()
        value = alpha * torch.sign(centred)
        if not needs_grad(centred):
            return value
        return straight_through(value, centred, clipped_ste_grad(centred))


@register_binarizer("bimatting_activation")
class BiMattingActivation(Binarizer):
    """BiMatting activations (official ``BinaryActivation``): ``torch.sign`` (sign(0) = 0), no scale.

    Backward: clipped STE, grad * 1{|x| <= 1} (the official double straight-through through
    clamp(x, -1, 1) reduces to this).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = torch.sign(x)
        if not needs_grad(x):
            return value
        return straight_through(value, x, clipped_ste_grad(x))


@register_binarizer("dorefa_activation")
class DoReFaActivation(Binarizer):
    """DoReFa-Net 1-bit activations (Zhou et al. 2016, Sec. 2.4; tensorpack ``dorefa.py``).

    Forward: quantize_1(clip(x, 0, 1)) = round(clip(x, 0, 1)) in **{0, 1}** (round half to even,
    as ``tf.round``: 0.5 -> 0). Backward: straight through the rounding and the clip's
    derivative, g * 1{0 <= x <= 1}. No scale. The packed engine computes with +-1 inputs and has
    no equivalent, so ``deploy`` keeps a layer using it simulated (listed in its report).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = torch.round(torch.clamp(x, 0.0, 1.0))
        if not needs_grad(x):
            return value
        return straight_through(value, x, ((x >= 0) & (x <= 1)).to(x.dtype))


@register_binarizer("heaviside")
class Heaviside(Binarizer):
    """Heaviside step with a clipped straight-through estimator (Larq ``SteHeaviside``).

    Forward: 1 if x > 0 else 0 (values **{0, 1}**; x = 0 -> 0). Backward: g * 1{|x| <= clip_value}
    (``clip_value`` 1 as Larq). No scale. ``deploy`` keeps a layer using it simulated (the packed
    engine's inputs are +-1).
    """

    def __init__(self, clip_value: float = 1.0, kind: Optional[str] = None) -> None:
        super().__init__(kind)
        if not float(clip_value) > 0:
            raise ValueError(f"heaviside clip_value must be positive, got {clip_value}")
        self.clip_value = float(clip_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = (x > 0).to(x.dtype)
        if not needs_grad(x):
            return value
        return straight_through(value, x, (x.abs() <= self.clip_value).to(x.dtype))

    def extra_repr(self) -> str:
        return f"clip_value={self.clip_value:g}, " + super().extra_repr()


def _plain_sign_spec(binarizer: Binarizer) -> Dict[str, Optional[torch.Tensor]]:
    """``packed_spec`` of a binarizer whose eval-mode forward is sign+(x) (refused in training mode)."""
    if binarizer.training:
        raise ValueError(f"{type(binarizer).__name__} computes sign only in eval mode; call .eval() before deploy")
    return {"threshold": None, "sample_scale": False}


@register_binarizer("swishsign")
class SwishSign(Binarizer):
    """BNN+ SignSwish estimator (Darabi et al. 2018, "BNN+: Improved Binary Network Training";
    Larq / bitorch ``SwishSign``).

    Forward: sign+(x) (sign(0) = +1, as Larq and bitorch). No scale. Backward: the derivative of
    SS_beta(x) = 2 sigmoid(beta x) (1 + beta x (1 - sigmoid(beta x))) - 1, i.e.
    g * beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)); ``beta`` 5 as Larq's default.
    Used for activations (default) or weights (``kind="weight"``).
    """

    def __init__(self, beta: float = 5.0, kind: Optional[str] = None) -> None:
        super().__init__(kind)
        if not float(beta) > 0:
            raise ValueError(f"swishsign beta must be positive, got {beta}")
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = sign_plus(x)
        if not needs_grad(x):
            return value
        return straight_through(value, x, swish_sign_grad(x, self.beta))

    @torch.jit.unused
    def packed_spec(self) -> Dict[str, Optional[torch.Tensor]]:
        """The packed engine's description: plain sign+(x)."""
        return _plain_sign_spec(self)

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, " + super().extra_repr()


@register_binarizer("progressive")
class ProgressiveSign(Binarizer):
    """Progressive sign (bitorch ``ProgressiveSign``): a hard tanh that steepens into sign.

    Training mode: hardtanh(x / max(1 - T, 1e-7)) with the temperature T = 1 - a^(-b p) at the
    training progress p (``step(p)``; a = 4, b = 10 as bitorch), so p = 0 gives hardtanh(x) and
    p = 1 a slope of 4^10 ~ 1e6. Backward: identity straight-through (g, as bitorch's
    ``ProgressiveSignFunctionTrain``). Eval mode: sign+(x) (sign(0) = +1), which is what the
    packed engine computes. Used for activations (default) or weights (``kind="weight"``).
    """

    def __init__(self, alpha: float = 4.0, beta: float = 10.0, kind: Optional[str] = None) -> None:
        super().__init__(kind)
        if not (float(alpha) > 1 and float(beta) > 0):
            raise ValueError(f"progressive sign needs alpha > 1 and beta > 0, got {alpha}, {beta}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.slope = 1.0
        self.step(0.0)

    def step(self, progress: float) -> None:
        """Set the hard tanh's slope 1 / max(alpha^(-beta p), 1e-7) for the training progress p."""
        p = check_progress(progress)
        self.slope = 1.0 / max(self.alpha ** (-self.beta * p), 1e-7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            value = torch.clamp(x * self.slope, -1.0, 1.0)
        else:
            value = sign_plus(x)
        if not needs_grad(x):
            return value
        return straight_through_identity(value, x)

    @torch.jit.unused
    def packed_spec(self) -> Dict[str, Optional[torch.Tensor]]:
        """The packed engine's description: plain sign+(x) (eval mode only)."""
        return _plain_sign_spec(self)

    def extra_repr(self) -> str:
        return f"slope={self.slope:.4g}, " + super().extra_repr()


class _FDAMixin:
    """FDA's schedule state: n Fourier terms (9 -> 18) and the noise scale (0.1 -> 0)."""

    def _init_fda(self, omega: float, n_min: int, n_max: int, noise_max: float) -> None:
        if not (float(omega) > 0 and 0 <= int(n_min) <= int(n_max) and float(noise_max) >= 0):
            raise ValueError(f"FDA needs omega > 0, 0 <= n_min <= n_max, noise_max >= 0; got "
                             f"{omega}, {n_min}, {n_max}, {noise_max}")
        self.omega, self.n_min, self.n_max, self.noise_max = float(omega), int(n_min), int(n_max), float(noise_max)
        self.n, self.noise_scale = fda_schedule(0.0, self.n_min, self.n_max, self.noise_max)

    def step(self, progress: float) -> None:
        """Set (n, noise scale) for the training progress (``fda_schedule``)."""
        self.n, self.noise_scale = fda_schedule(progress, self.n_min, self.n_max, self.noise_max)


class NoiseAdaptation(nn.Module):
    """FDA's noise adaptation module for activations: a per-position two-layer MLP over channels.

    e(x) = W2 relu(W1 x) + 0.1 sin(x) (no biases; hidden width C // 64, or C // 4 below 64
    channels, at least 1), applied along ``channel_dim``; as the official ``NoiseAdaption_a``.
    """

    def __init__(self, channels: int, channel_dim: int = 1) -> None:
        super().__init__()
        channels = int(channels)
        hidden = max(channels // 64 if channels >= 64 else channels // 4, 1)
        self.channel_dim = int(channel_dim)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim if self.channel_dim >= 0 else x.dim() + self.channel_dim
        last = x.movedim(dim, -1)
        mlp = self.fc2(F.relu(self.fc1(last))).movedim(-1, dim)
        return mlp + 0.1 * torch.sin(x)


@register_binarizer("fda_activation")
class FDAActivation(_FDAMixin, Binarizer):
    """FDA activations (Xu et al. 2021, "Learning Frequency Domain Approximation for Binary Neural
    Networks", NeurIPS): sign forward with the Fourier-series gradient and noise adaptation.

    Forward: sign+(x) (sign(0) = +1; the code uses torch.sign), no scale; in training mode plus
    ``noise_scale * e(x)`` (:class:`NoiseAdaptation`, the learned correction of the truncated
    series), so the training-mode output is not binary until the noise scale reaches 0 at the end
    of the schedule. Eval mode: sign+(x) only (the deployed, end-of-schedule network).
    Backward: ``fourier_sign_grad(x, n, omega)`` (omega = 0.1) plus the noise branch's autograd.
    ``step(p)``: n = 9 + floor(9 p) terms, noise scale 0.05 (1 + cos(pi p)) (0.1 -> 0).
    """

    def __init__(self, channels: int, channel_dim: int = 1, omega: float = 0.1, n_min: int = 9,
                 n_max: int = 18, noise_max: float = 0.1, noise: bool = True) -> None:
        super().__init__()
        if int(channels) <= 0:
            raise ValueError(f"FDA needs a positive channel count, got {channels}")
        self._init_fda(omega, n_min, n_max, noise_max)
        self.channels = int(channels)
        self.use_noise = bool(noise)
        self.noise = NoiseAdaptation(self.channels, channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = sign_plus(x)
        if needs_grad(x):
            value = straight_through(value, x, fourier_sign_grad(x, self.n, self.omega))
        if self.training and self.use_noise and self.noise_scale > 0:
            value = value + self.noise_scale * self.noise(x)
        return value

    @torch.jit.unused
    def packed_spec(self) -> Dict[str, Optional[torch.Tensor]]:
        """The packed engine's description: plain sign+(x) (eval mode only)."""
        return _plain_sign_spec(self)

    def extra_repr(self) -> str:
        return f"{self.channels}, n={self.n}, noise_scale={self.noise_scale:.4g}, " + super().extra_repr()


@register_binarizer("fda_weight")
class FDAWeight(_FDAMixin, Binarizer):
    """FDA weights (Xu et al. 2021; official code as in BiBench ``FDAConv2d``).

    Forward: alpha_o * sign+(W) with alpha_o = mean|W_o| DETACHED. Backward:
    g * alpha_o * ``fourier_sign_grad(W, n, omega)``. ``step(p)`` schedules n as the activations.
    The official weight noise-adaptation branch (an MLP over each filter's C_in*k*k weights) is
    not included: weight binarizers are built from the output channel count only.
    """

    kind = "weight"

    def __init__(self, omega: float = 0.1, n_min: int = 9, n_max: int = 18) -> None:
        super().__init__()
        self._init_fda(omega, n_min, n_max, 0.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        alpha = _per_output_mean_abs(w).detach()
        value = sign_plus(w)
        if not needs_grad(w):
            return alpha * value
        return alpha * straight_through(value, w, fourier_sign_grad(w, self.n, self.omega))

    def extra_repr(self) -> str:
        return f"n={self.n}, " + super().extra_repr()


@register_binarizer("xnorpp_weight")
class XNORPPWeight(Binarizer):
    """XNOR-Net++ weights (Bulat & Tzimiropoulos 2019, BMVC), the per-output-channel variant.

    Forward: gamma_o * sign+(W) with gamma [channels] a learned scale (init 1, as BiBench), which
    the paper applies to the conv output; folded into the weight here (identical without a bias).
    The paper's factorised alpha (x) beta (x) gamma over (out-channels, H_out, W_out) ties a model
    to one output resolution; this is its out-channel factor only. Backward: clipped STE,
    dL/dW = g * gamma_o * 1{|W| <= 1}; gamma gets sum(g * sign(W)) per channel.
    """

    kind = "weight"

    def __init__(self, channels: int) -> None:
        super().__init__()
        if int(channels) <= 0:
            raise ValueError(f"XNOR-Net++ needs a positive output channel count, got {channels}")
        self.channels = int(channels)
        self.scale = nn.Parameter(torch.ones(self.channels))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and w.shape[0] != self.channels:
            raise ValueError(f"XNOR-Net++ binarizer built for {self.channels} output channels, got weight of shape {w.shape}")
        value = sign_plus(w)
        if needs_grad(w):
            value = straight_through(value, w, clipped_ste_grad(w))
        return self.scale.to(w.dtype).reshape([-1] + [1] * (w.dim() - 1)) * value

    def extra_repr(self) -> str:
        return f"{self.channels}, " + super().extra_repr()


def clip_latent_weights(model: nn.Module, bound: float = 1.0) -> int:
    """Clip the latent float weights of ``model``'s binary layers to [-bound, bound] in place.

    BinaryNet (Courbariaux et al. 2016, Algorithm 1) clips the real-valued weights
    after every update so that they stay where the clipped straight-through estimator passes a
    gradient. Applies to every module with a ``weight`` parameter whose ``weight_binarizer`` has
    ``clip_latent`` set (methods with ``clip_weights=True``: ``bnn``, ``xnor``); call it after
    each ``optimizer.step()``. Returns the number of layers clipped.
    """
    bound = float(bound)
    if not bound > 0:
        raise ValueError(f"clip bound must be positive, got {bound}")
    count = 0
    with torch.no_grad():
        for module in model.modules():
            binarizer = getattr(module, "weight_binarizer", None)
            weight = getattr(module, "weight", None)
            if binarizer is None or not isinstance(weight, torch.Tensor) or not getattr(binarizer, "clip_latent", False):
                continue
            weight.clamp_(-bound, bound)
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# learnable shifts (re-exported by binarize.nn)
# --------------------------------------------------------------------------------------------
class LearnableBias(nn.Module):
    """A learnable per-channel shift ``x + bias`` (ReActNet's RSign/RPReLU shifts, BiMatting's ``move``).

    ``bias`` has shape [1, C, 1, 1] (the key/shape of official checkpoints); it is broadcast along
    ``channel_dim`` (1 for [B, C, H, W] or [B, C]; -1 for tokens [B, N, C]).
    """

    def __init__(self, channels: int, channel_dim: int = 1) -> None:
        super().__init__()
        if int(channels) <= 0:
            raise ValueError(f"LearnableBias needs a positive channel count, got {channels}")
        self.channels = int(channels)
        self.channel_dim = int(channel_dim)
        self.bias = nn.Parameter(torch.zeros(1, self.channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and self.channel_dim == 1:
            return x + self.bias
        return x + self.bias.reshape(_channel_shape(x, self.channel_dim))

    def extra_repr(self) -> str:
        return f"{self.channels}, channel_dim={self.channel_dim}"


class RPReLU(nn.Module):
    """ReActNet RPReLU (Liu et al. 2020, Eq. 3): shift, per-channel PReLU, shift.

    f(x) = PReLU(x - gamma) + zeta; submodules ``shift_in`` (adds -gamma, a LearnableBias),
    ``prelu`` (``nn.PReLU(C)``, init slope 0.25) and ``shift_out`` (adds zeta).
    """

    def __init__(self, channels: int, channel_dim: int = 1, init: float = 0.25) -> None:
        super().__init__()
        self.channel_dim = int(channel_dim)
        self.shift_in = LearnableBias(channels, channel_dim)
        self.prelu = nn.PReLU(int(channels), init=init)
        self.shift_out = LearnableBias(channels, channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shift_in(x)
        dim = self.channel_dim if self.channel_dim >= 0 else x.dim() + self.channel_dim
        if dim == 1 or x.dim() == 1:
            x = F.prelu(x, self.prelu.weight)
        else:
            x = F.prelu(x.movedim(dim, 1), self.prelu.weight).movedim(1, dim)
        return self.shift_out(x)
