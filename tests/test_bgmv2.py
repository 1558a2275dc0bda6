"""BGMv2 (bgmv2_*): parity with the official outputs in every refine mode, the key map, the base
network, the sparse refiner's equivalence with the dense one, and the call contract.

``fixtures/bgmv2_parity_seed1.npz`` is ``bgmv2_parity_seed1.npz`` from the shared reference
(PeterL1n/BackgroundMattingV2 @ a8e82df, CPU float32, ``make_state_dict(manifest, seed=1)`` loaded
strictly, eval) with three things taken out to keep it small: ``src`` and ``bgr`` (two
``torch.rand(2, 3, 128, 160)`` draws from ``torch.Generator().manual_seed(1)``, rebuilt here),
and the sampling/thresholding ``pha_sm``, ``fgr_sm``, ``err_sm`` (identical to the full-mode ones;
checked when the fixture was made). Keys ending ``_s2`` / ``_s8`` hold ``x[..., ::2, ::2]`` /
``x[..., ::8, ::8]``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from official_weights import make_state_dict

from binarize.models import create_model, list_models
from binarize.models.bgmv2 import MattingBase, MattingRefine
from binarize.models.checkpoint import check_state_dict, load_official

BACKBONES = ["mobilenetv2", "resnet50"]
MODES = ["full", "sampling", "thresholding"]
REFINE_OUTPUTS = ["pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm"]
BASE_OUTPUTS = ["pha", "fgr", "err", "hid"]
STRIDES = {"fgr": 2, "err": 2, "hid": 8}


def _manifest(backbone):
    from conftest import FIXTURES

    return json.loads((FIXTURES / f"bgmv2_{backbone}_state_dict.json").read_text())


@pytest.fixture(scope="module")
def reference():
    from conftest import FIXTURES

    data = dict(np.load(FIXTURES / "bgmv2_parity_seed1.npz"))
    g = torch.Generator().manual_seed(1)
    data["src"] = torch.rand(2, 3, 128, 160, generator=g)
    data["bgr"] = torch.rand(2, 3, 128, 160, generator=g)
    return data


def _expected(data, backbone, mode, name):
    """(key, array) of the official output ``name``; sm outputs are stored once (full mode)."""
    if mode != "base" and name in ("pha_sm", "fgr_sm", "err_sm"):
        mode = "full"
    prefix = f"{backbone}_{mode}_{name}"
    for key, stride in ((prefix, 1), (f"{prefix}_s2", 2), (f"{prefix}_s8", 8)):
        if key in data:
            return key, stride, torch.from_numpy(data[key])
    raise KeyError(prefix)


def _official(backbone, **kwargs):
    model = create_model(f"bgmv2_{backbone}", **kwargs).eval()
    state = make_state_dict(_manifest(backbone), seed=1)
    if kwargs.get("refine") is False:
        state = {k: v for k, v in state.items() if not k.startswith("refiner.")}
    load_official(model, state)
    return model


def _assert_close(outputs, names, data, backbone, mode):
    for name, value in zip(names, outputs):
        key, stride, expected = _expected(data, backbone, mode, name)
        value = value[..., ::stride, ::stride]
        assert value.shape == expected.shape, key
        assert (value - expected).abs().max().item() <= 1e-4, key


@pytest.mark.parametrize("backbone", BACKBONES)
def test_parity_with_official_outputs_in_every_mode(backbone, reference):
    data = reference
    model = _official(backbone, backbone_scale=float(data["backbone_scale"]),
                      refine_sample_pixels=int(data["refine_sample_pixels"]),
                      refine_threshold=float(data["refine_threshold"]))
    for mode in MODES:
        model.refiner.mode = mode
        with torch.no_grad():
            outputs = model(data["src"], data["bgr"])
        assert len(outputs) == 6
        _assert_close(outputs, REFINE_OUTPUTS, data, backbone, mode)
        assert model.refiner.mask_density == pytest.approx(float(outputs[5].mean()))
    # the base network alone (official MattingBase at full resolution), two ways
    base = _official(backbone, refine=False)
    assert isinstance(base, MattingBase) and not isinstance(base, MattingRefine)
    with torch.no_grad():
        _assert_close(base(data["src"], data["bgr"]), BASE_OUTPUTS, data, backbone, "base")
        _assert_close(model.base(data["src"], data["bgr"]), BASE_OUTPUTS, data, backbone, "base")


def test_selection_counts_match_the_reference(reference):
    # thresholding selects 450/439 (mobilenetv2) and 434/436 (resnet50) of 1280 cells; sampling 125
    for backbone, counts in (("mobilenetv2", [450, 439]), ("resnet50", [434, 436])):
        ref = reference[f"{backbone}_thresholding_ref_sm"]
        assert ref.reshape(2, -1).sum(1).tolist() == counts
        assert reference[f"{backbone}_sampling_ref_sm"].reshape(2, -1).sum(1).tolist() == [125, 125]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_key_map_consumes_every_official_key(backbone):
    model = create_model(f"bgmv2_{backbone}")
    official = make_state_dict(_manifest(backbone), seed=3)
    mapped = model.map_official_state_dict(official)
    assert len(mapped) == len(official)
    assert set(mapped) == set(model.state_dict())
    check_state_dict(model, mapped, "seed 3")
    pairs = {"aspp.project.0.weight": "aspp.project.0.weight", "refiner.conv4.bias": "refiner.conv4.bias"}
    if backbone == "mobilenetv2":
        pairs.update({
            "backbone.features.0.0.weight": "backbone.body.conv_stem.weight",
            "backbone.features.1.conv.1.weight": "backbone.body.blocks.0.0.conv_pw.weight",
            "backbone.features.14.conv.1.0.weight": "backbone.body.blocks.5.0.conv_dw.weight",
            "backbone.features.17.conv.3.running_var": "backbone.body.blocks.6.0.bn3.running_var",
        })
    else:
        pairs.update({"backbone.layer4.2.conv2.weight": "backbone.body.layer4.2.conv2.weight"})
    for theirs, ours in pairs.items():
        assert torch.equal(mapped[ours], official[theirs])


def test_official_checkpoint_file_loads_through_create_model(tmp_path):
    official = make_state_dict(_manifest("mobilenetv2"), seed=5)
    torch.save(official, tmp_path / "pytorch_mobilenetv2.pth")
    model = create_model("bgmv2_mobilenetv2", checkpoint=tmp_path / "pytorch_mobilenetv2.pth")
    assert torch.equal(model.state_dict()["backbone.body.conv_stem.weight"], official["backbone.features.0.0.weight"])
    torch.save({k: v for k, v in official.items() if not k.startswith("refiner.")}, tmp_path / "base.pth")
    base = create_model("bgmv2_mobilenetv2", refine=False, checkpoint=tmp_path / "base.pth")
    assert torch.equal(base.state_dict()["decoder.conv4.bias"], official["decoder.conv4.bias"])
    with pytest.raises(ValueError, match="20 unexpected keys"):
        create_model("bgmv2_mobilenetv2", refine=False, checkpoint=tmp_path / "pytorch_mobilenetv2.pth")
    with pytest.raises(ValueError, match="missing keys"):
        create_model("bgmv2_resnet50", checkpoint=tmp_path / "pytorch_mobilenetv2.pth")


def test_backbone_matches_torchvision_mobilenetv2():
    tv = pytest.importorskip("torchvision.models")
    features = tv.MobileNetV2().features[:-1].eval()
    features[0][0] = torch.nn.Conv2d(6, 32, 3, 2, 1, bias=False)
    features[14].conv[1][0].stride = (1, 1)
    for block in features[15:]:
        block.conv[1][0].dilation, block.conv[1][0].padding = (2, 2), (2, 2)
    official = make_state_dict(_manifest("mobilenetv2"), seed=7)
    features.load_state_dict({k[len("backbone.features."):]: v for k, v in official.items()
                              if k.startswith("backbone.features.")})
    model = _official("mobilenetv2")
    load_official(model, official)
    x = torch.rand(1, 6, 52, 76)
    with torch.no_grad():
        ours, h, taps = model.backbone(x), x, []
        for index, layer in enumerate(features):
            h = layer(h)
            if index in (1, 3, 6, 17):
                taps.append(h)
    for a, b in zip(ours, taps):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kernel_size", [3, 1])
def test_sparse_refiner_equals_dense_refiner_at_selected_cells(kernel_size):
    model = create_model("bgmv2_mobilenetv2", refine_mode="full", refine_kernel_size=kernel_size).eval()
    src, bgr = torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        full = model(src, bgr)
        model.refiner.mode, model.refiner.threshold = "thresholding", 0.0
        model.refiner.select = lambda err: (torch.rand_like(err) < 0.3).float()  # any selection
        sparse = model(src, bgr)
    keep = torch.nn.functional.interpolate(sparse[5], scale_factor=4.0, mode="nearest").bool()
    assert 0.1 < model.refiner.mask_density < 0.5
    for a, b in zip(full[:2], sparse[:2]):
        assert torch.allclose(a.masked_select(keep.expand_as(a)), b.masked_select(keep.expand_as(b)), atol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_traced_refiner_equals_patch_refiner():
    model = create_model("bgmv2_mobilenetv2", refine_mode="thresholding", refine_threshold=0.0).eval()
    src, bgr = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        eager = model(src, bgr)
        traced = torch.jit.trace(model, (src, bgr), check_trace=False)(src, bgr)
    for a, b in zip(eager, traced):
        assert torch.allclose(a, b, atol=1e-5)


def test_sampling_takes_at_most_k_cells_and_only_positive_error():
    model = create_model("bgmv2_mobilenetv2", refine_sample_pixels=16 * 7)
    err = torch.zeros(2, 1, 8, 8)
    err[0, 0, :2, :2] = torch.tensor([[0.5, 0.2], [0.9, 0.1]])
    err[1] = torch.rand(1, 8, 8) + 0.01
    ref = model.refiner.select(err)
    assert ref[0].sum() == 4 and ref[1].sum() == 7  # prevent_oversampling drops zero-error cells
    assert torch.equal(ref[1].flatten().nonzero().flatten().sort().values,
                       err[1].flatten().topk(7).indices.sort().values)


def test_registry_and_shapes():
    assert {"bgmv2_mobilenetv2", "bgmv2_resnet50", "bgmv2_resnet101"} <= set(list_models("bgmv2_*"))
    model = create_model("bgmv2_mobilenetv2", backbone_scale=0.25, refine_mode="sampling",
                         refine_sample_pixels=80_000, refine_threshold=0.1, refine_kernel_size=3).eval()
    assert model.takes_background and model.model_kwargs["refine_mode"] == "sampling"
    src, bgr = torch.rand(1, 3, 72, 124), torch.rand(1, 3, 72, 124)
    with torch.no_grad():
        pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm = model(src, bgr)
    assert pha.shape == (1, 1, 72, 124) and fgr.shape == (1, 3, 72, 124)
    assert pha_sm.shape == (1, 1, 18, 31) and fgr_sm.shape == (1, 3, 18, 31) and err_sm.shape == (1, 1, 18, 31)
    assert ref_sm.shape == (1, 1, 18, 31)
    for t in (pha, fgr, pha_sm, fgr_sm, err_sm):
        assert 0 <= t.min() and t.max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"refine_mode": "dense"}, "refine_mode"), ({"backbone_scale": 0.75}, "backbone_scale"),
     ({"refine_kernel_size": 5}, "refine_kernel_size"), ({"refine_sample_pixels": 0}, "refine_sample_pixels")],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model("bgmv2_mobilenetv2", **kwargs)
    with pytest.raises(ValueError, match="base network"):
        create_model("bgmv2_mobilenetv2", refine=False, **kwargs)


@pytest.mark.parametrize(
    ("src", "bgr", "message"),
    [(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 36), "same shape"),
     (torch.rand(1, 3, 30, 32), torch.rand(1, 3, 30, 32), "divisible by 4"),
     (torch.rand(1, 4, 32, 32), torch.rand(1, 4, 32, 32), r"\[B, 3, H, W\]"),
     (torch.rand(1, 3, 32, 32), None, "bgr must be a torch.Tensor")],
)
def test_bad_input_is_a_clear_error(src, bgr, message):
    model = create_model("bgmv2_mobilenetv2")
    with pytest.raises(ValueError, match=message):
        model(src, bgr)


# ------------------------------------------------------------------------------------------------
# binarized baselines: bgmv2_<method>
# ------------------------------------------------------------------------------------------------
def _binary_model(method="reactnet", **kwargs):
    """A bgmv2_<method> with non-trivial BN statistics and an error map above the 0.1 threshold in
    places (a fresh model's error head is ~0 everywhere, so nothing would be refined)."""
    from engine_helpers import randomize_stats

    model = randomize_stats(create_model(f"bgmv2_{method}", **kwargs))
    with torch.no_grad():
        model.decoder.conv4.bias[4] = 0.1
    return model


@pytest.mark.parametrize("method", ["bnn", "reactnet"])
def test_baseline_keeps_stem_outputs_and_depthwise_full_precision(method):
    from binarize.nn import BinaryConv2d

    model = create_model(f"bgmv2_{method}")
    binary = {n for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)} - binary
    depthwise = {n for n in convs if n.endswith("conv_dw")}
    assert convs - depthwise == {"backbone.body.conv_stem", "decoder.conv4", "refiner.conv4"}
    assert len(depthwise) == 17 and len(binary) == 45
    assert {"refiner.conv1", "refiner.conv2", "refiner.conv3", "aspp.project.0"} <= binary
    resnet = create_model(f"bgmv2_{method}", backbone="resnet50", refine_mode="full")
    assert isinstance(resnet.backbone.body.layer4[2].conv2, BinaryConv2d)
    assert not isinstance(resnet.backbone.body.conv1, BinaryConv2d)
    with pytest.raises(ValueError, match="backbone"):
        create_model(f"bgmv2_{method}", backbone="vgg")


