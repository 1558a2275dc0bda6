"""Training losses for video matting: the official matting loss, BiMatting's auxiliary loss,
segmentation BCE, feature mimicking (distillation) from a full-precision teacher, and the
Background Matting V2 losses (``bgmv2_base_loss``, ``bgmv2_refine_loss``).

Definitions follow the official training code of RVM (Lin et al., "Robust High-Resolution Video
Matting with Temporal Guidance", WACV 2022, PeterL1n/RobustVideoMatting ``train_loss.py``) and of
BiMatting (Qin et al., NeurIPS 2023, htqin/BiMatting ``train_loss.py`` / ``train.py``). The code
here is our own; formulas are cited where they are used.

Shapes: ``pred_fgr``/``true_fgr`` are ``[B, T, 3, H, W]``, ``pred_pha``/``true_pha`` are
``[B, T, 1, H, W]``. Every loss is a mean, so it does not depend on the batch size or resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "COHERENCE_WEIGHT",
    "AUX_WEIGHT",
    "gauss_kernel",
    "laplacian_pyramid",
    "laplacian_loss",
    "transition_band",
    "matting_loss",
    "aux_matting_loss",
    "segmentation_loss",
    "normalized_feature_mse",
    "feature_mimic_loss",
    "FeatureRecorder",
    "sobel",
    "bgmv2_base_loss",
    "bgmv2_refine_loss",
]

#: Weight of the temporal coherence terms (RVM, Sec. 4.3: "x 5").
COHERENCE_WEIGHT = 5.0
#: Weight of BiMatting's auxiliary loss on the 1/16 outputs (BiMatting ``train.py``: ``* 0.25``).
AUX_WEIGHT = 0.25


def _check_video(name: str, t: Tensor, channels: int) -> None:
    if t.ndim != 5 or t.shape[2] != channels:
        raise ValueError(f"{name} must have shape [B, T, {channels}, H, W], got {tuple(t.shape)}")


def gauss_kernel(device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The 5x5 binomial (Gaussian) kernel ``outer([1,4,6,4,1]) / 256`` used by RVM's Laplacian loss."""
    row = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device, dtype=dtype)
    return (torch.outer(row, row) / 256.0)[None, None]


def _blur(img: Tensor, kernel: Tensor) -> Tensor:
    """Depthwise 5x5 blur of ``[N, C, H, W]`` with reflect padding (each channel on its own)."""
    n, c, h, w = img.shape
    flat = F.pad(img.reshape(n * c, 1, h, w), (2, 2, 2, 2), mode="reflect")
    return F.conv2d(flat, kernel).reshape(n, c, h, w)


def _pyramid_down(img: Tensor, kernel: Tensor) -> Tensor:
    return _blur(img, kernel)[:, :, ::2, ::2]


def _pyramid_up(img: Tensor, kernel: Tensor) -> Tensor:
    # zero-insertion upsampling; x4 restores the mean lost to the inserted zeros
    n, c, h, w = img.shape
    up = img.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = img * 4
    return _blur(up, kernel)


def laplacian_pyramid(img: Tensor, levels: int = 5) -> List[Tensor]:
    """Laplacian pyramid of ``[N, C, H, W]``: per level, ``x - up(down(x))`` after cropping to even size.

    Each level works on the previous level's downsampled image; odd sizes drop their last row or
    column, as in RVM's ``laplacian_pyramid``.
    """
    if img.ndim != 4:
        raise ValueError(f"laplacian_pyramid expects [N, C, H, W], got {tuple(img.shape)}")
    if levels < 1:
        raise ValueError(f"laplacian_pyramid needs levels >= 1, got {levels}")
    kernel = gauss_kernel(img.device, img.dtype)
    current, pyramid = img, []
    for level in range(levels):
        h, w = current.shape[-2:]
        h, w = h - h % 2, w - w % 2
        if min(h, w) < 4:
            raise ValueError(
                f"image of size {tuple(img.shape[-2:])} is too small for a {levels}-level Laplacian "
                f"pyramid (level {level} would be {h}x{w}; each side needs >= {4 * 2 ** (levels - 1)})"
            )
        current = current[:, :, :h, :w]
        down = _pyramid_down(current, kernel)
        pyramid.append(current - _pyramid_up(down, kernel))
        current = down
    return pyramid


