"""Image-folder data: `DIR/<label>/<image>`, labels are opaque keys, never text.

Corrupt or non-image files are skipped with one warning that counts them (and names the first
few); a folder with fewer than two usable classes is an error.
"""

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mcti.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_PIXELS = 64_000_000  # refuse decompression bombs


@dataclass
class ImageFolder:
    """A labelled image list: `paths[i]` relative to `root`, `labels[i]` an index into `classes`."""

    root: Path
    classes: list[str]
    paths: list[str]
    labels: list[int]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def indices_of(self, label: int) -> list[int]:
        return [i for i, y in enumerate(self.labels) if y == label]


def scan_folder(root: str | Path, min_classes: int = 2) -> ImageFolder:
    """List `root/<label>/*` images; labels sorted so class indices are stable."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder '{root}' does not exist")
    classes, paths, labels = [], [], []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in label_dir.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            continue
        classes.append(label_dir.name)
        for f in files:
            paths.append(str(f.relative_to(root)))
            labels.append(len(classes) - 1)
    if len(classes) == 0:
        raise UserError(f"data folder '{root}' is empty: expected {root}/<label>/<image files>")
    if len(classes) < min_classes:
        raise UserError(
            f"data folder '{root}' has {len(classes)} class; need at least {min_classes} "
            "(one sub-folder per class)"
        )
    return ImageFolder(root, classes, paths, labels)


def few_shot(data: ImageFolder, shots: int, seed: int) -> list[int]:
    """`shots` images per class, picked reproducibly by seed (all if a class has fewer)."""
    if shots < 1:
        raise UserError(f"--shots must be >= 1, not {shots}")
    rng = random.Random(seed)
    chosen = []
    for k in range(len(data.classes)):
        idx = data.indices_of(k)
        chosen += sorted(rng.sample(idx, min(shots, len(idx))))
    return chosen


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """One image -> (3, size, size) float in [-1, 1] (RGB, short side resized, centre crop)."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with Image.open(path) as im:
        im.load()
        return pil_to_tensor(im, size)


def pil_to_tensor(im: Image.Image, size: int) -> torch.Tensor:
    im = im.convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
    return x / 127.5 - 1


def load_images(
    data: ImageFolder, indices: list[int], size: int, quiet: bool = False
) -> tuple[torch.Tensor, list[int]]:
    """Load `indices`; unreadable files are skipped and counted. Returns (N, 3, H, W), kept."""
    images, kept, bad = [], [], []
    for i in indices:
        try:
            images.append(load_image(data.root / data.paths[i], size))
            kept.append(i)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            bad.append(data.paths[i])
    if bad:
        data.skipped += bad
        if not quiet:
            names = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
            print(f"warning: skipped {len(bad)} unreadable image file(s): {names}", file=sys.stderr)
    if not images:
        raise UserError(f"no readable images among {len(indices)} file(s) in '{data.root}'")
    return torch.stack(images), kept
