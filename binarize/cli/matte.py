"""``binarize matte``: matte a video, image folder or image with a zoo model (``convert_video``).

Example::

    binarize matte input.mp4 -m bimatting --checkpoint bimatting.pth -o comp.mp4 --alpha alpha.mp4
    binarize matte input.mp4 -m bgmv2_mobilenetv2 --checkpoint pytorch_mobilenetv2.pth \
        --background-frame bg.png -o comp.mp4
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

from binarize.cli.main import CLIError

ENGINES = ("auto", "simulated", "packed")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``matte`` subcommand and its options."""
    parser = subparsers.add_parser(
        "matte",
        help="matte a video: write composition, alpha and foreground",
        description="Run a matting model over a video file, a folder of images or one image and write "
        "the composition, alpha and foreground (h264 video, ProRes 4444 .mov / VP9 .webm with alpha, "
        "or PNG sequences). Keeps the exact frame rate and copies the audio.",
    )
    parser.add_argument("input", help="video file, folder of png/jpg frames, or one image")
    parser.add_argument("-m", "--model", default="bimatting", help="zoo model name (default: bimatting)")
    parser.add_argument("--checkpoint", help="official .pth state dict or binarize .safetensors checkpoint")
    parser.add_argument("-o", "--output", dest="composition", help="composition output (video, folder or image)")
    parser.add_argument("--alpha", help="alpha matte output")
    parser.add_argument("--foreground", help="foreground output")
    parser.add_argument(
        "--output-type", choices=("video", "png_sequence"), default="video",
        help="video files (default) or folders of PNGs",
    )
    parser.add_argument(
        "--background", default=None,
        help="composition background: green (default for video), a colour name, #RRGGBB, transparent "
        "(default for png_sequence; needs .mov/.webm for video), or an image or video file",
    )
    parser.add_argument("--background-frame", default=None,
                        help="background-matting models (bgmv2_*): the captured background, an image of the "
                        "input's size or a video matched frame by frame")
    parser.add_argument("--downsample-ratio", type=float, default=None,
                        help="model's internal scale in (0, 1]; default min(512 / max(h, w), 1)")
    parser.add_argument("--seq-chunk", type=int, default=1, help="frames per model call (default 1)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="auto (default: packed XNOR-popcount kernels on CPU when the compiled library "
                        "loads, simulated float layers otherwise), simulated or packed")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the model (PyTorch and the packed kernels; default: PyTorch's, one "
                        "per core). Decoding and encoding run beside the model: on a machine with few cores, "
                        "one thread fewer than cores can be faster end to end (docs/performance.md)")
    parser.add_argument("--fps", default=None,
                        help="frame rate of image inputs (default 30): 25, 29.97 (= 30000/1001) or 30000/1001")
    parser.add_argument("--mbps", type=float, default=None, help="video bit rate (default: constant quality)")
    parser.add_argument("--preset", default=None, metavar="PRESET",
                        help="H.264 encoder preset, ultrafast ... veryslow (default veryfast: the encoder shares "
                        "the CPU with the model; slower presets give smaller files)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the model, run ``convert_video`` and print where the outputs went."""
    if not (args.composition or args.alpha or args.foreground):
        raise CLIError("no output given: use -o/--output, --alpha or --foreground")
    if not Path(args.input).exists():
        raise FileNotFoundError(f"input not found: {args.input!r}")
    check_arguments(args)
    with model_threads(getattr(args, "threads", None)):
        return _run_checked(args)


def _run_checked(args: argparse.Namespace) -> int:
    """``run`` once the arguments are checked and the thread count is set."""
    model = build_model(args.model, args.checkpoint)
    engine, reason = select_engine(args.engine, args.device, model)
    print(f"binarize matte: {args.model} on the {engine} engine ({reason})", flush=True)
    if engine == "packed":
        model = deploy_packed(model)

    from binarize.matting.inference import convert_video

    result = convert_video(
        model,
        args.input,
        output_composition=args.composition,
        output_alpha=args.alpha,
        output_foreground=args.foreground,
        output_type=args.output_type,
        background=args.background,
        downsample_ratio=args.downsample_ratio,
        seq_chunk=args.seq_chunk,
        device=args.device,
        progress=not args.no_progress,
        frame_rate=args.fps,
        output_video_mbps=args.mbps,
        output_video_preset=getattr(args, "preset", None),
        background_frame=getattr(args, "background_frame", None),
    )
    written = ", ".join(str(path) for path in result.outputs.values())
    print(
        f"matted {result.frames} frames ({result.width}x{result.height}, {result.frame_rate} fps) "
        f"at {result.fps:.1f} frames/s with {args.model} [{engine}]: {written}"
    )
    return 0


@contextlib.contextmanager
def model_threads(threads: Optional[int]) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (the packed kernels follow it), restoring
    the previous count after; ``None`` leaves PyTorch's count as it is."""
    import torch

    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no model, before the model is loaded: the model name, the checkpoint
    path, --fps, --mbps, --device, the input, the background and every output path (one-line
    errors). ``args.fps`` becomes the exact ``Fraction`` it names."""
    from binarize.matting.background import check_background_use
    from binarize.matting.inference import check_conversion, parse_mbps
    from binarize.matting.video import check_x264_preset, parse_frame_rate
    from binarize.models.registry import model_factory

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}")
    factory = model_factory(args.model)  # unknown name -> ValueError listing the models
    check_background_use(factory, getattr(args, "background_frame", None), args.downsample_ratio)
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint!r}")
    for option, value, parse in (("--fps", args.fps, parse_frame_rate), ("--mbps", args.mbps, parse_mbps),
                                 ("--preset", getattr(args, "preset", None), check_x264_preset)):
        if value is not None:
            try:
                parse(value)
            except ValueError as exc:
                raise ValueError(f"{option}: {exc}") from None
    if args.fps is not None:
        args.fps = parse_frame_rate(args.fps)
    check_conversion(
        args.input, output_composition=args.composition, output_alpha=args.alpha,
        output_foreground=args.foreground, output_type=args.output_type, background=args.background,
        downsample_ratio=args.downsample_ratio, seq_chunk=args.seq_chunk, device=args.device,
        frame_rate=args.fps, output_video_mbps=args.mbps, background_frame=getattr(args, "background_frame", None),
    )


def bundled_checkpoint(name: str) -> Optional[Path]:
    """The demo checkpoint shipped in ``binarize/models/weights`` for ``name``, if there is one."""
    import binarize.models

    path = Path(binarize.models.__file__).parent / "weights" / f"{name}_synthetic.safetensors"
    return path if path.is_file() else None


def build_model(name: str, checkpoint: Optional[str]) -> Any:
    """``create_model(name, checkpoint)``; a checkpoint that does not fit becomes a one-line ``ValueError``."""
    from binarize.models import create_model

    if checkpoint is None:
        checkpoint_path = bundled_checkpoint(name)
        if checkpoint_path is None:
            print(f"binarize matte: warning: no --checkpoint given and {name!r} has no bundled weights; "
                  "the weights are random", file=sys.stderr)
            return create_model(name)
        print(f"binarize matte: using the bundled demo weights {checkpoint_path.name} "
              "(trained on synthetic clips only)", file=sys.stderr)
        checkpoint = str(checkpoint_path)
    elif not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint!r}")
    try:
        return create_model(name, checkpoint=checkpoint)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - state-dict mismatches surface as RuntimeError/KeyError
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {checkpoint!r} does not fit model {name!r}: {first_line}") from None


def deploy_packed(model: Any) -> Any:
    """Switch the binary layers to the packed engine (``binarize.engine.deploy``), imported lazily."""
    try:
        from binarize.engine import deploy
    except ImportError as exc:
        raise CLIError(f"--engine packed is unavailable: {exc}") from None
    deployed = deploy(model)
    return model if deployed is None else deployed


def select_engine(requested: str, device: Any, model: Any = None) -> Tuple[str, str]:
    """The engine that ``--engine requested`` runs on ``device``, and why (said in the first line of output).

    ``"simulated"`` and ``"packed"`` are taken as asked.  ``"auto"`` picks ``"packed"`` on the CPU when
    the compiled kernel library loads, and ``"simulated"`` on another device (the kernels are CPU
    code) or without the library (no C compiler at install); a ``model`` without binary layers (RVM)
    runs as it is, ``"float"``.
    """
    if requested not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    if requested != "auto":
        return requested, "as requested"
    import warnings

    import torch

    try:
        kind = torch.device(device).type if device is not None else "cpu"
    except RuntimeError:
        raise ValueError(f"--device: unknown device {device!r}") from None
    if model is not None:
        from binarize.nn import BinaryConv2d, BinaryLinear

        if not any(isinstance(m, (BinaryConv2d, BinaryLinear)) for m in model.modules()):
            return "float", "auto: the model has no binary layers"
    if kind != "cpu":
        return "simulated", f"auto: the packed kernels run on the CPU, the device is {kind}"
    try:
        from binarize.engine import _lib
    except ImportError as exc:
        return "simulated", f"auto: the packed engine is unavailable ({exc})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reason is said here instead
        loaded = _lib.available()
    if not loaded:
        return "simulated", "auto: the compiled kernel library is not built (pip install -e . needs a C compiler)"
    info = _lib.kernel_info()
    return "packed", f"auto: compiled kernels {info['kernel']}, {torch.get_num_threads()} threads"
