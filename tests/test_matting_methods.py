"""benchmarks/matting_methods.py: the budget's configs, the scoring, the table and a tiny run."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest
import torch

from binarize.matting.inference import matte_clip

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("matting_methods", ROOT / "benchmarks" / "matting_methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_every_model_gets_the_same_two_phases(bench, tmp_path):
    """Same steps, data, seed and schedule for all: only the model (and phase 1's precision of the
    binary models, ReActNet's step 1) differs."""
    budget = bench.Budget(steps=10, size=(64, 64))
    configs = {key: [bench.phase_config(bench.MODELS[key], budget, phase, tmp_path / key, None) for phase in (1, 2)]
               for key in ("rvm_mobilenetv3", "bimatting", "rvm_fda")}
    for key, (first, second) in configs.items():
        assert first["data"]["synthetic"] == {"clips": 20, "frames": 2, "size": [64, 64], "seed": 0}
        assert second["data"]["synthetic"]["seed"] == 1
        assert first["optim"]["lr"]["backbone"] == 2 * second["optim"]["lr"]["backbone"]
        assert second["optim"]["warmup_steps"] == 1 and first["optim"]["warmup_steps"] == 0
        assert second["model"]["precision"] == "binary"
        assert first["model"]["precision"] == ("binary" if key == "rvm_mobilenetv3" else "latent_weights")
    assert configs["rvm_fda"][0]["model"]["kwargs"] == {"method": "fda"}


def test_float_one_phase_gives_the_32bit_model_one_decay_over_the_same_steps(bench, tmp_path):
    """--float-one-phase: the full-precision model trains in one phase of all the steps (as many
    clips, the same clips per step, frames, size and peak rate, no warm-up); the binary models keep
    their two phases; --lr sets the peak rate of every model."""
    budget = bench.parse_args(["--steps", "10", "--size", "64x64", "--lr", "2e-3", "--float-one-phase"]).budget
    assert budget.lr == 2e-3 and budget.float_one_phase
    rvm = bench.MODELS["rvm_mobilenetv3"]
    assert bench.phases(rvm, budget) == [bench.Phase(10, 2e-3, 0, 0, "binary")]
    (only,) = [bench.phase_config(rvm, budget, 1, tmp_path / "rvm", None)]
    assert only["data"]["synthetic"] == {"clips": 40, "frames": 2, "size": [64, 64], "seed": 0}
    assert only["optim"]["lr"]["decoder"] == 2e-3 and only["optim"]["warmup_steps"] == 0
    assert only["optim"]["scheduler"] == "cosine"
    binary = bench.phases(bench.MODELS["bimatting"], budget)
    assert [(p.steps, p.lr, p.data_seed, p.precision) for p in binary] == [
        (5, 2e-3, 0, "latent_weights"), (5, 1e-3, 1, "binary")]
    two = bench.Budget(steps=10, size=(64, 64))
    assert len(bench.phases(rvm, two)) == 2
    assert bench.final_checkpoint("rvm_mobilenetv3", tmp_path, budget) == tmp_path / "runs" / "rvm_mobilenetv3" / "phase1" / "last.pt"
    assert bench.final_checkpoint("rvm_mobilenetv3", tmp_path, two).parent.name == "phase2"
    with pytest.raises(SystemExit):
        bench.parse_args(["--lr", "0"])


def test_keep_depthwise_reaches_the_converted_rvms_only(bench, tmp_path):
    """--keep-depthwise (the baselines' definition of the older tables) sets ``keep_depthwise`` in
    the converted RVMs' model kwargs and nowhere else; by default the paper's binary depthwise convs."""
    kept = bench.Budget(steps=10, size=(64, 64), keep_depthwise=True)
    kwargs = {key: bench.phase_config(bench.MODELS[key], kept, 1, tmp_path / key, None)["model"]["kwargs"]
              for key in ("rvm_mobilenetv3", "bimatting", "rvm_bnn", "rvm_fda")}
    assert kwargs == {"rvm_mobilenetv3": {}, "bimatting": {}, "rvm_bnn": {"keep_depthwise": True},
                      "rvm_fda": {"method": "fda", "keep_depthwise": True}}
    default = bench.Budget(steps=10, size=(64, 64))
    assert bench.phase_config(bench.MODELS["rvm_bnn"], default, 1, tmp_path / "d", None)["model"]["kwargs"] == {}
    assert bench.parse_args(["--keep-depthwise"]).budget.keep_depthwise
    assert not bench.parse_args([]).budget.keep_depthwise


def test_resume_reads_an_older_budget_as_full_precision_depthwise(bench, tmp_path):
    """A budget.json written before --keep-depthwise existed trained the baselines with 32-bit
    depthwise convs: --resume continues it only with --keep-depthwise."""
    out = tmp_path / "out"
    argv = ["--models", "bimatting", "--steps", "2", "--size", "64x64", "--frames", "2", "--clips-per-step", "1",
            "--eval-clips", "1", "--eval-frames", "2", "--out", str(out)]
    assert bench.main(argv) == 0
    old = json.loads((out / "budget.json").read_text())
    assert old.pop("keep_depthwise") is False and old.pop("float_one_phase") is False
    (out / "budget.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="another budget"):
        bench.main(argv + ["--resume"])
    assert bench.main(argv + ["--resume", "--keep-depthwise"]) == 0


def test_scores_and_table(bench):
    """A perfect alpha scores 0 everywhere; the all-zero alpha scores its MAD = 1e3 * mean alpha;
    the table has a row per result."""
    budget = bench.Budget(size=(64, 64))
    clips = bench.eval_clips(budget, clips=1, frames=3, seed=1)
    (src, true), = clips
    assert src.shape == (3, 64, 64, 3) and src.dtype == np.uint8 and true.shape == (3, 64, 64)
    perfect = bench.score_clips([true], clips)
    assert all(value == pytest.approx(0.0, abs=1e-6) for value in perfect.values())
    zero = bench.zero_reference(clips)
    assert zero["pha_mad"] == pytest.approx(1e3 * float(true.mean()), rel=1e-4)
    table = bench.format_table([zero])
    assert table.count("\n") == 2 and "all_zero" in table
    half = [np.concatenate([true[:1], np.zeros_like(true[1:])])]  # right on frame 0, all-zero after
    by_frame = bench.mad_by_frame(half, clips)
    assert by_frame[0] == 0.0 and by_frame[1:] == pytest.approx(1e3 * true[1:].mean(axis=(1, 2)), abs=0.01)


def test_dtssd_parts_split_the_temporal_error_by_region(bench):
    """A hand-worked pair of 2x2 frames: flicker on a static background pixel and a static subject
    pixel, an undershoot where the true alpha moves; the parts add up to the mean square (x1e4)."""
    true = np.array([[[0.0, 0.0], [1.0, 0.5]], [[0.0, 1.0], [1.0, 0.5]]], dtype=np.float32)
    pred = np.array([[[0.1, 0.0], [1.0, 0.5]], [[0.0, 0.8], [0.9, 0.5]]], dtype=np.float32)
    clips = [(None, true)]
    parts = bench.dtssd_parts([pred], clips)
    assert parts == pytest.approx({"static_background": 0.01 / 4 * 1e4, "static_subject": 0.01 / 4 * 1e4,
                                   "moving": 0.04 / 4 * 1e4}, rel=1e-5)
    assert sum(parts.values()) == pytest.approx((((pred[1] - pred[0]) - (true[1] - true[0])) ** 2).mean() * 1e4)
    assert bench.dtssd_parts([true], clips) == {"static_background": 0.0, "static_subject": 0.0, "moving": 0.0}
    zero = bench.dtssd_parts([np.zeros_like(true)], clips)  # no flicker, all the motion missed
    assert zero == pytest.approx({"static_background": 0.0, "static_subject": 0.0, "moving": 1.0 / 4 * 1e4})
    table = bench.format_dtssd_parts([{"model": "m", "pha_dtssd_parts": parts}])
    assert table.splitlines()[-1] == "| m | 25.00 | 25.00 | 100.00 | 150.00 |"


def test_write_atomically_leaves_nothing_behind_a_failed_write(bench, tmp_path):
    """A write that raises leaves the earlier file as it was and no temporary file; one that
    returns replaces it."""
    path = tmp_path / "all.json"
    path.write_text("earlier")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        bench.write_atomically(path, fail)
    assert path.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["all.json"]
    bench.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["all.json"]


class _Recurrent(torch.nn.Module):
    """A toy matting model whose alpha is the frame's mean plus 0.1 per frame of state it carries."""

    def forward(self, x, r1, r2, r3, r4, downsample_ratio=1.0):
        age = torch.zeros(()) if r1 is None else r1 + 1
        pha = (x.mean() + 0.1 * age).expand(1, 1, *x.shape[-2:])
        return x, pha, age, r2, r3, r4


def test_matte_clip_carries_the_state_or_mattes_every_frame_alone(bench):
    """With the state the toy model's alpha grows 0.1 a frame; alone every frame is its first."""
    src = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    with_state = matte_clip(_Recurrent(), src)
    alone = matte_clip(_Recurrent(), src, recurrent=False)
    assert with_state[:, 0, 0] == pytest.approx([0.0, 0.1, 0.2]) and alone[:, 0, 0] == pytest.approx([0.0, 0.0, 0.0])
    table = bench.format_stateless([{"model": "m", "pha_mad": 1.0, "pha_dtssd": 2.0,
                                     "pha_dtssd_parts": {"static_subject": 3.0},
                                     "stateless": {"pha_mad": 4.0, "pha_dtssd": 5.0,
                                                   "pha_dtssd_parts": {"static_subject": 6.0}}}])
    assert table.splitlines()[-1] == "| m | 1.0 | 4.0 | 2.00 | 5.00 | 3.00 | 6.00 |"


def test_plot_labels_at_the_same_ops_do_not_overlap(bench):
    """Labels of models at the same OPs are spread to at least the gap apart, in MAD order; a
    model alone at its OPs keeps its label at its own MAD."""
    results = [{"ops": 1.6e7, "pha_mad": mad} for mad in (50.0, 49.0, 51.0, 300.0)] + [{"ops": 3.7e7, "pha_mad": 49.5}]
    heights = bench.label_heights(results, zero_mad=125.0, gap=0.05)
    step = 0.05 * (300.0 - 49.0)
    assert heights[1] == 49.0 and heights[0] == pytest.approx(49.0 + step) and heights[2] == pytest.approx(49.0 + 2 * step)
    assert heights[3] == 300.0 and heights[4] == 49.5


def test_a_tiny_budget_trains_scores_profiles_and_resumes(bench, tmp_path):
    """Two steps of BiMatting at 64x64: the result file carries the metrics and costs, and --resume
    reads it back instead of training again."""
    out = tmp_path / "out"
    argv = ["--models", "bimatting", "--steps", "2", "--size", "64x64", "--frames", "3", "--clips-per-step", "1",
            "--eval-clips", "1",
            "--eval-frames", "2", "--out", str(out), "--json", str(tmp_path / "all.json")]
    assert bench.main(argv) == 0
    result = json.loads((out / "bimatting.json").read_text())
    assert set(bench.METRIC_NAMES) <= set(result) and result["ops"] > 0 and 0 < result["storage_bytes"] < 1e6
    assert len(result["pha_mad_by_frame"]) == 2
    assert set(result["pha_dtssd_parts"]) == {"static_background", "static_subject", "moving"}
    assert set(bench.METRIC_NAMES) <= set(result["stateless"]) and "pha_dtssd_parts" in result["stateless"]
    budget = json.loads((out / "budget.json").read_text())
    assert budget["frames"] == 3 and budget["clips_per_step"] == 1
    assert (out / "runs" / "bimatting" / "phase2" / "last.pt").is_file()
    older = {key: value for key, value in result.items() if key not in bench.DIAGNOSTICS}
    (out / "bimatting.json").write_text(json.dumps({**older, "pha_mad": -1.0}))
    assert bench.main(argv + ["--resume"]) == 0
    resumed = json.loads((tmp_path / "all.json").read_text())["results"][0]
    assert resumed["pha_mad"] == -1.0  # read back, not trained or scored again ...
    assert resumed["pha_dtssd_parts"] == pytest.approx(result["pha_dtssd_parts"])  # ... but the missing parts added
    assert resumed["stateless"]["pha_mad"] == pytest.approx(result["stateless"]["pha_mad"])
    assert json.loads((out / "bimatting.json").read_text())["pha_dtssd_parts"] == resumed["pha_dtssd_parts"]


def test_a_second_held_out_set_is_scored_from_the_checkpoint_once(bench, tmp_path):
    """--second-eval-seed scores a finished model again on other clips, from its phase-2 checkpoint,
    stores it with the model's result and the all-zero reference with the JSON, and keeps it on
    --resume; the same seed as --eval-seed is refused."""
    out = tmp_path / "out"
    argv = ["--models", "bimatting", "--steps", "2", "--size", "64x64", "--frames", "2", "--clips-per-step", "1",
            "--eval-clips", "1", "--eval-frames", "2", "--out", str(out), "--json", str(tmp_path / "all.json")]
    assert bench.main(argv) == 0
    assert "second_eval" not in json.loads((out / "bimatting.json").read_text())
    assert bench.main(argv + ["--resume", "--second-eval-seed", "3"]) == 0
    result = json.loads((out / "bimatting.json").read_text())
    second = result["second_eval"]
    assert second["seed"] == 3 and len(second["pha_mad_by_frame"]) == 2 and set(bench.METRIC_NAMES) <= set(second)
    assert second["pha_mad"] != result["pha_mad"]  # other clips, other score
    clips = bench.eval_clips(bench.Budget(size=(64, 64)), clips=1, frames=2, seed=3)
    zero = json.loads((tmp_path / "all.json").read_text())["second_eval"]
    assert zero["seed"] == 3 and zero["all_zero"]["pha_mad"] == pytest.approx(1e3 * float(clips[0][1].mean()), rel=1e-4)
    (out / "bimatting.json").write_text(json.dumps({**result, "second_eval": {**second, "pha_mad": -1.0}}))
    assert bench.main(argv + ["--resume", "--second-eval-seed", "3"]) == 0
    assert json.loads((out / "bimatting.json").read_text())["second_eval"]["pha_mad"] == -1.0
    with pytest.raises(SystemExit):
        bench.main(argv + ["--second-eval-seed", "1"])


def test_a_one_phase_32bit_run_is_scored_from_its_only_phase(bench, tmp_path):
    """With --float-one-phase the 32-bit model trains one phase, and the second held-out set is
    scored from that phase's checkpoint; --resume refuses to mix it with a two-phase budget."""
    out = tmp_path / "out"
    argv = ["--models", "rvm_mobilenetv3", "--steps", "2", "--size", "64x64", "--frames", "2", "--clips-per-step", "1",
            "--eval-clips", "1", "--eval-frames", "2", "--out", str(out), "--float-one-phase"]
    assert bench.main(argv + ["--second-eval-seed", "3"]) == 0
    runs = out / "runs" / "rvm_mobilenetv3"
    assert sorted(p.name for p in runs.iterdir()) == ["phase1"] and (runs / "phase1" / "last.pt").is_file()
    result = json.loads((out / "rvm_mobilenetv3.json").read_text())
    assert result["second_eval"]["seed"] == 3 and result["steps"] == 2
    assert json.loads((out / "budget.json").read_text())["float_one_phase"] is True
    with pytest.raises(SystemExit, match="another budget"):
        bench.main([a for a in argv if a != "--float-one-phase"] + ["--resume"])
