"""Matting metrics: parity with the official RVM/BiMatting evaluator's outputs, formulas, properties."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from binarize.matting import metrics as M

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

CASES = range(4)
FRAMES = range(4)
SCALAR = {"pha_mad": M.mad, "pha_mse": M.mse, "pha_grad": M.grad, "pha_conn": M.conn}


@pytest.fixture(scope="module")
def reference():
    cases = np.load(FIXTURES / "metrics_cases.npz")
    expected = json.loads((FIXTURES / "metrics_expected.json").read_text())
    return cases, expected


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", sorted(SCALAR))
def test_matches_official_every_frame(reference, case, name):
    cases, expected = reference
    pred, true = cases[f"pred{case}"], cases[f"true{case}"]
    assert pred.shape[0] == len(expected[f"case{case}"][name]) == len(FRAMES)
    for i in FRAMES:
        want = expected[f"case{case}"][name][i]
        assert SCALAR[name](pred[i], true[i]) == pytest.approx(want, rel=1e-4, abs=1e-9), (name, case, i)


@pytest.mark.parametrize("case", CASES)
def test_dtssd_matches_official_every_frame(reference, case):
    cases, expected = reference
    got = M.dtssd_sequence(cases[f"pred{case}"], cases[f"true{case}"])
    want = expected[f"case{case}"]["pha_dtssd"]
    assert got[0] == 0.0 == want[0]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_frame_metrics_agrees_with_functions(reference):
    cases, expected = reference
    pred, true = cases["pred2"], cases["true2"]
    out = M.frame_metrics(M.ALPHA_METRICS, pred[1], true[1], prev=(pred[0], true[0]))
    for name in M.ALPHA_METRICS:
        assert out[name] == pytest.approx(expected["case2"][name][1], rel=1e-4)
    first = M.frame_metrics(("pha_dtssd",), pred[0], true[0], prev=None)
    assert first == {"pha_dtssd": 0.0}


def test_gradient_filter_shape_and_norm():
    fx, fy = M.gaussian_gradient_filters(1.4)
    assert fx.shape == (9, 9)
    np.testing.assert_allclose(np.sqrt((fx**2).sum()), 1.0)
    np.testing.assert_array_equal(fy, fx.T)
    # derivative along columns: odd in j, even in i
    np.testing.assert_allclose(fx, -fx[:, ::-1])
    np.testing.assert_allclose(fx, fx[::-1, :])
    assert fx[4, 3] > 0 > fx[4, 5]


def test_mad_mse_values():
    true = np.zeros((4, 5), np.float32)
    pred = np.full((4, 5), 0.5, np.float32)
    pred[0, 0] = 1.0
    assert M.mad(pred, true) == pytest.approx((19 * 0.5 + 1.0) / 20 * 1e3)
    assert M.mse(pred, true) == pytest.approx((19 * 0.25 + 1.0) / 20 * 1e3)


def test_dtssd_value():
    rng = np.random.default_rng(0)
    a, b, c, d = (rng.random((6, 7)).astype(np.float32) for _ in range(4))
    expected = np.sqrt((((a - b) - (c - d)) ** 2).mean()) * 100
    assert M.dtssd(a, b, c, d) == pytest.approx(expected, rel=1e-6)
    # a constant temporal offset shared by pred and truth is not an error
    assert M.dtssd(a + 0.1, a, c + 0.1, c) == pytest.approx(0.0, abs=1e-4)


def test_grad_ignores_scale_with_normalisation_but_not_without():
    rng = np.random.default_rng(1)
    true = rng.random((20, 24)).astype(np.float32)
    assert M.grad(true * 0.5, true) == pytest.approx(0.0, abs=1e-9)
    assert M.grad(true * 0.5, true, normalize=False) > 1e-4
    const = np.full((10, 10), 0.3, np.float32)
    assert M.grad(const, np.zeros_like(const)) == 0.0


def test_conn_step_edge():
    # true alpha is a hard disc; a prediction that fills it with 0.5 loses connectivity above 0.5
    yy, xx = np.mgrid[:32, :32]
    true = ((yy - 16) ** 2 + (xx - 16) ** 2 < 80).astype(np.float32)
    pred = true * 0.5
    # level is 0.5 inside (last threshold still connected); phi_true = 1 - 0.5, phi_pred = 1
    assert M.conn(pred, true) == pytest.approx(true.sum() * 0.5 / 1000, rel=1e-6)
    assert M.conn(true, true) == 0.0


def test_fgr_metrics_only_under_true_alpha():
    true_pha = np.zeros((4, 4), np.float32)
    true_pha[:2] = 0.2
    true_fgr = np.zeros((4, 4, 3), np.float32)
    pred_fgr = true_fgr.copy()
    pred_fgr[2:] = 1.0  # errors where alpha == 0 are ignored
    assert M.fgr_mad(pred_fgr, true_fgr, true_pha) == 0.0
    pred_fgr[0, 0] = 0.5
    assert M.fgr_mad(pred_fgr, true_fgr, true_pha) == pytest.approx(0.5 * 3 / 24 * 1e3)
    assert M.fgr_mse(pred_fgr, true_fgr, true_pha) == pytest.approx(0.25 * 3 / 24 * 1e3)
    assert M.fgr_mse(pred_fgr, true_fgr, np.zeros((4, 4))) == 0.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: M.mad(np.zeros((2, 3)), np.zeros((3, 2))), "shape mismatch"),
        (lambda: M.grad(np.zeros((2, 3, 3)), np.zeros((2, 3, 3))), "H x W"),
        (lambda: M.conn(np.zeros(4), np.zeros(4)), "H x W"),
        (lambda: M.fgr_mse(np.zeros((2, 2, 3)), np.zeros((2, 2, 3)), np.zeros((3, 3))), "foreground"),
        (lambda: M.frame_metrics(("nope",), np.zeros((2, 2)), np.zeros((2, 2))), "unknown metric"),
    ],
)
def test_bad_input_messages(call, message):
    with pytest.raises(ValueError, match=message):
        call()


alphas = arrays(np.float32, st.tuples(st.integers(2, 12), st.integers(2, 12)),
                elements=st.floats(0, 1, width=32))


@settings(max_examples=40, deadline=None)
@given(alphas, st.data())
def test_properties(pred, data):
    true = data.draw(arrays(np.float32, pred.shape, elements=st.floats(0, 1, width=32)))
    for fn in (M.mad, M.mse, M.grad, M.conn):
        assert fn(true, true) == 0.0
        assert fn(pred, true) >= 0.0
    assert M.mad(pred, true) == M.mad(true, pred)
    assert M.mse(pred, true) == M.mse(true, pred)
    assert M.grad(pred, true) == pytest.approx(M.grad(true, pred), rel=1e-6)
    # MSE <= MAD for differences bounded by 1; both at most 1e3
    assert M.mse(pred, true) <= M.mad(pred, true) + 1e-3 <= 1e3 + 1e-3
    assert M.dtssd(pred, pred, true, true) == 0.0
    assert M.dtssd(pred, true, pred, true) == 0.0
