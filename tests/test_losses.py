"""Matting losses against direct formula computations (numpy / scipy), on small random tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from torch import nn

from binarize.matting import losses

# ------------------------------------------------------------------ numpy references (independent)

KERNEL = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0


def np_blur(img: np.ndarray) -> np.ndarray:
    # torch 'reflect' padding (edge not repeated) is scipy's 'mirror'; the kernel is symmetric
    return ndimage.convolve(img, KERNEL, mode="mirror")


def np_laplacian_loss(pred: np.ndarray, true: np.ndarray, levels: int) -> float:
    """pred/true: [N, H, W] (one channel per image)."""
    total = 0.0
    cur_p, cur_t = pred, true
    for level in range(levels):
        h, w = cur_p.shape[-2] // 2 * 2, cur_p.shape[-1] // 2 * 2
        cur_p, cur_t = cur_p[:, :h, :w], cur_t[:, :h, :w]
        diffs, downs = [], []
        for cur in (cur_p, cur_t):
            down = np.stack([np_blur(im)[::2, ::2] for im in cur])
            up = np.zeros_like(cur)
            up[:, ::2, ::2] = down * 4
            up = np.stack([np_blur(im) for im in up])
            diffs.append(cur - up)
            downs.append(down)
        total += 2**level * np.abs(diffs[0] - diffs[1]).mean()
        cur_p, cur_t = downs
    return total / levels


def np_coherence(pred: np.ndarray, true: np.ndarray) -> float:
    return float((((pred[:, 1:] - pred[:, :-1]) - (true[:, 1:] - true[:, :-1])) ** 2).mean())


def random_clip(b=2, t=3, h=32, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    true_pha = torch.rand(b, t, 1, h, w, generator=g)
    true_pha[true_pha < 0.3] = 0.0  # some exact zeros so the foreground mask matters
    return (
        torch.rand(b, t, 3, h, w, generator=g),
        torch.rand(b, t, 1, h, w, generator=g),
        torch.rand(b, t, 3, h, w, generator=g),
        true_pha,
    )


# ------------------------------------------------------------------ tests


def test_gauss_kernel_is_normalised_binomial():
    k = losses.gauss_kernel()
    assert k.shape == (1, 1, 5, 5)
    np.testing.assert_allclose(k[0, 0].numpy(), KERNEL, rtol=0, atol=1e-12)
    assert float(k.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("size,levels", [((32, 48), 3), ((33, 50), 2), ((64, 64), 5)])
def test_laplacian_loss_matches_numpy(size, levels):
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(3, 1, *size, generator=g, dtype=torch.float64)
    true = torch.rand(3, 1, *size, generator=g, dtype=torch.float64)
    ours = losses.laplacian_loss(pred, true, levels)
    ref = np_laplacian_loss(pred[:, 0].numpy(), true[:, 0].numpy(), levels)
    assert float(ours) == pytest.approx(ref, rel=1e-10)


def test_laplacian_pyramid_of_constant_is_zero():
    # the x4 zero-insertion upsampling with reflect padding reproduces a constant exactly
    pyr = losses.laplacian_pyramid(torch.full((1, 1, 64, 64), 0.7, dtype=torch.float64), 5)
    assert len(pyr) == 5
    for level, band in enumerate(pyr):
        assert band.shape[-1] == 64 >> level
        assert band.abs().max() < 1e-12


def test_laplacian_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="too small"):
        losses.laplacian_loss(torch.rand(1, 1, 20, 20), torch.rand(1, 1, 20, 20), levels=5)


def test_matting_loss_terms_match_formulas():
    pred_fgr, pred_pha, true_fgr, true_pha = (x.double() for x in random_clip(h=32, w=48))
    terms = losses.matting_loss(pred_fgr, pred_pha, true_fgr, true_pha, laplacian_levels=3)
    pf, pp, tf, tp = (x.numpy() for x in (pred_fgr, pred_pha, true_fgr, true_pha))
    mask = tp > 0
    ref = {
        "pha_l1": np.abs(pp - tp).mean(),
        "pha_laplacian": np_laplacian_loss(pp.reshape(-1, 32, 48), tp.reshape(-1, 32, 48), 3),
        "pha_coherence": 5 * np_coherence(pp, tp),
        "fgr_l1": np.abs(pf * mask - tf * mask).mean(),
        "fgr_coherence": 5 * np_coherence(pf * mask, tf * mask),
    }
    ref["total"] = sum(ref.values())
    assert set(terms) == set(ref)
    for name, value in ref.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-10), name


def test_foreground_outside_mask_is_ignored():
    pred_fgr, pred_pha, true_fgr, true_pha = random_clip(h=32, w=32)
    base = losses.matting_loss(pred_fgr, pred_pha, true_fgr, true_pha, 2)
    changed = pred_fgr.clone()
    changed[(true_pha == 0).expand_as(changed)] = 123.0
    again = losses.matting_loss(changed, pred_pha, true_fgr, true_pha, 2)
    assert float(again["fgr_l1"]) == float(base["fgr_l1"])
    assert float(again["fgr_coherence"]) == float(base["fgr_coherence"])


@settings(max_examples=15, deadline=None)
@given(t=st.integers(1, 4), seed=st.integers(0, 1000))
def test_matting_loss_is_zero_on_identical_inputs(t, seed):
    fgr, _, _, pha = random_clip(b=1, t=t, h=16, w=16, seed=seed)
    terms = losses.matting_loss(fgr, pha, fgr.clone(), pha.clone(), laplacian_levels=2)
    for name, value in terms.items():
        assert float(value) == 0.0, name


def test_matting_loss_gradients_flow():
    pred_fgr, pred_pha, true_fgr, true_pha = random_clip(h=32, w=32)
    pred_fgr.requires_grad_(True)
    pred_pha.requires_grad_(True)
    losses.matting_loss(pred_fgr, pred_pha, true_fgr, true_pha, 3)["total"].backward()
    assert torch.isfinite(pred_pha.grad).all() and pred_pha.grad.abs().sum() > 0
    assert pred_fgr.grad.abs().sum() > 0
    # no gradient reaches the foreground where the true alpha is zero
    assert pred_fgr.grad[(true_pha == 0).expand_as(pred_fgr)].abs().max() == 0


def test_matting_loss_shape_errors():
    fgr, pha, _, _ = random_clip(h=16, w=16)
    with pytest.raises(ValueError, match="pred_pha"):
        losses.matting_loss(fgr, fgr, fgr, pha)
    with pytest.raises(ValueError, match="differ in shape"):
        losses.matting_loss(fgr, pha, fgr[:, :, :, :8], pha[:, :, :, :8])


def np_transition_band(pha: np.ndarray, radius: int) -> np.ndarray:
    """pha: [N, H, W]; 1 where a window of side 2*radius+1 holds a value > 0 and one < 1."""
    size = (1, 2 * radius + 1, 2 * radius + 1)
    above0 = ndimage.maximum_filter((pha > 0).astype(float), size=size, mode="constant")
    below1 = ndimage.maximum_filter((pha < 1).astype(float), size=size, mode="constant")
    return above0 * below1


@settings(max_examples=20, deadline=None)
@given(radius=st.integers(0, 3), seed=st.integers(0, 1000))
def test_transition_band_matches_dilation(radius, seed):
    g = torch.Generator().manual_seed(seed)
    pha = (torch.rand(2, 3, 1, 12, 17, generator=g) * 3 - 1).clamp(0, 1)  # many exact 0s and 1s
    band = losses.transition_band(pha, radius)
    assert band.shape == pha.shape
    ref = np_transition_band(pha.reshape(-1, 12, 17).numpy(), radius)
    np.testing.assert_array_equal(band.reshape(-1, 12, 17).numpy(), ref)


def test_transition_band_of_a_hard_square_is_its_outline():
    pha = torch.zeros(1, 1, 1, 9, 9)
    pha[..., 3:6, 3:6] = 1.0
    assert losses.transition_band(pha, 0).sum() == 0  # no partial alpha
    band = losses.transition_band(pha, 1)[0, 0, 0]
    ring = torch.zeros(9, 9)
    ring[2:7, 2:7] = 1
    ring[4, 4] = 0  # the square's centre: every neighbour is 1
    assert torch.equal(band, ring)
    with pytest.raises(ValueError, match="radius"):
        losses.transition_band(pha, -1)


def test_edge_term_is_band_mean_l1_times_weight():
    pred_fgr, pred_pha, true_fgr, true_pha = (x.double() for x in random_clip(h=16, w=20))
    true_pha = (true_pha * 2 - 0.5).clamp(0, 1)  # exact 0s and 1s, so the band is not everything
    plain = losses.matting_loss(pred_fgr, pred_pha, true_fgr, true_pha, 2)
    assert "pha_edge_l1" not in plain  # edge_weight=0 is the official loss
    terms = losses.matting_loss(pred_fgr, pred_pha, true_fgr, true_pha, 2, edge_weight=0.7, edge_radius=1)
    band = np_transition_band(true_pha.numpy().reshape(-1, 16, 20), 1).reshape(true_pha.shape)
    assert 0 < band.mean() < 1
    err = np.abs(pred_pha.numpy() - true_pha.numpy())
    assert float(terms["pha_edge_l1"]) == pytest.approx(0.7 * (err * band).sum() / band.sum(), rel=1e-10)
    assert float(terms["total"]) == pytest.approx(float(plain["total"]) + float(terms["pha_edge_l1"]), rel=1e-10)
    # a clip with no edges at all (all background) adds zero, not NaN
    zeros = torch.zeros_like(true_pha)
    empty = losses.matting_loss(pred_fgr, pred_pha, true_fgr, zeros, 2, edge_weight=1.0, edge_radius=2)
    assert float(empty["pha_edge_l1"]) == 0.0
    with pytest.raises(ValueError, match="edge_weight"):
        losses.matting_loss(pred_fgr, pred_pha, true_fgr, true_pha, 2, edge_weight=-1.0)


def test_alpha_laplacian_and_coherence_weights_scale_their_terms_only():
    """loss.laplacian_weight / loss.coherence_weight: the alpha's two terms scale linearly (the
    defaults are the official 1 and 5); L1 and the foreground's terms do not move."""
    pred_fgr, pred_pha, true_fgr, true_pha = (x.double() for x in random_clip(h=16, w=20))
    official = losses.matting_loss(pred_fgr, pred_pha, true_fgr, true_pha, 2)
    same = losses.matting_loss(pred_fgr, pred_pha, true_fgr, true_pha, 2, laplacian_weight=1.0,
                               coherence_weight=losses.COHERENCE_WEIGHT)
    assert all(float(same[k]) == float(official[k]) for k in official)
    terms = losses.matting_loss(pred_fgr, pred_pha, true_fgr, true_pha, 2, laplacian_weight=0.25, coherence_weight=1.0)
    assert float(terms["pha_laplacian"]) == pytest.approx(0.25 * float(official["pha_laplacian"]), rel=1e-12)
    assert float(terms["pha_coherence"]) == pytest.approx(float(official["pha_coherence"]) / 5, rel=1e-12)
    for key in ("pha_l1", "fgr_l1", "fgr_coherence"):
        assert float(terms[key]) == float(official[key])
    parts = sum(float(v) for k, v in terms.items() if k != "total")
    assert float(terms["total"]) == pytest.approx(parts, rel=1e-12)
    zero = losses.matting_loss(pred_fgr, pred_pha, true_fgr, true_pha, 2, laplacian_weight=0, coherence_weight=0)
    assert float(zero["pha_laplacian"]) == 0 and float(zero["pha_coherence"]) == 0
    for name in ("laplacian_weight", "coherence_weight"):
        with pytest.raises(ValueError, match=name):
            losses.matting_loss(pred_fgr, pred_pha, true_fgr, true_pha, 2, **{name: -0.1})


