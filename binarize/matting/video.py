"""Frame readers and atomic frame writers for video matting (PyAV and Pillow).

Readers yield RGB frames as ``uint8`` arrays ``[H, W, 3]``; writers take batches of frames
``[T, H, W, C]`` (C = 1 gray, 3 RGB or 4 RGBA). Every writer works under a temporary name in the
destination's directory (``.name.partial.ext`` or a ``.name.partial`` folder) and only
:meth:`FrameWriter.commit` renames it to the requested name, so a failed or interrupted run never
leaves a half-written output behind. Video writers keep the source's exact rational frame rate
and copy its audio stream (remuxed when the container allows the codec, else transcoded).
"""
from __future__ import annotations

import os
import re
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import av
import numpy as np
from PIL import Image

PathLike = Union[str, "os.PathLike[str]"]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# containers whose codecs can carry an alpha channel (ProRes 4444 in .mov, VP9 with alpha in .webm/.mkv)
ALPHA_VIDEO_EXTENSIONS = (".mov", ".webm", ".mkv")
DEFAULT_FRAME_RATE = Fraction(30)
_CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def natural_key(name: str) -> List[Union[int, str]]:
    """Sort key that orders ``frame2.png`` before ``frame10.png`` (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def resize_cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale an ``[H, W, C]`` uint8 image to cover ``width x height`` and centre-crop it (no distortion)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return resized[top:top + height, left:left + width]


# --------------------------------------------------------------------------------------------- readers
class FrameSource:
    """Base class of frame readers: iterate to get ``uint8 [H, W, 3]`` RGB frames.

    Attributes: ``path``, ``width``, ``height``, ``frame_rate`` (exact ``Fraction``), ``num_frames``
    (``None`` when unknown), ``audio_path`` (a container with an audio stream to copy, or ``None``)
    and ``start_time`` (seconds of the first video frame, used to keep audio in sync).
    """

    path: Path
    width: int
    height: int
    frame_rate: Fraction = DEFAULT_FRAME_RATE
    num_frames: Optional[int] = None
    audio_path: Optional[Path] = None
    start_time: float = 0.0

    def __iter__(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles; iterating again after close is not supported."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VideoReader(FrameSource):
    """Decode a video file with PyAV; the frame rate is the stream's exact ``average_rate``."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read video {str(self.path)!r}: {_ffmpeg_message(exc)}") from None
        if not self._container.streams.video:
            self._container.close()
            raise ValueError(f"cannot read video {str(self.path)!r}: it has no video stream")
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self._stream = stream
        self.width, self.height = stream.codec_context.width, stream.codec_context.height
        if not self.width or not self.height:
            self._container.close()
            raise ValueError(f"cannot read video {str(self.path)!r}: unknown frame size")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.frame_rate = Fraction(rate) if rate else DEFAULT_FRAME_RATE
        self.num_frames = stream.frames or None
        if stream.start_time is not None and stream.time_base is not None:
            self.start_time = float(stream.start_time * stream.time_base)
        self.audio_path = self.path if self._container.streams.audio else None

    def __iter__(self) -> Iterator[np.ndarray]:
        try:
            for frame in self._container.decode(self._stream):
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as exc:
            raise ValueError(f"cannot decode video {str(self.path)!r}: {_ffmpeg_message(exc)}") from None

    def close(self) -> None:
        self._container.close()


class ImageSequenceReader(FrameSource):
    """Read a list of image files (all of one size) in the given order; used for folders and single images."""

    def __init__(self, files: Sequence[Path], path: PathLike, frame_rate: Optional[Fraction] = None):
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(path)!r}")
        self.path = Path(path)
        self.files = list(files)
        self.width, self.height = _image_size(self.files[0])
        self.frame_rate = Fraction(frame_rate) if frame_rate else DEFAULT_FRAME_RATE
        self.num_frames = len(self.files)

    def __iter__(self) -> Iterator[np.ndarray]:
        for file in self.files:
            frame = _read_rgb(file)
            if frame.shape[:2] != (self.height, self.width):
                raise ValueError(
                    f"image {str(file)!r} is {frame.shape[1]}x{frame.shape[0]} but the sequence is "
                    f"{self.width}x{self.height}"
                )
            yield frame


