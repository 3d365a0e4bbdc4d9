"""segbatch.model.decode: every format and mode to H x W x 3 uint8 RGB, and every bad input to a DecodeError."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data

from segbatch.model import DecodeError, DecodeInterrupted, decode_image, decode_peak_bytes, image_size

BIG = 178_956_970  # the CLI's default --max-pixels


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def decode(payload: bytes) -> np.ndarray:
    out = decode_image(payload, max_pixels=BIG)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.flags.c_contiguous
    return out


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, depth: int, colour: int, rows: Callable[[int], bytes]) -> bytes:
    """A PNG built by hand, for what Pillow cannot write (16-bit RGB, huge sizes)."""
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\x00" + rows(y)) for y in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def blank_1bit_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG: a few hundred KB that declares width x height pixels."""
    row = bytes((width + 7) // 8)
    return png(width, height, 1, 0, lambda _y: row)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return blank_1bit_png(30_000, 30_000)  # 900M pixels in a few hundred KB


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()[::2, ::2].copy()  # 256 x 256, keeps the file fast


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return data.chelsea()  # 300 x 451: not square, so a swapped axis shows


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return data.camera()[::2, ::2].copy()  # gray


# --- formats --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kwargs", "tolerance"),
    [
        ("PNG", {}, 0),
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
        ("BMP", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("WEBP", {"quality": 90}, 6),
        ("JPEG", {"quality": 95}, 3),
    ],
)
def test_format_round_trip(chelsea: np.ndarray, fmt: str, kwargs: dict, tolerance: float) -> None:
    out = decode(encode(Image.fromarray(chelsea), fmt, **kwargs))
    assert out.shape == chelsea.shape
    assert np.abs(out.astype(int) - chelsea).mean() <= tolerance
    assert image_size(encode(Image.fromarray(chelsea), fmt, **kwargs)) == (451, 300)


def test_gif_palette() -> None:
    quantized = Image.fromarray(data.coffee()[::2, ::2].copy()).quantize(64)
    out = decode(encode(quantized, "GIF"))
    assert np.array_equal(out, np.asarray(quantized.convert("RGB")))


def test_mpo_camera_jpeg_gives_first_picture(chelsea: np.ndarray) -> None:
    first = Image.fromarray(chelsea)
    payload = encode(first, "MPO", save_all=True, append_images=[Image.new("RGB", first.size, "red")], quality=95)
    assert np.abs(decode(payload).astype(int) - chelsea).mean() < 3


# --- EXIF orientation -------------------------------------------------------------------

# What a viewer shows for each EXIF orientation, written with numpy, not Pillow.
ORIENTED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),  # 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),  # 90 degrees counter-clockwise
}