def test_aux_loss_uses_downsampled_truth_and_quarter_weight():
    pred_fgr, pred_pha, true_fgr, true_pha = (x.double() for x in random_clip(h=16, w=24))
    small_fgr, small_pha = pred_fgr[..., :8, :12].clone(), pred_pha[..., :8, :12].clone()
    terms = losses.aux_matting_loss(small_fgr, small_pha, true_fgr, true_pha)
    # bilinear, align_corners=False, exact factor 2 == mean of each 2x2 block
    tf = true_fgr.numpy().reshape(2, 3, 3, 8, 2, 12, 2).mean(axis=(4, 6))
    tp = true_pha.numpy().reshape(2, 3, 1, 8, 2, 12, 2).mean(axis=(4, 6))
    pf, pp = small_fgr.numpy(), small_pha.numpy()
    mask = tp > 0
    ref = (
        np.abs(pp - tp).mean()
        + np_laplacian_loss(pp.reshape(-1, 8, 12), tp.reshape(-1, 8, 12), 1)
        + 5 * np_coherence(pp, tp)
        + np.abs(pf * mask - tf * mask).mean()
        + 5 * np_coherence(pf * mask, tf * mask)
    )
    assert float(terms["aux_total"]) == pytest.approx(0.25 * ref, rel=1e-10)
    assert all(name.startswith("aux_") for name in terms)