def test_baseline_trains_forward_and_backward():
    model = create_model("bgmv2_reactnet", refine_mode="sampling", refine_sample_pixels=16 * 40).train()
    with torch.no_grad():
        model.decoder.conv4.bias[4] = 0.3  # error > 0 so sampling refines patches
    # 128 x 128, not less: the base runs at 1/4 scale and the backbone at stride 16, so at 64 x 64
    # its deepest maps are 1 x 1, where train-mode BatchNorm over a batch of 2 gives exactly +-1
    # (less eps), the edge of the sign's straight-through window, whose derivative there is ~1e-5:
    # the gradient below them then hangs on rounding (exactly zero on some machines)
    src, bgr = torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128)
    pha, fgr, pha_sm, fgr_sm, err_sm, ref_sm = model(src, bgr)
    assert ref_sm.sum() == 80  # 40 patches per image
    loss = pha.mean() + fgr.mean() + pha_sm.mean() + err_sm.mean()
    loss.backward()
    for name in ("backbone.body.blocks.3.0.conv_pw", "aspp.project.0", "decoder.conv1", "refiner.conv1",
                 "refiner.conv3"):
        grad = model.get_submodule(name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_baseline_compact_round_trip(tmp_path):
    import binarize

    model = _binary_model("reactnet", refine_mode="thresholding").eval()
    src, bgr = torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(src, bgr)
    path = tmp_path / "bgmv2_reactnet.safetensors"
    binarize.save(model, path)
    restored = binarize.load(path).eval()
    assert restored.model_name == "bgmv2_reactnet" and restored.refiner.mode == "thresholding"
    with torch.no_grad():
        got = restored(src, bgr)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert path.stat().st_size < fp32_bytes / 10


@pytest.mark.parametrize("mode", ["full", "thresholding"])
def test_deployed_baseline_matches_simulated_and_refines_only_selected_patches(mode):
    from binarize.engine import deploy, deploy_report

    model = _binary_model("reactnet", refine_mode=mode)
    src, bgr = torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(src, bgr)
    deployed = deploy(model)
    assert len(deploy_report(deployed).packed) == 45 and not deploy_report(deployed).simulated
    shapes = []
    deployed.refiner.conv1.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    with torch.no_grad():
        got = deployed(src, bgr)
    for a, b in zip(expected, got):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4
    cells = int(expected[5].sum())
    assert deployed.refiner.mask_density == pytest.approx(model.refiner.mask_density)
    if mode == "full":
        assert shapes == [(1, 42, 38, 54)] and cells == 16 * 24
    else:
        assert 0 < cells < 16 * 24 and shapes == [(cells, 42, 8, 8)]  # packed convs on the patches only


def test_profile_reports_the_refiner_dense_and_sparse():
    import binarize

    model = _binary_model("reactnet", refine_mode="thresholding")
    src, bgr = torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96)
    report = binarize.profile(model, (src, bgr))
    density = model.refiner.mask_density
    assert 0 < density < 1
    refiner = [layer for layer in report.layers if layer.name.startswith("refiner.")]
    assert {layer.name for layer in refiner if layer.bops} == {"refiner.conv1", "refiner.conv2", "refiner.conv3"}
    for layer in refiner:
        assert layer.density == pytest.approx(density)
    # dense: the refiner's convs over the whole (padded) map, as in full mode
    assert next(la for la in refiner if la.name == "refiner.conv1").bops == 24 * 42 * 9 * 36 * 52  # 3x3 valid on 32x48 padded by 3
    others = [layer for layer in report.layers if not layer.name.startswith("refiner.")]
    assert report.sparse_bops == pytest.approx(sum(la.bops for la in others) + density * sum(la.bops for la in refiner))


