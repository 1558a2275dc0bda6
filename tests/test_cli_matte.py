"""`binarize matte`: options reach convert_video, outputs are written, user errors exit with status 2."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_video import NTSC, make_video, only_visible, read_video

from binarize.cli.main import Terminated, main
from binarize.matting.video import open_source
from binarize.models import register_model, registry

CALLS: list = []


class _RecordingMatting(torch.nn.Module):
    """pha = mean of RGB, fgr = src; records (shape, downsample_ratio) of every call in CALLS."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, src, *rec, downsample_ratio=1.0):
        CALLS.append((tuple(src.shape), downsample_ratio))
        return src * self.gain, src.mean(dim=2, keepdim=True), *rec


def _test_cli_matting(**kwargs):
    return _RecordingMatting()


@pytest.fixture(autouse=True, scope="module")
def _registered_test_model():
    """Register the recording model only while this module's tests run, so other tests never see it."""
    register_model("_test_cli_matting")(_test_cli_matting)
    yield
    registry._MODELS.pop("_test_cli_matting", None)


@pytest.fixture
def clip(tmp_path) -> Path:
    make_video(tmp_path / "clip.mp4")
    CALLS.clear()
    return tmp_path / "clip.mp4"


def matte(*argv: str) -> int:
    return main(["matte", *map(str, argv)])


def test_matte_writes_videos_and_reports(tmp_path, clip, capsys):
    code = matte(clip, "-m", "_test_cli_matting", "-o", tmp_path / "comp.mp4", "--alpha", tmp_path / "alpha.mp4",
                 "--foreground", tmp_path / "fgr.mp4", "--no-progress")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "weights are random" in captured.err
    assert "matted 8 frames (64x48, 30000/1001 fps)" in captured.out
    assert only_visible(tmp_path) == ["alpha.mp4", "clip.mp4", "comp.mp4", "fgr.mp4"]
    frames, rate, streams = read_video(tmp_path / "alpha.mp4")
    assert len(frames) == 8 and rate == NTSC and ("audio", "aac") in streams
    assert CALLS[0] == ((1, 1, 3, 48, 64), 1.0)  # auto ratio: min(512 / 64, 1)


def test_matte_options_reach_convert_video(tmp_path, clip, capsys):
    code = matte(clip, "-m", "_test_cli_matting", "-o", tmp_path / "comp", "--output-type", "png_sequence",
                 "--background", "#000000", "--seq-chunk", "4", "--downsample-ratio", "0.5", "--no-progress")
    assert code == 0, capsys.readouterr().err
    assert CALLS == [((1, 4, 3, 48, 64), 0.5)] * 2
    comp = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "comp").iterdir())])
    assert comp.shape == (8, 48, 64, 3)  # a colour background gives RGB, not RGBA


def test_threads_option_sets_the_model_threads_and_restores_them(tmp_path, clip, capsys, monkeypatch):
    seen = []
    original = _RecordingMatting.forward

    def forward(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_RecordingMatting, "forward", forward)
    before = torch.get_num_threads()
    target = 1 if before > 1 else 2
    assert matte(clip, "-m", "_test_cli_matting", "-o", tmp_path / "c.mp4", "--threads", target, "--no-progress") == 0
    assert seen and set(seen) == {target}
    assert torch.get_num_threads() == before


