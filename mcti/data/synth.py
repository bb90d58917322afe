"""A many-class synthetic image set, regenerated exactly from its seed (numpy and PIL only).

A class is a (glyph, foreground colour, background colour) triple: a bold glyph of the DejaVu
font that matplotlib ships, drawn in one palette colour on another. GLYPHS x ordered PALETTE
pairs gives MAX_CLASSES designs; the seed picks which K of them, in a random order, so the first
K classes of a seed are also the first classes of any larger K with that seed. Each image of a
class is the glyph's high-resolution mask under a small random affine map (shift, rotation,
scale) reduced to `size` pixels, with per-image colour offsets and per-pixel noise, so shots of
one class differ while classes stay apart at the embedded model's 16x16 input.

Labels are opaque (`s0000`, ...): nothing in a label names the glyph or its colours.
"""

import importlib.util
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mcti.errors import UserError

FONT_FILE = "DejaVuSans-Bold.ttf"
# Bold glyphs whose silhouettes stay apart after a 2x-4x downsampling (no I/l/1, O/0, ...), and
# no glyph is another's mirror image (no < with >), so a horizontal flip never makes one class
# look exactly like another.
GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZ2345679#%&@?+=<$"
# Colours spread in luminance as well as hue: the embedded model was pretrained on grey images.
PALETTE = [
    (0, 0, 0),  # black
    (255, 255, 255),  # white
    (220, 30, 30),  # red
    (30, 170, 40),  # green
    (40, 60, 220),  # blue
    (250, 220, 30),  # yellow
    (120, 120, 120),  # grey
    (0, 200, 210),  # cyan
]
MAX_CLASSES = len(GLYPHS) * len(PALETTE) * (len(PALETTE) - 1)
GLYPH_EXTENT = 0.85  # of the image side, before jitter
MASK_SCALE = 4  # glyph masks are drawn and transformed at MASK_SCALE x the output size


@dataclass(frozen=True)
class Jitter:
    """Random variation between the images of one class. The geometric part is kept small: the
    embedded model's CLIP tower (4-pixel patches on 16x16) is not shift-invariant: on 40 glyphs
    in white on black, going from these settings to a 5% shift, 8 degrees and 8% scale cut its
    nearest-class-mean accuracy from 80% to 59% (raw pixels: from 99.8% to 91%)."""

    shift: float = 0.03
    """Largest shift, as a fraction of the image side."""
    rotate: float = 5.0
    """Largest rotation in degrees."""
    scale: float = 0.05
    """Largest relative change of the glyph size."""
    colour: float = 14.0
    """Largest per-image offset of each colour channel (0-255)."""
    noise: float = 5.0
    """Standard deviation of per-pixel Gaussian noise (0-255)."""


@dataclass(frozen=True)
class ClassDesign:
    """What makes one class: a glyph in a foreground colour on a background colour."""

    glyph: str
    fg: tuple[int, int, int]
    bg: tuple[int, int, int]


