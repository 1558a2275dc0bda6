"""``binarize demo``: the whole job on a built-in default, with no download and no argument.

It writes a short synthetic clip (``SyntheticMatting``, a held-out split the bundled weights never
saw), mattes it with the BiMatting checkpoint shipped in ``binarize/models/weights`` through
``convert_video`` (composite and alpha videos), saves a side-by-side PNG (input | alpha |
composite), scores the alpha against the known ground truth (MAD, MSE, dtSSD in the official
units) and prints the speed and what binarization saves against RVM (``binarize.profile``).

``--engine auto`` (the default) runs the packed engine on the CPU when the compiled kernels load and
the simulated model otherwise, and says which in the first line.  Unless ``--no-compare``, the
model-only frame rate of the deployed model, the simulated model and full-precision RVM is then
measured side by side on the same clip (frames interleaved between the models, median frame time).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from binarize._atomic import atomic_folder, atomic_output, write_text_atomic

DEFAULT_OUTPUT = "binarize-demo"
DEFAULT_FRAMES = 48
DEFAULT_SIZE = "256x144"
DEMO_SEED = 2023
BASELINE = "rvm_mobilenetv3"
COMPARE_FRAMES = 16  # timed frames per model in the side-by-side comparison (after one warm-up frame)
GREEN = (120, 255, 155)  # RVM's composition colour
MAX_CLIP_PIXELS = 48 * 1920 * 1080  # frames x width x height of the clip built in memory (4 GB of float tensors)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="matte a synthetic clip with the bundled BiMatting weights (no download)",
        description=(
            "Write a synthetic clip, matte it with the BiMatting checkpoint bundled in the package, write "
            "composite and alpha videos and a side-by-side PNG, and print MAD/MSE, fps and the savings vs RVM."
        ),
    )
    parser.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help=f"output folder (default ./{DEFAULT_OUTPUT})")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help=f"clip length (default {DEFAULT_FRAMES})")
    parser.add_argument("--size", default=DEFAULT_SIZE,
                        help=f"clip WIDTHxHEIGHT (default {DEFAULT_SIZE})")
    parser.add_argument("--checkpoint", help="BiMatting weights to use instead of the bundled ones")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="seed of the synthetic clip")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--engine", choices=("auto", "simulated", "packed"), default="auto",
                        help="auto (default: packed kernels on CPU when the compiled library loads, "
                        "simulated otherwise), simulated or packed")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the side-by-side fps of the deployed, simulated and RVM models")
    parser.add_argument("--no-profile", action="store_true", help="skip the cost comparison with RVM")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def bundled_checkpoint() -> pathlib.Path:
    """The BiMatting weights shipped with the package (trained on SyntheticMatting)."""
    import binarize.models

    return pathlib.Path(binarize.models.__file__).parent / "weights" / "bimatting_synthetic.safetensors"


def parse_size(text: str) -> Tuple[int, int]:
    """``"WxH"`` -> ``(W, H)`` with a one-line error for anything else."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like WIDTHxHEIGHT (e.g. 256x144), got {text!r}") from None
    if w < 16 or h < 16:
        raise ValueError(f"--size must be at least 16x16, got {text!r}")
    return w, h


def make_clip(frames: int, size: Tuple[int, int], seed: int, split: str = "demo") -> Dict[str, np.ndarray]:
    """A held-out synthetic clip: ``src`` (uint8 T x H x W x 3, what is written and matted),
    ``pha`` (float T x H x W in [0, 1], the ground truth); ``split`` as ``SyntheticMatting``'s
    (benchmarks score the training split's clips too)."""
    from binarize.matting.data import SyntheticMatting

    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    data = SyntheticMatting(clips=1, frames=frames, size=size, seed=seed, background="moving", split=split)
    fgr, pha, bgr = data[0]  # [T, 3, H, W], [T, 1, H, W], [T, 3, H, W] in [0, 1]
    src = (fgr * pha + bgr * (1 - pha)).permute(0, 2, 3, 1).numpy()
    pha = pha[:, 0].numpy()
    return {"src": np.round(np.clip(src, 0, 1) * 255).astype(np.uint8), "pha": pha.astype(np.float32)}


def write_frames(src: np.ndarray, folder: pathlib.Path) -> pathlib.Path:
    """The clip as lossless PNG frames ``0000.png ...`` (written to a temporary folder, then renamed)."""
    from PIL import Image

    with atomic_folder(folder) as tmp:
        for i, frame in enumerate(src):
            Image.fromarray(frame).save(tmp / f"{i:04d}.png")
    return folder