def test_segmentation_loss_is_bce_with_logits():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 1, 8, 8, generator=g, dtype=torch.float64)
    target = (torch.rand(2, 3, 1, 8, 8, generator=g) > 0.5).double()
    p = 1 / (1 + np.exp(-logits.numpy()))
    y = target.numpy()
    ref = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert float(losses.segmentation_loss(logits, target)) == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match="differ in shape"):
        losses.segmentation_loss(logits, target[:, :1])


def test_normalized_feature_mse_matches_formula_with_mask():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 2, 6, 4, 4, generator=g, dtype=torch.float64)  # [B, T, C, H, W]
    t = torch.randn(2, 2, 6, 4, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 2, 1, 8, 8, generator=g) > 0.5  # finer than the features
    ours = losses.normalized_feature_mse(s, t, mask)
    sn = s.numpy() / np.linalg.norm(s.numpy(), axis=2, keepdims=True)
    tn = t.numpy() / np.linalg.norm(t.numpy(), axis=2, keepdims=True)
    dist = ((sn - tn) ** 2).sum(axis=2)  # [B, T, H, W]
    m = mask.numpy()[:, :, 0, ::2, ::2]  # nearest-neighbour downsampling by 2 picks the even pixels
    assert float(ours) == pytest.approx((dist * m).sum() / m.sum(), rel=1e-10)
    assert float(losses.normalized_feature_mse(s, t)) == pytest.approx(dist.mean(), rel=1e-10)


