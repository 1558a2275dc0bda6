"""``binarize evaluate``: official matting metrics over a benchmark folder, CSV + markdown output.

Example::

    binarize evaluate --pred-dir out/videomatte_512x288 --true-dir data/videomatte_512x288
"""
from __future__ import annotations

import argparse
from typing import Any

from binarize.matting.metrics import METRICS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``evaluate`` subcommand and its options."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score predicted mattes against ground truth (official RVM/BiMatting metrics)",
        description="Compute MAD, MSE, Grad, Conn, dtSSD (alpha) and MAD, MSE (foreground) over "
        "DATASET/CLIP/{pha,fgr}/NNNN.png folders, aggregate like the official evaluator and write "
        "NAME_summary.csv, NAME_clips.csv, NAME_frames.csv and NAME.md.",
    )
    parser.add_argument("--pred-dir", required=True, help="predictions, e.g. out/videomatte_512x288")
    parser.add_argument("--true-dir", required=True, help="ground truth with the same layout")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                        help="metrics to compute (default: the protocol's; fgr ones only if fgr folders exist)")
    parser.add_argument("--protocol", choices=("lr", "hr"), default="lr",
                        help="lr: evaluate_lr.py (default); hr: evaluate_hr.py (no Conn, Grad not normalised)")
    parser.add_argument("--output-dir", default=None, help="where to write the CSV and markdown (default: --pred-dir)")
    parser.add_argument("--num-workers", type=int, default=2, help="clips evaluated in parallel (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the reports and print the markdown table."""
    from binarize.matting.evaluate import evaluate

    if args.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {args.num_workers}")
    result = evaluate(args.pred_dir, args.true_dir, metrics=args.metrics, protocol=args.protocol,
                      output_dir=args.output_dir, num_workers=args.num_workers, progress=not args.no_progress)
    print(result.markdown(), end="")
    out = args.output_dir or args.pred_dir
    print(f"{len(result.clips)} clips; reports written to {out}")
    return 0
