"""binarize.engine: run binary layers as bit-packed XNOR-popcount kernels on the CPU.

``deploy(model)`` returns an inference-only copy of a model whose ``BinaryConv2d`` /
``BinaryLinear`` layers run on the packed engine (weights packed once, BatchNorm and other
per-channel neighbours fused, masked branches computed sparsely).  Structure, module names and
state_dict keys are unchanged, so the deployed model works wherever the float model does.

The kernels live in a small C library built at install time (``binarize/engine/csrc``); without
it a pure-PyTorch fallback gives the same numbers, slower, after a one-line warning.
"""
from __future__ import annotations

import copy
from typing import Optional

from torch import nn

from binarize.engine._lib import available, kernel_info, set_kernel
from binarize.engine.functional import Epilogue, PackedWeights, binary_conv2d, binary_linear, pack_weights
from binarize.engine.fusion import DeployReport, deploy_modules
from binarize.engine.layers import PackedConv2d, PackedLinear, UnsupportedLayer, refuse_tracing
from binarize.engine.memory import keep_freed_memory

__all__ = [
    "deploy",
    "deploy_report",
    "available",
    "kernel_info",
    "set_kernel",
    "binary_conv2d",
    "binary_linear",
    "pack_weights",
    "Epilogue",
    "PackedWeights",
    "PackedConv2d",
    "PackedLinear",
    "DeployReport",
    "UnsupportedLayer",
    "keep_freed_memory",
]

_REPORT_ATTR = "_binarize_engine_report"


def deploy(
    model: nn.Module,
    *,
    inplace: bool = False,
    num_threads: Optional[int] = None,
    fuse: bool = True,
    sparse: bool = True,
    backend: str = "auto",
    keep_memory: bool = True,
) -> nn.Module:
    """An inference-only model whose binary layers run on the packed engine.

    ``inplace=False`` (default) deploys a deep copy and leaves ``model`` untouched.
    ``num_threads``: kernel threads (None follows ``torch.get_num_threads()`` at each call).
    ``fuse``: fold neighbouring shifts / BatchNorm / PReLU into the kernels; ``sparse``: compute
    masked branches only inside their masks.  ``backend``: "auto" (C kernels when built), "c"
    or "torch" (the pure-PyTorch fallback).  Layers the engine cannot reproduce exactly stay
    simulated; ``deploy_report(model)`` lists them with the reason.  Weights are packed now:
    load checkpoints before deploying (``load_state_dict`` on the deployed model, or on any of its
    modules, raises instead of leaving the packed copies stale).
    ``keep_memory``: call :func:`keep_freed_memory` (process-wide glibc setting: freed maps stay
    in the process for the next frame instead of being returned and page-faulted back in).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"deploy expects a torch.nn.Module, got {type(model).__name__}")
    if backend not in ("auto", "c", "torch"):
        raise ValueError(f"backend must be 'auto', 'c' or 'torch', got {backend!r}")
    if backend == "c" and not available():
        raise ValueError("backend='c' requested but the C kernels are not built (pip install -e .)")
    if num_threads is not None and int(num_threads) < 1:
        raise ValueError(f"num_threads must be a positive integer, got {num_threads}")
    if deploy_report(model) is not None:
        raise ValueError("model is already deployed (deploy the original model, after loading its weights)")
    if backend == "auto":
        available()  # warns once, here, when the fallback will be used
    if keep_memory:
        keep_freed_memory()
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    target.requires_grad_(False)
    report = deploy_modules(target, fuse=fuse, sparse=sparse, num_threads=num_threads, backend=backend)
    target.__dict__[_REPORT_ATTR] = report
    target.register_forward_pre_hook(_refuse_tracing_hook)
    for module in target.modules():
        module.register_load_state_dict_pre_hook(_refuse_load)
        try:
            module.train = _InferenceOnly(module)
            module.__prepare_scriptable__ = _RefuseScript()  # torch.jit.script calls it first
        except (AttributeError, RuntimeError, TypeError):  # e.g. a ScriptModule inside the model
            pass
    return target


class _RefuseScript:
    """``__prepare_scriptable__`` of a deployed module: ``torch.jit.script`` gets a clear error."""

    def __call__(self) -> nn.Module:
        raise RuntimeError("a deployed model cannot be scripted (torch.jit.script): its packed kernels are "
                           "Python callables around C code; script the simulated model (before binarize.deploy)")


class _InferenceOnly:
    """``train`` of a deployed module: ``train(False)`` / ``eval()`` work, ``train(True)`` raises
    (packed weights, fused BatchNorm and pass-through neighbours compute the eval-mode model only)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        if mode:
            raise RuntimeError("a deployed model is inference-only (packed weights, BatchNorm folded into the "
                               "kernels): train the original model, then call binarize.deploy on it")
        return nn.Module.train(self.module, False)


def _refuse_tracing_hook(module: nn.Module, args) -> None:
    refuse_tracing()


def _refuse_load(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """A deployed model's kernels hold packed copies of the weights that loading would not update."""
    raise RuntimeError("load_state_dict on a deployed model would leave its packed weights stale: load the "
                       "checkpoint into the original model, then call binarize.deploy on it")


def deploy_report(model: nn.Module) -> Optional[DeployReport]:
    """The ``DeployReport`` of a deployed model (None if ``model`` was not deployed)."""
    return model.__dict__.get(_REPORT_ATTR)
