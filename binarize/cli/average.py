"""``binarize average CKPT CKPT [...] --output-dir DIR``: the uniform weight average of training
checkpoints (a "model soup"), with BatchNorm statistics re-estimated on training data.

Writes ``DIR/averaged.pt`` (the averaged latent weights in the training-checkpoint format, for
``model.init`` / ``binarize train --init``) and, for a binary model from the registry,
``DIR/model.safetensors`` (compact, for ``binarize.load`` and ``binarize demo --checkpoint``).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import tempfile
from typing import Any, List


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "average",
        help="average the weights of training checkpoints (model soup) and re-estimate BatchNorm",
        description=(
            "Average the weights of training checkpoints of one model (e.g. runs fine-tuned from one "
            "checkpoint), re-estimate the BatchNorm statistics on training batches, and write the result."
        ),
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="training checkpoints (last.pt), two or more")
    parser.add_argument("--output-dir", required=True, help="folder for averaged.pt and model.safetensors")
    parser.add_argument("--config", help="training config for the model and the BatchNorm data (default: the one "
                                         "stored in the first checkpoint)")
    parser.add_argument("--bn-batches", type=int, default=8,
                        help="training batches to re-estimate BatchNorm statistics on (0: keep the averaged ones)")
    parser.add_argument("--seed", type=int, default=0, help="seed for drawing the BatchNorm batches")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check_arguments(args: argparse.Namespace) -> List[pathlib.Path]:
    """One-line errors before anything is loaded."""
    paths = [pathlib.Path(p) for p in args.checkpoints]
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(paths)}")
    seen = set()
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        key = path.resolve()
        if key in seen:
            raise ValueError(f"checkpoint listed twice: {path}")
        seen.add(key)
    if args.bn_batches < 0:
        raise ValueError(f"--bn-batches must be >= 0, got {args.bn_batches}")
    out = pathlib.Path(args.output_dir)
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--output-dir {out}: {folder} exists and is not a folder")
    if args.config:
        from binarize.matting.train_config import resolve_config_path

        resolve_config_path(args.config)
    return paths


def run(args: argparse.Namespace) -> int:
    paths = _check_arguments(args)
    from binarize.matting.average import average_checkpoints
    from binarize.matting.train import CHECKPOINT_FORMAT
    from binarize.matting.train_config import config_to_yaml, load_config
    from binarize.matting.train_state import save_atomic

    model, config = average_checkpoints(paths, config=load_config(args.config) if args.config else None,
                                        bn_batches=args.bn_batches, seed=args.seed, progress=not args.no_progress)
    out = pathlib.Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".average-", dir=out))
    try:
        written = [save_atomic({
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "model_name": str(getattr(model, "model_name", "")),
            "config": config_to_yaml(config),
            "averaged_from": [str(p) for p in paths],
            "bn_batches": args.bn_batches,
        }, staging / "averaged.pt")]
        name = str(getattr(model, "model_name", "") or "")
        if name and ":" not in name and config["model"]["precision"] == "binary":
            from binarize.models.checkpoint import save as save_compact

            written.append(save_compact(model, staging / "model.safetensors"))
        for path in written:  # every file is complete before any replaces an earlier result
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"averaged {len(paths)} checkpoints -> {', '.join(str(out / p.name) for p in written)}")
    return 0
