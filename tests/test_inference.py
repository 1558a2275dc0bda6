"""convert_video end to end on tiny synthetic clips with dummy matting models of known output."""
from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_video import (
    NTSC,
    audio_samples,
    frame_times,
    make_truncated,
    make_vfr_video,
    make_video,
    needs_encoder,
    only_visible,
    read_video,
)

import binarize.matting.video as video_module
from binarize.matting import convert_video
from binarize.matting.inference import COLORS, ConversionResult, auto_downsample_ratio, parse_background
from binarize.matting.video import open_source


class MeanAlpha(torch.nn.Module):
    """pha = mean of the RGB channels, fgr = src; records the calls it got."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls: list = []

    def forward(self, src, r1=None, r2=None, r3=None, r4=None, downsample_ratio=1.0):
        self.calls.append((tuple(src.shape), downsample_ratio, torch.is_grad_enabled(), self.training))
        return src * self.scale, src.mean(dim=2, keepdim=True), r1, r2, r3, r4


class FrameCounter(torch.nn.Module):
    """Counts frames through the recurrent state: alpha of global frame k is (k % 5) / 4."""

    def forward(self, src, r1=None, r2=None, r3=None, r4=None, downsample_ratio=1.0):
        b, t, _, h, w = src.shape
        seen = torch.zeros(b) if r1 is None else r1
        index = seen.view(b, 1) + torch.arange(t).view(1, t)
        pha = ((index % 5) / 4).view(b, t, 1, 1, 1).expand(b, t, 1, h, w)
        return src, pha, seen + t, r2, r3, r4


class FailAt(MeanAlpha):
    """Raises ``error`` on call number ``at`` (0-based)."""

    def __init__(self, at: int, error: BaseException) -> None:
        super().__init__()
        self.at, self.error = at, error

    def forward(self, src, *rec, downsample_ratio=1.0):
        if len(self.calls) == self.at:
            raise self.error
        return super().forward(src, *rec, downsample_ratio=downsample_ratio)


def decoded_source(path: Path) -> np.ndarray:
    with open_source(path) as source:
        return np.stack(list(source)).astype(np.float64)


def png_stack(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]).astype(np.int64)


def expected_alpha(src: np.ndarray) -> np.ndarray:
    return np.round(src.mean(-1)).astype(np.int64)  # float mean of /255 values, times 255, rounded


@pytest.fixture
def clip(tmp_path) -> Path:
    make_video(tmp_path / "clip.mp4")
    return tmp_path / "clip.mp4"


# ----------------------------------------------------------------------------------------- outputs
def test_video_outputs_keep_rate_audio_and_values(tmp_path, clip):
    model = MeanAlpha()
    out = tmp_path / "out"
    result = convert_video(
        model, clip, output_composition=out / "comp.mp4", output_alpha=out / "alpha.mp4",
        output_foreground=out / "fgr.mp4", progress=False,
    )
    assert isinstance(result, ConversionResult)
    assert result.frames == 8 and result.fps > 0 and result.frame_rate == NTSC
    assert result.outputs == {"composition": out / "comp.mp4", "alpha": out / "alpha.mp4", "foreground": out / "fgr.mp4"}
    assert only_visible(out) == ["alpha.mp4", "comp.mp4", "fgr.mp4"]
    src = decoded_source(clip)
    pha = src.mean(-1, keepdims=True) / 255
    green = np.array(COLORS["green"], np.float64)
    expected = {
        "alpha.mp4": np.repeat(pha * 255, 3, -1),
        "fgr.mp4": src,
        "comp.mp4": src * pha + green * (1 - pha),
    }
    for name, want in expected.items():
        frames, rate, streams = read_video(out / name)
        assert rate == NTSC, name
        assert streams == [("video", "h264"), ("audio", "aac")], name
        assert frames.shape == (8, 48, 64, 3)
        error = np.abs(frames - want)
        assert error.mean() < 2.0 and error.max() < 16, name  # lossy h264 4:2:0
    assert audio_samples(out / "comp.mp4") == audio_samples(clip)
    # the model ran in eval mode without autograd (no_grad: tensors keep version counters, which the
    # engine's packed hand-off between blocks relies on), then its training flag was restored
    assert all(not call[2] and not call[3] for call in model.calls) and model.training


def test_png_sequence_is_exact_rgba(tmp_path, clip):
    convert_video(MeanAlpha(), clip, output_composition=tmp_path / "comp", output_alpha=tmp_path / "pha",
                  output_foreground=tmp_path / "fgr", output_type="png_sequence", progress=False)
    src = decoded_source(clip)
    alpha = expected_alpha(src)
    comp = png_stack(tmp_path / "comp")
    assert comp.shape == (8, 48, 64, 4)  # transparent by default for PNG sequences, as in RVM
    assert np.abs(comp[..., 3] - alpha).max() <= 1
    assert np.array_equal(comp[..., :3], (src * (alpha > 0)[..., None]).astype(np.int64))
    assert np.abs(png_stack(tmp_path / "pha") - alpha).max() <= 1
    assert np.array_equal(png_stack(tmp_path / "fgr"), src.astype(np.int64))
    assert only_visible(tmp_path / "pha")[:2] == ["0000.png", "0001.png"]


@pytest.mark.parametrize("name", [
    pytest.param("comp.mov", marks=needs_encoder("prores_ks")),
    pytest.param("comp.webm", marks=needs_encoder("libvpx-vp9")),
])
def test_transparent_video_codecs(tmp_path, clip, name):
    convert_video(MeanAlpha(), clip, output_composition=tmp_path / name, background="transparent", progress=False)
    frames, rate, streams = read_video(tmp_path / name, fmt="rgba")
    assert rate == NTSC and streams[1][0] == "audio"
    alpha = expected_alpha(decoded_source(clip))
    assert np.abs(frames[..., 3].astype(np.int64) - alpha).mean() < 2.0


@pytest.mark.parametrize("spec", ["#336699", "blue", "image", "video"])
def test_backgrounds(tmp_path, clip, spec):
    bg_frames = np.random.default_rng(1).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    if spec == "image":
        Image.fromarray(bg_frames[0]).save(tmp_path / "bg.png")
        background, bgr = str(tmp_path / "bg.png"), np.repeat(bg_frames[:1], 8, 0)
    elif spec == "video":
        # a 3-frame background video (lossless yuv444 crf 0) is looped over the 8 source frames
        make_video(tmp_path / "bg.mkv", n=3, audio=None, frames=bg_frames, rate=Fraction(25))
        loop = decoded_source(tmp_path / "bg.mkv")
        background, bgr = str(tmp_path / "bg.mkv"), loop[[0, 1, 2, 0, 1, 2, 0, 1]]
    else:
        color = (0x33, 0x66, 0x99) if spec.startswith("#") else COLORS[spec]
        background, bgr = spec, np.broadcast_to(np.array(color, np.float64), (8, 48, 64, 3))
    convert_video(MeanAlpha(), clip, output_composition=tmp_path / "comp", output_type="png_sequence",
                  background=background, progress=False)
    src = decoded_source(clip)
    pha = expected_alpha(src)[..., None] / 255
    comp = png_stack(tmp_path / "comp")
    assert comp.shape == (8, 48, 64, 3)
    tolerance = 3 if spec == "video" else 1  # crf-10 h264 background video
    assert np.abs(comp - (src * pha + bgr * (1 - pha))).max() <= tolerance


def test_background_image_is_resized_to_cover(tmp_path, clip):
    Image.fromarray(np.full((10, 10, 3), 77, np.uint8)).save(tmp_path / "square.jpg")
    convert_video(FrameCounter(), clip, output_composition=tmp_path / "comp", output_type="png_sequence",
                  background=str(tmp_path / "square.jpg"), progress=False)
    comp = png_stack(tmp_path / "comp")
    assert comp.shape == (8, 48, 64, 3)
    assert np.abs(comp[0] - 77).max() <= 1  # frame 0 has alpha 0: pure background everywhere


@pytest.mark.parametrize("seq_chunk", [1, 3, 8])
def test_recurrent_state_is_carried_across_chunks(tmp_path, clip, seq_chunk):
    result = convert_video(FrameCounter(), clip, output_alpha=tmp_path / "pha", output_type="png_sequence",
                           seq_chunk=seq_chunk, progress=False)
    assert result.frames == 8
    alpha = png_stack(tmp_path / "pha")[:, 0, 0]
    assert alpha.tolist() == [round(255 * (k % 5) / 4) for k in range(8)]


def test_seq_chunk_batches_frames(tmp_path, clip):
    model = MeanAlpha()
    convert_video(model, clip, output_alpha=tmp_path / "a.mp4", seq_chunk=3, progress=False)
    assert [call[0] for call in model.calls] == [(1, 3, 3, 48, 64)] * 2 + [(1, 2, 3, 48, 64)]


def test_downsample_ratio_auto_and_explicit(tmp_path):
    Image.fromarray(np.zeros((20, 640, 3), np.uint8)).save(tmp_path / "wide.png")
    model = MeanAlpha()
    result = convert_video(model, tmp_path / "wide.png", output_alpha=tmp_path / "a.png", progress=False)
    assert result.downsample_ratio == pytest.approx(512 / 640) == auto_downsample_ratio(20, 640)
    assert model.calls[0][1] == pytest.approx(0.8)
    model = MeanAlpha()
    convert_video(model, tmp_path / "wide.png", output_alpha=tmp_path / "b.png", downsample_ratio=0.25,
                  progress=False)
    assert model.calls[0][1] == 0.25
    assert auto_downsample_ratio(48, 64) == 1.0


def test_image_folder_and_single_image_inputs(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for index in (1, 2, 10):  # natural order: 1, 2, 10
        Image.fromarray(np.full((6, 8, 3), index * 20, np.uint8)).save(folder / f"img{index}.png")
    result = convert_video(MeanAlpha(), folder, output_foreground=tmp_path / "f", output_type="png_sequence",
                           progress=False)
    assert result.frame_rate == 30
    assert png_stack(tmp_path / "f")[:, 0, 0, 0].tolist() == [20, 40, 200]
    result = convert_video(MeanAlpha(), folder, output_alpha=tmp_path / "a.mp4", frame_rate=Fraction(12),
                           progress=False)
    frames, rate, streams = read_video(tmp_path / "a.mp4")
    assert rate == 12 and len(frames) == 3 and streams == [("video", "h264")]
    convert_video(MeanAlpha(), folder / "img2.png", output_composition=tmp_path / "one.png",
                  background="transparent", progress=False)
    image = np.asarray(Image.open(tmp_path / "one.png"))
    assert image.shape == (6, 8, 4) and image[0, 0].tolist() == [40, 40, 40, 40]


def test_odd_sized_video(tmp_path):
    make_video(tmp_path / "odd.mp4", n=3, w=63, h=47, audio=None)
    convert_video(MeanAlpha(), tmp_path / "odd.mp4", output_alpha=tmp_path / "a.mp4", progress=False)
    frames, _, _ = read_video(tmp_path / "a.mp4")
    assert frames.shape == (3, 48, 64, 3)  # h264 4:2:0 needs even sizes: padded by one row and column
    want = expected_alpha(decoded_source(tmp_path / "odd.mp4"))
    assert np.abs(frames[:, :47, :63, 0].astype(np.int64) - want).mean() < 2.0
    convert_video(MeanAlpha(), tmp_path / "odd.mp4", output_alpha=tmp_path / "a", output_type="png_sequence",
                  progress=False)
    assert np.abs(png_stack(tmp_path / "a") - want).max() <= 1  # PNGs keep the exact odd size


# ----------------------------------------------------------------------------------------- errors
def test_parse_background():
    assert parse_background("#FF0080").color == (255, 0, 128)
    assert parse_background("GREEN").color == COLORS["green"]
    assert parse_background(None, "png_sequence").kind == "transparent"
    assert parse_background(None, "video").color == COLORS["green"]
    for bad in ("#12345", "#GGGGGG", "sparkly"):
        with pytest.raises(ValueError, match="bad background"):
            parse_background(bad)
    with pytest.raises(FileNotFoundError, match="background file not found"):
        parse_background("missing.png")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"output_composition": "out.xyz"}, ValueError, "unsupported output extension '.xyz'"),
        ({"output_composition": "out.mp4", "background": "transparent"}, ValueError, "cannot hold transparency"),
        ({"output_composition": "out.mp4", "background": "#12"}, ValueError, "bad background colour"),
        ({"output_composition": "out.mp4", "background": "nope.jpg"}, FileNotFoundError, "background file"),
        ({"output_alpha": "a.png"}, ValueError, "is an image file but the input is a video"),
        ({"output_alpha": "a.mp4", "output_type": "gif"}, ValueError, "unknown output_type"),
        ({"output_alpha": "a.mp4", "seq_chunk": 0}, ValueError, "seq_chunk"),
        ({"output_alpha": "a.mp4", "downsample_ratio": 1.5}, ValueError, "downsample_ratio"),
        ({"output_alpha": "a.mp4", "output_foreground": "a.mp4"}, ValueError, "same path"),
        ({}, ValueError, "no output requested"),
    ],
)
def test_bad_arguments_fail_before_writing(tmp_path, clip, monkeypatch, kwargs, error, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        convert_video(MeanAlpha(), clip, progress=False, **kwargs)
    assert only_visible(tmp_path) == ["clip.mp4"]


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        convert_video(MeanAlpha(), tmp_path / "missing.mp4", output_alpha=tmp_path / "a.mp4", progress=False)
    (tmp_path / "text.mp4").write_text("hello, I am not a video")
    with pytest.raises(ValueError, match="cannot read video"):
        convert_video(MeanAlpha(), tmp_path / "text.mp4", output_alpha=tmp_path / "a.mp4", progress=False)
    assert only_visible(tmp_path) == ["text.mp4"]


class Shapeless(torch.nn.Module):
    def forward(self, src, *rec, downsample_ratio=1.0):
        return src, src, *rec


def test_wrong_model_output_is_reported(tmp_path, clip):
    with pytest.raises(ValueError, match="model returned alpha of shape"):
        convert_video(Shapeless(), clip, output_alpha=tmp_path / "a.mp4", progress=False)
    assert only_visible(tmp_path) == ["clip.mp4"]


@pytest.mark.parametrize("error", [RuntimeError("boom at chunk 2"), KeyboardInterrupt()])
@pytest.mark.parametrize("output_type", ["video", "png_sequence"])
def test_failure_mid_video_leaves_no_output(tmp_path, clip, error, output_type):
    threads_before = threading.active_count()
    ext = ".mp4" if output_type == "video" else ""
    with pytest.raises(type(error)):
        convert_video(FailAt(2, error), clip, output_composition=tmp_path / f"comp{ext}",
                      output_alpha=tmp_path / f"alpha{ext}", output_type=output_type, progress=False)
    assert only_visible(tmp_path) == ["clip.mp4"]  # neither final nor partial names remain
    assert threading.active_count() == threads_before  # reader and writer threads were joined


def test_writer_thread_error_propagates(tmp_path, clip, monkeypatch):
    original = video_module.VideoWriter.write

    def failing_write(self, frames):
        if self.frames_written >= 4:
            raise OSError("disk full (simulated)")
        original(self, frames)

    monkeypatch.setattr(video_module.VideoWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        convert_video(MeanAlpha(), clip, output_composition=tmp_path / "comp.mp4", progress=False)
    assert only_visible(tmp_path) == ["clip.mp4"]


def test_existing_output_is_replaced_only_on_success(tmp_path, clip):
    (tmp_path / "comp.mp4").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        convert_video(FailAt(1, RuntimeError("x")), clip, output_composition=tmp_path / "comp.mp4", progress=False)
    assert (tmp_path / "comp.mp4").read_bytes() == b"old"
    convert_video(MeanAlpha(), clip, output_composition=tmp_path / "comp.mp4", progress=False)
    assert len(read_video(tmp_path / "comp.mp4")[0]) == 8


def test_streaming_reads_ahead_only_a_bounded_number_of_frames(tmp_path, monkeypatch):
    make_video(tmp_path / "long.mp4", n=48, w=16, h=16, audio=None)
    decoded = []
    original_iter = video_module.VideoReader.timed_frames

    def counting_iter(self):
        for frame, time_ in original_iter(self):
            decoded.append(1)
            yield frame, time_

    class Lagging(MeanAlpha):
        def forward(self, src, *rec, downsample_ratio=1.0):
            self.lead = getattr(self, "lead", []) + [len(decoded) - len(self.calls) * src.shape[1]]
            return super().forward(src, *rec, downsample_ratio=downsample_ratio)

    monkeypatch.setattr(video_module.VideoReader, "timed_frames", counting_iter)
    model = Lagging()
    result = convert_video(model, tmp_path / "long.mp4", output_alpha=tmp_path / "a", output_type="png_sequence",
                           seq_chunk=2, progress=False)
    assert result.frames == 48 and len(decoded) == 48
    # frames decoded but not yet given to the model: the read queue (4 chunks of 2) plus the reader's
    # chunk in hand, never the whole video
    assert max(model.lead) <= 2 * (4 + 2)


def test_unreadable_background_video_fails_before_writing(tmp_path, clip):
    (tmp_path / "bg.mp4").write_text("not a video either")
    with pytest.raises(ValueError, match="cannot read video .*bg.mp4"):
        convert_video(MeanAlpha(), clip, output_composition=tmp_path / "c.mp4", background=str(tmp_path / "bg.mp4"),
                      progress=False)
    assert only_visible(tmp_path) == ["bg.mp4", "clip.mp4"]


def test_reader_thread_error_propagates(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, size in enumerate([(8, 8), (8, 8), (8, 8), (9, 8)]):  # the 4th frame has another size
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(ValueError, match=r"3.png' is 8x9 but the sequence is 8x8"):
        convert_video(MeanAlpha(), folder, output_alpha=tmp_path / "a.mp4", progress=False)
    assert only_visible(tmp_path) == ["frames"]


class Classifier(torch.nn.Module):
    def forward(self, x):
        return x.mean()


def test_a_model_without_the_matting_contract_is_refused(tmp_path, clip):
    with pytest.raises(ValueError, match="'Classifier' is not a matting model"):
        convert_video(Classifier(), clip, output_alpha=tmp_path / "a.mp4", progress=False)
    assert only_visible(tmp_path) == ["clip.mp4"]


# ----------------------------------------------------------------------------------------- hostile input (issue 19)
@pytest.mark.parametrize("audio", [True, False])
def test_variable_frame_rate_keeps_sync_end_to_end(tmp_path, audio):
    times = make_vfr_video(tmp_path / "vfr.mp4", [1] * 10 + [3] * 10, audio=audio)
    result = convert_video(MeanAlpha(), tmp_path / "vfr.mp4", output_composition=tmp_path / "comp.mp4",
                           output_alpha=tmp_path / "alpha.webm", progress=False)
    assert result.frames == 20
    for name in ("comp.mp4", "alpha.webm"):
        # frame 15 is at 25/30 s in the source and must stay there (not at 15 / average rate)
        assert frame_times(tmp_path / name) == pytest.approx([float(t) for t in times], abs=2e-3), name
        streams = read_video(tmp_path / name)[2]
        assert [kind for kind, _ in streams] == (["video", "audio"] if audio else ["video"])


def test_truncated_input_warns_with_the_counts(tmp_path):
    make_truncated(tmp_path / "cut.mp4")
    with pytest.warns(UserWarning, match=r"cut.mp4': decoded (\d+) of the 40 frames the file declares") as record:
        result = convert_video(MeanAlpha(), tmp_path / "cut.mp4", output_composition=tmp_path / "comp.mp4",
                               output_alpha=tmp_path / "alpha.webm", progress=False)
    assert 0 < result.frames < 40 and f"decoded {result.frames} of the 40" in str(record[0].message)
    assert result.problems and len(read_video(tmp_path / "alpha.webm")[0]) == result.frames


def test_all_outputs_are_checked_before_any_work(tmp_path, clip):
    (tmp_path / "dir.mp4").mkdir()
    model = MeanAlpha()
    with pytest.raises(ValueError, match="dir.mp4' is an existing folder"):
        convert_video(model, clip, output_composition=tmp_path / "comp.mp4", output_alpha=tmp_path / "dir.mp4",
                      progress=False)
    assert model.calls == [] and only_visible(tmp_path) == ["clip.mp4", "dir.mp4"]


def test_outputs_are_committed_together_or_not_at_all(tmp_path, clip, monkeypatch):
    (tmp_path / "comp.mp4").write_bytes(b"old composition")
    original = video_module.FrameWriter.commit

    def commit(self, keep_backup=False):
        if self.path.name == "fgr.mp4":
            raise OSError("no space left (simulated)")
        original(self, keep_backup)

    monkeypatch.setattr(video_module.FrameWriter, "commit", commit)
    with pytest.raises(OSError, match="no space left"):  # the last of three outputs fails to commit
        convert_video(MeanAlpha(), clip, output_composition=tmp_path / "comp.mp4",
                      output_alpha=tmp_path / "alpha.mp4", output_foreground=tmp_path / "fgr.mp4", progress=False)
    assert (tmp_path / "comp.mp4").read_bytes() == b"old composition"  # put back after its own commit
    assert only_visible(tmp_path) == ["clip.mp4", "comp.mp4"]


def test_a_failed_run_removes_the_folders_it_created(tmp_path, clip):
    with pytest.raises(RuntimeError):
        convert_video(FailAt(1, RuntimeError("x")), clip, output_composition=tmp_path / "new" / "a" / "comp.mp4",
                      output_alpha=tmp_path / "new" / "alpha.mp4", progress=False)
    assert only_visible(tmp_path) == ["clip.mp4"]
    convert_video(MeanAlpha(), clip, output_alpha=tmp_path / "new" / "a" / "alpha.mp4", progress=False)
    assert only_visible(tmp_path / "new" / "a") == ["alpha.mp4"]


class Gate(MeanAlpha):
    """MeanAlpha that waits for ``event`` before its second call."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self.event = event

    def forward(self, src, *rec, downsample_ratio=1.0):
        if len(self.calls) == 1:
            assert self.event.wait(30)
        return super().forward(src, *rec, downsample_ratio=downsample_ratio)