def test_matte_image_folder_with_fps(tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.jpg")
    code = matte(folder, "-m", "_test_cli_matting", "--alpha", tmp_path / "a.mp4", "--fps", "24", "--no-progress")
    assert code == 0, capsys.readouterr().err
    frames, rate, _ = read_video(tmp_path / "a.mp4")
    assert rate == 24 and len(frames) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}", "-o", "{out}/c.mp4"], "input not found"),
        (["{text}", "-o", "{out}/c.mp4"], "cannot read video"),
        (["{clip}", "-o", "{out}/c.xyz"], "unsupported output extension"),
        (["{clip}", "-o", "{out}/c.mp4", "--background", "#12"], "bad background colour"),
        (["{clip}", "-o", "{out}/c.mp4", "--background", "{out}/none.png"], "background file not found"),
        (["{clip}", "-o", "{out}/c.mp4", "--background", "transparent"], "cannot hold transparency"),
        (["{clip}"], "no output given"),
        (["{clip}", "-o", "{out}/c.mp4", "--checkpoint", "{out}/none.pth"], "checkpoint not found"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, clip, capsys, args, message):
    (tmp_path / "text.mp4").write_text("not a video")
    names = {"missing": tmp_path / "missing.mp4", "text": tmp_path / "text.mp4", "clip": clip, "out": tmp_path}
    argv = [arg.format(**names) for arg in args]
    code = matte(*argv, "-m", "_test_cli_matting", "--no-progress")
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("binarize matte: error: ") and message in last
    assert only_visible(tmp_path) == ["clip.mp4", "text.mp4"]


def test_unknown_model_exits_2(tmp_path, clip, capsys):
    assert matte(clip, "-m", "no_such_model", "-o", tmp_path / "c.mp4") == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


def test_packed_engine_unavailable_is_a_clear_error(tmp_path, clip, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "binarize.engine", None)  # makes `from binarize.engine import` fail
    code = matte(clip, "-m", "_test_cli_matting", "-o", tmp_path / "c.mp4", "--engine", "packed", "--no-progress")
    assert code == 2
    assert "--engine packed is unavailable" in capsys.readouterr().err
    assert not (tmp_path / "c.mp4").exists()


def test_packed_engine_calls_deploy(tmp_path, clip, capsys, monkeypatch):
    deployed = []
    fake = types.ModuleType("binarize.engine")
    fake.deploy = lambda model: deployed.append(model) or model
    monkeypatch.setitem(sys.modules, "binarize.engine", fake)
    code = matte(clip, "-m", "_test_cli_matting", "--alpha", tmp_path / "a.mp4", "--engine", "packed",
                 "--no-progress")
    assert code == 0, capsys.readouterr().err
    assert len(deployed) == 1 and isinstance(deployed[0], _RecordingMatting)
    assert len(CALLS) == 8


def test_console_entry_point_exit_status(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "binarize", "matte", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "c.mp4")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"binarize matte: error: input not found: {str(tmp_path / 'missing.mp4')!r}"


def test_checkpoint_is_loaded(tmp_path, clip, capsys):
    import binarize

    model = binarize.create_model("_test_cli_matting")
    with torch.no_grad():
        model.gain.fill_(0.5)
    binarize.save(model, tmp_path / "half.safetensors")
    code = matte(clip, "-m", "_test_cli_matting", "--checkpoint", tmp_path / "half.safetensors",
                 "--foreground", tmp_path / "fgr", "--output-type", "png_sequence", "--no-progress")
    assert code == 0, capsys.readouterr().err
    fgr = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "fgr").iterdir())]).astype(int)
    with open_source(clip) as source:
        src = np.stack(list(source)).astype(float)
    assert np.abs(fgr - np.round(src * 0.5)).max() <= 1  # the loaded gain halves the foreground


def test_checkpoint_of_another_model_exits_2(tmp_path, clip, capsys):
    import binarize

    binarize.save(binarize.create_model("_test_cli_matting"), tmp_path / "other.safetensors")
    torch.save({"gain": torch.ones(())}, tmp_path / "other.pth")
    for checkpoint, message in [("other.safetensors", "holds model '_test_cli_matting', not 'bimatting'"),
                                ("other.pth", "does not match model")]:
        code = matte(clip, "-m", "bimatting", "--checkpoint", tmp_path / checkpoint, "-o", tmp_path / "c.mp4",
                     "--no-progress")
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "c.mp4").exists()