def with_orientation(a: np.ndarray, orientation: int, fmt: str, **kwargs: object) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(a), fmt, exif=exif, **kwargs)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_exif_orientation_exact(chelsea: np.ndarray, orientation: int, fmt: str) -> None:
    a = chelsea[:40, :64]
    payload = with_orientation(a, orientation, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    out = decode(payload)
    assert np.array_equal(out, ORIENTED[orientation](a))
    assert image_size(payload) == (out.shape[1], out.shape[0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg(chelsea: np.ndarray, orientation: int) -> None:
    a = chelsea[:48, :64]
    payload = with_orientation(a, orientation, "JPEG", quality=100)
    out = decode(payload)
    expected = ORIENTED[orientation](a)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).mean() < 2
    assert image_size(payload) == (out.shape[1], out.shape[0])


# --- modes ------------------------------------------------------------------------------


def gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "BMP"])
def test_grayscale(camera: np.ndarray, fmt: str) -> None:
    out = decode(encode(Image.fromarray(camera), fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert np.abs(out[..., 0].astype(int) - camera).mean() < 1


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
def test_bilevel(camera: np.ndarray, fmt: str) -> None:
    bits = camera > 128
    out = decode(encode(Image.fromarray(bits), fmt))
    assert np.array_equal(out, gray3(np.where(bits, 255, 0).astype(np.uint8)))


def test_gray_alpha_drops_alpha(camera: np.ndarray) -> None:
    alpha = np.zeros_like(camera)  # fully transparent: the colour underneath must survive
    out = decode(encode(Image.fromarray(np.dstack([camera, alpha]), "LA"), "PNG"))
    assert np.array_equal(out, gray3(camera))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_rgba_drops_alpha(astronaut: np.ndarray, fmt: str) -> None:
    alpha = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    rgba = Image.fromarray(np.dstack([astronaut, alpha]))
    out = decode(encode(rgba, fmt, **({"lossless": True, "exact": True} if fmt == "WEBP" else {})))
    assert np.array_equal(out, astronaut)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(astronaut: np.ndarray, fmt: str) -> None:
    pal = Image.fromarray(astronaut).quantize(32)
    payload = encode(pal, fmt, transparency=0)
    assert Image.open(io.BytesIO(payload)).info.get("transparency") == 0
    assert np.array_equal(decode(payload), np.asarray(pal.convert("RGB")))


def test_cmyk_jpeg_adobe_inverted(astronaut: np.ndarray) -> None:
    payload = encode(Image.fromarray(astronaut).convert("CMYK"), "JPEG", quality=95)
    opened = Image.open(io.BytesIO(payload))
    assert opened.mode == "CMYK" and "adobe" in opened.info  # Pillow writes inverted CMYK with an Adobe marker
    assert np.abs(decode(payload).astype(int) - astronaut).mean() < 3


def test_cmyk_and_ycbcr_tiff(astronaut: np.ndarray) -> None:
    for mode in ("CMYK", "YCbCr"):
        im = Image.fromarray(astronaut).convert(mode)
        payload = encode(im, "TIFF")
        assert Image.open(io.BytesIO(payload)).mode == mode
        assert np.array_equal(decode(payload), np.asarray(im.convert("RGB")))


RAMP16 = np.array([[0, 255, 256, 32767, 32896, 65280, 65535]], dtype=np.uint16)


@pytest.mark.parametrize(("fmt", "dtype"), [("PNG", "<u2"), ("TIFF", "<u2"), ("TIFF", ">u2")])
def test_16bit_gray_keeps_high_byte(fmt: str, dtype: str) -> None:
    payload = encode(Image.fromarray(RAMP16.astype(dtype)), fmt)
    assert Image.open(io.BytesIO(payload)).mode.startswith("I;16")
    assert np.array_equal(decode(payload), gray3(np.array([[0, 0, 1, 127, 128, 255, 255]], np.uint8)))


def test_16bit_gray_not_stretched() -> None:
    dark = np.full((4, 4), 1000, dtype=np.uint16)  # a dark image stays dark
    assert (decode(encode(Image.fromarray(dark), "PNG")) == 1000 >> 8).all()


def test_16bit_rgb_png_and_tiff() -> None:
    rgb16 = np.random.default_rng(0).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    expected = (rgb16 >> 8).astype(np.uint8)
    payload = png(7, 5, 16, 2, lambda y: rgb16[y].astype(">u2").tobytes())
    assert np.array_equal(decode(payload), expected)
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb16, photometric="rgb")
    assert np.array_equal(decode(buf.getvalue()), expected)


def test_int32_tiff_signed() -> None:
    values = np.array([[-5, 0, 2**23 - 1, 2**23, 2**30, 2**31 - 1]], dtype=np.int32)
    payload = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(payload)).mode == "I"
    assert np.array_equal(decode(payload), gray3(np.array([[0, 0, 0, 1, 128, 255]], np.uint8)))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([[0, 2**24 - 1, 2**24, 2**31, 2**32 - 1]], np.uint32), [0, 0, 1, 128, 255]),
        (np.array([[-3, 0, 127, 128, 16384, 32767]], np.int16), [0, 0, 0, 1, 128, 255]),
    ],
)
def test_mode_i_tiff_by_sample_type(values: np.ndarray, expected: list[int]) -> None:
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, values, photometric="minisblack")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I"
    assert np.array_equal(decode(buf.getvalue()), gray3(np.array([expected], np.uint8)))


def test_float_tiff_clipped() -> None:
    values = np.array([[-3.5, 0.4, 127.6, 254.6, 1e6, np.nan, np.inf]], dtype=np.float32)
    payload = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(payload)).mode == "F"
    assert np.array_equal(decode(payload), gray3(np.array([[0, 0, 128, 255, 255, 0, 255]], np.uint8)))


# --- multi-frame ------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "kwargs"), [("GIF", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_multi_frame_gives_first(fmt: str, kwargs: dict) -> None:
    first = Image.new("RGB", (16, 8), (0, 0, 255))
    later = [Image.new("RGB", (16, 8), (255, 0, 0)), Image.new("RGB", (16, 8), (0, 255, 0))]
    out = decode(encode(first, fmt, save_all=True, append_images=later, **kwargs))
    assert out.shape == (8, 16, 3) and (out == (0, 0, 255)).all()


# --- bad input --------------------------------------------------------------------------


def refused(payload: bytes, max_pixels: int = BIG) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(payload, max_pixels=max_pixels)
    return str(info.value)


def test_empty() -> None:
    assert refused(b"") == "empty file (0 bytes)"
    with pytest.raises(DecodeError, match="empty file"):
        image_size(b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "BMP", "GIF"])
