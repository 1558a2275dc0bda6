"""The activation policy of ``binarize.convert``: every binary layer must see a signal whose sign
carries information.

A binary layer keeps only the sign of its input. After a ReLU the input is >= 0, and every
binarizer maps it to +1 (or to {0, +1}): the layer's output no longer depends on its input, and no
gradient reaches the weights that feed it. Bi-Real Net (Liu et al. 2018) and ReActNet (Liu et al.
2020) therefore drop the ReLU in front of their binary convolutions (their blocks are BN ->
shortcut add -> (R)PReLU, whose output has both signs).

``apply_policy`` finds, on a ``torch.fx`` trace of the converted model, every binary layer whose
input is non-negative by construction and walks back to the ReLU / ReLU6 *modules* that make it
so (through pooling, dropout, flatten, reshapes, padding, concatenation, additions and products of
non-negative tensors). Each such module object is replaced, as a whole when it is called at
several sites (torchvision's shared ``self.relu``), by the policy's replacement (``nn.Identity`` by
default; see ``docs/convert.md`` for the measurement behind the default). Gates (Sigmoid,
Hardsigmoid, Softplus) count as non-negative but are never replaced: a product ``x * gate`` is
fixed by replacing the activation on ``x``. A functional ReLU (``F.relu`` in a parent's forward)
cannot be swapped without rewriting code: it is reported and warned about.

When the model cannot be traced (data-dependent control flow), every ReLU / ReLU6 module is
replaced instead, and the report says so. Each replacement remembers the module it replaced, so
``binarize.unconvert`` restores the original model.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from binarize._surgery import module_names, replace_modules

__all__ = [
    "ACTIVATION_REPLACEMENTS",
    "DEFAULT_REPLACEMENT",
    "check_activation",
    "ReplacedActivation",
    "FunctionalActivation",
    "apply_policy",
    "restore_activations",
    "original_activation",
]

# attribute (in the replacement's __dict__, so neither a submodule nor a state_dict entry) holding
# the module a replacement stands for
_ORIGINAL = "_binarize_original_activation"


def _identity(module: nn.Module) -> nn.Module:
    return nn.Identity()


def _prelu(module: nn.Module) -> nn.Module:
    return nn.PReLU(1, init=0.25)


def _hardtanh(module: nn.Module) -> nn.Module:
    return nn.Hardtanh(-1.0, 1.0)


# name -> factory(original module) -> replacement module
ACTIVATION_REPLACEMENTS: Dict[str, Callable[[nn.Module], nn.Module]] = {
    "identity": _identity,
    "prelu": _prelu,
    "hardtanh": _hardtanh,
}

ActivationSpec = Union[str, Callable[[nn.Module], nn.Module], None]

# activations whose output is >= 0; only the rectifiers are replaced, gates are left alone
_RECTIFIER_MODULES = (nn.ReLU, nn.ReLU6)
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.Softmax)
_RECTIFIER_FUNCTIONS = {F.relu, torch.relu, F.relu6, getattr(torch, "relu_", None), getattr(F, "relu_", None)}
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, F.softmax, torch.softmax}
_RECTIFIER_METHODS = {"relu", "relu_"}
_GATE_METHODS = {"sigmoid", "sigmoid_", "softmax"}
# smooth activations whose output is >= -0.28 (SiLU), -0.17 (GELU), -0.38 (Hardswish), -0.31 (Mish):
# both signs pixel by pixel, but their spatial mean (a squeeze-excite input) is almost always > 0
_SOFT_MODULES = (nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish)
_SOFT_FUNCTIONS = {F.silu, F.gelu, F.hardswish, F.mish}

# ops whose output is non-negative when their tensor inputs are (through the first tensor argument
# for the single-input ones; through every tensor argument for the combining ones)
_PASS_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
    nn.Identity, nn.Flatten, nn.Unflatten, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.PixelShuffle, nn.PixelUnshuffle,
)
_PASS_FUNCTIONS = {
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, F.interpolate,
    torch.flatten, torch.reshape, operator.getitem, F.pad, torch.mean, torch.permute, torch.transpose,
    torch.sum,
}
_PASS_METHODS = {"flatten", "view", "reshape", "permute", "transpose", "contiguous", "mean", "sum", "squeeze",
                 "unsqueeze", "expand", "expand_as", "repeat", "chunk", "split", "float", "to"}
_COMBINE_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, operator.mul, torch.mul}
_COMBINE_METHODS = {"add", "add_", "mul", "mul_"}


@dataclass(frozen=True)
class ReplacedActivation:
    """A non-negative activation module that ``convert`` replaced, with every name it has."""

    name: str
    old_type: str
    new_type: str
    reason: str
    aliases: Tuple[str, ...] = ()


@dataclass(frozen=True)
class FunctionalActivation:
    """A functional non-negative activation (``F.relu`` in a parent's code) feeding a binary layer."""

    site: str
    function: str
    feeds: Tuple[str, ...]


# what ``activation="auto"`` (convert's default) means; docs/convert.md gives the measurement
DEFAULT_REPLACEMENT = "identity"


def _factory(spec: ActivationSpec) -> Optional[Callable[[nn.Module], nn.Module]]:
    if spec is None or (isinstance(spec, str) and spec.lower() == "keep"):
        return None
    if isinstance(spec, str):
        name = DEFAULT_REPLACEMENT if spec.lower() == "auto" else spec.lower()
        factory = ACTIVATION_REPLACEMENTS.get(name)
        if factory is None:
            choices = ", ".join(["auto", "keep", *ACTIVATION_REPLACEMENTS])
            raise ValueError(f"unknown activation policy {spec!r}; choose one of: {choices}, or a callable")
        return factory
    if callable(spec):
        return spec
    raise ValueError(f"activation must be a name, a callable or None; got {spec!r}")


def check_activation(spec: ActivationSpec) -> None:
    """Validate an ``activation=`` argument of ``convert`` (ValueError naming the choices)."""
    _factory(spec)


class _BinaryLeafTracer(torch.fx.Tracer):
    """torch.nn modules and binary layers stay one call each; everything else is traced through."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if hasattr(module, "input_bits") and hasattr(module, "weight_bits"):
            return True
        return super().is_leaf_module(module, qualified_name)


def _callable_name(target: object) -> str:
    return getattr(target, "__name__", str(target))


class _Graph:
    """Non-negativity of every node of a traced model, and the rectifiers that cause it."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph) -> None:
        self.model = model
        self.graph = graph
        self.nonneg: Dict[torch.fx.Node, bool] = {}
        self.soft: Dict[torch.fx.Node, bool] = {}  # a smooth activation's output, through pass ops
        self.pooled_soft: Dict[torch.fx.Node, bool] = {}  # its global spatial mean, through pass ops
        for node in graph.nodes:
            self.nonneg[node] = self._is_nonneg(node)
            self.soft[node], self.pooled_soft[node] = self._is_soft(node)

    def module(self, node: torch.fx.Node) -> Optional[nn.Module]:
        if node.op != "call_module":
            return None
        return self.model.get_submodule(str(node.target))

    def _tensor_args(self, node: torch.fx.Node) -> List[torch.fx.Node]:
        args: List[torch.fx.Node] = []
        for arg in list(node.args) + list(node.kwargs.values()):
            items = arg if isinstance(arg, (list, tuple)) else [arg]
            args += [a for a in items if isinstance(a, torch.fx.Node)]
        return args

    def kind(self, node: torch.fx.Node) -> str:
        """'rectifier', 'gate', 'pass', 'combine' or 'other'."""
        if node.op == "call_module":
            module = self.module(node)
            if isinstance(module, _RECTIFIER_MODULES):
                return "rectifier"
            if isinstance(module, _GATE_MODULES):
                return "gate"
            if isinstance(module, _PASS_MODULES):
                return "pass"
        elif node.op == "call_function":
            if node.target in _RECTIFIER_FUNCTIONS:
                return "rectifier"
            if node.target in _GATE_FUNCTIONS:
                return "gate"
            if node.target in _PASS_FUNCTIONS:
                return "pass"
            if node.target in _COMBINE_FUNCTIONS:
                return "combine"
        elif node.op == "call_method":
            if node.target in _RECTIFIER_METHODS:
                return "rectifier"
            if node.target in _GATE_METHODS:
                return "gate"
            if node.target in _PASS_METHODS:
                return "pass"
            if node.target in _COMBINE_METHODS:
                return "combine"
        return "other"

    def _is_nonneg(self, node: torch.fx.Node) -> bool:
        kind = self.kind(node)
        if kind in ("rectifier", "gate"):
            return True
        args = self._tensor_args(node)
        if not args:
            return False
        if kind == "pass":
            return self.nonneg.get(args[0], False)
        if kind == "combine":
            # a product or sum with a python number: non-negative only for a non-negative number
            scalars = [a for a in node.args if isinstance(a, (int, float))]
            return all(self.nonneg.get(a, False) for a in args) and all(s >= 0 for s in scalars)
        return False

    def _is_soft(self, node: torch.fx.Node) -> Tuple[bool, bool]:
        """(output of SiLU/GELU/Hardswish/Mish, global spatial mean of one), through pass ops."""
        module = self.module(node)
        if isinstance(module, _SOFT_MODULES) or (node.op == "call_function" and node.target in _SOFT_FUNCTIONS):
            return True, False
        args = self._tensor_args(node)
        if not args or self.kind(node) != "pass":
            return False, False
        first = args[0]
        soft = self.soft.get(first, False) or self.nonneg.get(first, False)
        if soft and self._global_pool(node):
            return False, True
        return self.soft.get(first, False), self.pooled_soft.get(first, False)

    def soft_name(self, node: torch.fx.Node) -> str:
        """Name of the smooth activation (or rectifier) behind a pooled node, for the report."""
        current: Optional[torch.fx.Node] = node
        while current is not None:
            module = self.module(current)
            if module is not None and isinstance(module, _SOFT_MODULES + _RECTIFIER_MODULES):
                return type(module).__name__
            if current.op == "call_function" and current.target in _SOFT_FUNCTIONS:
                return _callable_name(current.target)
            args = self._tensor_args(current)
            current = args[0] if args else None
        return "smooth activation"

    def _global_pool(self, node: torch.fx.Node) -> bool:
        """An average over every spatial position: AdaptiveAvgPool2d(1), adaptive_avg_pool2d(x, 1) or
        mean over the last two dimensions (timm's and torchvision's squeeze-excite)."""
        module = self.module(node)
        size: object = None
        if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
            size = module.output_size
        elif node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if size is not None:
            return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))
        if (node.op == "call_method" and node.target == "mean") or (
                node.op == "call_function" and node.target is torch.mean):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = dims if isinstance(dims, (tuple, list)) else (dims,)
            return {2, 3} <= {d for d in dims if isinstance(d, int)} or {-1, -2} <= {
                d for d in dims if isinstance(d, int)}
        return False

    def sources(self, node: torch.fx.Node) -> List[torch.fx.Node]:
        """The rectifier nodes that make ``node`` non-negative (gates are never sources)."""
        found: List[torch.fx.Node] = []
        seen: Set[torch.fx.Node] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if current in seen or not self.nonneg.get(current, False):
                continue
            seen.add(current)
            kind = self.kind(current)
            if kind == "rectifier":
                found.append(current)
            elif kind == "pass":
                stack.append(self._tensor_args(current)[0])
            elif kind == "combine":
                stack += self._tensor_args(current)
        return found