@pytest.mark.parametrize("engine", ["simulated", "packed"])
def test_real_bimatting_through_the_cli_matches_direct_calls(tmp_path, capsys, engine):
    """The streamed, chunked pipeline gives what a plain loop over the (deployed) model gives."""
    import binarize

    make_video(tmp_path / "clip.mp4", n=3, w=40, h=32, audio=None)
    torch.manual_seed(123)
    model = binarize.create_model("bimatting").eval()
    checkpoint = binarize.save(model, tmp_path / "bimatting.safetensors")
    code = matte(tmp_path / "clip.mp4", "-m", "bimatting", "--checkpoint", checkpoint, "--alpha", tmp_path / "pha",
                 "--output-type", "png_sequence", "--engine", engine, "--seq-chunk", "2", "--no-progress")
    assert code == 0, capsys.readouterr().err
    alpha = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "pha").iterdir())]).astype(int)

    if engine == "packed":
        model = binarize.deploy(model)
    with open_source(tmp_path / "clip.mp4") as source:
        frames = torch.from_numpy(np.stack(list(source))).permute(0, 3, 1, 2).contiguous().float().div(255)
    rec, expected = [None] * 4, []
    with torch.inference_mode():
        for frame in frames:
            _, pha, *rec = model(frame[None, None], *rec, downsample_ratio=1.0)
            expected.append(pha[0, 0, 0].mul(255).round().int().numpy())
    assert alpha.shape == (3, 32, 40)
    assert np.abs(alpha - np.stack(expected)).max() <= 1


def test_bundled_checkpoint_is_used_without_checkpoint(tmp_path, clip, capsys, monkeypatch):
    import binarize
    import binarize.cli.matte as matte_cli

    assert matte_cli.bundled_checkpoint("_test_cli_matting") is None  # nothing shipped for the test model
    model = binarize.create_model("_test_cli_matting")
    with torch.no_grad():
        model.gain.fill_(0.0)
    binarize.save(model, tmp_path / "_test_cli_matting_synthetic.safetensors")
    monkeypatch.setattr(matte_cli, "bundled_checkpoint", lambda name: tmp_path / f"{name}_synthetic.safetensors")
    code = matte(clip, "-m", "_test_cli_matting", "--foreground", tmp_path / "fgr", "--output-type", "png_sequence",
                 "--no-progress")
    assert code == 0
    assert "bundled demo weights" in capsys.readouterr().err
    assert all(np.asarray(Image.open(p)).max() == 0 for p in (tmp_path / "fgr").iterdir())  # gain 0 was loaded


def test_non_matting_model_exits_2(tmp_path, clip, capsys):
    assert matte(clip, "-m", "bimobilenet", "-o", tmp_path / "c.mp4", "--no-progress") == 2
    assert "'bimobilenet' is not a matting model" in capsys.readouterr().err
    assert only_visible(tmp_path) == ["clip.mp4"]