def score(pred: np.ndarray, true: np.ndarray) -> Dict[str, float]:
    """MAD and MSE (x1e3) and dtSSD (x1e2), averaged over frames as the official evaluator does."""
    from binarize.matting import metrics

    return {
        "pha_mad": float(np.mean([metrics.mad(p, t) for p, t in zip(pred, true)])),
        "pha_mse": float(np.mean([metrics.mse(p, t) for p, t in zip(pred, true)])),
        "pha_dtssd": float(np.mean(metrics.dtssd_sequence(pred, true))),
    }


def side_by_side(src: np.ndarray, pha: np.ndarray, path: pathlib.Path) -> pathlib.Path:
    """input | alpha | composite-on-green of one frame as a PNG (temporary name, then renamed)."""
    from PIL import Image

    alpha = np.repeat(np.round(pha * 255).astype(np.uint8)[..., None], 3, axis=2)
    green = np.array(GREEN, dtype=np.float32)
    comp = src.astype(np.float32) * pha[..., None] + green * (1 - pha[..., None])
    row = np.concatenate([src, alpha, np.round(comp).astype(np.uint8)], axis=1)
    with atomic_output(path) as tmp:
        Image.fromarray(row).save(tmp)
    return path


def profile_savings(model: Any, frame: np.ndarray) -> Dict[str, float]:
    """Binarization savings of ``model`` vs full-precision RVM on one uint8 ``H x W x 3`` frame
    (``binarize.profile``; the sparse figure uses the decoder's mask density on this frame)."""
    import torch

    from binarize import create_model, profile

    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float() / 255
    ours = profile(model.cpu(), x)
    baseline = profile(create_model(BASELINE), x)
    saving = ours.compare(baseline)
    return {
        "ops_saving": saving.computation,
        "sparse_ops_saving": saving.sparse_computation,
        "storage_saving": saving.storage,
        "ops": ours.ops,
        "baseline_ops": baseline.ops,
    }


def load_model(checkpoint: Optional[str]) -> Tuple[Any, pathlib.Path]:
    """The demo model: ``checkpoint`` or the bundled weights (a clear error if neither exists)."""
    import binarize

    path = pathlib.Path(checkpoint) if checkpoint else bundled_checkpoint()
    if not path.is_file():
        what = "checkpoint" if checkpoint else "bundled checkpoint (the package was installed without it)"
        raise FileNotFoundError(f"{what} not found: {path}")
    return binarize.load(path), path


def interleaved_fps(models: Dict[str, Any], src: np.ndarray, device: Any, downsample_ratio: float,
                    frames: Optional[int] = None,
                    clock: Callable[[], float] = time.perf_counter) -> Dict[str, float]:
    """Model-only frames per second of each model on the clip ``src`` (uint8 T x H x W x 3), measured
    side by side: frame by frame, every model runs the same frame before the next one (each with its
    own recurrent state), so background load and cache effects hit all of them alike.  The first
    frame warms up (not timed); then ``frames`` frames (default ``COMPARE_FRAMES``), cycling through
    the clip; fps is one over the median frame time."""
    import torch

    if not models:
        return {}
    frames = COMPARE_FRAMES if frames is None else int(frames)
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    device = torch.device(device)
    state: Dict[str, List[Any]] = {name: [None] * 4 for name in models}
    times: Dict[str, List[float]] = {name: [] for name in models}
    order = [0] + [(1 + i) % len(src) for i in range(frames)]  # frame 0 warms up
    with torch.no_grad():
        for step, index in enumerate(order):
            x = torch.from_numpy(src[index]).to(device).permute(2, 0, 1)[None].float() / 255
            for name, model in models.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = clock()
                _, _, *state[name] = model(x, *state[name], downsample_ratio=downsample_ratio)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if step:
                    times[name].append(clock() - start)
    return {name: 1.0 / max(float(np.median(t)), 1e-9) for name, t in times.items()}


def comparison_models(model: Any, deployed: Optional[Any], device: Any) -> Tuple[Dict[str, Any], str]:
    """The models of the side-by-side comparison (deployed when there is one, simulated, full-precision
    RVM with random weights: its speed does not depend on them) and a note on a missing deployed row."""
    from binarize import create_model

    models: Dict[str, Any] = {}
    note = ""
    if deployed is not None:
        models["deployed"] = deployed
    elif device.type != "cpu":
        note = f"no deployed row: the packed kernels run on the CPU, the device is {device.type}"
    else:
        note = "no deployed row: the compiled kernel library is not built"
    models["simulated"] = model
    models[BASELINE] = create_model(BASELINE).to(device).eval()
    return models, note


