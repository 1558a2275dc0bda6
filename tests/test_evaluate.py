"""Evaluation over the official benchmark layout: values, aggregation, reports, errors, CLI."""
from __future__ import annotations

import csv
import json
import os
import pathlib

import numpy as np
import pytest

from binarize.cli.main import main
from binarize.matting import metrics as M
from binarize.matting.data.imageio import save_gray, save_rgb
from binarize.matting.evaluate import evaluate, find_clips

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _write_clip(root: pathlib.Path, dataset: str, clip: str, pha: np.ndarray, fgr=None) -> None:
    for kind in ("pha",) + (("fgr",) if fgr is not None else ()):
        (root / dataset / clip / kind).mkdir(parents=True, exist_ok=True)
    for t in range(len(pha)):
        save_gray(root / dataset / clip / "pha" / f"{t:04d}.png", pha[t])
        if fgr is not None:
            save_rgb(root / dataset / clip / "fgr" / f"{t:04d}.png", fgr[t])


@pytest.fixture(scope="module")
def official_cases(tmp_path_factory):
    """The reference cases written as 8-bit PNG clips: case i -> videomatte_static/000i."""
    root = tmp_path_factory.mktemp("bench")
    cases = np.load(FIXTURES / "metrics_cases.npz")
    for i in range(4):
        _write_clip(root / "pred", "videomatte_static", f"{i:04d}", cases[f"pred{i}"])
        _write_clip(root / "true", "videomatte_static", f"{i:04d}", cases[f"true{i}"])
    return root


def test_matches_official_values_through_files(official_cases, tmp_path):
    expected = json.loads((FIXTURES / "metrics_expected.json").read_text())
    result = evaluate(official_cases / "pred", official_cases / "true", output_dir=tmp_path, progress=False)
    assert result.metrics == M.ALPHA_METRICS  # no fgr folders -> alpha metrics only
    assert [c.clip for c in result.clips] == ["0000", "0001", "0002", "0003"]
    for i, clip in enumerate(result.clips):
        for name in M.ALPHA_METRICS:
            np.testing.assert_allclose(clip.values[name], expected[f"case{i}"][name], rtol=1e-4, atol=1e-9)
    summary = result.summary()
    for name in M.ALPHA_METRICS:
        per_clip = [np.mean(expected[f"case{i}"][name]) for i in range(4)]
        assert summary[name] == pytest.approx(np.mean(per_clip), rel=1e-4)