# ------------------------------------------------------------------------------------------------
# losses and training
# ------------------------------------------------------------------------------------------------
def test_sobel_matches_the_normalised_sobel_magnitude():
    from binarize.matting.losses import sobel

    x = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = ((p[..., :-2, 2:] + 2 * p[..., 1:-1, 2:] + p[..., 2:, 2:])
          - (p[..., :-2, :-2] + 2 * p[..., 1:-1, :-2] + p[..., 2:, :-2])) / 8
    gy = ((p[..., 2:, :-2] + 2 * p[..., 2:, 1:-1] + p[..., 2:, 2:])
          - (p[..., :-2, :-2] + 2 * p[..., :-2, 1:-1] + p[..., :-2, 2:])) / 8
    torch.testing.assert_close(sobel(x), torch.sqrt(gx**2 + gy**2 + 1e-6))


def test_bgmv2_losses_follow_their_formulas():
    from binarize.matting import losses

    g = torch.Generator().manual_seed(0)
    true_pha = (torch.rand(2, 1, 16, 24, generator=g) - 0.3).clamp(0, 1)
    true_fgr = torch.rand(2, 3, 16, 24, generator=g)
    pha, fgr, err = (torch.rand(2, c, 16, 24, generator=g) for c in (1, 3, 1))
    base = losses.bgmv2_base_loss(pha, fgr, err, true_pha, true_fgr)
    mask = (true_pha > 0).float()
    assert base["fgr_l1"].item() == pytest.approx(((fgr - true_fgr).abs() * mask).mean().item(), rel=1e-6)
    assert base["err_mse"].item() == pytest.approx(((err - (pha - true_pha).abs()) ** 2).mean().item(), rel=1e-6)
    assert base["total"].item() == pytest.approx(sum(v.item() for k, v in base.items() if k != "total"), rel=1e-6)
    # perfect predictions: zero everywhere, and the error head must predict zero error
    perfect = losses.bgmv2_base_loss(true_pha, true_fgr, torch.zeros_like(true_pha), true_pha, true_fgr)
    assert perfect["total"].item() == pytest.approx(0.0, abs=1e-6)
    pha_sm, fgr_sm, err_sm = (torch.rand(2, c, 4, 6, generator=g) for c in (1, 3, 1))
    refine = losses.bgmv2_refine_loss(pha, fgr, pha_sm, fgr_sm, err_sm, true_pha, true_fgr)
    up = lambda t: torch.nn.functional.interpolate(t, size=(16, 24), mode="bilinear", align_corners=False)  # noqa: E731
    expected_err = ((up(err_sm) - (up(pha_sm) - true_pha).abs()) ** 2).mean()
    assert refine["err_mse"].item() == pytest.approx(expected_err.item(), rel=1e-6)
    assert refine["pha_l1"].item() == pytest.approx(base["pha_l1"].item(), rel=1e-6)
    assert len(refine) == 8
    with pytest.raises(ValueError, match="pred_fgr must have shape"):
        losses.bgmv2_base_loss(pha, pha, err, true_pha, true_fgr)


