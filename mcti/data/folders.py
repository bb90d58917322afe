"""Image-folder data: `DIR/<label>/<image>`, labels are opaque keys, never text.

Nothing is dropped without a word: a class folder that is hidden, empty, or keeps its images one
level down is named in a warning (and a folder left with fewer than two classes is an error);
corrupt or non-image files are skipped with one warning that counts them (and names the first
few). Labels that would be ambiguous or unprintable (two folder names equal after Unicode
normalisation, control characters such as a newline) are refused.
"""

import random
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from mcti.data.images import load_image, pil_to_tensor  # noqa: F401 (also imported from here)
from mcti.errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# What reading a file can raise (ImageRefused is a ValueError): the file is skipped and counted.
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


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


def scan_folder(root: str | Path, min_classes: int = 2, quiet: bool = False) -> ImageFolder:
    """List `root/<label>/*` images; labels sorted so class indices are stable."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder '{root}' does not exist")
    classes, paths, labels, dropped = [], [], [], []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        name = label_dir.name
        if name.startswith("."):
            dropped.append(f"'{name}' (hidden: the name starts with '.')")
            continue
        entries = [e for e in label_dir.iterdir() if not e.name.startswith(".")]
        files = sorted(e for e in entries if e.is_file())
        subdirs = sorted(e.name for e in entries if e.is_dir())
        if not files:
            why = "only sub-folders: images must sit directly in it" if subdirs else "empty"
            dropped.append(f"'{name}' ({why})")
            continue
        if subdirs and not quiet:
            print(
                f"warning: class folder '{name}' has sub-folder(s) whose files are not used: "
                + ", ".join(f"'{s}'" for s in subdirs[:3])
                + (" ..." if len(subdirs) > 3 else ""),
                file=sys.stderr,
            )
        classes.append(name)
        for f in files:
            paths.append(str(f.relative_to(root)))
            labels.append(len(classes) - 1)
    check_labels(classes)
    if dropped and not quiet:
        for d in dropped:
            print(f"warning: class folder {d} in '{root}' is not used", file=sys.stderr)
    skipped = f" (not used: {', '.join(dropped)})" if dropped else ""
    if len(classes) == 0:
        raise UserError(
            f"data folder '{root}' is empty: expected {root}/<label>/<image files>{skipped}"
        )
    if len(classes) < min_classes:
        raise UserError(
            f"data folder '{root}' has {len(classes)} class; need at least {min_classes} "
            f"(one sub-folder per class){skipped}"
        )
    return ImageFolder(root, classes, paths, labels)


def check_labels(classes: list[str]) -> None:
    """Refuse labels a user could not tell apart or print: equal after NFC normalisation, or
    holding control characters (a newline would split classes.json listings and log lines)."""
    seen: dict[str, str] = {}
    for name in classes:
        bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")]
        if bad:
            raise UserError(
                f"class folder {name!r} has a control character or undecodable byte "
                f"({bad[0]!r}) in its name: rename it"
            )
        key = unicodedata.normalize("NFC", name)
        if key in seen:
            raise UserError(
                f"class folders {seen[key]!r} and {name!r} differ only in Unicode normalisation "
                "(NFC vs NFD): they would be two labels that look the same; merge or rename them"
            )
        seen[key] = name


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


def _read(data: ImageFolder, i: int, size: int) -> torch.Tensor | None:
    try:
        return load_image(data.root / data.paths[i], size)
    except UNREADABLE:
        return None


def _warn_skipped(data: ImageFolder, bad: list[str], quiet: bool, note: str = "") -> None:
    if bad:
        data.skipped += bad
        if not quiet:
            names = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
            print(
                f"warning: skipped {len(bad)} unreadable image file(s){note}: {names}",
                file=sys.stderr,
            )


def load_images(
    data: ImageFolder, indices: list[int], size: int, quiet: bool = False
) -> tuple[torch.Tensor, list[int]]:
    """Load `indices`; unreadable files are skipped and counted. Returns (N, 3, H, W), kept."""
    images, kept, bad = [], [], []
    for i in indices:
        x = _read(data, i, size)
        if x is None:
            bad.append(data.paths[i])
        else:
            images.append(x)
            kept.append(i)
    _warn_skipped(data, bad, quiet)
    if not images:
        raise UserError(f"no readable images among {len(indices)} file(s) in '{data.root}'")
    return torch.stack(images), kept


def load_shots(
    data: ImageFolder, picked: list[int], seed: int, size: int, quiet: bool = False
) -> tuple[torch.Tensor, list[int]]:
    """Load the picked shots; an unreadable one is replaced by a readable file of its class.

    Replacements are tried among the class's unpicked files in an order fixed by `seed` (one
    stream per class), so the result is reproducible, and it is `picked` itself when every
    file reads. A class runs short only when it has no readable file left.
    Returns (N, 3, H, W) and the indices kept, in pick order.
    """
    unpicked: dict[int, list[int]] = {}
    chosen = set(picked)
    for i, y in enumerate(data.labels):
        if i not in chosen:
            unpicked.setdefault(y, []).append(i)
    for y, rest in unpicked.items():
        random.Random(f"mcti.load_shots:{seed}:{y}").shuffle(rest)
        rest.reverse()  # pop() takes them in shuffled order
    read: dict[int, torch.Tensor | None] = {}  # a file picked twice (CoOp repeats) is read once
    images, kept, bad = [], [], []
    for i in picked:
        while i is not None:
            if i not in read:
                read[i] = _read(data, i, size)
                if read[i] is None:
                    bad.append(data.paths[i])
            if read[i] is not None:
                images.append(read[i])
                kept.append(i)
                break
            spare = unpicked.get(data.labels[i])
            i = spare.pop() if spare else None
    _warn_skipped(data, bad, quiet, " (replaced by other files of their class where possible)")
    if not images:
        raise UserError(f"no readable images among {len(data)} file(s) in '{data.root}'")
    return torch.stack(images), kept
