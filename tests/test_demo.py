"""``binarize demo`` end to end at a tiny size, and the bundled checkpoint it relies on."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from binarize.cli import demo
from binarize.cli.main import main
from binarize.cli.matte import select_engine
from binarize.engine import _lib, available, deploy
from binarize.matting.inference import matte_clip


def count_frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_bundled_checkpoint_is_compact_bimatting():
    path = demo.bundled_checkpoint()
    assert path.is_file(), "the bundled demo checkpoint is missing"
    assert path.stat().st_size < 1_000_000
    from binarize.models.checkpoint import read_config

    assert read_config(path)["model"] == "bimatting"


def test_demo_end_to_end_tiny(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "COMPARE_FRAMES", 2)  # the side-by-side timing, kept short
    out = tmp_path / "demo"
    assert main(["demo", "--frames", "3", "--size", "64x48", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "fps" in printed and "MAD" in printed and "storage" in printed
    lines = printed.splitlines()
    expected = "packed" if available() else "simulated"  # --engine auto on the CPU
    assert lines[0].startswith(f"binarize demo: bimatting on the {expected} engine (auto: ")
    compare = [line for line in lines if "side by side on this clip" in line]
    assert len(compare) == 1 and "simulated" in compare[0] and "rvm_mobilenetv3 (32-bit)" in compare[0]
    assert count_frames(out / "composite.mp4") == 3
    assert count_frames(out / "alpha.mp4") == 3
    assert Image.open(out / "side_by_side.png").size == (3 * 64, 48)
    assert sorted(p.name for p in (out / "input").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 3 and summary["fps"] > 0 and summary["engine"] == expected
    rows = ["deployed", "simulated", "rvm_mobilenetv3"] if available() else ["simulated", "rvm_mobilenetv3"]
    assert list(summary["compare_fps"]) == rows and all(v > 0 for v in summary["compare_fps"].values())
    # the reported MAD is the one recomputed from the alpha of the model the demo ran, on the same clip
    model, _ = demo.load_model(None)
    if expected == "packed":
        model = deploy(model)
    clip = demo.make_clip(3, (64, 48), demo.DEMO_SEED)
    pred = matte_clip(model, clip["src"])
    assert summary["pha_mad"] == pytest.approx(demo.score(pred, clip["pha"])["pha_mad"], rel=1e-6)
    assert summary["pha_mad"] == pytest.approx(np.abs(pred - clip["pha"]).mean() * 1e3, rel=1e-4)
    # next to it, the all-background answer's score on the same clip: MAD of zeros = mean alpha
    zero = summary["all_zero_alpha"]
    assert zero["pha_mad"] == pytest.approx(clip["pha"].mean() * 1e3, rel=1e-4)
    assert zero["pha_mse"] == pytest.approx((clip["pha"] ** 2).mean() * 1e3, rel=1e-4)
    assert zero == demo.score(np.zeros_like(clip["pha"]), clip["pha"])
    assert f"all-zero alpha (reference): MAD {zero['pha_mad']:.2f}" in printed
    # a binarized model is cheaper than 32-bit RVM in computation and storage
    assert summary["ops_saving"] > 1 and summary["storage_saving"] > 1


def test_bundled_weights_matte_beyond_the_all_background_answer():
    """The bundled weights come from ``binarize train`` (the ``synthetic/bimatting_step*.yaml``
    recipe, docs/matting.md): on a held-out clip at the demo's 256x144 they beat freshly
    initialised weights and, clearly, the all-zero (all-background) alpha, where the first
    recipe's weights got stuck (measured: MAD 14 with step 19's weights, 20 with step 18's, 22 with
    step 17's, 28 with step 15's, 34 with step 10's, against 111 for zeros on this clip)."""
    import numpy as np
    import torch

    from binarize.models import create_model

    model, _ = demo.load_model(None)
    torch.manual_seed(0)
    untrained = create_model("bimatting")
    clip = demo.make_clip(8, (256, 144), seed=777)  # a clip the training never saw
    ours = demo.score(matte_clip(model, clip["src"]), clip["pha"])["pha_mad"]
    fresh = demo.score(matte_clip(untrained, clip["src"]), clip["pha"])["pha_mad"]
    zero = demo.score(np.zeros_like(clip["pha"]), clip["pha"])["pha_mad"]
    assert ours < fresh
    assert ours < 0.75 * zero, (ours, zero)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--size", "big"], "--size must look like WIDTHxHEIGHT"),
        (["--frames", "0"], "--frames must be >= 1"),
        (["--checkpoint", "nope.safetensors"], "checkpoint not found"),
        (["--size", "100000x100000"], "the demo builds its clip in memory and takes at most 99,532,800"),
        (["--frames", "49", "--size", "1920x1080"], "101,606,400 pixels"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--device", "gpu0"], "bad device 'gpu0'"),
        (["--device", "meta"], "device 'meta' holds no data"),
    ],
)
def test_demo_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    def no_model(checkpoint):  # every argument is checked before the model loads
        raise AssertionError("the model was loaded before the arguments were checked")

    if "--checkpoint" not in argv:
        monkeypatch.setattr(demo, "load_model", no_model)
    assert main(["demo", "--output", str(tmp_path / "o"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_demo_no_compare_and_explicit_engine(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--frames", "2", "--size", "32x32", "--output", str(out), "--no-progress", "--no-profile",
            "--no-compare", "--engine", "simulated"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("binarize demo: bimatting on the simulated engine (as requested)")
    assert "side by side" not in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "simulated" and "compare_fps" not in summary


class _Tiny(torch.nn.Module):
    """A float model (no binary layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)


def test_select_engine_explicit_and_auto(monkeypatch):
    from binarize.models import create_model

    binary = create_model("bimatting")
    assert select_engine("simulated", "cpu", binary) == ("simulated", "as requested")
    assert select_engine("packed", "cuda", binary) == ("packed", "as requested")
    # auto: a model without binary layers runs as it is, whatever the device
    engine, reason = select_engine("auto", "cpu", _Tiny())
    assert engine == "float" and "no binary layers" in reason
    # auto on another device: simulated (the kernels are CPU code); no GPU is needed to decide
    engine, reason = select_engine("auto", "cuda", binary)
    assert engine == "simulated" and "cuda" in reason
    # auto on the CPU: packed exactly when the compiled library loads
    monkeypatch.setattr(_lib, "available", lambda: True)
    monkeypatch.setattr(_lib, "kernel_info", lambda: {"kernel": "avx2_nibble"})
    engine, reason = select_engine("auto", "cpu", binary)
    assert engine == "packed" and "avx2_nibble" in reason
    monkeypatch.setattr(_lib, "available", lambda: False)
    engine, reason = select_engine("auto", torch.device("cpu"), binary)
    assert engine == "simulated" and "not built" in reason


def test_select_engine_bad_input_is_one_line():
    with pytest.raises(ValueError, match="--engine must be one of auto, simulated, packed"):
        select_engine("fast", "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        select_engine("auto", "gpu0", _Tiny())


class _Counter(torch.nn.Module):
    """Records (name, frame value, state) of every call; the state counts the model's own calls."""

    def __init__(self, name: str, log: list) -> None:
        super().__init__()
        self.name, self.log = name, log

    def forward(self, src, *rec, downsample_ratio=1.0):
        calls = 0 if rec[0] is None else int(rec[0])
        self.log.append((self.name, int(src[0, 0, 0, 0] * 255 + 0.5), calls))
        return src, src[:, :1], torch.tensor(calls + 1), None, None, None


def test_interleaved_fps_runs_models_frame_by_frame():
    log: list = []
    models = {"a": _Counter("a", log), "b": _Counter("b", log)}
    src = np.zeros((3, 4, 4, 3), np.uint8)
    src[:, 0, 0, 0] = [10, 20, 30]  # frame ids in the first pixel
    ticks = iter(range(1000))
    durations = {"a": [5.0, 1.0, 2.0, 3.0], "b": [7.0, 4.0, 4.0, 8.0]}  # per call, first one the warm-up
    used = {"a": 0, "b": 0}
    now = [0.0]

    def clock():  # start / stop pairs: stop advances by the running model's next duration
        if next(ticks) % 2:
            name = log[-1][0]
            now[0] += durations[name][used[name]]
            used[name] += 1
        return now[0]

    fps = demo.interleaved_fps(models, src, "cpu", 1.0, frames=3, clock=clock)
    # frame 0 warms up, then frames 1, 2 and (cycling) 0 again; both models run each frame before the next
    assert [(name, frame) for name, frame, _ in log] == [
        ("a", 10), ("b", 10), ("a", 20), ("b", 20), ("a", 30), ("b", 30), ("a", 10), ("b", 10)]
    assert [calls for name, _, calls in log if name == "a"] == [0, 1, 2, 3]  # each model keeps its own state
    assert fps == {"a": pytest.approx(1 / 2.0), "b": pytest.approx(1 / 4.0)}  # median of the timed frames


def test_comparison_line_names_rows_and_ratios():
    line = demo.comparison_line({"deployed": 30.0, "simulated": 5.0, "rvm_mobilenetv3": 10.0})
    assert line == ("deployed 30.0 | simulated 5.0 | rvm_mobilenetv3 (32-bit) 10.0 fps; "
                    "deployed: 3.0x RVM, 6.0x simulated")
    assert demo.comparison_line({"simulated": 2.0, "rvm_mobilenetv3": 4.0}).endswith("simulated: 0.5x RVM")


def test_matte_first_line_names_the_engine(tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(frames / f"{i:04d}.png")
    assert main(["matte", str(frames), "--alpha", str(tmp_path / "alpha"), "--output-type", "png_sequence",
                 "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = "packed" if available() else "simulated"
    assert lines[0].startswith(f"binarize matte: bimatting on the {expected} engine (auto: ")
    assert lines[-1].startswith("matted 2 frames") and f"[{expected}]" in lines[-1]


def test_write_frames_leaves_nothing_behind_when_a_frame_fails(tmp_path):
    frames = np.zeros((3, 4, 4, 3), np.uint8).astype(object)  # PIL cannot build an image from objects
    with pytest.raises(TypeError):
        demo.write_frames(frames, tmp_path / "input")
    assert list(tmp_path.iterdir()) == []
    written = demo.write_frames(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "input")
    assert sorted(p.name for p in written.iterdir()) == ["0000.png", "0001.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["input"]
