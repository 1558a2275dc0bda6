"""Frame readers and atomic frame writers for video matting (PyAV and Pillow).

Readers yield RGB frames as ``uint8`` arrays ``[H, W, 3]``; writers take batches of frames
``[T, H, W, C]`` (C = 1 gray, 3 RGB or 4 RGBA). Every writer works under a unique temporary name
in the destination's directory (``.name.XXXXXXXX.partial.ext`` or such a folder, one per run) and
only :meth:`FrameWriter.commit` renames it to the requested name, so a failed or interrupted run
never leaves a half-written output behind and two runs never share a temporary file. Video
writers keep the source's exact rational frame rate (or, for a variable-frame-rate source, its
timestamps), apply its display rotation and copy its audio stream (remuxed when the container
allows the codec, else transcoded).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import av
import numpy as np
from PIL import Image

from binarize._atomic import make_temp

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

    Attributes: ``path``, ``width``, ``height`` (as displayed, after any rotation), ``frame_rate``
    (exact ``Fraction``), ``num_frames`` (declared count, ``None`` when unknown), ``audio_path``
    (a container with an audio stream to copy, or ``None``), ``start_time`` (seconds of the first
    video frame, used to keep audio in sync), ``time_base`` (set for a variable-frame-rate video:
    the unit of the timestamps that :meth:`timed_frames` yields and writers should keep) and
    ``problems`` (human-readable notes on damage met while decoding, filled as frames are read).
    """

    path: Path
    width: int
    height: int
    frame_rate: Fraction = DEFAULT_FRAME_RATE
    num_frames: Optional[int] = None
    audio_path: Optional[Path] = None
    start_time: float = 0.0
    time_base: Optional[Fraction] = None
    frames_read: int = 0

    @property
    def problems(self) -> List[str]:
        """Notes on damage met while reading (e.g. a truncated file); empty for a clean source."""
        return []

    def __iter__(self) -> Iterator[np.ndarray]:
        for frame, _ in self.timed_frames():
            yield frame

    def timed_frames(self) -> Iterator[Tuple[np.ndarray, Optional[Fraction]]]:
        """``(frame, t)`` pairs; ``t`` is the frame's time in seconds from the first frame, or
        ``None`` for a constant-rate source (frame ``i`` is then at ``i / frame_rate``)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles; iterating again after close is not supported."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_container(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read video {str(path)!r}: {_ffmpeg_message(exc)}") from None


# a source whose frame times stray more than this fraction of a frame from i / rate is variable-rate
_VFR_TOLERANCE = Fraction(1, 2)


class VideoReader(FrameSource):
    """Decode a video file with PyAV; the frame rate is the stream's exact ``average_rate``.

    Opening scans the video packets' timestamps (no decoding) to tell a variable-frame-rate
    source, whose timestamps are then kept (``time_base``); it decodes the first frame to learn
    the display rotation, which is applied to every frame (``width``/``height`` are the rotated
    size). Damaged packets are skipped and counted in ``problems``; frames whose size changes
    mid-stream are scaled back to the first frame's size (noted once in ``problems``).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._problems: List[str] = []
        self._bad_packets = 0
        pts = self._scan()
        self._container = _open_container(self.path)
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self._stream = stream
        coded_w, coded_h = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.frame_rate = Fraction(rate) if rate else DEFAULT_FRAME_RATE
        self.num_frames = stream.frames or None
        tb = Fraction(stream.time_base) if stream.time_base else None
        if stream.start_time is not None and tb is not None:
            self.start_time = float(stream.start_time * tb)
        self._first_pts = min(pts) if pts else None
        if self._first_pts is not None and tb is not None:
            self.start_time = float(self._first_pts * tb)
            if _is_variable_rate(sorted(pts), tb, self.frame_rate):
                self.time_base = tb
        self._tb = tb
        self.audio_path = self.path if self._container.streams.audio else None
        self._decoded = self._decode()
        try:
            first = next(self._decoded, None)
        except BaseException:
            self._container.close()
            raise
        if first is None:
            self._container.close()
            raise ValueError(f"cannot read video {str(self.path)!r}: no frame could be decoded")
        self._first = first
        self._coded = (first.width, first.height) if first.width and first.height else (coded_w, coded_h)
        self.rotation = _rotation_steps(first)
        w, h = self._coded
        self.width, self.height = (h, w) if self.rotation % 2 else (w, h)

    def _scan(self) -> List[int]:
        """Timestamps of the video packets (one demux pass, no decoding); stops at damaged data."""
        container = _open_container(self.path)
        try:
            if not container.streams.video:
                raise ValueError(f"cannot read video {str(self.path)!r}: it has no video stream")
            stream = container.streams.video[0]
            if not stream.codec_context.width or not stream.codec_context.height:
                raise ValueError(f"cannot read video {str(self.path)!r}: unknown frame size")
            pts: List[int] = []
            try:
                for packet in container.demux(stream):
                    if packet.pts is not None and packet.size:
                        pts.append(packet.pts)
            except av.FFmpegError:
                pass  # a damaged tail: decoding below meets it again and reports it
            return pts
        finally:
            container.close()

    def _decode(self) -> Iterator[av.VideoFrame]:
        """Frames in presentation order; a packet the decoder refuses is skipped and counted."""
        try:
            for packet in self._container.demux(self._stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    self._bad_packets += 1
                    continue
                yield from frames
        except av.FFmpegError:
            self._bad_packets += 1  # the demuxer itself gave up (e.g. a truncated file)

    @property
    def problems(self) -> List[str]:
        notes = list(self._problems)
        if self._bad_packets:
            notes.append(f"{self._bad_packets} damaged packet(s) skipped")
        return notes

    def timed_frames(self) -> Iterator[Tuple[np.ndarray, Optional[Fraction]]]:
        frames = self._decoded
        first, self._first = self._first, None
        if first is not None:
            frames = _chain(first, frames)
        for frame in frames:
            if (frame.width, frame.height) != self._coded:
                if not any("changes size" in note for note in self._problems):
                    self._problems.append(
                        f"the video changes size at frame {self.frames_read} ({frame.width}x{frame.height}); "
                        f"frames were scaled to the first frame's {self._coded[0]}x{self._coded[1]}"
                    )
                frame = frame.reformat(width=self._coded[0], height=self._coded[1])
            array = frame.to_ndarray(format="rgb24")
            if self.rotation:
                array = np.ascontiguousarray(np.rot90(array, self.rotation))
            time = None
            if self.time_base is not None and frame.pts is not None and self._first_pts is not None:
                time = (frame.pts - self._first_pts) * self.time_base
            self.frames_read += 1
            yield array, time

    def close(self) -> None:
        self._container.close()


def _chain(first: av.VideoFrame, rest: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
    yield first
    yield from rest


def _rotation_steps(frame: av.VideoFrame) -> int:
    """Quarter turns counter-clockwise (``np.rot90``'s ``k``) that display ``frame`` upright."""
    try:
        degrees = frame.rotation
    except Exception:  # noqa: BLE001 - malformed side data: show the frame as coded
        return 0
    return round((degrees or 0) / 90) % 4


def _is_variable_rate(pts: Sequence[int], time_base: Fraction, rate: Fraction) -> bool:
    """True when frame ``i``'s time strays from ``i / rate`` by more than half a frame."""
    first = pts[0]
    for i, value in enumerate(pts):
        if abs((value - first) * time_base * rate - i) > _VFR_TOLERANCE:
            return True
    return False


class ImageSequenceReader(FrameSource):
    """Read a list of image files (all of one size) in the given order; used for folders and single images."""

    def __init__(self, files: Sequence[Path], path: PathLike, frame_rate: Optional[Fraction] = None):
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(path)!r}")
        self.path = Path(path)
        self.files = list(files)
        self.width, self.height = _image_size(self.files[0])
        self.frame_rate = parse_frame_rate(frame_rate) if frame_rate else DEFAULT_FRAME_RATE
        self.num_frames = len(self.files)

    def timed_frames(self) -> Iterator[Tuple[np.ndarray, Optional[Fraction]]]:
        for file in self.files:
            frame = _read_rgb(file)
            if frame.shape[:2] != (self.height, self.width):
                raise ValueError(
                    f"image {str(file)!r} is {frame.shape[1]}x{frame.shape[0]} but the sequence is "
                    f"{self.width}x{self.height}"
                )
            self.frames_read += 1
            yield frame, None


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


def check_source(path: PathLike) -> None:
    """Cheap checks that ``path`` can be opened as a source (existence, container, image header)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {str(path)!r}")
    if path.is_dir():
        files = [p for p in path.iterdir() if _is_image(p)]
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {str(path)!r}")
        _image_size(min(files, key=lambda p: natural_key(p.name)))
    elif _is_image(path):
        _image_size(path)
    else:
        container = _open_container(path)
        try:
            if not container.streams.video:
                raise ValueError(f"cannot read video {str(path)!r}: it has no video stream")
        finally:
            container.close()


def parse_frame_rate(value: Union[str, float, int, Fraction]) -> Fraction:
    """A frame rate as an exact ``Fraction`` between 1/100 and 1000 frames per second.

    Accepts ``"30000/1001"``, ``"29.97"``, ``30`` or a ``Fraction``. Decimal NTSC rates snap to
    their exact value (29.97 -> 30000/1001, 23.976 -> 24000/1001, 59.94 -> 60000/1001); other
    decimals become the nearest fraction with a denominator of at most 1001 (12.5 -> 25/2).
    """
    text = str(value).strip()
    try:
        if isinstance(value, Fraction):
            rate = value
        elif "/" in text:
            rate = Fraction(text)
        else:
            number = float(text)
            if not math.isfinite(number):
                raise ValueError
            rate = _snap_rate(number)
    except (ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(f"bad frame rate {text!r}: expected a number such as 30, 29.97 or 30000/1001") from None
    if not _MIN_RATE <= rate <= _MAX_RATE:
        raise ValueError(f"frame rate {text} is out of range: use {float(_MIN_RATE)} to {_MAX_RATE} frames per second")
    if rate.denominator > 1_000_000:
        rate = rate.limit_denominator(1001)
    return rate


_MIN_RATE, _MAX_RATE = Fraction(1, 100), Fraction(1000)


def _snap_rate(number: float) -> Fraction:
    if number == round(number):
        return Fraction(round(number))
    ntsc = round(number * 1001 / 1000)
    if ntsc and abs(number - ntsc * 1000 / 1001) < 5e-4 * max(1.0, number / 30):
        return Fraction(ntsc * 1000, 1001)
    return Fraction(number).limit_denominator(1001)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _open_image(path: Path) -> Image.Image:
    with warnings.catch_warnings():  # a possible bomb is refused by _check_pixels, in one line
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with _open_image(path) as image:
            _check_pixels(image, path)
            return image.size
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from None


def _check_pixels(image: Image.Image, path: Path) -> None:
    """Refuse images past Pillow's decompression-bomb limit before decoding them."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.size[0] * image.size[1] > limit:
        raise ValueError(
            f"cannot read image {str(path)!r}: {image.size[0]}x{image.size[1]} pixels is more than "
            f"Pillow's limit of {limit} (a possible decompression bomb)"
        )


def image_to_rgb8(image: Image.Image) -> np.ndarray:
    """An opened Pillow image as ``uint8 [H, W, 3]``; 16-bit grayscale (``I;16``, ``I``) is scaled
    by 255/65535 instead of being clipped at 255 as ``Image.convert`` does."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values * (255 / 65535)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


# Pillow modes of 16-bit grayscale images (PNG, TIFF); "I" is how some versions open 16-bit PNGs
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with _open_image(path) as image:
            _check_pixels(image, path)
            return image_to_rgb8(image)
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from None


def _ffmpeg_message(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


# --------------------------------------------------------------------------------------------- writers
def check_output_path(path: PathLike, folder: bool = False) -> None:
    """Refuse an output that cannot be written, before any work: an existing folder where a file
    goes (or a file or non-empty folder where a PNG folder goes), an ancestor that is a file, or
    a folder without write permission. Missing folders are fine (they are created)."""
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise ValueError(f"output {str(path)!r} is an existing file; a PNG sequence needs a folder")
        if path.is_dir() and any(path.iterdir()):
            raise ValueError(f"output folder {str(path)!r} already exists and is not empty")
    elif path.is_dir():
        raise ValueError(f"output {str(path)!r} is an existing folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create output {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create output {str(path)!r}: no permission to write in {str(parent)!r}")
    if parent == path.parent:  # the folder exists: try it (access() says yes to root, e.g. on /proc)
        try:
            with tempfile.TemporaryFile(dir=parent, prefix=f".{path.name}.probe."):
                pass
        except OSError as exc:
            raise ValueError(
                f"cannot create output {str(path)!r}: cannot write in {str(parent)!r} ({exc.strerror or exc})"
            ) from None


def make_parents(path: Path) -> List[Path]:
    """Create the missing folders above ``path``; returns the ones created, deepest first."""
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty_dirs(folders: Sequence[Path]) -> None:
    """Remove folders (deepest first) that a failed run created, when they are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


class FrameWriter:
    """Base class of writers: ``write`` batches, ``close`` (finish the temporary file), ``commit``
    (move it to the requested name), and, when one of several outputs fails to commit,
    ``rollback`` (restore what was there). ``abort`` deletes the temporary output and the folders
    this writer created; it is safe to call at any time and more than once.
    """

    path: Path
    temp_path: Path
    frames_written: int = 0
    created_dirs: List[Path]
    _folder = False
    _backup: Optional[Path] = None
    _replaced_empty_dir = False
    _committed = False

    def _prepare(self, path: PathLike) -> None:
        self.path = Path(path)
        check_output_path(self.path, self._folder)
        self.created_dirs = make_parents(self.path)
        try:
            self.temp_path = make_temp(self.path, self._folder)
        except OSError as exc:
            remove_empty_dirs(self.created_dirs)
            if exc.errno is None:
                raise
            raise type(exc)(exc.errno, exc.strerror, str(self.path)) from None  # name the output, not the temp

    def write(self, frames: np.ndarray, times: Optional[Sequence[Optional[Fraction]]] = None) -> None:
        """Append ``[T, H, W, C]`` frames; ``times`` (seconds from the first frame) are used by
        video writers of variable-frame-rate sources and ignored otherwise."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush encoders and close the temporary file."""

    def commit(self, keep_backup: bool = False) -> None:
        """Move the finished temporary output to the requested name. With ``keep_backup`` an
        existing file there is kept aside until :meth:`finalize`, so :meth:`rollback` can restore it."""
        self.close()
        if self._folder:
            if self.path.is_dir():
                self.path.rmdir()  # empty (checked at open); a folder that filled since then fails here
                self._replaced_empty_dir = True
        elif self.path.is_dir():
            raise ValueError(f"output {str(self.path)!r} is now a folder; nothing was written")
        elif self.path.exists():
            self._backup = make_temp(self.path)
            os.replace(self.path, self._backup)
        try:
            os.replace(self.temp_path, self.path)
        except BaseException:
            self._restore_backup()
            raise
        self._committed = True
        if not keep_backup:
            self.finalize()

    def rollback(self) -> None:
        """Undo :meth:`commit`: the output goes back to its temporary name and the old file returns."""
        if self._committed:
            os.replace(self.path, self.temp_path)
            self._committed = False
        self._restore_backup()

    def finalize(self) -> None:
        """Drop the old file kept aside by :meth:`commit`."""
        if self._backup is not None:
            self._backup.unlink(missing_ok=True)
            self._backup = None

    def _restore_backup(self) -> None:
        if self._backup is not None:
            os.replace(self._backup, self.path)
            self._backup = None
        if self._replaced_empty_dir and not self.path.exists():
            self.path.mkdir()
            self._replaced_empty_dir = False

    def abort(self) -> None:
        if self._committed:
            return
        if self._folder:
            shutil.rmtree(self.temp_path, ignore_errors=True)
        else:
            self.temp_path.unlink(missing_ok=True)
        remove_empty_dirs(self.created_dirs)


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

    _folder = True

    def __init__(self, path: PathLike, width: int, height: int, channels: int, extension: str = ".png"):
        self.width, self.height, self.channels, self.extension = width, height, channels, extension
        self._prepare(path)

    def write(self, frames: np.ndarray, times: Optional[Sequence[Optional[Fraction]]] = None) -> None:
        frames = _check_frames(frames, self.channels, self.width, self.height)
        for frame in frames:
            image = Image.fromarray(frame[..., 0] if self.channels == 1 else frame, _CHANNEL_MODES[self.channels])
            image.save(self.temp_path / f"{self.frames_written:04d}{self.extension}")
            self.frames_written += 1


class ImageWriter(FrameWriter):
    """Write exactly one frame as an image file (for single-image inputs)."""

    def __init__(self, path: PathLike, width: int, height: int, channels: int):
        if channels == 4 and Path(path).suffix.lower() in (".jpg", ".jpeg"):
            raise ValueError(f"{str(path)!r}: JPEG cannot hold transparency; use .png or a background")
        self.width, self.height, self.channels = width, height, channels
        self._prepare(path)

    def write(self, frames: np.ndarray, times: Optional[Sequence[Optional[Fraction]]] = None) -> None:
        frames = _check_frames(frames, self.channels, self.width, self.height)
        if self.frames_written + len(frames) > 1:
            raise ValueError(f"{str(self.path)!r} is a single image but the input has more than one frame")
        for frame in frames:
            mode = _CHANNEL_MODES[self.channels]
            Image.fromarray(frame[..., 0] if self.channels == 1 else frame, mode).save(
                self.temp_path, format=Image.registered_extensions()[self.path.suffix.lower()]
            )
            self.frames_written += 1


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


# libx264's presets, fastest first. The default is "veryfast" (as OBS Studio's for live encoding):
# the encoder runs beside the model on the same cores, and "medium" took 27 ms of CPU per 512x288
# frame here against 7 ms for "veryfast" at the same CRF (docs/performance.md). CRF 17 instead of
# the 18 used with "medium" keeps the error of the tests' clips within the same bound.
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
DEFAULT_X264_PRESET = "veryfast"


def check_x264_preset(preset: str) -> str:
    """``preset`` if libx264 knows it; ValueError naming the choices otherwise."""
    if preset not in X264_PRESETS:
        raise ValueError(f"unknown H.264 preset {preset!r}; choose one of: {', '.join(X264_PRESETS)}")
    return preset


_CODEC_OPTIONS = {
    "libx264": {"crf": "17", "preset": DEFAULT_X264_PRESET},
    "libvpx-vp9": {"crf": "20", "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"},
    "prores_ks": {"profile": "4444"},
}


class VideoWriter(FrameWriter):
    """Encode frames to a video file at an exact rational ``frame_rate``, copying audio from ``audio_path``.

    Frame ``i`` gets the timestamp ``i / frame_rate`` (time base ``1 / frame_rate``), so 30000/1001
    stays 30000/1001. With ``time_base`` (a variable-frame-rate source), frames keep the times
    given to :meth:`write` instead, in that unit, so picture and audio stay in sync. H.264 (4:2:0)
    needs even sizes: odd frames are padded by repeating the last row/column, so such an output is
    one pixel larger. ``bit_rate`` (bits/s) replaces the default constant-quality setting;
    ``preset`` (H.264 only) replaces ``DEFAULT_X264_PRESET``.
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
        time_base: Optional[Fraction] = None,
        preset: Optional[str] = None,
    ):
        self.codec, self.pix_fmt = video_codec_for(Path(path), channels)
        self.preset = check_x264_preset(preset) if preset is not None else None
        self.width, self.height, self.channels = width, height, channels
        self.frame_rate = Fraction(frame_rate)
        self.time_base = Fraction(time_base) if time_base else None
        self._last_pts: Optional[int] = None
        self._closed = False
        self._audio: Optional[AudioCopier] = None
        # yuv420p needs even sizes in libx264: pad odd frames by one repeated row/column
        self._pad = (height % 2, width % 2) if self.codec == "libx264" else (0, 0)
        self._prepare(path)
        try:
            self._open(audio_path, audio_offset, bit_rate, remux=True)
        except BaseException:
            self._closed = True
            self.abort()
            raise

    @property
    def problems(self) -> List[str]:
        """Notes on source audio that could not be copied (damaged packets skipped)."""
        if self._audio is not None and self._audio.bad_packets:
            return [f"{self._audio.bad_packets} damaged audio packet(s) skipped"]
        return []

    def _open(
        self, audio_path: Optional[PathLike], audio_offset: float, bit_rate: Optional[int], remux: bool
    ) -> None:
        self._container = av.open(str(self.temp_path), "w")
        self._audio = None
        try:
            options = dict(_CODEC_OPTIONS.get(self.codec, {}))
            if bit_rate:
                options.pop("crf", None)
                options.pop("b", None)
            if self.preset is not None and self.codec == "libx264":
                options["preset"] = self.preset
            stream = self._container.add_stream(self.codec, rate=self.frame_rate, options=options)
            stream.width, stream.height = self.width + self._pad[1], self.height + self._pad[0]
            stream.pix_fmt = self.pix_fmt
            stream.codec_context.time_base = self.time_base or 1 / self.frame_rate
            if bit_rate:
                stream.bit_rate = int(bit_rate)
            self._stream = stream
            self._audio = AudioCopier(audio_path, self._container, audio_offset, remux) if audio_path else None
            self._container.start_encoding()
        except (av.FFmpegError, OverflowError) as exc:
            if self._audio is not None:
                self._audio.close()
            self._container.close()
            if remux and audio_path and isinstance(exc, av.FFmpegError):
                # the container refused the copied audio stream: transcode instead
                return self._open(audio_path, audio_offset, bit_rate, remux=False)
            raise ValueError(f"cannot write video {str(self.path)!r}: {_ffmpeg_message(exc)}") from None

    def write(self, frames: np.ndarray, times: Optional[Sequence[Optional[Fraction]]] = None) -> None:
        frames = _check_frames(frames, self.channels, self.width, self.height)
        if self.channels == 1:
            frames = np.repeat(frames, 3, axis=-1)
        if any(self._pad):
            frames = np.pad(frames, ((0, 0), (0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        fmt = "rgba" if self.channels == 4 else "rgb24"
        for k, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=fmt)
            time = times[k] if times is not None else None
            if self.time_base is None:
                frame.pts = self.frames_written
            else:
                if time is None:
                    time = self.frames_written / self.frame_rate
                pts = round(Fraction(time) / self.time_base)
                frame.pts = pts if self._last_pts is None or pts > self._last_pts else self._last_pts + 1
                self._last_pts = frame.pts
            frame.time_base = self._stream.codec_context.time_base
            if self._audio is not None and self.time_base is not None:
                self._audio.copy_until(float(frame.pts * self.time_base))
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1
            if self._audio is not None and self.time_base is None:
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

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                if self._audio is not None:
                    self._audio.close()
                self._container.close()
            except Exception:  # noqa: BLE001 - best effort: the file is deleted next
                pass
        super().abort()


# audio encoder used when the output container cannot take the source codec as is (default AAC)
_TRANSCODE_TO = {".webm": "libopus"}


class AudioCopier:
    """Copy the first audio stream of ``source`` into ``output`` incrementally, interleaved with the video.

    Packets are remuxed when the output container supports the codec, else decoded and re-encoded
    (AAC, or Opus for WebM). ``offset`` (seconds) is the source video's start time, subtracted so
    audio stays in sync with video frames that are re-timed from zero. Packets the decoder refuses
    (a damaged or truncated file) are skipped and counted in ``bad_packets``.
    """

    def __init__(self, source: PathLike, output: av.container.OutputContainer, offset: float, remux: bool):
        self._input = av.open(str(source))
        self._in = self._input.streams.audio[0]
        self._offset = offset
        self.bad_packets = 0
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
            try:
                for packet in self._packets:
                    if packet.dts is not None:
                        self._pending = packet
                        break
                else:
                    self._done = True
            except av.FFmpegError:
                self.bad_packets += 1  # the demuxer gave up on a damaged tail
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
                try:
                    decoded = packet.decode()
                except av.FFmpegError:
                    self.bad_packets += 1
                    continue
                for frame in decoded:
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
    time_base: Optional[Fraction] = None,
    preset: Optional[str] = None,
) -> FrameWriter:
    """Create the writer for ``kind`` ``"video"``, ``"image"`` (one frame) or ``"png_sequence"`` (a folder).

    ``time_base`` (video only) keeps the per-frame times of a variable-frame-rate source;
    ``preset`` (H.264 video only) is libx264's speed/size preset.
    """
    if kind == "png_sequence":
        return ImageSequenceWriter(path, width, height, channels)
    if kind == "image":
        return ImageWriter(path, width, height, channels)
    if kind == "video":
        return VideoWriter(
            path, width, height, frame_rate, channels,
            audio_path=audio_path, audio_offset=audio_offset, bit_rate=bit_rate, time_base=time_base,
            preset=preset,
        )
    raise ValueError(f"unknown writer kind {kind!r}; expected 'video', 'image' or 'png_sequence'")
