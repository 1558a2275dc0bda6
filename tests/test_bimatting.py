"""BiMatting and BiMobileNet: parity with the official code, checkpoints, shapes, recurrence, tracing.

Reference outputs:
- ``bimatting_parity_seed1.npz``: official outputs for ``make_state_dict(manifest, seed=1)``. With
  these weights the coarse alpha is positive everywhere, so the incoherent mask is empty and the
  decoder's masked 3x3 branches contribute nothing.
- ``bimatting_parity_masked_seed2.npz``: produced the same way with the official code
  (htqin/BiMatting @ 746876b, ``MattingNetwork('bimobilenet', 'deep_guided_filter')``, eval) from
  ``make_state_dict(manifest, seed=2)`` with ``project_mat.conv.weight[3] *= 40`` and
  ``project_mat.conv.bias[3] = 0`` (see :func:`masked_state_dict`), so that the coarse alpha is
  clamped to 0 in places and every masked branch is exercised (mask density 0.7 at 40x64).
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from official_weights import make_state_dict

from binarize.models import create_model, list_models
from binarize.models.bimatting import (
    BiMatting,
    load_official_bimatting,
    map_official_key,
    to_official_key,
)
from binarize.models.bimobilenet import BiMobileNet
from binarize.nn.blocks import MaskedBranch
from binarize.ops import incoherent_mask

OUTPUT_NAMES = ["fgr", "pha", "fgr_s", "pha_s", "r1", "r2", "r3", "r4"]


@pytest.fixture(scope="module")
def manifest(request):
    path = request.config.rootpath / "tests" / "fixtures" / "bimatting_official_state_dict.json"
    return json.loads(path.read_text())


def masked_state_dict(manifest) -> dict:
    sd = make_state_dict(manifest, seed=2)
    sd["project_mat.conv.weight"][3] *= 40.0
    sd["project_mat.conv.bias"][3] = 0.0
    return sd


@pytest.fixture(scope="module")
def model_seed1(manifest):
    return load_official_bimatting(make_state_dict(manifest, seed=1))


@pytest.fixture(scope="module")
def model_masked(manifest):
    return load_official_bimatting(masked_state_dict(manifest))


def run_parity_passes(model, fixture):
    src, src2 = torch.from_numpy(fixture["src"]), torch.from_numpy(fixture["src2"])
    with torch.no_grad():
        full = model(src, return_aux=True)
        nxt = model(src2, *full[4:], return_aux=True)
        refined = model(src, downsample_ratio=float(fixture["downsample_ratio"]), return_aux=True)
    return {"full": full, "next": nxt, "refined": refined}


def assert_matches_fixture(outputs, fixture):
    for tag, values in outputs.items():
        assert len(values) == len(OUTPUT_NAMES)
        for name, got in zip(OUTPUT_NAMES, values):
            want = fixture[f"{tag}_{name}"]
            assert tuple(got.shape) == want.shape, f"{tag}_{name}"
            err = float(np.abs(got.numpy() - want).max())
            assert err <= 1e-4, f"{tag}_{name}: max abs error {err:.3g}"


# ------------------------------------------------------------------------------------------------
# parity with the official code
# ------------------------------------------------------------------------------------------------
def test_parity_seed1_all_outputs(model_seed1, fixtures_dir):
    fixture = np.load(fixtures_dir / "bimatting_parity_seed1.npz")
    assert float(fixture["downsample_ratio"]) != 1.0  # the refined pass goes through the DGF
    assert_matches_fixture(run_parity_passes(model_seed1, fixture), fixture)


def test_parity_with_nonempty_incoherent_mask(model_masked, fixtures_dir):
    fixture = np.load(fixtures_dir / "bimatting_parity_masked_seed2.npz")
    outputs = run_parity_passes(model_masked, fixture)
    assert_matches_fixture(outputs, fixture)
    densities = [m.mask_density for m in model_masked.modules() if isinstance(m, MaskedBranch)]
    assert len(densities) == 10  # decode3..1: conv + two gates each, decode0: conv
    assert all(0.0 < d < 1.0 for d in densities)


def test_masked_branches_matter(model_masked, fixtures_dir):
    """Zeroing one masked 3x3 branch's weights changes alpha only where the mask is non-zero."""
    fixture = np.load(fixtures_dir / "bimatting_parity_masked_seed2.npz")
    src = torch.from_numpy(fixture["src"])[:, :1]
    model = BiMatting()
    model.load_state_dict(model_masked.state_dict())
    model.eval()
    with torch.no_grad():
        _, pha, _, pha_s, *_ = model(src, return_aux=True)
        model.decoder.decode0.conv.sparse[5].weight.zero_()  # the full-precision 3x3 of the output block
        _, pha_zeroed, *_ = model(src)
    mask = F.interpolate(incoherent_mask(pha_s.flatten(0, 1)), size=pha.shape[-2:], mode="bilinear",
                         align_corners=False).unflatten(0, pha.shape[:2])
    changed = (pha - pha_zeroed).abs() > 1e-6
    assert changed.any()
    assert not changed[mask == 0].any()


