"""The paper's few-shot benchmarks on a user's disk, read as opaque-label image folders.

`--data` takes either a plain image-folder tree `DIR/<label>/<image>` or `coop:<name>:<root>`,
a dataset laid out as CoOp (Zhou et al., github.com/KaiyangZhou/CoOp, DATASETS.md) expects it:
`<root>` is CoOp's DATASET.ROOT (the folder holding e.g. `caltech-101/`) or that dataset folder
itself. `coop:<name>@<split>:<root>` picks a split other than the command's default.

Most datasets come with a split file `split_zhou_<Name>.json` = {"train"|"val"|"test": [[relative
path, integer label, class name], ...]}; ImageNet is read from `images/{train,val}/<wnid>/` (label =
index of the sorted wnid folders, val doubles as test, as in CoOp) and FGVCAircraft from
`variants.txt` + `images_variant_<split>.txt` (label = line of the variant in variants.txt).
Class names are read at most to map a line to its integer label: a class key is that integer,
zero-padded ("042"), so no name reaches the text encoder and train/test splits share keys.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mcti.data.folders import ImageFolder, few_shot, scan_folder
from mcti.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Layout:
    """Where CoOp keeps one dataset: ROOT/<folder>/<images>/... and its split file beside them."""

    folder: str
    """Dataset folder under CoOp's DATASET.ROOT."""
    images: str
    """Image folder inside it ('' = the dataset folder); split-file paths are relative to it."""
    coop_class: str
    """CoOp's class name for it, which names the split file split_zhou_<coop_class>.json."""


# Keys = CoOp's config names (configs/datasets/*.yaml); CoOp's class names are accepted too.
LAYOUTS = {
    "imagenet": Layout("imagenet", "images", "ImageNet"),
    "caltech101": Layout("caltech-101", "101_ObjectCategories", "Caltech101"),
    "oxford_pets": Layout("oxford_pets", "images", "OxfordPets"),
    "stanford_cars": Layout("stanford_cars", "", "StanfordCars"),
    "oxford_flowers": Layout("oxford_flowers", "jpg", "OxfordFlowers"),
    "food101": Layout("food-101", "images", "Food101"),
    "fgvc_aircraft": Layout("fgvc_aircraft", "images", "FGVCAircraft"),
    "sun397": Layout("sun397", "SUN397", "SUN397"),
    "dtd": Layout("dtd", "images", "DescribableTextures"),
    "eurosat": Layout("eurosat", "2750", "EuroSAT"),
    "ucf101": Layout("ucf101", "UCF-101-midframes", "UCF101"),
}
ALIASES = {
    "pets": "oxford_pets",
    "cars": "stanford_cars",
    "flowers": "oxford_flowers",
    "flowers102": "oxford_flowers",
    "aircraft": "fgvc_aircraft",
}


@dataclass
class BenchmarkFolder(ImageFolder):
    """An ImageFolder read from a benchmark's split; `paths` keep the split file's order."""

    benchmark: str = ""
    split: str = ""


def dataset_name(name: str) -> str:
    """Canonical key of LAYOUTS for a user-typed name ('Caltech101', 'oxford-pets', 'dtd', ...)."""
    key = name.strip().lower().replace("-", "_")
    if key in LAYOUTS:
        return key
    squashed = key.replace("_", "")
    for k, layout in LAYOUTS.items():
        if squashed in (k.replace("_", ""), layout.coop_class.lower()):
            return k
    if squashed in ALIASES:
        return ALIASES[squashed]
    raise UserError(f"unknown dataset '{name}' in --data coop:...: known are {', '.join(LAYOUTS)}")


def parse_spec(spec: str, split: str) -> tuple[str, str, Path]:
    """'coop:<name>[@<split>]:<root>' -> (name, split, root). The root may itself contain ':'."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise UserError(
            f"--data '{spec}': expected coop:<dataset>:<root>, e.g. coop:caltech101:/data"
        )
    name, _, override = parts[1].partition("@")
    split = override or split
    if split not in SPLITS:
        raise UserError(f"--data '{spec}': split '{split}' is not one of {', '.join(SPLITS)}")
    return dataset_name(name), split, Path(parts[2]).expanduser()


def open_dataset(spec: str, split: str = "train", min_classes: int = 2) -> ImageFolder:
    """A plain folder `DIR/<label>/<image>` (split ignored) or a benchmark `coop:<name>:<root>`."""
    if not spec.startswith("coop:"):
        return scan_folder(spec, min_classes=min_classes)
    name, split, root = parse_spec(spec, split)
    layout = LAYOUTS[name]
    split_file = f"split_zhou_{layout.coop_class}.json"
    markers = {"imagenet": ["images"], "fgvc_aircraft": ["variants.txt", split_file]}
    ds_dir = _dataset_dir(root, layout, name, markers.get(name, [split_file]))
    image_dir = ds_dir / layout.images if layout.images else ds_dir
    if name == "imagenet":
        items = _imagenet_items(image_dir, split)
    elif (ds_dir / split_file).is_file():
        items = _split_items(ds_dir / split_file, split)
    else:  # FGVCAircraft without a split file: CoOp's own reader
        items = _aircraft_items(ds_dir, split)
    if not image_dir.is_dir():
        raise UserError(f"{name}: image folder '{image_dir}' does not exist")
    data = _to_folder(items, image_dir, name, split)
    if len(data.classes) < min_classes:
        raise UserError(
            f"{name} {split} split has {len(data.classes)} class; need at least {min_classes}"
        )
    first = image_dir / data.paths[0]
    if not first.is_file():  # one stat catches a wrong root without walking the whole split
        raise UserError(
            f"{name}: the {split} split lists '{data.paths[0]}' but '{first}' does not exist "
            f"(expected the images under '{image_dir}')"
        )
    return data


def coop_few_shot(data: ImageFolder, shots: int, seed: int, repeat: bool = True) -> list[int]:
    """CoOp's few-shot pick: Dassl's `generate_fewshot_dataset` after `random.seed(seed)`.

    Classes in order of first appearance in the split, `random.sample(items, shots)` each; a class
    with fewer items is drawn with replacement (`random.choices`, Dassl's default repeat=True).
    Returned indices follow that order, so with the split file's item order (which
    BenchmarkFolder keeps) the same seed picks the same files as CoOp.
    """
    if shots < 1:
        raise UserError(f"--shots must be >= 1, not {shots}")
    rng = random.Random(seed)  # same stream as the module-level random after random.seed(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(data.labels):
        by_label.setdefault(y, []).append(i)
    picked = []
    for idx in by_label.values():
        if len(idx) >= shots:
            picked += rng.sample(idx, shots)
        elif repeat:
            picked += rng.choices(idx, k=shots)
        else:
            picked += idx
    return picked


def pick_shots(data: ImageFolder, shots: int, seed: int) -> list[int]:
    """CoOp's sampling for a benchmark split, mcti.data.few_shot for a plain folder."""
    if isinstance(data, BenchmarkFolder):
        return coop_few_shot(data, shots, seed)
    return few_shot(data, shots, seed)