def test_two_runs_on_one_output_each_commit_their_own_result(tmp_path):
    make_video(tmp_path / "a.mp4", n=6, audio=None)
    make_video(tmp_path / "b.mp4", n=9, audio=None)
    release = threading.Event()
    results = {}

    def slow_run():
        results["a"] = convert_video(Gate(release), tmp_path / "a.mp4", output_composition=tmp_path / "same.mp4",
                                     progress=False)

    thread = threading.Thread(target=slow_run)
    thread.start()
    try:
        results["b"] = convert_video(MeanAlpha(), tmp_path / "b.mp4", output_composition=tmp_path / "same.mp4",
                                     progress=False)
        assert len(read_video(tmp_path / "same.mp4")[0]) == 9  # b finished: b's frames
    finally:
        release.set()
        thread.join()
    assert results["a"].frames == 6 and len(read_video(tmp_path / "same.mp4")[0]) == 6  # then a's, whole
    assert only_visible(tmp_path) == ["a.mp4", "b.mp4", "same.mp4"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"frame_rate": float("nan")}, "bad frame rate 'nan'"),
    ({"frame_rate": 0}, "frame rate 0 is out of range"),
    ({"output_video_mbps": float("nan")}, "bit rate nan"),
    ({"output_video_mbps": 1e9}, "out of range"),
    ({"output_video_mbps": 1e-9}, "out of range"),
    ({"device": "bogus"}, "bad device 'bogus'"),
    ({"device": "meta"}, "device 'meta' holds no data"),
    ({"background": "."}, "is a folder"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, clip, kwargs, message):
    model = MeanAlpha()
    with pytest.raises(ValueError, match=message):
        convert_video(model, clip, output_composition=tmp_path / "c.mp4", progress=False, **kwargs)
    assert model.calls == [] and only_visible(tmp_path) == ["clip.mp4"]


