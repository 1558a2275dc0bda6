"""Proof that converted networks learn: every binarization method trained on scikit-learn's digits.

A ResNet-18 (timm, adapted to 32x32 inputs: a 3x3 stride-2 stem conv instead of the 7x7 one, so
the stages run at 8, 4, 2 and 1 pixels, like the 8x8 digits themselves) is converted with
``binarize.convert(model, method)`` (default options: the activation policy, first and last layer
kept full precision) and trained, next to the float model, on the bundled digits (no download:
1797 8x8 images upsampled to 32x32, 3 channels; a fixed split of 1400 train / 397 held out) under
one budget: the same epochs, batch, optimiser (Adam, one-cycle learning rate), seeds and threads
for every method. Methods that declare a latent-weight clip (BNN) get it after every step, and
binarizer schedules (IR-Net, ReCU, ...) are stepped with the training progress.

Prints held-out accuracy (mean +- std over seeds), epochs and time per method, writes JSON and,
with ``--plot``, a bar chart::

    python benchmarks/accuracy.py --threads 2 --plot docs/img/accuracy.png --json accuracy.json
    python benchmarks/accuracy.py --model torchvision-resnet18 --methods float reactnet

Needs scikit-learn (``pip install -e ".[bench]"``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

# Threads that spin while waiting (libgomp's default) steal the CPU from the thread they wait for
# whenever other processes share the cores (as in benchmarks/engine.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import binarize  # noqa: E402
from binarize._atomic import atomic_output, write_text_atomic  # noqa: E402
from binarize.ops import list_methods, step_binarizers  # noqa: E402

TRAIN_SIZE = 1400


def digits(split_seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): digits upsampled to 3x32x32, standardised by train stats."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("benchmarks/accuracy.py needs scikit-learn: pip install scikit-learn")
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
    train, test = order[:TRAIN_SIZE], order[TRAIN_SIZE:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return images[train], labels[train], images[test], labels[test]


def timm_resnet18() -> nn.Module:
    import timm

    model = timm.create_model("resnet18", num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
    return model


def torchvision_model(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(num_classes=10)

    return build


MODELS: Dict[str, Callable[[], nn.Module]] = {
    "timm-resnet18": timm_resnet18,
    "torchvision-resnet18": torchvision_model("resnet18"),
    "torchvision-mobilenet_v2": torchvision_model("mobilenet_v2"),
}


def train_one(model_name: str, method: str, seed: int, epochs: int, data: Sequence[torch.Tensor],
              batch: int = 32, lr: float = 1e-2, activation: str = "auto") -> Dict[str, float]:
    """Train one (model, method, seed) and return held-out accuracy, final train loss and seconds."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    if method != "float":
        model = binarize.convert(model, method, activation=activation)
    clip = getattr(binarize.ops, "clip_latent_weights", None)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(x_train) + batch - 1) // batch
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    start, step, losses = time.perf_counter(), 0, []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(x_train), batch):
            index = order[i:i + batch]
            step_binarizers(model, step / max(total - 1, 1))
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if clip is not None:
                clip(model)
            losses.append(loss.item())
            step += 1
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    tail = losses[-steps_per_epoch:]
    return {"accuracy": accuracy, "train_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - start}


def summarise(results: Dict[str, List[Dict[str, float]]], epochs: int) -> str:
    rows = ["| method | held-out accuracy (%) | seeds | epochs | train loss | time per run (s) |",
            "|---|---|---|---|---|---|"]
    for method, runs in results.items():
        accs = [100 * r["accuracy"] for r in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        loss = statistics.mean(r["train_loss"] for r in runs)
        secs = statistics.mean(r["seconds"] for r in runs)
        rows.append(f"| {method} | {statistics.mean(accs):.1f} +- {std:.1f} | {len(runs)} | {epochs} | "
                    f"{loss:.3f} | {secs:.0f} |")
    return "\n".join(rows)


def plot(results: Dict[str, List[Dict[str, float]]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    means = [statistics.mean(100 * r["accuracy"] for r in results[n]) for n in names]
    stds = [statistics.stdev([100 * r["accuracy"] for r in results[n]]) if len(results[n]) > 1 else 0.0
            for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 4))
    colors = ["tab:gray" if n == "float" else "tab:blue" for n in names]
    ax.bar(names, means, yerr=stds, color=colors, capsize=3)
    ax.axhline(10, color="tab:red", lw=1, ls="--", label="chance")
    ax.set_ylim(0, 100)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)


def merge(args: argparse.Namespace) -> None:
    """Combine result files written with the same settings into one table (and --json / --plot)."""
    merged: Dict[str, List[Dict[str, float]]] = {}
    settings = None
    for path in args.merge:
        with open(path) as handle:
            saved = json.load(handle)
        these = {k: saved.get(k) for k in ("model", "epochs", "activation", "batch", "lr")}
        if settings is not None and these != settings:
            sys.exit(f"--merge: {path} was written with other settings ({these} vs {settings})")
        settings = these
        for method, runs in saved["results"].items():
            merged.setdefault(method, []).extend(runs)
    order = [m for m in ["float", *list_methods()] if m in merged]
    merged = {m: sorted(merged[m], key=lambda r: r.get("seed", 0)) for m in order}
    epochs = settings["epochs"]
    print(f"{settings['model']} on digits, {epochs} epochs, batch {settings['batch']}, lr {settings['lr']}, "
          f"activation={settings['activation']} (merged from {len(args.merge)} files)")
    print(summarise(merged, epochs))
    if args.json:
        write_text_atomic(args.json, json.dumps({**settings, "results": merged}, indent=1))
    if args.plot:
        seeds = max(len(runs) for runs in merged.values())
        plot(merged, args.plot, f"{settings['model']} on digits, {epochs} epochs, {seeds} seeds")
        print(f"plot: {args.plot}")


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="timm-resnet18")
    parser.add_argument("--methods", nargs="+", default=None, help="default: float and every registered method")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--activation", default="auto", help="convert's activation policy (auto, keep, ...)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the per-run results here")
    parser.add_argument("--plot", default=None, help="write a bar chart (PNG) here")
    parser.add_argument("--resume", action="store_true", help="skip the (method, seed) runs already in --json")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="train nothing: combine result files of one setting (e.g. seeds run in parallel "
                             "processes) into one table, --json and --plot")
    args = parser.parse_args(argv)
    methods = args.methods or ["float", *list_methods()]
    unknown = [m for m in methods if m != "float" and m not in list_methods()]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; available: float, {', '.join(list_methods())}")
    if args.epochs < 1 or args.batch < 1 or not args.lr > 0:
        parser.error("--epochs and --batch must be positive, --lr > 0")
    if args.merge:
        merge(args)
        return
    torch.set_num_threads(args.threads)
    data = digits()
    results: Dict[str, List[Dict[str, float]]] = {}
    config = {"model": args.model, "epochs": args.epochs, "activation": args.activation, "batch": args.batch,
              "lr": args.lr}
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as handle:
            saved = json.load(handle)
        if any(saved.get(k) != v for k, v in config.items()):
            parser.error(f"--resume: {args.json} was written with other settings ({saved})")
        results = {m: [r for r in runs if r.get("seed") in args.seeds] for m, runs in saved["results"].items()
                   if m in methods}
    done = {(m, r["seed"]) for m, runs in results.items() for r in runs}
    # seed-major order: an interrupted run still has every method at the first seeds
    runs = [(m, s) for s in args.seeds for m in methods if (m, s) not in done]
    for method, seed in tqdm(runs, desc=f"{args.model} on digits", unit="run"):
        result = train_one(args.model, method, seed, args.epochs, data, args.batch, args.lr, args.activation)
        result["seed"] = seed
        results.setdefault(method, []).append(result)
        tqdm.write(f"{method:>12} seed {seed}: {100 * result['accuracy']:.1f}% "
                   f"(train loss {result['train_loss']:.3f}, {result['seconds']:.0f} s)")
        if args.json:
            write_text_atomic(args.json, json.dumps({**config, "threads": args.threads, "results": results}, indent=1))
    print(f"\n{args.model} on digits ({TRAIN_SIZE} train / 397 held out), {args.epochs} epochs, "
          f"batch {args.batch}, Adam one-cycle lr {args.lr}, {args.threads} threads, activation={args.activation}")
    results = {m: results[m] for m in methods if m in results}
    print(summarise(results, args.epochs))
    if args.plot:
        plot(results, args.plot, f"{args.model} on digits, {args.epochs} epochs, {len(args.seeds)} seeds")
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
