"""Streaming video matting: ``convert_video`` turns a video, image folder or image into alpha,
foreground and composites with any matting model of the zoo.

The API follows RVM's ``inference.py`` (PeterL1n/RobustVideoMatting): ``fgr, pha, *rec =
model(src, *rec, downsample_ratio=r)`` on chunks of ``seq_chunk`` frames, ``downsample_ratio=None``
meaning ``min(512 / max(h, w), 1)`` taken once from the first frame, and the composite
``fgr * pha + bgr * (1 - pha)`` (green is RVM's ``(120, 255, 155)``). Only the recurrent state is
kept between chunks, so memory does not grow with the video's length; decoding, the model and
encoding run on three threads joined by bounded queues.
"""
from __future__ import annotations

import inspect
import math
import queue
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from binarize.matting.background import (
    CapturedBackground,
    check_background_frame,
    check_background_use,
    takes_background,
)
from binarize.matting.video import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    FrameSource,
    FrameWriter,
    PathLike,
    check_output_path,
    check_source,
    check_x264_preset,
    open_source,
    open_writer,
    parse_frame_rate,
    remove_empty_dirs,
    resize_cover,
    video_codec_for,
)

__all__ = ["convert_video", "ConversionResult", "parse_background", "Background", "auto_downsample_ratio",
           "check_conversion", "matte_clip", "parse_device", "parse_mbps"]

OUTPUT_TYPES = ("video", "png_sequence")
# named background colours; green is RVM's composition colour
COLORS: Dict[str, Tuple[int, int, int]] = {
    "green": (120, 255, 155),
    "blue": (0, 71, 187),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "red": (255, 0, 0),
}
_QUEUE_SIZE = 4
_POLL_S = 0.1
# how long join() waits for a thread whose start() a signal interrupted to show that it runs
_START_WAIT_S = 5.0


def auto_downsample_ratio(height: int, width: int) -> float:
    """RVM's automatic ratio: shrink so that the longer side is at most 512 pixels."""
    return min(512 / max(height, width), 1.0)


def matte_clip(model: torch.nn.Module, src: np.ndarray, *, device: Union[str, torch.device] = "cpu",
               downsample_ratio: float = 1.0, recurrent: bool = True) -> np.ndarray:
    """The alpha of a clip held in memory: ``src`` is T x H x W x 3 uint8 RGB, the result float
    T x H x W in [0, 1]. Frame by frame with the recurrent state carried over, as ``convert_video``
    with ``seq_chunk=1``; the model is put in ``eval()`` and run without gradients.

    ``recurrent=False`` mattes every frame from an empty state (each frame alone), which tells what
    the recurrent state adds: a state that steadies the matte, or one that drifts on clips longer
    than the model was trained on.
    """
    src = np.asarray(src)
    if src.dtype != np.uint8 or src.ndim != 4 or src.shape[-1] != 3 or 0 in src.shape:
        raise ValueError(f"matte_clip: frames must be a non-empty T x H x W x 3 uint8 RGB array, got "
                         f"{src.dtype} of shape {tuple(src.shape)}")
    rec: List[Any] = [None] * 4
    out = []
    model.eval()
    with torch.no_grad():
        for frame in src:
            x = torch.from_numpy(frame).to(device).permute(2, 0, 1)[None].float() / 255
            _, pha, *state = model(x, *rec, downsample_ratio=downsample_ratio)
            if recurrent:
                rec = state
            out.append(pha[0, 0].float().cpu().numpy())
    return np.stack(out)


@dataclass(frozen=True)
class ConversionResult:
    """What ``convert_video`` did: frame count, measured speed, frame geometry and the written paths."""

    frames: int
    seconds: float
    fps: float
    width: int
    height: int
    frame_rate: Fraction
    downsample_ratio: float
    outputs: Dict[str, Path] = field(default_factory=dict)
    problems: Tuple[str, ...] = ()  # damage met in the input (also issued as a warning)


# --------------------------------------------------------------------------------------------- backgrounds
@dataclass(frozen=True)
class Background:
    """A parsed background: ``kind`` is ``"transparent"``, ``"color"``, ``"image"`` or ``"video"``."""

    kind: str
    color: Tuple[int, int, int] = (0, 0, 0)
    path: Optional[Path] = None


