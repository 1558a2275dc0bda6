"""Model registry: registration, listing with patterns, creation, recorded config, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from binarize.models import create_model, is_model, list_models, register_model
from binarize.models import registry as registry_module

ZOO = ["bimatting", "bimobilenet", "rvm_mobilenetv3", "rvm_bnn", "rvm_xnor", "rvm_dorefa", "rvm_bireal",
       "rvm_reactnet", "rvm_irnet", "rvm_recu"]


@pytest.fixture
def scratch_registry(monkeypatch):
    """Register test models in a copy of the registry so they do not leak into other tests."""
    monkeypatch.setattr(registry_module, "_MODELS", dict(registry_module._MODELS))


def test_zoo_is_registered_and_sorted():
    names = list_models()
    assert set(ZOO) <= set(names)
    assert names == sorted(names)
    assert all(is_model(name) for name in ZOO) and not is_model("nope")


def test_pattern_filters_with_fnmatch():
    assert list_models("rvm_*") == sorted(n for n in ZOO if n.startswith("rvm_"))
    assert list_models("bi*") == ["bimatting", "bimobilenet"]
    assert list_models("zzz*") == []


def test_unknown_name_lists_available_models():
    with pytest.raises(ValueError, match=r"unknown model 'rvm_foo'.*rvm_mobilenetv3"):
        create_model("rvm_foo")


def test_register_by_function_name_and_explicit_name(scratch_registry):
    @register_model
    def tiny_linear(features: int = 2) -> nn.Module:
        return nn.Linear(features, 1)

    @register_model("named_tiny")
    def _factory(**kwargs) -> nn.Module:
        return nn.Identity()

    assert "tiny_linear" in list_models() and "named_tiny" in list_models()
    model = create_model("tiny_linear", features=5)
    assert isinstance(model, nn.Linear) and model.in_features == 5
    assert model.model_name == "tiny_linear" and model.model_kwargs == {"features": 5}
    assert callable(model.save_pretrained)
    assert isinstance(create_model("named_tiny"), nn.Identity)


def test_registering_a_different_factory_twice_is_an_error(scratch_registry):
    @register_model
    def dup() -> nn.Module:
        return nn.Identity()

    register_model(dup)  # the same factory again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_model("dup")(lambda: nn.Identity())


def test_factory_must_return_a_module(scratch_registry):
    register_model("not_a_module")(lambda: 3)
    with pytest.raises(ValueError, match="not an nn.Module"):
        create_model("not_a_module")


def test_kwargs_reach_the_factory():
    model = create_model("rvm_mobilenetv3", aspp_channels=64)
    assert model.aspp.aspp1[0].out_channels == 64
    assert model.model_kwargs == {"aspp_channels": 64}
    assert sum(p.numel() for p in create_model("rvm_mobilenetv3").parameters()) == 3_748_633  # the count the issue reports for the official RVM


def test_baselines_keep_the_documented_layers_full_precision():
    from binarize.nn import BinaryConv2d

    model = create_model("rvm_xnor")
    binary = {name for name, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    for kept in ("backbone.body.conv_stem", "project_mat.conv", "project_seg.conv", "refiner.box_filter",
                 "refiner.conv.6"):
        assert kept not in binary
    # the paper binarizes the depthwise convs too (its RVM-BNN storage, 0.57 MB, needs them binary)
    for converted in ("decoder.decode4.gru.ih.0", "aspp.aspp1.0", "backbone.body.blocks.6.0.conv",
                      "refiner.conv.0", "backbone.body.blocks.5.0.conv_dw"):
        assert converted in binary
    # keep_depthwise=True keeps every depthwise conv 32-bit and nothing else
    kept_dw = create_model("rvm_xnor", keep_depthwise=True)
    binary_kept = {name for name, m in kept_dw.named_modules() if isinstance(m, BinaryConv2d)}
    depthwise = {name for name, m in model.named_modules()  # but the refiner's fixed box filter
                 if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and name != "refiner.box_filter"}
    assert "backbone.body.blocks.5.0.conv_dw" in depthwise and depthwise <= binary
    assert binary - binary_kept == depthwise
    assert kept_dw.model_kwargs == {"keep_depthwise": True}


def test_baseline_storage_matches_the_paper_with_binary_depthwise_convs():
    """BiMatting's Figure 1 gives RVM-BNN 0.57 MB; binarizing the depthwise convs too comes near it
    (1 bit per binary weight, 4 bytes per float parameter), keeping them 32-bit does not."""
    from binarize import profile

    x = torch.rand(1, 3, 72, 128)
    binary_dw = profile(create_model("rvm_bnn"), (x,))
    kept_dw = profile(create_model("rvm_bnn", keep_depthwise=True), (x,))
    assert binary_dw.storage_bytes == binary_dw.binary_params / 8 + 4 * binary_dw.fp_params
    assert 0.55e6 < binary_dw.storage_bytes < 0.62e6
    assert kept_dw.storage_bytes > 0.9e6


BASELINES = [n for n in ZOO if n.startswith("rvm_") and n != "rvm_mobilenetv3"]


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_runs_forward_and_backward(name):
    model = create_model(name).train()
    src = torch.rand(1, 1, 3, 64, 64)
    fgr, pha, *rec = model(src)
    assert fgr.shape == src.shape and pha.shape == (1, 1, 1, 64, 64) and len(rec) == 4
    (fgr.mean() + pha.mean() + sum(r.mean() for r in rec)).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    stem = model.backbone.body.conv_stem.weight.grad
    assert stem is not None and torch.isfinite(stem).all()
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
