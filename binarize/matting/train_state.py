"""Exactly resumable training state: RNG states as tensors, a data loader that remembers its
position, and atomic checkpoint files readable with ``torch.load(weights_only=True)``.

Why: ``--resume`` must continue a run bit for bit. Each sample is drawn with RNGs seeded from
``(seed, epoch, index)``, so a sample does not depend on which worker or process loads it, and
the loader's state is just ``(epoch, batches consumed)``.
"""
from __future__ import annotations

import os
import pathlib
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from binarize._atomic import atomic_output
from binarize.models.checkpoint import torch_load

__all__ = [
    "get_rng_state",
    "set_rng_state",
    "seed_everything",
    "ResumableLoader",
    "save_atomic",
    "load_checkpoint_file",
]


def get_rng_state() -> Dict[str, Any]:
    """The python, numpy, torch (and CUDA) RNG states as tensors and ints (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python_version": int(version),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": float(gauss) if gauss is not None else None,
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the states saved by :func:`get_rng_state`."""
    internal = tuple(int(v) for v in state["python"].tolist())
    random.setstate((state["python_version"], internal, state["python_gauss"]))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # a fixed mixing of the three numbers (no python hash(): it is salted per process)
    return (seed * 1_000_003 + epoch * 7_919 + index) % 2**31


class _SeededEpochView(Dataset):
    """Items ``indices[i]`` of ``dataset`` drawn with RNGs seeded from (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], epoch: int, seed: int) -> None:
        self.dataset, self.indices, self.epoch, self.seed = dataset, list(indices), epoch, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        index = self.indices[i]
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            seed_everything(_sample_seed(self.seed, self.epoch, index))
            return self.dataset[index]
        finally:  # leave the caller's RNG streams untouched (matters with num_workers=0)
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class ResumableLoader:
    """Endless, sharded batches over ``dataset`` whose position can be saved and restored.

    Shuffles with ``DistributedSampler`` (``rank``/``world_size``, ``drop_last``), one epoch after
    the other; ``state_dict()`` is ``{"epoch", "position"}`` (batches already consumed in the
    epoch) and resuming skips those batches without loading them.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
    ) -> None:
        if len(dataset) < world_size * batch_size:  # type: ignore[arg-type]
            raise ValueError(
                f"dataset has {len(dataset)} samples, fewer than one batch of {batch_size} for each "  # type: ignore[arg-type]
                f"of {world_size} processes"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.epoch, self.position = 0, 0
        self._iterator: Optional[Iterator[Any]] = None

    def __len__(self) -> int:
        """Batches per epoch (per process)."""
        return len(self.sampler) // self.batch_size

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iterator = None

    def _start(self) -> Iterator[Any]:
        self.sampler.set_epoch(self.epoch)
        indices = list(self.sampler)[self.position * self.batch_size : len(self) * self.batch_size]
        view = _SeededEpochView(self.dataset, indices, self.epoch, self.seed)
        loader = DataLoader(
            view,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        return iter(loader)

    def next(self) -> Any:
        """The next batch; moves to the next epoch when one is exhausted."""
        if self.position >= len(self):
            self.epoch, self.position, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self.position += 1
        return batch


def save_atomic(obj: Any, path: Union[str, os.PathLike]) -> pathlib.Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``
    (``binarize._atomic.atomic_output``); creates missing folders."""
    target = pathlib.Path(path)
    with atomic_output(target, parents=True) as tmp:
        torch.save(obj, tmp)
    return target


def load_checkpoint_file(path: Union[str, os.PathLike], map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True``; clear errors for missing or foreign files."""
    p = pathlib.Path(path)
    data = torch_load(p, map_location=map_location)
    if not isinstance(data, dict) or data.get("format") != "binarize-train-v1":
        raise ValueError(f"{p}: not a binarize training checkpoint (no 'format: binarize-train-v1')")
    return data


def gather_list(value: Any, world_size: int) -> List[Any]:
    """``value`` from every process (a one-element list when not distributed)."""
    if world_size == 1:
        return [value]
    import torch.distributed as dist

    out: List[Any] = [None] * world_size
    dist.all_gather_object(out, value)
    return out