def parse_background(spec: Optional[str], output_type: str = "video") -> Background:
    """Parse ``green`` (or another name in ``COLORS``), ``#RRGGBB``, ``transparent``, or an image/video path.

    ``None`` means transparent for PNG sequences (RGBA, as in RVM) and green otherwise.
    """
    if spec is None:
        return Background("transparent") if output_type == "png_sequence" else Background("color", COLORS["green"])
    text = str(spec).strip()
    if text.lower() in ("transparent", "none", "alpha"):
        return Background("transparent")
    if text.lower() in COLORS:
        return Background("color", COLORS[text.lower()])
    if text.startswith("#"):
        if len(text) == 7 and all(c in "0123456789abcdefABCDEF" for c in text[1:]):
            return Background("color", (int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)))
        raise ValueError(f"bad background colour {text!r}: expected #RRGGBB with six hex digits")
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"background {text!r} is a folder; expected a colour, an image or a video file")
    if path.is_file():
        return Background("image" if path.suffix.lower() in IMAGE_EXTENSIONS else "video", path=path)
    if path.suffix or "/" in text or "\\" in text:
        raise FileNotFoundError(f"background file not found: {text!r}")
    raise ValueError(
        f"bad background {text!r}: expected one of {', '.join(COLORS)}, #RRGGBB, transparent, "
        "or an image or video file"
    )


def _looping_frames(path: Path, width: int, height: int) -> Iterator[np.ndarray]:
    """Frames of a background video resized to cover ``width x height``, restarting at its end."""
    while True:
        with open_source(path) as source:
            count = 0
            for frame in source:
                count += 1
                yield resize_cover(frame, width, height)
        if count == 0:
            raise ValueError(f"background video {str(path)!r} has no frames")


# --------------------------------------------------------------------------------------------- outputs
@dataclass
class _Output:
    name: str  # "composition" | "alpha" | "foreground"
    path: Path
    kind: str  # "video" | "image" | "png_sequence"
    channels: int
    writer: Optional[FrameWriter] = None


def _plan_outputs(
    paths: Dict[str, Optional[PathLike]], output_type: str, background: Background, single_image: bool,
    input_path: Path,
) -> List[_Output]:
    """Validate every requested output before any work starts and decide its writer and channels."""
    outputs = []
    for name, raw in paths.items():
        if raw is None:
            continue
        path = Path(raw)
        if path.resolve() == input_path.resolve():
            raise ValueError(f"output {str(path)!r} is the input; choose another name")
        channels = {"alpha": 1, "foreground": 3}.get(name, 4 if background.kind == "transparent" else 3)
        ext = path.suffix.lower()
        if output_type == "png_sequence":
            if ext in VIDEO_EXTENSIONS:
                raise ValueError(f"output_type='png_sequence' writes a folder, but {str(path)!r} looks like a video")
            kind = "png_sequence"
        elif ext in IMAGE_EXTENSIONS:
            if not single_image:
                raise ValueError(
                    f"{str(path)!r} is an image file but the input is a video; use a video extension "
                    "or output_type='png_sequence'"
                )
            kind = "image"
            if channels == 4 and ext != ".png":
                raise ValueError(f"{str(path)!r}: only .png images can hold transparency")
        else:
            video_codec_for(path, channels)  # raises on unsupported extensions or alpha in .mp4
            kind = "video"
        check_output_path(path, folder=kind == "png_sequence")
        outputs.append(_Output(name, path, kind, channels))
    if not outputs:
        raise ValueError("no output requested: give output_composition, output_alpha or output_foreground")
    if len({o.path.resolve() for o in outputs}) != len(outputs):
        raise ValueError("two outputs have the same path")
    return outputs