def laplacian_loss(pred: Tensor, true: Tensor, levels: int = 5) -> Tensor:
    """RVM's Laplacian loss: ``(1/L) * sum_l 2**l * L1(lap_l(pred), lap_l(true))`` on ``[N, C, H, W]``."""
    pred_pyr = laplacian_pyramid(pred, levels)
    true_pyr = laplacian_pyramid(true, levels)
    total = pred.new_zeros(())
    for level, (p, t) in enumerate(zip(pred_pyr, true_pyr)):
        total = total + (2**level) * F.l1_loss(p, t)
    return total / levels


def _coherence(pred: Tensor, true: Tensor) -> Tensor:
    """Temporal coherence: MSE between frame differences along T (RVM Sec. 4.3)."""
    if pred.shape[1] < 2:
        return pred.new_zeros(())
    return F.mse_loss(pred[:, 1:] - pred[:, :-1], true[:, 1:] - true[:, :-1])


def transition_band(true_pha: Tensor, radius: int = 1) -> Tensor:
    """The trimap's unknown region of a ground-truth alpha, as a 0/1 mask of its shape.

    A pixel is in the band when some pixel within ``radius`` (a square window) is above 0 and some
    pixel within ``radius`` is below 1: partial alpha (hair, soft edges) and the hard edges of the
    subject, grown by ``radius`` pixels on each side. ``radius=0`` keeps only ``0 < alpha < 1``.
    Works on any ``[..., H, W]`` tensor.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    images = true_pha.detach().reshape(-1, 1, *true_pha.shape[-2:])
    above0, below1 = (images > 0).to(images.dtype), (images < 1).to(images.dtype)
    if radius:
        k = 2 * radius + 1
        above0 = F.max_pool2d(above0, k, stride=1, padding=radius)
        below1 = F.max_pool2d(below1, k, stride=1, padding=radius)
    return (above0 * below1).reshape(true_pha.shape)


def matting_loss(
    pred_fgr: Tensor,
    pred_pha: Tensor,
    true_fgr: Tensor,
    true_pha: Tensor,
    laplacian_levels: int = 5,
    edge_weight: float = 0.0,
    edge_radius: int = 1,
    laplacian_weight: float = 1.0,
    coherence_weight: float = COHERENCE_WEIGHT,
) -> Dict[str, Tensor]:
    """The official RVM / BiMatting matting loss; returns its terms and their sum under ``"total"``.

    alpha: ``L1 + Laplacian(levels) + 5 * coherence``; foreground, only where ``true_pha > 0``
    (both foregrounds multiplied by that mask): ``L1 + 5 * coherence``. A clip with a single frame
    has zero coherence terms.

    ``laplacian_weight`` and ``coherence_weight`` weigh the alpha's Laplacian and coherence terms
    (the official 1 and 5 by default; the foreground's coherence keeps 5). They trade the alpha's
    per-pixel error (MAD) against its sharpness and flicker: on a binary network whose features
    are noisy, the official weights favour a damped, under-confident alpha (see docs/matting.md,
    "Calibrating the output"): lower weights in a last fine-tuning round buy MAD, and below about
    2.5 they pay for it with dtSSD.

    ``edge_weight > 0`` adds ``pha_edge_l1``: ``edge_weight`` times the alpha L1 *averaged over the
    transition band only* (:func:`transition_band` of ``true_pha`` with ``edge_radius``; zero when
    the band is empty). The plain L1 is a mean over every pixel, so a subject's edges and hair, a
    few percent of the frame, weigh little in it; this term weighs them as if they were the whole
    frame. It is our addition, not part of the official loss (which ``edge_weight=0`` is).
    """
    for name, weight in (("edge_weight", edge_weight), ("laplacian_weight", laplacian_weight),
                         ("coherence_weight", coherence_weight)):
        if weight < 0:
            raise ValueError(f"{name} must be >= 0, got {weight}")
    _check_video("pred_fgr", pred_fgr, 3)
    _check_video("true_fgr", true_fgr, 3)
    _check_video("pred_pha", pred_pha, 1)
    _check_video("true_pha", true_pha, 1)
    if pred_pha.shape != true_pha.shape or pred_fgr.shape != true_fgr.shape:
        raise ValueError(
            f"prediction and ground truth differ in shape: pha {tuple(pred_pha.shape)} vs "
            f"{tuple(true_pha.shape)}, fgr {tuple(pred_fgr.shape)} vs {tuple(true_fgr.shape)}"
        )
    terms: Dict[str, Tensor] = {}
    terms["pha_l1"] = F.l1_loss(pred_pha, true_pha)
    terms["pha_laplacian"] = laplacian_loss(pred_pha.flatten(0, 1), true_pha.flatten(0, 1), laplacian_levels) * laplacian_weight
    terms["pha_coherence"] = _coherence(pred_pha, true_pha) * coherence_weight
    if edge_weight > 0:
        band = transition_band(true_pha, edge_radius).to(pred_pha.dtype)
        terms["pha_edge_l1"] = (pred_pha - true_pha).abs().mul(band).sum() / band.sum().clamp_min(1) * edge_weight
    mask = (true_pha > 0).to(pred_fgr.dtype)
    masked_pred, masked_true = pred_fgr * mask, true_fgr * mask
    terms["fgr_l1"] = F.l1_loss(masked_pred, masked_true)
    terms["fgr_coherence"] = _coherence(masked_pred, masked_true) * COHERENCE_WEIGHT
    terms["total"] = sum(terms.values())  # type: ignore[assignment]
    return terms


def _resize_video(x: Tensor, size: Sequence[int]) -> Tensor:
    b, t = x.shape[:2]
    out = F.interpolate(x.flatten(0, 1), size=tuple(size), mode="bilinear", align_corners=False)
    return out.unflatten(0, (b, t))


def aux_matting_loss(
    pred_fgr_s: Tensor,
    pred_pha_s: Tensor,
    true_fgr: Tensor,
    true_pha: Tensor,
    weight: float = AUX_WEIGHT,
    laplacian_levels: int = 1,
) -> Dict[str, Tensor]:
    """BiMatting's auxiliary loss on the small (1/16) outputs, already multiplied by ``weight``.

    As in BiMatting's ``train.py``, the ground truth is resized bilinearly (align_corners=False)
    to the auxiliary outputs' size and compared with :func:`matting_loss` using a 1-level
    Laplacian pyramid; the total is weighted 0.25. Keys are prefixed with ``aux_``.
    """
    size = pred_pha_s.shape[-2:]
    terms = matting_loss(
        pred_fgr_s, pred_pha_s, _resize_video(true_fgr, size), _resize_video(true_pha, size), laplacian_levels
    )
    return {f"aux_{name}": value * weight for name, value in terms.items()}


def segmentation_loss(pred_seg: Tensor, true_seg: Tensor) -> Tensor:
    """Binary cross-entropy on logits, the loss of RVM's segmentation passes."""
    if pred_seg.shape != true_seg.shape:
        raise ValueError(
            f"segmentation prediction {tuple(pred_seg.shape)} and target {tuple(true_seg.shape)} differ in shape"
        )
    return F.binary_cross_entropy_with_logits(pred_seg, true_seg.to(pred_seg.dtype))


def _as_images(x: Tensor) -> Tensor:
    """``[B, T, C, H, W]`` -> ``[B*T, C, H, W]``; 4-D tensors pass through."""
    if x.ndim == 5:
        return x.flatten(0, 1)
    if x.ndim != 4:
        raise ValueError(f"features must be [N, C, H, W] or [B, T, C, H, W], got {tuple(x.shape)}")
    return x


def normalized_feature_mse(student: Tensor, teacher: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean squared distance between channel-normalised features, optionally only inside ``mask``.

    Each pixel's feature vector is L2-normalised over channels (so the binary student mimics the
    direction of the teacher's feature, not its scale, which differs between 1-bit and float
    layers), the squared difference is summed over channels and averaged over the pixels where
    ``mask`` is true (all pixels without a mask). ``mask`` is ``[N, 1, h, w]`` (or 5-D) at any
    resolution; it is resized to the features' resolution by nearest neighbour. An empty mask
    gives zero. The result lies in [0, 4].
    """
    s, t = _as_images(student), _as_images(teacher)
    if s.shape != t.shape:
        raise ValueError(f"student feature {tuple(s.shape)} and teacher feature {tuple(t.shape)} differ in shape")
    t = t.detach().to(s.dtype)
    dist = (F.normalize(s, dim=1) - F.normalize(t, dim=1)).pow(2).sum(dim=1, keepdim=True)
    if mask is None:
        return dist.mean()
    m = _as_images(mask).to(dist.dtype)
    if m.shape[0] != dist.shape[0] or m.shape[1] != 1:
        raise ValueError(f"mask {tuple(mask.shape)} does not match features {tuple(student.shape)}")
    if m.shape[-2:] != dist.shape[-2:]:
        m = F.interpolate(m, size=dist.shape[-2:], mode="nearest")
    return (dist * m).sum() / m.sum().clamp_min(1.0)


def feature_mimic_loss(
    student_features: Sequence[Tensor], teacher_features: Sequence[Tensor], mask: Optional[Tensor] = None
) -> Tensor:
    """Feature mimicking (distillation): mean of :func:`normalized_feature_mse` over matched stages.

    With ``mask`` (e.g. ``binarize.ops.incoherent_mask`` of the ground-truth alpha) this is the
    *localized* mimicking of BiVM (Qin et al., TPAMI 2025): the student only imitates the teacher
    where the matte has detail, the same regions BiMatting's sparse decoder computes.
    """
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            f"need the same non-zero number of student and teacher features, got "
            f"{len(student_features)} and {len(teacher_features)}"
        )
    losses = [normalized_feature_mse(s, t, mask) for s, t in zip(student_features, teacher_features)]
    return torch.stack(losses).mean()


def _first_tensor(output: object) -> Tensor:
    """A module's feature: the output itself, or the first tensor of a tuple/list (RVM's decoder
    blocks return ``(features, recurrent_state)``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise ValueError(f"cannot take a feature from a module output of type {type(output).__name__}")


@dataclass
class FeatureRecorder:
    """Records the outputs of named submodules on every forward (for feature mimicking).

    ``FeatureRecorder(model, ["decoder.decode3", ...])`` registers forward hooks; ``features()``
    returns the recorded tensors in the order of ``names`` (the last forward of each) and
    ``clear()`` empties the record. ``remove()`` unregisters the hooks.
    """

    model: nn.Module
    names: Sequence[str]
    _outputs: Dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)
    _handles: List[torch.utils.hooks.RemovableHandle] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        modules = dict(self.model.named_modules())
        missing = [name for name in self.names if name not in modules]
        if missing:
            raise ValueError(f"no submodule named {', '.join(missing)} in {type(self.model).__name__}")
        for name in self.names:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs: Tuple[object, ...], output: object) -> None:
            self._outputs[name] = _first_tensor(output)

        return record

    def features(self) -> List[Tensor]:
        missing = [name for name in self.names if name not in self._outputs]
        if missing:
            raise ValueError(f"no output recorded for {', '.join(missing)} (did the forward run them?)")
        return [self._outputs[name] for name in self.names]

    def clear(self) -> None:
        self._outputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# ----------------------------------------------------------------------------------------------