def comparison_line(fps: Dict[str, float]) -> str:
    """``deployed 40.1 | simulated 5.2 | rvm_mobilenetv3 (32-bit) 12.3 fps; deployed: 3.3x RVM, 7.7x simulated``."""
    cells = [f"{name}{' (32-bit)' if name == BASELINE else ''} {value:.1f}" for name, value in fps.items()]
    line = " | ".join(cells) + " fps"
    lead = "deployed" if "deployed" in fps else "simulated"
    ratios = [f"{fps[lead] / fps[other]:.1f}x {'RVM' if other == BASELINE else other}"
              for other in (BASELINE, "simulated") if other in fps and other != lead]
    return line + (f"; {lead}: " + ", ".join(ratios) if ratios else "")


def run(args: argparse.Namespace) -> int:
    import torch

    from binarize.cli.matte import deploy_packed, select_engine
    from binarize.matting.inference import convert_video, matte_clip, parse_device

    # everything the user typed is checked before the model loads
    size = parse_size(args.size)
    if args.frames < 1:
        raise ValueError(f"--frames must be >= 1, got {args.frames}")
    if args.frames * size[0] * size[1] > MAX_CLIP_PIXELS:
        raise ValueError(f"--frames {args.frames} at --size {size[0]}x{size[1]} is {args.frames * size[0] * size[1]:,} "
                         f"pixels; the demo builds its clip in memory and takes at most {MAX_CLIP_PIXELS:,} "
                         f"(48 frames of 1920x1080)")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = pathlib.Path(args.output)
    model, ckpt = load_model(args.checkpoint)
    engine, reason = select_engine(getattr(args, "engine", "auto"), device, model)
    out.mkdir(parents=True, exist_ok=True)
    model.to(device).eval()
    name = getattr(model, "model_name", type(model).__name__)
    print(f"binarize demo: {name} on the {engine} engine ({reason}); weights {ckpt}", flush=True)
    runner = deploy_packed(model) if engine == "packed" else model

    clip = make_clip(args.frames, size, args.seed)
    frames_dir = write_frames(clip["src"], out / "input")
    ratio = 1.0  # the bundled weights never trained the refiner (downsample_ratio < 1), so run at full scale
    result = convert_video(
        runner, frames_dir, output_composition=out / "composite.mp4", output_alpha=out / "alpha.mp4",
        background="green", downsample_ratio=ratio, device=device, progress=not args.no_progress,
    )
    start = time.perf_counter()
    pred = matte_clip(runner, clip["src"], device=device, downsample_ratio=ratio)
    eval_fps = len(pred) / max(time.perf_counter() - start, 1e-9)
    scores = score(pred, clip["pha"])
    zero_scores = score(np.zeros_like(clip["pha"]), clip["pha"])  # the all-background answer, for reference
    middle = len(pred) // 2
    side_by_side(clip["src"][middle], pred[middle], out / "side_by_side.png")

    summary: Dict[str, Any] = {
        "checkpoint": str(ckpt), "engine": engine, "frames": len(pred), "width": size[0], "height": size[1],
        "fps": result.fps, "model_only_fps": eval_fps, **scores, "all_zero_alpha": zero_scores,
    }
    compare_note = ""
    if not getattr(args, "no_compare", False):
        deployed = runner if engine == "packed" else None
        if deployed is None and device.type == "cpu" and select_engine("auto", device, model)[0] == "packed":
            deployed = deploy_packed(model)  # --engine simulated asked: deploy a copy for the comparison
        models, compare_note = comparison_models(model, deployed, device)
        summary["compare_fps"] = interleaved_fps(models, clip["src"], device, ratio)
    if not args.no_profile:
        summary.update(profile_savings(model, clip["src"][middle]))
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")

    print(f"  clip: {len(pred)} synthetic frames {size[0]}x{size[1]} (held out, seed {args.seed}) -> {out}/")
    print("  wrote: composite.mp4, alpha.mp4, side_by_side.png (input | alpha | composite), input/, summary.json")
    print(f"  speed: {result.fps:.1f} fps end to end on {device.type} ({eval_fps:.1f} fps model only, {engine})")
    if "compare_fps" in summary:
        print(f"  side by side on this clip, model only: {comparison_line(summary['compare_fps'])}")
        if compare_note:
            print(f"    ({compare_note})")
    print(f"  alpha vs ground truth: MAD {scores['pha_mad']:.2f}  MSE {scores['pha_mse']:.2f} (x1e3)  "
          f"dtSSD {scores['pha_dtssd']:.2f} (x1e2)")
    print(f"  all-zero alpha (reference): MAD {zero_scores['pha_mad']:.2f}  MSE {zero_scores['pha_mse']:.2f}  "
          f"dtSSD {zero_scores['pha_dtssd']:.2f}")
    if not args.no_profile:
        print(f"  vs {BASELINE} (32-bit): {summary['ops_saving']:.1f}x fewer OPs dense, "
              f"{summary['sparse_ops_saving']:.1f}x sparse; {summary['storage_saving']:.1f}x less storage")
    return 0