# --------------------------------------------------------------------------------------------- threads
class _Pipeline:
    """Bounded queues between threads plus a shared stop flag and the first exception raised."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None
        self.threads: List[threading.Thread] = []

    def spawn(self, target: Callable[[], None], name: str) -> None:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                if self.error is None:
                    self.error = exc
                self.stop.set()

        thread = threading.Thread(target=body, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def put(self, q: queue.Queue, item: Any) -> bool:
        """Put unless stopped; returns False when the pipeline was stopped."""
        while not self.stop.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self, q: queue.Queue) -> Any:
        """Get the next item; raises the worker's exception (or stops) if the pipeline failed."""
        while True:
            self.raise_error()
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if self.stop.is_set():
                    self.raise_error()
                    return _END

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def join(self) -> None:
        """Wait for every thread, including one whose ``start()`` a signal (Ctrl-C, SIGTERM)
        interrupted: ``Thread.join`` refuses a thread it has not seen start, but the thread may be
        running (the signal landed after it was launched), so wait until it shows it runs and join
        it, or, after ``_START_WAIT_S``, take it as never launched."""
        for thread in self.threads:
            deadline = time.monotonic() + _START_WAIT_S
            while True:
                try:
                    thread.join()
                    break
                except RuntimeError:  # "cannot join thread before it is started"
                    if time.monotonic() > deadline:
                        break
                    time.sleep(_POLL_S / 10)


_END = object()


def _read_chunks(source: FrameSource, seq_chunk: int) -> Iterator[Tuple[np.ndarray, List[Optional[Fraction]]]]:
    batch: List[np.ndarray] = []
    times: List[Optional[Fraction]] = []
    for frame, time_ in source.timed_frames():
        batch.append(frame)
        times.append(time_)
        if len(batch) == seq_chunk:
            yield np.stack(batch), times
            batch, times = [], []
    if batch:
        yield np.stack(batch), times


