"""Benchmark evaluation over the official VideoMatte layout, aggregated like the official evaluator.

Layout (prediction and ground truth alike; RVM/BiMatting ``evaluation/evaluate_lr.py``)::

    ROOT/DATASET/CLIP/pha/NNNN.png     e.g. videomatte_512x288/videomatte_static/0000/pha/0000.png
    ROOT/DATASET/CLIP/fgr/NNNN.png     (jpg for videomatte_1920x1080)

``ROOT`` may also be one dataset folder (``ROOT/CLIP/pha``). Frames are the image files of the
prediction's ``pha`` folder; the ground truth must have the same names. Per-frame metrics come from
:mod:`binarize.matting.metrics`; the first frame's dtSSD is 0 and counts.

Aggregation (official): the official script writes one row per clip and one column per frame index
into a spreadsheet whose score is ``AVERAGE`` over frame columns of ``AVERAGE`` over clip rows. So a
score is the mean over frame indices of the mean over the clips that have that frame; with clips of
equal length (the official sets) this equals the mean over clips of each clip's mean over frames.
Two spreadsheet artefacts are not reproduced: the sheet averages only the frame columns of the first
clip's length and at most up to column ``ZZ`` (700 frames); we use every frame index.
"""
from __future__ import annotations

import csv
import io
import os
import pathlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from binarize._atomic import write_text_atomic
from binarize.matting.data.imageio import list_images, list_subdirs, read_gray, read_rgb
from binarize.matting.metrics import FOREGROUND_METRICS, METRICS, frame_metrics

__all__ = ["PROTOCOLS", "ClipResult", "EvaluationResult", "evaluate", "find_clips"]

PathLike = Union[str, os.PathLike]

#: Default metrics and Grad variant of the official low- and high-resolution evaluators.
PROTOCOLS: Dict[str, Dict[str, object]] = {
    "lr": {"metrics": METRICS, "grad_normalize": True},
    "hr": {"metrics": ("pha_mad", "pha_mse", "pha_grad", "pha_dtssd", "fgr_mse"), "grad_normalize": False},
}


@dataclass
class ClipResult:
    """Per-frame metric values of one clip."""

    dataset: str
    clip: str
    frames: List[str]
    values: Dict[str, List[float]] = field(default_factory=dict)

    def mean(self, metric: str) -> float:
        """The clip's mean of ``metric`` over its frames."""
        return float(np.mean(self.values[metric])) if self.values[metric] else float("nan")


def _official_average(clips: Sequence[ClipResult], metric: str) -> float:
    """Mean over frame indices of the mean over the clips that have that frame (the official sheet)."""
    longest = max((len(c.values[metric]) for c in clips), default=0)
    per_index = []
    for k in range(longest):
        column = [c.values[metric][k] for c in clips if k < len(c.values[metric])]
        per_index.append(np.mean(column))
    return float(np.mean(per_index)) if per_index else float("nan")


@dataclass
class EvaluationResult:
    """All clips' per-frame metrics with the official aggregation and CSV / markdown writers."""

    metrics: Tuple[str, ...]
    clips: List[ClipResult]
    protocol: str = "lr"

    def datasets(self) -> List[str]:
        """Names of the datasets (e.g. videomatte_motion, videomatte_static) in the results."""
        return sorted({c.dataset for c in self.clips})

    def summary(self, dataset: Optional[str] = None) -> Dict[str, float]:
        """Official score of each metric over all clips, or over one dataset's clips."""
        clips = [c for c in self.clips if dataset is None or c.dataset == dataset]
        return {m: _official_average(clips, m) for m in self.metrics}

    def rows(self) -> List[Dict[str, object]]:
        """One row per clip (mean over its frames) in evaluation order."""
        return [{"dataset": c.dataset, "clip": c.clip, "frames": len(c.frames),
                 **{m: c.mean(m) for m in self.metrics}} for c in self.clips]

    def clips_csv(self) -> str:
        """CSV text: one row per clip with its mean of each metric."""
        return _csv(["dataset", "clip", "frames", *self.metrics], self.rows())

    def frames_csv(self) -> str:
        """CSV text: one row per frame with every metric."""
        rows = [{"dataset": c.dataset, "clip": c.clip, "frame": name, **{m: c.values[m][i] for m in self.metrics}}
                for c in self.clips for i, name in enumerate(c.frames)]
        return _csv(["dataset", "clip", "frame", *self.metrics], rows)

    def summary_csv(self) -> str:
        """CSV text: the official score over all clips, then per dataset when there are several."""
        rows = [{"dataset": "all", "clips": len(self.clips), **self.summary()}]
        if len(self.datasets()) > 1:
            for name in self.datasets():
                count = sum(c.dataset == name for c in self.clips)
                rows.append({"dataset": name, "clips": count, **self.summary(name)})
        return _csv(["dataset", "clips", *self.metrics], rows)

    def markdown(self) -> str:
        """A markdown table: the overall score and one row per dataset."""
        header = "| dataset | clips | " + " | ".join(self.metrics) + " |"
        lines = [header, "|" + "---|" * (len(self.metrics) + 2)]
        entries = [("all", None)] + ([(d, d) for d in self.datasets()] if len(self.datasets()) > 1 else [])
        for label, dataset in entries:
            count = sum(dataset is None or c.dataset == dataset for c in self.clips)
            values = self.summary(dataset)
            lines.append(f"| {label} | {count} | " + " | ".join(f"{values[m]:.4f}" for m in self.metrics) + " |")
        return "\n".join(lines) + "\n"