def test_truncated_half(astronaut: np.ndarray, fmt: str) -> None:
    payload = encode(Image.fromarray(astronaut), fmt)
    assert refused(payload[: len(payload) // 2]).startswith(f"truncated {fmt}: image file is truncated")


def test_truncated_jpeg_photo() -> None:
    payload = encode(Image.fromarray(data.coffee()), "JPEG", quality=90)
    assert refused(payload[: len(payload) // 2]).startswith("truncated JPEG: image file is truncated")
    assert image_size(payload[: len(payload) // 2]) == (600, 400)  # the header is whole


def test_truncated_header(astronaut: np.ndarray) -> None:
    payload = encode(Image.fromarray(astronaut), "PNG")
    assert refused(payload[:20]) == "truncated PNG: Truncated File Read"
    assert refused(payload[:10]) == "truncated or corrupt PNG: cannot read its header (10 bytes)"


def test_truncated_webp(astronaut: np.ndarray) -> None:
    payload = encode(Image.fromarray(astronaut), "WEBP")
    assert refused(payload[: len(payload) // 2]).startswith("cannot decode WebP: OSError:")


def test_text_is_not_an_image() -> None:
    message = refused(b"hello world, this is a text file\n")
    assert message == "not an image: cannot identify image format (first bytes b'hello wo')"
    with pytest.raises(DecodeError, match="not an image"):
        image_size(b"hello world")


def test_unsupported_formats(astronaut: np.ndarray) -> None:
    ppm = encode(Image.fromarray(astronaut), "PPM")
    assert refused(ppm) == "unsupported format: PPM (supported: JPEG, PNG, TIFF, WebP, BMP, GIF)"
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    assert refused(heic).startswith("unsupported format: HEIF (heic)")


def test_unexpected_pillow_failure_is_wrapped(astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("segbatch.model.decode.ImageOps.exif_transpose", boom)
    assert refused(encode(Image.fromarray(astronaut), "PNG")) == "cannot decode PNG: RuntimeError: boom"


# --- size limits ------------------------------------------------------------------------


def test_max_pixels_small_image(astronaut: np.ndarray) -> None:
    payload = encode(Image.fromarray(astronaut[:100, :100]), "PNG")
    assert refused(payload, 5000) == (
        "image too large: 100x100 = 10,000 pixels exceeds --max-pixels 5,000 (decompression-bomb guard)"
    )
    assert decode_image(payload, max_pixels=10_000).shape == (100, 100, 3)


def test_decompression_bomb_refused_from_header(bomb: bytes) -> None:
    assert len(bomb) < 1_000_000
    expected = "image too large: 900,000,000 pixels exceeds --max-pixels 178,956,970 (decompression-bomb guard)"
    assert refused(bomb) == expected
    # Pillow's own hard limit refuses it first, whatever --max-pixels says.
    assert "exceeds Pillow's limit of 178,956,970" in refused(bomb, 10**10)
    with pytest.raises(DecodeError, match="exceeds Pillow's limit"):
        image_size(bomb)


def test_large_under_pillow_limit_is_ours_to_judge() -> None:
    # 120M pixels: over Pillow's warning threshold (89M), under its hard limit.
    payload = blank_1bit_png(12_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning leaks out
        assert image_size(payload) == (12_000, 10_000)
        assert refused(payload, 100_000_000) == (
            "image too large: 12000x10000 = 120,000,000 pixels exceeds --max-pixels 100,000,000 "
            "(decompression-bomb guard)"
        )


def test_no_global_state_changed(astronaut: np.ndarray, bomb: bytes) -> None:
    limit, truncated, filters = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)
    decode(encode(Image.fromarray(astronaut), "PNG"))
    refused(bomb)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (limit, truncated)
    assert warnings.filters == filters


# --- memory claimed before decoding ---------------------------------------------------------


def test_reserve_comes_from_the_header_before_any_pixel(astronaut: np.ndarray, bomb: bytes) -> None:
    payload = encode(Image.fromarray(astronaut[:90, :120]).convert("RGBA"), "PNG")
    asked: list[int] = []
    out = decode_image(payload, max_pixels=BIG, reserve=asked.append)
    assert asked == [decode_peak_bytes(120, 90, "RGBA", "PNG")] and asked[0] >= out.nbytes
    with pytest.raises(DecodeError):
        decode_image(bomb, max_pixels=BIG, reserve=asked.append)
    assert len(asked) == 1  # refused from its header: nothing asked

    class GiveUp(DecodeInterrupted):
        pass

    def give_up(nbytes: int) -> None:
        raise GiveUp

    with pytest.raises(GiveUp):  # the caller's reason, not the image's: never a DecodeError
        decode_image(payload, max_pixels=BIG, reserve=give_up)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "LA", "PA", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I", "F"])
def test_the_peak_claimed_is_at_least_the_array_decoded(mode: str) -> None:
    assert decode_peak_bytes(7, 5, mode, "PNG") >= 7 * 5 * 3
    assert decode_peak_bytes(7, 5, mode, "WEBP") >= decode_peak_bytes(7, 5, mode, "PNG")
