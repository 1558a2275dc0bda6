"""benchmarks/bimatting_clips.py: held-out scoring of BiMatting checkpoints and the stretch probe."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bimatting_clips", ROOT / "benchmarks" / "bimatting_clips.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_loss_terms_match_the_official_loss(bench):
    """The alpha terms reported per clip are those losses.matting_loss computes on the clip."""
    import torch

    from binarize.matting import losses

    rng = np.random.default_rng(0)
    true = (rng.random((3, 64, 64)) > 0.5).astype(np.float32)
    pred = rng.random((3, 64, 64)).astype(np.float32)
    terms = bench.loss_terms(pred, true)
    fgr = torch.zeros(1, 3, 3, 64, 64)
    official = losses.matting_loss(fgr, torch.from_numpy(pred)[None, :, None], fgr, torch.from_numpy(true)[None, :, None])
    for key in ("pha_l1", "pha_laplacian", "pha_coherence"):
        assert terms[key] == pytest.approx(float(official[key]), rel=1e-6)
    assert terms["alpha_loss"] == pytest.approx(terms["pha_l1"] + terms["pha_laplacian"] + terms["pha_coherence"])
    assert terms["pha_l1"] == pytest.approx(float(np.abs(pred - true).mean()), rel=1e-6)


def test_stretch_is_a_clamped_affine_map(bench):
    pred = np.array([0.0, 0.1, 0.5, 0.7, 1.0])
    np.testing.assert_allclose(bench.stretched(pred, 1.5, -0.15), [0.0, 0.0, 0.6, 0.9, 1.0], atol=1e-12)
    np.testing.assert_array_equal(bench.stretched(pred, 1.0, 0.0), pred)


@pytest.mark.parametrize("argv,message", [
    (["--stretch", "1,2,3"], "--stretch must be B,C"),
    (["--stretch", "0,0.1"], "--stretch scale must be > 0"),
    (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
    (["--size", "256"], "--size must be WxH"),
    (["--size", "128x32"], "--size must be at least 64x64"),
    (["--frames", "1"], "--frames must be >= 2"),
    (["--checkpoint", "no/such.safetensors"], "checkpoint not found"),
])
def test_bad_arguments_are_one_line_errors_before_any_model_loads(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_tiny_run_scores_the_bundled_weights_and_the_stretch(bench, tmp_path, capsys):
    """Two short clips: per-clip scores equal binarize demo's scoring of the same prediction, the
    all-zero reference is there, the identity stretch reproduces the model, and the JSON is whole."""
    out = tmp_path / "clips.json"
    assert bench.main(["--seeds", "2023,1", "--frames", "3", "--size", "64x64", "--stretch", "1,0",
                       "--stretch", "1.4,-0.1", "--json", str(out), "--no-progress",
                       "--image", str(tmp_path / "alphas.png")]) == 0
    table = capsys.readouterr().out
    assert "| bundled |" in table and "| bundled stretch 1.4,-0.1 |" in table and "all-zero alpha" in table
    payload = json.loads(out.read_text())
    assert not list(tmp_path.glob(".*partial"))
    model, same = payload["results"]["bundled"], payload["results"]["bundled stretch 1,0"]
    assert model["per_clip"] == same["per_clip"]
    assert set(model["per_clip"]) == {"2023", "1"} and set(payload["all_zero"]) == {"2023", "1"}
    zero = payload["all_zero"]["2023"]
    from binarize.cli.demo import make_clip

    clip = make_clip(3, (64, 64), 2023)
    assert zero["pha_mad"] == pytest.approx(float(np.abs(clip["pha"]).mean() * 1e3), rel=1e-5)
    mad = [c["pha_mad"] for c in model["per_clip"].values()]
    assert model["mean"]["pha_mad"] == pytest.approx(float(np.mean(mad)))
    from PIL import Image

    image = np.asarray(Image.open(tmp_path / "alphas.png"))
    assert image.shape == (64 + 14, 3 * 64, 3)  # input | ground truth | the bundled alpha
    np.testing.assert_array_equal(image[14:, :64], clip["src"][1])
    np.testing.assert_array_equal(image[14:, 64:128, 0], np.round(clip["pha"][1] * 255).astype(np.uint8))
