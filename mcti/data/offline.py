"""Offline real datasets, their fixed pretraining / held-out split, and image-folder export.

Three public datasets that are installed locally (never downloaded at run time):
- `animal-mnist` (PyPI `animal-mnist`, MIT): 10 animal silhouettes x 1000, 28x28 grey;
- `fashion-mnist` (Debian `dataset-fashion-mnist`, MIT): idx files, 60k train + 10k test;
- `digits` (scikit-learn `load_digits`, BSD): 1797 8x8 handwritten digits.

The split (seeded, fixed by `SPLIT_SEED`) is the contract between `mcti pretrain` and every
evaluation: *novel* classes never appear in pretraining; of the *seen* classes, held-out images
(Fashion-MNIST: its test split; others: a seeded per-class slice) are never used in
pretraining. Folders given to the method use opaque keys (`c00`, `c01`, ...); the true names go
to a separate `names.json` read only by the true-name baseline.
"""

import gzip
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcti.errors import UserError

SPLIT_SEED = 1234
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

NAMES = {
    # animal_mnist stores labels 0-9 in the alphabetical order of its README's class list
    "animal-mnist": "bear bird cat cow dog elephant giraffe horse sheep zebra".split(),
    "fashion-mnist": [
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ],
    "digits": "zero one two three four five six seven eight nine".split(),
}
# Classes never seen in pretraining (indices into NAMES[dataset]).
NOVEL = {"animal-mnist": [1, 5, 9], "fashion-mnist": [5, 8], "digits": []}
# Held-out images per class for seen classes (Fashion-MNIST uses its own test split).
HELD_OUT = {"animal-mnist": 200, "digits": 50}
# Horizontal flips keep the class (animals facing left/right, clothes); not for digits.
FLIP_OK = {"animal-mnist": True, "fashion-mnist": True, "digits": False}
INSTALL_HINT = {
    "animal-mnist": "pip install --no-deps animal-mnist",
    "fashion-mnist": "apt-get install -y dataset-fashion-mnist",
    "digits": "pip install scikit-learn",
}


@dataclass
class Split:
    """One dataset as grey uint8 images with its fixed split."""

    name: str
    images: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int class index
    names: list[str]  # true class names, by index
    novel: list[int]  # class indices never used in pretraining
    pretrain: np.ndarray  # indices usable for pretraining (seen classes only)
    held_out: np.ndarray  # indices never used in pretraining (all classes)

    @property
    def seen(self) -> list[int]:
        return [k for k in range(len(self.names)) if k not in self.novel]


def _animal() -> tuple[np.ndarray, np.ndarray]:
    try:
        import animal_mnist
    except ImportError as e:
        raise UserError(f"animal-mnist is not installed: {INSTALL_HINT['animal-mnist']}") from e
    root = Path(animal_mnist.__file__).parent / "data" / "Animal_MNIST"
    with gzip.open(root / "animal_data_version_3.gz", "rb") as f:
        x = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(root / "animal_label_version_3.gz", "rb") as f:
        y = np.asarray(pickle.load(f), dtype=np.int64)
    return x, y


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise UserError(
            f"Fashion-MNIST not found in {FASHION_DIR}: {INSTALL_HINT['fashion-mnist']}"
        )
    parts = [
        (
            _idx(FASHION_DIR / f"{s}-images-idx3-ubyte.gz"),
            _idx(FASHION_DIR / f"{s}-labels-idx1-ubyte.gz"),
        )
        for s in ("train", "t10k")
    ]
    x = np.concatenate([parts[0][0], parts[1][0]])
    y = np.concatenate([parts[0][1], parts[1][1]]).astype(np.int64)
    is_test = np.r_[np.zeros(len(parts[0][1]), bool), np.ones(len(parts[1][1]), bool)]
    return x, y, is_test


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8)  # values 0-16 -> 0-255
    return x, d.target.astype(np.int64)


def load_split(name: str) -> Split:
    """Load one dataset with its fixed pretraining / held-out split."""
    if name not in NAMES:
        raise UserError(f"unknown dataset '{name}'; choose from {', '.join(NAMES)}")
    rng = np.random.default_rng(SPLIT_SEED)
    novel = NOVEL[name]
    if name == "fashion-mnist":
        x, y, is_test = _fashion()
        held = np.flatnonzero(is_test | np.isin(y, novel))
        pre = np.flatnonzero(~is_test & ~np.isin(y, novel))
    else:
        x, y = _animal() if name == "animal-mnist" else _digits()
        held_parts, pre_parts = [], []
        for k in range(len(NAMES[name])):
            idx = rng.permutation(np.flatnonzero(y == k))  # labels are stored sorted: shuffle
            n = len(idx) if k in novel else HELD_OUT[name]
            held_parts.append(idx[:n])
            pre_parts.append(idx[n:])
        held, pre = np.sort(np.concatenate(held_parts)), np.sort(np.concatenate(pre_parts))
    assert not np.intersect1d(held, pre).size
    return Split(name, x, y, NAMES[name], novel, pre, held)


def held_out_sample(split: Split, classes: list[int], per_class: int, seed: int) -> np.ndarray:
    """`per_class` held-out indices of each class in `classes` (seeded; all if fewer)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in classes:
        idx = split.held_out[split.labels[split.held_out] == k]
        out.append(np.sort(rng.permutation(idx)[:per_class]))
    return np.concatenate(out)


def write_folder(
    split: Split, indices: np.ndarray, out: str | Path, size: int = 28
) -> dict[str, str]:
    """Write images as OUT/<opaque key>/<dataset>-<index>.png; returns {key: true name}.

    Keys are `c00`, `c01`, ... in the order of the classes present (never the names); the
    name mapping is also written to OUT/../<OUT name>.names.json, outside the data folder,
    for the true-name baseline only.
    """
    from PIL import Image

    out = Path(out)
    classes = sorted(set(split.labels[indices].tolist()))
    keys = {k: f"c{i:02d}" for i, k in enumerate(classes)}
    for i in indices.tolist():
        d = out / keys[int(split.labels[i])]
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(split.images[i])
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        im.convert("RGB").save(d / f"{split.name}-{i:05d}.png")
    mapping = {keys[k]: split.names[k] for k in classes}
    meta = {
        "dataset": split.name,
        "names": mapping,
        "novel": [keys[k] for k in classes if k in split.novel],
    }
    names_file(out).write_text(json.dumps(meta, indent=2) + "\n")
    return mapping


def names_file(folder: str | Path) -> Path:
    """Where `write_folder` records the true names of a folder's opaque keys."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}.names.json"