def open_source(path: PathLike, frame_rate: Optional[Fraction] = None) -> FrameSource:
    """Open a video file, a folder of images (natural order) or a single image as a frame source.

    ``frame_rate`` sets the rate of image inputs (default 30); a video keeps its own exact rate.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {str(path)!r}")
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if _is_image(p)), key=lambda p: natural_key(p.name))
        return ImageSequenceReader(files, path, frame_rate)
    if _is_image(path):
        return ImageSequenceReader([path], path, frame_rate)
    return VideoReader(path)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from None


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from None


def _ffmpeg_message(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


# --------------------------------------------------------------------------------------------- writers
def partial_path(path: Path) -> Path:
    """The temporary name a writer uses for ``path``: ``.name.partial.ext`` in the same directory."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


class FrameWriter:
    """Base class of writers: ``write`` batches, then ``close`` (finish the file) and ``commit`` (rename).

    ``abort`` deletes the temporary output; it is safe to call at any time and more than once.
    """

    path: Path
    frames_written: int = 0

    def write(self, frames: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush encoders and close the temporary file."""

    def commit(self) -> None:
        """Move the finished temporary output to the requested name."""
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


def _check_frames(frames: np.ndarray, channels: int, width: int, height: int) -> np.ndarray:
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (height, width, channels):
        raise ValueError(
            f"expected uint8 frames of shape [T, {height}, {width}, {channels}], got {frames.dtype} "
            f"{tuple(frames.shape)}"
        )
    return frames


class ImageSequenceWriter(FrameWriter):
    """Write frames as ``0000.png, 0001.png, ...`` into a folder (``L``, ``RGB`` or ``RGBA`` PNGs)."""

    def __init__(self, path: PathLike, width: int, height: int, channels: int, extension: str = ".png"):
        self.path = Path(path)
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise ValueError(f"output folder {str(self.path)!r} already exists and is not empty")
        self.width, self.height, self.channels, self.extension = width, height, channels, extension
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()

    def write(self, frames: np.ndarray) -> None:
        frames = _check_frames(frames, self.channels, self.width, self.height)
        for frame in frames:
            image = Image.fromarray(frame[..., 0] if self.channels == 1 else frame, _CHANNEL_MODES[self.channels])
            image.save(self._tmp / f"{self.frames_written:04d}{self.extension}")
            self.frames_written += 1

    def commit(self) -> None:
        if self.path.is_dir():
            self.path.rmdir()  # checked empty at open
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


class ImageWriter(FrameWriter):
    """Write exactly one frame as an image file (for single-image inputs)."""

    def __init__(self, path: PathLike, width: int, height: int, channels: int):
        self.path = Path(path)
        if channels == 4 and self.path.suffix.lower() in (".jpg", ".jpeg"):
            raise ValueError(f"{str(self.path)!r}: JPEG cannot hold transparency; use .png or a background")
        self.width, self.height, self.channels = width, height, channels
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = partial_path(self.path)

    def write(self, frames: np.ndarray) -> None:
        frames = _check_frames(frames, self.channels, self.width, self.height)
        if self.frames_written + len(frames) > 1:
            raise ValueError(f"{str(self.path)!r} is a single image but the input has more than one frame")
        for frame in frames:
            mode = _CHANNEL_MODES[self.channels]
            Image.fromarray(frame[..., 0] if self.channels == 1 else frame, mode).save(
                self._tmp, format=Image.registered_extensions()[self.path.suffix.lower()]
            )
            self.frames_written += 1

    def commit(self) -> None:
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._tmp.unlink(missing_ok=True)


def video_codec_for(path: Path, channels: int) -> tuple[str, str]:
    """Pick ``(codec, pix_fmt)`` for a video output: h264/yuv420p, or an alpha codec for RGBA frames.

    RGBA goes to ProRes 4444 (``prores_ks``, ``yuva444p10le``) in ``.mov`` and to VP9 with alpha
    (``libvpx-vp9``, ``yuva420p``) in ``.webm``/``.mkv``; ``.mp4``/``.avi`` cannot carry alpha.
    An encoder missing from this PyAV/FFmpeg build is a ``ValueError`` naming it.
    """
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTENSIONS:
        raise ValueError(
            f"unsupported output extension {ext or '(none)'!r} for {str(path)!r}; "
            f"use one of {', '.join(VIDEO_EXTENSIONS)}"
        )
    if channels == 4:
        if ext == ".mov":
            choice = ("prores_ks", "yuva444p10le")
        elif ext in (".webm", ".mkv"):
            choice = ("libvpx-vp9", "yuva420p")
        else:
            raise ValueError(
                f"{str(path)!r}: {ext} cannot hold transparency; use .mov (ProRes 4444), .webm (VP9 with alpha), "
                "a PNG sequence, or a background"
            )
    else:
        choice = ("libvpx-vp9", "yuv420p") if ext == ".webm" else ("libx264", "yuv420p")
    if not has_encoder(choice[0]):
        raise ValueError(f"{str(path)!r} needs the {choice[0]!r} encoder, which this PyAV/FFmpeg build lacks")
    return choice


def has_encoder(name: str) -> bool:
    """True when this PyAV/FFmpeg build can encode with codec ``name``."""
    try:
        av.codec.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        return False
    return True


_CODEC_OPTIONS = {
    "libx264": {"crf": "18", "preset": "medium"},
    "libvpx-vp9": {"crf": "20", "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"},
    "prores_ks": {"profile": "4444"},
}


class VideoWriter(FrameWriter):
    """Encode frames to a video file at an exact rational ``frame_rate``, copying audio from ``audio_path``.

    Frame ``i`` gets the timestamp ``i / frame_rate`` (time base ``1 / frame_rate``), so 30000/1001
    stays 30000/1001. H.264 (4:2:0) needs even sizes: odd frames are padded by repeating the last
    row/column, so such an output is one pixel larger. ``bit_rate`` (bits/s) replaces the default
    constant-quality setting.
    """

    def __init__(
        self,
        path: PathLike,
        width: int,
        height: int,
        frame_rate: Fraction,
        channels: int = 3,
        *,
        audio_path: Optional[PathLike] = None,
        audio_offset: float = 0.0,
        bit_rate: Optional[int] = None,
    ):
        self.path = Path(path)
        self.codec, self.pix_fmt = video_codec_for(self.path, channels)
        self.width, self.height, self.channels = width, height, channels
        self.frame_rate = Fraction(frame_rate)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = partial_path(self.path)
        self._closed = False
        # yuv420p needs even sizes in libx264: pad odd frames by one repeated row/column
        self._pad = (height % 2, width % 2) if self.codec == "libx264" else (0, 0)
        self._open(audio_path, audio_offset, bit_rate, remux=True)

    def _open(
        self, audio_path: Optional[PathLike], audio_offset: float, bit_rate: Optional[int], remux: bool
    ) -> None:
        self._container = av.open(str(self._tmp), "w")
        self._audio: Optional[AudioCopier] = None
        try:
            options = dict(_CODEC_OPTIONS.get(self.codec, {}))
            if bit_rate:
                options.pop("crf", None)
                options.pop("b", None)
            stream = self._container.add_stream(self.codec, rate=self.frame_rate, options=options)
            stream.width, stream.height = self.width + self._pad[1], self.height + self._pad[0]
            stream.pix_fmt = self.pix_fmt
            stream.codec_context.time_base = 1 / self.frame_rate
            if bit_rate:
                stream.bit_rate = int(bit_rate)
            self._stream = stream
            self._audio = AudioCopier(audio_path, self._container, audio_offset, remux) if audio_path else None
            self._container.start_encoding()
        except av.FFmpegError as exc:
            if self._audio is not None:
                self._audio.close()
            self._container.close()
            self._tmp.unlink(missing_ok=True)
            if remux and audio_path:  # the container refused the copied audio stream: transcode instead
                return self._open(audio_path, audio_offset, bit_rate, remux=False)
            raise ValueError(f"cannot write video {str(self.path)!r}: {_ffmpeg_message(exc)}") from None

    def write(self, frames: np.ndarray) -> None:
        frames = _check_frames(frames, self.channels, self.width, self.height)
        if self.channels == 1:
            frames = np.repeat(frames, 3, axis=-1)
        if any(self._pad):
            frames = np.pad(frames, ((0, 0), (0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        fmt = "rgba" if self.channels == 4 else "rgb24"
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=fmt)
            frame.pts = self.frames_written
            frame.time_base = self._stream.codec_context.time_base
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1
            if self._audio is not None:
                self._audio.copy_until(float(self.frames_written / self.frame_rate))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            if self._audio is not None:
                self._audio.copy_until(float("inf"))
                self._audio.close()
        finally:
            self._container.close()

    def commit(self) -> None:
        self.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                if self._audio is not None:
                    self._audio.close()
                self._container.close()
            except Exception:  # noqa: BLE001 - best effort: the file is deleted next
                pass
        self._tmp.unlink(missing_ok=True)


# audio encoder used when the output container cannot take the source codec as is (default AAC)
_TRANSCODE_TO = {".webm": "libopus"}


class AudioCopier:
    """Copy the first audio stream of ``source`` into ``output`` incrementally, interleaved with the video.

    Packets are remuxed when the output container supports the codec, else decoded and re-encoded
    (AAC, or Opus for WebM). ``offset`` (seconds) is the source video's start time, subtracted so
    audio stays in sync with video frames that are re-timed from zero.
    """

    def __init__(self, source: PathLike, output: av.container.OutputContainer, offset: float, remux: bool):
        self._input = av.open(str(source))
        self._in = self._input.streams.audio[0]
        self._offset = offset
        codec_name = self._in.codec_context.name
        self.remux = remux and codec_name in output.supported_codecs
        if self.remux:
            self._out = output.add_stream_from_template(self._in)
        else:
            ext = Path(output.name).suffix.lower()
            encoder = _TRANSCODE_TO.get(ext, "aac")
            rate = 48000 if encoder == "libopus" else (self._in.codec_context.sample_rate or 44100)
            self._out = output.add_stream(encoder, rate=rate)
            self._out.layout = self._in.codec_context.layout
        self._output = output
        self._packets = self._input.demux(self._in)
        self._pending: Optional[av.Packet] = None
        self._done = False

    def _next_packet(self) -> Optional[av.Packet]:
        if self._pending is None and not self._done:
            for packet in self._packets:
                if packet.dts is not None:
                    self._pending = packet
                    break
            else:
                self._done = True
        return self._pending

    def copy_until(self, seconds: float) -> None:
        """Write source audio packets whose time (relative to the video start) is before ``seconds``."""
        while (packet := self._next_packet()) is not None:
            time_base = packet.time_base
            start = float(packet.pts * time_base) - self._offset if packet.pts is not None else 0.0
            if start >= seconds:
                return
            self._pending = None
            if start + float((packet.duration or 0) * time_base) <= 0 < self._offset:
                continue  # audio that ends before the first video frame is trimmed
            shift = round(self._offset / time_base) if time_base else 0
            if self.remux:
                packet.pts = packet.pts - shift if packet.pts is not None else None
                packet.dts = packet.dts - shift
                packet.stream = self._out
                self._output.mux(packet)
            else:
                for frame in packet.decode():
                    if frame.pts is not None:
                        frame.pts -= shift
                    for out in self._out.encode(frame):
                        self._output.mux(out)
        if not self.remux and self._done and seconds == float("inf"):
            for out in self._out.encode(None):
                self._output.mux(out)

    def close(self) -> None:
        self._input.close()


def open_writer(
    path: PathLike,
    kind: str,
    width: int,
    height: int,
    channels: int,
    frame_rate: Fraction = DEFAULT_FRAME_RATE,
    *,
    audio_path: Optional[PathLike] = None,
    audio_offset: float = 0.0,
    bit_rate: Optional[int] = None,
) -> FrameWriter:
    """Create the writer for ``kind`` ``"video"``, ``"image"`` (one frame) or ``"png_sequence"`` (a folder)."""
    if kind == "png_sequence":
        return ImageSequenceWriter(path, width, height, channels)
    if kind == "image":
        return ImageWriter(path, width, height, channels)
    if kind == "video":
        return VideoWriter(
            path, width, height, frame_rate, channels,
            audio_path=audio_path, audio_offset=audio_offset, bit_rate=bit_rate,
        )
    raise ValueError(f"unknown writer kind {kind!r}; expected 'video', 'image' or 'png_sequence'")
