"""Costs of (binary) networks counted on fvcore: FLOPs, BOPs, OPs, parameters and storage.

Counting conventions (details and the BiMatting worked example in ``docs/profile.md``):

* ``flops``: full-precision multiply-accumulates as fvcore's ``FlopCountAnalysis`` counts them
  (one fused multiply-add = one FLOP; conv, linear, matmul, einsum, BatchNorm/LayerNorm/GroupNorm,
  upsampling and adaptive pooling; other elementwise ops count 0). On a model without binary
  layers ``flops`` equals fvcore's total exactly.
* ``bops``: MACs of layers that declare ``input_bits == 1`` **and** ``weight_bits == 1`` (read from
  the attributes, never from the class), counted with fvcore's formula from the weight and output
  shapes of every call. A layer with only one side binary counts as full precision.
* ``ops = flops + bops / 64`` (Bi-Real Net / ReActNet convention: 64 binary ops per 64-bit word).
* The ops inside binarizer modules (``sign``, ``abs``, scale means) are binarization overhead that
  is folded or free at inference; they are excluded from ``flops`` and reported as
  ``binarizer_flops``.
* ``binary_params``: elements of the ``weight`` of layers declaring ``weight_bits == 1``;
  ``fp_params``: every other parameter (BatchNorm, biases, scales, thresholds); buffers excluded.
  ``storage_bytes = binary_params / 8 + 4 * fp_params``.
* Sparse figures: a module with a ``mask_density`` attribute (measured on the profiled forward)
  scales the MACs of itself and its children by that density (the nearest such module wins).
"""
from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from binarize._callable import make_module_callable

__all__ = ["LayerCost", "ProfileReport", "Savings", "format_count", "measure_latency", "profile"]

BINARY_OPS_PER_WORD = 64
# fvcore operator names (simplified) that are multiply-accumulate products; in a binary layer
# these are the operations that become XNOR/popcount.
MAC_OPERATORS = frozenset({"conv", "linear", "addmm", "matmul", "mm", "bmm", "einsum"})
_PREFIX = "model"  # name of the profiled model inside the tracing wrapper


# --------------------------------------------------------------------------- precision helpers
def _bits(module: nn.Module, name: str) -> Optional[int]:
    value = getattr(module, name, None)
    return value if isinstance(value, int) else None


def is_binary_layer(module: nn.Module) -> bool:
    """True when the module declares 1-bit inputs and 1-bit weights (its MACs become BOPs)."""
    return _bits(module, "input_bits") == 1 and _bits(module, "weight_bits") == 1


def has_binary_weight(module: nn.Module) -> bool:
    """True when the module's ``weight`` is stored as 1 bit (``weight_bits == 1``)."""
    return _bits(module, "weight_bits") == 1 and isinstance(getattr(module, "weight", None), torch.Tensor)


def is_binarizer(module: nn.Module) -> bool:
    """Binarizers declare ``bits`` and ``kind`` (the ``binarize.ops.Binarizer`` contract)."""
    return isinstance(getattr(module, "bits", None), int) and isinstance(getattr(module, "kind", None), str)


def layer_macs(weight_shape: Sequence[int], output_shape: Sequence[int]) -> int:
    """MACs of one conv (4-D weight) or linear (2-D weight) call, fvcore's formula."""
    if len(weight_shape) == 4:  # batch * prod(weight) * prod(output spatial)
        return int(output_shape[0]) * math.prod(weight_shape) * math.prod(output_shape[2:])
    if len(weight_shape) == 2:  # rows * in_features * out_features
        return math.prod(output_shape[:-1]) * math.prod(weight_shape)
    raise ValueError(f"cannot count MACs of a layer with a {len(weight_shape)}-D weight")


