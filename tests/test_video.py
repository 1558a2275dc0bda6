"""Readers and writers of binarize.matting.video on tiny synthetic clips made with PyAV.

The helpers at the top (make_video, read_video, ...) are shared with test_inference.py and
test_cli_matte.py (``from test_video import ...``).
"""
from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path
from typing import List, Optional, Tuple

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from binarize.matting.video import (
    ImageSequenceReader,
    ImageSequenceWriter,
    ImageWriter,
    VideoReader,
    VideoWriter,
    check_output_path,
    has_encoder,
    natural_key,
    open_source,
    open_writer,
    parse_frame_rate,
    resize_cover,
    video_codec_for,
)

NTSC = Fraction(30000, 1001)


def needs_encoder(*names: str) -> pytest.MarkDecorator:
    """Skip (with the reason shown) where this PyAV build lacks an optional encoder."""
    missing = [name for name in names if not has_encoder(name)]
    return pytest.mark.skipif(bool(missing), reason=f"PyAV build without encoder(s) {missing}")


# ----------------------------------------------------------------------------------------- helpers
def clip_frames(n: int = 8, w: int = 64, h: int = 48) -> np.ndarray:
    """Smooth, distinct RGB frames ``[n, h, w, 3]`` that survive lossy coding well."""
    y, x = np.mgrid[0:h, 0:w]
    frames = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (40 + 170 * x / max(w - 1, 1)).astype(np.uint8)
        frames[i, ..., 1] = (30 + 180 * y / max(h - 1, 1)).astype(np.uint8)
        frames[i, ..., 2] = (20 + 25 * i) % 256
    return frames