# Background Matting V2 (Lin et al., CVPR 2021; PeterL1n/BackgroundMattingV2 train_base.py and
# train_refine.py, which use kornia 0.4.1's ``sobel`` and ``resize``). Images [B, C, H, W];
# clips [B, T, C, H, W] are flattened to images.
# ----------------------------------------------------------------------------------------------
def _images(name: str, t: Tensor, channels: int) -> Tensor:
    if t.ndim == 5:
        t = t.flatten(0, 1)
    if t.ndim != 4 or t.shape[1] != channels:
        raise ValueError(f"{name} must have shape [B, {channels}, H, W] or [B, T, {channels}, H, W], got {tuple(t.shape)}")
    return t


def sobel(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Sobel gradient magnitude of ``[N, C, H, W]`` per channel, as kornia's ``filters.sobel``:
    3x3 Sobel kernels normalised by their absolute sum (8), replicate padding,
    ``sqrt(gx**2 + gy**2 + eps)``."""
    if x.ndim != 4:
        raise ValueError(f"sobel expects [N, C, H, W], got {tuple(x.shape)}")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype) / 8.0
    kernel = torch.stack([kx, kx.t()])[:, None]  # [2, 1, 3, 3]
    n, c, h, w = x.shape
    padded = F.pad(x.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(padded, kernel).reshape(n, c, 2, h, w)
    return torch.sqrt(grad[:, :, 0] ** 2 + grad[:, :, 1] ** 2 + eps)


def _bilinear(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def bgmv2_base_loss(
    pred_pha: Tensor, pred_fgr: Tensor, pred_err: Tensor, true_pha: Tensor, true_fgr: Tensor
) -> Dict[str, Tensor]:
    """The BGMv2 base-network loss (``train_base.py``); terms and their sum under ``"total"``:
    alpha L1 + L1 of the Sobel magnitudes, foreground L1 where ``true_pha > 0``, and the MSE of the
    predicted error against ``|pred_pha - true_pha|`` (prediction detached)."""
    pred_pha, true_pha = _images("pred_pha", pred_pha, 1), _images("true_pha", true_pha, 1)
    pred_fgr, true_fgr = _images("pred_fgr", pred_fgr, 3), _images("true_fgr", true_fgr, 3)
    pred_err = _images("pred_err", pred_err, 1)
    if pred_pha.shape != true_pha.shape or pred_fgr.shape != true_fgr.shape or pred_err.shape != pred_pha.shape:
        raise ValueError(f"bgmv2_base_loss: shapes differ: pha {tuple(pred_pha.shape)} vs {tuple(true_pha.shape)}, "
                         f"fgr {tuple(pred_fgr.shape)} vs {tuple(true_fgr.shape)}, err {tuple(pred_err.shape)}")
    mask = (true_pha != 0).to(pred_fgr.dtype)
    terms = {
        "pha_l1": F.l1_loss(pred_pha, true_pha),
        "pha_sobel": F.l1_loss(sobel(pred_pha), sobel(true_pha)),
        "fgr_l1": F.l1_loss(pred_fgr * mask, true_fgr * mask),
        "err_mse": F.mse_loss(pred_err, (pred_pha.detach() - true_pha).abs()),
    }
    terms["total"] = sum(terms.values())  # type: ignore[assignment]
    return terms


def bgmv2_refine_loss(
    pred_pha: Tensor, pred_fgr: Tensor, pred_pha_sm: Tensor, pred_fgr_sm: Tensor, pred_err_sm: Tensor,
    true_pha: Tensor, true_fgr: Tensor,
) -> Dict[str, Tensor]:
    """The BGMv2 refine-stage loss (``train_refine.py``); terms and their sum under ``"total"``:
    alpha L1 and Sobel L1 at full and at the base's resolution (ground truth resized bilinearly),
    foreground L1 where the (resized) true alpha is non-zero at both resolutions, and the MSE,
    at full resolution, of the upsampled error map against ``|upsampled pred_pha_sm - true_pha|``
    (not detached, as in the official code)."""
    pred_pha, true_pha = _images("pred_pha", pred_pha, 1), _images("true_pha", true_pha, 1)
    pred_fgr, true_fgr = _images("pred_fgr", pred_fgr, 3), _images("true_fgr", true_fgr, 3)
    pred_pha_sm, pred_fgr_sm = _images("pred_pha_sm", pred_pha_sm, 1), _images("pred_fgr_sm", pred_fgr_sm, 3)
    pred_err_sm = _images("pred_err_sm", pred_err_sm, 1)
    if pred_pha.shape != true_pha.shape or pred_fgr.shape != true_fgr.shape:
        raise ValueError(f"bgmv2_refine_loss: shapes differ: pha {tuple(pred_pha.shape)} vs {tuple(true_pha.shape)}, "
                         f"fgr {tuple(pred_fgr.shape)} vs {tuple(true_fgr.shape)}")
    size, size_sm = true_pha.shape[-2:], pred_pha_sm.shape[-2:]
    true_pha_sm, true_fgr_sm = _bilinear(true_pha, size_sm), _bilinear(true_fgr, size_sm)
    mask, mask_sm = (true_pha != 0).to(pred_fgr.dtype), (true_pha_sm != 0).to(pred_fgr.dtype)
    terms = {
        "pha_l1": F.l1_loss(pred_pha, true_pha),
        "pha_sm_l1": F.l1_loss(pred_pha_sm, true_pha_sm),
        "pha_sobel": F.l1_loss(sobel(pred_pha), sobel(true_pha)),
        "pha_sm_sobel": F.l1_loss(sobel(pred_pha_sm), sobel(true_pha_sm)),
        "fgr_l1": F.l1_loss(pred_fgr * mask, true_fgr * mask),
        "fgr_sm_l1": F.l1_loss(pred_fgr_sm * mask_sm, true_fgr_sm * mask_sm),
        "err_mse": F.mse_loss(_bilinear(pred_err_sm, size), (_bilinear(pred_pha_sm, size) - true_pha).abs()),
    }
    terms["total"] = sum(terms.values())  # type: ignore[assignment]
    return terms
