"""JPEG decoding on the GPU (nvjpeg, through torchvision), for batches.

Pillow decodes a 1080p JPEG in about 20 ms of a CPU core; nvjpeg decodes a
batch of them in well under a millisecond each, straight into GPU memory,
and leaves the CPU (and the GIL) to the model's own Python. The CPU side
still reads each file's header, so oversized images are refused before any
pixel is decoded, and an image nvjpeg cannot decode falls back to Pillow
(``decode.py``), whose error message then names the cause.

nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's: pixels may
differ from Pillow's by a few levels, so masks can differ slightly (within
the 0.99 IoU of the parity tests) from a CPU-decoded run.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from PIL import ExifTags, Image

# EXIF orientations that swap width and height.
_TRANSPOSED = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class JpegHeader:
    """What the CPU learns of a JPEG before its pixels: oriented size and orientation."""

    width: int
    height: int
    orientation: int  # EXIF 1..8; 1 is upright


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of a baseline colour or gray JPEG nvjpeg can decode; None for anything else
    (other formats, CMYK, unreadable headers), which then goes to Pillow."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            if im.mode not in ("RGB", "L") or getattr(im, "is_animated", False):
                return None  # CMYK/YCCK and multi-picture files: Pillow handles them
            orientation = int(im.getexif().get(ExifTags.Base.Orientation, 1) or 1)
            width, height = im.size
    except Exception:  # a broken header: Pillow's own decode will say what is wrong
        return None
    if orientation not in range(1, 9):
        orientation = 1
    if orientation in _TRANSPOSED:
        width, height = height, width
    return JpegHeader(width, height, orientation)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A [C, H, W] image turned upright by its EXIF orientation (as ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1).flip(-2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:  # transpose
        return image.transpose(-1, -2)
    if orientation == 6:  # rotate 90 clockwise
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:  # transverse
        return image.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:  # rotate 90 counter-clockwise
        return image.transpose(-1, -2).flip(-2)
    return image


def decode_jpegs(datas: list[bytes], headers: list[JpegHeader], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes to upright [3, H, W] uint8 tensors on ``device``, in one batched call.

    Raises whatever torchvision raises when any of them cannot be decoded
    (it returns nothing partial); the caller falls back to Pillow.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 points to TorchCodec for image decoding
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    return [orient(image, h.orientation) for image, h in zip(decoded, headers)]
