"""JPEG decoding for the GPU path, run here on the CPU (torchvision's decoder, our orientation)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from segbatch.model import decode_image, decode_jpegs, jpeg_header


def _jpeg(arr: np.ndarray, orientation: int = 1, mode: str = "RGB") -> bytes:
    im = Image.fromarray(arr).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_like_pillow(orientation: int) -> None:
    data = _jpeg(skdata.chelsea()[:200, :300], orientation)
    header = jpeg_header(data)
    reference = decode_image(data, max_pixels=10**8)  # Pillow, EXIF applied
    assert (header.height, header.width) == reference.shape[:2]
    (image,) = decode_jpegs([data], [header], torch.device("cpu"))
    got = image.permute(1, 2, 0).numpy()
    assert got.shape == reference.shape
    assert np.abs(got.astype(int) - reference.astype(int)).mean() < 1.0


def test_gray_jpeg_becomes_rgb() -> None:
    data = _jpeg(skdata.camera()[:128, :160], mode="L")
    header = jpeg_header(data)
    (image,) = decode_jpegs([data], [header], torch.device("cpu"))
    assert image.shape == (3, 128, 160) and torch.equal(image[0], image[1])


def test_what_the_gpu_path_leaves_to_pillow() -> None:
    png = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(png, format="PNG")
    cmyk = io.BytesIO()
    Image.fromarray(skdata.chelsea()).convert("CMYK").save(cmyk, format="JPEG")
    for data in (png.getvalue(), cmyk.getvalue(), b"\xff\xd8\xff\xe0 broken", b""):
        assert jpeg_header(data) is None


def test_a_corrupt_jpeg_fails_the_batch_call() -> None:
    good = _jpeg(skdata.chelsea()[:64, :64])
    bad = good[:200] + b"\x00" * 50
    header = jpeg_header(good)
    with pytest.raises(Exception):  # noqa: B017  (torchvision's error type differs between versions)
        decode_jpegs([good, bad], [header, header], torch.device("cpu"))