def _csv(columns: Sequence[str], rows: Sequence[Dict[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def find_clips(root: PathLike) -> List[Tuple[str, str]]:
    """``(dataset, clip)`` pairs under ``root``: ``root/DATASET/CLIP/pha`` or, for one dataset, ``root/CLIP/pha``."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"directory not found: {root}")
    direct = [c for c in list_subdirs(root) if (root / c / "pha").is_dir()]
    if direct:
        return [(".", c) for c in direct]
    pairs = [(d, c) for d in list_subdirs(root) for c in list_subdirs(root / d) if (root / d / c / "pha").is_dir()]
    if not pairs:
        raise ValueError(f"no clips found in {root} (expected DATASET/CLIP/pha/NNNN.png or CLIP/pha/NNNN.png)")
    return pairs


def _clip_dir(root: pathlib.Path, dataset: str, clip: str) -> pathlib.Path:
    return root / clip if dataset == "." else root / dataset / clip


def _frame_names(pred: pathlib.Path, true: pathlib.Path, kind: str, label: str) -> List[str]:
    """The prediction's frame names of ``kind``; the ground truth must have exactly the same frames."""
    if not (true / kind).is_dir():
        raise FileNotFoundError(f"{label}: ground truth has no {kind} folder ({true / kind})")
    pred_names = list_images(pred / kind)
    true_names = list_images(true / kind)
    if not pred_names:
        raise ValueError(f"{label}: no {kind} frames in {pred / kind}")
    if len(pred_names) != len(true_names):
        raise ValueError(f"{label}: {len(pred_names)} predicted {kind} frames but {len(true_names)} true frames")
    if pred_names != true_names:
        missing = sorted(set(pred_names) - set(true_names))[:3]
        raise ValueError(f"{label}: predicted {kind} frames {missing} have no ground truth with the same name")
    return pred_names


def _check_shapes(label: str, name: str, *arrays: np.ndarray) -> None:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{label}/{name}: prediction and ground truth sizes differ {sorted(shapes)}")


def _evaluate_clip(pred_root: pathlib.Path, true_root: pathlib.Path, dataset: str, clip: str,
                   metrics: Tuple[str, ...], grad_normalize: bool, tick) -> ClipResult:
    label = clip if dataset == "." else f"{dataset}/{clip}"
    pred, true = _clip_dir(pred_root, dataset, clip), _clip_dir(true_root, dataset, clip)
    if not true.is_dir():
        raise FileNotFoundError(f"{label}: no ground-truth clip folder {true}")
    names = _frame_names(pred, true, "pha", label)
    use_fgr = any(m in FOREGROUND_METRICS for m in metrics)
    if use_fgr:
        if not (pred / "fgr").is_dir():
            raise FileNotFoundError(f"{label}: prediction has no fgr folder ({pred / 'fgr'}); "
                                    "evaluate alpha only with --metrics")
        if _frame_names(pred, true, "fgr", label) != names:
            raise ValueError(f"{label}: fgr and pha frames differ")
    result = ClipResult(dataset, clip, names, {m: [] for m in metrics})
    prev = None
    for name in names:
        pred_pha, true_pha = read_gray(pred / "pha" / name), read_gray(true / "pha" / name)
        _check_shapes(label, f"pha/{name}", pred_pha, true_pha)
        pred_fgr = true_fgr = None
        if use_fgr:
            pred_fgr, true_fgr = read_rgb(pred / "fgr" / name), read_rgb(true / "fgr" / name)
            _check_shapes(label, f"fgr/{name}", pred_fgr, true_fgr, np.empty(true_pha.shape + (3,)))
        values = frame_metrics(metrics, pred_pha, true_pha, prev, pred_fgr, true_fgr, grad_normalize)
        for m in metrics:
            result.values[m].append(values[m])
        prev = (pred_pha, true_pha)
        tick()
    return result


def _resolve_metrics(metrics: Optional[Sequence[str]], protocol: str, pred_root: pathlib.Path,
                     true_root: pathlib.Path, clips: List[Tuple[str, str]]) -> Tuple[str, ...]:
    if metrics is None:
        chosen = tuple(PROTOCOLS[protocol]["metrics"])  # type: ignore[arg-type]
        has_fgr = all((_clip_dir(root, d, c) / "fgr").is_dir() for d, c in clips for root in (pred_root, true_root))
        return chosen if has_fgr else tuple(m for m in chosen if m not in FOREGROUND_METRICS)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; available: {', '.join(METRICS)}")
    if not metrics:
        raise ValueError("no metrics requested")
    return tuple(dict.fromkeys(metrics))


def evaluate(pred_dir: PathLike, true_dir: PathLike, metrics: Optional[Sequence[str]] = None,
             protocol: str = "lr", output_dir: Optional[PathLike] = None, write: bool = True,
             num_workers: int = 2, progress: bool = True) -> EvaluationResult:
    """Evaluate predicted mattes against the ground truth over the official benchmark layout.

    Args:
        pred_dir, true_dir: benchmark roots (e.g. ``.../videomatte_512x288``) with the same layout.
        metrics: subset of ``binarize.matting.metrics.METRICS``; default: the protocol's metrics
            (foreground ones only if every clip has an ``fgr`` folder in both trees).
        protocol: ``"lr"`` (evaluate_lr.py: all seven metrics, min-max normalised Grad) or ``"hr"``
            (evaluate_hr.py: MAD, MSE, un-normalised Grad, dtSSD, fgr MSE).
        output_dir: where ``write`` puts ``NAME_summary.csv``, ``NAME_clips.csv``, ``NAME_frames.csv`` and
            ``NAME.md`` (NAME: the prediction folder's name); default ``pred_dir`` (like the official xlsx).
        num_workers: clips evaluated in parallel threads.

    Returns an :class:`EvaluationResult`; its ``summary()`` holds the official scores.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    pred_root, true_root = pathlib.Path(pred_dir), pathlib.Path(true_dir)
    if not pred_root.is_dir():
        raise FileNotFoundError(f"prediction directory not found: {pred_root}")
    if not true_root.is_dir():
        raise FileNotFoundError(f"ground-truth directory not found: {true_root}")
    clips = find_clips(pred_root)
    chosen = _resolve_metrics(metrics, protocol, pred_root, true_root, clips)
    grad_normalize = bool(PROTOCOLS[protocol]["grad_normalize"])
    total = sum(len(list_images(_clip_dir(pred_root, d, c) / "pha")) for d, c in clips)

    from tqdm import tqdm

    lock = threading.Lock()
    with tqdm(total=total, desc="evaluate", unit="frame", disable=not progress) as bar:
        def tick() -> None:
            with lock:
                bar.update(1)

        def work(pair: Tuple[str, str]) -> ClipResult:
            return _evaluate_clip(pred_root, true_root, pair[0], pair[1], chosen, grad_normalize, tick)

        if num_workers > 1 and len(clips) > 1:
            pool = ThreadPoolExecutor(max_workers=num_workers)
            try:
                results = list(pool.map(work, clips))
            finally:  # on the first error, drop the clips not started yet instead of finishing them
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            results = [work(pair) for pair in clips]

    result = EvaluationResult(chosen, results, protocol)
    if write:
        out = pathlib.Path(output_dir) if output_dir is not None else pred_root
        out.mkdir(parents=True, exist_ok=True)
        name = pred_root.resolve().name
        write_text_atomic(out / f"{name}_summary.csv", result.summary_csv())
        write_text_atomic(out / f"{name}_clips.csv", result.clips_csv())
        write_text_atomic(out / f"{name}_frames.csv", result.frames_csv())
        write_text_atomic(out / f"{name}.md", result.markdown())
    return result