# ------------------------------------------------------------------------------------------------
# official checkpoints
# ------------------------------------------------------------------------------------------------
def test_key_map_is_a_bijection_onto_our_state_dict(manifest):
    model = BiMatting()
    ours = model.state_dict()
    mapped = {map_official_key(name): shape for name, shape, _ in manifest}
    assert len(mapped) == len(manifest) == 670
    assert set(mapped) == set(ours)
    for key, shape in mapped.items():
        assert tuple(ours[key].shape) == tuple(shape), key
    assert [to_official_key(map_official_key(name)) for name, _, _ in manifest] == [n for n, _, _ in manifest]
    assert map_official_key("decoder.decode3.gru.ih_1x1.2.weight") == "decoder.decode3.gru.ih.dense.2.weight"
    assert map_official_key("decoder.decode4.gru.ih.2.weight") == "decoder.decode4.gru.ih.2.weight"
    assert set(model.official_state_dict()) == {name for name, _, _ in manifest}


def test_create_model_loads_official_checkpoint_file(manifest, tmp_path, model_seed1):
    path = tmp_path / "epoch-27.pth"
    torch.save(make_state_dict(manifest, seed=1), path)
    model = create_model("bimatting", checkpoint=path)
    assert model.model_name == "bimatting"
    reference = model_seed1.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_corrupt_or_mismatched_checkpoints_name_the_problem(manifest, tmp_path):
    sd = make_state_dict(manifest, seed=1)
    missing = dict(sd)
    del missing["backbone.feature.5.bn1.weight"]
    with pytest.raises(ValueError, match=r"missing.*backbone\.feature\.5\.bn1\.weight"):
        load_official_bimatting(missing)
    wrong = dict(sd)
    wrong["aspp.aspp1.2.weight"] = torch.zeros(64, 1024, 1, 1)
    with pytest.raises(ValueError, match=r"aspp\.aspp1\.2\.weight"):
        load_official_bimatting(wrong)
    extra = dict(sd, **{"decoder.decode9.conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected.*decode9"):
        load_official_bimatting(extra)
    garbage = tmp_path / "broken.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        create_model("bimatting", checkpoint=garbage)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("bimatting", checkpoint=tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------------------
# call contract
# ------------------------------------------------------------------------------------------------
def test_registered_models():
    assert {"bimatting", "bimobilenet"} <= set(list_models())


def test_odd_sizes_and_single_frame_input(model_masked):
    src = torch.rand(1, 2, 3, 70, 101)
    with torch.no_grad():
        fgr, pha, fgr_s, pha_s, r1, r2, r3, r4 = model_masked(src, return_aux=True)
        assert fgr.shape == (1, 2, 3, 70, 101) and pha.shape == (1, 2, 1, 70, 101)
        assert fgr_s.shape == (1, 2, 3, 5, 7) and pha_s.shape == (1, 2, 1, 5, 7)
        assert [r.shape[1:] for r in (r1, r2, r3, r4)] == [(16, 35, 51), (20, 18, 26), (40, 9, 13), (64, 5, 7)]
        assert 0 <= float(pha.min()) and float(pha.max()) <= 1 and 0 <= float(fgr.min()) and float(fgr.max()) <= 1
        frame = src[:, 0]
        fgr4, pha4, *rec4 = model_masked(frame)
        fgr5, pha5, *rec5 = model_masked(frame.unsqueeze(1))
    assert fgr4.shape == (1, 3, 70, 101) and pha4.shape == (1, 1, 70, 101)
    torch.testing.assert_close(fgr4, fgr5[:, 0])
    torch.testing.assert_close(pha4, pha5[:, 0])
    for a, b in zip(rec4, rec5):
        torch.testing.assert_close(a, b)


def test_tiny_inputs_are_padded_and_cropped(model_masked):
    src = torch.rand(1, 1, 3, 10, 12)
    padded = F.pad(src.flatten(0, 1), (0, 20, 0, 22), mode="replicate").unflatten(0, (1, 1))
    with torch.no_grad():
        fgr, pha, fgr_s, pha_s, *rec = model_masked(src, return_aux=True)
        fgr_p, pha_p, *rec_p = model_masked(padded)
        nxt = model_masked(src, *rec)
        small = model_masked(torch.rand(1, 1, 3, 40, 64), downsample_ratio=0.25)
    assert fgr.shape == (1, 1, 3, 10, 12) and fgr_s.shape == (1, 1, 3, 1, 1)
    torch.testing.assert_close(pha, pha_p[..., :10, :12])
    torch.testing.assert_close(fgr, fgr_p[..., :10, :12])
    for a, b in zip(rec, rec_p):
        torch.testing.assert_close(a, b)
    assert nxt[1].shape == pha.shape
    assert small[1].shape == (1, 1, 1, 40, 64)


def test_recurrent_continuation_equals_one_long_clip(model_masked):
    src = torch.rand(1, 4, 3, 40, 48)
    with torch.no_grad():
        fgr_all, pha_all, *rec_all = model_masked(src)
        _, _, *rec = model_masked(src[:, :2])
        fgr_b, pha_b, *rec_b = model_masked(src[:, 2:], *rec)
    torch.testing.assert_close(pha_b, pha_all[:, 2:])
    torch.testing.assert_close(fgr_b, fgr_all[:, 2:])
    for a, b in zip(rec_b, rec_all):
        torch.testing.assert_close(a, b)


def test_batch_samples_are_independent(model_masked):
    """Each sample uses its own incoherent mask (the official code only supports batch size 1)."""
    a, b = torch.rand(1, 2, 3, 40, 48), torch.rand(1, 2, 3, 40, 48)
    with torch.no_grad():
        both = model_masked(torch.cat([a, b]), downsample_ratio=0.8)
        only_a = model_masked(a, downsample_ratio=0.8)
        only_b = model_masked(b, downsample_ratio=0.8)
    for joint, first, second in zip(both, only_a, only_b):
        torch.testing.assert_close(joint, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_segmentation_pass(model_masked):
    src = torch.rand(1, 2, 3, 40, 48)
    with torch.no_grad():
        seg, *rec = model_masked(src, segmentation_pass=True)
        _, _, *rec_mat = model_masked(src)
    assert seg.shape == (1, 2, 1, 40, 48)
    for a, b in zip(rec, rec_mat):
        torch.testing.assert_close(a, b)


def test_mask_density_is_the_measured_mask_fraction(manifest):
    model = load_official_bimatting(masked_state_dict(manifest))
    branches = {name: m for name, m in model.named_modules() if isinstance(m, MaskedBranch)}
    assert all(m.mask_density is None for m in branches.values())
    with torch.no_grad():
        *_, pha_s, _, _, _, _ = model(torch.rand(1, 2, 3, 48, 64), return_aux=True)
    coarse = incoherent_mask(pha_s.flatten(0, 1))
    for name, size in (("decoder.decode0.conv.sparse", (48, 64)), ("decoder.decode2.gru.hh.sparse", (12, 16))):
        resized = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        assert branches[name].mask_density == pytest.approx(float((resized > 0).float().mean()))
    for name, m in model.named_modules():
        if hasattr(m, "mask_density"):
            assert isinstance(m, MaskedBranch), name  # only masked layers expose a density


def test_bad_inputs_raise_clear_errors(model_masked):
    with pytest.raises(ValueError, match="src shaped"):
        model_masked(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="downsample_ratio"):
        model_masked(torch.rand(1, 3, 32, 32), downsample_ratio=1.5)
    with pytest.raises(ValueError, match="floating-point"):
        model_masked(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with torch.no_grad():
        _, _, *rec = model_masked(torch.rand(1, 3, 32, 32))
        with pytest.raises(ValueError, match="recurrent state r4"):
            model_masked(torch.rand(1, 3, 64, 64), *rec)


def test_trace(model_masked):
    src = torch.rand(1, 2, 3, 32, 48)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model_masked, (src,), check_trace=False, strict=False)
        eager = model_masked(src)
        got = traced(src)
    assert len(got) == 6
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


def test_training_step_reaches_binary_and_masked_weights(manifest):
    model = load_official_bimatting(masked_state_dict(manifest)).train()
    fgr, pha, fgr_s, pha_s, *_ = model(torch.rand(1, 2, 3, 32, 48), return_aux=True)
    (pha.mean() + fgr.mean() + pha_s.mean() + fgr_s.mean()).backward()
    for name in ("backbone.feature.0.conv1.weight", "backbone.feature.9.binary_3x3.weight",
                 "aspp.aspp1.2.weight", "decoder.decode4.gru.ih.2.weight",
                 "decoder.decode1.conv.sparse.2.weight", "decoder.decode2.gru.hh.dense.2.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------
# BiMobileNet
# ------------------------------------------------------------------------------------------------
def test_bimobilenet_encoder_features():
    encoder = BiMobileNet().eval()
    with torch.no_grad():
        feats = encoder(torch.rand(2, 1, 3, 70, 101))
    assert [tuple(f.shape) for f in feats] == [
        (2, 1, 16, 35, 51), (2, 1, 32, 18, 26), (2, 1, 64, 9, 13), (2, 1, 1024, 5, 7)
    ]


def test_bimobilenet_classifier_and_official_keys(manifest):
    model = create_model("bimobilenet").eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 1000)
    backbone = {name[len("backbone."):]: shape for name, shape, _ in manifest if name.startswith("backbone.")}
    ours = model.state_dict()
    assert set(ours) == set(backbone) | {"fc.weight", "fc.bias"}
    # an official pre-training checkpoint: {"state_dict": {"module.feature...": ...}}
    official = {"state_dict": {f"module.{k}": torch.randn(v.shape) for k, v in ours.items()
                               if v.is_floating_point()}}
    mapped = model.map_official_state_dict(official)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(3, 64, 64))
