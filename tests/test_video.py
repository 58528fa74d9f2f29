"""Tests of vlmlab.processing.video: mp4 round trips, LLaVA-NeXT-Video's uniform frame sampling, and one-line
``VideoError``s naming the file for every bad input (RELIABILITY.md S10).

The sampling reference is LLaVA-NeXT-Video's ``np.linspace(0, total - 1, num_frames).astype(int)``; colours and
positions are checked against the frames as drawn, within the loss of yuv420p encoding.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmlab.errors import DataError, ImageError
from vlmlab.processing import video
from vlmlab.processing.video import VideoError, load_video, sample_indices, write_video

BEIGE, RED = (240, 232, 210), (220, 30, 30)
GREYS = [(25 * k, 25 * k, 25 * k) for k in range(10)]  # one distinct level per frame


def moving_square(n: int = 8, width: int = 64, height: int = 48) -> list[Image.Image]:
    """A 12 px red square moving 4 px right per frame on beige."""
    frames = []
    for t in range(n):
        array = np.full((height, width, 3), BEIGE, np.uint8)
        array[18:30, 4 * t + 2 : 4 * t + 14] = RED
        frames.append(Image.fromarray(array))
    return frames


def red_centre_x(frame: Image.Image) -> float:
    array = np.asarray(frame).astype(int)
    mask = (array[..., 0] > 150) & (array[..., 1] < 100)
    return float(np.nonzero(mask)[1].mean())


def assert_one_line_error(excinfo, path) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message
    assert "Traceback" not in message and "av." not in message
    assert isinstance(excinfo.value, ImageError) and isinstance(excinfo.value, DataError)


def test_round_trip_keeps_count_size_colours_and_positions(tmp_path):
    path = tmp_path / "clip.mp4"
    frames = moving_square()
    write_video(path, frames, fps=4)
    loaded = load_video(path, 8)
    assert len(loaded) == 8
    for t, frame in enumerate(loaded):
        assert frame.mode == "RGB" and frame.size == (64, 48)
        assert np.abs(np.subtract(frame.getpixel((4 * t + 8, 24)), RED)).max() <= 30
        assert np.abs(np.subtract(frame.getpixel((60, 4)), BEIGE)).max() <= 30
        assert abs(red_centre_x(frame) - (4 * t + 7.5)) <= 1


def test_arrays_are_accepted_and_writing_is_reproducible(tmp_path):
    array = np.stack([np.asarray(frame) for frame in moving_square()])
    write_video(tmp_path / "a.mp4", array)
    write_video(tmp_path / "b.mp4", array)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert len(load_video(tmp_path / "a.mp4", 8)) == 8


def test_mpeg4_fallback_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(video, "PREFERRED_CODECS", ("mpeg4",))
    assert video.video_codec() == "mpeg4"
    write_video(tmp_path / "clip.mp4", moving_square())
    loaded = load_video(tmp_path / "clip.mp4", 8)
    assert [round(red_centre_x(frame)) for frame in loaded] == [round(4 * t + 7.5) for t in range(8)]


def test_sample_indices_follow_llava_next_video():
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(100, 8) == np.linspace(0, 99, 8).astype(int).tolist()
    assert sample_indices(8, 8) == list(range(8))
    assert sample_indices(3, 8) == [0, 1, 2]  # fewer frames than asked: all of them


def test_load_samples_frames_uniformly_in_time_order(tmp_path):
    path = tmp_path / "greys.mp4"
    write_video(path, [Image.new("RGB", (32, 32), grey) for grey in GREYS])
    loaded = load_video(path, 4)
    levels = [np.asarray(frame).mean() for frame in loaded]
    assert [int(np.abs(np.subtract(GREYS, level).mean(axis=1)).argmin()) for level in levels] == [0, 3, 6, 9]
    assert len(load_video(path, 32)) == 10  # asking for more than there are gives all


def test_bad_files_give_one_line_errors_naming_the_file(tmp_path):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    good = tmp_path / "good.mp4"
    write_video(good, moving_square())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cases = {
        tmp_path / "missing.mp4": "not found",
        tmp_path: "directory",
        empty: "empty",
        noise: "cannot decode",
        truncated: "cannot decode",
    }
    for path, problem in cases.items():
        with pytest.raises(VideoError, match=problem) as excinfo:
            load_video(path, 4)
        assert_one_line_error(excinfo, path)


def test_limits_are_checked_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    write_video(path, moving_square())
    with pytest.raises(VideoError, match="9 frames requested, more than the limit of 8") as excinfo:
        load_video(path, 9, max_frames=8)
    assert_one_line_error(excinfo, path)
    with pytest.raises(VideoError, match="64 x 48 = 3072 pixels exceed the limit of 3000") as excinfo:
        load_video(path, 4, max_pixels=3000)
    assert_one_line_error(excinfo, path)
    with pytest.raises(VideoError, match="positive integer"):
        load_video(path, 0)
    monkeypatch.setattr(video, "MAX_FILE_FRAMES", 5)
    with pytest.raises(VideoError, match="8 frames, more than the limit of 5") as excinfo:
        load_video(path, 4)
    assert_one_line_error(excinfo, path)


def test_a_file_without_video_gives_a_one_line_error(tmp_path):
    import av

    path = tmp_path / "sound.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(VideoError, match="no video stream") as excinfo:
        load_video(path, 4)
    assert_one_line_error(excinfo, path)


def test_bad_frames_to_write_are_refused(tmp_path):
    path = tmp_path / "clip.mp4"
    with pytest.raises(VideoError, match="even"):
        write_video(path, [Image.new("RGB", (33, 32))])
    with pytest.raises(VideoError, match="differ in size"):
        write_video(path, [Image.new("RGB", (32, 32)), Image.new("RGB", (34, 32))])
    with pytest.raises(VideoError, match="no frames"):
        write_video(path, [])
    with pytest.raises(VideoError, match=r"\[T, H, W, 3\]"):
        write_video(path, np.zeros((4, 32, 32), np.uint8))
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-written left behind


def test_a_truncated_file_with_its_index_up_front_gives_a_one_line_error(tmp_path):
    """With the index (moov) first, the header still promises every frame after the cut: the decode fails or
    comes up short, and either way the caller gets one line, not a PyAV error."""
    from fractions import Fraction

    import av

    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for t, grey in enumerate(GREYS):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), grey, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 4)
            container.mux(stream.encode(frame.reformat(format="yuv420p")))
        container.mux(stream.encode(None))
    assert len(load_video(whole, 10)) == 10
    for fraction in (0.9, 0.6, 0.3):
        cut = tmp_path / f"cut-{fraction}.mp4"
        cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * fraction)])
        try:
            frames = load_video(cut, 4)
        except VideoError as err:
            assert "\n" not in str(err) and str(cut) in str(err)
        else:  # frame recovery: only whole frames, still spread over what is left
            assert 1 <= len(frames) <= 4