def make_video(
    path: Path, n: int = 8, w: int = 64, h: int = 48, rate: Fraction = NTSC, audio: Optional[str] = "aac",
    frames: Optional[np.ndarray] = None, first_pts: int = 0,
) -> np.ndarray:
    """Write an h264 clip (yuv444p, so odd sizes work) with an optional mono 16 kHz sine audio stream.

    ``first_pts`` delays the video by that many frames; the audio always starts at 0 and lasts to the end.
    """
    frames = clip_frames(n, w, h) if frames is None else frames
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=rate, options={"crf": "10", "preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = w, h, "yuv444p"
        stream = container.add_stream(audio, rate=16000) if audio else None
        if stream is not None:
            stream.layout = "mono"
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = first_pts + i
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if stream is not None:
            total = int(16000 * (first_pts + n) / rate)
            signal = (0.3 * np.sin(2 * np.pi * 440 * np.arange(total) / 16000)).astype(np.float32)[None]
            fmt = "s16" if audio.startswith("pcm_s16") else "fltp"
            if fmt == "s16":
                signal = (signal * 32767).astype(np.int16)
            for start in range(0, total, 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(signal[:, start:start + 1024]), format=fmt,
                                                   layout="mono")
                chunk.sample_rate, chunk.pts = 16000, start
                container.mux(stream.encode(chunk))
            container.mux(stream.encode(None))
    return frames


def read_video(path: Path, fmt: str = "rgb24") -> Tuple[np.ndarray, Fraction, List[Tuple[str, str]]]:
    """Decode every frame (VP9 through libvpx so that its alpha plane is kept), the exact rate and streams."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        streams = [(s.type, s.codec_context.name) for s in container.streams]
        if stream.codec_context.name == "vp9":
            decoder = av.CodecContext.create("libvpx-vp9", "r")
            frames = [f.to_ndarray(format=fmt) for p in container.demux(stream) if p.size for f in decoder.decode(p)]
        else:
            frames = [f.to_ndarray(format=fmt) for f in container.decode(stream)]
        return np.stack(frames), stream.average_rate, streams


def audio_samples(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(frame.samples for frame in container.decode(audio=0))


def only_visible(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------- readers
@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=20, unique=True))
def test_natural_key_orders_numbers_numerically(numbers):
    names = [f"frame{n}.png" for n in numbers]
    ordered = sorted(names, key=natural_key)
    assert ordered == [f"frame{n}.png" for n in sorted(numbers)]


def test_resize_cover_fills_and_keeps_aspect():
    image = np.zeros((10, 40, 3), np.uint8)
    image[:, 15:25] = 255  # centred white band
    out = resize_cover(image, 20, 20)  # scale x2 -> 20x80, centre crop 20 wide
    assert out.shape == (20, 20, 3)
    assert out[:, 1:-1].min() == 255  # the crop is the middle of the band: no distortion, no border
    assert resize_cover(image, 40, 10) is image


def test_video_reader_exact_rate_size_and_frames(tmp_path):
    expected = make_video(tmp_path / "clip.mp4")
    with open_source(tmp_path / "clip.mp4") as source:
        assert isinstance(source, VideoReader)
        assert (source.width, source.height) == (64, 48)
        assert source.frame_rate == NTSC and isinstance(source.frame_rate, Fraction)
        assert source.audio_path == tmp_path / "clip.mp4"
        frames = np.stack(list(source))
    assert frames.shape == (8, 48, 64, 3)
    assert np.abs(frames.astype(int) - expected).max() <= 8  # near-lossless h264 (limited-range YUV)
    assert np.abs(frames.astype(int) - expected).mean() < 1.5


def test_image_folder_is_read_in_natural_order(tmp_path):
    for index in (10, 2, 1):
        Image.fromarray(np.full((6, 5, 3), index * 10, np.uint8)).save(tmp_path / f"f{index}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(tmp_path, frame_rate=Fraction(24))
    assert isinstance(source, ImageSequenceReader)
    assert [f.name for f in source.files] == ["f1.png", "f2.png", "f10.png"]
    assert source.frame_rate == 24 and source.num_frames == 3
    assert [int(frame[0, 0, 0]) for frame in source] == [10, 20, 100]


def test_single_image_source(tmp_path):
    Image.fromarray(np.full((7, 9, 4), 200, np.uint8), "RGBA").save(tmp_path / "one.png")
    source = open_source(tmp_path / "one.png")
    frames = list(source)
    assert len(frames) == 1 and frames[0].shape == (7, 9, 3)


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="input not found"):
        open_source(tmp_path / "missing.mp4")
    (tmp_path / "fake.mp4").write_text("this is not a video")
    with pytest.raises(ValueError, match="cannot read video"):
        open_source(tmp_path / "fake.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        open_source(tmp_path / "empty")
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "0.png")
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(folder / "1.png")
    with pytest.raises(ValueError, match="1.png"):
        list(open_source(folder))


# ----------------------------------------------------------------------------------------- writers
@pytest.mark.parametrize("rate", [Fraction(24000, 1001), NTSC, Fraction(25), Fraction(60)])
def test_video_writer_keeps_exact_rational_rate(tmp_path, rate):
    frames = clip_frames(5)
    writer = VideoWriter(tmp_path / "out.mp4", 64, 48, rate)
    writer.write(frames)
    assert not (tmp_path / "out.mp4").exists() and writer.temp_path.exists()
    assert writer.temp_path.parent == tmp_path and writer.temp_path.name.startswith(".out.")
    writer.commit()
    decoded, decoded_rate, streams = read_video(tmp_path / "out.mp4")
    assert decoded_rate == rate
    assert streams == [("video", "h264")]
    assert len(decoded) == 5
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    assert only_visible(tmp_path) == ["out.mp4"]


@pytest.mark.parametrize(("preset", "settings"), [(None, b"subme=2"), ("veryfast", b"subme=2"), ("medium", b"subme=7"),
                                                  ("ultrafast", b"subme=0")])
def test_video_writer_uses_the_x264_preset(tmp_path, preset, settings):
    """libx264 writes its settings into the stream (an SEI text): the preset's subme value is there;
    the default is veryfast (the encoder shares the CPU with the model)."""
    frames = clip_frames(3)
    writer = VideoWriter(tmp_path / "out.mp4", 64, 48, Fraction(25), preset=preset)
    writer.write(frames)
    writer.commit()
    data = (tmp_path / "out.mp4").read_bytes()
    assert b"x264 - core" in data and settings in data
    decoded, _, _ = read_video(tmp_path / "out.mp4")
    assert np.abs(decoded.astype(int) - frames).mean() < 3


def test_unknown_x264_preset_is_refused_before_any_file(tmp_path):
    with pytest.raises(ValueError, match="unknown H.264 preset 'turbo'; choose one of: ultrafast"):
        VideoWriter(tmp_path / "out.mp4", 64, 48, Fraction(25), preset="turbo")
    assert only_visible(tmp_path) == []


def test_video_writer_pads_odd_sizes_for_h264(tmp_path):
    frames = clip_frames(3, 63, 47)
    writer = VideoWriter(tmp_path / "odd.mp4", 63, 47, Fraction(25))
    writer.write(frames)
    writer.commit()
    decoded, _, _ = read_video(tmp_path / "odd.mp4")
    assert decoded.shape == (3, 48, 64, 3)
    # the padding repeats the last row/column
    assert np.abs(decoded[:, -1, :63].astype(int) - decoded[:, -2, :63]).max() <= 6
    assert np.abs(decoded[:, :47, :63].astype(int) - frames).mean() < 3


def test_gray_frames_round_trip_through_h264(tmp_path):
    alpha = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, None, :, None], (4, 48, 1, 1))
    writer = VideoWriter(tmp_path / "alpha.mp4", 64, 48, NTSC, channels=1)
    writer.write(alpha)
    writer.commit()
    decoded, _, _ = read_video(tmp_path / "alpha.mp4")
    assert np.abs(decoded[..., 0].astype(int) - alpha[..., 0]).max() <= 4


@pytest.mark.parametrize(("name", "codec"), [
    pytest.param("t.mov", "prores", marks=needs_encoder("prores_ks")),
    pytest.param("t.webm", "vp9", marks=needs_encoder("libvpx-vp9")),
    pytest.param("t.mkv", "vp9", marks=needs_encoder("libvpx-vp9")),
])
def test_alpha_capable_codecs_keep_transparency(tmp_path, name, codec):
    rgba = np.zeros((3, 48, 64, 4), np.uint8)
    rgba[..., :3] = clip_frames(3)
    rgba[..., 3] = np.linspace(0, 255, 64).astype(np.uint8)[None, None, :]
    writer = VideoWriter(tmp_path / name, 64, 48, NTSC, channels=4)
    writer.write(rgba)
    writer.commit()
    decoded, rate, streams = read_video(tmp_path / name, fmt="rgba")
    assert streams[0] == ("video", codec)
    assert rate == NTSC
    assert decoded.shape == rgba.shape
    assert np.abs(decoded[..., 3].astype(int) - rgba[..., 3]).max() <= 6


def test_video_codec_choice_and_errors(tmp_path):
    assert video_codec_for(Path("a.mp4"), 3) == ("libx264", "yuv420p")
    assert video_codec_for(Path("a.mov"), 4) == ("prores_ks", "yuva444p10le")
    assert video_codec_for(Path("a.webm"), 4) == ("libvpx-vp9", "yuva420p")
    with pytest.raises(ValueError, match="cannot hold transparency"):
        video_codec_for(Path("a.mp4"), 4)
    with pytest.raises(ValueError, match="unsupported output extension '.xyz'"):
        video_codec_for(Path("a.xyz"), 3)
    assert has_encoder("libx264") and not has_encoder("no_such_encoder")


def test_missing_encoder_is_a_clear_error(monkeypatch):
    import binarize.matting.video as video

    monkeypatch.setattr(video, "has_encoder", lambda name: name != "prores_ks")
    with pytest.raises(ValueError, match="needs the 'prores_ks' encoder, which this PyAV/FFmpeg build lacks"):
        video.video_codec_for(Path("a.mov"), 4)


def test_audio_is_remuxed_into_mp4(tmp_path):
    make_video(tmp_path / "src.mp4", audio="aac")
    writer = VideoWriter(tmp_path / "out.mp4", 64, 48, NTSC, audio_path=tmp_path / "src.mp4")
    writer.write(clip_frames(8))
    writer.commit()
    _, _, streams = read_video(tmp_path / "out.mp4")
    assert ("audio", "aac") in streams
    assert writer._audio.remux
    assert audio_samples(tmp_path / "out.mp4") == audio_samples(tmp_path / "src.mp4")


@needs_encoder("libvpx-vp9", "libopus")
def test_audio_is_transcoded_when_the_container_refuses_the_codec(tmp_path):
    make_video(tmp_path / "src.mp4", audio="aac")
    writer = VideoWriter(tmp_path / "out.webm", 64, 48, NTSC, audio_path=tmp_path / "src.mp4")
    writer.write(clip_frames(8))
    writer.commit()
    _, rate, streams = read_video(tmp_path / "out.webm")
    assert ("audio", "opus") in streams and not writer._audio.remux
    # the same duration (opus runs at 48 kHz; the source at 16 kHz), up to codec padding
    assert abs(audio_samples(tmp_path / "out.webm") / 48000 - audio_samples(tmp_path / "src.mp4") / 16000) < 0.05


def test_audio_falls_back_to_transcoding_when_the_muxer_refuses_the_copy(tmp_path, monkeypatch):
    import binarize.matting.video as video

    class RefusingCopier(video.AudioCopier):
        def __init__(self, source, output, offset, remux):
            super().__init__(source, output, offset, remux)
            if remux:  # as if the container's header refused the remuxed stream
                raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")

    monkeypatch.setattr(video, "AudioCopier", RefusingCopier)
    make_video(tmp_path / "src.mp4", audio="aac")
    writer = VideoWriter(tmp_path / "out.mp4", 64, 48, NTSC, audio_path=tmp_path / "src.mp4")
    writer.write(clip_frames(8))
    writer.commit()
    assert not writer._audio.remux
    assert ("audio", "aac") in read_video(tmp_path / "out.mp4")[2]
    assert audio_samples(tmp_path / "out.mp4") / 16000 == pytest.approx(audio_samples(tmp_path / "src.mp4") / 16000,
                                                                        abs=0.07)
    assert only_visible(tmp_path) == ["out.mp4", "src.mp4"]


def test_audio_before_a_late_first_video_frame_is_trimmed(tmp_path):
    make_video(tmp_path / "late.mp4", n=8, rate=Fraction(30), first_pts=15)  # video starts at 0.5 s
    source = open_source(tmp_path / "late.mp4")
    assert source.start_time == pytest.approx(0.5)
    writer = VideoWriter(tmp_path / "out.mp4", 64, 48, Fraction(30), audio_path=source.audio_path,
                         audio_offset=source.start_time)
    writer.write(np.stack(list(source)))
    writer.commit()
    # the output's audio covers the 8 video frames (8 / 30 s), not the source's 23 / 30 s, up to one AAC frame
    assert audio_samples(tmp_path / "late.mp4") / 16000 == pytest.approx(23 / 30, abs=0.07)
    assert audio_samples(tmp_path / "out.mp4") / 16000 == pytest.approx(8 / 30, abs=0.07)
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert [stream.start_time for stream in container.streams] == [0, 0]


def test_png_sequence_writer_is_atomic_and_exact(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 4), dtype=np.uint8)
    writer = ImageSequenceWriter(tmp_path / "seq", 7, 5, 4)
    writer.write(frames)
    assert not (tmp_path / "seq").exists()
    writer.commit()
    assert only_visible(tmp_path / "seq") == ["0000.png", "0001.png", "0002.png"]
    for i in range(3):
        image = Image.open(tmp_path / "seq" / f"{i:04d}.png")
        assert image.mode == "RGBA"
        assert np.array_equal(np.asarray(image), frames[i])
    other = ImageSequenceWriter(tmp_path / "other", 7, 5, 1)
    other.write(frames[..., :1])
    other.abort()
    assert only_visible(tmp_path) == ["seq"]


def test_writer_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        ImageSequenceWriter(tmp_path / "full", 4, 4, 3)
    writer = ImageWriter(tmp_path / "one.png", 4, 4, 3)
    with pytest.raises(ValueError, match="single image"):
        writer.write(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 frames of shape \[T, 4, 4, 3\]"):
        writer.write(np.zeros((1, 4, 5, 3), np.uint8))
    writer.abort()  # a writer holds its (unique) temporary file from creation until commit or abort
    with pytest.raises(ValueError, match="unknown writer kind"):
        open_writer(tmp_path / "x", "gif", 4, 4, 3)
    video = VideoWriter(tmp_path / "v.mp4", 8, 8, Fraction(25))
    video.write(np.zeros((2, 8, 8, 3), np.uint8))
    video.abort()
    assert only_visible(tmp_path) == ["full"]


# ----------------------------------------------------------------------------------------- hostile sources (issue 19)
def make_vfr_video(path: Path, steps: List[int], audio: bool = True, w: int = 32, h: int = 24) -> List[Fraction]:
    """An h264 clip whose frame ``i`` lasts ``steps[i]`` ticks of 1/30 s (variable frame rate),
    with a 16 kHz sine audio track when ``audio``; returns the frame times in seconds."""
    times, tick = [], 0
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=30, options={"crf": "10", "preset": "ultrafast"})
        video.width, video.height, video.pix_fmt = w, h, "yuv444p"
        video.codec_context.time_base = Fraction(1, 30)
        stream = container.add_stream("aac", rate=16000) if audio else None
        if stream is not None:
            stream.layout = "mono"
        for i, step in enumerate(steps):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), (i * 9) % 256, np.uint8), format="rgb24")
            frame.pts, frame.time_base = tick, Fraction(1, 30)
            times.append(Fraction(tick, 30))
            container.mux(video.encode(frame))
            tick += step
        container.mux(video.encode(None))
        if stream is not None:
            total = 16000 * tick // 30
            signal = (0.3 * np.sin(2 * np.pi * 440 * np.arange(total) / 16000)).astype(np.float32)[None]
            for start in range(0, total, 1024):
                chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(signal[:, start:start + 1024]), format="fltp",
                                                   layout="mono")
                chunk.sample_rate, chunk.pts = 16000, start
                container.mux(stream.encode(chunk))
            container.mux(stream.encode(None))
    return times


def frame_times(path: Path) -> List[float]:
    """Presentation times (seconds) of the decoded video frames, from the stream's first one."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pts = [frame.pts for frame in container.decode(stream)]
        return [float((p - pts[0]) * stream.time_base) for p in pts]


def test_variable_frame_rate_source_keeps_its_timestamps(tmp_path):
    steps = [1] * 10 + [3] * 10  # 30 fps, then 10 fps: average 300/19, frame 15 at 25/30 s
    times = make_vfr_video(tmp_path / "vfr.mp4", steps)
    with open_source(tmp_path / "vfr.mp4") as source:
        assert source.time_base is not None  # recognised as variable-rate
        got = [t for _, t in source.timed_frames()]
        assert got == pytest.approx([float(t) for t in times], abs=1e-4)
        writer = VideoWriter(tmp_path / "out.mp4", 32, 24, source.frame_rate, audio_path=source.audio_path,
                             audio_offset=source.start_time, time_base=source.time_base)
    with open_source(tmp_path / "vfr.mp4") as source:
        for frame, t in source.timed_frames():
            writer.write(frame[None], [t])
    writer.commit()
    assert frame_times(tmp_path / "out.mp4") == pytest.approx([float(t) for t in times], abs=1e-3)
    assert audio_samples(tmp_path / "out.mp4") / 16000 == pytest.approx(float(times[-1] + Fraction(3, 30)), abs=0.07)


def test_constant_rate_source_is_not_taken_for_variable(tmp_path):
    make_video(tmp_path / "cfr.mp4", n=12)
    with open_source(tmp_path / "cfr.mp4") as source:
        assert source.time_base is None
        assert all(t is None for _, t in source.timed_frames())


@pytest.mark.parametrize(("degrees", "turns"), [(90, 1), (-90, 3), (180, 2)])
def test_display_rotation_is_applied(tmp_path, degrees, turns):
    coded = clip_frames(3, 32, 16)
    coded[:, :4, :8] = 255  # a white mark in the coded top-left corner
    with av.open(str(tmp_path / "rot.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 32, 16, "yuv444p"
        stream.set_display_rotation(degrees)
        for i, array in enumerate(coded):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with open_source(tmp_path / "rot.mp4") as source:
        expected = np.rot90(coded, turns, axes=(1, 2))
        assert (source.width, source.height) == (expected.shape[2], expected.shape[1])
        frames = np.stack(list(source))
    assert np.abs(frames.astype(int) - expected).max() <= 8


def test_sixteen_bit_grayscale_png_is_scaled(tmp_path):
    values = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I;16", "I")
    with open_source(tmp_path / "deep.png") as source:
        frame = next(iter(source))
    expected = np.rint(values / 257).astype(int)
    assert np.array_equal(frame[..., 0].astype(int), expected) and np.array_equal(frame[..., 0], frame[..., 2])


def test_decompression_bomb_image_is_a_clear_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the file stands for a huge one
    with pytest.raises(ValueError, match=r"bomb.png.*50x40 pixels.*limit of 1000 .*decompression bomb"):
        open_source(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match="decompression bomb"):
        open_source(tmp_path)


def make_truncated(path: Path, n: int = 40) -> Path:
    """A clip with its index first (faststart) and the second half of the file cut off."""
    make_video(path.with_name("whole.mp4"), n=n)
    fast = path.with_name("fast.mp4")
    with av.open(str(path.with_name("whole.mp4"))) as src, av.open(str(fast), "w",
                                                                    options={"movflags": "faststart"}) as dst:
        streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                dst.mux(packet)
    data = fast.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    path.with_name("whole.mp4").unlink()
    fast.unlink()
    return path


def test_truncated_video_is_read_up_to_the_damage(tmp_path):
    make_truncated(tmp_path / "cut.mp4")
    with open_source(tmp_path / "cut.mp4") as source:
        assert source.num_frames == 40
        frames = list(source)
        assert 0 < len(frames) < 40 and source.frames_read == len(frames)


def test_a_size_change_mid_stream_is_scaled_to_the_first_size(tmp_path):
    parts = []
    for k, (w, h) in enumerate([(32, 24), (16, 12)]):
        part = tmp_path / f"part{k}.ts"
        with av.open(str(part), "w") as container:
            stream = container.add_stream("mpeg2video", rate=25)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for i in range(4):
                frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 100 + 40 * k, np.uint8), format="rgb24")
                frame.pts = i
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        parts.append(part.read_bytes())
    (tmp_path / "joined.ts").write_bytes(b"".join(parts))
    with open_source(tmp_path / "joined.ts") as source:
        frames = list(source)
        assert {frame.shape for frame in frames} == {(24, 32, 3)}
        assert len(frames) >= 7 and frames[-1].mean() > 120  # the second part's frames, scaled up
        assert any(re.search(r"changes size at frame [34] \(16x12\)", note) for note in source.problems), source.problems


def test_two_writers_of_one_output_never_share_a_temporary_file(tmp_path):
    first = VideoWriter(tmp_path / "same.mp4", 64, 48, Fraction(25))
    second = VideoWriter(tmp_path / "same.mp4", 64, 48, Fraction(25))
    assert first.temp_path != second.temp_path
    second.write(clip_frames(3))
    second.commit()
    assert len(read_video(tmp_path / "same.mp4")[0]) == 3
    first.write(clip_frames(5))
    first.commit()  # the later commit replaces the file as a whole
    assert len(read_video(tmp_path / "same.mp4")[0]) == 5
    assert only_visible(tmp_path) == ["same.mp4"]


def test_commit_can_be_rolled_back_and_restores_the_old_file(tmp_path):
    (tmp_path / "out.png").write_bytes(b"old")
    writer = ImageWriter(tmp_path / "out.png", 4, 4, 3)
    writer.write(np.zeros((1, 4, 4, 3), np.uint8))
    writer.commit(keep_backup=True)
    assert (tmp_path / "out.png").read_bytes() != b"old"
    writer.rollback()
    assert (tmp_path / "out.png").read_bytes() == b"old"
    writer.abort()
    assert only_visible(tmp_path) == ["out.png"]


def test_writers_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        video = VideoWriter(tmp_path / "v.mp4", 8, 8, Fraction(25))
        video.write(np.zeros((1, 8, 8, 3), np.uint8))
        video.commit()
        folder = ImageSequenceWriter(tmp_path / "seq", 8, 8, 3)
        folder.write(np.zeros((1, 8, 8, 3), np.uint8))
        folder.commit()
    finally:
        os.umask(old)
    assert (tmp_path / "v.mp4").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "seq").stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize(("text", "rate"), [
    ("29.97", NTSC), ("23.976", Fraction(24000, 1001)), ("59.94", Fraction(60000, 1001)), ("30", Fraction(30)),
    ("12.5", Fraction(25, 2)), ("30000/1001", NTSC), (29.97, NTSC), (Fraction(24), Fraction(24)),
])
def test_frame_rates_parse_to_sensible_fractions(text, rate):
    assert parse_frame_rate(text) == rate


