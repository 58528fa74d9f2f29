"""Safe image decoding shared by training, evaluation and serving: bytes or a path in, an RGB PIL image out.

Every failure is an ``ImageError`` with a one-line message naming the source and the problem; no Pillow message,
traceback or object address reaches the caller. The guards follow RELIABILITY.md:

- S5: only the decoders in ``ALLOWED_FORMATS`` are ever invoked (``Image.open(formats=...)``), chosen by content,
  never by file name, so an EPS/PDF/TIFF/JPEG2000 file named ``x.png`` never reaches its plugin.
- S6: the pixel count is checked from the header before any pixel is decoded, and Pillow's
  ``DecompressionBombWarning`` is turned into an error locally (global warning filters are left alone).
- D4: ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays ``False``; truncated data is an error, not a grey half-image.
- D1-D3, S7: EXIF orientation is applied; animated images give their first frame only (the frame count is never
  read, so a 10,000-frame GIF costs one frame); every mode becomes RGB, with alpha composited onto white.
"""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmlab.errors import ImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

DEFAULT_MAX_PIXELS = 50_000_000
# Alpha is flattened onto white, as vLLM and the LLaVA preprocessors do (RELIABILITY.md S7/D2).
ALPHA_BACKGROUND = (255, 255, 255)

# Signatures of the allowed formats: when Pillow cannot identify data that starts like one of them, the file is a
# damaged image of an allowed format, not a disallowed format, and the message should say so.
_ALLOWED_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def load_image(
    source: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode ``source`` (a file path or the encoded bytes) into a new RGB image.

    ``name`` replaces the source in error messages (e.g. a request field); bytes default to "image bytes".
    Raises ``ImageError`` for a missing, empty, disallowed, oversized, truncated or corrupt image.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "image bytes"
        data = bytes(source)
        if not data:
            raise ImageError(f"{label}: empty image data")
        return _decode(io.BytesIO(data), label, max_pixels)

    path = os.fspath(source)
    label = name or str(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(f"{label}: empty image file")
        with open(path, "rb") as fp:
            return _decode(fp, label, max_pixels)
    except FileNotFoundError:
        raise ImageError(f"{label}: image not found") from None
    except IsADirectoryError:
        raise ImageError(f"{label}: is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(f"{label}: cannot read image (permission denied)") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to RGB (alpha onto white, 16-bit scaled, float clipped).

    An RGB image without a transparency key is returned as is (no copy)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I;16"):
        # 16-bit data keeps its full range: 65535 -> 255 (divide by 256), not clipped at 255 (RELIABILITY D2).
        return _grey_to_rgb(np.asarray(image).astype(np.uint16) >> 8)
    if mode == "I":
        # "I" from an allowed decoder holds 16-bit samples (older Pillow opened 16-bit PNGs as "I"): same scaling.
        return _grey_to_rgb(np.clip(np.asarray(image), 0, 65535).astype(np.uint32) >> 8)
    if mode == "F":
        return _grey_to_rgb(np.clip(np.nan_to_num(np.asarray(image)), 0, 255).astype(np.uint8))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # "1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX": Pillow's own conversions are exact enough.
    return image.convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")


def _decode(fp: io.BufferedIOBase, label: str, max_pixels: int) -> Image.Image:
    """Identify (allowed formats only), check the header size, decode the first frame, orient, convert."""
    with warnings.catch_warnings():
        # Local only: the caller's warning filters are untouched outside this block.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp, formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise ImageError(_unidentified_message(fp, label)) from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ImageError(_bomb_message(label, None, err, max_pixels)) from None
        except Exception:  # a header that crashes an allowed plugin is corrupt data, whatever Pillow raised
            raise ImageError(f"{label}: truncated or corrupt image data") from None

        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(_bomb_message(label, (width, height), None, max_pixels))
            if width < 1 or height < 1:
                raise ImageError(f"{label}: image has no pixels ({width} x {height})")
            try:
                image.load()  # the first frame of an animation; later frames are never decoded
                # A new image (the rotated one, or a copy), so the result outlives the closed file.
                return to_rgb(ImageOps.exif_transpose(image))
            except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
                raise ImageError(_bomb_message(label, (width, height), err, max_pixels)) from None
            except Exception:  # OSError (truncated), SyntaxError, ValueError, zlib.error, struct.error, ...
                raise ImageError(f"{label}: truncated or corrupt image data") from None


def _unidentified_message(fp: io.BufferedIOBase, label: str) -> str:
    fp.seek(0)
    head = fp.read(16)
    if head.startswith(_ALLOWED_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return f"{label}: truncated or corrupt image data"
    return f"{label}: not a supported image format (allowed: {', '.join(ALLOWED_FORMATS)})"


def _bomb_message(label: str, size: tuple[int, int] | None, err: Exception | None, max_pixels: int) -> str:
    if size is not None:
        width, height = size
        return (
            f"{label}: image has {width} x {height} = {width * height} pixels, over the limit of {max_pixels} "
            "(possible decompression bomb)"
        )
    # Pillow's own check fired inside Image.open, before the size was visible to us: its message carries the
    # pixel count, and the effective limit is the lower of ours and Pillow's global one.
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    match = _BOMB_PIXELS.search(str(err))
    count = f"{match.group(1)} pixels" if match else "too many pixels"
    return f"{label}: image has {count}, over the limit of {limit} (possible decompression bomb)"