# --------------------------------------------------------------------------- formatting
def format_count(value: float, unit: str = "") -> str:
    """Human-readable count with G/M/K suffixes: ``format_count(4.57e9) == '4.57 G'``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}{unit}"
    if float(value).is_integer():
        return f"{int(value)} {unit}".rstrip()
    return f"{value:.2f} {unit}".rstrip()


def _align(rows: List[Sequence[str]], right: Sequence[bool]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
    return lines


# --------------------------------------------------------------------------- report
@dataclass
class LayerCost:
    """Cost of one module's own work (children excluded): parameters, FP MACs and binary MACs."""

    name: str
    layer_type: str
    input_bits: Optional[int]
    weight_bits: Optional[int]
    binary_params: int
    fp_params: int
    flops: int
    bops: int
    density: float = 1.0
    unused_params: int = 0
    masked: bool = False

    @property
    def sparse_flops(self) -> float:
        return self.flops * self.density

    @property
    def sparse_bops(self) -> float:
        return self.bops * self.density


@dataclass
class Savings:
    """How many times cheaper a model is than a baseline (baseline cost / model cost)."""

    computation: float
    sparse_computation: float
    storage: float

    def __str__(self) -> str:
        return (
            f"computation saving {self.computation:.1f}x (dense), {self.sparse_computation:.1f}x (sparse); "
            f"storage saving {self.storage:.1f}x"
        )


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.inf


@dataclass
class ProfileReport:
    """Costs of one model on one input: dense and sparse FLOPs/BOPs/OPs, parameters, storage."""

    flops: int
    bops: int
    sparse_flops: float
    sparse_bops: float
    binary_params: int
    fp_params: int
    layers: List[LayerCost] = field(default_factory=list)
    input_shapes: List[List[int]] = field(default_factory=list)
    unused_params: int = 0
    binarizer_flops: int = 0
    unsupported_ops: Dict[str, int] = field(default_factory=dict)
    mask_densities: Dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    latency_s: Optional[float] = None

    @property
    def ops(self) -> float:
        return self.flops + self.bops / BINARY_OPS_PER_WORD

    @property
    def sparse_ops(self) -> float:
        return self.sparse_flops + self.sparse_bops / BINARY_OPS_PER_WORD

    @property
    def masked_flops(self) -> int:
        """Dense FLOPs of the layers that run inside a mask (the part sparsity can save)."""
        return sum(layer.flops for layer in self.layers if layer.masked)

    @property
    def masked_bops(self) -> int:
        """Dense BOPs of the layers that run inside a mask."""
        return sum(layer.bops for layer in self.layers if layer.masked)

    @property
    def params(self) -> int:
        return self.binary_params + self.fp_params

    @property
    def storage_bytes(self) -> float:
        return self.binary_params / 8 + 4 * self.fp_params

    @property
    def fp32_storage_bytes(self) -> int:
        return 4 * self.params

    def compare(self, baseline: ProfileReport) -> Savings:
        """Savings of this model relative to ``baseline`` (e.g. BiMatting vs RVM)."""
        return Savings(
            computation=_ratio(baseline.ops, self.ops),
            sparse_computation=_ratio(baseline.sparse_ops, self.sparse_ops),
            storage=_ratio(baseline.storage_bytes, self.storage_bytes),
        )

    def summary(self) -> Dict[str, float]:
        """The headline figures as a flat dict."""
        return {
            "flops": self.flops, "bops": self.bops, "ops": self.ops,
            "sparse_flops": self.sparse_flops, "sparse_bops": self.sparse_bops, "sparse_ops": self.sparse_ops,
            "binary_params": self.binary_params, "fp_params": self.fp_params, "params": self.params,
            "storage_bytes": self.storage_bytes, "fp32_storage_bytes": self.fp32_storage_bytes,
            "masked_flops": self.masked_flops, "masked_bops": self.masked_bops,
            "unused_params": self.unused_params, "binarizer_flops": self.binarizer_flops,
        }

    def to_dict(self) -> Dict[str, Any]:
        """Everything in plain JSON-serialisable data, per-layer rows included."""
        out: Dict[str, Any] = {"model": self.model_name, "input_shapes": self.input_shapes}
        out.update(self.summary())
        if self.latency_s is not None:
            out["latency_s"] = self.latency_s
        out["mask_densities"] = dict(self.mask_densities)
        out["unsupported_ops"] = dict(self.unsupported_ops)
        out["layers"] = [asdict(layer) for layer in self.layers]
        return out

    def table(self, layers: bool = True) -> str:
        """Aligned human-readable table: one row per layer with a cost, then the totals."""
        header = ("layer", "type", "bits (in/w)", "params bin", "params fp", "FLOPs", "BOPs", "density")
        rows: List[Sequence[str]] = [header]
        if layers:
            for layer in self.layers:
                declared = layer.input_bits is not None or layer.weight_bits is not None
                bits = f"{layer.input_bits or 32}/{layer.weight_bits or 32}" if declared else "fp"
                rows.append((
                    layer.name or "<root>", layer.layer_type, bits, format_count(layer.binary_params),
                    format_count(layer.fp_params), format_count(layer.flops), format_count(layer.bops),
                    f"{layer.density:.3f}",
                ))
        rows.append(("total", "", "", format_count(self.binary_params), format_count(self.fp_params),
                     format_count(self.flops), format_count(self.bops), ""))
        right = (False, False, False, True, True, True, True, True)
        lines = _align(rows, right)
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        lines += [
            f"OPs = FLOPs + BOPs/64: {format_count(self.ops)} dense, {format_count(self.sparse_ops)} sparse "
            f"(sparse FLOPs {format_count(self.sparse_flops)}, sparse BOPs {format_count(self.sparse_bops)})",
            f"storage: {self.storage_bytes / 1e6:.3f} MB (fp32: {self.fp32_storage_bytes / 1e6:.3f} MB)"
            + (f"; {self.unused_params} parameters never read by the forward are not counted"
               if self.unused_params else ""),
        ]
        if self.latency_s is not None:
            lines.append(f"measured latency: {self.latency_s * 1e3:.1f} ms per forward (median)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table(layers=False)


# --------------------------------------------------------------------------- tracing
def _flatten_tensors(value: Any) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flatten_tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _flatten_tensors(item)]
    return []


