"""The one image decoder: pixel formats against numpy references, EXIF, size limits, memory."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcti.data.images import MAX_ASPECT, MAX_PIXELS, ImageRefused, decode, load_image

REPO = Path(__file__).resolve().parents[3]
N = 24  # square test images decoded at their own size: no resampling, pixels compare exactly


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference compositing on white, in floats: (H, W, C), (H, W) -> (H, W, 3) uint8."""
    a = alpha[..., None].astype(np.float64) / 255
    out = np.round(color * a + 255 * (1 - a)).astype(np.uint8)
    return np.repeat(out, 3 // out.shape[-1], axis=-1)


def _gray(v: np.ndarray) -> np.ndarray:
    return np.repeat(v.astype(np.uint8)[..., None], 3, axis=-1)


def _case(mode: str, path: Path) -> np.ndarray:
    """Write an N x N image of `mode` to `path`; return the expected (N, N, 3) uint8."""
    rng = _rng()
    if mode == "I;16":  # the 16-bit PNG that used to turn white
        v = rng.integers(0, 65536, (N, N), dtype=np.uint16)
        Image.fromarray(v).save(path)
        return _gray(np.round(v / 257.0))
    if mode == "I":  # 32-bit TIFF: read as 16-bit range, clipped
        v = rng.integers(-1000, 70000, (N, N)).astype(np.int32)
        Image.fromarray(v, "I").save(path)
        return _gray(np.clip(np.round(v / 257.0), 0, 255))
    if mode == "F":  # float TIFF: 0..1, clipped
        f = rng.uniform(-0.2, 1.2, (N, N)).astype(np.float32)
        Image.fromarray(f, "F").save(path)
        return _gray(np.clip(np.round(f.astype(np.float64) * 255), 0, 255))
    if mode == "LA":
        la = rng.integers(0, 256, (N, N, 2), dtype=np.uint8)
        Image.fromarray(la, "LA").save(path)
        return _over_white(la[..., :1], la[..., 1])
    if mode == "RGBA":
        rgba = rng.integers(0, 256, (N, N, 4), dtype=np.uint8)
        Image.fromarray(rgba, "RGBA").save(path)
        return _over_white(rgba[..., :3], rgba[..., 3])
    if mode == "P":  # palette with one transparent index
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        idx = rng.integers(0, 8, (N, N), dtype=np.uint8)
        im = Image.fromarray(idx, "P")
        im.putpalette(palette.tobytes())
        im.save(path, transparency=3)
        return np.where((idx == 3)[..., None], 255, palette[idx]).astype(np.uint8)
    if mode == "RGB+key":  # an RGB PNG whose tRNS colour key marks one colour transparent
        rgb = rng.integers(0, 4, (N, N, 3), dtype=np.uint8) * 60
        Image.fromarray(rgb).save(path, transparency=(0, 60, 120))
        key = (rgb == (0, 60, 120)).all(-1, keepdims=True)
        return np.where(key, 255, rgb).astype(np.uint8)
    if mode == "CMYK":
        cmyk = rng.integers(0, 256, (N, N, 4), dtype=np.uint8)
        Image.fromarray(cmyk, "CMYK").save(path)
        c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
        return np.round((255 - c) * (255 - k) / 255).astype(np.uint8)
    if mode == "1":
        bits = rng.integers(0, 2, (N, N)).astype(bool)
        Image.fromarray(bits).convert("1").save(path)
        return _gray(bits * 255)
    raise AssertionError(mode)


@pytest.mark.parametrize(
    "mode,ext",
    [
        ("I;16", "png"),
        ("I", "tiff"),
        ("F", "tiff"),
        ("LA", "png"),
        ("RGBA", "png"),
        ("P", "png"),
        ("RGB+key", "png"),
        ("CMYK", "tiff"),
        ("1", "png"),
    ],
)
def test_pixel_formats_match_a_numpy_reference(tmp_path, mode, ext):
    path = tmp_path / f"x.{ext}"
    want = _case(mode, path)
    x = load_image(path, N)  # (3, N, N) in [-1, 1]
    got = ((x + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("orientation,k", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, k):
    """Orientation 6 means 'rotate 90 degrees clockwise to display' (np.rot90 k=-1), etc."""
    rgb = _rng(1).integers(0, 256, (N, N, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "x.png", exif=exif.tobytes())
    x = load_image(tmp_path / "x.png", N)
    got = ((x + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)
    np.testing.assert_array_equal(got, np.rot90(rgb, k=k))


def _resize_then_crop(im: Image.Image, size: int) -> np.ndarray:
    """The former pipeline: the short side scaled to `size` over the whole image, then cropped."""
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("side,size", [(28, 64), (64, 32), (33, 32), (300, 224)])
def test_square_images_keep_their_former_pixels(side, size):
    """Training data, the embedded model's pretraining and RESULTS use square images: the
    centre-square resize must give them exactly the pixels of resize-then-crop."""
    rgb = _rng(2).integers(0, 256, (side, side, 3), dtype=np.uint8)
    for mode in ("RGB", "L"):
        im = Image.fromarray(rgb).convert(mode)
        want = _resize_then_crop(im.convert("RGB"), size)
        np.testing.assert_array_equal(decode(im, size), want)


def test_large_jpeg_decodes_at_reduced_scale_close_to_full_decode(tmp_path):
    yy, xx = np.mgrid[0:1024, 0:1024]
    rgb = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.jpg", quality=95)
    with Image.open(tmp_path / "x.jpg") as im:
        got = decode(im, 64)  # draft: decoded at 1/8 (128 x 128), then resized
        assert im.size == (128, 128)
    with Image.open(tmp_path / "x.jpg") as im:
        full = _resize_then_crop(im.convert("RGB"), 64)
    assert np.abs(got.astype(int) - full.astype(int)).mean() < 3


def test_thin_images_are_refused_from_the_header(tmp_path):
    """A 20000 x 1 PNG of a few hundred bytes used to be scaled to 160000 x 8 before the crop."""
    Image.new("L", (20000, 1), 128).save(tmp_path / "thin.png")
    with pytest.raises(ImageRefused) as e:
        load_image(tmp_path / "thin.png", 8)
    assert not e.value.too_large and "20000x1" in str(e.value)
    assert f"more than {MAX_ASPECT} times" in str(e.value)
    Image.new("L", (MAX_ASPECT * 3, 3), 128).save(tmp_path / "ok.png")  # exactly 20:1 is fine
    assert load_image(tmp_path / "ok.png", 8).shape == (3, 8, 8)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # ours, not PIL's
def test_pixel_limit_is_checked_from_the_header_and_quoted(tmp_path):
    """Refusals quote the limit in force, and PIL's process-wide setting is left alone."""
    pil_default = Image.MAX_IMAGE_PIXELS
    for w, h in [(10_000, 10_000), (100_000, 100_000)]:  # under and over PIL's own hard limit
        (tmp_path / "bomb.png").write_bytes(_png_header_only(w, h))
        with pytest.raises(ImageRefused) as e:
            load_image(tmp_path / "bomb.png", 32)
        assert e.value.too_large and f"the limit is {MAX_PIXELS} pixels" in str(e.value)
    Image.new("1", (2000, 2000)).save(tmp_path / "many.png")  # 4 M pixels in a few KB
    with pytest.raises(ImageRefused, match="2000x2000 = 4000000 pixels; the limit is 3999999"):
        load_image(tmp_path / "many.png", 32, max_pixels=3_999_999)
    assert load_image(tmp_path / "many.png", 32, max_pixels=4_000_000).shape == (3, 32, 32)
    assert Image.MAX_IMAGE_PIXELS == pil_default


# Measured in a fresh process: the growth of the resident set (peak minus the level before the
# call, the peak reset through /proc/self/clear_refs) while load_image decodes one file. Large
# allocations are mmapped (MALLOC_MMAP_THRESHOLD_) so memory freed by one case is not reused,
# unseen, by the next.
MEASURE = """
import json, sys
from mcti.data.folders import load_image

def kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

out = {}
load_image(sys.argv[1] + "/warm.png", 64)
for spec in sys.argv[2:]:
    name, size = spec.split("@")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = kb("VmRSS")
    load_image(sys.argv[1] + "/" + name, int(size))
    out[spec] = (kb("VmHWM") - before) * 1024
print(json.dumps(out))
"""


def test_decoding_memory_is_bounded_by_pixels_and_size(tmp_path):
    """Peak growth <= 10 bytes per source pixel + 32 bytes per output pixel + 8 MB, for the
    costliest formats (alpha with EXIF rotation, palette with transparency, 16-bit, CMYK) at
    2000 x 2000, and for a 20:1 image at 1024 px, which the former resize of the whole image
    took to ~107 MB (its short side scaled up to 1024 first: 20480 x 1024 x 3 bytes)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs /proc/self/clear_refs (Linux) to reset the peak resident set")
    rng = _rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "warm.png")
    Image.fromarray(rng.integers(0, 256, (100, 2000, 3), dtype=np.uint8)).save(
        tmp_path / "wide.png"
    )
    rgba = rng.integers(0, 256, (2000, 2000, 4), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png", exif=exif.tobytes(), compress_level=1)
    Image.fromarray(rgba[..., 0].astype(np.uint16) * 257).save(
        tmp_path / "i16.png", compress_level=1
    )
    Image.fromarray(rgba[..., :3]).quantize(64).save(
        tmp_path / "p.png", transparency=3, compress_level=1
    )
    Image.fromarray(rgba, "CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    cases = {
        "wide.png@1024": 2000 * 100,
        "rgba.png@256": 2000 * 2000,
        "i16.png@256": 2000 * 2000,
        "p.png@256": 2000 * 2000,
        "cmyk.jpg@256": 2000 * 2000,
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path), *cases],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    peaks = json.loads(r.stdout)
    for spec, pixels in cases.items():
        size = int(spec.split("@")[1])
        bound = 10 * pixels + 32 * size * size + 8_000_000
        assert peaks[spec] <= bound, (spec, peaks[spec], bound)


def test_classify_refuses_thin_and_huge_images_in_one_line(tmp_path, capsys):
    from mcti.cli import main
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=2, size=16)
    tok = tmp_path / "tok"
    argv = ["train", "--model", "tiny-random", "--data", str(data), "--out", str(tok)]
    argv += ["--steps", "1", "--shots", "2", "--batch-size", "2", "--draws", "1"]
    assert main([*argv, "--negatives", "1", "--device", "cpu", "--quiet"]) == 0
    Image.new("L", (2100, 100)).save(tmp_path / "thin.png")
    (tmp_path / "huge.png").write_bytes(_png_header_only(10_000, 10_000))
    for name, words in [("thin", "more than 20 times"), ("huge", "the limit is 64000000")]:
        capsys.readouterr()
        argv = ["classify", "--tokens", str(tok), "--device", "cpu", str(tmp_path / f"{name}.png")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mcti classify: error: ") and words in err