def test_feature_mimic_loss_properties():
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn(3, 8, 4, 4, generator=g), torch.randn(3, 4, 8, 8, generator=g)]
    assert float(losses.feature_mimic_loss(feats, [f.clone() for f in feats])) == 0.0
    # the student mimics direction, not scale
    scaled = [f * 7.5 for f in feats]
    assert float(losses.feature_mimic_loss(feats, scaled)) == pytest.approx(0.0, abs=1e-6)
    empty = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    other = [torch.randn_like(f) for f in feats]
    assert float(losses.feature_mimic_loss(feats, other, empty)) == 0.0
    student = [f.clone().requires_grad_(True) for f in feats]
    loss = losses.feature_mimic_loss(student, other)
    assert 0 < float(loss.detach()) <= 4
    loss.backward()
    assert all(s.grad.abs().sum() > 0 for s in student)
    with pytest.raises(ValueError, match="differ in shape"):
        losses.feature_mimic_loss(feats, [other[1], other[0]])
    with pytest.raises(ValueError, match="same non-zero number"):
        losses.feature_mimic_loss(feats, other[:1])


def test_feature_recorder_takes_first_tensor_of_tuple_outputs():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return y, y * 0

    model = nn.Sequential(Block(), nn.ReLU())
    rec = losses.FeatureRecorder(model, ["0", "1"])
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="no output recorded"):
        rec.features()
    out = model[1](model[0](x)[0])
    block_out, relu_out = rec.features()
    torch.testing.assert_close(block_out, model[0].conv(x))
    torch.testing.assert_close(relu_out, out)
    rec.clear()
    rec.remove()
    model[1](model[0](x)[0])
    with pytest.raises(ValueError, match="no output recorded"):
        rec.features()
    with pytest.raises(ValueError, match="no submodule named nope"):
        losses.FeatureRecorder(model, ["nope"])