def font_path() -> Path:
    """The bold DejaVu font shipped inside the installed matplotlib (found without importing it)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("mcti synth needs matplotlib's bundled fonts: pip install matplotlib")
    path = Path(spec.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf" / FONT_FILE
    if not path.is_file():
        raise UserError(f"font {FONT_FILE} not found in matplotlib at {path}")
    return path


def class_designs(n_classes: int, seed: int) -> list[ClassDesign]:
    """The first `n_classes` designs of the seed's random order of all glyph x colour pairs."""
    if not 1 <= n_classes <= MAX_CLASSES:
        raise UserError(f"--classes must be between 1 and {MAX_CLASSES}, not {n_classes}")
    pairs = [(f, b) for f in range(len(PALETTE)) for b in range(len(PALETTE)) if f != b]
    order = np.random.default_rng([seed, 0]).permutation(len(GLYPHS) * len(pairs))[:n_classes]
    designs = []
    for i in order.tolist():
        f, b = pairs[i % len(pairs)]
        designs.append(ClassDesign(GLYPHS[i // len(pairs)], PALETTE[f], PALETTE[b]))
    return designs


def class_labels(n_classes: int) -> list[str]:
    """Opaque labels s0000, s0001, ... (sorted order = class order)."""
    width = max(4, len(str(n_classes - 1)))
    return [f"s{k:0{width}d}" for k in range(n_classes)]


@lru_cache(maxsize=len(GLYPHS) * 4)
def glyph_mask(glyph: str, side: int) -> Image.Image:
    """The glyph, white on black, centred on a side x side 'L' canvas; its larger extent is
    GLYPH_EXTENT of the side, so small glyphs (=, +) are drawn as large as letters."""
    probe = ImageFont.truetype(str(font_path()), size=side)
    left, top, right, bottom = probe.getbbox(glyph)
    font = ImageFont.truetype(
        str(font_path()), size=round(side * side * GLYPH_EXTENT / max(right - left, bottom - top))
    )
    left, top, right, bottom = font.getbbox(glyph)
    im = Image.new("L", (side, side), 0)
    x = (side - (right - left)) / 2 - left
    y = (side - (bottom - top)) / 2 - top
    ImageDraw.Draw(im).text((x, y), glyph, fill=255, font=font)
    return im


def _affine(side: int, rng: np.random.Generator, jitter: Jitter) -> tuple[float, ...]:
    """PIL AFFINE coefficients (output pixel -> input pixel) of a random shift/rotate/scale
    about the canvas centre."""
    angle = math.radians(rng.uniform(-jitter.rotate, jitter.rotate))
    scale = 1 + rng.uniform(-jitter.scale, jitter.scale)
    dx, dy = rng.uniform(-jitter.shift, jitter.shift, size=2) * side
    c = side / 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # input = R(-angle)/scale @ (output - centre - shift) + centre
    return (
        cos,
        sin,
        c - cos * (c + dx) - sin * (c + dy),
        -sin,
        cos,
        c + sin * (c + dx) - cos * (c + dy),
    )


def render_class(
    design: ClassDesign, n: int, size: int, rng: np.random.Generator, jitter: Jitter = Jitter()
) -> list[np.ndarray]:
    """n jittered images of one class, each (size, size, 3) uint8."""
    side = size * MASK_SCALE
    mask = glyph_mask(design.glyph, side)
    fg, bg = np.array(design.fg, np.float32), np.array(design.bg, np.float32)
    images = []
    for _ in range(n):
        m = mask.transform((side, side), Image.AFFINE, _affine(side, rng, jitter), Image.BILINEAR)
        alpha = np.asarray(m.reduce(MASK_SCALE), np.float32)[..., None] / 255  # (size, size, 1)
        f = fg + rng.uniform(-jitter.colour, jitter.colour, 3)
        b = bg + rng.uniform(-jitter.colour, jitter.colour, 3)
        x = b + (f - b) * alpha + rng.normal(0, jitter.noise, (size, size, 3))
        images.append(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    return images


def write_synth(
    root: str | Path,
    n_classes: int,
    per_class: int,
    train_per_class: int,
    seed: int,
    size: int,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> list[str]:
    """Write root/train/<label>/NNN.png (the first `train_per_class` images of each class) and
    root/test/<label>/NNN.png (the rest). Returns the labels. Same arguments, same bytes."""
    root = Path(root)
    designs = class_designs(n_classes, seed)
    labels = class_labels(n_classes)
    for k in progress(range(n_classes)):
        rng = np.random.default_rng([seed, 1, k])  # per class: K does not change a class's images
        train, test = root / "train" / labels[k], root / "test" / labels[k]
        train.mkdir(parents=True, exist_ok=True)
        test.mkdir(parents=True, exist_ok=True)
        for i, x in enumerate(render_class(designs[k], per_class, size, rng)):
            d = train if i < train_per_class else test
            Image.fromarray(x).save(d / f"{i:03d}.png", format="PNG")
    return labels
