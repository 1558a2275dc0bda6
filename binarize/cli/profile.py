"""``binarize profile``: count what binarization saves, for one model or the matting zoo.

Examples::

    binarize profile timm:resnet18 --method reactnet --resolution 224x224
    binarize profile bimatting --resolution 512x288 --vs rvm_mobilenetv3
    binarize profile --all-matting --resolution 512x288 --json
    binarize profile --all-matting --resolution 1920x1080 --downsample-ratio 0.25

A ``timm:``/``torchvision:`` model is profiled in full precision and after
``binarize.convert(model, method)``; a zoo model is profiled as built (optionally converted with
``--method``) and compared with ``--vs``. Matting models run on a deterministic synthetic
person-like frame (or ``--input frame.png``) so that the decoder's mask densities are measured.
Background-matting models (``bgmv2_*``) get that frame and its background (``--input``: the image
is its own background); they are built as the official speed test builds them
(``refine_prevent_oversampling=False``: sampling mode refines exactly ``refine_sample_pixels``), and
``--downsample-ratio`` sets their ``backbone_scale`` (default 0.25).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from binarize.cli.main import CLIError

MATTING_BASELINE = "rvm_mobilenetv3"
MAX_SIDE = 8192


@dataclass
class Entry:
    """One profiled model: its label, report and (optionally) measured latency."""

    label: str
    report: Any  # binarize.profile.ProfileReport


# --------------------------------------------------------------------------- argument parsing
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "profile",
        help="count FLOPs, BOPs, OPs, parameters and storage of a (binarized) model",
        description="Count FLOPs, BOPs, OPs (= FLOPs + BOPs/64), parameters and storage; "
        "dense and with masked branches at their measured density.",
    )
    parser.add_argument("model", nargs="?", help="timm:NAME, torchvision:NAME or a zoo model (binarize.models)")
    parser.add_argument("--method", default=None,
                        help="binarization method for convert (default: reactnet for timm:/torchvision: models; "
                        "zoo models are profiled as built unless given)")
    parser.add_argument("--resolution", default=None, type=parse_resolution,
                        help="input WIDTHxHEIGHT (default 224x224, matting models 512x288)")
    parser.add_argument("--vs", default=None, metavar="MODEL", help="baseline model to compare with")
    parser.add_argument("--all-matting", action="store_true", help="one row per zoo matting model")
    parser.add_argument("--input", default=None, help="image for matting models (default: a synthetic frame)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint for a zoo model")
    parser.add_argument("--downsample-ratio", type=float, default=None,
                        help="matting models' downsample_ratio (default 1.0)")
    parser.add_argument("--density", type=float, default=None,
                        help="assume this mask density instead of measuring it (e.g. 0.44)")
    parser.add_argument("--no-keep-first", action="store_true", help="binarize the first conv too")
    parser.add_argument("--no-keep-last", action="store_true", help="binarize the last layer too")
    parser.add_argument("--layers", action="store_true", help="print (or emit in JSON) the per-layer rows")
    parser.add_argument("--measure", action="store_true", help="add the measured latency (median of --runs)")
    parser.add_argument("--runs", type=int, default=5, help="timed forwards for --measure")
    parser.add_argument("--engine", choices=("simulated", "packed"), default="simulated",
                        help="implementation of binary layers for --measure")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def parse_resolution(text: str) -> Tuple[int, int]:
    """``'512x288'`` -> (width=512, height=288)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"resolution must look like WIDTHxHEIGHT (e.g. 224x224), got {text!r}")
    if max(int(parts[0]), int(parts[1])) > MAX_SIDE:  # a float input past 8K alone is gigabytes
        raise argparse.ArgumentTypeError(f"resolution {text!r} is too large: each side at most {MAX_SIDE} pixels")
    return int(parts[0]), int(parts[1])


# --------------------------------------------------------------------------- model building
def build_model(spec: str, *, resolution: Tuple[int, int], checkpoint: Optional[str] = None,
                downsample_ratio: Optional[float] = None) -> nn.Module:
    """Build ``timm:NAME`` / ``torchvision:NAME`` (random weights, never downloaded) or a zoo model.

    The random initialisation is seeded so that reports (mask densities included) are reproducible.
    A background-matting model is built for the official speed test (see the module docstring).
    """
    torch.manual_seed(0)
    if spec.startswith("timm:"):
        if checkpoint:
            raise CLIError("--checkpoint applies to zoo models only")
        return _build_timm(spec[len("timm:"):], resolution)
    if spec.startswith("torchvision:"):
        if checkpoint:
            raise CLIError("--checkpoint applies to zoo models only")
        return _build_torchvision(spec[len("torchvision:"):])
    from binarize.models import create_model

    if is_background_matting_name(spec):
        kwargs: Dict[str, Any] = {"refine_prevent_oversampling": False}
        if downsample_ratio is not None:
            if downsample_ratio > 0.5:
                raise CLIError(f"--downsample-ratio is {spec}'s backbone_scale, at most 0.5; got {downsample_ratio}")
            kwargs["backbone_scale"] = downsample_ratio
        return create_model(spec, checkpoint=checkpoint, **kwargs)
    return create_model(spec, checkpoint=checkpoint)


