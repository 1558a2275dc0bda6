"""Training configuration: YAML files with a fixed schema, validated with one-line errors.

A config has the sections ``model``, ``data``, ``segmentation``, ``optim``, ``loss``, ``distill``,
``schedule`` and ``run`` (see ``DEFAULTS`` for every key and its default, and
``binarize/matting/configs/`` for the official recipe). A config may start with
``base: other.yaml`` (relative to its own folder) to inherit from another file; command-line
overrides (``--set section.key=value``) are applied last. Unknown keys and unknown dataset names
are errors, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import copy
import pathlib
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import yaml

__all__ = [
    "DEFAULTS",
    "MATTING_DATASETS",
    "CONFIG_DIR",
    "load_config",
    "resolve_config_path",
    "apply_override",
    "validate_config",
    "config_to_yaml",
]

#: Folder of the configs shipped with the package.
CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"

#: Matting datasets the trainer can build by name.
MATTING_DATASETS = ("videomatte", "imagematte", "synthetic")
AMP_MODES = ("auto", "bf16", "fp16", "none")
PRECISIONS = ("binary", "latent_weights", "float")
SCHEDULERS = ("constant", "cosine")

# ``None`` as a default means "optional, no value"; ``REQUIRED`` must be given by the config.
REQUIRED = "<required>"

DEFAULTS: Dict[str, Dict[str, Any]] = {
    "model": {
        "name": REQUIRED,  # registry name (create_model) or "package.module:factory"
        "kwargs": {},
        "init": None,  # weights to start from: previous stage's training checkpoint, compact or official file
        # binary | latent_weights (binary activations, float weights: step 1 of ReActNet's two-step
        # training) | float (no binarization): the binary layers' binarizers become identities
        "precision": "binary",
    },
    "data": {
        "dataset": REQUIRED,  # videomatte | imagematte | synthetic
        "paths": {},  # videomatte, imagematte, background_images, background_videos (train folders)
        "synthetic": {"clips": 64, "frames": 15, "size": [256, 144], "seed": 0},
        "resolution_lr": 512,
        "seq_length_lr": 15,
        "train_hr": False,
        "resolution_hr": 2048,
        "seq_length_hr": 6,
        "downsample_ratio_hr": 0.25,
        "batch_size_per_gpu": 1,
        "num_workers": 4,
        "random_crop": True,  # RVM's random crop to a multiple of 16 between half and full size
        "crop": None,  # [W, H]: instead, cut a random W x H window at full scale (cheap steps, same scale)
    },
    "segmentation": {
        "enabled": False,  # interleaved segmentation passes (video on even steps, images on odd steps)
        "paths": {},  # coco_panoptic: {imgdir, anndir, annfile}, spd: {imgdir, segdir}, youtubevis: {videodir, annfile}
    },
    "optim": {
        "lr": REQUIRED,  # parameter group -> learning rate (every group needs one)
        # parameter group -> top-level submodules (RVM/BiMatting names: project heads train with the decoder)
        "groups": {
            "backbone": ["backbone"],
            "aspp": ["aspp"],
            "decoder": ["decoder", "project_mat", "project_seg"],
            "refiner": ["refiner"],
        },
        "scheduler": "constant",  # constant (official) | cosine (to zero at schedule.epoch_end)
        "warmup_steps": 0,  # linear learning-rate warm-up from lr / warmup_steps over the first steps
        "grad_clip": None,
        # fine-tuning what inference runs: the binary layers' weights do not train (a compact
        # checkpoint's signs are kept; only full-precision parameters learn); true for all, or a
        # list of top-level modules (e.g. [backbone, aspp]) whose binary weights stay ...
        "freeze_binary_weights": False,
        # the binary layers' weights learn at their group's lr times this (signs flip sooner)
        "binary_lr_scale": 1.0,
        # ... and BatchNorm layers stay in eval mode (running statistics used, not updated)
        "freeze_batchnorm": False,
    },
    "loss": {
        "aux": True,  # BiMatting's 1/16 auxiliary loss (models that return it with return_aux=True)
        "aux_weight": 0.25,
        "alpha_ste": False,  # straight-through gradient for the final alpha clamp (training from scratch)
        "edge_weight": 0.0,  # extra alpha L1 averaged over the transition band (0: the official loss)
        "edge_radius": 1,  # pixels the band grows on each side of the edge (losses.transition_band)
        "laplacian_weight": 1.0,  # weight of the alpha's Laplacian term (official: 1)
        "coherence_weight": 5.0,  # weight of the alpha's temporal coherence term (official: 5)
    },
    "distill": {
        "teacher": None,  # e.g. rvm_mobilenetv3; --distill-from on the command line
        "teacher_kwargs": {},
        "teacher_checkpoint": None,
        # the teacher's level of binarization (as model.precision): float for a full-precision
        # teacher of the student's own architecture, trained with model.precision: float
        "teacher_precision": "binary",
        "weight": 1.0,
        "localized": True,  # restrict mimicking to binarize.ops.incoherent_mask(true alpha) (BiVM)
        "student_layers": ["decoder.decode4", "decoder.decode3", "decoder.decode2", "decoder.decode1"],
        "teacher_layers": ["decoder.decode4", "decoder.decode3", "decoder.decode2", "decoder.decode1"],
    },
    "schedule": {
        "epoch_start": 0,
        "epoch_end": REQUIRED,
        "steps_per_epoch": None,  # None: one pass over the matting data (per process)
        "binarizer_epochs": None,  # binarizer progress = epoch / this (None: epoch_end)
    },
    "run": {
        "output_dir": "runs/train",
        "seed": 0,
        "amp": "auto",  # CUDA only: auto (bf16 if supported, else fp16) | bf16 | fp16 | none
        "log_interval": 20,
        "checkpoint_interval": 500,
        "max_steps": None,  # stop early after this global step (a later --resume continues)
        "progress": True,
        "device": None,  # None: cuda:LOCAL_RANK when available, else cpu
    },
}

# keys whose value is a free-form mapping (not checked key by key)
_FREE_FORM = {
    ("model", "kwargs"),
    ("data", "paths"),
    ("segmentation", "paths"),
    ("distill", "teacher_kwargs"),
    ("optim", "groups"),
}


def resolve_config_path(path: Union[str, pathlib.Path]) -> pathlib.Path:
    """A config file: the path as given, or one shipped in ``binarize/matting/configs``
    (``bimatting/stage1.yaml`` or ``configs/bimatting/stage1.yaml``)."""
    p = pathlib.Path(path)
    if p.is_file():
        return p
    parts = p.parts[1:] if p.parts and p.parts[0] == "configs" else p.parts
    shipped = CONFIG_DIR.joinpath(*parts) if parts else CONFIG_DIR
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"config file not found: {path}")


def _read_yaml(path: pathlib.Path, seen: Sequence[pathlib.Path] = ()) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ValueError(f"{path}: circular 'base' chain through {base_path}")
    if not base_path.is_file():
        raise FileNotFoundError(f"{path}: base config not found: {base_path}")
    return _merge(_read_yaml(base_path, (*seen, path.resolve())), data)


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(config: Dict[str, Any], override: str) -> None:
    """Apply ``section.key[.sub]=value`` (value parsed as YAML) to ``config`` in place."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if len(keys) < 2:
        raise ValueError(f"override {override!r} must name a section and a key, e.g. run.max_steps=10")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ValueError(f"override {override!r}: value is not valid YAML") from None
    node = config
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {override!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def _fill(defaults: Dict[str, Any], given: Dict[str, Any], where: str, source: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{source}: unknown key {where}{unknown[0]!r} (known: {', '.join(sorted(defaults))})")
    for key, default in defaults.items():
        value = given.get(key, copy.deepcopy(default))
        section = tuple((where + key).split("."))
        if isinstance(default, dict) and default and section not in _FREE_FORM:
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {where}{key} must be a mapping, got {type(value).__name__}")
            value = _fill(default, value, f"{where}{key}.", source)
        if value == REQUIRED:
            raise ValueError(f"{source}: missing key {where}{key}")
        out[key] = value
    return out


def _check(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{source}: {message}")


def validate_config(config: Dict[str, Any], source: str = "config") -> Dict[str, Any]:
    """Fill defaults and check types and names; returns a new, complete config."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: a config must be a mapping of sections")
    cfg = _fill(DEFAULTS, config, "", source)
    data, sched, run, optim, distill = cfg["data"], cfg["schedule"], cfg["run"], cfg["optim"], cfg["distill"]
    _check(
        data["dataset"] in MATTING_DATASETS,
        source,
        f"unknown dataset {data['dataset']!r} in data.dataset (known: {', '.join(MATTING_DATASETS)})",
    )
    if data["dataset"] == "synthetic" and data["train_hr"]:
        _check(False, source, "data.train_hr needs a real dataset (videomatte or imagematte), not synthetic")
    for key in ("resolution_lr", "seq_length_lr", "resolution_hr", "seq_length_hr", "batch_size_per_gpu"):
        _check(_is_int(data[key]) and data[key] >= 1, source, f"data.{key} must be a positive integer")
    _check(_is_int(data["num_workers"]) and data["num_workers"] >= 0, source, "data.num_workers must be >= 0")
    _check(0 < float(data["downsample_ratio_hr"]) <= 1, source, "data.downsample_ratio_hr must be in (0, 1]")
    crop = data["crop"]
    _check(crop is None or (isinstance(crop, list) and len(crop) == 2 and all(_is_int(v) and v > 0 for v in crop)),
           source, "data.crop must be [width, height] in pixels")
    _check(_is_int(sched["epoch_start"]) and sched["epoch_start"] >= 0, source, "schedule.epoch_start must be >= 0")
    _check(
        _is_int(sched["epoch_end"]) and sched["epoch_end"] > sched["epoch_start"],
        source,
        "schedule.epoch_end must be an integer greater than schedule.epoch_start",
    )
    for key in ("steps_per_epoch", "binarizer_epochs"):
        value = sched[key]
        _check(value is None or (float(value) > 0), source, f"schedule.{key} must be positive")
    for key in ("log_interval", "checkpoint_interval"):
        _check(_is_int(run[key]) and run[key] >= 1, source, f"run.{key} must be a positive integer")
    _check(run["max_steps"] is None or _is_int(run["max_steps"]), source, "run.max_steps must be an integer")
    _check(run["amp"] in AMP_MODES, source, f"run.amp must be one of {', '.join(AMP_MODES)}")
    loss = cfg["loss"]
    for key in ("edge_weight", "laplacian_weight", "coherence_weight"):
        _check(isinstance(loss[key], (int, float)) and not isinstance(loss[key], bool) and loss[key] >= 0,
               source, f"loss.{key} must be a number >= 0")
    _check(isinstance(optim["freeze_batchnorm"], bool), source, "optim.freeze_batchnorm must be true or false")
    frozen = optim["freeze_binary_weights"]
    _check(isinstance(frozen, bool) or (isinstance(frozen, list) and frozen and all(isinstance(n, str) for n in frozen)),
           source, "optim.freeze_binary_weights must be true, false or a list of top-level module names")
    scale = optim["binary_lr_scale"]
    _check(isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0, source,
           "optim.binary_lr_scale must be a number > 0")
    _check(_is_int(loss["edge_radius"]) and loss["edge_radius"] >= 0, source,
           "loss.edge_radius must be an integer >= 0")
    _check(optim["scheduler"] in SCHEDULERS, source, f"optim.scheduler must be one of {', '.join(SCHEDULERS)}")
    _check(_is_int(optim["warmup_steps"]) and optim["warmup_steps"] >= 0, source,
           "optim.warmup_steps must be an integer >= 0")
    for section, key in (("model", "precision"), ("distill", "teacher_precision")):
        _check(cfg[section][key] in PRECISIONS, source,
               f"{section}.{key} must be one of {', '.join(PRECISIONS)}, got {cfg[section][key]!r}")
    _check(isinstance(optim["groups"], dict), source, "optim.groups must map group names to module lists")
    _check(isinstance(optim["lr"], dict), source, "optim.lr must map parameter groups to learning rates")
    missing_lr = sorted(set(optim["groups"]) - set(optim["lr"]))
    _check(not missing_lr, source, f"missing key optim.lr.{missing_lr[0] if missing_lr else ''}")
    for name, lr in optim["lr"].items():
        _check(isinstance(lr, (int, float)) and lr >= 0, source, f"optim.lr.{name} must be a number >= 0")
    if distill["teacher"] is not None:
        _check(
            len(distill["student_layers"]) == len(distill["teacher_layers"]) > 0,
            source,
            "distill.student_layers and distill.teacher_layers must be non-empty lists of the same length",
        )
    return cfg


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_config(
    path: Union[str, pathlib.Path], overrides: Optional[Iterable[str]] = None
) -> Dict[str, Any]:
    """Read a YAML config (following ``base:``), apply ``section.key=value`` overrides, validate."""
    config_path = resolve_config_path(path)
    raw = _read_yaml(config_path)
    for override in overrides or ():
        apply_override(raw, override)
    return validate_config(raw, source=str(path))


def config_to_yaml(config: Dict[str, Any]) -> str:
    """The config as YAML text (stored in checkpoints and next to the logs)."""
    return yaml.safe_dump(config, sort_keys=False)


def section_list(value: Any) -> List[str]:
    """A list of strings from a YAML scalar or list."""
    return [value] if isinstance(value, str) else list(value)