@contextmanager
def _naming_output(path: Path) -> Iterator[None]:
    """An ``OSError`` while writing (permission, full disk) names the requested output, not the
    hidden temporary file it happened in."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or exc.filename is None:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc


def _commit_all(writers: Sequence[FrameWriter]) -> None:
    """Finish every output, then move all of them into place; if one move fails, the ones already
    moved are moved back (and the files they replaced restored), so a run commits all or nothing."""
    for writer in writers:
        writer.close()
    done: List[FrameWriter] = []
    try:
        for writer in writers:
            writer.commit(keep_backup=True)
            done.append(writer)
    except BaseException:
        for writer in reversed(done):
            writer.rollback()
        raise
    for writer in done:
        writer.finalize()


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[T, C, H, W]`` float in [0, 1] -> ``[T, H, W, C]`` uint8 (rounded)."""
    return x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _model_device_dtype(model: torch.nn.Module) -> Tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _check_matting_model(model: torch.nn.Module) -> None:
    """Refuse models whose ``forward`` cannot take ``downsample_ratio`` (e.g. a classifier) with a clear error."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return  # e.g. a scripted model without a Python signature: trust it
    kinds = {p.kind for p in parameters}
    if "downsample_ratio" not in {p.name for p in parameters} and inspect.Parameter.VAR_KEYWORD not in kinds:
        name = getattr(model, "model_name", type(model).__name__)
        raise ValueError(
            f"model {name!r} is not a matting model: its forward takes no downsample_ratio "
            "(expected fgr, pha, *rec = model(src, *rec, downsample_ratio=r))"
        )


def _check_model_output(fgr: Any, pha: Any, src: torch.Tensor) -> None:
    b, t, _, h, w = src.shape
    if not (isinstance(pha, torch.Tensor) and tuple(pha.shape) == (b, t, 1, h, w)):
        raise ValueError(f"model returned alpha of shape {getattr(pha, 'shape', type(pha))}, expected {(b, t, 1, h, w)}")
    if not (isinstance(fgr, torch.Tensor) and tuple(fgr.shape) == (b, t, 3, h, w)):
        raise ValueError(f"model returned foreground of shape {getattr(fgr, 'shape', type(fgr))}, expected {(b, t, 3, h, w)}")


# --------------------------------------------------------------------------------------------- main API
def convert_video(
    model: torch.nn.Module,
    input_source: PathLike,
    *,
    output_composition: Optional[PathLike] = None,
    output_alpha: Optional[PathLike] = None,
    output_foreground: Optional[PathLike] = None,
    output_type: str = "video",
    background: Optional[str] = None,
    downsample_ratio: Optional[float] = None,
    seq_chunk: int = 1,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    frame_rate: Optional[Union[str, float, Fraction]] = None,
    output_video_mbps: Optional[float] = None,
    background_frame: Optional[PathLike] = None,
    output_video_preset: Optional[str] = None,
) -> ConversionResult:
    """Matte ``input_source`` (video file, image folder or single image) and write the requested outputs.

    Args:
        model: a matting model following ``fgr, pha, *rec = model(src, *rec, downsample_ratio=r)``.
        input_source: a video file, a folder of png/jpg images (natural order) or one image.
        output_composition / output_alpha / output_foreground: output paths (files for ``"video"``,
            folders for ``"png_sequence"``; an image path such as ``out.png`` for a single-image input).
        output_type: ``"video"`` (h264 by default; RGBA composites as ProRes 4444 ``.mov`` or VP9
            ``.webm``) or ``"png_sequence"`` (``0000.png ...``).
        background: ``"green"`` or another colour name, ``"#RRGGBB"``, ``"transparent"`` (RGBA:
            foreground where alpha > 0, plus alpha), an image or a video path (looped, resized to
            cover the frame). ``None``: transparent for PNG sequences, green for videos.
        downsample_ratio: the model's internal scale; ``None`` picks ``min(512 / max(h, w), 1)``.
        seq_chunk: frames given to the model per call (more = better parallelism, more memory).
        device / dtype: where and in what precision to run; default: the model's own. A given
            ``device`` moves the model there.
        progress: show a tqdm bar (frames, frames/s).
        frame_rate: frame rate of image inputs (default 30): a ``Fraction``, ``"30000/1001"`` or a
            number (29.97 is taken as 30000/1001; see ``parse_frame_rate``); videos keep their own rate.
        output_video_mbps: target bit rate of video outputs (0.01 to 10000); default constant quality.
        output_video_preset: libx264's speed/size trade-off for H.264 outputs (``ultrafast`` ...
            ``veryslow``); default ``veryfast`` (``DEFAULT_X264_PRESET``): on a CPU the encoder
            shares the cores with the model, and ``medium`` costs about as much as a binary model's
            frame (docs/performance.md). Other codecs ignore it.
        background_frame: for a background-matting model (BGMv2, ``model.takes_background``) the
            captured background: an image of the input's size, or a video read frame by frame
            (see :mod:`binarize.matting.background`); ``downsample_ratio`` is then the model's
            ``backbone_scale`` (default: its own). Refused for other models.

    Returns:
        A :class:`ConversionResult`. On any error or interrupt no output exists under the requested
        names (all outputs are committed together, only after every one was finished). Damage met
        in the input (undecodable packets, fewer frames than declared, a size change) is issued as a
        ``UserWarning`` naming the counts and listed in ``result.problems``.
    """
    check_background_use(model, background_frame, downsample_ratio)
    options = check_conversion(
        input_source, output_composition=output_composition, output_alpha=output_alpha,
        output_foreground=output_foreground, output_type=output_type, background=background,
        downsample_ratio=downsample_ratio, seq_chunk=seq_chunk, device=device, frame_rate=frame_rate,
        output_video_mbps=output_video_mbps, background_frame=background_frame,
        output_video_preset=output_video_preset,
    )
    source = open_source(input_source, options.frame_rate)
    try:
        return _run(
            model, source, options.outputs, options.background, downsample_ratio, int(seq_chunk),
            options.device, dtype, progress, options.bit_rate, background_frame, options.preset,
        )
    finally:
        source.close()


@dataclass(frozen=True)
class _Options:
    background: Background
    outputs: List[_Output]
    frame_rate: Optional[Fraction]
    bit_rate: Optional[int]
    device: Optional[torch.device]
    preset: Optional[str] = None


def check_conversion(
    input_source: PathLike,
    *,
    output_composition: Optional[PathLike] = None,
    output_alpha: Optional[PathLike] = None,
    output_foreground: Optional[PathLike] = None,
    output_type: str = "video",
    background: Optional[str] = None,
    downsample_ratio: Optional[float] = None,
    seq_chunk: int = 1,
    device: Optional[Union[str, torch.device]] = None,
    frame_rate: Optional[Union[str, float, Fraction]] = None,
    output_video_mbps: Optional[float] = None,
    background_frame: Optional[PathLike] = None,
    output_video_preset: Optional[str] = None,
) -> _Options:
    """Every check of :func:`convert_video` that needs no model and no decoding: arguments, the
    device, the input (exists, opens), the background and every output path. Raises
    ``ValueError`` / ``FileNotFoundError`` with a one-line message; writes nothing.
    ``binarize matte`` calls it before loading the model."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")
    if isinstance(seq_chunk, bool) or not isinstance(seq_chunk, (int, float)) or int(seq_chunk) != seq_chunk \
            or seq_chunk < 1:
        raise ValueError(f"seq_chunk must be a positive integer, got {seq_chunk!r}")
    if downsample_ratio is not None and not 0 < downsample_ratio <= 1:
        raise ValueError(f"downsample_ratio must be in (0, 1], got {downsample_ratio!r}")
    rate = parse_frame_rate(frame_rate) if frame_rate is not None else None
    bit_rate = parse_mbps(output_video_mbps)
    preset = check_x264_preset(output_video_preset) if output_video_preset is not None else None
    parsed_device = parse_device(device) if device is not None else None
    bg = parse_background(background, output_type)
    paths = {"composition": output_composition, "alpha": output_alpha, "foreground": output_foreground}
    if not any(p is not None for p in paths.values()):
        raise ValueError("no output requested: give output_composition, output_alpha or output_foreground")
    if output_composition is None and background is not None:
        bg = Background("transparent")  # unused: avoid opening a background file for nothing
    check_source(input_source)
    if bg.path is not None:
        check_source(bg.path)  # an unreadable background fails now, before any output exists
    if background_frame is not None:
        check_background_frame(background_frame, input_source)  # size and length match the input
    single_image = Path(input_source).is_file() and Path(input_source).suffix.lower() in IMAGE_EXTENSIONS
    outputs = _plan_outputs(paths, output_type, bg, single_image, Path(input_source))
    return _Options(bg, outputs, rate, bit_rate, parsed_device, preset)


