"""Image bytes to the model's input: an H x W x 3 uint8 RGB array.

One path for every input: open lazily (header only), refuse oversized images
before any pixel is decoded, decode the first frame, apply the EXIF
orientation, and reduce whatever mode the file holds to 8-bit RGB. Every
failure is a ``DecodeError`` whose message names the cause, because it ends up
in the ``error`` column of the image's row.

Modes (after EXIF orientation):

- ``RGB``: as decoded. Pillow loads 16-bit RGB PNG and TIFF as ``RGB`` by
  keeping the high byte of each sample, which matches the 16-bit gray rule.
- ``1``, ``L``, ``P``, ``CMYK`` (Adobe inverted included), ``YCbCr``, ``LAB``,
  ``HSV``: Pillow's ``convert("RGB")``.
- ``LA``, ``PA``, ``RGBA``, ``RGBa``, ``RGBX``, ``P`` with transparency: alpha
  dropped, not composited: the model sees colour only, and any background
  colour we picked would be an invention of ours.
- ``I;16``, ``I;16B``, ...: 16-bit gray, ``value >> 8`` (the high byte).
- ``I``: 32-bit, or signed 16-bit TIFF; scaled by the full range of the
  source's sample type (TIFF BitsPerSample / SampleFormat), never stretched per
  image: unsigned ``>> (bits - 8)``, signed negatives clipped to 0, then
  ``>> (bits - 9)``.
- ``F``: float, rounded and clipped to [0, 255] (NaN to 0).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["SUPPORTED_FORMATS", "DecodeError", "DecodeInterrupted", "decode_image", "decode_peak_bytes", "image_size"]

# Pillow format ids opened; nothing else is even parsed. "JPEG" also opens the
# multi-picture JPEGs many cameras write (Pillow names them MPO, but registers
# no opener under that id: listing it is a KeyError).
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "WEBP", "BMP", "GIF")
_SUPPORTED_TEXT = "JPEG, PNG, TIFF, WebP, BMP, GIF"

# Signatures of the supported formats, to tell a truncated header from a non-image.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
)

# EXIF orientations that swap width and height.
_TRANSPOSED = frozenset({5, 6, 7, 8})

# TIFF tags describing a mode-I image's source samples.
_BITS_PER_SAMPLE = 258
_SAMPLE_FORMAT = 339  # 1 unsigned (the default), 2 signed, 3 float


class DecodeError(ValueError):
    """The bytes are not a decodable image; the message names the cause."""


class DecodeInterrupted(Exception):
    """Raised by ``decode_image``'s ``reserve`` callback to stop a decode for a
    reason of the caller's, not the image's: it passes through as itself, never
    a ``DecodeError``."""


# Host bytes ``decode_image`` allocates at its peak, per pixel, beyond the file's own bytes: Pillow's
# buffer (4 bytes a pixel for every mode but 1, L, P and I;16), the chunks ``tobytes`` encodes and their
# join (np.asarray copies through it), and each conversion's copies. Measured as the rise of the
# process's peak RSS over one decode (``bench/bench_decode_peak.py``, Pillow 13, the most seen in
# three runs): RGB 10.7 (JPEG, PNG, TIFF, BMP, EXIF-turned too), L / 1 / P 11.7, LA / RGBA / CMYK 14.7,
# I;16 8.3, I / F 17.8, WebP 19.4 (RGB) and 24.5 (RGBA). Each entry is ~10% or more above its worst.
_PEAK_PER_PIXEL_BY_MODE = {"1": 13, "L": 13, "P": 13, "RGB": 13, "I": 20, "F": 20}
_PEAK_PER_PIXEL_16_BIT = 9  # I;16, I;16B, I;16L, I;16N
_PEAK_PER_PIXEL_OTHER = 16  # LA, PA, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV: 4 bytes a pixel in Pillow
_PEAK_PER_PIXEL_WEBP = 27  # libwebp decodes into a buffer of its own, then Pillow's


def decode_peak_bytes(width: int, height: int, mode: str, format: str | None = None) -> int:
    """Host bytes ``decode_image`` allocates at its peak for an image of this
    header (Pillow's ``size``, ``mode`` and ``format``), the file's bytes not
    included; always at least the array it returns (3 bytes a pixel)."""
    if format == "WEBP":
        per_pixel = _PEAK_PER_PIXEL_WEBP
    elif mode.startswith("I;16"):
        per_pixel = _PEAK_PER_PIXEL_16_BIT
    else:
        per_pixel = _PEAK_PER_PIXEL_BY_MODE.get(mode, _PEAK_PER_PIXEL_OTHER)
    return width * height * per_pixel


def decode_image(data: bytes, *, max_pixels: int, reserve: Callable[[int], None] | None = None) -> np.ndarray:
    """Bytes to an H x W x 3 uint8 RGB array, C-contiguous, after EXIF orientation.

    Images over ``max_pixels`` are refused from their header, before any pixel
    is decoded. The array may be read-only (it wraps Pillow's output without a
    copy).

    reserve: called with ``decode_peak_bytes`` of the image once its header is
    read and its size accepted, before any pixel is decoded (it may block, to
    wait for memory, or raise ``DecodeInterrupted`` to give up).
    """
    with _pillow_errors(data, max_pixels), _open(data) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise DecodeError(
                f"image too large: {width}x{height} = {width * height:,} pixels exceeds "
                f"--max-pixels {max_pixels:,} (decompression-bomb guard)"
            )
        if reserve is not None:
            reserve(decode_peak_bytes(width, height, im.mode, im.format))
        # Loads the first frame. TIFFs come out of load already oriented and
        # without their tag, so they are not turned twice.
        ImageOps.exif_transpose(im, in_place=True)
        return _to_rgb(im)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    with _pillow_errors(data, None), _open(data) as im:
        width, height = im.size
        if im.format == "TIFF":
            # Pillow orients TIFFs itself, on load; their size is already the oriented one.
            return width, height
        # Image.getexif itself, not PngImageFile's override: that one decodes
        # the whole image to look for an eXIf chunk after the pixel data.
        orientation = Image.Image.getexif(im).get(ExifTags.Base.Orientation, 1)
        return (height, width) if orientation in _TRANSPOSED else (width, height)


def _open(data: bytes) -> ImageFile.ImageFile:
    if not data:
        raise DecodeError("empty file (0 bytes)")
    return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)


@contextmanager
def _pillow_errors(data: bytes, max_pixels: int | None) -> Iterator[None]:
    """Turn whatever Pillow raises into a DecodeError naming the cause."""
    with warnings.catch_warnings():
        # Pillow warns from 89M pixels on, half its own hard limit; our
        # max_pixels check is the guard, so an image under it is no warning.
        # catch_warnings swaps the process-wide filter list and is not
        # thread-safe before Python 3.14: overlapping calls may leave this one
        # ignore filter behind, which is harmless.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            yield
        except (DecodeError, DecodeInterrupted):
            raise
        except UnidentifiedImageError:
            raise DecodeError(_unidentified(data)) from None
        except Image.DecompressionBombError as exc:
            raise DecodeError(_too_large(str(exc), max_pixels)) from exc
        except Exception as exc:  # a corrupt file must cost one row, never the job
            kind = _sniff(data) or "image"
            if "truncated" in str(exc).lower():
                raise DecodeError(f"truncated {kind}: {exc}") from exc
            raise DecodeError(f"cannot decode {kind}: {type(exc).__name__}: {exc}") from exc


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)  # convert("RGB") would copy
    if mode.startswith("I;16"):
        gray = (np.asarray(im) >> 8).astype(np.uint8)
    elif mode == "I":
        gray = _int_to_8bit(np.asarray(im), *_sample_type(im))
    elif mode == "F":
        gray = np.rint(np.clip(np.nan_to_num(np.asarray(im)), 0, 255)).astype(np.uint8)
    else:
        # Drops alpha and transparency: see the module docstring.
        return np.asarray(im.convert("RGB"))
    return np.repeat(gray[:, :, None], 3, axis=2)


def _sample_type(im: Image.Image) -> tuple[int, bool]:
    """(bits, signed) of the samples behind a mode-I image."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:  # not a TIFF: Pillow's own mode I, int32
        return 32, True
    bits = _first(tags.get(_BITS_PER_SAMPLE, 32))
    return bits, _first(tags.get(_SAMPLE_FORMAT, 1)) == 2


def _first(value: int | tuple[int, ...]) -> int:
    """A TIFF tag's value: Pillow gives per-sample tags as tuples."""
    return int(value[0]) if isinstance(value, tuple) else int(value)


def _int_to_8bit(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Scale by the sample type's range: its maximum maps to 255."""
    if signed:
        # Negative samples have no brightness to show; zero stays black.
        scaled = np.clip(values, 0, None) >> max(bits - 9, 0)
    else:
        # Pillow holds unsigned 32-bit samples in int32; the view undoes the wrap.
        scaled = values.view(np.uint32) >> max(bits - 8, 0)
    return np.minimum(scaled, 255).astype(np.uint8)


def _sniff(data: bytes) -> str | None:
    """The supported format the bytes claim to be, from their signature."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _unidentified(data: bytes) -> str:
    """Why Pillow could not open the bytes as a supported format."""
    claimed = _sniff(data)
    if claimed:
        return f"truncated or corrupt {claimed}: cannot read its header ({len(data):,} bytes)"
    other = _other_format(data)
    if other:
        return f"unsupported format: {other} (supported: {_SUPPORTED_TEXT})"
    return f"not an image: cannot identify image format (first bytes {data[:8]!r})"


def _other_format(data: bytes) -> str | None:
    """Name a format we do not decode, so the error says what the file is."""
    if data[4:8] == b"ftyp":  # ISO base media: HEIC from phones, AVIF
        brand = data[8:12].decode("ascii", "replace").strip()
        return "AVIF" if brand in ("avif", "avis") else f"HEIF ({brand})"
    try:
        # Header parsing only; the pixels of these formats are never decoded.
        with Image.open(io.BytesIO(data)) as im:
            return im.format
    except Exception:
        return None


def _too_large(message: str, max_pixels: int | None) -> str:
    """Pillow's own bomb refusal (it comes before our check) in our words."""
    # Pillow names only the pixel count: "Image size (900000000 pixels) exceeds ..."
    found = re.search(r"\((\d+) pixels\)", message)
    pixels = int(found[1]) if found else None
    size = f"{pixels:,} pixels" if pixels is not None else "pixel count"
    if max_pixels is not None and (pixels is None or pixels > max_pixels):
        return f"image too large: {size} exceeds --max-pixels {max_pixels:,} (decompression-bomb guard)"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (
        f"image too large: {size} exceeds Pillow's limit of {limit:,} "
        "(decompression-bomb guard, PIL.Image.MAX_IMAGE_PIXELS)"
    )
