"""Video files <-> lists of RGB PIL frames, with PyAV: uniform frame sampling for training and serving, and an mp4
writer for the synthetic world's clips.

Sampling follows LLaVA-NeXT-Video (``read_video_pyav`` in its inference script): ``num_frames`` indices
``np.linspace(0, total - 1, num_frames).astype(int)`` over the decoded frames, so the first and the last frame are
always included; a video with fewer frames than requested gives all of them.

Every failure is a ``VideoError`` (an ``ImageError``, hence a ``DataError``) with one line naming the file and the
problem; no PyAV/FFmpeg message or traceback reaches the caller. The guards follow RELIABILITY.md S10: the requested
frame count, the frame size and the number of frames in the file are checked from the container header before any
frame is decoded, and decoding stops after the last frame that is kept.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from vlmlab.errors import ImageError

DEFAULT_MAX_FRAMES = 64  # frames one sample may ask for (LLaVA-NeXT-Video uses 8-32)
DEFAULT_MAX_PIXELS = 3840 * 2160  # per frame: one 4K UHD frame
MAX_FILE_FRAMES = 36_000  # frames a file may hold (vLLM's decode cap): 20 minutes at 30 fps
DEFAULT_FPS = 4
# H.264 when PyAV's FFmpeg has an encoder for it, else MPEG-4 part 2 (always built in).
PREFERRED_CODECS = ("libx264", "mpeg4")
X264_OPTIONS = {
    "crf": "10",  # near-transparent for flat synthetic colours (0 would be lossless in YUV, and 3x larger)
    "preset": "medium",
    "threads": "1",  # x264's output depends on its thread count: one thread gives the same bytes on every machine
}
MPEG4_BIT_RATE = 8_000_000  # bits/s: far above what small synthetic frames need, so they decode near-exactly


class VideoError(ImageError):
    """A video is missing, unreadable, corrupt, empty, or over a frame/pixel limit (names the file)."""


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames spread uniformly over ``total`` (LLaVA-NeXT-Video); all when fewer."""
    if total <= num_frames:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames).astype(int).tolist()


def load_video(
    path: str | os.PathLike,
    num_frames: int,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Image.Image]:
    """Decode ``num_frames`` uniformly sampled frames of the video at ``path`` as RGB images, in time order.

    Raises ``VideoError`` for a missing, unreadable, corrupt or empty file, for ``num_frames > max_frames``, for
    frames over ``max_pixels`` pixels and for a file with more than ``MAX_FILE_FRAMES`` frames.
    """
    label = str(path)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise VideoError(f"{label}: num_frames must be a positive integer, got {num_frames!r}")
    if num_frames > max_frames:
        raise VideoError(f"{label}: {num_frames} frames requested, more than the limit of {max_frames}")
    if not os.path.exists(path):
        raise VideoError(f"{label}: video not found")
    if os.path.isdir(path):
        raise VideoError(f"{label}: is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{label}: empty video file")

    try:
        total = _count_frames(path, label, max_pixels)
        frames = _decode(path, sample_indices(total, num_frames), label, max_pixels)
        if len(frames) < min(total, num_frames):
            # The header promised more frames than the data holds (a truncated file): count what is really
            # there and sample again, so the frames still span the whole (decodable) video.
            total = _count_decodable(path)
            frames = _decode(path, sample_indices(total, num_frames), label, max_pixels)
    except VideoError:
        raise
    except PermissionError:
        raise VideoError(f"{label}: cannot read video (permission denied)") from None
    except Exception:  # FFmpeg/PyAV errors of every kind: the data is not a video we can decode
        raise VideoError(f"{label}: cannot decode video (corrupt, truncated or unsupported data)") from None
    if not frames:
        raise VideoError(f"{label}: video has no decodable frames")
    return frames