def parse_mbps(mbps: Optional[float]) -> Optional[int]:
    """A video bit rate in Mbit/s as bits/s; ``None`` keeps constant quality. 0.01 to 10000 Mbit/s."""
    if mbps is None:
        return None
    try:
        value = float(mbps)
    except (TypeError, ValueError):
        raise ValueError(f"bad bit rate {mbps!r}: expected a number of Mbit/s such as 8") from None
    if not (math.isfinite(value) and 0.01 <= value <= 10_000):
        raise ValueError(f"bit rate {mbps!r} Mbit/s is out of range: use 0.01 to 10000")
    return int(round(value * 1e6))


def parse_device(device: Union[str, torch.device]) -> torch.device:
    """A usable torch device, or a one-line ``ValueError`` (bad name, absent GPU, ``meta``)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"bad device {str(device)!r}: {message}") from None
    if parsed.type == "meta":
        raise ValueError("device 'meta' holds no data and cannot run a model on frames; use cpu or cuda")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r} is not available: no CUDA GPU is visible to PyTorch")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {str(device)!r} is not available: only {count} CUDA GPU(s) are visible")
    elif parsed.type != "cpu":
        try:
            torch.empty(1, device=parsed)
        except Exception as exc:  # noqa: BLE001 - backends raise assorted errors for absent devices
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"device {str(device)!r} is not available: {message}") from None
    return parsed


def _run(
    model: torch.nn.Module, source: FrameSource, outputs: List[_Output], bg: Background,
    downsample_ratio: Optional[float], seq_chunk: int, device: Any, dtype: Optional[torch.dtype],
    progress: bool, bit_rate: Optional[int], background_frame: Optional[PathLike] = None,
    preset: Optional[str] = None,
) -> ConversionResult:
    if not takes_background(model):
        _check_matting_model(model)
    if device is not None:
        model.to(device)
    model_device, model_dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    captured = None
    if background_frame is not None:  # background matting: downsample_ratio is the backbone scale
        captured = CapturedBackground(background_frame, downsample_ratio, device, dtype or model_dtype)
        downsample_ratio = downsample_ratio or getattr(model, "backbone_scale", 1.0)
    if downsample_ratio is None:
        downsample_ratio = auto_downsample_ratio(source.height, source.width)
    job = _MattingJob(model, source, outputs, bg, float(downsample_ratio), seq_chunk, device, dtype or model_dtype)
    job.captured = captured
    was_training = model.training
    try:
        return job.run(progress, bit_rate, preset)
    finally:
        model.train(was_training)
        if captured is not None:
            captured.close()


class _MattingJob:
    """One conversion: a reader thread, the model on the calling thread, a writer thread."""

    captured: Optional[CapturedBackground] = None  # the captured background of a background-matting model

    def __init__(
        self, model: torch.nn.Module, source: FrameSource, outputs: List[_Output], bg: Background,
        downsample_ratio: float, seq_chunk: int, device: torch.device, dtype: torch.dtype,
    ) -> None:
        self.model, self.source, self.outputs = model, source, outputs
        self.downsample_ratio, self.seq_chunk = downsample_ratio, seq_chunk
        self.device, self.dtype = device, dtype
        self.static_bgr = _static_background(bg, source.width, source.height, device, dtype)
        self.bg_frames = _looping_frames(bg.path, source.width, source.height) if bg.kind == "video" else None
        self.pipeline = _Pipeline()
        self.read_q: queue.Queue = queue.Queue(maxsize=_QUEUE_SIZE)
        self.write_q: queue.Queue = queue.Queue(maxsize=_QUEUE_SIZE)

    def run(self, progress: bool, bit_rate: Optional[int], preset: Optional[str] = None) -> ConversionResult:
        """Stream every frame through the model; commit all outputs on success, delete them otherwise."""
        committed = False
        created: List[Path] = []
        bar = tqdm(total=self.source.num_frames, unit="frame", desc="matting", disable=not progress,
                   dynamic_ncols=True)
        try:
            self._open_writers(bit_rate, preset)
            self.pipeline.spawn(self._read, "binarize-matte-reader")
            self.pipeline.spawn(self._write, "binarize-matte-writer")
            start = time.perf_counter()
            frames = self._infer(bar)
            self.pipeline.put(self.write_q, _END)
            self.pipeline.join()
            self.pipeline.raise_error()
            seconds = time.perf_counter() - start
            if frames == 0:
                raise ValueError(f"input {str(self.source.path)!r} has no frames")
            _commit_all([out.writer for out in self.outputs])
            committed = True
            problems = self._problems(frames)
            for problem in problems:
                warnings.warn(problem, UserWarning, stacklevel=4)
            return ConversionResult(
                frames=frames, seconds=seconds, fps=frames / max(seconds, 1e-9), width=self.source.width,
                height=self.source.height, frame_rate=self.source.frame_rate,
                downsample_ratio=self.downsample_ratio, outputs={out.name: out.path for out in self.outputs},
                problems=tuple(problems),
            )
        finally:
            self.pipeline.stop.set()
            self.pipeline.join()
            bar.close()
            if not committed:
                for out in self.outputs:
                    if out.writer is not None:
                        created.extend(out.writer.created_dirs)
                        out.writer.abort()
                remove_empty_dirs(sorted(set(created), key=lambda p: len(p.parts), reverse=True))

    def _problems(self, frames: int) -> List[str]:
        """One line per kind of damage met in the input, naming the counts."""
        notes = list(self.source.problems)
        for out in self.outputs:
            notes.extend(note for note in getattr(out.writer, "problems", []) if note not in notes)
        declared = self.source.num_frames
        if declared and frames < declared:
            notes.insert(0, f"decoded {frames} of the {declared} frames the file declares (is it truncated?)")
        if not notes:
            return []
        return [f"input {str(self.source.path)!r}: " + "; ".join(notes)]

    def _open_writers(self, bit_rate: Optional[int], preset: Optional[str] = None) -> None:
        source = self.source
        for out in self.outputs:
            out.writer = open_writer(
                out.path, out.kind, source.width, source.height, out.channels, source.frame_rate,
                audio_path=source.audio_path, audio_offset=source.start_time, bit_rate=bit_rate, preset=preset,
                time_base=source.time_base,
            )

    def _read(self) -> None:
        """Reader thread: decode chunks of ``seq_chunk`` frames (and background frames) into the read queue."""
        for chunk, times in _read_chunks(self.source, self.seq_chunk):
            bgr = np.stack([next(self.bg_frames) for _ in chunk]) if self.bg_frames is not None else None
            if not self.pipeline.put(self.read_q, (chunk, bgr, times)):
                return
        self.pipeline.put(self.read_q, _END)

    def _infer(self, bar: tqdm) -> int:
        """Main thread: run the model chunk by chunk, carrying only the recurrent state; returns frames done."""
        self.model.eval()
        rec: List[Any] = [None] * 4
        frames = 0
        with torch.no_grad():
            while (item := self.pipeline.get(self.read_q)) is not _END:
                chunk, bgr_chunk, times = item
                src = _frames_to_tensor(chunk, self.device, self.dtype).unsqueeze(0)
                if self.captured is not None:  # background matting (BGMv2): model(src, bgr) per frame
                    fgr, pha = self.captured.matte(self.model, src)
                else:
                    fgr, pha, *rec = self.model(src, *rec, downsample_ratio=self.downsample_ratio)
                _check_model_output(fgr, pha, src)
                bgr = self.static_bgr if bgr_chunk is None else _frames_to_tensor(bgr_chunk, self.device, self.dtype)
                if not self.pipeline.put(self.write_q, (fgr[0], pha[0], bgr, times)):
                    break
                frames += src.shape[1]
                bar.update(src.shape[1])
        return frames

    def _write(self) -> None:
        """Writer thread: render and encode the model's outputs; finish the files unless cancelled."""
        while (item := self.pipeline.get(self.write_q)) is not _END:
            *tensors, times = item
            with torch.inference_mode():  # composite + uint8 here, overlapping the next model call
                frames = _render(self.outputs, *tensors)
            timed = any(t is not None for t in times)  # only variable-rate sources carry times
            for out in self.outputs:
                with _naming_output(out.path):
                    if timed:
                        out.writer.write(frames[out.name], times)
                    else:
                        out.writer.write(frames[out.name])
        if self.pipeline.stop.is_set():
            return  # cancelled: the main thread aborts the writers
        for out in self.outputs:
            with _naming_output(out.path):
                out.writer.close()