def _binary(module: nn.Module) -> bool:
    return hasattr(module, "input_bits") and hasattr(module, "weight_bits") and int(module.input_bits) < 32


def _trace(model: nn.Module) -> Tuple[Optional[torch.fx.Graph], str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _BinaryLeafTracer().trace(model), ""
    except Exception as exc:  # noqa: BLE001 - any tracing failure sends us to the fallback
        return None, (str(exc).strip().splitlines() or [type(exc).__name__])[0]


REASON_GATED = "input is non-negative by construction (a gate's output, no rectifier to replace)"
REASON_POOLED = ("input is the spatial mean of a {act} output (squeeze-excite): almost always > 0, so its "
                 "sign would be constant")


def apply_policy(
    model: nn.Module, activation: ActivationSpec
) -> Tuple[List[ReplacedActivation], List[FunctionalActivation], str, Dict[str, str]]:
    """Replace the rectifier modules that feed binary layers of ``model`` (in place).

    Returns the replaced modules, the functional rectifiers that could not be replaced, a note
    (empty, or why the whole-model fallback was used) and the binary layers to keep full precision
    (name -> reason): those whose input is the global spatial mean of a SiLU / GELU / Hardswish /
    Mish output (a squeeze-excite's reduce layer), whose sign is constant and which no activation
    swap can fix without changing the float network. ``activation`` is a name of
    ``ACTIVATION_REPLACEMENTS``, a factory ``f(original_module) -> module``, or ``"keep"``/``None``
    (do nothing).
    """
    factory = _factory(activation)
    if factory is None or not any(_binary(m) for m in model.modules()):
        return [], [], "", {}
    names = module_names(model)
    graph, error = _trace(model)
    targets: Dict[int, Tuple[nn.Module, str]] = {}
    functional: List[FunctionalActivation] = []
    keep: Dict[str, str] = {}
    note = ""
    if graph is not None:
        analysis = _Graph(model, graph)
        feeds: Dict[torch.fx.Node, List[str]] = {}
        for node in graph.nodes:
            module = analysis.module(node)
            if module is None or not _binary(module) or not node.args:
                continue
            first = node.args[0]
            if isinstance(first, torch.fx.Node) and analysis.nonneg.get(first, False):
                sources = analysis.sources(first)
                for source in sources:
                    feeds.setdefault(source, []).append(str(node.target))
                if not sources:  # only gates (sigmoid, softmax) make it so: nothing to replace
                    keep[str(node.target)] = REASON_GATED
            elif isinstance(first, torch.fx.Node) and analysis.pooled_soft.get(first, False):
                keep[str(node.target)] = REASON_POOLED.format(act=analysis.soft_name(first))
        for source, consumers in feeds.items():
            module = analysis.module(source)
            if module is None:
                functional.append(FunctionalActivation(source.name, _callable_name(source.target), tuple(consumers)))
                continue
            reason = "non-negative input of binary layer(s) " + ", ".join(sorted(set(consumers))[:3])
            if len(set(consumers)) > 3:
                reason += f" (+{len(set(consumers)) - 3} more)"
            targets.setdefault(id(module), (module, reason))
    else:
        note = f"model could not be traced ({error}); every ReLU/ReLU6 module was replaced"
        for _, module in model.named_modules():
            if isinstance(module, _RECTIFIER_MODULES):
                targets.setdefault(id(module), (module, "untraceable model: every rectifier replaced"))
    replaced: List[ReplacedActivation] = []
    replacements: Dict[int, nn.Module] = {}
    # a replacement with parameters (PReLU) lives on the model's device and in its float dtype
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    for key, (module, reason) in targets.items():
        new = factory(module)
        if not isinstance(new, nn.Module):
            raise ValueError(f"activation factory returned {type(new).__name__}, not an nn.Module")
        if reference is not None:
            new = new.to(device=reference.device, dtype=reference.dtype)
        new.train(module.training)
        new.__dict__[_ORIGINAL] = module
        replacements[key] = new
        all_names = names.get(key, [""])
        replaced.append(ReplacedActivation(all_names[0], type(module).__name__, type(new).__name__, reason,
                                           tuple(all_names[1:])))
    replace_modules(model, replacements)
    if functional:
        sites = ", ".join(f"{f.function} at {f.site} -> {f.feeds[0]}" for f in functional[:3])
        warnings.warn(
            f"binarize.convert: {len(functional)} functional non-negative activation(s) feed binary layers "
            f"and cannot be replaced ({sites}); those layers see only +1 inputs: replace the call by a module "
            "or use method='reactnet' (learnable threshold)",
            stacklevel=3,
        )
    return replaced, functional, note, keep


def original_activation(module: nn.Module) -> Optional[nn.Module]:
    """The module a policy replacement stands for (``None`` when ``module`` is no replacement)."""
    return module.__dict__.get(_ORIGINAL)


def restore_activations(model: nn.Module) -> nn.Module:
    """Put back every activation module the policy replaced (in place); returns the new root."""
    replacements = {}
    for module in model.modules():
        original = original_activation(module)
        if original is not None:
            original.train(module.training)
            replacements[id(module)] = original
    return replace_modules(model, replacements)