@pytest.mark.parametrize("text", ["nan", "inf", "-5", "0", "1e-9", "1e9", "abc", "1/0"])
def test_bad_frame_rates_are_one_line_errors(text):
    with pytest.raises(ValueError, match="frame rate") as info:
        parse_frame_rate(text)
    assert "\n" not in str(info.value)


def test_output_path_checks(tmp_path):
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(ValueError, match="is an existing folder"):
        check_output_path(tmp_path / "dir.mp4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_path(tmp_path / "file" / "sub" / "out.mp4")
    with pytest.raises(ValueError, match="is an existing file; a PNG sequence needs a folder"):
        check_output_path(tmp_path / "file", folder=True)
    check_output_path(tmp_path / "new" / "deeper" / "out.mp4")  # missing folders are created later


def test_dataset_image_reader_scales_sixteen_bit_colour_reads(tmp_path):
    from binarize.matting.data.imageio import read_gray, read_rgb

    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert np.allclose(read_gray(tmp_path / "deep.png"), values / 65535)
    assert np.allclose(read_rgb(tmp_path / "deep.png"), np.repeat((values / 65535)[..., None], 3, -1))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_a_folder_that_refuses_files_is_caught_before_any_work():
    # /proc accepts no new files, although access() says it is writable when running as root
    with pytest.raises(ValueError, match=r"cannot create output '/proc/x.mp4': cannot write in '/proc'"):
        check_output_path(Path("/proc/x.mp4"))
