"""Checkpoint I/O: official PyTorch state dicts and our compact safetensors format.

Official checkpoints (``.pth``) are plain state dicts read with ``torch.load(weights_only=True)``
and renamed onto our modules by the model's ``map_official_state_dict(state_dict) -> state_dict``
method (identity when a model has none). Keys the map does not know pass through unchanged, so
a mismatched file is reported with its own key names.

Compact checkpoints (``binarize.save`` / ``binarize.load``) are safetensors files:

- every 1-bit weight (a layer whose ``weight_binarizer.bits == 1``) is stored as its *effective*
  binary weight ``scale_o * s`` with ``s`` in {-1, +1}: packed sign bits (``<key>:signs``, uint8,
  ``binarize.ops.packing.pack_signs``) and the per-output-channel scale (``<key>:scale``);
- everything else (full-precision layers, BatchNorm, binarizer parameters, buffers) in its own
  dtype under its own key;
- the tensors of each dtype are concatenated into one byte-shuffled, zlib-compressed blob
  (``blob.<dtype>``; lossless) and a compressed JSON index (``index`` metadata) records every
  key's dtype, shape and offset, so the header stays small;
- the metadata holds ``config`` = JSON ``{"model": name, "kwargs": {...}}`` (the registry entry,
  so the file alone rebuilds the model), ``binary_weights`` = JSON ``{key: {"shape", "dtype"}}``,
  ``full_precision_fallback`` and ``format``.

Exact reload. A model computes with ``weight_binarizer(W)``, not with W, so on load we need a
latent W whose binarization is *bit-identical* to the stored ``scale * s``;
``reconstruct_latent_weight`` builds it deterministically. The scales are means (mean|W|, or
mean|W - mean W| for BiMatting), and a float mean is only reproducible if the sum it divides is:
we give each channel magnitudes that are integer multiples of u = ulp(S), adding up to exactly
S (K = S/u < 2^24 units, so every partial sum is representable and the summation order does not
matter), for the floats S next to ``scale * n`` (one of them is the sum the original weights
produced). For centring binarizers the positive and negative magnitudes each add up to S/2, so
the channel mean is exactly 0 and centring is exact; an odd K is split into half units with a
single odd element per sign, placed in the same lane of the vectorised reduction. Channels it
still cannot serve are searched (ulp nudges), and the few left are stored as their latent rows
(``<key>:rows`` / ``<key>:latent_rows``); a layer whose effective weight has exact zeros
(``torch.sign`` semantics) or a non per-channel scale is stored in full precision and listed in
``full_precision_fallback``. ``save`` verifies all of this before writing. The latent magnitudes of
the saved model are not kept, only what the forward pass uses: outputs are identical, resumed
training starts from the reconstructed latent weights.
"""
from __future__ import annotations

import base64
import copy
import json
import math
import os
import pathlib
import re
import warnings
import zlib
from typing import Any, Dict, List, Mapping, Optional, Set, Tuple, Union

import torch
from torch import Tensor, nn

from binarize._atomic import atomic_output, file_mode, write_text_atomic

__all__ = [
    "torch_load",
    "save",
    "load",
    "save_pretrained",
    "read_config",
    "read_state_dict",
    "load_official",
    "load_checkpoint_into",
    "load_compact_into",
    "compact_state",
    "binary_weight_layers",
    "reconstruct_latent_weight",
]

PathLike = Union[str, os.PathLike]
FORMAT = "binarize-compact-v1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_SIGNS = ":signs"
_SCALE = ":scale"
_ROWS = ":rows"
_LATENT = ":latent_rows"
def vestigial_keys(model: nn.Module) -> Set[str]:
    """State-dict keys of parameters a layer declares vestigial (``vestigial_parameters``: kept for
    strict loading of official checkpoints, never read by the forward): not stored in compact files,
    a reload keeps the model's own values."""
    return {f"{name}.{p}" if name else p for name, module in model.named_modules()
            for p in getattr(module, "vestigial_parameters", ()) if p in module._parameters}
_MAX_LISTED = 5


