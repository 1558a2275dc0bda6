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
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from binarize._callable import make_module_callable

SkipSpec = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

__all__ = ["ConversionReport", "KeptLayer", "ReplacedLayer", "convert", "unconvert"]

# Reasons a layer stays full precision (stable strings: tests and users may match on them).
REASON_FIRST = "first layer (keep_first)"
REASON_LAST = "last layer (keep_last)"
REASON_DEPTHWISE = "depthwise convolution (keep_depthwise)"
REASON_SKIP = "matched skip"
REASON_ALREADY_BINARY = "already binary"
REASON_FUNCTIONAL = "weights used functionally by its parent {parent} (its forward is never called)"
REASON_CUSTOM_FORWARD = "subclass {cls} overrides forward; replacing it would change its behaviour"

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
        }

    def __str__(self) -> str:
        rows = [(r.name or "<root>", r.old_type, f"-> {r.new_type}") for r in self.replaced]
        rows += [(k.name or "<root>", k.layer_type, f"kept: {k.reason}") for k in self.kept]
        header = ("layer", "type", "action")
        widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(3)]
        lines = [
            f"binarize.convert (method={self.method!r}): {self.num_replaced} replaced, {self.num_kept} kept",
            "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
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


def _all_names(model: nn.Module) -> Dict[int, List[str]]:
    """Every name under which each module object appears (shared modules have several)."""
    names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def _functional_parents(model: nn.Module) -> Dict[int, str]:
    """Layers whose parent reads their weights directly instead of calling them."""
    owners: Dict[int, str] = {}
    for _, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            owners[id(module.out_proj)] = type(module).__name__
    return owners


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
        return REASON_FUNCTIONAL.format(parent=functional[id(module)])
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
        if method not in available:
            raise ValueError(f"unknown binarization method {method!r}; available methods: {', '.join(available)}")
        return method
    name = getattr(method, "name", None)
    if not isinstance(name, str):
        raise ValueError(f"method must be a method name or a binarize.ops.Method; got {method!r}")
    return name


def _replace_modules(model: nn.Module, replacements: Dict[int, nn.Module]) -> nn.Module:
    """Swap module objects in every parent slot (shared modules stay shared); returns the new root."""
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[key] = replacements[id(child)]
    return replacements.get(id(model), model)


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
) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Return a binarized copy of ``model`` (or ``model`` itself when ``inplace``).

    Every eligible ``nn.Conv2d`` / ``nn.Linear`` becomes ``BinaryConv2d`` / ``BinaryLinear``
    built by ``from_float(layer, method)``. The :class:`ConversionReport` is attached as
    ``model.binarize_report``, and also returned when ``return_report`` is true. A module object
    shared by several parents is converted once and stays shared. The first and last layers are
    found in registration order, or in call order when ``example_inputs`` (a tensor or a tuple of
    positional inputs) is given: the model then runs once on them, in eval mode without gradients.
    """
    from binarize.nn import BinaryConv2d, BinaryLinear

    method_name = _check_method(method)
    model = _prepare(model, inplace)
    names = _all_names(model)
    modules = list(model.named_modules())  # registration order, shared modules once
    if example_inputs is None:
        first, last = _first_and_last(modules)
    else:
        first, last = _first_and_last(_call_order(model, example_inputs))
    functional = _functional_parents(model)
    matcher = _skip_matcher(skip)
    report = ConversionReport(method=method_name)
    replacements: Dict[int, nn.Module] = {}
    for name, module in modules:
        base = _base_kind(module)
        if base is None:
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
        new = binary_cls.from_float(module, method=method)
        new.train(module.training)
        replacements[id(module)] = new
        report.replaced.append(ReplacedLayer(name, type(module).__name__, type(new).__name__, aliases))
    if not replacements:
        warnings.warn(
            f"binarize.convert: nothing to convert in {type(model).__name__} "
            f"({len(report.kept)} layer(s) kept full precision)",
            stacklevel=2,
        )
    model = _replace_modules(model, replacements)
    model.binarize_report = report
    return (model, report) if return_report else model


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
    if "binarize_report" in model.__dict__:
        del model.__dict__["binarize_report"]
    return model


make_module_callable(__name__, "convert")
