"""Tests of vlmlab.processing.image against RELIABILITY.md rows S4-S7 and D1-D4.

References: Pillow's own transposes for EXIF orientations (the EXIF spec's mapping), exact pixel values for alpha
compositing, and an 8-bit ``>> 8`` reference for 16-bit images.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlmlab.errors import DataError, ImageError
from vlmlab.processing.image import ALLOWED_FORMATS, load_image, to_rgb


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(size=(64, 48), mode="RGB", seed=0) -> Image.Image:
    """Random pixels, so compressed data is long and truncation hits pixel data, not only the trailer."""
    channels = len(Image.new(mode, (1, 1)).getbands())
    data = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(data.squeeze(-1) if channels == 1 else data, mode=mode)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` 1-bit pixels: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def error_of(source, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message and "0x" not in message
    return message


def test_valid_png_and_jpeg_decode_to_rgb(tmp_path):
    image = noise()
    path = tmp_path / "a.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (64, 48)
    assert np.array_equal(np.asarray(loaded), np.asarray(image))
    jpeg = load_image(encode(image, "JPEG", quality=95))
    assert jpeg.mode == "RGB" and jpeg.size == (64, 48)


def test_errors_are_image_errors_which_are_data_errors():
    assert issubclass(ImageError, DataError)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.png"
    message = error_of(path)
    assert str(path) in message and "image not found" in message


def test_empty_file_and_empty_bytes(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert "empty" in error_of(path)
    assert error_of(b"").startswith("image bytes: empty")


def test_name_replaces_the_source_in_messages():
    assert error_of(b"garbage", name="request.images[2]").startswith("request.images[2]: ")


def test_random_bytes_are_not_a_supported_format():
    message = error_of(np.random.default_rng(1).bytes(300))
    assert message.startswith("image bytes: not a supported image format (allowed: JPEG, PNG")


def test_damaged_header_of_an_allowed_format_is_corrupt_not_unsupported():
    message = error_of(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert "truncated or corrupt image data" in message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_rejected(fmt, tmp_path):
    data = encode(noise((128, 96)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt image data" in error_of(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # global state untouched


@pytest.mark.parametrize(
    "plugin, magic",
    [
        ("EPS", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
        ("TIFF", b"II*\x00\x08\x00\x00\x00" + b"\x00" * 32),
        ("JPEG2000", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 32),
        ("ICO", b"\x00\x00\x01\x00\x01\x00\x10\x10" + b"\x00" * 32),
        ("FITS", b"SIMPLE  =                    T" + b" " * 50),
    ],
)
def test_disallowed_formats_never_reach_their_plugin(plugin, magic, tmp_path, monkeypatch):
    Image.init()
    calls = []

    def spy(*args):
        calls.append(args)
        raise AssertionError("disallowed plugin invoked")

    monkeypatch.setitem(Image.OPEN, plugin, (spy, spy))
    path = tmp_path / "photo.png"  # the name claims PNG; detection is by content
    path.write_bytes(magic)
    assert "not a supported image format" in error_of(path)
    assert calls == []


def test_real_tiff_and_pdf_named_png_are_rejected(tmp_path):
    tiff = tmp_path / "x.png"
    noise().save(tiff, "TIFF")
    assert "not a supported image format" in error_of(tiff)
    assert "not a supported image format" in error_of(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")


def test_allowed_formats_are_the_documented_ones():
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    for fmt in ("GIF", "BMP", "WEBP"):
        assert load_image(encode(noise((20, 10)), fmt)).size == (20, 10)


def test_bomb_over_our_limit_is_rejected_from_the_header_without_decoding(monkeypatch):
    from PIL import PngImagePlugin

    loads = []
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(1))
    data = png_header_only(8000, 8000)  # 64 M pixels: over our 50 M default, under Pillow's own warning level
    start = time.perf_counter()
    message = error_of(data)
    assert time.perf_counter() - start < 0.5
    assert (
        "image has 8000 x 8000 = 64000000 pixels, over the limit of 50000000 (possible decompression bomb)"
        in (message)
    )
    assert loads == []


def test_huge_bomb_caught_by_pillow_inside_open_still_gives_our_message():
    data = png_header_only(30000, 30000)
    assert len(data) < 200
    start = time.perf_counter()
    message = error_of(data)
    assert time.perf_counter() - start < 0.5
    assert "900000000 pixels" in message and "possible decompression bomb" in message


def test_decompression_bomb_warning_becomes_an_error_without_touching_global_filters():
    filters_before = list(warnings.filters)
    # 100 M pixels: under our raised limit, over Pillow's warning level (about 89 M).
    message = error_of(png_header_only(10000, 10000), max_pixels=200_000_000)
    assert "possible decompression bomb" in message
    assert warnings.filters == filters_before


def test_small_max_pixels_is_enforced():
    assert "over the limit of 100" in error_of(encode(noise((20, 10)), "PNG"), max_pixels=100)
    assert load_image(encode(noise((10, 10)), "PNG"), max_pixels=100).size == (10, 10)


def test_rgba_is_composited_on_white_exactly():
    rgba = np.array(
        [[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128], [10, 200, 30, 255]]], dtype=np.uint8
    )  # opaque red, fully transparent blue, half-transparent black, opaque green
    out = np.asarray(load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[0, 2].tolist())
    assert out[0, 3].tolist() == [10, 200, 30]


def test_la_is_composited_on_white():
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    assert np.asarray(load_image(encode(la, "PNG")))[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_palette_with_transparency_becomes_white():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    out = np.asarray(load_image(encode(image, "PNG", transparency=0)))
    assert out[0].tolist() == [[255, 255, 255], [200, 10, 10]]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_the_pre_rotated_reference(orientation):
    image = noise((40, 24), seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    transposes = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }
    reference = image.transpose(transposes[orientation]) if orientation in transposes else image
    out = load_image(encode(image, "PNG", exif=exif))  # PNG: lossless, so the match is exact
    assert out.size == reference.size
    assert np.array_equal(np.asarray(out), np.asarray(reference))


def test_exif_orientation_6_on_a_jpeg_puts_the_left_edge_on_top():
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 32))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = np.asarray(load_image(encode(image, "JPEG", exif=exif, quality=95))).astype(int)
    assert out.shape == (64, 32, 3)
    assert np.abs(out[:28].mean((0, 1)) - [255, 0, 0]).max() < 10  # top: the red left half
    assert np.abs(out[36:].mean((0, 1)) - [0, 0, 255]).max() < 10


def test_16_bit_gradient_is_scaled_not_clipped():
    gradient = (np.arange(256 * 8, dtype=np.uint32).reshape(8, 256) * 32).astype(np.uint16)  # 0 .. 65504
    image = Image.fromarray(gradient)
    assert image.mode == "I;16"
    out = np.asarray(load_image(encode(image, "PNG"))).astype(float)
    reference = (gradient >> 8).astype(float)
    assert abs(out[..., 0].mean() - reference.mean()) <= 1.0
    assert out.max() == 255 and out.min() == 0 and np.abs(out[..., 0] - reference).max() <= 1


def test_mode_i_float_and_others_convert_to_rgb():
    i_image = Image.fromarray(np.array([[0, 32768, 65535, 70000, -5]], dtype=np.int32), "I")
    assert np.asarray(to_rgb(i_image))[0, :, 0].tolist() == [0, 128, 255, 255, 0]
    f_image = Image.fromarray(np.array([[-10.0, 100.6, 300.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(f_image))[0, :, 0].tolist() == [0, 100, 255]
    for mode in ("1", "L", "P", "YCbCr", "CMYK", "RGB"):
        out = to_rgb(Image.new(mode, (3, 1)))
        assert out.mode == "RGB" and out.size == (3, 1)


def test_cmyk_jpeg_and_one_pixel_images():
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    out = np.asarray(load_image(encode(cmyk, "JPEG", quality=95))).astype(int)
    assert out.min() >= 245
    assert load_image(encode(Image.new("1", (1, 1), 1), "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10)
    out = load_image(data)
    assert out.mode == "RGB" and out.getpixel((4, 4)) == (255, 0, 0)
