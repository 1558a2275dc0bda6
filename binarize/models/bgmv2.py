"""Background Matting V2 (BGMv2): matting with a captured background frame.

Lin et al., "Real-Time High-Resolution Background Matting", CVPR 2021
(github.com/PeterL1n/BackgroundMattingV2, MIT). Our implementation of the official architecture:

- the **base** network (official ``MattingBase``): ``cat([src, bgr])`` (6 channels, RGB in [0, 1],
  no normalisation) through a MobileNetV2 or ResNet-50/101 backbone at output stride 16 (timm's
  ``features_only`` models with ``in_chans=6``; torchvision's dilation rule, which timm follows),
  DeepLabV3's ASPP (rates 3, 6, 9; our own module with torchvision's key names) and a 4-stage
  decoder to 37 channels ``[pha, fgr residual x3, err, hid x32]``;
- the **refiner** (official ``Refiner``), which runs the base at ``backbone_scale`` (default 1/4)
  and refines 4x4 patches at full resolution: everywhere (``refine_mode="full"``), the
  ``refine_sample_pixels // 16`` cells of largest predicted error (``"sampling"``) or the cells
  whose error exceeds ``refine_threshold`` (``"thresholding"``). Only the selected patches are
  computed (crop, small convs, paste back); everywhere else the output is the bilinear upsampling
  of the coarse result.

Call, as the official ``MattingRefine``:
``pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm = model(src, bgr)`` with ``src`` and ``bgr``
``[B, 3, H, W]`` in [0, 1], H and W divisible by 4. The base alone (official ``MattingBase``:
``pha, fgr, err, hid = base(src, bgr)`` at the input resolution) is ``model.base`` or
``create_model("bgmv2_mobilenetv2", refine=False)``.

Official checkpoints (``pytorch_mobilenetv2.pth``, ``pytorch_resnet50.pth``, ... plain state dicts
with torchvision names for ``backbone.*``) load strictly through :meth:`MattingBase.map_official_state_dict`.

Deviations from the official code, none of which changes an output the official code produces:
``refine_sample_pixels // 16`` larger than the number of cells selects every cell (the official
``topk`` raises); and under ``torch.jit.trace`` (fvcore's ``profile``, TorchScript/ONNX export) the
sparse modes compute the refiner densely and keep it at the selected cells only, since a trace
cannot record a data-dependent patch count. The two forms give the same output because the
refiner's convolutions pad with zeros exactly as the patch crops do.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from binarize.models.registry import register_model

__all__ = [
    "ASPP",
    "BGMv2Decoder",
    "BGMv2Encoder",
    "BGMv2Refiner",
    "MattingBase",
    "MattingRefine",
    "BACKBONES",
    "REFINE_MODES",
    "bgmv2_mobilenetv2",
    "bgmv2_resnet50",
    "bgmv2_resnet101",
    "torchvision_to_timm_mobilenetv2_keys",
]

#: backbone name -> (timm model, channels of the 1/2, 1/4, 1/8 and 1/16 features)
BACKBONES: Dict[str, Tuple[str, Tuple[int, int, int, int]]] = {
    "mobilenetv2": ("mobilenetv2_100", (16, 24, 32, 320)),
    "resnet50": ("resnet50", (64, 256, 512, 2048)),
    "resnet101": ("resnet101", (64, 256, 512, 2048)),
}
REFINE_MODES = ("full", "sampling", "thresholding")
#: timm ``features_only`` indices of the taps: MobileNetV2 blocks 0, 1, 2 and 6 (torchvision
#: features 1, 3, 6, 17); ResNet act1 (before the max-pool), layer1, layer2 and layer4.
_OUT_INDICES = (0, 1, 2, 4)
_DECODER_CHANNELS = (256, 128, 64, 48)
_OUT_CHANNELS = 1 + 3 + 1 + 32  # pha, fgr residual, err, hid


class BGMv2Encoder(nn.Module):
    """The BGMv2 backbone: a timm ``features_only`` MobileNetV2 or ResNet at output stride 16 with a
    6-channel stem. ``forward(x)`` returns ``[x1, x2, x3, x4]`` (strides 2, 4, 8, 16); the official
    MobileNetV2 drops its last 1x1 conv (320 channels out), which ``features_only`` never builds."""

    def __init__(self, backbone: str = "mobilenetv2", in_channels: int = 6) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown BGMv2 backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
        timm_name, self.channels = BACKBONES[backbone]
        self.backbone_name = backbone
        self.body = timm.create_model(timm_name, features_only=True, pretrained=False, output_stride=16,
                                      out_indices=_OUT_INDICES, in_chans=in_channels)
        if tuple(self.body.feature_info.channels()) != self.channels:
            raise RuntimeError(f"unexpected timm {timm_name} layout: {self.body.feature_info.channels()}")

    def forward(self, x: Tensor) -> List[Tensor]:
        return self.body(x)


class _ASPPPooling(nn.Sequential):
    """Image pooling branch: global average, 1x1 conv, BN, ReLU, broadcast back to the input size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLabV3's atrous spatial pyramid pooling (Chen et al. 2017) as BGMv2 uses it: a 1x1 branch,
    3x3 branches at ``rates``, image pooling, concatenated and projected by a 1x1 conv, BN, ReLU and
    Dropout(0.5). All convs are bias-free and followed by BN; key names follow torchvision's
    ``deeplabv3.ASPP`` (``convs.0-4``, ``project``) so official checkpoints map one to one."""

    def __init__(self, in_channels: int, rates: Sequence[int] = (3, 6, 9), out_channels: int = 256) -> None:
        super().__init__()
        branches: List[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                                   nn.BatchNorm2d(out_channels), nn.ReLU())]
        for rate in rates:
            branches.append(nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False),
                nn.BatchNorm2d(out_channels), nn.ReLU()))
        branches.append(_ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class BGMv2Decoder(nn.Module):
    """Four stages; each resizes bilinearly to the skip's exact size, concatenates ``[x, skip]`` and
    applies a 3x3 conv, BN and ReLU; the last skip is the network input and the last conv has a
    bias and no BN/ReLU. ``forward(x4, x3, x2, x1, x0)``."""

    def __init__(self, channels: Sequence[int], feature_channels: Sequence[int]) -> None:
        super().__init__()
        c, f = list(channels), list(feature_channels)
        self.conv1 = nn.Conv2d(f[0] + c[0], c[1], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[1])
        self.conv2 = nn.Conv2d(f[1] + c[1], c[2], 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c[2])
        self.conv3 = nn.Conv2d(f[2] + c[2], c[3], 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c[3])
        self.conv4 = nn.Conv2d(f[3] + c[3], c[4], 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x4: Tensor, x3: Tensor, x2: Tensor, x1: Tensor, x0: Tensor) -> Tensor:
        x = x4
        for skip, conv, bn in ((x3, self.conv1, self.bn1), (x2, self.conv2, self.bn2), (x1, self.conv3, self.bn3)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.relu(bn(conv(torch.cat([x, skip], dim=1))))
        x = F.interpolate(x, size=x0.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv4(torch.cat([x, x0], dim=1))


def _crop_patches(x: Tensor, index: Tuple[Tensor, Tensor, Tensor], size: int, padding: int) -> Tensor:
    """``[P, C, size + 2 padding, size + 2 padding]`` crops of the zero-padded ``x`` at cells
    ``(b, y, x)`` of a grid of stride ``size``."""
    if padding:
        x = F.pad(x, (padding,) * 4)
    window = size + 2 * padding
    tiles = x.permute(0, 2, 3, 1).unfold(1, window, size).unfold(2, window, size)  # [B, nH, nW, C, k, k]
    return tiles[index[0], index[1], index[2]]


def _paste_patches(x: Tensor, patches: Tensor, index: Tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``x`` [B, C, H, W] with its ``patches`` [P, C, s, s] written at cells ``index`` of the s x s grid."""
    b, c, h, w = x.shape
    s = patches.shape[-1]
    grid = x.reshape(b, c, h // s, s, w // s, s).permute(0, 2, 4, 1, 3, 5)  # [B, nH, nW, C, s, s]
    grid = grid.index_put((index[0], index[1], index[2]), patches)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class BGMv2Refiner(nn.Module):
    """The BGMv2 refiner: four small convs (42 -> 24 -> 16, then 22 -> 12 -> 4 outputs) on 4x4
    patches. ``forward(src, bgr, pha, fgr, err, hid)`` (coarse ``pha``/``err`` clamped, ``fgr`` the
    unclamped foreground residual, ``hid`` after ReLU) returns the full-resolution ``pha``,
    foreground residual and the 1/4-resolution selection map ``ref`` (1 where a patch was refined).

    ``mask_density`` is the fraction of refined 4x4 cells on the last forward (1.0 in ``full``
    mode, ``None`` before the first); ``binarize.profile`` reads it to scale the refiner's MACs
    (counted densely, see the module docstring) into the sparse figure."""

    def __init__(self, mode: str = "sampling", sample_pixels: int = 80_000, threshold: float = 0.1,
                 kernel_size: int = 3, prevent_oversampling: bool = True) -> None:
        super().__init__()
        if mode not in REFINE_MODES:
            raise ValueError(f"refine_mode must be one of {', '.join(REFINE_MODES)}, got {mode!r}")
        if kernel_size not in (1, 3):
            raise ValueError(f"refine_kernel_size must be 1 or 3, got {kernel_size}")
        if not (isinstance(sample_pixels, int) and sample_pixels > 0):
            raise ValueError(f"refine_sample_pixels must be a positive integer, got {sample_pixels!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"refine_threshold must be in [0, 1], got {threshold}")
        self.mode = mode
        self.sample_pixels = sample_pixels
        self.threshold = float(threshold)
        self.kernel_size = kernel_size
        self.prevent_oversampling = prevent_oversampling
        channels = (32, 24, 16, 12, 4)
        self.conv1 = nn.Conv2d(channels[0] + 6 + 4, channels[1], kernel_size, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[1])
        self.conv2 = nn.Conv2d(channels[1], channels[2], kernel_size, bias=False)
        self.bn2 = nn.BatchNorm2d(channels[2])
        self.conv3 = nn.Conv2d(channels[2] + 6, channels[3], kernel_size, bias=False)
        self.bn3 = nn.BatchNorm2d(channels[3])
        self.conv4 = nn.Conv2d(channels[3], channels[4], kernel_size, bias=True)
        self.relu = nn.ReLU()
        self.mask_density: Optional[float] = None

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, sample_pixels={self.sample_pixels}, threshold={self.threshold}, "
                f"kernel_size={self.kernel_size}")

    def select(self, err: Tensor) -> Tensor:
        """The selection map [B, 1, h, w] (float, 1 = refine this 4x4 cell) from the 1/4-resolution error."""
        b, _, h, w = err.shape
        if self.mode == "full":
            return torch.ones_like(err)
        if self.mode == "thresholding":
            return err.gt(self.threshold).to(err.dtype)
        flat = err.reshape(b, -1)
        k = min(self.sample_pixels // 16, flat.shape[1])
        ref = torch.zeros_like(flat)
        if k > 0:
            ref = ref.scatter(1, flat.topk(k, dim=1, sorted=False).indices, 1.0)
        if self.prevent_oversampling:
            ref = ref * flat.gt(0).to(flat.dtype)
        return ref.reshape(b, 1, h, w)

    def _stage1(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))

    def _stage2(self, x: Tensor) -> Tensor:
        return self.conv4(self.relu(self.bn3(self.conv3(x))))

    def _dense(self, coarse: Tensor, src_bgr: Tensor) -> Tensor:
        """Refine every pixel (official ``full`` mode): [B, 4, H, W]."""
        h, w = src_bgr.shape[-2:]
        x = F.interpolate(coarse, (h // 2, w // 2), mode="bilinear", align_corners=False)
        y = F.interpolate(src_bgr, (h // 2, w // 2), mode="bilinear", align_corners=False)
        if self.kernel_size == 3:
            x, y = F.pad(x, (3, 3, 3, 3)), F.pad(y, (3, 3, 3, 3))
            x = self._stage1(torch.cat([x, y], dim=1))
            x = F.interpolate(x, (h + 4, w + 4), mode="nearest")
            y = F.pad(src_bgr, (2, 2, 2, 2))
        else:
            x = self._stage1(torch.cat([x, y], dim=1))
            x = F.interpolate(x, (h, w), mode="nearest")
            y = src_bgr
        return self._stage2(torch.cat([x, y], dim=1))

    def _patches(self, coarse: Tensor, src_bgr: Tensor, index: Tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Refine the selected 4x4 cells only: [P, 4, 4, 4]."""
        h, w = src_bgr.shape[-2:]
        pad = 3 if self.kernel_size == 3 else 0
        x = F.interpolate(coarse, (h // 2, w // 2), mode="bilinear", align_corners=False)
        y = F.interpolate(src_bgr, (h // 2, w // 2), mode="bilinear", align_corners=False)
        x = self._stage1(torch.cat([_crop_patches(x, index, 2, pad), _crop_patches(y, index, 2, pad)], dim=1))
        x = F.interpolate(x, 8 if self.kernel_size == 3 else 4, mode="nearest")
        y = _crop_patches(src_bgr, index, 4, 2 if self.kernel_size == 3 else 0)
        return self._stage2(torch.cat([x, y], dim=1))

    def forward(self, src: Tensor, bgr: Tensor, pha: Tensor, fgr: Tensor, err: Tensor,
                hid: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        h, w = src.shape[-2:]
        src_bgr = torch.cat([src, bgr], dim=1)
        coarse = torch.cat([hid, pha, fgr], dim=1)
        if self.mode == "full":
            out = self._dense(coarse, src_bgr)
            ref = torch.ones((src.shape[0], 1, h // 4, w // 4), device=src.device, dtype=src.dtype)
            self.mask_density = 1.0
            return out[:, :1], out[:, 1:], ref
        ref = self.select(F.interpolate(err, (h // 4, w // 4), mode="bilinear", align_corners=False))
        self.mask_density = float(ref.mean())
        out = F.interpolate(torch.cat([pha, fgr], dim=1), (h, w), mode="bilinear", align_corners=False)
        if torch.jit.is_tracing():  # a trace cannot hold a data-dependent patch count: same result, dense
            keep = F.interpolate(ref, (h, w), mode="nearest")
            out = out * (1 - keep) + self._dense(coarse, src_bgr) * keep
        else:
            index = torch.nonzero(ref.squeeze(1), as_tuple=True)
            if index[0].numel() > 0:
                out = _paste_patches(out, self._patches(coarse, src_bgr, index), index)
        return out[:, :1], out[:, 1:], ref


def _check_pair(src: Any, bgr: Any, multiple: int) -> None:
    for name, value in (("src", src), ("bgr", bgr)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.ndim != 4 or value.shape[1] != 3:
            raise ValueError(f"{name} must be [B, 3, H, W], got shape {tuple(value.shape)}")
    if src.shape != bgr.shape:
        raise ValueError(f"src and bgr must have the same shape, got {tuple(src.shape)} and {tuple(bgr.shape)}")
    if src.shape[-2] % multiple or src.shape[-1] % multiple:
        raise ValueError(f"src and bgr height and width must be divisible by {multiple}, got "
                         f"{src.shape[-2]}x{src.shape[-1]}")


class MattingBase(nn.Module):
    """BGMv2's base network (official ``MattingBase``): ``pha, fgr, err, hid = model(src, bgr)`` at
    the input resolution (``src``, ``bgr`` [B, 3, H, W] in [0, 1]); ``pha``, ``err`` in [0, 1],
    ``fgr = clamp(src + residual)``, ``hid`` (32 channels) after ReLU."""

    #: the video tool dispatches on this: the model takes ``(src, bgr)``, not recurrent states
    takes_background = True

    def __init__(self, backbone: str = "mobilenetv2") -> None:
        super().__init__()
        self.backbone = BGMv2Encoder(backbone, in_channels=6)
        f1, f2, f3, f4 = self.backbone.channels
        self.aspp = ASPP(f4, (3, 6, 9))
        self.decoder = BGMv2Decoder((*_DECODER_CHANNELS, _OUT_CHANNELS), (f3, f2, f1, 6))

    def coarse(self, src: Tensor, bgr: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Base outputs at the input's resolution: ``pha`` (clamped), the unclamped foreground
        residual, ``err`` (clamped) and ``hid`` (ReLU)."""
        x0 = torch.cat([src, bgr], dim=1)
        x1, x2, x3, x4 = self.backbone(x0)
        x = self.decoder(self.aspp(x4), x3, x2, x1, x0)
        pha, residual, err, hid = x.split([1, 3, 1, 32], dim=1)
        return pha.clamp(0.0, 1.0), residual, err.clamp(0.0, 1.0), hid.relu()

    def forward(self, src: Tensor, bgr: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        _check_pair(src, bgr, 1)
        pha, residual, err, hid = self.coarse(src, bgr)
        return pha, (residual + src).clamp(0.0, 1.0), err, hid

    def map_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Rename an official BGMv2 state dict (torchvision backbone names) to this model's keys;
        unknown keys pass through unchanged so the strict loader reports them."""
        if self.backbone.backbone_name == "mobilenetv2":
            prefixes = torchvision_to_timm_mobilenetv2_keys(self.backbone.body)
        else:
            prefixes = {}
        mapped: Dict[str, Tensor] = {}
        for key, value in state_dict.items():
            if key.startswith("backbone."):
                module, _, leaf = key[len("backbone."):].rpartition(".")
                key = f"backbone.body.{prefixes.get(module, module)}.{leaf}"
            mapped[key] = value
        return mapped


def torchvision_to_timm_mobilenetv2_keys(body: nn.Module) -> Dict[str, str]:
    """Module prefixes of torchvision's MobileNetV2 (``features.i...``) -> timm's ``mobilenetv2_100``:
    features.0 is the stem, features.1 the expansion-1 block (depthwise, BN, pointwise, BN),
    features.2..17 the inverted residuals (expand, BN, depthwise, BN, project, BN) in block order."""
    prefixes = {"features.0.0": "conv_stem", "features.0.1": "bn1"}
    blocks = [f"blocks.{i}.{j}" for i, stage in enumerate(body.blocks) for j in range(len(stage))]
    for index, ours in enumerate(blocks, start=1):
        tv = f"features.{index}"
        if index == 1:
            names = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
        else:
            names = {"conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2",
                     "conv.2": "conv_pwl", "conv.3": "bn3"}
        prefixes.update({f"{tv}.{a}": f"{ours}.{b}" for a, b in names.items()})
    return prefixes


class MattingRefine(MattingBase):
    """BGMv2 with its refiner (official ``MattingRefine``):
    ``pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm = model(src, bgr)``.

    ``src``, ``bgr``: [B, 3, H, W] in [0, 1], H and W divisible by 4. The base runs on both resized
    by ``backbone_scale`` (bilinear, no antialias); ``pha``/``fgr`` are full resolution,
    ``pha_sm``/``fgr_sm``/``err_sm`` the base's outputs at that scale and ``ref_sm`` [B, 1, H/4, W/4]
    the refined cells. ``model.base`` is the base network alone (sharing these weights)."""

    def __init__(self, backbone: str = "mobilenetv2", backbone_scale: float = 0.25, refine_mode: str = "sampling",
                 refine_sample_pixels: int = 80_000, refine_threshold: float = 0.1, refine_kernel_size: int = 3,
                 refine_prevent_oversampling: bool = True) -> None:
        if not 0.0 < backbone_scale <= 0.5:
            raise ValueError(f"backbone_scale must be in (0, 0.5], got {backbone_scale}")
        super().__init__(backbone)
        self.backbone_scale = backbone_scale
        self.refiner = BGMv2Refiner(refine_mode, refine_sample_pixels, refine_threshold, refine_kernel_size,
                                    refine_prevent_oversampling)

    @property
    def base(self) -> MattingBase:
        """The base network alone (official ``MattingBase`` call), sharing this model's modules."""
        base = MattingBase.__new__(MattingBase)
        nn.Module.__init__(base)
        base.backbone, base.aspp, base.decoder = self.backbone, self.aspp, self.decoder
        base.train(self.training)
        return base

    def forward(self, src: Tensor, bgr: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        _check_pair(src, bgr, 4)
        scale = dict(scale_factor=self.backbone_scale, mode="bilinear", align_corners=False,
                     recompute_scale_factor=True)
        src_sm, bgr_sm = F.interpolate(src, **scale), F.interpolate(bgr, **scale)
        pha_sm, residual_sm, err_sm, hid_sm = self.coarse(src_sm, bgr_sm)
        pha, residual, ref_sm = self.refiner(src, bgr, pha_sm, residual_sm, err_sm, hid_sm)
        pha = pha.clamp(0.0, 1.0)
        fgr = (residual + src).clamp(0.0, 1.0)
        fgr_sm = (src_sm + residual_sm).clamp(0.0, 1.0)
        return pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm


def _build(backbone: str, refine: bool, kwargs: Dict[str, Any]) -> MattingBase:
    if not refine:
        if kwargs:
            raise ValueError(f"refine=False builds the base network, which takes no {', '.join(sorted(kwargs))}")
        return MattingBase(backbone)
    return MattingRefine(backbone, **kwargs)


@register_model
def bgmv2_mobilenetv2(refine: bool = True, **kwargs: Any) -> MattingBase:
    """BGMv2 with a MobileNetV2 backbone (``MattingRefine``; ``refine=False``: ``MattingBase``).
    kwargs: ``backbone_scale``, ``refine_mode``, ``refine_sample_pixels``, ``refine_threshold``,
    ``refine_kernel_size``, ``refine_prevent_oversampling`` as in the official code."""
    return _build("mobilenetv2", refine, kwargs)


@register_model
def bgmv2_resnet50(refine: bool = True, **kwargs: Any) -> MattingBase:
    """BGMv2 with a ResNet-50 backbone (``MattingRefine``; ``refine=False``: ``MattingBase``)."""
    return _build("resnet50", refine, kwargs)


@register_model
def bgmv2_resnet101(refine: bool = True, **kwargs: Any) -> MattingBase:
    """BGMv2 with a ResNet-101 backbone (``MattingRefine``; ``refine=False``: ``MattingBase``)."""
    return _build("resnet101", refine, kwargs)


for _factory in (bgmv2_mobilenetv2, bgmv2_resnet50, bgmv2_resnet101):
    _factory.takes_background = True  # type: ignore[attr-defined]  (the video tool checks the name before building)