@pytest.mark.slow
def test_synthetic_config_trains_and_the_loss_falls(tmp_path):
    import csv

    from binarize.matting import train as train_mod
    from binarize.matting.train_config import load_config

    cfg = load_config("synthetic/bgmv2.yaml", [
        "data.synthetic.clips=1", "data.synthetic.size=[64,48]", "schedule.epoch_end=12", f"run.output_dir={tmp_path}",
        "run.log_interval=1", "run.checkpoint_interval=1000", "run.progress=false"])
    assert cfg["model"]["name"] == "bgmv2_mobilenetv2" and cfg["model"]["kwargs"]["refine_mode"] == "sampling"
    out = train_mod.train(cfg)
    rows = [r for r in csv.DictReader(open(out / "scalars.csv")) if r["name"] == "train_lr/total"]
    totals = [float(r["value"]) for r in rows]
    assert len(totals) == 12
    names = {r["name"] for r in csv.DictReader(open(out / "scalars.csv"))}
    assert {"train_lr/err_mse", "train_lr/pha_sm_sobel", "train_lr/fgr_l1"} <= names
    assert sum(totals[-3:]) < 0.7 * sum(totals[:3]), totals
    import binarize

    model = binarize.load(out / "model.safetensors").eval()
    assert model.model_name == "bgmv2_mobilenetv2" and model.refiner.sample_pixels == 2304


