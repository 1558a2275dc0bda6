"""Weight averaging of training checkpoints ("model soups") with BatchNorm re-estimation.

Runs fine-tuned from one checkpoint usually stay in one basin of the loss, and the uniform
average of their weights often scores better than each of them (Wortsman et al., "Model soups",
ICML 2022; for points along one run, Izmailov et al., "Averaging Weights Leads to Wider Optima and
Better Generalization", UAI 2018). A binary layer computes with the binarization of its *latent*
weight, so the average is taken over the latent weights and the averaged model computes with the
signs (and scales) of that average; the inputs must therefore be training checkpoints
(``last.pt``): a compact file keeps only the signs and scales.

BatchNorm running statistics do not average: the averaged network's activations are not any
member's, so they are re-estimated on batches of the training data with the weights fixed (SWA's
``torch.optim.swa_utils.update_bn``). For BiMatting on the synthetic set, averaging without this
step was worse than the members and with it better (docs/matting.md, "Averaging runs").
"""
from __future__ import annotations

import pathlib
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import yaml
from torch import Tensor, nn

from binarize.matting.train import (
    _load_across_precisions,
    build_matting_dataset,
    build_model,
    crop_for_training,
)
from binarize.matting.train_config import load_config, validate_config
from binarize.matting.train_state import load_checkpoint_file, seed_everything

__all__ = [
    "average_state_dicts",
    "read_training_checkpoints",
    "calibration_batches",
    "recalibrate_batchnorm",
    "average_checkpoints",
]

PathLike = Union[str, pathlib.Path]


def average_state_dicts(states: Sequence[Mapping[str, Tensor]]) -> Dict[str, Tensor]:
    """The uniform average of state dicts with the same keys, shapes and dtypes.

    Floating-point entries are averaged (accumulated in float64, stored in their own dtype);
    integer entries (BatchNorm's ``num_batches_tracked``, counters) are taken from the first state.
    Raises ``ValueError`` naming the first key that differs between two states."""
    if len(states) < 2:
        raise ValueError(f"averaging needs at least two state dicts, got {len(states)}")
    first = states[0]
    for index, state in enumerate(states[1:], start=2):
        missing = [key for key in first if key not in state]
        extra = [key for key in state if key not in first]
        if missing or extra:
            key = (missing or extra)[0]
            where = f"missing from state {index}" if missing else f"only in state {index}"
            raise ValueError(f"state dicts differ: {key!r} is {where} ({len(missing)} missing, {len(extra)} extra)")
        for key, value in first.items():
            other = state[key]
            if other.shape != value.shape or other.dtype != value.dtype:
                raise ValueError(f"state dicts differ at {key!r}: {tuple(value.shape)} {value.dtype} in state 1, "
                                 f"{tuple(other.shape)} {other.dtype} in state {index}")
    averaged: Dict[str, Tensor] = {}
    for key, value in first.items():
        if value.is_floating_point():
            total = sum(state[key].detach().to(torch.float64) for state in states)
            averaged[key] = (total / len(states)).to(value.dtype)
        else:
            averaged[key] = value.detach().clone()
    return averaged


def read_training_checkpoints(paths: Sequence[PathLike]) -> List[Dict[str, Any]]:
    """Load training checkpoints (``weights_only=True``) and check that they hold one model."""
    checkpoints = []
    for path in paths:
        data = load_checkpoint_file(path)
        if not isinstance(data.get("model"), dict):
            raise ValueError(f"{path}: the training checkpoint holds no model state")
        checkpoints.append(data)
    names = [str(data.get("model_name", "")) for data in checkpoints]
    for path, name in zip(paths[1:], names[1:]):
        if name != names[0]:
            raise ValueError(f"{path} holds {name or 'an unnamed model'}, {paths[0]} holds "
                             f"{names[0] or 'an unnamed model'}: only checkpoints of one model can be averaged")
    return checkpoints


def calibration_batches(config: Dict[str, Any], count: int, seed: int = 0) -> Iterator[Tensor]:
    """``count`` batches of composited training clips ``src`` [B, T, 3, H, W], drawn as the
    config's training passes draw them (``data``: dataset, batch size, ``crop`` / ``random_crop``)."""
    data = config["data"]
    dataset = build_matting_dataset(data, size=data["resolution_lr"], seq_length=data["seq_length_lr"])
    batch = int(data["batch_size_per_gpu"])
    seed_everything(seed)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    for b in range(count):
        items = [dataset[order[(b * batch + i) % len(order)]] for i in range(batch)]
        fgr, pha, bgr = (torch.stack([item[k] for item in items]) for k in range(3))
        fgr, pha, bgr = crop_for_training(data, fgr, pha, bgr)
        yield fgr * pha + bgr * (1 - pha)


def recalibrate_batchnorm(model: nn.Module, batches: Iterator[Tensor], device: Optional[torch.device] = None) -> int:
    """Re-estimate every BatchNorm layer's running statistics as the plain average over
    ``batches`` (weights fixed, no gradients; ``torch.optim.swa_utils.update_bn``). Returns the
    number of BatchNorm layers; the model's train/eval mode is kept."""
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if count:
        torch.optim.swa_utils.update_bn(batches, model, device=device)
    return count


def _checkpoint_config(data: Dict[str, Any], source: str) -> Dict[str, Any]:
    text = data.get("config")
    if not isinstance(text, str):
        raise ValueError(f"{source} stores no training config; pass one (--config)")
    return validate_config(yaml.safe_load(text), source=f"{source} (stored config)")


def average_checkpoints(
    paths: Sequence[PathLike],
    *,
    config: Optional[Union[PathLike, Dict[str, Any]]] = None,
    bn_batches: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model whose weights are the uniform average of the training checkpoints ``paths``, with
    its BatchNorm statistics re-estimated on ``bn_batches`` batches of training data (0: keep the
    averaged statistics). ``config`` (a path or a validated dict; default: the one stored in the
    first checkpoint) names the model, its precision and the data. Returns the model, in ``eval()``
    mode, and that config."""
    if bn_batches < 0:
        raise ValueError(f"bn_batches must be >= 0, got {bn_batches}")
    checkpoints = read_training_checkpoints(paths)
    if config is None:
        cfg = _checkpoint_config(checkpoints[0], str(paths[0]))
    elif isinstance(config, dict):
        cfg = config
    else:
        cfg = load_config(config)
    model = build_model(cfg["model"]["name"], cfg["model"]["kwargs"], precision=cfg["model"]["precision"])
    _load_across_precisions(model, average_state_dicts([data["model"] for data in checkpoints]))
    if bn_batches:
        if getattr(model, "takes_background", False):
            raise ValueError("BatchNorm re-estimation feeds source clips only; for a background-matting "
                             "model pass bn_batches=0")
        batches: Iterator[Tensor] = calibration_batches(cfg, bn_batches, seed)
        if progress:
            from tqdm import tqdm

            batches = iter(tqdm(batches, total=bn_batches, unit="batch", desc="BatchNorm statistics"))
        model.train()
        recalibrate_batchnorm(model, batches)
    return model.eval(), cfg
