"""The matting training recipe of RVM / BiMatting, from one CPU to many GPUs with ``torchrun``.

Each step follows the official ``train.py`` of RVM (PeterL1n/RobustVideoMatting) and BiMatting
(htqin/BiMatting): a low-resolution matting pass (``downsample_ratio=1``), optionally a
high-resolution pass (``downsample_ratio=data.downsample_ratio_hr``), and optionally a
segmentation pass (video clips on even steps, images on odd steps); every pass ends with its own
optimizer step (Adam, one learning rate per model part). BiMatting's auxiliary 1/16 loss is added
when the model returns it, feature mimicking when a teacher is configured. Binarizer schedules
(IR-Net's t, ReCU's tau) are stepped every iteration with ``step_binarizers(model, progress)``.

Scaling: launched by ``torchrun`` (``WORLD_SIZE > 1``) the trainer joins a process group (NCCL on
GPU, gloo on CPU), wraps the model in DDP and shards data with ``DistributedSampler``; only rank 0
logs and writes checkpoints. Checkpoints hold only tensors and plain containers (read back with
``weights_only=True``) and everything needed to continue bit for bit: model, optimizer,
scheduler, grad scaler, step, the data loaders' positions and every rank's RNG states.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib
import inspect
import math
import os
import pathlib
import random
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from binarize._atomic import atomic_output
from binarize.matting import losses
from binarize.matting.train_config import config_to_yaml, section_list
from binarize.matting.train_state import (
    ResumableLoader,
    gather_list,
    get_rng_state,
    load_checkpoint_file,
    save_atomic,
    seed_everything,
    set_rng_state,
)
from binarize.ops import clip_latent_weights

__all__ = [
    "Trainer", "train", "build_model", "build_matting_dataset", "param_groups", "random_crop", "random_window",
    "set_precision", "freeze_binary_weights", "freeze_batchnorm",
]

CHECKPOINT_FORMAT = "binarize-train-v1"
LAST_CHECKPOINT = "last.pt"


# ----------------------------------------------------------------------------- building blocks


def build_model(name: str, kwargs: Optional[Dict[str, Any]] = None, checkpoint: Optional[str] = None,
                precision: Optional[str] = None) -> nn.Module:
    """A model from the registry (``create_model``) or from ``"package.module:factory"``, at
    ``precision`` (``set_precision``, applied before ``checkpoint`` is loaded) when given."""
    kwargs = dict(kwargs or {})
    if ":" in name:
        module_name, attr = name.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            raise ValueError(f"cannot import model factory {name!r}") from None
        model = factory(**kwargs)
        model.model_name, model.model_kwargs = name, kwargs
    else:
        from binarize.models import create_model

        model = create_model(name, **kwargs)
    if precision is not None:
        set_precision(model, precision)
    if checkpoint is not None:
        _load_weights(model, checkpoint)
    return model


def _binary_layers(model: nn.Module) -> List[nn.Module]:
    """The layers of ``model`` that carry a weight and an input binarizer (whatever the binarizers
    currently are: ``set_precision`` may have made them identities)."""
    return [m for m in model.modules() if hasattr(m, "weight_binarizer") and hasattr(m, "input_binarizer")]


def set_precision(model: nn.Module, precision: str) -> int:
    """Train the binary layers of ``model`` at a lower level of binarization (in place).

    ``"binary"`` leaves the model as it is; ``"latent_weights"`` replaces each binary layer's weight
    binarizer by the identity (binary activations, float weights: step 1 of ReActNet's two-step
    training, Liu et al., ECCV 2020); ``"float"`` replaces both binarizers (a float network of the
    same architecture). Parameter names do not change, so the weights of one precision initialise
    another (``model.init``). Returns the number of layers changed."""
    if precision not in ("binary", "latent_weights", "float"):
        raise ValueError(f"precision must be binary, latent_weights or float, got {precision!r}")
    if precision == "binary":
        return 0
    from binarize.ops.binarizers import Identity

    layers = _binary_layers(model)
    for module in layers:
        module.weight_binarizer = Identity()
        if precision == "float":
            module.input_binarizer = Identity()
    return len(layers)


def _binary_weights(model: nn.Module, modules: Optional[Sequence[str]] = None) -> List[nn.Parameter]:
    """The weights of ``model``'s binary layers, all of them or (``modules``) only those inside the
    named top-level submodules (names the caller has checked)."""
    if modules is None:
        return [m.weight for m in _binary_layers(model)]
    children = dict(model.named_children())
    return [m.weight for name in modules for m in _binary_layers(children[name])]


def freeze_binary_weights(model: nn.Module, modules: Optional[Sequence[str]] = None) -> int:
    """Stop the weights of ``model``'s binary layers from training (``requires_grad=False``), all of
    them or only those inside the top-level submodules named in ``modules`` (e.g. ``["backbone",
    "aspp"]``); the full-precision parameters (BatchNorm, PReLU, learnable shifts, full-precision
    convolutions, heads) still train. Fine-tuning a compact checkpoint, whose binary weights are
    signs times a per-channel scale with the latent magnitudes gone, this keeps the signs it was
    deployed with. Returns the number of layers frozen."""
    children = [name for name, _ in model.named_children()]
    unknown = sorted(set(modules or ()) - set(children))
    if unknown:
        raise ValueError(f"optim.freeze_binary_weights: {type(model).__name__} has no top-level module "
                         f"{unknown[0]!r} (it has {', '.join(children)})")
    weights = _binary_weights(model, modules)
    for weight in weights:
        weight.requires_grad_(False)
    return len(weights)


def freeze_batchnorm(model: nn.Module) -> int:
    """Put every BatchNorm layer of ``model`` in eval mode, in place: training then normalises with
    the running statistics, as inference does, and does not update them (the affine parameters
    still train). Call after ``model.train()``; returns the number of layers."""
    frozen = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            frozen += 1
    return frozen


def _load_weights(model: nn.Module, path: str) -> None:
    """Initial weights: a training checkpoint of ours, or any file ``create_model`` can load."""
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model.init checkpoint not found: {p}")
    if p.suffix == ".pt" and p.is_file():
        try:
            state = load_checkpoint_file(p)
        except ValueError:
            state = None
        if state is not None:
            _load_across_precisions(model, state["model"])
            return
    from binarize.models.checkpoint import load_checkpoint_into

    load_checkpoint_into(model, p)


def _load_across_precisions(model: nn.Module, state: Dict[str, Tensor]) -> None:
    """``model.load_state_dict(state)``, tolerating only the binarizers' own state.

    ``set_precision`` swaps a binary layer's binarizers for identities, so a checkpoint of one
    precision lacks (or has extra) binarizer parameters and buffers of another: ReCU's weight
    binarizer, for one, carries ``alpha`` and ``tau``, which a ``latent_weights`` step-1 checkpoint
    does not have. Those start at their initial values, as when binarizing a float network; any
    other missing or unexpected key is still an error."""
    result = model.load_state_dict(state, strict=False)
    stray = [key for key in (*result.missing_keys, *result.unexpected_keys) if "_binarizer." not in key]
    if stray:
        model.load_state_dict(state)  # raises the usual, complete error


def build_matting_dataset(
    data_cfg: Dict[str, Any], *, size: int, seq_length: int, high_resolution: bool = False
) -> torch.utils.data.Dataset:
    """The matting dataset named by ``data.dataset`` at one resolution / sequence length.

    ``high_resolution`` passes read ``data.paths.videomatte_hr`` when given (BiMatting trains its
    high-resolution passes on VideoMatte240K HD, RVM on the same SD folder)."""
    from binarize.matting import data as matting_data

    name = data_cfg["dataset"]
    if name == "synthetic":
        syn = data_cfg["synthetic"]
        width, height = _size_pair(syn["size"])
        return matting_data.SyntheticMatting(
            clips=int(syn["clips"]), frames=int(syn["frames"]), size=(width, height), seed=int(syn["seed"])
        )
    paths = dict(data_cfg["paths"])
    if high_resolution and paths.get("videomatte_hr"):
        paths["videomatte"] = paths["videomatte_hr"]
    keys = (name, "background_images", "background_videos")
    for key in keys:
        if not paths.get(key):
            raise ValueError(f"dataset {name!r} needs data.paths.{key} (a folder)")
    for key in keys:
        for folder in section_list(paths[key]):
            if not pathlib.Path(folder).is_dir():
                raise FileNotFoundError(f"data.paths.{key} is not a folder: {folder}")
    return matting_data.build_train_dataset(name, paths, size=size, seq_length=seq_length)


def _size_pair(size: Any) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, str) and "x" in size:
        w, h = size.lower().split("x")
        return int(w), int(h)
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"size must be WxH, [W, H] or an integer, got {size!r}")


def param_groups(model: nn.Module, lrs: Dict[str, float], groups: Dict[str, Sequence[str]],
                 binary_lr_scale: float = 1.0) -> List[Dict[str, Any]]:
    """Adam parameter groups: each group's learning rate over the parameters of its top-level
    submodules (``groups``: group -> module names). Every trainable parameter must belong to
    exactly one group, otherwise a ``ValueError`` names it.

    ``binary_lr_scale != 1`` puts the binary layers' weights of each group in a group of their own,
    ``"<group>/binary"``, at the group's rate times the scale. Adam moves a weight by about its
    learning rate a step, so a latent weight ``w`` needs about ``|w| / lr`` steps of one gradient
    sign to flip its sign; a compact checkpoint's latent weights all sit at their layer's scale
    (0.03-0.05 in BiMatting's decoder), which at lr 1e-4 is hundreds of steps."""
    owner: Dict[str, str] = {}
    for group, prefixes in groups.items():
        for prefix in prefixes:
            owner[prefix] = group
    buckets: Dict[str, List[nn.Parameter]] = {group: [] for group in groups}
    unassigned = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = owner.get(name.split(".", 1)[0])
        if group is None:
            unassigned.append(name)
        else:
            buckets[group].append(param)
    if unassigned:
        raise ValueError(
            f"parameter {unassigned[0]!r} is in no optimizer group (optim.groups maps top-level modules: "
            f"{', '.join(sorted(owner))})"
        )
    out = []
    binary = {id(w) for w in _binary_weights(model)} if binary_lr_scale != 1.0 else set()
    for group, params in buckets.items():
        full = [p for p in params if id(p) not in binary]
        if full:
            out.append({"params": full, "lr": float(lrs[group]), "name": group})
        signs = [p for p in params if id(p) in binary]
        if signs:
            out.append({"params": signs, "lr": float(lrs[group]) * binary_lr_scale, "name": f"{group}/binary"})
    return out


def random_window(size: Sequence[int], *clips: Tensor) -> List[Tensor]:
    """The same random ``size = (W, H)`` window of every ``[B, T, C, H, W]`` clip, at full scale
    (python's ``random``; a clip smaller than the window is used whole)."""
    h, w = clips[0].shape[-2:]
    win_w, win_h = min(int(size[0]), w), min(int(size[1]), h)
    top, left = random.randint(0, h - win_h), random.randint(0, w - win_w)
    return [clip[..., top : top + win_h, left : left + win_w] for clip in clips]


def random_crop(*clips: Tensor) -> List[Tensor]:
    """RVM's training crop: resize ``[B, T, C, H, W]`` clips to a square of the larger of a random
    height and width (each between half and full size, multiples of 16) and centre-crop to them.

    Uses python's ``random`` (restored on resume). Follows RVM ``train.py`` ``random_crop``.
    """
    h, w = clips[0].shape[-2:]
    new_w = random.choice(range(w // 2, w)) // 16 * 16 if w >= 32 else w
    new_h = random.choice(range(h // 2, h)) // 16 * 16 if h >= 32 else h
    side = max(new_h, new_w)
    top, left = (side - new_h) // 2, (side - new_w) // 2
    out = []
    for clip in clips:
        b, t = clip.shape[:2]
        img = F.interpolate(clip.flatten(0, 1), (side, side), mode="bilinear", align_corners=False)
        out.append(img[..., top : top + new_h, left : left + new_w].unflatten(0, (b, t)))
    return out


# ----------------------------------------------------------------------------- distributed set-up


def crop_for_training(data_cfg: Dict[str, Any], *clips: Tensor) -> List[Tensor]:
    """The same crop of every clip, as the training passes take it: ``data.crop`` (a window at
    full scale), else RVM's ``random_crop`` when ``data.random_crop``, else the whole frames."""
    if data_cfg["crop"]:
        return random_window(data_cfg["crop"], *clips)
    if data_cfg["random_crop"]:
        return random_crop(*clips)
    return list(clips)


def _dist_env() -> Tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, local, world


def _pick_device(requested: Optional[str], local_rank: int) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class _CsvLog:
    """Scalars appended to ``scalars.csv`` (step, epoch, name, value); TensorBoard too when installed."""

    def __init__(self, folder: pathlib.Path, resume_step: Optional[int]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "scalars.csv"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "epoch", "name", "value"])
        self.tensorboard = None
        try:  # optional dependency, imported lazily
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(folder / "tensorboard"))
        except ImportError:
            pass

    def _truncate_after(self, step: int) -> None:
        # rows logged after the checkpoint we resume from are re-done; drop them
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) < step] if rows else []
        with atomic_output(self.path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def log(self, step: int, epoch: int, scalars: Dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.writerow([step, epoch, name, f"{value:.8g}"])
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(name, value, step)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Runs one stage of the recipe described by a validated config (``load_config``).

    ``Trainer(config, resume=path_or_None).fit()`` trains from ``schedule.epoch_start`` to
    ``schedule.epoch_end`` (or ``run.max_steps``) and returns the output folder. ``model`` may be
    given directly (it must follow the matting contract) instead of ``model.name``.
    """

    def __init__(
        self, config: Dict[str, Any], *, resume: Optional[str] = None, model: Optional[nn.Module] = None
    ) -> None:
        self.cfg = config
        self.rank, self.local_rank, self.world_size = _dist_env()
        self.device = _pick_device(config["run"]["device"], self.local_rank)
        self.distributed = self.world_size > 1
        self._init_process_group()
        self.output_dir = pathlib.Path(config["run"]["output_dir"])
        self.is_main = self.rank == 0
        resume_state = self._read_resume(resume)
        seed_everything(int(config["run"]["seed"]) + self.rank)

        self.model = model if model is not None else build_model(
            config["model"]["name"], config["model"]["kwargs"], None if resume_state else config["model"]["init"]
        )
        set_precision(self.model, config["model"]["precision"])
        frozen = config["optim"]["freeze_binary_weights"]
        if frozen:
            freeze_binary_weights(self.model, None if frozen is True else frozen)
        self.model.to(self.device).train()
        if config["optim"]["freeze_batchnorm"]:
            freeze_batchnorm(self.model)
        # BiMatting returns its 1/16 outputs with return_aux=True: [fgr, pha, fgr_s, pha_s, *rec]
        self.use_aux = bool(config["loss"]["aux"]) and "return_aux" in inspect.signature(self.model.forward).parameters
        self._alpha_ste = False
        self._install_alpha_ste()
        self._init_amp()
        self._init_data()
        self._init_teacher()
        self.optimizer = torch.optim.Adam(
            param_groups(self.model, config["optim"]["lr"], config["optim"]["groups"],
                         float(config["optim"]["binary_lr_scale"]))
        )
        sched = config["schedule"]
        self.steps_per_epoch = int(sched["steps_per_epoch"] or len(self.loader_lr))
        self.start_step = sched["epoch_start"] * self.steps_per_epoch
        self.end_step = sched["epoch_end"] * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = self.start_step
        self.ddp_model = self._wrap_ddp()
        if resume_state is not None:
            self._restore(resume_state)
        else:  # a later stage continues the data order where the epochs are, not from epoch 0
            for loader in self._loaders().values():
                loader.epoch = int(sched["epoch_start"])
        self.log = _CsvLog(self.output_dir, self.step if resume_state else None) if self.is_main else None

    # ------------------------------------------------------------------ set-up helpers

    def _init_process_group(self) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)

    def _read_resume(self, resume: Optional[str]) -> Optional[Dict[str, Any]]:
        if resume is None:
            return None
        path = pathlib.Path(resume)
        if path.is_dir():
            path = path / LAST_CHECKPOINT
        return load_checkpoint_file(path, map_location="cpu")

    def _install_alpha_ste(self) -> None:
        """``loss.alpha_ste``: a straight-through estimator for the model's final alpha clamp.

        RVM-style heads clamp alpha to [0, 1], whose gradient is zero outside; from random weights a
        model can push every pixel below 0 and stop learning (all-background). A forward hook on
        ``project_mat`` records its raw (unclamped) outputs without changing them, and the losses see
        ``alpha + (raw - raw.detach())``: the model's own alpha as the value, the identity as the
        gradient, so pixels stuck outside [0, 1] get gradient again while the forward pass, and
        with it BiMatting's incoherent mask (``alpha > 0`` of the coarse alpha), stays exactly the
        one inference computes. (An earlier version clamped inside the hook to the open interval
        (0, 1), which made every coarse alpha > 0 and so emptied the mask: the sparse branches never
        ran in training.) Active only in low-resolution passes (with a refiner, the raw alpha feeds
        the refiner)."""
        self._raw_outputs: List[Tensor] = []
        if not self.cfg["loss"]["alpha_ste"]:
            return
        head = getattr(self.model, "project_mat", None)
        if not isinstance(head, nn.Module):
            raise ValueError("loss.alpha_ste needs a model with a project_mat head (RVM / BiMatting)")

        def record(_module: nn.Module, _inputs: Any, out: Tensor) -> None:
            if self._alpha_ste and isinstance(out, Tensor) and out.ndim >= 4 and out.shape[-3] == 4:
                self._raw_outputs.append(out)

        head.register_forward_hook(record)

    def _straight_through(self, pha: Tensor) -> Tensor:
        """``pha`` (the model's clamped alpha, ``[B, T, 1, H, W]``) with the gradient of the raw alpha
        recorded by the ``project_mat`` hook: the smallest output that covers ``pha`` (BiMatting calls
        the head on its 1/16 map, then at full size; a padded input's extra rows are cropped)."""
        height, width = pha.shape[-2:]
        fits = [raw for raw in self._raw_outputs if raw.shape[-2] >= height and raw.shape[-1] >= width]
        if not fits:
            return pha
        raw = min(fits, key=lambda r: r.shape[-2] * r.shape[-1])
        if raw.ndim == 4:  # heads applied to [B * T, C, H, W]
            raw = raw.unflatten(0, pha.shape[:2])
        raw = raw[..., 3:4, :height, :width]
        if raw.shape != pha.shape:
            return pha
        raw = raw.to(pha.dtype)
        return pha.detach() + (raw - raw.detach())

    def _init_amp(self) -> None:
        mode = self.cfg["run"]["amp"]
        self.amp_dtype: Optional[torch.dtype] = None
        if self.device.type == "cuda" and mode != "none":
            if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
                self.amp_dtype = torch.bfloat16
            else:
                self.amp_dtype = torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _make_loader(self, dataset: torch.utils.data.Dataset, batch_size: int, seed_offset: int) -> ResumableLoader:
        data = self.cfg["data"]
        return ResumableLoader(
            dataset,
            batch_size,
            rank=self.rank,
            world_size=self.world_size,
            seed=int(self.cfg["run"]["seed"]) + seed_offset,
            num_workers=int(data["num_workers"]),
            pin_memory=self.device.type == "cuda",
        )

    def _init_data(self) -> None:
        data = self.cfg["data"]
        batch = int(data["batch_size_per_gpu"])
        lr_set = build_matting_dataset(data, size=data["resolution_lr"], seq_length=data["seq_length_lr"])
        self.loader_lr = self._make_loader(lr_set, batch, 0)
        self.loader_hr: Optional[ResumableLoader] = None
        if data["train_hr"]:
            hr_set = build_matting_dataset(
                data, size=data["resolution_hr"], seq_length=data["seq_length_hr"], high_resolution=True
            )
            self.loader_hr = self._make_loader(hr_set, batch, 1)
        self.loader_seg_video: Optional[ResumableLoader] = None
        self.loader_seg_image: Optional[ResumableLoader] = None
        if self.cfg["segmentation"]["enabled"]:
            from binarize.matting import data as matting_data

            builder = getattr(matting_data, "build_segmentation_datasets", None)
            if builder is None:
                raise ValueError("segmentation passes need binarize.matting.data.build_segmentation_datasets")
            video_set, image_set = builder(
                self.cfg["segmentation"]["paths"], size=data["resolution_lr"], seq_length=data["seq_length_lr"]
            )
            self.loader_seg_video = self._make_loader(video_set, batch, 2)
            # images are batched T at a time and treated as T=1 clips, as in RVM
            self.loader_seg_image = self._make_loader(image_set, batch * int(data["seq_length_lr"]), 3)

    def _init_teacher(self) -> None:
        dcfg = self.cfg["distill"]
        self.teacher: Optional[nn.Module] = None
        if dcfg["teacher"] is None:
            return
        if not dcfg["teacher_checkpoint"]:
            raise ValueError("distillation needs a trained teacher: set --teacher-checkpoint (distill.teacher_checkpoint)")
        teacher = build_model(dcfg["teacher"], dcfg["teacher_kwargs"], dcfg["teacher_checkpoint"],
                              precision=dcfg["teacher_precision"])
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.student_features = losses.FeatureRecorder(self.model, dcfg["student_layers"])
        self.teacher_features = losses.FeatureRecorder(self.teacher, dcfg["teacher_layers"])

    def _wrap_ddp(self) -> nn.Module:
        if not self.distributed:
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # GPU: SyncBatchNorm keeps BN statistics global, buffers need no broadcast (as RVM/BiMatting).
        # CPU/gloo has no SyncBatchNorm: broadcast rank 0's BN buffers at every forward instead.
        sync_buffers = self.device.type != "cuda"
        if self.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        kwargs: Dict[str, Any] = {"find_unused_parameters": True}
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
            kwargs["forward_sync_buffers"] = sync_buffers
        else:  # torch before forward_sync_buffers
            kwargs["broadcast_buffers"] = sync_buffers
        if self.device.type == "cuda":
            kwargs["device_ids"] = [self.device.index]
        return DDP(self.model, **kwargs)

    def _lr_factor(self, step: int) -> float:
        """Learning-rate factor ``step`` steps into the stage: a linear warm-up over
        ``optim.warmup_steps`` (``(step + 1) / warmup_steps``), times 1 (constant) or the cosine decay."""
        warmup = int(self.cfg["optim"]["warmup_steps"])
        factor = min((step + 1) / warmup, 1.0) if warmup > 0 else 1.0
        if self.cfg["optim"]["scheduler"] == "constant":
            return factor
        span = max(self.end_step - self.start_step, 1)
        done = min(max(step, 0), span)
        return factor * 0.5 * (1.0 + math.cos(math.pi * done / span))

    # ------------------------------------------------------------------ state

    def _loaders(self) -> Dict[str, ResumableLoader]:
        named = {"lr": self.loader_lr, "hr": self.loader_hr,
                 "seg_video": self.loader_seg_video, "seg_image": self.loader_seg_image}
        return {name: loader for name, loader in named.items() if loader is not None}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly (collective: every rank must call it)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world_size,
            "rng": gather_list(get_rng_state(), self.world_size),
            # every rank's parameter digest: DDP keeps them equal, a difference means a broken run
            "param_digests": gather_list(self.param_digest(), self.world_size),
            "loaders": {name: loader.state_dict() for name, loader in self._loaders().items()},
            "model_name": str(getattr(self.model, "model_name", "")),
            "config": config_to_yaml(self.cfg),
        }

    def param_digest(self) -> str:
        """SHA-256 of this process's parameters (names and bytes), to check that ranks agree."""
        h = hashlib.sha256()
        for name, param in self.model.named_parameters():
            h.update(name.encode())
            h.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _restore(self, state: Dict[str, Any]) -> None:
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"cannot resume: the checkpoint has {state['steps_per_epoch']} steps per epoch, this run "
                f"{self.steps_per_epoch} (same data, batch size and number of processes needed)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        for name, loader in self._loaders().items():
            if name in state["loaders"]:
                loader.load_state_dict(state["loaders"][name])
        rngs = state["rng"]
        if len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank])
        elif self.is_main:
            print(f"warning: checkpoint from {len(rngs)} processes, resuming on {self.world_size}: "
                  "RNG streams restart from the seed", file=sys.stderr)

    def save(self, name: str = LAST_CHECKPOINT) -> Optional[pathlib.Path]:
        """Write a training checkpoint atomically (rank 0 writes; every rank must call)."""
        state = self.state_dict()
        path = None
        if self.is_main:
            path = save_atomic(state, self.output_dir / name)
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------------ passes

    def _forward_matting(self, src: Tensor, ratio: float) -> List[Tensor]:
        if self.use_aux:
            return list(self.ddp_model(src, downsample_ratio=ratio, return_aux=True))
        return list(self.ddp_model(src, downsample_ratio=ratio))

    def _distill_loss(self, src: Tensor, ratio: float, mask_from: Optional[Tensor], **kw: Any) -> Tensor:
        assert self.teacher is not None
        with torch.no_grad():
            self.teacher(src, downsample_ratio=ratio, **kw)
        mask = None
        if mask_from is not None and self.cfg["distill"]["localized"]:
            from binarize.ops import incoherent_mask

            mask = incoherent_mask(mask_from)
        loss = losses.feature_mimic_loss(self.student_features.features(), self.teacher_features.features(), mask)
        self.student_features.clear()
        self.teacher_features.clear()
        return loss * float(self.cfg["distill"]["weight"])

    def _backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()
        clip = self.cfg["optim"]["grad_clip"]
        if clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip))
        self.scaler.step(self.optimizer)
        clip_latent_weights(self.model)  # BinaryNet's [-1, 1] clip, for methods that declare it
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _crop(self, *clips: Tensor) -> List[Tensor]:
        return crop_for_training(self.cfg["data"], *clips)

    def train_matting(self, batch: Sequence[Tensor], ratio: float, tag: str) -> Dict[str, float]:
        """One matting pass (forward, losses, optimizer step); returns the scalars to log."""
        true_fgr, true_pha, true_bgr = self._crop(*(t.to(self.device, non_blocking=True) for t in batch[:3]))
        true_src = true_fgr * true_pha + true_bgr * (1 - true_pha)
        if getattr(self.model, "takes_background", False):  # BGMv2: (src, bgr) -> official losses
            return self._train_background_matting(true_src, true_bgr, true_fgr, true_pha, tag)
        self._alpha_ste = ratio == 1.0
        with self._autocast():
            self._raw_outputs.clear()
            out = self._forward_matting(true_src, ratio)
            if self._alpha_ste and self._raw_outputs:
                out[1] = self._straight_through(out[1])
                if self.use_aux:
                    out[3] = self._straight_through(out[3])
            loss_cfg = self.cfg["loss"]
            terms = losses.matting_loss(out[0].float(), out[1].float(), true_fgr, true_pha,
                                        edge_weight=float(loss_cfg["edge_weight"]),
                                        edge_radius=int(loss_cfg["edge_radius"]),
                                        laplacian_weight=float(loss_cfg["laplacian_weight"]),
                                        coherence_weight=float(loss_cfg["coherence_weight"]))
            total = terms["total"]
            if self.use_aux:
                aux = losses.aux_matting_loss(out[2].float(), out[3].float(), true_fgr, true_pha,
                                              weight=float(self.cfg["loss"]["aux_weight"]))
                terms["aux_total"] = aux["aux_total"]
                total = total + aux["aux_total"]
            if self.teacher is not None:
                terms["distill"] = self._distill_loss(true_src, ratio, true_pha)
                total = total + terms["distill"]
        self._alpha_ste = False
        self._raw_outputs.clear()
        terms["total"] = total
        self._backward(total)
        return {f"train_{tag}/{name}": float(value.detach()) for name, value in terms.items()}

    def _train_background_matting(self, src: Tensor, bgr: Tensor, true_fgr: Tensor, true_pha: Tensor,
                                  tag: str) -> Dict[str, float]:
        """One pass of a background-matting model (BGMv2): the frames of the clips as images, the
        clean background as the captured one, ``bgmv2_refine_loss`` (or ``bgmv2_base_loss`` for
        the base network alone)."""
        src, bgr, true_fgr, true_pha = (t.flatten(0, 1) for t in (src, bgr, true_fgr, true_pha))
        with self._autocast():
            out = [o.float() for o in self.ddp_model(src, bgr)]
            if len(out) == 6:
                terms = losses.bgmv2_refine_loss(*out[:5], true_pha, true_fgr)
            else:
                terms = losses.bgmv2_base_loss(out[0], out[1], out[2], true_pha, true_fgr)
        self._backward(terms["total"])
        return {f"train_{tag}/{name}": float(value.detach()) for name, value in terms.items()}

    def train_segmentation(self, batch: Sequence[Tensor], tag: str) -> Dict[str, float]:
        """One segmentation pass (BCE on the model's ``segmentation_pass=True`` logits)."""
        true_img, true_seg = (t.to(self.device, non_blocking=True) for t in batch[:2])
        if true_img.ndim == 4:  # images: one frame per clip
            true_img, true_seg = true_img.unsqueeze(1), true_seg.unsqueeze(1)
        true_img, true_seg = self._crop(true_img, true_seg)
        with self._autocast():
            pred_seg = self.ddp_model(true_img, segmentation_pass=True)[0]
            loss = losses.segmentation_loss(pred_seg.float(), true_seg)
            if self.teacher is not None:
                loss = loss + self._distill_loss(true_img, 1.0, None, segmentation_pass=True)
        self._backward(loss)
        return {f"{tag}/loss": float(loss.detach())}

    # ------------------------------------------------------------------ loop

    def progress(self) -> float:
        """Binarizer schedule position in [0, 1]: epochs done / ``schedule.binarizer_epochs``."""
        total = float(self.cfg["schedule"]["binarizer_epochs"] or self.cfg["schedule"]["epoch_end"])
        return min(max(self.step / (self.steps_per_epoch * total), 0.0), 1.0)

    def train_step(self) -> Dict[str, float]:
        """One iteration of the recipe (low-res pass, high-res pass, segmentation pass)."""
        from binarize.ops import step_binarizers

        step_binarizers(self.model, self.progress())
        scalars = self.train_matting(self.loader_lr.next(), 1.0, "lr")
        if self.loader_hr is not None:
            scalars.update(self.train_matting(self.loader_hr.next(), float(self.cfg["data"]["downsample_ratio_hr"]), "hr"))
        if self.loader_seg_video is not None and self.loader_seg_image is not None:
            if self.step % 2 == 0:
                scalars.update(self.train_segmentation(self.loader_seg_video.next(), "seg_video"))
            else:
                scalars.update(self.train_segmentation(self.loader_seg_image.next(), "seg_image"))
        self.scheduler.step()
        scalars["lr/" + self.optimizer.param_groups[0].get("name", "0")] = self.optimizer.param_groups[0]["lr"]
        return scalars

    def _steps(self) -> Iterator[int]:
        stop = self.end_step
        max_steps = self.cfg["run"]["max_steps"]
        if max_steps is not None:
            stop = min(stop, int(max_steps))
        from tqdm import tqdm

        bar = tqdm(total=stop - self.start_step, initial=max(self.step - self.start_step, 0), unit="step",
                   dynamic_ncols=True, disable=not (self.is_main and self.cfg["run"]["progress"]))
        try:
            while self.step < stop:
                yield self.step
                bar.update(1)
        finally:
            bar.close()

    def fit(self) -> pathlib.Path:
        """Train to the end of the stage (or ``run.max_steps``); returns the output folder."""
        run = self.cfg["run"]
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        try:
            for step in self._steps():
                scalars = self.train_step()
                self.step = step + 1
                epoch = step // self.steps_per_epoch
                if self.log is not None and (step % run["log_interval"] == 0 or self.step == self.end_step):
                    self.log.log(step, epoch, scalars)
                if self.step % self.steps_per_epoch == 0:
                    self.save(f"epoch-{epoch}.pt")
                if self.step % run["checkpoint_interval"] == 0 or self.step % self.steps_per_epoch == 0:
                    self.save()
            if self.step % run["checkpoint_interval"] != 0 and self.step % self.steps_per_epoch != 0:
                self.save()
            if self.is_main and self.step >= self.end_step:
                self._export_compact()
        finally:
            if self.log is not None:
                self.log.close()
        return self.output_dir

    def _export_compact(self) -> None:
        """The final weights as a compact ``model.safetensors`` (``binarize.load`` rebuilds it).

        Not for ``model.precision`` other than ``binary``: the file would rebuild the binary model,
        which is not what was trained (the next step starts from ``last.pt`` instead)."""
        if self.cfg["model"]["precision"] != "binary":
            return
        try:
            from binarize.models.checkpoint import save as save_compact
        except ImportError:
            return
        if getattr(self.model, "model_name", None) and ":" not in self.model.model_name:
            save_compact(self.model, self.output_dir / "model.safetensors")

    def close(self) -> None:
        """Leave the process group (when this trainer joined one)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def train(config: Dict[str, Any], *, resume: Optional[str] = None,
          on_end: Optional[Callable[[Trainer], None]] = None) -> pathlib.Path:
    """Build a :class:`Trainer` for ``config``, run it, and leave the process group."""
    trainer = Trainer(config, resume=resume)
    try:
        out = trainer.fit()
        if on_end is not None:
            on_end(trainer)
        return out
    finally:
        trainer.close()
