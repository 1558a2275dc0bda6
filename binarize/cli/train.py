"""``binarize train --config CONFIG``: one stage of the matting training recipe.

Single process: ``binarize train --config bimatting/stage1.yaml``. Many GPUs or nodes:
``torchrun --nproc_per_node 8 -m binarize train --config ...`` (DDP; NCCL on GPU, gloo on CPU).
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a matting model (one stage of the RVM/BiMatting recipe; torchrun for DDP)",
        description=(
            "Train a matting model from a YAML config. Shipped configs: bimatting/stage1.yaml .. stage4.yaml, "
            "rvm/stage1.yaml .. stage4.yaml, synthetic/bimatting.yaml. Launch with torchrun for multi-GPU/node DDP."
        ),
    )
    parser.add_argument("--config", required=True, help="YAML config (a path, or one shipped, e.g. bimatting/stage1.yaml)")
    parser.add_argument("--output-dir", help="folder for checkpoints and logs (overrides run.output_dir)")
    parser.add_argument(
        "--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
        help="continue exactly from a training checkpoint (default: OUTPUT_DIR/last.pt)",
    )
    parser.add_argument("--init", help="start from these weights (overrides model.init; e.g. the previous stage)")
    parser.add_argument("--distill-from", metavar="MODEL", help="full-precision teacher for feature mimicking, e.g. rvm_mobilenetv3")
    parser.add_argument("--teacher-checkpoint", help="weights of the teacher (official .pth or compact file)")
    parser.add_argument("--max-steps", type=int, help="stop after this global step (resume later with --resume)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value (YAML syntax), e.g. --set data.num_workers=0; repeatable",
    )
    return parser


def _overrides(args: argparse.Namespace) -> List[str]:
    out = list(args.overrides)
    if args.output_dir:
        out.append(f"run.output_dir={args.output_dir}")
    if args.init:
        out.append(f"model.init={args.init}")
    if args.distill_from:
        out.append(f"distill.teacher={args.distill_from}")
    if args.teacher_checkpoint:
        out.append(f"distill.teacher_checkpoint={args.teacher_checkpoint}")
    if args.max_steps is not None:
        out.append(f"run.max_steps={args.max_steps}")
    if args.device:
        out.append(f"run.device={args.device}")
    if args.no_progress:
        out.append("run.progress=false")
    return out


def run(args: argparse.Namespace) -> int:
    from binarize.matting.train import train
    from binarize.matting.train_config import load_config

    config = load_config(args.config, _overrides(args))
    check_run_options(config["run"])
    if args.teacher_checkpoint and not config["distill"]["teacher"]:
        raise ValueError("--teacher-checkpoint needs --distill-from (or distill.teacher in the config)")
    resume = None
    if args.resume is not None:
        resume = args.resume or config["run"]["output_dir"]
    out = train(config, resume=resume)
    print(f"training output: {out}")
    return 0


def check_run_options(run: Dict[str, Any]) -> None:
    """One-line errors, before any model or data is built, for a device that does not exist here
    and a negative ``run.max_steps`` (which would train nothing and still exit 0)."""
    if run.get("max_steps") is not None and int(run["max_steps"]) < 0:
        raise ValueError(f"run.max_steps must be >= 0 (leave it unset for no limit), got {run['max_steps']}")
    if run.get("device") not in (None, "", "auto"):
        from binarize.matting.inference import parse_device

        try:
            parse_device(run["device"])
        except ValueError as exc:
            raise ValueError(f"--device / run.device: {exc}") from None
