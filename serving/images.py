"""Request bytes -> pixels, refusing what is not a small, whole image.

The checks run in an order that never decodes an image we would refuse: the header alone gives
the format and the size (a decompression bomb is refused here, before any pixel is inflated),
`verify()` walks the compressed stream (truncated or corrupt PNG data fails here), and only then
is the image decoded, by `mcti.data.pil_to_tensor` so the pixels are exactly those of
`mcti classify`. The result travels to the classifier as uint8 (4x smaller than float32 and
converted back bit-exactly: x = v / 127.5 - 1 in both paths).
"""

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mcti.data.folders import pil_to_tensor
from serving.config import IMAGE_FORMATS


class BadImage(Exception):
    """An image the server refuses: `status` is the HTTP code (400 or 413)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def decode_image(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Image file bytes -> (size, size, 3) uint8 (RGB, short side resized, centre crop)."""
    if not data:
        raise BadImage(400, "the image is empty")
    # PIL's own guard as a backstop (it warns above, and refuses above twice, this count).
    Image.MAX_IMAGE_PIXELS = max_pixels
    fmt = "image"
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:  # header only
            fmt = im.format or fmt
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage(
                    413, f"the image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}"
                )
            im.verify()  # reads the whole compressed stream, checks CRCs, decodes nothing
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            im.load()
            x = pil_to_tensor(im, size)  # (3, size, size) in [-1, 1]
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(413, f"the image has more than {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise BadImage(
            400, f"the body is not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
        ) from None
    except Exception as e:  # PIL raises many types on bad data; never echo the bytes
        raise BadImage(
            400, f"the {fmt} image is truncated or corrupt ({type(e).__name__})"
        ) from None
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) float32 in [-1, 1], as pil_to_tensor computes it."""
    x = torch.from_numpy(np.stack(images).astype(np.float32)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return x / 127.5 - 1
