"""Model surgery: turn any full-precision ``nn.Module`` into a binary network and back.

``convert`` walks a model, decides for every ``nn.Conv2d`` / ``nn.Linear`` whether it becomes a
:class:`binarize.nn.BinaryConv2d` / :class:`binarize.nn.BinaryLinear` (weights copied through
``from_float``) or stays full precision, and records each decision with its reason in a
:class:`ConversionReport`. ``unconvert`` reverses the surgery with ``to_float``.

Policy (see ``docs/convert.md``):

* the *first* layer is the first ``nn.Conv2d`` in registration order (``model.named_modules()``),
  or the first ``nn.Linear`` when the model has no convolution; it sees raw pixels/features and
  is kept full precision when ``keep_first`` (the convention of XNOR-Net, Bi-Real and ReActNet);
* the *last* layer is the last ``nn.Conv2d`` / ``nn.Linear`` in registration order (the
  classifier of timm and torchvision models) and is kept when ``keep_last``;
* depthwise convolutions (``groups == in_channels > 1``) are kept when ``keep_depthwise``
  (one input channel per filter leaves too little information after binarization);
* ``skip`` keeps layers by ``fnmatch`` glob(s) on the module name or by a predicate
  ``skip(name, module) -> bool``.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import inspect
import re
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from binarize._callable import make_module_callable
from binarize._surgery import module_names as _all_names
from binarize._surgery import replace_modules as _replace_modules
from binarize.activation_policy import (
    ActivationSpec,
    FunctionalActivation,
    ReplacedActivation,
    apply_policy,
    check_activation,
    restore_activations,
)

SkipSpec = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

__all__ = ["ConversionReport", "KeptLayer", "ReplacedLayer", "ReplacedActivation", "convert", "unconvert"]

# Reasons a layer stays full precision (stable strings: tests and users may match on them).
REASON_FIRST = "first layer (keep_first)"
REASON_LAST = "last layer (keep_last)"
REASON_DEPTHWISE = "depthwise convolution (keep_depthwise)"
REASON_SKIP = "matched skip"
REASON_ALREADY_BINARY = "already binary"
REASON_FUNCTIONAL = "weights used functionally by its parent {parent} (its forward is never called)"
REASON_CUSTOM_FORWARD = "subclass {cls} overrides forward; replacing it would change its behaviour"
REASON_UNCALLED = ("never called by the forward on example_inputs although its parent {parent} is "
                   "(its weights are read functionally, or it is unused)")
REASON_PARAMETRIZED = "weight computed by {how}; replacing the layer would drop it"
REASON_NO_COUNTERPART = "{kind} has no binary counterpart (only Conv2d and Linear are converted)"
REASON_IN_PROJ = "in_proj_weight is read functionally by MultiheadAttention (no binary counterpart)"

# Layer types convert never binarizes, listed in the report as kept (checked in this order).
_NO_COUNTERPART = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                   nn.RNNBase, nn.RNNCellBase, nn.Bilinear)
# parents known to read a child's weights in their own code (kept when the source cannot be read)
_KNOWN_FUNCTIONAL = {
    "torch.nn.modules.activation.MultiheadAttention": ("out_proj",),
    "torchvision.models.swin_transformer.ShiftedWindowAttention": ("qkv", "proj"),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": ("qkv", "proj"),
}
# ``self.<child>.weight`` / ``.bias`` read in a forward, except for metadata (dtype, shape, ...)
_FUNCTIONAL_READ = re.compile(
    r"self\.(\w+)\.(?:weight|bias)\b(?!\s*\.\s*(?:dtype|device|shape|size|ndim|dim|requires_grad|is_cuda|numel)\b)")
_METHOD_CALL = re.compile(r"self\.(\w+)\s*\(")

# Subclasses whose forward is known to be equivalent to the parent's.
_EQUIVALENT_FORWARD = {"timm.layers.linear.Linear"}


@dataclass(frozen=True)
class ReplacedLayer:
    """A layer that ``convert`` replaced by its binary counterpart."""

    name: str
    old_type: str
    new_type: str
    aliases: Tuple[str, ...] = ()


@dataclass(frozen=True)
class KeptLayer:
    """A convolution or linear layer that ``convert`` kept full precision, with the reason."""

    name: str
    layer_type: str
    reason: str
    aliases: Tuple[str, ...] = ()


@dataclass
class ConversionReport:
    """What ``convert`` did: the layers replaced, the layers kept (and why), and the method used."""

    method: str
    replaced: List[ReplacedLayer] = field(default_factory=list)
    kept: List[KeptLayer] = field(default_factory=list)
    # the activation policy's changes (binarize.activation_policy)
    activations: List[ReplacedActivation] = field(default_factory=list)
    functional_activations: List[FunctionalActivation] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    # the options convert ran with, JSON-ready (``binarize.save`` records them for models outside
    # the registry, and loading into a model converted differently names the difference)
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_replaced(self) -> int:
        return len(self.replaced)

    @property
    def num_kept(self) -> int:
        return len(self.kept)

    def to_dict(self) -> Dict[str, object]:
        """Plain-data form (JSON serialisable)."""
        return {
            "method": self.method,
            "replaced": [
                {"name": r.name, "old_type": r.old_type, "new_type": r.new_type, "aliases": list(r.aliases)}
                for r in self.replaced
            ],
            "kept": [
                {"name": k.name, "type": k.layer_type, "reason": k.reason, "aliases": list(k.aliases)}
                for k in self.kept
            ],
            "activations": [
                {"name": a.name, "old_type": a.old_type, "new_type": a.new_type, "reason": a.reason,
                 "aliases": list(a.aliases)}
                for a in self.activations
            ],
            "functional_activations": [
                {"site": f.site, "function": f.function, "feeds": list(f.feeds)} for f in self.functional_activations
            ],
            "notes": list(self.notes),
            "options": dict(self.options),
        }

    def __str__(self) -> str:
        rows = [(r.name or "<root>", r.old_type, f"-> {r.new_type}") for r in self.replaced]
        rows += [(k.name or "<root>", k.layer_type, f"kept: {k.reason}") for k in self.kept]
        rows += [(a.name or "<root>", a.old_type, f"-> {a.new_type} ({a.reason})") for a in self.activations]
        rows += [(f.site, f.function, f"NOT replaced (functional), feeds {', '.join(f.feeds)}")
                 for f in self.functional_activations]
        header = ("layer", "type", "action")
        widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(3)]
        lines = [
            f"binarize.convert (method={self.method!r}): {self.num_replaced} replaced, {self.num_kept} kept",
            "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _is_binary(module: nn.Module) -> bool:
    """A layer is binary when it declares its precision (``input_bits``/``weight_bits``)."""
    return hasattr(module, "input_bits") and hasattr(module, "weight_bits")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _base_kind(module: nn.Module) -> Optional[type]:
    """``nn.Conv2d`` or ``nn.Linear`` when the module is one of them (or a subclass), else None."""
    for base in (nn.Conv2d, nn.Linear):
        if isinstance(module, base):
            return base
    return None


@functools.cache
def _functional_reads(cls: type) -> Tuple[str, ...]:
    """Names ``n`` for which ``cls``'s forward (or a method it calls on ``self``, two levels deep)
    reads ``self.n.weight`` / ``self.n.bias`` as a tensor, from the source; () when unreadable."""
    found: List[str] = []
    pending, seen = [("forward", 0)], set()
    while pending:
        name, depth = pending.pop()
        function = getattr(cls, name, None)
        if name in seen or not callable(function) or getattr(nn.Module, name, None) is function:
            continue
        seen.add(name)
        try:
            source = textwrap.dedent(inspect.getsource(function))
        except (OSError, TypeError):
            continue
        found += _FUNCTIONAL_READ.findall(source)
        if depth < 2:
            pending += [(called, depth + 1) for called in _METHOD_CALL.findall(source)]
    return tuple(dict.fromkeys(found))


def _functional_parents(model: nn.Module, example_inputs: Any = None) -> Dict[int, str]:
    """Layers whose parent reads their weights directly instead of calling them, mapped to the reason.

    Found three ways: a registry of known parents (``_KNOWN_FUNCTIONAL``); the parent's forward
    source reading ``self.<child>.weight`` (or ``.bias``); and, with ``example_inputs``, a layer
    never called during that forward although its parent was.

    ``nn.TransformerEncoderLayer`` reads ``linear1``/``linear2``'s weights only on its inference
    fast path (eval mode without gradients), which would bypass binary layers: that fast path is
    turned off on the (copied) model instead (``activation_relu_or_gelu = False``; outputs are the
    same, only the fused kernel is skipped), and the two layers are converted."""
    owners: Dict[int, str] = {}
    for _, module in model.named_modules():
        children = dict(module.named_children())
        names = set(_KNOWN_FUNCTIONAL.get(_qualname(type(module)), ())) | set(_functional_reads(type(module)))
        if isinstance(module, nn.TransformerEncoderLayer):
            module.activation_relu_or_gelu = False
            names -= {"linear1", "linear2"}
        for child_name in names:
            child = children.get(child_name)
            if child is not None and _base_kind(child) is not None:
                owners.setdefault(id(child), REASON_FUNCTIONAL.format(parent=type(module).__name__))
    if example_inputs is not None:
        for child, parent in _uncalled_layers(model, example_inputs):
            owners.setdefault(id(child), REASON_UNCALLED.format(parent=type(parent).__name__))
    return owners


def _uncalled_layers(model: nn.Module, example_inputs: Any) -> List[Tuple[nn.Module, nn.Module]]:
    """(layer, parent) for conv/linear layers not called by a forward on ``example_inputs`` whose
    parent was called (eval mode, no gradients, training flags restored)."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    called: set = set()
    handles = [m.register_forward_pre_hook(lambda module, args: called.add(id(module))) for m in model.modules()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return [(child, parent) for parent in model.modules() if id(parent) in called
            for child in parent.children() if _base_kind(child) is not None and id(child) not in called]


def _parametrization(module: nn.Module) -> Optional[str]:
    """How the layer's weight is computed (a parametrization or a weight/spectral-norm hook), or None."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        kinds = sorted({type(p).__name__ for plist in module.parametrizations.values() for p in plist})
        return f"torch.nn.utils.parametrize ({', '.join(kinds)})"
    for hook in module._forward_pre_hooks.values():
        if type(hook).__name__ in ("WeightNorm", "SpectralNorm"):
            return f"a {type(hook).__name__} hook (torch.nn.utils.{type(hook).__name__.lower()[:-4]}_norm)"
    return None


def _skip_matcher(skip: SkipSpec) -> Callable[[Sequence[str], nn.Module], bool]:
    """Normalise ``skip`` into ``matcher(names, module)``; a shared module matches through any name."""
    if skip is None:
        return lambda names, module: False
    if callable(skip):
        return lambda names, module: any(bool(skip(name, module)) for name in names)
    patterns = [skip] if isinstance(skip, str) else list(skip)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"skip must be a glob, a list of globs or a predicate; got {pattern!r}")
    return lambda names, module: any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _report_unconsidered(report: ConversionReport, name: str, module: nn.Module, all_names: Sequence[str]) -> None:
    """List a layer type ``convert`` never binarizes (Conv1d, Conv3d, transposed convs, RNNs,
    MultiheadAttention's packed input projection) as kept, with the reason."""
    aliases = tuple(n for n in all_names if n != name)
    if isinstance(module, _NO_COUNTERPART):
        kind = next(cls.__name__ for cls in _NO_COUNTERPART if isinstance(module, cls))
        report.kept.append(KeptLayer(name, type(module).__name__, REASON_NO_COUNTERPART.format(kind=kind), aliases))
    elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        report.kept.append(KeptLayer(name, type(module).__name__, REASON_IN_PROJ, aliases))


def _describe_callable(value: Any) -> str:
    return f"<callable {getattr(value, '__qualname__', type(value).__name__)}>"


def _options_record(method_name: str, *, keep_first: bool, keep_last: bool, keep_depthwise: bool,
                    skip: SkipSpec, activation: Any) -> Dict[str, Any]:
    """The convert options as plain data (a predicate or factory is named, not stored)."""
    if skip is None or callable(skip):
        skip_record: Any = None if skip is None else _describe_callable(skip)
    else:
        skip_record = [skip] if isinstance(skip, str) else [str(p) for p in skip]
    if activation is None or isinstance(activation, str):
        activation_record: Any = "keep" if activation is None else activation.lower()
    else:
        activation_record = _describe_callable(activation)
    return {"method": method_name, "keep_first": bool(keep_first), "keep_last": bool(keep_last),
            "keep_depthwise": bool(keep_depthwise), "skip": skip_record, "activation": activation_record}


def _warn_unmatched_skip(skip: SkipSpec, layer_names: Sequence[str]) -> None:
    """Warn for each skip glob that matches none of the model's conv/linear layer names."""
    if skip is None or callable(skip):
        return
    for pattern in [skip] if isinstance(skip, str) else list(skip):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layer_names):
            warnings.warn(f"binarize.convert: skip pattern {pattern!r} matches no Conv2d/Linear layer "
                          f"(patterns are fnmatch globs on full module names, e.g. 'layer1.*')", stacklevel=3)


def _first_and_last(modules: List[Tuple[str, nn.Module]]) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """The first conv (first linear if no conv) and the last conv/linear, in registration order."""
    layers = [m for _, m in modules if _base_kind(m) is not None]
    if not layers:
        return None, None
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    first = convs[0] if convs else layers[0]
    return first, layers[-1]


def _call_order(model: nn.Module, example_inputs: Any) -> List[Tuple[str, nn.Module]]:
    """Conv/linear layers in the order a forward on ``example_inputs`` first calls them."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    names = {id(m): n for n, m in model.named_modules()}
    order: List[Tuple[str, nn.Module]] = []
    seen: set = set()

    def record(module: nn.Module, args: Any) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            order.append((names[id(module)], module))

    handles = [m.register_forward_pre_hook(record) for _, m in model.named_modules() if _base_kind(m)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - report any forward failure in one line
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"convert: the forward on example_inputs failed: {first_line}") from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return order


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels and module.in_channels > 1


def _keep_reason(
    module: nn.Module,
    names: Sequence[str],
    *,
    first: Optional[nn.Module],
    last: Optional[nn.Module],
    functional: Dict[int, str],
    skip: Callable[[Sequence[str], nn.Module], bool],
    keep_first: bool,
    keep_last: bool,
    keep_depthwise: bool,
) -> Optional[str]:
    """Why ``module`` must stay full precision, or None when it should be binarized."""
    base = _base_kind(module)
    if _is_binary(module):
        return REASON_ALREADY_BINARY
    if id(module) in functional:
        return functional[id(module)]
    how = _parametrization(module)
    if how is not None:
        return REASON_PARAMETRIZED.format(how=how)
    cls = type(module)
    if cls.forward is not base.forward and _qualname(cls) not in _EQUIVALENT_FORWARD:
        return REASON_CUSTOM_FORWARD.format(cls=cls.__name__)
    if skip(names, module):
        return REASON_SKIP
    if keep_first and module is first:
        return REASON_FIRST
    if keep_last and module is last:
        return REASON_LAST
    if keep_depthwise and _is_depthwise(module):
        return REASON_DEPTHWISE
    return None


def _check_method(method: object) -> str:
    """Validate the method and return its display name."""
    from binarize.ops import list_methods

    if isinstance(method, str):
        available = list(list_methods())
        if method.lower() not in available:  # names are case-insensitive ("ReActNet")
            raise ValueError(f"unknown binarization method {method!r}; available methods: {', '.join(available)}")
        return method.lower()
    name = getattr(method, "name", None)
    if not isinstance(name, str):
        raise ValueError(f"method must be a method name or a binarize.ops.Method; got {method!r}")
    return name


def _prepare(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if inplace:
        return model
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - any deepcopy failure gets the same advice
        raise ValueError(f"could not deep-copy {type(model).__name__} ({exc}); pass inplace=True") from exc


def convert(
    model: nn.Module,
    method: object = "reactnet",
    *,
    keep_first: bool = True,
    keep_last: bool = True,
    keep_depthwise: bool = True,
    skip: SkipSpec = None,
    inplace: bool = False,
    return_report: bool = False,
    example_inputs: Any = None,
    activation: ActivationSpec = "auto",
) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Return a binarized copy of ``model`` (or ``model`` itself when ``inplace``).

    Every eligible ``nn.Conv2d`` / ``nn.Linear`` becomes ``BinaryConv2d`` / ``BinaryLinear``
    built by ``from_float(layer, method)``. The :class:`ConversionReport` is attached as
    ``model.binarize_report``, and also returned when ``return_report`` is true. A module object
    shared by several parents is converted once and stays shared. The first and last layers are
    found in registration order, or in call order when ``example_inputs`` (a tensor or a tuple of
    positional inputs) is given: the model then runs once on them, in eval mode without gradients.

    ``activation`` is the activation policy (``binarize.activation_policy``): every ReLU/ReLU6
    module whose output reaches a binary layer's input (a non-negative input binarizes to all +1)
    is replaced, by ``nn.Identity`` for ``"auto"`` (or ``"identity"``, ``"prelu"``, ``"hardtanh"``,
    or a factory ``f(original) -> module``); ``"keep"`` leaves activations alone. Every change is
    listed in ``report.activations``, and ``unconvert`` puts the originals back.
    """
    from binarize.nn import BinaryConv2d, BinaryLinear

    method_name = _check_method(method)
    check_activation(activation)
    model = _prepare(model, inplace)
    names = _all_names(model)
    modules = list(model.named_modules())  # registration order, shared modules once
    if example_inputs is None:
        first, last = _first_and_last(modules)
    else:
        first, last = _first_and_last(_call_order(model, example_inputs))
    functional = _functional_parents(model, example_inputs)
    matcher = _skip_matcher(skip)
    report = ConversionReport(method=method_name, options=_options_record(
        method_name, keep_first=keep_first, keep_last=keep_last, keep_depthwise=keep_depthwise, skip=skip,
        activation=activation))
    replacements: Dict[int, nn.Module] = {}
    for name, module in modules:
        base = _base_kind(module)
        if base is None:
            _report_unconsidered(report, name, module, names[id(module)])
            continue
        all_names = names[id(module)]
        aliases = tuple(n for n in all_names if n != name)
        reason = _keep_reason(
            module, all_names, first=first, last=last, functional=functional, skip=matcher,
            keep_first=keep_first, keep_last=keep_last, keep_depthwise=keep_depthwise,
        )
        if reason is not None:
            report.kept.append(KeptLayer(name, type(module).__name__, reason, aliases))
            continue
        binary_cls = BinaryConv2d if base is nn.Conv2d else BinaryLinear
        new = binary_cls.from_float(module, method=method_name if isinstance(method, str) else method)
        new.train(module.training)
        replacements[id(module)] = new
        report.replaced.append(ReplacedLayer(name, type(module).__name__, type(new).__name__, aliases))
    _warn_unmatched_skip(skip, [n for name, m in modules if _base_kind(m) is not None for n in names[id(m)]])
    if not replacements:
        warnings.warn(
            f"binarize.convert: nothing to convert in {type(model).__name__} "
            f"({len(report.kept)} layer(s) kept full precision)",
            stacklevel=2,
        )
    model = _replace_modules(model, replacements)
    report.activations, report.functional_activations, note, keep = apply_policy(model, activation)
    if note:
        report.notes.append(note)
    if keep:
        model = _keep_after_policy(model, report, keep)
    model.binarize_report = report
    return (model, report) if return_report else model


def _keep_after_policy(model: nn.Module, report: ConversionReport, keep: Dict[str, str]) -> nn.Module:
    """Turn the binary layers the activation policy found sign-constant back into float layers,
    moving them from ``report.replaced`` to ``report.kept`` with the policy's reason."""
    modules = dict(model.named_modules())
    restored: Dict[int, nn.Module] = {}
    for name, reason in keep.items():
        module = modules.get(name)
        if module is None or id(module) in restored:
            continue
        restored[id(module)] = module.to_float()
        restored[id(module)].train(module.training)
        entry = next((r for r in report.replaced if name == r.name or name in r.aliases), None)
        if entry is not None:
            report.replaced.remove(entry)
            report.kept.append(KeptLayer(entry.name, entry.old_type, reason, entry.aliases))
    return _replace_modules(model, restored)


def _binary_layers(model: nn.Module) -> Iterable[nn.Module]:
    return [m for m in model.modules() if _is_binary(m) and callable(getattr(m, "to_float", None))]


def unconvert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return a float model: every binary layer replaced by its ``to_float()`` plain layer.

    The latent float weights are kept, so ``unconvert(convert(m))`` has ``m``'s weights. Extras of
    a binary layer that have no float counterpart (e.g. ReActNet's RPReLU) are dropped.
    """
    model = _prepare(model, inplace)
    replacements = {id(m): m.to_float() for m in _binary_layers(model)}
    for module in model.modules():
        if id(module) in replacements:
            replacements[id(module)].train(module.training)
    model = _replace_modules(model, replacements)
    model = restore_activations(model)
    if "binarize_report" in model.__dict__:
        del model.__dict__["binarize_report"]
    return model


make_module_callable(__name__, "convert")