class _Call(nn.Module):
    """Traceable wrapper: only tensors cross the trace boundary; other arguments are bound here."""

    def __init__(self, model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self._args = args
        self._kwargs = kwargs

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        args = [a for a in self._args if isinstance(a, torch.Tensor)]
        return tuple(args + [v for v in self._kwargs.values() if isinstance(v, torch.Tensor)])

    def forward(self, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        supply = iter(tensors)
        args = [next(supply) if isinstance(a, torch.Tensor) else a for a in self._args]
        kwargs = {k: next(supply) if isinstance(v, torch.Tensor) else v for k, v in self._kwargs.items()}
        return tuple(_flatten_tensors(self.model(*args, **kwargs)))


def _normalize_inputs(example_inputs: Any) -> Tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        if not any(isinstance(a, torch.Tensor) for a in example_inputs):
            raise ValueError("profile: example_inputs must contain at least one tensor")
        return tuple(example_inputs)
    raise ValueError(f"profile: example_inputs must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}")


def _shape_hint(model: nn.Module, inputs: Tuple[Any, ...]) -> str:
    """Name the first layer's expected input when the first tensor does not fit it."""
    first = next((a for a in inputs if isinstance(a, torch.Tensor)), None)
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            channel_dim = first.dim() - 3 if first is not None and first.dim() >= 3 else None
            if channel_dim is not None and first.shape[channel_dim] != module.in_channels:
                return f"; its first conv {name!r} expects {module.in_channels} input channels"
            return ""
        if isinstance(module, nn.Linear):
            if first is not None and first.shape[-1] != module.in_features:
                return f"; its first linear {name!r} expects a last dimension of {module.in_features}"
            return ""
    return ""


def _run_fvcore(wrapper: _Call, inputs: Tuple[Any, ...]) -> Tuple[Any, Optional[torch._C.Graph]]:
    """Run fvcore's analysis; also return the traced graph (None if it could not be captured)."""
    with warnings.catch_warnings():  # fvcore.nn scripts its focal loss on import: torch warns of that
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        from fvcore.nn import FlopCountAnalysis, jit_analysis

    analysis = FlopCountAnalysis(wrapper, wrapper.tensors())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    logger = logging.getLogger("fvcore.nn.jit_analysis")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    tracer = getattr(jit_analysis, "_get_scoped_trace_graph", None)
    captured: Dict[str, Any] = {}

    def capture(*args: Any, **kwargs: Any) -> Any:
        captured["graph"] = tracer(*args, **kwargs)
        return captured["graph"]

    if tracer is not None:  # keep the graph fvcore traces anyway: it tells which parameters are read
        jit_analysis._get_scoped_trace_graph = capture
    try:
        analysis.by_module_and_operator()
    except Exception as exc:  # noqa: BLE001 - any forward failure becomes one clear line
        shapes = [list(t.shape) for t in wrapper.tensors()]
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = _shape_hint(wrapper.model, inputs)
        raise ValueError(
            f"profile: {type(wrapper.model).__name__} failed on input shape(s) {shapes}{hint}: {message}"
        ) from exc
    finally:
        logger.setLevel(previous)
        if tracer is not None:
            jit_analysis._get_scoped_trace_graph = tracer
    return analysis, captured.get("graph")


def _read_parameters(graph: Optional[Any], wrapper: _Call) -> Optional[set]:
    """ids of the parameters the traced forward reads, or None when that cannot be told.

    ``torch.jit`` traces a module with its inputs followed by its unique state (parameters and
    buffers, deduplicated by identity, in ``state_dict`` order) as graph inputs; a graph input
    without uses is a tensor the forward never reads.
    """
    if graph is None:
        return None
    try:
        from torch.jit._trace import _unique_state_dict
    except ImportError:
        return None
    state = list(_unique_state_dict(wrapper, keep_vars=True).values())
    graph_inputs = list(graph.inputs())
    offset = len(wrapper.tensors())
    if len(graph_inputs) != offset + len(state):
        return None
    return {id(t) for t, value in zip(state, graph_inputs[offset:]) if value.uses()}


def _own_counts(counts: Dict[str, Counter]) -> Dict[str, Counter]:
    """fvcore counts each op in its owner and all its ancestors; keep only the owner's share."""
    own = {name: Counter(dict(c)) for name, c in counts.items()}
    for name, c in counts.items():
        if not name:
            continue
        parent = name.rpartition(".")[0]
        if parent in own:
            for op, value in c.items():
                own[parent][op] -= value
    return own


def _strip(name: str) -> str:
    if name == _PREFIX:
        return ""
    return name[len(_PREFIX) + 1:] if name.startswith(_PREFIX + ".") else name


def _ancestors(name: str) -> List[str]:
    """``name`` and its ancestors, innermost first: 'a.b' -> ['a.b', 'a', '']."""
    out = [name]
    while name:
        name = name.rpartition(".")[0]
        out.append(name)
    return out


class _MacRecorder:
    """Forward hooks adding up the MACs of every call of every binary layer, and noting which
    modules ran at all."""

    def __init__(self, model: nn.Module) -> None:
        self.macs: Dict[int, int] = Counter()
        self.called: set = set()
        self._handles = [m.register_forward_hook(self._hook) for m in _unique_modules(model)]

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.called.add(id(module))
        if is_binary_layer(module):
            out = output if isinstance(output, torch.Tensor) else _flatten_tensors(output)[0]
            self.macs[id(module)] += layer_macs(tuple(module.weight.shape), tuple(out.shape))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode and restore every module's own training flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _unique_modules(model: nn.Module) -> List[nn.Module]:
    return [m for _, m in model.named_modules()]


# --------------------------------------------------------------------------- parameters
def _dead_parameters(model: nn.Module, used: Optional[set], called: set) -> set:
    """ids of parameters that need no storage because the forward never reads them.

    A parameter is dead when its module ran without reading it, or when its module did not run
    (e.g. a refiner used only when downsampling) but no instance of the same class that did run
    read the parameter of that name (e.g. an official checkpoint's vestigial threshold). The
    parameters of modules that did not run are otherwise live: other calls need them. A layer
    running another implementation (the packed engine reads packed copies) keeps all its
    parameters, and a binary weight is always live (its sign bits are what is stored).
    """
    if used is None:
        return set()
    read_by_class: Dict[Tuple[type, str], bool] = {}
    for module in _unique_modules(model):
        if id(module) in called:
            for name, param in module.named_parameters(recurse=False):
                key = (type(module), name)
                read_by_class[key] = read_by_class.get(key, False) or id(param) in used
    dead = set()
    for module in _unique_modules(model):
        if _runs_elsewhere(module):
            continue
        for name, param in module.named_parameters(recurse=False):
            if id(param) in used or (name == "weight" and has_binary_weight(module)):
                continue
            if id(module) in called or read_by_class.get((type(module), name)) is False:
                dead.add(id(param))
    return dead


def _runs_elsewhere(module: nn.Module) -> bool:
    """A layer whose forward is delegated to another implementation (``deploy``)."""
    implementation = getattr(module, "implementation", None)
    return isinstance(implementation, str) and implementation != "simulated"


def _read_as_float(model: nn.Module, used: Optional[set], called: set) -> set:
    """ids of binary layers' weights that the forward reads although the layer never ran: a parent
    passes the latent float weight to its own code (``F.linear(x, self.qkv.weight)``), so the
    layer computes in full precision and its weight must be stored as floats."""
    if used is None:
        return set()
    return {id(m.weight) for m in _unique_modules(model)
            if has_binary_weight(m) and id(m) not in called and not _runs_elsewhere(m) and id(m.weight) in used}


def _parameter_split(module: nn.Module, seen: set, dead: set, as_float: frozenset = frozenset()
                     ) -> Tuple[int, int, int]:
    """(binary, fp, unused) element counts of the module's own parameters not counted yet;
    ``dead`` parameters (never read, see ``_dead_parameters``) are counted as unused, and binary
    weights in ``as_float`` (read as floats, see ``_read_as_float``) as full precision."""
    binary = fp = unused = 0
    weight = getattr(module, "weight", None) if has_binary_weight(module) else None
    if weight is not None and id(weight) in as_float:
        weight = None
    for param in module.parameters(recurse=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in dead:
            unused += param.numel()
        elif param is weight:
            binary += param.numel()
        else:
            fp += param.numel()
    return binary, fp, unused


def _densities(model: nn.Module, names: Dict[int, str], assume: Optional[float]) -> Dict[str, float]:
    out = {}
    for module in _unique_modules(model):
        if not hasattr(module, "mask_density"):
            continue
        value = module.mask_density if assume is None else assume
        if value is None:
            continue
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"profile: mask_density of {names[id(module)]!r} is {value}, expected [0, 1]")
        out[names[id(module)]] = value
    return out


# --------------------------------------------------------------------------- main entry
def profile(
    model: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[Any]],
    *,
    assume_density: Optional[float] = None,
    **forward_kwargs: Any,
) -> ProfileReport:
    """Count the cost of one forward of ``model(*example_inputs, **forward_kwargs)``.

    The model is run once, in eval mode and without gradients, under fvcore's tracer (its
    training flags are restored afterwards). ``assume_density`` replaces the measured
    ``mask_density`` of every masked module in the sparse figures (e.g. 0.44 to reproduce a
    paper's operating point). Non-tensor inputs such as ``None`` recurrent states are allowed.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"profile: expected a torch.nn.Module, got {type(model).__name__}")
    if assume_density is not None and not 0.0 <= assume_density <= 1.0:
        raise ValueError(f"profile: assume_density must be in [0, 1], got {assume_density}")
    inputs = _normalize_inputs(example_inputs)
    wrapper = _Call(model, inputs, forward_kwargs)
    recorder = _MacRecorder(model)
    try:
        with _eval_mode(model), torch.no_grad():
            analysis, graph = _run_fvcore(wrapper, inputs)
    finally:
        recorder.remove()
    used = _read_parameters(graph, wrapper)
    return _build_report(model, wrapper, analysis, recorder, assume_density, used)


def _build_report(
    model: nn.Module, wrapper: _Call, analysis: Any, recorder: _MacRecorder, assume_density: Optional[float],
    used: Optional[set],
) -> ProfileReport:
    counts = analysis.by_module_and_operator()
    own = _own_counts(counts)
    names = {id(m): _strip(analysis.canonical_module_name(n)) for n, m in wrapper.named_modules()}
    modules = {names[id(m)]: m for m in wrapper.modules()}
    densities = _densities(model, names, assume_density)
    binarizer_scopes = {name for name, m in modules.items() if is_binarizer(m)}
    seen_params: set = set()
    dead = _dead_parameters(model, used, recorder.called)
    as_float = frozenset(_read_as_float(model, used, recorder.called))
    layers: List[LayerCost] = []
    totals = Counter()
    binarizer_flops = 0
    for raw_name, ops in own.items():
        name = _strip(raw_name)
        module = modules[name]
        if raw_name == "":  # the wrapper itself: no parameters, only output packing
            totals["flops"] += sum(ops.values())
            continue
        lineage = _ancestors(name)
        mask_owner = next((n for n in lineage if n in densities), None)
        density = densities[mask_owner] if mask_owner is not None else 1.0
        binary_params, fp_params, unused = _parameter_split(module, seen_params, dead, as_float)
        totals["unused"] += unused
        if any(n in binarizer_scopes for n in lineage):
            binarizer_flops += sum(ops.values())
            flops = bops = 0
        elif is_binary_layer(module):
            flops = sum(v for op, v in ops.items() if op not in MAC_OPERATORS)
            bops = recorder.macs.get(id(module), 0)
        else:
            flops, bops = sum(ops.values()), 0
        totals["flops"] += flops
        totals["bops"] += bops
        totals["sparse_flops"] += flops * density
        totals["sparse_bops"] += bops * density
        totals["binary"] += binary_params
        totals["fp"] += fp_params
        if flops or bops or binary_params or fp_params or unused:
            layers.append(LayerCost(
                name, type(module).__name__, _bits(module, "input_bits"), _bits(module, "weight_bits"),
                binary_params, fp_params, int(flops), int(bops), density, unused, mask_owner is not None,
            ))
    unsupported = analysis.unsupported_ops()
    return ProfileReport(
        flops=int(totals["flops"]), bops=int(totals["bops"]),
        sparse_flops=float(totals["sparse_flops"]), sparse_bops=float(totals["sparse_bops"]),
        binary_params=int(totals["binary"]), fp_params=int(totals["fp"]), unused_params=int(totals["unused"]),
        layers=layers,
        input_shapes=[list(t.shape) for t in wrapper.tensors()], binarizer_flops=int(binarizer_flops),
        unsupported_ops=dict(unsupported), mask_densities=densities,
        model_name=str(getattr(model, "model_name", type(model).__name__)),
    )


# --------------------------------------------------------------------------- latency
def measure_latency(
    model: nn.Module,
    example_inputs: Union[torch.Tensor, Sequence[Any]],
    *,
    runs: int = 5,
    warmup: int = 1,
    timer: Callable[[], float] = time.perf_counter,
    **forward_kwargs: Any,
) -> float:
    """Median wall time in seconds of one forward (eval mode, no gradients) over ``runs`` runs."""
    if runs < 1:
        raise ValueError(f"measure_latency: runs must be >= 1, got {runs}")
    inputs = _normalize_inputs(example_inputs)
    times = []
    with _eval_mode(model), torch.no_grad():
        for _ in range(warmup + runs):
            start = timer()
            model(*inputs, **forward_kwargs)
            times.append(timer() - start)
    return statistics.median(times[warmup:])


make_module_callable(__name__, "profile")