def _static_background(
    bg: Background, width: int, height: int, device: torch.device, dtype: torch.dtype
) -> Optional[torch.Tensor]:
    """The background as a ``[1, 3, H or 1, W or 1]`` tensor for colours and images; ``None`` otherwise."""
    if bg.kind == "color":
        return torch.tensor(bg.color, device=device, dtype=dtype).div(255).view(1, 3, 1, 1)
    if bg.kind == "image":
        with open_source(bg.path) as image:
            frame = next(iter(image))
        return _frames_to_tensor(resize_cover(frame, width, height)[None], device, dtype)
    return None


def _frames_to_tensor(frames: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> contiguous ``[T, 3, H, W]`` in [0, 1].

    Contiguous on purpose: a channels-last view makes convolutions take other kernels, and the
    last-bit differences flip signs in a binary network, so chunked and per-frame runs would differ.
    """
    frames = np.require(frames, requirements=["C", "W"])  # torch.from_numpy needs a writable array
    return torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).contiguous().to(dtype).div(255)


def _render(
    outputs: List[_Output], fgr: torch.Tensor, pha: torch.Tensor, bgr: Optional[torch.Tensor]
) -> Dict[str, np.ndarray]:
    """uint8 frames ``[T, H, W, C]`` for each output from ``fgr [T,3,H,W]``, ``pha [T,1,H,W]``."""
    results = {}
    for out in outputs:
        if out.name == "alpha":
            results[out.name] = _to_uint8(pha)
        elif out.name == "foreground":
            results[out.name] = _to_uint8(fgr)
        elif out.channels == 4:
            # transparent composite as in RVM: foreground where alpha > 0, alpha as the 4th channel
            results[out.name] = _to_uint8(torch.cat([fgr * pha.gt(0), pha], dim=1))
        else:
            results[out.name] = _to_uint8(fgr * pha + bgr * (1 - pha))
    return results