def _dataset_dir(root: Path, layout: Layout, name: str, markers: list[str]) -> Path:
    """CoOp's ROOT/<folder>, or ROOT itself when the user pointed at the dataset folder."""
    for d in (root / layout.folder, root):
        if any((d / m).exists() for m in markers):
            return d
    raise UserError(
        f"{name}: no {' or '.join(repr(m) for m in markers)} in '{root / layout.folder}' or "
        f"'{root}' (CoOp layout: ROOT/{layout.folder}/{markers[0]}; see CoOp's DATASETS.md)"
    )


def _split_items(split_file: Path, split: str) -> list[tuple[str, int]]:
    try:
        table = json.loads(split_file.read_text())
    except FileNotFoundError as e:
        raise UserError(f"split file '{split_file}' does not exist") from e
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read split file '{split_file}': {e}") from e
    if not isinstance(table, dict) or not isinstance(table.get(split), list):
        raise UserError(f"split file '{split_file}' has no '{split}' list")
    items = []
    for entry in table[split]:
        # [relative path, label, class name]; the name is deliberately dropped here
        ok = isinstance(entry, list | tuple) and len(entry) == 3 and isinstance(entry[0], str)
        if not ok or isinstance(entry[1], bool) or not isinstance(entry[1], int):
            raise UserError(f"split file '{split_file}': bad '{split}' entry {entry!r}")
        items.append((entry[0], entry[1]))
    return items


def _imagenet_items(image_dir: Path, split: str) -> list[tuple[str, int]]:
    """CoOp's ImageNet: images/<train|val>/<wnid>/<file>, label = sorted wnid index."""
    sub = "train" if split == "train" else "val"  # CoOp evaluates (and validates) on val
    split_dir = image_dir / sub
    if not split_dir.is_dir():
        raise UserError(f"imagenet: '{split_dir}' does not exist (expected images/{sub}/<wnid>/)")
    wnids = _subdirs(image_dir / "train") if (image_dir / "train").is_dir() else _subdirs(split_dir)
    index = {w: k for k, w in enumerate(wnids)}
    items = []
    for w in _subdirs(split_dir):
        if w not in index:
            raise UserError(
                f"imagenet: folder '{split_dir / w}' has no counterpart in images/train"
            )
        # CoOp lists files unsorted (filesystem order); sorted keeps picks machine-independent
        for f in sorted(p.name for p in (split_dir / w).iterdir() if not p.name.startswith(".")):
            items.append((f"{sub}/{w}/{f}", index[w]))
    return items


def _aircraft_items(ds_dir: Path, split: str) -> list[tuple[str, int]]:
    """CoOp's FGVCAircraft: label = line of the variant in variants.txt; images/<id>.jpg."""
    variants = [v.strip() for v in (ds_dir / "variants.txt").read_text().splitlines() if v.strip()]
    index = {v: k for k, v in enumerate(variants)}
    list_file = ds_dir / f"images_variant_{split}.txt"
    if not list_file.is_file():
        raise UserError(f"fgvc_aircraft: split list '{list_file}' does not exist")
    items = []
    for line in list_file.read_text().splitlines():
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in index:
            raise UserError(f"fgvc_aircraft: '{list_file}' names a variant not in variants.txt")
        items.append((f"{image_id}.jpg", index[variant]))
    return items


def _subdirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _to_folder(items: list[tuple[str, int]], image_dir: Path, name: str, split: str) -> ImageFolder:
    if not items:
        raise UserError(f"{name}: the {split} split is empty")
    for rel, _ in items:
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts:
            raise UserError(f"{name}: split path '{rel}' leaves the image folder")
    present = sorted({y for _, y in items})
    if present[0] < 0:
        raise UserError(f"{name}: negative label {present[0]} in the {split} split")
    width = max(3, len(str(present[-1])))
    keys = {y: f"{y:0{width}d}" for y in present}  # opaque: the label number, never its name
    pos = {y: k for k, y in enumerate(present)}
    return BenchmarkFolder(
        root=image_dir,
        classes=[keys[y] for y in present],
        paths=[rel for rel, _ in items],
        labels=[pos[y] for _, y in items],
        benchmark=name,
        split=split,
    )
