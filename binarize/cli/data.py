"""``binarize data``: dataset utilities; ``binarize data synth`` writes the procedural matting set.

Example::

    binarize data synth synthetic --clips 16 --frames 32 --size 512x288 --seed 0
"""
from __future__ import annotations

import argparse
from typing import Any

from binarize.cli.main import CLIError

# frames are built as float32 arrays in memory: a 100000x100000 request would need ~112 GiB per
# array and end in a MemoryError after minutes, so sides past 8K are refused up front
MAX_SIDE = 8192


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``data`` subcommand and its actions."""
    parser = subparsers.add_parser(
        "data",
        help="dataset utilities (synthetic matting data)",
        description="Dataset utilities. 'synth' writes procedural matting clips with exact alpha and "
        "foreground in the VideoMatte240K training layout and the official evaluation layout.",
    )
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION")
    synth = actions.add_parser(
        "synth",
        help="write the synthetic matting dataset",
        description="Write OUT/train/{fgr,pha}/CLIP/NNNN.EXT, OUT/backgrounds/{images,videos}, "
        "OUT/videomatte_WxH/videomatte_static/CLIP/{com,fgr,pha,bgr}/NNNN.png and OUT/synthetic.json.",
    )
    synth.add_argument("out", help="output folder (written to a temporary name, renamed at the end)")
    synth.add_argument("--clips", type=int, default=8, help="training clips (default 8)")
    synth.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    synth.add_argument("--size", default="512x288",
                       help="frame size WIDTHxHEIGHT, 8 to 8192 per side (default 512x288)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--eval-clips", type=int, default=None,
                       help="held-out clips with a still background (videomatte_static; default: --clips)")
    synth.add_argument("--motion-clips", type=int, default=0,
                       help="held-out clips with a moving background (videomatte_motion; default 0)")
    synth.add_argument("--format", dest="image_format", choices=("png", "jpg"), default="png",
                       help="image format of the training layout (default png)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT")
    synth.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Dispatch the chosen action."""
    if args.data_action != "synth":
        raise CLIError("choose an action: binarize data synth OUT [--clips N --frames T --size WxH --seed S]")
    from binarize.matting.data.synthetic import parse_size, write_synthetic

    for name in ("clips", "frames"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    width, height = parse_size(args.size)
    if max(width, height) > MAX_SIDE:
        raise ValueError(f"--size {width}x{height} is too large: each side at most {MAX_SIDE} pixels")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    out = write_synthetic(
        args.out, clips=args.clips, frames=args.frames, size=(width, height), seed=args.seed,
        eval_clips=args.eval_clips, motion_clips=args.motion_clips, image_format=args.image_format,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    eval_clips = args.clips if args.eval_clips is None else args.eval_clips
    print(f"wrote {args.clips} training clips and {eval_clips + args.motion_clips} evaluation clips "
          f"({args.frames} frames, {width}x{height}) to {out}")
    print(f"  train:      {out / 'train'} (fgr, pha) + {out / 'backgrounds'}")
    print(f"  evaluation: {out / f'videomatte_{width}x{height}'}")
    return 0