def _build_timm(name: str, resolution: Tuple[int, int]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise CLIError(f"unknown timm model {name!r}")
    width, height = resolution
    try:  # models with a fixed input size (ViT, ...) are built for the requested resolution
        return timm.create_model(name, pretrained=False, img_size=(height, width))
    except TypeError:
        return timm.create_model(name, pretrained=False)


def _build_torchvision(name: str) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError as exc:
        raise CLIError(f"unknown torchvision model {name!r}") from exc


def is_matting_name(name: str) -> bool:
    """Zoo matting models: BiMatting and the RVM family (full precision and binarized baselines)."""
    return name == "bimatting" or name.startswith("rvm_")


def is_background_matting_name(name: str) -> bool:
    """Zoo background-matting models: BGMv2 (full precision and binarized baselines)."""
    return name.startswith("bgmv2_")


def is_background_matting_model(model: nn.Module) -> bool:
    """Background-matting models take ``(src, bgr)`` (``takes_background``, e.g. BGMv2)."""
    return bool(getattr(model, "takes_background", False))


def is_matting_model(model: nn.Module) -> bool:
    """Zoo matting models follow ``fgr, pha, *rec = model(src, *rec, downsample_ratio=...)``."""
    return bool(getattr(model, "is_matting", False)) or is_matting_name(str(getattr(model, "model_name", "")))


def matting_model_names() -> List[str]:
    """Zoo matting models, the full-precision baseline first, then BiMatting, then the rest; the
    background-matting models (BGMv2, full precision first) last."""
    from binarize.models import list_models

    names = [name for name in list_models() if is_matting_name(name)]
    names = sorted(names, key=lambda n: (n != MATTING_BASELINE, n != "bimatting", n))
    full_precision = [f"bgmv2_{backbone}" for backbone in ("mobilenetv2", "resnet50", "resnet101")]
    background = [name for name in list_models() if is_background_matting_name(name)]
    return names + sorted(background, key=lambda n: (n not in full_precision, full_precision.index(n)
                                                     if n in full_precision else 0, n))


# --------------------------------------------------------------------------- inputs
def synthetic_frame(width: int, height: int) -> torch.Tensor:
    """A deterministic person-like RGB frame in [0, 1], shape [1, 3, H, W] (see ``synthetic_person``)."""
    return synthetic_person(width, height)[0]


def synthetic_person(width: int, height: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A deterministic person-like frame [1, 3, H, W] in [0, 1] and its person mask [1, 1, H, W].

    A textured indoor-like background (colour gradients and soft stripes), a person made of a head
    ellipse with a hair cap, a neck and a torso with sloping shoulders; this gives the matting
    decoder a realistic foreground/background boundary to build its masks on.
    """
    ys = torch.linspace(0.0, 1.0, height).view(height, 1).expand(height, width)
    xs = torch.linspace(0.0, 1.0, width).view(1, width).expand(height, width)
    background = synthetic_background(width, height)[0]
    aspect = width / height
    cx = 0.5
    head = ((xs - cx) * aspect / 0.10) ** 2 + ((ys - 0.30) / 0.14) ** 2 <= 1.0
    hair = head & (((xs - cx) * aspect / 0.11) ** 2 + ((ys - 0.25) / 0.12) ** 2 <= 1.0) & (ys < 0.27)
    neck = ((xs - cx).abs() * aspect <= 0.045) & (ys > 0.40) & (ys < 0.52)
    shoulder_width = 0.14 + 0.6 * (ys - 0.50).clamp(0.0, 0.12)
    torso = ((xs - cx).abs() * aspect <= shoulder_width + 0.10) & (ys >= 0.50)
    frame = background.clone()
    _paint(frame, torso, (0.20, 0.25, 0.45), xs, ys)
    _paint(frame, neck | head, (0.85, 0.65, 0.55), xs, ys)
    _paint(frame, hair, (0.15, 0.10, 0.08), xs, ys)
    person = (head | neck | torso).float()
    return frame.clamp(0.0, 1.0).unsqueeze(0), person.view(1, 1, height, width)


def synthetic_background(width: int, height: int) -> torch.Tensor:
    """The background of ``synthetic_person`` alone, [1, 3, H, W] (what a background-matting model
    is given as the captured background)."""
    ys = torch.linspace(0.0, 1.0, height).view(height, 1).expand(height, width)
    xs = torch.linspace(0.0, 1.0, width).view(1, width).expand(height, width)
    return torch.stack([
        0.55 + 0.25 * ys + 0.05 * torch.sin(18 * xs),
        0.60 + 0.10 * ys + 0.05 * torch.sin(11 * xs + 3 * ys),
        0.70 - 0.20 * ys + 0.05 * torch.cos(23 * xs),
    ]).unsqueeze(0)


def _paint(frame: torch.Tensor, region: torch.Tensor, rgb: Sequence[float], xs: torch.Tensor, ys: torch.Tensor) -> None:
    shading = 0.08 * torch.sin(9 * xs + 5 * ys)
    for channel, value in enumerate(rgb):
        frame[channel][region] = (value + shading)[region]


def load_frame(path: str, width: int, height: int) -> torch.Tensor:
    """An image file as [1, 3, H, W] in [0, 1], resized to the profiling resolution."""
    import os

    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"input image not found: {path}")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((width, height), Image.BILINEAR)
    except OSError as exc:
        raise CLIError(f"cannot read image {path}: {exc}") from exc
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return data.permute(2, 0, 1).float().div(255.0).unsqueeze(0)


def example_call(model: nn.Module, args: argparse.Namespace, resolution: Tuple[int, int]) -> Tuple[tuple, dict]:
    """Positional inputs and keyword arguments for one forward of ``model``."""
    width, height = resolution
    if is_background_matting_model(model):
        if height % 4 or width % 4:
            raise CLIError(f"{getattr(model, 'model_name', 'this model')} needs a width and height divisible by 4, "
                           f"got {width}x{height}")
        if args.input:
            src = load_frame(args.input, width, height)
            return (src, src.clone()), {}
        return (synthetic_frame(width, height), synthetic_background(width, height)), {}
    if is_matting_model(model):
        src = load_frame(args.input, width, height) if args.input else synthetic_frame(width, height)
        ratio = 1.0 if args.downsample_ratio is None else args.downsample_ratio
        return (src, None, None, None, None), {"downsample_ratio": ratio}
    if args.input or args.downsample_ratio is not None:
        raise CLIError(f"--input and --downsample-ratio apply to matting models only, not {type(model).__name__}")
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(1, 3, height, width, generator=generator),), {}


# --------------------------------------------------------------------------- profiling
def profile_entry(model: nn.Module, label: str, args: argparse.Namespace, resolution: Tuple[int, int]) -> Entry:
    from binarize.profile import measure_latency, profile

    inputs, kwargs = example_call(model, args, resolution)
    report = profile(model, inputs, assume_density=args.density, **kwargs)
    report.model_name = label
    if args.measure:
        runner = _deployed(model) if args.engine == "packed" else model
        report.latency_s = measure_latency(runner, inputs, runs=args.runs, **kwargs)
    return Entry(label, report)


def _deployed(model: nn.Module) -> nn.Module:
    try:
        from binarize.engine import deploy
    except ImportError as exc:
        raise CLIError(f"--engine packed needs binarize.engine.deploy, which is not available ({exc})") from exc
    return deploy(model)


def _convert(model: nn.Module, method: str, args: argparse.Namespace) -> nn.Module:
    from binarize.convert import convert

    return convert(model, method, keep_first=not args.no_keep_first, keep_last=not args.no_keep_last)


def _label(spec: str, method: Optional[str]) -> str:
    return f"{spec} [{method}]" if method else spec


def collect(args: argparse.Namespace) -> Tuple[List[Entry], Optional[str]]:
    """Profile what the arguments ask for; returns the entries and the baseline's label."""
    if args.all_matting:
        if args.model or args.vs or args.checkpoint or args.method:
            raise CLIError("--all-matting takes no MODEL, --vs, --checkpoint or --method")
        resolution = args.resolution or (512, 288)
        from tqdm import tqdm

        names = matting_model_names()
        entries = [profile_entry(build_model(n, resolution=resolution, downsample_ratio=args.downsample_ratio),
                                 n, args, resolution)
                   for n in tqdm(names, desc="profiling matting models", unit="model", disable=None)]
        return entries, MATTING_BASELINE if MATTING_BASELINE in names else None
    if not args.model:
        raise CLIError("give a MODEL (timm:NAME, torchvision:NAME or a zoo model) or --all-matting")
    spec = args.model
    model = build_model(spec, resolution=args.resolution or (224, 224), checkpoint=args.checkpoint,
                        downsample_ratio=args.downsample_ratio)
    matting = is_matting_model(model) or is_background_matting_model(model)
    resolution = args.resolution or ((512, 288) if matting else (224, 224))
    external = spec.startswith(("timm:", "torchvision:"))
    method = args.method or ("reactnet" if external else None)
    vs_model = (build_model(args.vs, resolution=resolution, downsample_ratio=args.downsample_ratio)
                if args.vs else None)  # fail fast on a bad name
    entries: List[Entry] = []
    baseline: Optional[str] = None
    if external and args.vs is None:
        entries.append(profile_entry(model, spec, args, resolution))
        baseline = spec
    if method:
        model = _convert(model, method, args)
    entries.append(profile_entry(model, _label(spec, method), args, resolution))
    if vs_model is not None:
        entries.append(profile_entry(vs_model, args.vs, args, resolution))
        baseline = args.vs
    return entries, baseline


# --------------------------------------------------------------------------- output
def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.3f}"


def _giga(value: float) -> str:
    return f"{value / 1e9:.3f}"


def _times(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}x"


def summary_table(entries: List[Entry], baseline: Optional[str], engine: str = "simulated") -> str:
    """The paper-style table: parameters, storage, FLOPs, BOPs, OPs dense/sparse, savings."""
    base = next((e.report for e in entries if e.label == baseline), None)
    header = ["model", "params bin", "params fp", "storage MB", "FLOPs G", "BOPs G", "OPs G", "OPs G sparse"]
    measured = any(e.report.latency_s is not None for e in entries)
    if measured:
        header.append(f"latency ms ({engine})")
    if base is not None:
        header += ["comp. saving", "comp. saving sparse", "storage saving"]
    rows = [header]
    for entry in entries:
        r = entry.report
        row = [entry.label, f"{r.binary_params:,}", f"{r.fp_params:,}", _mb(r.storage_bytes),
               _giga(r.flops), _giga(r.bops), _giga(r.ops), _giga(r.sparse_ops)]
        if measured:
            row.append("-" if r.latency_s is None else f"{r.latency_s * 1e3:.1f}")
        if base is not None:
            s = r.compare(base)
            row += [_times(s.computation), _times(s.sparse_computation), _times(s.storage)]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def savings_lines(entries: List[Entry], baseline: Optional[str]) -> List[str]:
    base = next((e for e in entries if e.label == baseline), None)
    if base is None:
        return []
    lines = []
    for entry in entries:
        if entry is base:
            continue
        lines.append(f"{entry.label} vs {base.label}: {entry.report.compare(base.report)}")
    return lines


def mask_lines(entries: List[Entry], args: argparse.Namespace) -> List[str]:
    """Where the sparse figures come from: masked share of the dense cost and the densities used."""
    lines = []
    source = (f"assumed density {args.density}" if args.density is not None
              else f"densities measured on {args.input or 'the built-in synthetic frame'}")
    for entry in entries:
        r = entry.report
        if not r.mask_densities:
            continue
        values = list(r.mask_densities.values())
        lines.append(
            f"{entry.label}: masked branches hold {_giga(r.masked_bops)} G of {_giga(r.bops)} G BOPs and "
            f"{_giga(r.masked_flops)} G of {_giga(r.flops)} G FLOPs; {len(values)} masked modules, "
            f"mean density {sum(values) / len(values):.3f} ({source})"
        )
        if args.density is None and not args.checkpoint:
            lines.append("  note: random weights give arbitrary masks; pass --checkpoint for trained densities "
                         "or --density to assume one (the paper's operating point is about 0.44)")
    return lines


def to_json(entries: List[Entry], baseline: Optional[str], layers: bool) -> Dict[str, Any]:
    base = next((e.report for e in entries if e.label == baseline), None)
    models = []
    for entry in entries:
        data = entry.report.to_dict()
        if not layers:
            data.pop("layers")
        if base is not None and entry.report is not base:
            s = entry.report.compare(base)
            data["savings_vs_baseline"] = {"computation": s.computation, "sparse_computation": s.sparse_computation,
                                           "storage": s.storage}
        models.append(data)
    return {"baseline": baseline, "models": models}


def run(args: argparse.Namespace) -> int:
    if args.runs < 1:
        raise CLIError(f"--runs must be >= 1, got {args.runs}")
    if args.density is not None and not 0.0 <= args.density <= 1.0:
        raise CLIError(f"--density must be in [0, 1], got {args.density}")
    if args.downsample_ratio is not None and not 0.0 < args.downsample_ratio <= 1.0:
        raise CLIError(f"--downsample-ratio must be in (0, 1], got {args.downsample_ratio}")
    entries, baseline = collect(args)
    if args.json:
        print(json.dumps(to_json(entries, baseline, args.layers), indent=2, default=float))
        return 0
    if args.layers:
        for entry in entries:
            print(f"== {entry.label}")
            print(entry.report.table())
            print()
    print(summary_table(entries, baseline, args.engine))
    savings = [] if args.all_matting else savings_lines(entries, baseline)  # the table has them already
    for line in savings + mask_lines(entries, args):
        print(line)
    return 0