def test_reports_written(official_cases, tmp_path):
    result = evaluate(official_cases / "pred", official_cases / "true", metrics=["pha_mad", "pha_dtssd"],
                      output_dir=tmp_path, progress=False)
    with open(tmp_path / "pred_clips.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["clip"] for r in rows] == ["0000", "0001", "0002", "0003"]
    assert float(rows[2]["pha_mad"]) == pytest.approx(result.clips[2].mean("pha_mad"), rel=1e-5)
    with open(tmp_path / "pred_frames.csv") as handle:
        frames = list(csv.DictReader(handle))
    assert len(frames) == 16 and frames[0]["frame"] == "0000.png" and float(frames[0]["pha_dtssd"]) == 0.0
    with open(tmp_path / "pred_summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert summary[0]["dataset"] == "all"
    assert float(summary[0]["pha_mad"]) == pytest.approx(result.summary()["pha_mad"], rel=1e-5)
    markdown = (tmp_path / "pred.md").read_text()
    assert markdown.startswith("| dataset | clips | pha_mad | pha_dtssd |")
    assert f"{result.summary()['pha_mad']:.4f}" in markdown
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_foreground_metrics_and_official_aggregation(tmp_path):
    rng = np.random.default_rng(0)
    clips = {("videomatte_motion", "0000"): 3, ("videomatte_static", "0000"): 5}
    expected = {}
    for (dataset, clip), frames in clips.items():
        true_pha = np.round(rng.random((frames, 12, 16)) * 255) / 255
        true_pha[:, :4] = 0
        pred_pha = np.clip(true_pha + rng.normal(0, 0.1, true_pha.shape), 0, 1)
        true_fgr, pred_fgr = rng.random((frames, 12, 16, 3)), rng.random((frames, 12, 16, 3))
        _write_clip(tmp_path / "true", dataset, clip, true_pha, true_fgr)
        _write_clip(tmp_path / "pred", dataset, clip, pred_pha, pred_fgr)
        q = lambda a: (np.rint(a * 255) / 255).astype(np.float32)  # noqa: E731  8-bit round trip
        expected[dataset] = [M.fgr_mse(q(pred_fgr[t]), q(true_fgr[t]), q(true_pha[t])) for t in range(frames)]
    result = evaluate(tmp_path / "pred", tmp_path / "true", write=False, num_workers=2, progress=False)
    assert result.metrics == M.METRICS
    motion, static = result.clips
    np.testing.assert_allclose(motion.values["fgr_mse"], expected["videomatte_motion"], rtol=1e-5)
    np.testing.assert_allclose(static.values["fgr_mse"], expected["videomatte_static"], rtol=1e-5)
    # official: mean over frame indices of the mean over the clips having that frame
    a, b = motion.values["pha_mad"], static.values["pha_mad"]
    official = np.mean([(a[0] + b[0]) / 2, (a[1] + b[1]) / 2, (a[2] + b[2]) / 2, b[3], b[4]])
    assert result.summary()["pha_mad"] == pytest.approx(official, rel=1e-9)
    assert result.summary("videomatte_static")["pha_mad"] == pytest.approx(np.mean(b), rel=1e-9)
    assert result.summary()["pha_mad"] != pytest.approx(np.mean(a + b), rel=1e-6)
    hr = evaluate(tmp_path / "pred", tmp_path / "true", protocol="hr", write=False, progress=False)
    assert hr.metrics == ("pha_mad", "pha_mse", "pha_grad", "pha_dtssd", "fgr_mse")


def test_single_dataset_root(official_cases):
    clips = find_clips(official_cases / "pred" / "videomatte_static")
    assert clips == [(".", f"{i:04d}") for i in range(4)]
    result = evaluate(official_cases / "pred" / "videomatte_static", official_cases / "true" / "videomatte_static",
                      metrics=["pha_mse"], write=False, progress=False)
    assert len(result.clips) == 4


def _bench(tmp_path, frames_pred=2, frames_true=2):
    pha = np.zeros((3, 8, 8))
    _write_clip(tmp_path / "pred", "d", "0000", pha[:frames_pred])
    _write_clip(tmp_path / "true", "d", "0000", pha[:frames_true])
    return tmp_path / "pred", tmp_path / "true"


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prediction directory not found"):
        evaluate(tmp_path / "missing", tmp_path, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no clips found"):
        evaluate(tmp_path / "empty", tmp_path / "empty", progress=False)
    pred, true = _bench(tmp_path / "a", frames_pred=3, frames_true=2)
    with pytest.raises(ValueError, match="3 predicted pha frames but 2 true frames"):
        evaluate(pred, true, write=False, progress=False)
    pred, true = _bench(tmp_path / "b")
    (pred / "d" / "0000" / "pha" / "0001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*0001.png"):
        evaluate(pred, true, write=False, progress=False)
    pred, true = _bench(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no fgr folder"):
        evaluate(pred, true, metrics=["fgr_mad"], write=False, progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(pred, true, metrics=["sad"], write=False, progress=False)
    save_gray(pred / "d" / "0000" / "pha" / "0000.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match="sizes differ"):
        evaluate(pred, true, write=False, progress=False)
    pred, true = _bench(tmp_path / "e")
    (true / "d" / "0000").rename(true / "d" / "0001")
    with pytest.raises(FileNotFoundError, match="no ground-truth clip folder"):
        evaluate(pred, true, write=False, progress=False)


def test_reports_are_readable_by_others(official_cases, tmp_path):
    # written through a private temporary file (mkstemp, 0600) and renamed: they used to stay 0600
    old = os.umask(0o022)
    try:
        evaluate(official_cases / "pred", official_cases / "true", metrics=["pha_mad"], output_dir=tmp_path,
                 progress=False)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "pred_summary.csv": 0o644, "pred_clips.csv": 0o644, "pred_frames.csv": 0o644, "pred.md": 0o644}


def test_cli(official_cases, tmp_path, capsys):
    code = main(["evaluate", "--pred-dir", str(official_cases / "pred"), "--true-dir", str(official_cases / "true"),
                 "--output-dir", str(tmp_path), "--metrics", "pha_mad", "pha_conn", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| all | 4 |" in out and (tmp_path / "pred_summary.csv").exists()
    assert main(["evaluate", "--pred-dir", str(tmp_path / "nope"), "--true-dir", str(tmp_path)]) == 2
    assert "prediction directory not found" in capsys.readouterr().err


def test_synthetic_benchmark_round_trip(tmp_path):
    """`binarize data synth`'s evaluation layout: perfect predictions score 0, a blurred alpha does not."""
    from scipy import ndimage

    from binarize.matting.data import write_synthetic
    from binarize.matting.data.imageio import list_images, read_gray

    out = write_synthetic(tmp_path / "syn", clips=1, frames=3, size=(32, 24), seed=1, eval_clips=2, progress=False)
    truth = out / "videomatte_32x24"
    perfect = evaluate(truth, truth, write=False, progress=False)
    assert perfect.metrics == M.METRICS
    assert all(v == 0.0 for v in perfect.summary().values())
    for clip in ("0000", "0001"):
        src = truth / "videomatte_static" / clip
        dst = tmp_path / "pred" / "videomatte_static" / clip / "pha"
        dst.mkdir(parents=True)
        for name in list_images(src / "pha"):
            save_gray(dst / name, ndimage.uniform_filter(read_gray(src / "pha" / name), 3))
    blurred = evaluate(tmp_path / "pred", truth, write=False, progress=False)
    assert blurred.metrics == M.ALPHA_METRICS  # the prediction has no fgr folders
    assert blurred.summary()["pha_mad"] > 0 and blurred.summary()["pha_grad"] > 0
