"""Score BiMatting checkpoints on the held-out clips of docs/matting.md, and what the loss thinks of them.

The bundled weights are judged on 48-frame 256x144 clips of ``SyntheticMatting(split="demo",
background="moving")`` (seed 2023 is ``binarize demo``'s clip; seeds 1, 7, 11, 12, 101, 102, 103 the
others of the docs' table), matted frame by frame in ``eval()`` as ``binarize demo`` does. For each
checkpoint this prints, per clip and on average, MAD / MSE (x1e3) and dtSSD (x1e2) next to the
all-zero alpha's, and the alpha terms of the official matting loss on the same clip (L1, Laplacian,
5 x coherence; ``binarize.matting.losses``).

``--stretch B,C`` also scores the contrast-stretched alpha ``clamp(B * alpha + C, 0, 1)`` of every
checkpoint (repeatable). It is a probe, not a model: how much an under-confident alpha costs, and
whether the training loss would have preferred the stretched one (docs/matting.md, "Calibrating the
output"). Fit a stretch on clips of ``--split train`` and judge it on the held-out ones.

    python benchmarks/bimatting_clips.py                                   # the bundled weights
    python benchmarks/bimatting_clips.py --checkpoint runs/step14/model.safetensors --checkpoint bundled
    python benchmarks/bimatting_clips.py --stretch 1.5,-0.15 --json clips.json
    python benchmarks/bimatting_clips.py --checkpoint old.safetensors --checkpoint bundled --image alphas.png
    python benchmarks/bimatting_clips.py --split train --seeds 500,501,502,503 --stretch 1.3,0

One thread by default (``--threads``): a binary network's sign flips depend on the order of float
sums, so scores are compared at one thread count.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from binarize._atomic import atomic_output, write_text_atomic

DEMO_SEEDS = (2023, 1, 7, 11, 12, 101, 102, 103)
SPLITS = ("demo", "eval", "train")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", default=None,
                        help="a BiMatting checkpoint (compact .safetensors, a training run's .pt or an official "
                             ".pth); 'bundled' for the package's weights (the default); repeatable")
    parser.add_argument("--seeds", default=",".join(map(str, DEMO_SEEDS)), help="comma-separated clip seeds")
    parser.add_argument("--split", default="demo", choices=SPLITS, help="SyntheticMatting split of the clips")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", default="256x144", help="WxH")
    parser.add_argument("--stretch", action="append", default=[], metavar="B,C",
                        help="also score clamp(B * alpha + C, 0, 1); repeatable")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here (temporary name, then renamed)")
    parser.add_argument("--image", help="write a PNG of the first clip's middle frame: input | ground truth | "
                                        "each checkpoint's alpha (temporary name, then renamed)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if not args.seeds:
            raise ValueError
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
        if w < 1 or h < 1:
            raise ValueError
        args.size = (w, h)
    except ValueError:
        parser.error(f"--size must be WxH with positive integers, got {args.size!r}")
    if min(args.size) < 64:
        parser.error(f"--size must be at least 64x64 (the loss's 5-level Laplacian pyramid), got {args.size[0]}x{args.size[1]}")
    if args.frames < 2:
        parser.error(f"--frames must be >= 2 (dtSSD needs two frames), got {args.frames}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    args.stretch = [parse_stretch(s, parser) for s in args.stretch]
    args.checkpoint = args.checkpoint or ["bundled"]
    for ckpt in args.checkpoint:
        if ckpt != "bundled" and not pathlib.Path(ckpt).is_file():
            parser.error(f"checkpoint not found: {ckpt}")
    return args


def parse_stretch(text: str, parser: argparse.ArgumentParser) -> Tuple[float, float]:
    try:
        scale, offset = (float(v) for v in text.split(","))
    except ValueError:
        parser.error(f"--stretch must be B,C (two numbers), got {text!r}")
    if not scale > 0:
        parser.error(f"--stretch scale must be > 0, got {scale}")
    return scale, offset


def loss_terms(pred: np.ndarray, true: np.ndarray) -> Dict[str, float]:
    """The alpha terms of the official matting loss (``losses.matting_loss``, official weights) on
    one whole clip (``[T, H, W]`` arrays), and their sum."""
    import torch

    from binarize.matting import losses

    p = torch.from_numpy(pred.astype(np.float32))[None, :, None]
    t = torch.from_numpy(true.astype(np.float32))[None, :, None]
    fgr = torch.zeros(*p.shape[:2], 3, *p.shape[-2:])  # no foreground: its terms are zero
    terms = {key: float(value) for key, value in losses.matting_loss(fgr, p, fgr, t).items()
             if key in ("pha_l1", "pha_laplacian", "pha_coherence")}
    return {**terms, "alpha_loss": sum(terms.values())}


def stretched(pred: np.ndarray, scale: float, offset: float) -> np.ndarray:
    return np.clip(scale * pred + offset, 0.0, 1.0)


def evaluate(args: argparse.Namespace) -> Dict[str, Any]:
    import torch
    from tqdm import tqdm

    from binarize.cli.demo import bundled_checkpoint, make_clip, score
    from binarize.matting.inference import matte_clip
    from binarize.matting.train import build_model

    torch.set_num_threads(args.threads)
    clips = {seed: make_clip(args.frames, args.size, seed, args.split) for seed in args.seeds}
    zero = {seed: score(np.zeros_like(c["pha"]), c["pha"]) for seed, c in clips.items()}
    variants: List[Tuple[str, float, float]] = [("", 1.0, 0.0)] + [(f" stretch {b:g},{c:g}", b, c) for b, c in args.stretch]
    results: Dict[str, Any] = {}
    middle = args.frames // 2
    first = clips[args.seeds[0]]
    panels = [("input", first["src"][middle]), ("ground truth", first["pha"][middle])]
    for ckpt in args.checkpoint:
        path = bundled_checkpoint() if ckpt == "bundled" else pathlib.Path(ckpt)
        model = build_model("bimatting", {}, str(path))  # the simulated network, in eval() below
        rows: Dict[str, Dict[int, Dict[str, float]]] = {name: {} for name, _, _ in variants}
        for seed in tqdm(args.seeds, desc=pathlib.Path(path).name, disable=args.no_progress, leave=False):
            pred = matte_clip(model, clips[seed]["src"])
            if seed == args.seeds[0]:
                panels.append((pathlib.Path(ckpt).stem, pred[middle]))
            for name, b, c in variants:
                p = stretched(pred, b, c) if name else pred
                rows[name][seed] = {**score(p, clips[seed]["pha"]), **loss_terms(p, clips[seed]["pha"])}
        for name, _, _ in variants:
            results[f"{ckpt}{name}"] = {"checkpoint": str(path), "per_clip": rows[name],
                                        "mean": {k: float(np.mean([r[k] for r in rows[name].values()]))
                                                 for k in next(iter(rows[name].values()))}}
    if args.image:
        write_image(panels, args.image)
    return {"split": args.split, "frames": args.frames, "size": list(args.size), "threads": args.threads,
            "seeds": args.seeds, "all_zero": zero, "results": results}


def report(payload: Dict[str, Any]) -> str:
    seeds = payload["seeds"]
    head = "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean MAD | dtSSD < zero | alpha loss |"
    lines = [f"MAD / MSE / dtSSD on {len(seeds)} clips of split {payload['split']!r}, "
             f"{payload['frames']} frames at {payload['size'][0]}x{payload['size'][1]}", "", head,
             "|" + " --- |" * (len(seeds) + 4)]

    def cell(r: Dict[str, float]) -> str:
        return f"{r['pha_mad']:.1f} / {r['pha_mse']:.1f} / {r['pha_dtssd']:.2f}"

    for name, res in payload["results"].items():
        clips = res["per_clip"]
        below = sum(clips[s]["pha_dtssd"] < payload["all_zero"][s]["pha_dtssd"] for s in seeds)
        lines.append(f"| {name} | " + " | ".join(cell(clips[s]) for s in seeds)
                     + f" | {res['mean']['pha_mad']:.1f} | {below} of {len(seeds)} | {res['mean']['alpha_loss']:.4f} |")
    zero = payload["all_zero"]
    lines.append("| all-zero alpha | " + " | ".join(cell(zero[s]) for s in seeds)
                 + f" | {np.mean([zero[s]['pha_mad'] for s in seeds]):.1f} | | |")
    return "\n".join(lines)


def write_image(panels: List[Tuple[str, np.ndarray]], path: str) -> None:
    """Panels side by side (alphas as grey images) with their names above them, as one PNG."""
    from PIL import Image, ImageDraw

    tiles = []
    for name, panel in panels:
        rgb = panel if panel.ndim == 3 else np.repeat(np.round(np.clip(panel, 0, 1) * 255).astype(np.uint8)[..., None], 3, 2)
        tile = np.zeros((rgb.shape[0] + 14, rgb.shape[1], 3), dtype=np.uint8)
        tile[14:] = rgb
        image = Image.fromarray(tile)
        ImageDraw.Draw(image).text((2, 1), name, fill=(255, 255, 255))
        tiles.append(np.asarray(image))
    with atomic_output(path) as tmp:
        Image.fromarray(np.concatenate(tiles, axis=1)).save(tmp)


def write_json(payload: Dict[str, Any], path: str) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")


def main(argv: Sequence[str] = ()) -> int:
    args = parse_args(list(argv))
    payload = evaluate(args)
    print(report(payload))
    if args.json:
        write_json(payload, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