# ----------------------------------------------------------------------------------------------
# official state dicts
# ----------------------------------------------------------------------------------------------
def torch_load(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a one-line ``ValueError`` that names the file and
    says what it is instead: not a checkpoint at all (an image, an empty or cut-off file), or one
    holding pickled Python objects that ``weights_only`` refuses to run.
    PyTorch's own message for the latter advises ``weights_only=False``, which would execute
    whatever the file holds; this one never does. Missing file: ``FileNotFoundError``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling and archive errors come in many types
        raise ValueError(f"{path}: {_load_failure(path, exc)}") from None


def _load_failure(path: pathlib.Path, exc: BaseException) -> str:
    text = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (f"holds a pickled Python object ({refused.group(1)}) that loading with weights_only=True "
                f"refuses to run; save the model's state_dict() instead of the model")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        return "empty file, not a checkpoint"
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        return f"not a PyTorch checkpoint (neither a zip archive nor a pickle; it starts with {head[:8]!r})"
    if "zip archive" in text:
        return "a damaged or cut-off PyTorch checkpoint (its zip archive cannot be read)"
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return f"not a readable PyTorch checkpoint ({detail.group(1).strip() if detail else _one_line(exc)})"


def read_state_dict(path: PathLike) -> Dict[str, Tensor]:
    """Read a PyTorch state dict with ``torch.load(weights_only=True)``; unwraps ``{"state_dict": ...}``
    / ``{"model": ...}`` and a DataParallel ``module.`` prefix. Errors name the file."""
    path = pathlib.Path(path)
    obj = torch_load(path)
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict, non-tensor entries: {_listing(bad)}")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_official(
    model: nn.Module, checkpoint: Union[PathLike, Mapping[str, Tensor]], source: Optional[str] = None
) -> nn.Module:
    """Load an official state dict (a path or a mapping) into ``model`` through the model's
    ``map_official_state_dict``; every key and shape must match. Returns ``model``."""
    if isinstance(checkpoint, Mapping):
        state_dict, source = dict(checkpoint), source or "state dict"
    else:
        state_dict, source = read_state_dict(checkpoint), source or str(checkpoint)
    mapper = getattr(model, "map_official_state_dict", None)
    mapped = mapper(state_dict) if callable(mapper) else state_dict
    check_state_dict(model, mapped, source)
    model.load_state_dict(mapped, strict=True)
    return model


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise a one-line ``ValueError`` naming ``source`` and the first missing, unexpected and
    shape-mismatched keys unless ``state_dict`` fills every entry of ``model.state_dict()`` exactly."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state_dict]
    unexpected = [k for k in state_dict if k not in ours]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(ours[k].shape)}"
        for k in ours
        if k in state_dict and tuple(state_dict[k].shape) != tuple(ours[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({_listing(shapes)})")
        raise ValueError(f"{source} does not match model {_model_label(model)}: " + "; ".join(parts))


# ----------------------------------------------------------------------------------------------
# compact format: binary weights
# ----------------------------------------------------------------------------------------------
def binary_weight_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{state-dict key of the latent weight: layer}`` for every layer with a 1-bit weight binarizer."""
    layers = {}
    for name, module in model.named_modules():
        binarizer = getattr(module, "weight_binarizer", None)
        weight = getattr(module, "weight", None)
        if binarizer is None or not isinstance(weight, Tensor) or getattr(binarizer, "bits", 32) != 1:
            continue
        layers[f"{name}.weight" if name else "weight"] = module
    return layers


def _effective(binarizer: nn.Module, weight: Tensor) -> Tensor:
    with torch.no_grad():
        return binarizer(weight).detach()


def _per_channel_abs_max(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).abs().amax(dim=1)


def _channel_view(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape([-1] + [1] * (like.dim() - 1))


def _ulp(c: Tensor) -> Tensor:
    return torch.nextafter(c, torch.full_like(c, math.inf)) - c


def _exact_sum_candidates(signs: Tensor, scale: Tensor, offset: int, balanced: bool) -> Tuple[Tensor, Tensor]:
    """Latent weights whose channel sums are exact in float arithmetic, in any summation order.

    Every magnitude is an integer multiple of u = ulp(S) where S is the float ``offset`` ulps away
    from ``scale * n``, and the magnitudes of a channel add up to exactly S (K = S / u < 2^24 units,
    so every partial sum is representable): whatever order a reduction uses, mean|W| is the
    correctly rounded S / n, the value the original weights produced for one of these S.
    ``balanced``: positives and negatives each add up to S / 2, so the channel mean is exactly 0 and
    a centring binarizer (BiMatting, IR-Net, ReCU) subtracts it exactly. Returns (W, feasible)."""
    flat = signs.reshape(signs.shape[0], -1)
    n = flat.shape[1]
    total = (scale.double() * n).to(scale.dtype)
    for _ in range(abs(offset)):
        total = torch.nextafter(total, torch.full_like(total, math.inf if offset > 0 else 0.0))
    unit = _ulp(total)
    units = torch.round(total.double() / unit.double()).long()
    positive = flat > 0
    if balanced:
        groups = [(positive, units // 2), (~positive, units // 2)]
        feasible = (units % 2 == 0) & positive.any(dim=1) & (~positive).any(dim=1)
    else:
        groups = [(torch.ones_like(positive), units)]
        feasible = torch.ones_like(units, dtype=torch.bool)
    counts = torch.zeros(flat.shape, dtype=torch.long)
    for member, share in groups:
        size = member.sum(dim=1).clamp_min(1)
        rank = torch.cumsum(member.long(), dim=1) - 1
        per = share // size
        extra = (rank < (share % size)[:, None]).long()
        counts = torch.where(member, per[:, None] + extra, counts)
    feasible &= (counts > 0).all(dim=1)
    magnitudes = (counts.double() * unit.double()[:, None]).to(signs.dtype)
    return (flat * magnitudes).reshape(signs.shape), feasible


def _odd_balanced_row(signs: Tensor, scale: Tensor, modulus: int) -> Optional[Tensor]:
    """Balanced exact-sum row for an odd unit count K: each sign's magnitudes add up to K half
    units, all even but one per sign, the two odd ones congruent modulo ``modulus``."""
    flat = signs.reshape(-1)
    n = flat.numel()
    total = (scale.double() * n).to(scale.dtype)
    half = _ulp(total.reshape(1))[0] / 2
    k = int(round(float(total) / float(half) / 2))
    positive = (flat > 0).nonzero().flatten().tolist()
    negative = (flat <= 0).nonzero().flatten().tolist()
    if k % 2 == 0 or not positive or not negative:
        return None
    pair = next(((p, q) for p in positive for q in negative if (p - q) % modulus == 0), None)
    if pair is None:
        return None
    counts = torch.zeros(n, dtype=torch.long)
    for members, special in ((positive, pair[0]), (negative, pair[1])):
        index = torch.tensor(members)
        per, rest = divmod((k - 1) // 2, len(members))
        counts[index] = 2 * (per + (torch.arange(len(members)) < rest).long())
        counts[special] += 1
    if bool((counts == 0).any()):
        return None
    return (flat * (counts.double() * float(half)).to(signs.dtype)).reshape(signs.shape)


def reconstruct_latent_weight(
    binarizer: nn.Module, signs: Tensor, scale: Tensor, nudges: int = 8, tweaks: int = 24,
    search_threshold: float = 0.05,
) -> Tuple[Tensor, Tensor]:
    """Deterministically build a latent weight W with ``binarizer(W) == scale_o * signs`` (see the
    module docstring). Returns ``(W, exact)`` where ``exact[o]`` says channel o is bit-identical."""
    target = _channel_view(scale, signs) * signs

    def exactness(w: Tensor) -> Tuple[Tensor, Tensor]:
        out = _effective(binarizer, w)
        exact = (out == target).reshape(out.shape[0], -1).all(dim=1)
        return exact, _per_channel_abs_max(out)

    # Stage 1: exact-sum constructions (balanced first, it also suits non-centring scalers).
    best = signs.clone()
    exact = torch.zeros(signs.shape[0], dtype=torch.bool)
    for balanced in (True, False):
        for offset in (0, 1, -1, 2, -2, 3, -3):
            if bool(exact.all()):
                return best, exact
            rows = (~exact).nonzero().flatten()
            rows_w, feasible = _exact_sum_candidates(signs[rows], scale[rows], offset, balanced)
            candidate = best.clone()
            candidate[rows] = rows_w
            hit = torch.zeros_like(exact)
            hit[rows] = feasible
            hit &= exactness(candidate)[0]
            best[hit] = candidate[hit]
            exact |= hit
    # Odd unit counts cannot be split evenly: half units with one odd element per sign, placed
    # in the same lane of a strided (vectorised) reduction so the odd halves meet early.
    for modulus in (64, 16, 8, 1):
        if bool(exact.all()):
            return best, exact
        rows = (~exact).nonzero().flatten()
        candidate = best.clone()
        feasible = torch.zeros_like(exact)
        for row in rows.tolist():
            built = _odd_balanced_row(signs[row], scale[row], modulus)
            if built is not None:
                candidate[row] = built
                feasible[row] = True
        hit = feasible & exactness(candidate)[0]
        best[hit] = candidate[hit]
        exact |= hit
    # Stage 2: when the constructions fail broadly (a per-tensor scale couples the channels), search.
    # A few failing channels are left to the caller (compact files store those rows in full).
    if float((~exact).float().mean()) <= search_threshold:
        return best, exact
    searched, searched_exact = _search_latent_weight(exactness, signs, scale, nudges, tweaks)
    take = ~exact & searched_exact
    best[take] = searched[take]
    return best, exactness(best)[0]


def _search_latent_weight(
    exactness: Any, signs: Tensor, scale: Tensor, nudges: int, tweaks: int
) -> Tuple[Tensor, Tensor]:
    """W = c_o * s with c_o nudged by ulps, then one element per channel moved in fractions of an
    ulp of the channel sum, until ``exactness`` holds (as far as it can)."""
    gain = exactness(signs)[1]
    usable = gain > 0
    c = torch.where(usable, (scale.double() / torch.where(usable, gain, 1).double()).to(scale.dtype), scale)
    tweak = torch.zeros_like(c)
    per_channel = signs[0].numel()
    position = torch.zeros_like(c, dtype=torch.long)

    def build(c: Tensor, tweak: Tensor, position: Tensor) -> Tensor:
        w = _channel_view(c, signs) * signs
        flat = w.reshape(w.shape[0], -1)
        rows = torch.arange(flat.shape[0])
        flat[rows, position] = flat[rows, position] + signs.reshape(flat.shape)[rows, position] * tweak
        return w

    w = build(c, tweak, position)
    exact, got = exactness(w)
    for _ in range(nudges):
        if bool(exact.all()):
            return w, exact
        up = ~exact & (got < scale)
        down = ~exact & (got > scale)
        c = torch.where(up, torch.nextafter(c, torch.full_like(c, math.inf)), c)
        c = torch.where(down, torch.nextafter(c, torch.zeros_like(c)), c)
        w = build(c, tweak, position)
        exact, got = exactness(w)
    step = _ulp((c * float(per_channel)).abs()) / 8
    for pos in dict.fromkeys(p for p in (per_channel - 1, 7, 15, 31, 63, 0) if p < per_channel):
        for k in range(1, tweaks + 1):
            for direction in (1.0, -1.0):
                if bool(exact.all()):
                    break
                trial_tweak = torch.where(exact, tweak, direction * k * step)
                trial_position = torch.where(exact, position, torch.full_like(position, pos))
                trial_exact, _ = exactness(build(c, trial_tweak, trial_position))
                newly = trial_exact & ~exact
                tweak = torch.where(newly, trial_tweak, tweak)
                position = torch.where(newly, trial_position, position)
                exact = exact | trial_exact
    w = build(c, tweak, position)
    return w, exactness(w)[0]


def _encode_binary(layer: nn.Module) -> Optional[Dict[str, Tensor]]:
    """Packed signs, scales and (for the rare channels the reconstruction cannot reproduce) the
    latent rows of a layer, or None when the layer must be stored in full precision."""
    from binarize.ops.packing import pack_signs

    weight = layer.weight.detach()
    effective = _effective(layer.weight_binarizer, weight)
    flat = effective.reshape(effective.shape[0], -1).abs()
    scale = flat.amax(dim=1)
    if not bool(((flat == scale[:, None]) | (flat == 0)).all()) or not bool((scale > 0).all()):
        return None  # a non per-channel scale: not representable as scale * sign
    # channels with exact zeros (torch.sign semantics: a weight equal to its channel mean, frequent
    # in float16 / bfloat16) are not scale * sign: they are stored as latent rows like inexact ones
    with_zeros = (flat == 0).any(dim=1)
    signs = torch.where(effective >= 0, 1.0, -1.0).to(weight.dtype)
    latent, exact = reconstruct_latent_weight(layer.weight_binarizer, signs, scale)
    exact &= ~with_zeros
    rows = (~exact).nonzero().flatten()
    if rows.numel() > max(1, signs.shape[0] // 8):
        return None
    encoded = {_SIGNS: pack_signs(signs), _SCALE: scale.contiguous()}
    if rows.numel():
        latent[rows] = weight[rows]
        if not torch.equal(_effective(layer.weight_binarizer, latent), effective):
            return None  # the binarizer couples channels: a row patch is not enough
        encoded[_ROWS] = rows.contiguous()
        encoded[_LATENT] = weight[rows].cpu().clone().contiguous()
    return encoded


def compact_state(model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, Any], List[str]]:
    """The tensors of a compact checkpoint, the per-key info of its binary weights, and the keys
    of binary weights stored in full precision because they cannot be reloaded exactly."""
    layers = binary_weight_layers(model)
    tensors: Dict[str, Tensor] = {}
    binary: Dict[str, Any] = {}
    fallback: List[str] = []
    skipped = vestigial_keys(model)
    for key, value in model.state_dict().items():
        if key in skipped:
            continue
        if key in layers:
            encoded = _encode_binary(layers[key])
            if encoded is not None:
                tensors.update({key + suffix: t for suffix, t in encoded.items()})
                binary[key] = {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
                continue
            fallback.append(key)
        tensors[key] = value.detach().cpu().clone().contiguous()
    return tensors, binary, fallback


# ----------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------
def _model_config(model: nn.Module, name: Optional[str], kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    name = name or getattr(model, "model_name", None)
    if not name:  # a user's own model: the file holds its weights, binarize.load(path, model=...) fills it
        options = _convert_options(model)
        return {"model": None, "kwargs": {}, **({"convert": options} if options else {})}
    kwargs = dict(getattr(model, "model_kwargs", {}) if kwargs is None else kwargs)
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise ValueError(f"model kwargs of {name!r} are not JSON-serialisable ({exc})") from exc
    return {"model": name, "kwargs": kwargs}


def save(
    model: nn.Module, path: PathLike, *, name: Optional[str] = None, kwargs: Optional[Dict[str, Any]] = None
) -> pathlib.Path:
    """Write ``model`` as a compact safetensors checkpoint (packed sign bits + scales for 1-bit
    weights, everything else in its dtype, the registry config in the metadata). Returns the path."""
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; use save_pretrained(model, directory) for a directory")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory does not exist: {path.parent}")
    config = _model_config(model, name, kwargs)
    if any(t.device.type != "cpu" for t in model.state_dict().values()):
        model = copy.deepcopy(model).cpu()  # the exact reconstruction is checked on the CPU, where it loads
    tensors, binary, fallback = compact_state(model)
    if fallback:
        warnings.warn(f"binarize.save: {len(fallback)} of {len(binary) + len(fallback)} binary weights stored in full "
                      f"precision (their binarized form is not one scale times +-1 per output channel, or "
                      f"cannot be reloaded exactly): {_listing(fallback)}", stacklevel=2)
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config, sort_keys=True),
        "binary_weights": json.dumps(binary, sort_keys=True),
        "full_precision_fallback": json.dumps(fallback),
    }
    blobs, metadata["index"] = _pack_blobs(tensors)
    with atomic_output(path) as tmp:
        save_file(blobs, str(tmp), metadata=metadata)
        os.chmod(tmp, file_mode())  # safetensors re-creates the file private (0600)
    return path


def _open_compact(path: pathlib.Path) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            blobs = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from exc
    if metadata.get("format") != FORMAT or "config" not in metadata or "index" not in metadata:
        raise ValueError(f"{path}: not a binarize compact checkpoint (no '{FORMAT}' metadata)")
    try:
        tensors = _unpack_blobs(blobs, metadata["index"])
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
        raise ValueError(f"{path}: corrupt compact checkpoint ({_one_line(exc)})") from exc
    return tensors, metadata


def _pack_blobs(tensors: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], str]:
    """Concatenate the tensors of each dtype into one byte-shuffled, zlib-compressed uint8 blob
    (lossless; the shuffle groups the exponent bytes of floats, which compress well) and return
    the blobs with a compressed JSON index ``[key, dtype, shape, byte offset]``. One blob per dtype
    instead of one safetensors entry per tensor keeps the header small."""
    groups: Dict[str, List[Tuple[str, Tensor]]] = {}
    for key, value in tensors.items():
        groups.setdefault(str(value.dtype).replace("torch.", ""), []).append((key, value))
    blobs: Dict[str, Tensor] = {}
    index = []
    for dtype, items in groups.items():
        offset, chunks = 0, []
        for key, value in items:
            raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            index.append([key, dtype, list(value.shape), offset])
            chunks.append(raw)
            offset += raw.numel()
        data = torch.cat(chunks)
        itemsize = items[0][1].element_size()
        shuffled = data.reshape(-1, itemsize).t().contiguous().numpy().tobytes()
        blobs[f"blob.{dtype}"] = torch.frombuffer(bytearray(zlib.compress(shuffled, 9)), dtype=torch.uint8)
    text = base64.b64encode(zlib.compress(json.dumps(index, separators=(",", ":")).encode(), 9)).decode()
    return blobs, text


def _unpack_blobs(blobs: Dict[str, Tensor], index_text: str) -> Dict[str, Tensor]:
    """Inverse of ``_pack_blobs``."""
    index = json.loads(zlib.decompress(base64.b64decode(index_text)))
    raw: Dict[str, Tensor] = {}
    for name, blob in blobs.items():
        dtype = getattr(torch, name.split(".", 1)[1])
        itemsize = torch.empty((), dtype=dtype).element_size()
        data = torch.frombuffer(bytearray(zlib.decompress(blob.numpy().tobytes())), dtype=torch.uint8)
        raw[name.split(".", 1)[1]] = data.reshape(itemsize, -1).t().contiguous().reshape(-1)
    tensors = {}
    for key, dtype, shape, offset in index:
        torch_dtype = getattr(torch, dtype)
        count = math.prod(shape) * torch.empty((), dtype=torch_dtype).element_size()
        chunk = raw[dtype][offset:offset + count]
        tensors[key] = chunk.clone().view(torch_dtype).reshape(shape)
    return tensors


def _resolve(path: PathLike) -> pathlib.Path:
    """A compact file path, or the weights file of a save_pretrained directory."""
    path = pathlib.Path(path)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: not a save_pretrained directory (no {WEIGHTS_NAME})")
        return weights
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def read_config(path: PathLike) -> Dict[str, Any]:
    """``{"model": name, "kwargs": {...}}`` of a compact checkpoint file or save_pretrained directory."""
    weights = _resolve(path)
    _, metadata = _open_compact(weights)
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{weights}: corrupt config metadata ({exc})") from exc
    if not isinstance(config.get("model"), (str, type(None))) or not isinstance(config.get("kwargs", {}), dict):
        raise ValueError(f"{weights}: config metadata must hold 'model' (str or null) and 'kwargs' (dict)")
    config.setdefault("kwargs", {})
    return config


def load_compact_into(model: nn.Module, path: PathLike) -> nn.Module:
    """Fill ``model`` from a compact checkpoint (file or directory); every key and shape must match."""
    from binarize.ops.packing import unpack_signs

    weights = _resolve(path)
    tensors, metadata = _open_compact(weights)
    try:
        binary = json.loads(metadata.get("binary_weights", "{}"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{weights}: corrupt binary_weights metadata ({exc})") from exc
    lost = [k for k in binary if k + _SIGNS not in tensors or k + _SCALE not in tensors]
    if lost:
        raise ValueError(f"{weights}: corrupt compact checkpoint, no signs/scale for {_listing(lost)}")
    state = {k: v for k, v in tensors.items() if not k.endswith((_SIGNS, _SCALE, _ROWS, _LATENT))}
    current = model.state_dict()
    for key in binary:
        if key in current:
            state[key] = current[key]  # placeholder of the right shape, replaced below
    for key in vestigial_keys(model) - set(state):
        state[key] = current[key]  # not stored: never read by the forward
    check_state_dict(model, state, str(weights))
    layers = binary_weight_layers(model)
    not_binary = [k for k in binary if k not in layers]
    if not_binary:
        raise ValueError(
            f"{weights} does not match model {_model_label(model)}: stored as binary but the model's layer "
            f"is full precision: {_listing(not_binary)}"
        )
    for key, info in binary.items():
        if tuple(info["shape"]) != tuple(current[key].shape):
            raise ValueError(f"{weights}: binary weight {key} has shape {info['shape']}, model {tuple(current[key].shape)}")
    # the model's own per-module metadata (versions): some modules' loaders require it (torchvision MNASNet)
    state = _with_metadata(state, current)
    model.load_state_dict(state, strict=True)
    inexact = []
    for key in binary:
        layer = layers[key]
        signs = unpack_signs(tensors[key + _SIGNS], layer.weight.shape, dtype=layer.weight.dtype)
        scale = tensors[key + _SCALE].to(layer.weight.dtype)
        latent, exact = reconstruct_latent_weight(layer.weight_binarizer, signs, scale)
        if key + _ROWS in tensors:
            rows = tensors[key + _ROWS]
            latent[rows] = tensors[key + _LATENT].to(latent.dtype)
            exact[rows] = True
        with torch.no_grad():
            layer.weight.copy_(latent)
        if not bool(exact.all()):
            inexact.append(key)
    if inexact:
        warnings.warn(f"{weights}: binary weights reload within rounding, not bit-exactly: {_listing(inexact)}",
                      stacklevel=2)
    return model


def load(path: PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild the registered model named in a compact checkpoint (file or save_pretrained
    directory) and load its weights, or, with ``model``, fill that model (e.g. a user's own
    network converted with ``binarize.convert``). Returned in training mode, like ``create_model``."""
    from binarize.models.registry import create_model

    if model is not None:
        return load_checkpoint_into(model, path)
    config = read_config(path)
    if config["model"] is None:
        raise ValueError(f"{path} holds the weights of an unregistered model: pass it, binarize.load(path, model=...)")
    return create_model(config["model"], checkpoint=path, **config["kwargs"])


def save_pretrained(model: nn.Module, directory: PathLike) -> pathlib.Path:
    """Write ``directory/model.safetensors`` (compact) and ``directory/config.json``; returns the directory."""
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    config = _model_config(model, None, None)
    save(model, directory / WEIGHTS_NAME)
    write_text_atomic(directory / CONFIG_NAME,
                      json.dumps({**config, "format": FORMAT, "weights": WEIGHTS_NAME}, indent=2, sort_keys=True))
    return directory


# ----------------------------------------------------------------------------------------------
# dispatch used by create_model
# ----------------------------------------------------------------------------------------------
def is_compact(path: PathLike) -> bool:
    """True for a ``.safetensors`` file or a directory (save_pretrained layout)."""
    path = pathlib.Path(path)
    return path.is_dir() or path.suffix == ".safetensors"


def load_checkpoint_into(model: nn.Module, checkpoint: PathLike) -> nn.Module:
    """Load an official ``.pth`` state dict, a compact ``.safetensors`` file or a save_pretrained
    directory into ``model``."""
    path = pathlib.Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_compact(path):
        config = read_config(path)
        name = getattr(model, "model_name", None)
        if name is not None and config["model"] is not None and config["model"] != name:
            raise ValueError(f"{path} holds model {config['model']!r}, not {name!r}")
        _check_convert_options(path, config.get("convert"), model)
        return load_compact_into(model, path)
    return load_official(model, path)


def _with_metadata(state: Dict[str, Tensor], like: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """``state`` carrying ``like``'s ``_metadata`` (module versions), as ``nn.Module.state_dict`` gives."""
    metadata = getattr(like, "_metadata", None)
    if metadata is None:
        return state
    from collections import OrderedDict

    state = OrderedDict(state)
    state._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
    return state


def _convert_options(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The options ``binarize.convert`` recorded on the model (None when it was not converted)."""
    options = getattr(model.__dict__.get("binarize_report"), "options", None)
    return dict(options) if isinstance(options, dict) and options else None


def _check_convert_options(path: PathLike, saved: Any, model: nn.Module) -> None:
    """A file saved from a converted model outside the registry loads only into a model converted
    with the same options; the error names each difference."""
    current = _convert_options(model)
    if not isinstance(saved, dict) or current is None:
        return
    differences = [f"{key}={saved.get(key)!r} in the file, {current.get(key)!r} in the model"
                   for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differences:
        raise ValueError(f"{path} was saved from a model converted with other options: {'; '.join(differences)} "
                         f"(convert the model with the file's options, then load)")


def _listing(items: List[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _model_label(model: nn.Module) -> str:
    name = getattr(model, "model_name", None)
    return repr(name) if name else type(model).__name__