def write_video(
    path: str | os.PathLike, frames: list[Image.Image] | np.ndarray, *, fps: int = DEFAULT_FPS
) -> None:
    """Write ``frames`` (PIL images, or a ``[T, H, W, 3]`` uint8 array) as an mp4, atomically.

    H.264 (``libx264``, CRF 10, single-threaded so the bytes are reproducible) when available, else MPEG-4 part 2
    at a high bit rate; pixels are stored as yuv420p, the format every player decodes, which halves the colour
    resolution and therefore needs an even width and height. Raises ``VideoError`` for no frames, mixed or odd
    sizes.
    """
    arrays = _frame_arrays(path, frames)
    height, width = arrays[0].shape[:2]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temp file in the same folder and os.replace: readers never see a half-written video. (Named here rather
    # than by mkstemp, whose 0600 mode would stick to the video.)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = _add_stream(container, width, height, fps)
            for t, array in enumerate(arrays):
                frame = _yuv420p_frame(array)
                frame.pts, frame.time_base = t, Fraction(1, fps)
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))  # flush the encoder's delayed frames
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def video_codec() -> str:
    """The encoder ``write_video`` uses: the first of ``PREFERRED_CODECS`` that PyAV's FFmpeg provides."""
    return next(name for name in PREFERRED_CODECS if name in av.codecs_available)


def _yuv420p_frame(array: np.ndarray) -> av.VideoFrame:
    """An RGB array as a new yuv420p frame, converted here rather than by the encoder: left to PyAV's encoder, the
    same frames gave different bytes within one process (measured with PyAV 18), and a world must be reproducible.
    """
    converted = av.VideoFrame.from_ndarray(array, format="rgb24").reformat(format="yuv420p")
    return av.VideoFrame.from_ndarray(converted.to_ndarray(), format="yuv420p")


def _add_stream(container, width: int, height: int, fps: int):
    codec = video_codec()
    options = X264_OPTIONS if codec == "libx264" else {}
    stream = container.add_stream(codec, rate=fps, options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if codec != "libx264":
        stream.bit_rate = MPEG4_BIT_RATE
        stream.codec_context.thread_count = 1
    return stream


def _frame_arrays(path, frames) -> list[np.ndarray]:
    """Validate ``frames`` and return them as ``[H, W, 3]`` uint8 arrays of one even size."""
    label = str(path)
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise VideoError(f"{label}: frames must be a [T, H, W, 3] array, got shape {list(frames.shape)}")
        arrays = [np.ascontiguousarray(frame, dtype=np.uint8) for frame in frames]
    else:
        arrays = [np.asarray(frame.convert("RGB")) for frame in frames]
    if not arrays:
        raise VideoError(f"{label}: no frames to write")
    height, width = arrays[0].shape[:2]
    if any(array.shape[:2] != (height, width) for array in arrays):
        raise VideoError(f"{label}: frames differ in size; every frame must be {width} x {height}")
    if width % 2 or height % 2:
        raise VideoError(f"{label}: frame size {width} x {height} must be even in both sides (yuv420p)")
    return arrays


def _count_frames(path, label: str, max_pixels: int) -> int:
    """The number of frames from the header (or by counting packets, without decoding), after the size checks."""
    with av.open(os.fspath(path)) as container:
        stream = _video_stream(container, label)
        _check_pixels(label, stream.codec_context.width, stream.codec_context.height, max_pixels)
        total = stream.frames
        if total <= 0:  # formats without a frame count in the header: count packets (no decoding)
            packets = (packet for packet in container.demux(stream) if packet.size)
            total = sum(1 for _ in itertools.islice(packets, MAX_FILE_FRAMES + 1))
    if total == 0:
        raise VideoError(f"{label}: video has no frames")
    if total > MAX_FILE_FRAMES:
        raise VideoError(f"{label}: video has {total} frames, more than the limit of {MAX_FILE_FRAMES}")
    return total


def _count_decodable(path) -> int:
    with av.open(os.fspath(path)) as container:
        frames = container.decode(container.streams.video[0])
        return sum(1 for _ in itertools.islice(frames, MAX_FILE_FRAMES))


def _decode(path, indices: list[int], label: str, max_pixels: int) -> list[Image.Image]:
    """Decode frames in order, keeping those at ``indices`` and stopping after the last one."""
    wanted, frames = set(indices), []
    if not wanted:
        return frames
    last = max(wanted)
    with av.open(os.fspath(path)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            # A stream may change size midway; the header check saw only the first size.
            _check_pixels(label, frame.width, frame.height, max_pixels)
            if i in wanted:
                frames.append(frame.to_image())  # RGB, whatever the stored pixel format
            if i >= last:
                break
    return frames


def _video_stream(container, label: str):
    if not container.streams.video:
        raise VideoError(f"{label}: no video stream in the file")
    return container.streams.video[0]


def _check_pixels(label: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise VideoError(
            f"{label}: frames of {width} x {height} = {width * height} pixels exceed the limit of {max_pixels}"
        )