# ----------------------------------------------------------------------------------------- hostile input (issue 19)
@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: the errors below must come before that."""
    import binarize.cli.matte as matte_module

    def build_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(matte_module, "build_model", build_model)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fps", "nan"], "--fps: bad frame rate 'nan'"),
        (["--fps", "-5"], "--fps: frame rate -5 is out of range"),
        (["--fps", "0"], "--fps: frame rate 0 is out of range"),
        (["--fps", "30/0"], "--fps: bad frame rate '30/0'"),
        (["--mbps", "nan"], "--mbps: bit rate nan Mbit/s is out of range"),
        (["--mbps", "-1"], "--mbps: bit rate -1.0 Mbit/s is out of range"),
        (["--mbps", "0"], "out of range"),
        (["--mbps", "1e-9"], "out of range"),
        (["--mbps", "1e9"], "out of range"),
        (["--device", "bogus"], "bad device 'bogus'"),
        (["--device", "meta"], "device 'meta' holds no data"),
        (["--alpha", "{out}/dir.mp4"], "dir.mp4' is an existing folder"),
        (["--alpha", "{out}/file.txt/a.mp4"], "file.txt' is a file, not a folder"),
        (["--background", "{out}/dir.mp4"], "is a folder; expected a colour, an image or a video file"),
        (["--output-type", "png_sequence", "-o", "{out}/file.txt"], "is an existing file; a PNG sequence"),
        (["-m", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["--downsample-ratio", "nan"], "downsample_ratio must be in (0, 1]"),
        (["--seq-chunk", "0"], "seq_chunk must be a positive integer"),
        (["--threads", "0"], "--threads must be a positive integer, got 0"),
        (["--preset", "turbo"], "--preset: unknown H.264 preset 'turbo'; choose one of: ultrafast"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_the_model_loads(tmp_path, clip, capsys, no_model, args, message):
    (tmp_path / "dir.mp4").mkdir()
    (tmp_path / "file.txt").write_text("x")
    argv = [arg.format(out=tmp_path) for arg in args]
    model = [] if "-m" in argv else ["-m", "_test_cli_matting"]
    output = [] if "-o" in argv else ["-o", tmp_path / "c.mp4"]
    code = matte(clip, *output, *model, *argv, "--no-progress")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err  # one line, and no "random weights" warning first
    assert err.startswith("binarize matte: error: ") and message in err, err
    assert only_visible(tmp_path) == ["clip.mp4", "dir.mp4", "file.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists here")
def test_absent_cuda_device_is_one_line(tmp_path, clip, capsys, no_model):
    assert matte(clip, "-o", tmp_path / "c.mp4", "-m", "_test_cli_matting", "--device", "cuda") == 2
    assert "device 'cuda' is not available: no CUDA GPU" in capsys.readouterr().err


def test_ntsc_fps_works(tmp_path, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    for text in ("29.97", "30000/1001"):
        assert matte(folder, "-m", "_test_cli_matting", "--alpha", tmp_path / f"a{len(text)}.mp4", "--fps", text,
                     "--no-progress") == 0
        assert "30000/1001 fps" in capsys.readouterr().out
        assert read_video(tmp_path / f"a{len(text)}.mp4")[1] == NTSC


def test_decompression_bomb_input_and_background_are_one_line(tmp_path, clip, capsys, monkeypatch):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert matte(tmp_path / "bomb.png", "-m", "_test_cli_matting", "--alpha", tmp_path / "a.png") == 2
    assert matte(clip, "-m", "_test_cli_matting", "-o", tmp_path / "c.mp4", "--background", tmp_path / "bomb.png") == 2
    err = capsys.readouterr().err
    assert err.count("decompression bomb") == 2 and err.count("\n") == 2, err


@pytest.mark.parametrize("output_type", ["image", "png_sequence"])
def test_permission_errors_are_one_line(tmp_path, capsys, monkeypatch, output_type):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "one.png")
    extra = ["--alpha", tmp_path / "a.png"] if output_type == "image" else [
        "--alpha", tmp_path / "seq", "--output-type", "png_sequence"]
    # refused up front where the folder is not writable (simulated: tests may run as root) ...
    monkeypatch.setattr("os.access", lambda *args, **kwargs: False)
    assert matte(tmp_path / "one.png", "-m", "_test_cli_matting", *extra, "--no-progress") == 2
    assert "no permission to write in" in capsys.readouterr().err
    monkeypatch.undo()
    # ... and an error while writing (a full or read-only disk) is one line too, with nothing left behind

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]) if args else "?")

    monkeypatch.setattr(Image.Image, "save", refuse)
    assert matte(tmp_path / "one.png", "-m", "_test_cli_matting", *extra, "--no-progress") == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the warning that the test model has random weights
    target = tmp_path / ("a.png" if output_type == "image" else "seq")
    assert last == f"binarize matte: error: Permission denied: {str(target)!r}", last
    assert only_visible(tmp_path) == ["one.png"]


def test_truncated_input_prints_a_one_line_warning(tmp_path, capsys):
    from test_video import make_truncated

    make_truncated(tmp_path / "cut.mp4")
    assert matte(tmp_path / "cut.mp4", "-m", "_test_cli_matting", "--alpha", tmp_path / "a.webm", "--no-progress") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: input" in line]
    assert len(warnings) == 1 and re.search(r"decoded \d+ of the 40 frames the file declares", warnings[0])


@pytest.mark.parametrize(("interrupt", "status", "word"), [(Terminated, 143, "terminated"),
                                                         (KeyboardInterrupt, 130, "interrupted")])
def test_an_error_raised_while_cleaning_up_after_a_signal_reports_the_signal(monkeypatch, capsys, interrupt, status,
                                                                             word):
    """A signal can interrupt code half way and make its cleanup fail (CI met ``cannot join thread
    before it is started``); that error is the signal's consequence: the run still ends as
    terminated/interrupted, in one line."""
    def run(args):
        try:
            raise interrupt()
        finally:
            raise RuntimeError("cannot join thread before it is started")

    monkeypatch.setattr("binarize.cli.profile.run", run)
    assert main(["profile", "resnet18"]) == status
    assert capsys.readouterr().err == f"binarize profile: {word}\n"


def test_other_errors_still_propagate(monkeypatch):
    def run(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("binarize.cli.profile.run", run)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["profile", "resnet18"])


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    import binarize.cli.main as main_module

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(main_module, "build_parser", interrupted)
    assert main(["matte", "x.mp4"]) == 130
    assert capsys.readouterr().err == "binarize main: interrupted\n"


_SLOW_RUN = """
import sys, time, torch
from binarize.cli.main import Terminated, main
from binarize.models import register_model

