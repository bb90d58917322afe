"""The one image decoder: file -> (size, size, 3) uint8 RGB, for the CLI, training and the server.

1. `open_image` reads the header only and refuses more than `max_pixels` pixels, or a side
   more than `MAX_ASPECT` times the other, before any pixel is inflated.
2. `decode` lets a JPEG decode at a power-of-two fraction of its size (never below `size`),
   applies the EXIF orientation, and brings the pixel format to one PIL resamples well: 16-bit
   to 32-bit integers, palettes to RGB or RGBA, CMYK to RGB, 1-bit to L, alpha premultiplied.
3. It resizes only the centre square of the source (`resize(box=...)`) to size x size, so a
   thin image never becomes a wide one on the way, then maps the result to 8-bit RGB:
   16-bit values v -> round(v / 257), float values f (taken as 0..1) -> round(255 f), both
   clipped, and alpha composited on white (BACKGROUND).

Peak memory of a decode, measured (tests/mcti/data/test_images.py): under 10 bytes per source
pixel (RGBA with an EXIF rotation, palettes with transparency: ~9) plus ~20 bytes per output
pixel, so max_pixels bounds it for any file accepted.

Nothing here changes PIL's process-wide settings. PIL's own guard (`Image.MAX_IMAGE_PIXELS`,
left at its default of ~89 M pixels) warns above it (silenced while we open a file: our check
follows) and refuses above twice it inside `Image.open`; that refusal is reported as ours,
quoting the limit in force.
"""

import threading
import warnings
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

MAX_PIXELS = 64_000_000  # default pixel limit (width x height) of a decoded file
MAX_ASPECT = 20  # longest side / shortest side
BACKGROUND = 255  # transparent pixels are composited on white

_TO_RGB = {"CMYK", "YCbCr", "LAB", "HSV", "RGBX"}  # PIL converts these to RGB directly
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_QUIET_OPEN = threading.Lock()


class ImageRefused(ValueError):
    """An image refused from its header: `too_large` (over the pixel limit) or too thin."""

    def __init__(self, message: str, too_large: bool):
        super().__init__(message)
        self.too_large = too_large


def check_size(width: int, height: int, max_pixels: int) -> None:
    """Refuse sizes whose decoding would cost too much (`ImageRefused`)."""
    if width * height > max_pixels:
        raise ImageRefused(
            f"the image is {width}x{height} = {width * height} pixels; "
            f"the limit is {max_pixels} pixels",
            too_large=True,
        )
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise ImageRefused(
            f"the image is {width}x{height}: one side is more than {MAX_ASPECT} times the other",
            too_large=False,
        )


def open_image(
    source: str | Path | IO[bytes], max_pixels: int = MAX_PIXELS, formats: tuple | None = None
) -> ImageFile.ImageFile:
    """`Image.open` (header only) with the size checked; use it as a context manager."""
    try:
        # PIL warns above its own limit before we can look at the size; our check below
        # refuses (or accepts) with the limit in force, so its warning would only add a line.
        # catch_warnings swaps the process's filter list: the lock keeps two decoding threads
        # from restoring each other's.
        with _QUIET_OPEN, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source, formats=formats)
    except Image.DecompressionBombError:  # over PIL's own hard limit, raised inside Image.open
        pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageRefused(
            f"the image has more than {pil_limit} pixels; the limit is "
            f"{min(max_pixels, pil_limit)} pixels",
            too_large=True,
        ) from None
    try:
        check_size(*im.size, max_pixels)
    except ImageRefused:
        im.close()
        raise
    return im


def decode(im: Image.Image, size: int) -> np.ndarray:
    """An opened (or in-memory) image -> (size, size, 3) uint8: RGB, centre square, resized.

    The image is loaded and EXIF-transposed in place (a caller's in-memory image included)."""
    if im.format == "JPEG":
        im.draft(None, (size, size))  # DCT scaling by 1/2..1/8 while both sides stay >= size
    im.load()
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # a malformed EXIF block is metadata lost, not an unreadable image
        pass
    return _to_rgb8(_centre_square(_resamplable(im), size))


def _resamplable(im: Image.Image) -> Image.Image:
    """Bring any mode to L, La, RGB, RGBa (alpha premultiplied), I (16-bit range) or F."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        return im.convert("I")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info or im.palette.mode == "RGBA"
        im = im.convert("RGBA" if has_alpha else "RGB")
    elif mode in ("L", "RGB") and "transparency" in im.info:  # a colour key becomes alpha
        im = im.convert("LA" if mode == "L" else "RGBA")
    elif mode == "1":
        return im.convert("L")
    elif mode in _TO_RGB:
        return im.convert("RGB")
    if im.mode in ("LA", "RGBA"):
        return im.convert(im.mode[:-1] + "a")  # premultiplied: resampling mixes no hidden colour
    if im.mode in ("L", "La", "RGB", "RGBa", "I", "F"):
        return im
    raise ValueError(f"unsupported image mode {mode}")


def _centre_square(im: Image.Image, size: int) -> Image.Image:
    """The centre square of `im`, resampled (bicubic) to size x size.

    The square is the one the former resize-then-crop kept (short side scaled to `size`, crop
    at an integer offset), so square images give the former pixels exactly; others may differ
    by a few levels where PIL now runs its two passes in the other order (it picks the order by
    cost), at a cost of about size^2 instead of size^2 x aspect ratio.
    """
    w, h = im.size
    s = size / min(w, h)
    W, H = max(size, round(w * s)), max(size, round(h * s))
    left, top = (W - size) // 2, (H - size) // 2
    box = (left * w / W, top * h / H, (left + size) * w / W, (top + size) * h / H)
    return im.resize((size, size), Image.BICUBIC, box=box)


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """A resampled size x size image -> (size, size, 3) uint8 RGB."""
    a = np.asarray(im)  # (H, W) or (H, W, C)
    if im.mode == "I":  # 16-bit range (PIL opens 16-bit files as I;16 or I)
        a = np.clip(np.rint(a / 257.0), 0, 255)
    elif im.mode == "F":  # float, taken as 0..1
        a = np.clip(np.rint(np.nan_to_num(a) * 255.0), 0, 255)
    a = a.astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]  # (H, W, 1)
    if im.mode in ("La", "RGBa"):  # over BACKGROUND: c*a/255 + BACKGROUND*(1 - a/255)
        color, alpha = a[..., :-1].astype(np.int32), a[..., -1:].astype(np.int32)
        a = np.clip(color + (BACKGROUND * (255 - alpha) + 127) // 255, 0, 255).astype(np.uint8)
    return a if a.shape[2] == 3 else np.repeat(a, 3, axis=2)  # L -> RGB; a fresh, writable array


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float()  # (3, H, W)
    return x.div_(127.5).sub_(1)  # in place: one float copy at size^2


def pil_to_tensor(im: Image.Image, size: int) -> torch.Tensor:
    """An in-memory image -> (3, size, size) float in [-1, 1] (`decode` without the file checks)."""
    return to_tensor(decode(im, size))


def load_image(path: str | Path, size: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """One image file -> (3, size, size) float in [-1, 1]. Raises `ImageRefused` (a ValueError),
    OSError or PIL's UnidentifiedImageError on files it cannot or will not decode."""
    with open_image(path, max_pixels) as im:
        return to_tensor(decode(im, size))