def test_ntsc_decimal_rate_of_an_image_folder(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(folder / f"{i}.png")
    result = convert_video(MeanAlpha(), folder, output_alpha=tmp_path / "a.mp4", frame_rate=29.97, progress=False)
    assert result.frame_rate == NTSC and read_video(tmp_path / "a.mp4")[1] == NTSC


def test_pipeline_joins_a_thread_whose_start_a_signal_interrupted(monkeypatch):
    """A SIGTERM inside ``Thread.start()`` (CI found it) leaves a thread that runs but that
    ``Thread.join`` refuses ("cannot join thread before it is started"); the cleanup must wait
    for it (it may be writing the outputs about to be deleted) and must not fail."""
    import binarize.matting.inference as inference

    pipeline = inference._Pipeline()
    finished = threading.Event()
    late = threading.Thread(target=lambda: (threading.Event().wait(0.3), finished.set()), daemon=True)
    never = threading.Thread(target=lambda: None, daemon=True)
    pipeline.threads += [late, never]
    threading.Timer(0.2, late.start).start()  # seen by join() as not started, then it runs
    monkeypatch.setattr(inference, "_START_WAIT_S", 1.0)
    pipeline.join()  # no RuntimeError; waits for the late thread, gives up on the one never launched
    assert finished.is_set()
    assert not never.is_alive()


@pytest.mark.parametrize("frames", [
    np.zeros((2, 8, 8, 3), np.float32),  # floats in [0, 1] would be divided by 255 again
    np.zeros((8, 8, 3), np.uint8),       # one frame without its time axis
    np.zeros((2, 8, 8, 4), np.uint8),    # RGBA
    np.zeros((0, 8, 8, 3), np.uint8),    # no frames
])
def test_matte_clip_refuses_frames_it_would_misread(frames):
    from binarize.matting.inference import matte_clip

    with pytest.raises(ValueError, match="T x H x W x 3 uint8"):
        matte_clip(torch.nn.Identity(), frames)
