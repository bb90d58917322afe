"""Request decoding (serving/images.py): the library's one decoder behind HTTP status codes."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mcti.data.images import load_image
from serving.images import BadImage, decode_image, to_pixels


def _bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_thin_image_is_a_400_not_a_memory_spike():
    """The issue's probe: a 200000 x 1 PNG of a few hundred bytes."""
    data = _bytes(Image.new("L", (200_000, 1), 7))
    assert len(data) < 1000
    with pytest.raises(BadImage) as e:
        decode_image(data, 32, 25_000_000)
    assert e.value.status == 400 and "200000x1" in e.value.message
    assert "more than 20 times" in e.value.message


def test_sixteen_bit_png_keeps_its_tones():
    """A 16-bit gradient used to come out 97% white (I;16 clipped straight to 8 bits)."""
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))  # (64, 64)
    got = decode_image(_bytes(Image.fromarray(ramp)), 64, 10_000)
    np.testing.assert_array_equal(got[..., 0], np.round(ramp / 257.0).astype(np.uint8))
    assert (got == 255).mean() < 0.05


def test_transparency_is_composited_on_white():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:8, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    got = decode_image(_bytes(Image.fromarray(rgba, "RGBA")), 16, 10_000)
    assert (got[:8] == (200, 0, 0)).all() and (got[8:] == 255).all()


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # ours, not PIL's
def test_pixel_limit_is_413_quoting_the_limit_and_leaves_pil_settings_alone():
    def header_only(w: int, h: int) -> bytes:
        def chunk(kind: bytes, body: bytes) -> bytes:
            crc = struct.pack(">I", zlib.crc32(kind + body))
            return struct.pack(">I", len(body)) + kind + body + crc

        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))

    pil_default = Image.MAX_IMAGE_PIXELS
    for w, h in [(6000, 6000), (10_000, 10_000), (100_000, 100_000)]:
        with pytest.raises(BadImage) as e:
            decode_image(header_only(w, h), 32, 25_000_000)
        assert e.value.status == 413 and "the limit is 25000000 pixels" in e.value.message
    assert Image.MAX_IMAGE_PIXELS == pil_default


@pytest.mark.parametrize("kind", ["i16", "rgba-exif", "palette-transparent", "cmyk-jpeg"])
def test_server_pixels_are_the_cli_pixels(tmp_path, kind):
    """One decoder: the bytes a client posts give the pixels `mcti classify` reads from disk."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 30, 4), dtype=np.uint8)
    fmt, kw = "PNG", {}
    if kind == "i16":
        im = Image.fromarray(rgba[..., 0].astype(np.uint16) * 257)
    elif kind == "rgba-exif":
        im = Image.fromarray(rgba, "RGBA")
        exif = Image.Exif()
        exif[0x0112] = 6
        kw = {"exif": exif.tobytes()}
    elif kind == "palette-transparent":
        im = Image.fromarray(rgba[..., :3]).quantize(16)
        kw = {"transparency": 2}
    else:
        im, fmt = Image.fromarray(rgba, "CMYK"), "JPEG"
    data = _bytes(im, fmt, **kw)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    got = decode_image(data, 32, 10_000)
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    assert torch.equal(to_pixels([got])[0], load_image(path, 32))