# ------------------------------------------------------------------------------------------------
# binarize profile
# ------------------------------------------------------------------------------------------------
def test_profile_cli_lists_bgmv2_after_the_other_matting_models_and_counts_it(capsys, monkeypatch):
    import binarize.cli.profile as cli_profile
    from binarize.cli.main import main

    names = cli_profile.matting_model_names()
    assert names[:2] == ["rvm_mobilenetv3", "bimatting"]
    background = [n for n in names if n.startswith("bgmv2_")]
    assert background[:3] == ["bgmv2_mobilenetv2", "bgmv2_resnet50", "bgmv2_resnet101"] and len(background) == 10
    assert names[-len(background):] == background
    monkeypatch.setattr(cli_profile, "matting_model_names", lambda: ["rvm_mobilenetv3", "bgmv2_mobilenetv2", "bgmv2_bnn"])
    assert main(["profile", "--all-matting", "--resolution", "320x256", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rvm, fp, bnn = data["models"]
    assert [m["model"] for m in data["models"]] == ["rvm_mobilenetv3", "bgmv2_mobilenetv2", "bgmv2_bnn"]
    # speed-test convention: sampling refines exactly 80,000 // 16 = 5000 of the 80 x 64 cells
    for report in (fp, bnn):
        assert list(report["mask_densities"].values()) == [pytest.approx(5000 / 5120)]
        assert report["sparse_ops"] < report["ops"]
    assert bnn["flops"] + bnn["bops"] == fp["flops"] and bnn["bops"] > 0
    assert fp["savings_vs_baseline"]["computation"] > 1  # the base runs at 1/4 scale
    # --downsample-ratio is the backbone scale; > 0.5 is refused
    assert main(["profile", "bgmv2_mobilenetv2", "--resolution", "64x64", "--downsample-ratio", "0.5", "--json"]) == 0
    half = json.loads(capsys.readouterr().out)["models"][0]
    assert half["flops"] > fp["flops"] * (64 * 64) / (320 * 256)
    assert main(["profile", "bgmv2_mobilenetv2", "--resolution", "64x64", "--downsample-ratio", "0.75"]) == 2
    assert "backbone_scale, at most 0.5" in capsys.readouterr().err
    assert main(["profile", "bgmv2_mobilenetv2", "--resolution", "66x64"]) == 2
    assert "divisible by 4" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the video tool: convert_video(..., background_frame=...) and binarize matte --background-frame
# ------------------------------------------------------------------------------------------------
def _write_pngs(folder, frames):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    return folder


def _read_pngs(folder):
    from PIL import Image

    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.iterdir())])


