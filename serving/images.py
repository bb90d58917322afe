"""Request bytes -> pixels, refusing what is not a small, whole image.

The checks run in an order that never decodes an image we would refuse: the header alone gives
the format and the size (a decompression bomb, or a side over 20x the other, is refused here by
`mcti.data.images.open_image`, before any pixel is inflated), `verify()` walks the compressed
stream (truncated or corrupt PNG data fails here), and only then is the image decoded, by
`mcti.data.images.decode`, so the pixels are exactly those of `mcti classify`. The result travels
to the classifier as uint8 (4x smaller than float32 and converted back bit-exactly:
x = v / 127.5 - 1 in both paths).
"""

import io

import numpy as np
import torch
from PIL import UnidentifiedImageError

from mcti.data.images import ImageRefused, decode, open_image
from serving.config import IMAGE_FORMATS


class BadImage(Exception):
    """An image the server refuses: `status` is the HTTP code (400 or 413)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_image(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Image file bytes -> (size, size, 3) uint8 (RGB, centre square resized; see decode)."""
    if not data:
        raise BadImage(400, "the image is empty")
    fmt = "image"
    try:
        with open_image(io.BytesIO(data), max_pixels, IMAGE_FORMATS) as im:  # header only
            fmt = im.format or fmt
            im.verify()  # reads the whole compressed stream, checks CRCs, decodes nothing
        with open_image(io.BytesIO(data), max_pixels, IMAGE_FORMATS) as im:
            return decode(im, size)
    except ImageRefused as e:  # too many pixels: 413; too thin: 400
        raise BadImage(413 if e.too_large else 400, str(e)) from None
    except UnidentifiedImageError:
        raise BadImage(
            400, f"the body is not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
        ) from None
    except Exception as e:  # PIL raises many types on bad data; never echo the bytes
        raise BadImage(
            400, f"the {fmt} image is truncated or corrupt ({type(e).__name__})"
        ) from None


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) float32 in [-1, 1], as `load_image` computes it."""
    x = torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return x / 127.5 - 1
