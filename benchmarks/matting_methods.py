"""The BiMatting paper's comparison in miniature: every matting model trained under one budget.

BiMatting (Qin et al., NeurIPS 2023, Table 1) compares full-precision RVM-MobileNetV3 with BiMatting
and RVM binarized by classic BNN methods. This benchmark repeats that comparison on a budget a CPU
can afford: every model is trained by the same ``binarize.matting.train.Trainer`` on the same
procedural ``SyntheticMatting`` clips (no download), with the same steps, batch, resolution, seeds,
losses and learning-rate schedule, then scored on held-out clips (split ``"eval"``) with the
official metrics (MAD, MSE, Grad, Conn, dtSSD; ``binarize.matting.metrics``) next to its OPs and
storage from ``binarize.profile``.

The budget is ReActNet's two-step recipe (Liu et al., ECCV 2020), which
``binarize/matting/configs/synthetic/bimatting_step1.yaml`` / ``bimatting_step2.yaml`` use for
BiMatting: phase 1 trains binary activations with float weights (``model.precision:
latent_weights``) on the clips of seed 0 at lr 1e-3 with a cosine decay; phase 2 binarizes the
weights too and continues from phase 1's weights on the clips of seed 1 at half the learning rate,
with a warm-up. The full-precision model runs the very same two phases (its precision has nothing
to change), so every model sees the same data for the same number of steps; ``--float-one-phase``
gives it one cosine decay over all the steps instead (its own recipe: nothing to stage), on as many
clips of the same generator.

The converted RVMs (``rvm_<method>``, ``binarize.models.baselines``) binarize their depthwise
convs as the paper does; ``--keep-depthwise`` keeps them 32-bit (a stronger baseline, the
definition every table in docs/matting.md measured before 2026-12-07 used).

Besides the metrics, each result carries two diagnostics of the temporal behaviour:
``pha_dtssd_parts`` splits dtSSD's squared error into flicker where nothing moves (static
background, static subject) and error where the subject moves (the all-zero alpha has no
flicker, so a model that finds the subject but flickers can score a worse dtSSD than it), and
``stateless`` scores the model again with every frame matted alone (no recurrent state), which
tells a state that steadies the matte from one that drifts on clips longer than it was trained on.

Each model's result is written to ``OUT/<model>.json`` as soon as it is known, and its training
checkpoints to ``OUT/runs/<model>/``, so a budget can span several runs: ``--resume`` skips the
models already scored and continues an interrupted training exactly (the trainer's ``--resume``).

    python benchmarks/matting_methods.py --steps 300 --json matting_methods.json --plot docs/img/matting_methods.png
    python benchmarks/matting_methods.py --resume            # after an interruption
    python benchmarks/matting_methods.py --resume --second-eval-seed 7   # add a second held-out set
    python benchmarks/matting_methods.py --models bimatting rvm_reactnet --steps 40   # a quick look

One thread by default (``--threads``): the timings in the table are those of one CPU thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Threads that spin while waiting (libgomp's default) steal the CPU from the thread they wait for
# whenever other processes share the cores (as in benchmarks/accuracy.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from binarize._atomic import atomic_output, write_text_atomic  # noqa: E402
from binarize.matting import metrics  # noqa: E402
from binarize.matting.data import SyntheticMatting  # noqa: E402
from binarize.matting.inference import matte_clip  # noqa: E402
from binarize.matting.train import Trainer, build_model  # noqa: E402
from binarize.matting.train_config import load_config  # noqa: E402


@dataclass(frozen=True)
class ModelSpec:
    """A model of the comparison: the trainer's ``model.name`` / ``model.kwargs``, whether it
    has binary layers (and so trains phase 1 at ``latent_weights``) and whether it is RVM converted
    by ``binarize.models.baselines.binarized_rvm`` (and so takes ``keep_depthwise``)."""

    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    binary: bool = True
    label: str = ""
    converted_rvm: bool = False


#: The paper's models (Table 1), in its order; ``rvm_fda`` is RVM converted with FDA (Xu et al.,
#: NeurIPS 2021) by ``binarize.models.baselines.binarized_rvm``, like the registered baselines.
MODELS: Dict[str, ModelSpec] = {
    "rvm_mobilenetv3": ModelSpec("rvm_mobilenetv3", binary=False, label="RVM (32-bit)"),
    "bimatting": ModelSpec("bimatting", label="BiMatting"),
    "rvm_bnn": ModelSpec("rvm_bnn", label="BNN", converted_rvm=True),
    "rvm_xnor": ModelSpec("rvm_xnor", label="XNOR-Net", converted_rvm=True),
    "rvm_dorefa": ModelSpec("rvm_dorefa", label="DoReFa", converted_rvm=True),
    "rvm_bireal": ModelSpec("rvm_bireal", label="Bi-Real", converted_rvm=True),
    "rvm_reactnet": ModelSpec("rvm_reactnet", label="ReActNet", converted_rvm=True),
    "rvm_irnet": ModelSpec("rvm_irnet", label="IR-Net", converted_rvm=True),
    "rvm_recu": ModelSpec("rvm_recu", label="ReCU", converted_rvm=True),
    "rvm_fda": ModelSpec("binarize.models.baselines:binarized_rvm", {"method": "fda"}, label="FDA",
                          converted_rvm=True),
}

#: The metrics of the table, with the official units (see ``binarize.matting.metrics``).
METRIC_NAMES = ("pha_mad", "pha_mse", "pha_grad", "pha_conn", "pha_dtssd")
BASE_CONFIG = "synthetic/bimatting.yaml"


@dataclass(frozen=True)
class Budget:
    """What every model gets: ``steps`` optimiser steps in all (``steps // 2`` per phase) of
    ``clips_per_step`` clips x ``frames`` frames at ``size`` (W, H). ``float_one_phase`` trains the
    full-precision models in one phase of all the steps instead (``phases``)."""

    steps: int = 300
    size: Tuple[int, int] = (128, 72)
    frames: int = 2
    clips_per_step: int = 4
    lr: float = 1e-3
    seed: int = 0
    keep_depthwise: bool = False
    float_one_phase: bool = False

    def model_kwargs(self, spec: ModelSpec) -> Dict[str, Any]:
        """``spec``'s model kwargs under this budget: the converted RVMs keep their depthwise convs
        in full precision when ``keep_depthwise`` (``binarize.models.baselines``; the paper
        binarizes them, the default)."""
        if self.keep_depthwise and spec.converted_rvm:
            return {**spec.kwargs, "keep_depthwise": True}
        return dict(spec.kwargs)

    @property
    def phase_steps(self) -> Tuple[int, int]:
        first = self.steps // 2
        return first, self.steps - first


@dataclass(frozen=True)
class Phase:
    """One training phase of a model: its steps, learning rate (peak of the cosine decay), the seed
    of its training clips, its linear warm-up and the precision the model trains at."""

    steps: int
    lr: float
    data_seed: int
    warmup_steps: int
    precision: str


def phases(spec: ModelSpec, budget: Budget) -> List[Phase]:
    """The phases ``spec`` trains in under ``budget``: ReActNet's two steps for every model (phase 1
    at ``budget.lr`` on the clips of ``budget.seed``, binary activations with float weights for the
    binary models; phase 2 fully binary at half the rate with a 10% warm-up on the clips of
    ``budget.seed + 1``), or, for the full-precision models when ``budget.float_one_phase``, one
    cosine decay over all the steps at ``budget.lr`` on as many clips of ``budget.seed``: the two
    steps stage binarization, which a 32-bit model does not have, and their restart costs it the
    end of the first decay. Same steps, clips per step, frames and resolution either way."""
    if budget.float_one_phase and not spec.binary:
        return [Phase(budget.steps, budget.lr, budget.seed, 0, "binary")]
    first, second = budget.phase_steps
    return [Phase(first, budget.lr, budget.seed, 0, "latent_weights" if spec.binary else "binary"),
            Phase(second, budget.lr / 2, budget.seed + 1, max(second // 10, 1), "binary")]


def phase_config(spec: ModelSpec, budget: Budget, phase: int, output_dir: pathlib.Path,
                 init: Optional[pathlib.Path]) -> Dict[str, Any]:
    """The trainer config of phase ``phase`` (1-based, ``phases``) of ``spec`` under ``budget``: the
    synthetic BiMatting recipe (``synthetic/bimatting.yaml``: losses, ``loss.alpha_ste``, cosine
    decay) with the model, precision, data seed, steps and learning rate of the phase."""
    plan = phases(spec, budget)[phase - 1]
    width, height = budget.size
    overrides = [
        f"model.name={spec.name}",
        f"model.kwargs={json.dumps(budget.model_kwargs(spec))}",
        f"model.precision={plan.precision}",
        f"model.init={json.dumps(str(init)) if init is not None else 'null'}",
        "data.synthetic={" + f"clips: {plan.steps * budget.clips_per_step}, frames: {budget.frames}, "
        f"size: [{width}, {height}], seed: {plan.data_seed}" + "}",
        f"data.batch_size_per_gpu={budget.clips_per_step}",
        f"optim.lr={{backbone: {plan.lr}, aspp: {plan.lr}, decoder: {plan.lr}, refiner: 0.0}}",
        f"optim.warmup_steps={plan.warmup_steps}",
        f"run.output_dir={json.dumps(str(output_dir))}",
        f"run.seed={budget.seed}",
        "run.log_interval=10",
        f"run.checkpoint_interval={max(min(plan.steps, 50), 1)}",
        "run.progress=true",
        "run.device=cpu",
    ]
    return load_config(BASE_CONFIG, overrides)


def train_model(spec: ModelSpec, budget: Budget, run_dir: pathlib.Path, resume: bool) -> Tuple[nn.Module, float]:
    """The phases of ``spec`` (``phases``; continuing an interrupted phase exactly when ``resume``);
    returns the trained model (in its final, binary precision) and the training wall time in seconds
    (this run's part only when resumed)."""
    seconds = 0.0
    init: Optional[pathlib.Path] = None
    trainer: Optional[Trainer] = None
    for phase in range(1, len(phases(spec, budget)) + 1):
        out = run_dir / f"phase{phase}"
        done = out / "done"
        if resume and done.is_file():
            seconds += float(done.read_text() or 0)
        else:
            last = out / "last.pt"
            cfg = phase_config(spec, budget, phase, out, init)
            start = time.perf_counter()
            trainer = Trainer(cfg, resume=str(last) if resume and last.is_file() else None)
            try:
                trainer.fit()
            finally:
                trainer.close()
            elapsed = time.perf_counter() - start
            seconds += elapsed
            done.write_text(f"{elapsed:.1f}")
        init = out / "last.pt"
    model = build_model(spec.name, budget.model_kwargs(spec), str(init))
    return model.eval(), seconds


def eval_clips(budget: Budget, clips: int, frames: int, seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Held-out clips (split ``"eval"``, never trained on) as ``(src uint8 T x H x W x 3, true alpha
    float T x H x W)``; the source is quantised to 8 bits, as a video file would be."""
    data = SyntheticMatting(clips=clips, frames=frames, size=budget.size, seed=seed, split="eval")
    out = []
    for fgr, pha, bgr in data:
        src = (fgr * pha + bgr * (1 - pha)).permute(0, 2, 3, 1).numpy()
        out.append((np.round(np.clip(src, 0, 1) * 255).astype(np.uint8), pha[:, 0].numpy()))
    return out


def score_clips(preds: Sequence[np.ndarray], clips: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Dict[str, float]:
    """The official metrics (MAD/MSE x1e3, Grad/Conn /1e3, dtSSD x1e2), averaged over every frame of
    every clip like the official evaluator (dtSSD 0 on a clip's first frame)."""
    totals = {name: [] for name in METRIC_NAMES}
    for pred, (_, true) in zip(preds, clips):
        prev = None
        for p, t in zip(pred, true):
            for name, value in metrics.frame_metrics(METRIC_NAMES, p, t, prev).items():
                totals[name].append(value)
            prev = (p, t)
    return {name: float(np.mean(values)) for name, values in totals.items()}


def mad_by_frame(preds: Sequence[np.ndarray], clips: Sequence[Tuple[np.ndarray, np.ndarray]]) -> List[float]:
    """MAD (x1e3) at each frame index, averaged over the clips: how the matte holds up as the
    recurrent state ages (a model trained on T-frame clips never saw a state older than T-1 updates)."""
    per_clip = [np.abs(pred - true).mean(axis=(1, 2)) * 1e3 for pred, (_, true) in zip(preds, clips)]
    return [round(float(v), 2) for v in np.mean(per_clip, axis=0)]


#: Frame-to-frame changes of the true alpha below one 8-bit level count as "static".
STATIC_CHANGE = 1 / 255


def dtssd_parts(preds: Sequence[np.ndarray], clips: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Dict[str, float]:
    """Where the temporal error comes from: the squared error of the predicted frame-to-frame change
    against the true one (what dtSSD measures), summed over the pixels of each region and divided
    by all pixels of every frame pair (x1e4), so the three parts add up to the mean square.

    ``static_background`` (true alpha 0 and unchanged) and ``static_subject`` (true alpha > 0 and
    unchanged) are flicker, error where nothing moves; ``moving`` is where the true alpha changes,
    the subject's motion. The all-zero alpha has no flicker and all of the motion as error, which
    is how it can score a lower dtSSD than a model that finds the subject but flickers."""
    sums = {"static_background": 0.0, "static_subject": 0.0, "moving": 0.0}
    count = 0
    for pred, (_, true) in zip(preds, clips):
        true_change = true[1:] - true[:-1]
        error = ((pred[1:] - pred[:-1]) - true_change) ** 2
        moving = np.abs(true_change) >= STATIC_CHANGE
        subject = true[1:] > 0
        sums["moving"] += float(error[moving].sum())
        sums["static_subject"] += float(error[~moving & subject].sum())
        sums["static_background"] += float(error[~moving & ~subject].sum())
        count += error.size
    return {name: total / max(count, 1) * 1e4 for name, total in sums.items()}


#: What ``score_model`` adds to the metrics; a result without one of them (scored before it existed)
#: gets it from its checkpoint on ``--resume``.
DIAGNOSTICS = ("pha_dtssd_parts", "stateless")


def score_model(model: nn.Module, clips: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Any]:
    """The model's metrics on ``clips`` (``score_clips``), its MAD by frame index (``mad_by_frame``),
    where its temporal error comes from (``dtssd_parts``), and the metrics and parts again with every
    frame matted alone (``stateless``): whether the recurrent state helps the matte or hurts it (a
    state older than the training clips were long can drift)."""
    preds = [matte_clip(model, src) for src, _ in clips]
    alone = [matte_clip(model, src, recurrent=False) for src, _ in clips]
    return {**score_clips(preds, clips), "pha_mad_by_frame": mad_by_frame(preds, clips),
            "pha_dtssd_parts": dtssd_parts(preds, clips),
            "stateless": {**score_clips(alone, clips), "pha_dtssd_parts": dtssd_parts(alone, clips)}}


def costs(model: nn.Module, size: Tuple[int, int]) -> Dict[str, float]:
    """OPs (dense and with measured mask sparsity, one frame at ``size``) and storage (bytes, 1 bit
    per binary weight) from ``binarize.profile``."""
    from binarize import profile

    width, height = size
    report = profile(model, torch.rand(1, 3, height, width))
    return {"ops": report.ops, "sparse_ops": report.sparse_ops, "storage_bytes": report.storage_bytes,
            "binary_params": report.binary_params, "fp_params": report.fp_params}


def run_model(key: str, budget: Budget, clips: Sequence[Tuple[np.ndarray, np.ndarray]], out: pathlib.Path,
              resume: bool) -> Dict[str, Any]:
    """Train, score and profile one model; the result is also written to ``OUT/<key>.json``."""
    spec = MODELS[key]
    run_dir = out / "runs" / key
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(budget.seed)
    model, seconds = train_model(spec, budget, run_dir, resume)
    start = time.perf_counter()
    scores = score_model(model, clips)
    result = {"model": key, "label": spec.label or key, "binary": spec.binary, **scores,
              **costs(model, budget.size), "train_s": seconds, "eval_s": time.perf_counter() - start,
              "steps": budget.steps}
    write_json(out / f"{key}.json", result)
    return result


def final_checkpoint(key: str, out: pathlib.Path, budget: Budget) -> pathlib.Path:
    """Where ``key``'s trained weights are under ``out``: the last checkpoint of its last phase."""
    return out / "runs" / key / f"phase{len(phases(MODELS[key], budget))}" / "last.pt"


def rescore(key: str, out: pathlib.Path, clips: Sequence[Tuple[np.ndarray, np.ndarray]],
            budget: Budget) -> Dict[str, Any]:
    """A finished model's scores (``score_model``) on ``clips``, read back from the checkpoint of its
    last phase, so a held-out set or a score can be added to results trained earlier."""
    spec = MODELS[key]
    model = build_model(spec.name, budget.model_kwargs(spec), str(final_checkpoint(key, out, budget))).eval()
    return score_model(model, clips)


def score_second_set(key: str, out: pathlib.Path, clips: Sequence[Tuple[np.ndarray, np.ndarray]],
                     seed: int, budget: Budget) -> Dict[str, Any]:
    """A finished model's scores on a second held-out set (``--second-eval-seed``): one held-out set
    of four clips ranks close models differently from another."""
    return {"seed": seed, **rescore(key, out, clips, budget)}


def zero_reference(clips: Sequence[Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Any]:
    """The all-zero (all-background) alpha's scores: the number a model must beat to have learned
    anything beyond 'nothing is foreground'."""
    zeros = [np.zeros_like(true) for _, true in clips]
    return {"model": "all_zero", "label": "all-zero alpha", **score_clips(zeros, clips),
            "pha_dtssd_parts": dtssd_parts(zeros, clips)}


def format_table(results: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table: metrics, OPs (G), storage (MB), training time."""
    head = ("| model | MAD | MSE | Grad | Conn | dtSSD | OPs (G) | sparse OPs (G) | storage (MB) | train (min) |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = [head]
    for r in results:
        cost = ("| {:.3f} | {:.3f} | {:.3f} | {:.1f} |".format(r["ops"] / 1e9, r["sparse_ops"] / 1e9,
                                                              r["storage_bytes"] / 1e6, r["train_s"] / 60)
                if "ops" in r else "| - | - | - | - |")
        rows.append("| {} | {:.1f} | {:.1f} | {:.2f} | {:.2f} | {:.2f} ".format(
            r["model"], r["pha_mad"], r["pha_mse"], r["pha_grad"], r["pha_conn"], r["pha_dtssd"]) + cost)
    return "\n".join(rows)


def format_dtssd_parts(results: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table of ``dtssd_parts`` (x1e4): flicker where nothing moves, error where the
    subject moves, and their sum."""
    rows = ["| model | static background | static subject | moving | all |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        parts = r["pha_dtssd_parts"]
        rows.append("| {} | {:.2f} | {:.2f} | {:.2f} | {:.2f} |".format(
            r["model"], parts["static_background"], parts["static_subject"], parts["moving"], sum(parts.values())))
    return "\n".join(rows)


def format_stateless(results: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table of MAD and dtSSD with the recurrent state against every frame matted alone."""
    rows = ["| model | MAD | MAD alone | dtSSD | dtSSD alone | static subject | static subject alone |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        alone = r["stateless"]
        rows.append("| {} | {:.1f} | {:.1f} | {:.2f} | {:.2f} | {:.2f} | {:.2f} |".format(
            r["model"], r["pha_mad"], alone["pha_mad"], r["pha_dtssd"], alone["pha_dtssd"],
            r["pha_dtssd_parts"]["static_subject"], alone["pha_dtssd_parts"]["static_subject"]))
    return "\n".join(rows)


def write_json(path: pathlib.Path, payload: Any) -> None:
    """``payload`` as indented JSON at ``path``, written atomically (missing folders created)."""
    write_text_atomic(path, json.dumps(payload, indent=1), parents=True)


def write_atomically(path: pathlib.Path, write: Any) -> None:
    """Call ``write(tmp)`` on a unique temporary name beside ``path`` and rename it to ``path`` only
    when it returned, so an interrupted run never leaves a half-written result under the real name."""
    with atomic_output(path, parents=True) as tmp:
        write(tmp)


def label_heights(results: Sequence[Dict[str, Any]], zero_mad: float, gap: float = 0.045) -> List[float]:
    """Heights of the plot's labels: each at its point's MAD, except that the labels of points at
    (nearly) the same OPs, as the converted RVMs all are, are pushed apart to ``gap`` of the MAD
    range, in MAD order, so none overlaps another."""
    mads = [r["pha_mad"] for r in results] + [zero_mad]
    step = gap * (max(mads) - min(mads) or 1.0)
    heights = [r["pha_mad"] for r in results]
    columns: List[List[int]] = []
    for i in sorted(range(len(results)), key=lambda k: results[k]["ops"]):
        if columns and results[i]["ops"] <= 1.1 * results[columns[-1][0]]["ops"]:
            columns[-1].append(i)
        else:
            columns.append([i])
    for column in columns:
        order = sorted(column, key=lambda k: heights[k])
        for below, above in zip(order, order[1:]):
            heights[above] = max(heights[above], heights[below] + step)
    return heights


def plot(results: Sequence[Dict[str, Any]], zero: Dict[str, Any], path: pathlib.Path, title: str) -> None:
    """MAD against OPs (log scale), one point per model, the all-zero alpha as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        colour = "tab:red" if r["model"] == "bimatting" else ("tab:green" if not r["binary"] else "tab:blue")
        ax.scatter(r["ops"] / 1e9, r["pha_mad"], color=colour, zorder=3)
    for r, label_y in zip(results, label_heights(results, zero["pha_mad"])):
        ax.annotate(r["label"], (r["ops"] / 1e9, r["pha_mad"]), xytext=(r["ops"] / 1e9 * 1.12, label_y),
                    fontsize=8, va="center",
                    arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3})
    ax.axhline(zero["pha_mad"], color="grey", linestyle="--", linewidth=1, label="all-zero alpha")
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.xaxis.set_major_locator(FixedLocator([0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("OPs per frame (G, dense; FLOPs + BOPs/64)")
    ax.set_ylabel("MAD (x1e3, lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per model, both phases together")
    parser.add_argument("--size", default="128x72", help="training and evaluation resolution WxH")
    parser.add_argument("--frames", type=int, default=2, help="frames per training clip")
    parser.add_argument("--clips-per-step", type=int, default=4, help="training clips per optimiser step")
    parser.add_argument("--eval-clips", type=int, default=4)
    parser.add_argument("--eval-frames", type=int, default=12)
    parser.add_argument("--eval-seed", type=int, default=1)
    parser.add_argument("--second-eval-seed", type=int,
                        help="also score every model on a second held-out set of this seed (same clips and frames)")
    parser.add_argument("--seed", type=int, default=0, help="data seed of phase 1 (phase 2: +1) and run seed")
    parser.add_argument("--keep-depthwise", action="store_true",
                        help="keep the converted RVMs' depthwise convs in full precision (the paper binarizes them; "
                             "the tables measured before that default)")
    parser.add_argument("--lr", type=float, default=Budget.lr,
                        help="peak learning rate of phase 1 (phase 2: half of it)")
    parser.add_argument("--float-one-phase", action="store_true",
                        help="train the full-precision models in one cosine decay over all the steps instead of "
                             "the binary models' two phases (same steps, clips and frames)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="matting_methods_runs", help="folder of per-model results and checkpoints")
    parser.add_argument("--resume", action="store_true", help="keep finished models, continue interrupted training")
    parser.add_argument("--json", help="write all results (and the budget, machine) to this file")
    parser.add_argument("--plot", help="write the MAD-vs-OPs plot (PNG) to this file")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    for name in ("steps", "frames", "clips_per_step"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.lr > 0:
        parser.error("--lr must be > 0")
    if args.second_eval_seed is not None and args.second_eval_seed == args.eval_seed:
        parser.error("--second-eval-seed must differ from --eval-seed (it would score the same clips again)")
    args.budget = Budget(steps=args.steps, size=(width, height), frames=args.frames,
                         clips_per_step=args.clips_per_step, lr=args.lr, seed=args.seed,
                         keep_depthwise=args.keep_depthwise, float_one_phase=args.float_one_phase)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget_file = out / "budget.json"
    budget = {**dataclasses.asdict(args.budget), "size": list(args.budget.size),
              "eval": {"clips": args.eval_clips, "frames": args.eval_frames, "seed": args.eval_seed}}
    # A budget written before an option existed ran as without it, except that the converted RVMs
    # kept their depthwise convs in full precision (the default before --keep-depthwise).
    older = {"keep_depthwise": True, "float_one_phase": False}
    if args.resume and budget_file.is_file() and {**older, **json.loads(budget_file.read_text())} != budget:
        sys.exit(f"--resume: {budget_file} holds another budget ({budget_file.read_text().strip()}); "
                 "use the same options or another --out")
    write_json(budget_file, budget)
    clips = eval_clips(args.budget, args.eval_clips, args.eval_frames, args.eval_seed)
    zero = zero_reference(clips)
    results: List[Dict[str, Any]] = []
    bar = tqdm(args.models, unit="model", dynamic_ncols=True)
    for key in bar:
        bar.set_postfix_str(key)
        done = out / f"{key}.json"
        if args.resume and done.is_file():
            results.append(json.loads(done.read_text()))
            continue
        results.append(run_model(key, args.budget, clips, out, args.resume))
        tqdm.write(f"{key}: MAD {results[-1]['pha_mad']:.1f} dtSSD {results[-1]['pha_dtssd']:.2f} "
                   f"({results[-1]['train_s'] / 60:.1f} min)")
    bar.close()
    for result in results:  # results scored before a diagnostic existed
        missing = [name for name in DIAGNOSTICS if name not in result]
        if missing:
            scores = rescore(result["model"], out, clips, args.budget)
            result.update({name: scores[name] for name in missing})
            write_json(out / f"{result['model']}.json", result)
    second: Optional[Dict[str, Any]] = None
    if args.second_eval_seed is not None:
        clips2 = eval_clips(args.budget, args.eval_clips, args.eval_frames, args.second_eval_seed)
        for result in tqdm(results, unit="model", desc=f"held-out seed {args.second_eval_seed}", dynamic_ncols=True):
            earlier = result.get("second_eval", {})
            if earlier.get("seed") != args.second_eval_seed or not set(DIAGNOSTICS) <= set(earlier):
                result["second_eval"] = score_second_set(result["model"], out, clips2, args.second_eval_seed,
                                                          args.budget)
                write_json(out / f"{result['model']}.json", result)
        second = {"seed": args.second_eval_seed, "all_zero": zero_reference(clips2)}
    print(f"{args.budget.steps} steps of {args.budget.clips_per_step} clips x {args.budget.frames} frames at "
          f"{args.budget.size[0]}x{args.budget.size[1]}; held out: {args.eval_clips} clips x {args.eval_frames} "
          f"frames (split 'eval', seed {args.eval_seed}); {args.threads} thread(s), {platform.processor() or platform.machine()}")
    print(format_table(results + [zero]))
    print("where the temporal error comes from (dtssd_parts, mean squared x1e4):")
    print(format_dtssd_parts(results + [zero]))
    print("every frame matted alone (no recurrent state):")
    print(format_stateless(results))
    if second is not None:
        on_second = [{**r, **r["second_eval"]} for r in results]  # each result with its second set's scores
        print(f"second held-out set (seed {second['seed']}):")
        print(format_table(on_second + [second["all_zero"]]))
        print(format_dtssd_parts(on_second + [second["all_zero"]]))
        print(format_stateless(on_second))
    if args.json:
        payload = {"budget": budget, "threads": args.threads, "machine": platform.platform(),
                   "torch": torch.__version__, "results": results, "all_zero": zero}
        if second is not None:
            payload["second_eval"] = second
        write_json(pathlib.Path(args.json), payload)
    if args.plot:
        title = (f"{args.budget.steps} steps of {args.budget.clips_per_step} clips x {args.budget.frames} frames, "
                 f"{args.budget.size[0]}x{args.budget.size[1]}, held-out SyntheticMatting "
                 f"({args.eval_clips} clips x {args.eval_frames} frames)")
        write_atomically(pathlib.Path(args.plot), lambda tmp: plot(results, zero, tmp, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