def _frames(n, w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def small_bgmv2():
    torch.manual_seed(0)
    model = create_model("bgmv2_mobilenetv2", refine_mode="thresholding", refine_threshold=0.05).eval()
    with torch.no_grad():
        model.decoder.conv4.bias[0] = 0.5
    return model


def _expected_alpha(model, src_frames, bgr_frames):
    to = lambda f: torch.from_numpy(np.ascontiguousarray(f)).permute(0, 3, 1, 2).float().div(255)  # noqa: E731
    with torch.no_grad():
        pha = model(to(src_frames), to(bgr_frames))[0]
    return pha.mul(255).round().to(torch.uint8)[:, 0].numpy()


@pytest.mark.parametrize("kind", ["image", "video"])
def test_convert_video_with_a_background_frame_matches_the_model(tmp_path, small_bgmv2, kind):
    from binarize.matting.inference import convert_video

    src = _frames(3, 64, 48, 1)
    source = _write_pngs(tmp_path / "src", src)
    if kind == "image":
        bgr = _frames(1, 64, 48, 2)
        background = _write_pngs(tmp_path / "bg", bgr) / "0000.png"
        bgr = np.repeat(bgr, 3, axis=0)
    else:  # a background video (here a PNG sequence) is read frame by frame alongside the input
        bgr = _frames(4, 64, 48, 3)
        background = _write_pngs(tmp_path / "bg", bgr)
        bgr = bgr[:3]
    result = convert_video(small_bgmv2, source, output_alpha=tmp_path / "alpha", output_composition=tmp_path / "comp",
                           output_type="png_sequence", background="green", background_frame=background,
                           seq_chunk=2, progress=False)
    assert result.frames == 3 and result.downsample_ratio == 0.25
    got = _read_pngs(tmp_path / "alpha")
    expected = _expected_alpha(small_bgmv2, src, bgr)
    assert got.shape == expected.shape and np.abs(got.astype(int) - expected).max() <= 1
    assert 0 < expected.mean() < 255 and (tmp_path / "comp" / "0002.png").exists()


def test_convert_video_pads_sides_that_are_not_multiples_of_4(tmp_path, small_bgmv2):
    from binarize.matting.inference import convert_video

    source = _write_pngs(tmp_path / "src", _frames(1, 66, 50, 4))
    background = _write_pngs(tmp_path / "bg", _frames(1, 66, 50, 5)) / "0000.png"
    convert_video(small_bgmv2, source, output_alpha=tmp_path / "alpha", output_type="png_sequence",
                  background_frame=background, progress=False)
    assert _read_pngs(tmp_path / "alpha").shape == (1, 50, 66)


def test_background_frame_errors_come_before_any_work(tmp_path, small_bgmv2):
    from binarize.matting.inference import convert_video
    from binarize.models import create_model as create

    source = _write_pngs(tmp_path / "src", _frames(3, 64, 48, 1))
    other_size = _write_pngs(tmp_path / "bg_small", _frames(1, 32, 48, 2)) / "0000.png"
    short = _write_pngs(tmp_path / "bg_short", _frames(2, 64, 48, 3))
    good = _write_pngs(tmp_path / "bg", _frames(1, 64, 48, 2)) / "0000.png"
    out = dict(output_alpha=tmp_path / "alpha", output_type="png_sequence", progress=False)
    cases = [
        (small_bgmv2, None, {}, "mattes against a captured background"),
        (create("rvm_mobilenetv3"), good, {}, "takes no background frame"),
        (small_bgmv2, other_size, {}, "is 32x48 but the input is 64x48"),
        (small_bgmv2, short, {}, "has 2 frames but the input has 3"),
        (small_bgmv2, good, {"downsample_ratio": 0.75}, r"backbone_scale and must be in \(0, 0.5\]"),
        (small_bgmv2, tmp_path / "missing.png", {}, "not found"),
    ]
    for model, background, extra, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
            convert_video(model, source, background_frame=background, **out, **extra)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "alpha").exists()


def test_cli_matte_with_a_background_frame(tmp_path, capsys, monkeypatch):
    from test_video import make_video

    from binarize.cli.main import main

    make_video(tmp_path / "clip.mp4", n=3, w=64, h=48)
    _write_pngs(tmp_path / "bg", _frames(1, 64, 48, 2))
    code = main(["matte", str(tmp_path / "clip.mp4"), "-m", "bgmv2_mobilenetv2", "--background-frame",
                 str(tmp_path / "bg" / "0000.png"), "-o", str(tmp_path / "comp.mp4"), "--no-progress"])
    assert code == 0 and (tmp_path / "comp.mp4").exists()
    assert "matted 3 frames (64x48" in capsys.readouterr().out
    # one-line errors before the model is built
    import binarize.models

    monkeypatch.setattr(binarize.models, "create_model", lambda *a, **k: pytest.fail("model built"))
    for argv, message in (
        (["-m", "bgmv2_mobilenetv2"], "mattes against a captured background"),
        (["-m", "bimatting", "--background-frame", str(tmp_path / "bg" / "0000.png")], "takes no background frame"),
    ):
        code = main(["matte", str(tmp_path / "clip.mp4"), *argv, "-o", str(tmp_path / "x.mp4"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
