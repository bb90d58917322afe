"""`mcti synth`: write the many-class synthetic dataset (mcti.data.synth) as image folders.

    mcti synth --classes 1000 --per-class 25 --seed 0 --out DIR

DIR/train/<label>/*.png (`--train-per-class` images per class), DIR/test/<label>/*.png (the
rest) and DIR/synth.json (the settings and versions that regenerate it byte for byte). The
folder is built beside DIR and renamed into place, so DIR is either complete or untouched.
"""

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from mcti.errors import UserError
from mcti.settings import SynthArgs


def check(a: SynthArgs) -> None:
    from mcti.data.synth import MAX_CLASSES

    if not 1 <= a.classes <= MAX_CLASSES:
        raise UserError(f"--classes must be between 1 and {MAX_CLASSES}, not {a.classes}")
    if a.per_class < 2:
        raise UserError(f"--per-class must be >= 2 (train and test images), not {a.per_class}")
    if not 1 <= a.train_per_class < a.per_class:
        raise UserError(
            f"--train-per-class must be between 1 and --per-class - 1 ({a.per_class - 1}), "
            f"not {a.train_per_class}"
        )
    if not 8 <= a.size <= 1024:
        raise UserError(f"--size must be between 8 and 1024 pixels, not {a.size}")
    out = Path(a.out)
    if out.is_dir() and any(out.iterdir()) and not a.force:
        raise UserError(f"'{out}' is not empty: pass --force to replace it or choose another --out")


def manifest(a: SynthArgs, labels: list[str]) -> dict:
    """Everything that determines the bytes: settings, generator constants and library versions."""
    import numpy
    import PIL

    from mcti.data import synth

    return {
        "generator": "mcti.data.synth",
        "command": (
            f"mcti synth --classes {a.classes} --per-class {a.per_class} "
            f"--train-per-class {a.train_per_class} --seed {a.seed} --size {a.size} --out DIR"
        ),
        "settings": {k: v for k, v in asdict(a).items() if k not in ("out", "force")},
        "font": synth.FONT_FILE + " (matplotlib mpl-data)",
        "glyphs": synth.GLYPHS,
        "palette": ["#{:02x}{:02x}{:02x}".format(*c) for c in synth.PALETTE],
        "glyph_extent": synth.GLYPH_EXTENT,
        "jitter": asdict(synth.Jitter()),
        "versions": {"numpy": numpy.__version__, "pillow": PIL.__version__},
        "labels": {"first": labels[0], "last": labels[-1], "count": len(labels)},
        "splits": {
            "train": a.train_per_class * a.classes,
            "test": (a.per_class - a.train_per_class) * a.classes,
        },
    }


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` folder to `out`, replacing an existing (empty or forced) one."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def run(a: SynthArgs) -> None:
    from tqdm import tqdm

    from mcti.data.synth import font_path, write_synth

    check(a)
    font_path()  # a missing font is a one-line error before any work
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset is an ordinary folder
    try:
        labels = write_synth(
            tmp,
            a.classes,
            a.per_class,
            a.train_per_class,
            a.seed,
            a.size,
            progress=lambda it: tqdm(it, desc="synth", unit="class", dynamic_ncols=True),
        )
        # inside the folder that is renamed into place at once: a plain write is atomic enough
        (tmp / "synth.json").write_text(json.dumps(manifest(a, labels), indent=2) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_train = a.classes * a.train_per_class
    print(
        f"wrote {a.classes} classes to {out}: {n_train} train and "
        f"{a.classes * a.per_class - n_train} test images ({a.size}x{a.size} PNG); "
        f"settings in {out / 'synth.json'}"
    )