class Slow(torch.nn.Module):
    def forward(self, src, *rec, downsample_ratio=1.0):
        time.sleep(0.05)
        return src, src.mean(dim=2, keepdim=True), *rec

register_model("_slow")(lambda **kwargs: Slow())
sys.exit(main(["matte", sys.argv[1], "-m", "_slow", "-o", sys.argv[2], "--alpha", sys.argv[3], "--no-progress"]))
"""


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    make_video(tmp_path / "long.mp4", n=200, w=16, h=16)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(tmp_path / "long.mp4"), str(out / "comp.mp4"),
                                str(out / "alpha.webm")], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.is_dir() and len(list(out.iterdir())) == 2) and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.05)
        assert sorted(p.name.split(".")[1] for p in out.iterdir()) == ["alpha", "comp"]  # hidden temporaries
        process.send_signal(signal.SIGTERM)
        status = process.wait(60)
        assert status == 143, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stderr.read().strip().splitlines()[-1] == "binarize matte: terminated"
    assert only_visible(tmp_path) == ["long.mp4"]  # temporaries and the folder the run created are gone


# ----------------------------------------------------------------------------------------- other subcommands
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--config", "synthetic/bimatting.yaml", "--device", "bogus"], "--device / run.device: bad device"),
        (["train", "--config", "synthetic/bimatting.yaml", "--set", "run.device=meta"], "device 'meta' holds no data"),
        (["train", "--config", "synthetic/bimatting.yaml", "--set", "run.max_steps=-1"], "run.max_steps must be >= 0"),
        (["evaluate", "--pred-dir", "{out}/clips", "--true-dir", "{out}/clips", "--output-dir", "{out}/file.txt/x"],
         "file.txt' is a file, but a folder is needed there"),
        (["data", "synth", "{out}/file.txt/sub", "--clips", "1", "--frames", "1", "--size", "16x16"],
         "file.txt' is a file, but a folder is needed there"),
        (["data", "synth", "{out}/big", "--size", "100000x100000"], "--size 100000x100000 is too large"),
        (["data", "synth", "{out}/neg", "--seed", "-5"], "--seed must be >= 0"),
    ],
)
def test_other_subcommands_refuse_hostile_input_in_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "clips" / "c" / "pha").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "clips" / "c" / "pha" / "0000.png")
    code = main([arg.format(out=tmp_path) for arg in argv] + ["--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert only_visible(tmp_path) == ["clips", "file.txt"]


def test_profile_refuses_a_resolution_that_cannot_fit(capsys):
    with pytest.raises(SystemExit) as info:
        main(["profile", "bimatting", "--resolution", "100000x100000"])
    assert info.value.code == 2 and "is too large: each side at most 8192" in capsys.readouterr().err


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    import binarize.cli.data as data_module

    def exhausted(args):
        raise MemoryError("Unable to allocate 112. GiB")

    monkeypatch.setattr(data_module, "run", exhausted)
    assert main(["data", "synth", "x"]) == 1
    assert capsys.readouterr().err == "binarize data: error: out of memory: Unable to allocate 112. GiB\n"
