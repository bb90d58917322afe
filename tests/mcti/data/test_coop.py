"""CoOp benchmark layouts on small fake trees: labels, paths, opaque keys, CoOp's shot sampling."""

import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcti.data.coop import LAYOUTS, coop_few_shot, open_dataset, pick_shots
from mcti.data.folders import ImageFolder, few_shot, load_images
from mcti.errors import UserError

# Class names a split file carries; none may come out of open_dataset.
NAMES = ["accordion", "Abyssinian", "banded", "Forest", "dog_face"]


def png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def split_tree(image_dir: Path, split_file: Path, counts: dict, labels: list[int], seed=0) -> dict:
    """Images for `labels` (label -> class NAMES[i]) and a CoOp split file listing them, in a
    shuffled order (as CoOp's files are: grouped neither by class nor by name)."""
    rng = random.Random(seed)
    table = {}
    for split, n in counts.items():
        rows = []
        for i, y in enumerate(labels):
            name = NAMES[i % len(NAMES)]
            for j in range(n):
                rel = f"{name}/{split}_{j:02d}.png"
                png(image_dir / rel, 10 * i + j)
                rows.append([rel, y, name.lower()])
        rng.shuffle(rows)
        table[split] = rows
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text(json.dumps(table))
    return table


def dassl_few_shot(rows: list, num_shots: int, seed: int) -> list:
    """Reference: Dassl's generate_fewshot_dataset (repeat=True) on Datum-like rows after
    `random.seed(seed)`, as CoOp runs it."""
    state = random.getstate()  # leave the global stream as other tests found it
    random.seed(seed)
    tracker = defaultdict(list)
    for item in rows:
        tracker[item[1]].append(item)
    out = []
    for items in tracker.values():
        if len(items) >= num_shots:
            out.extend(random.sample(items, num_shots))
        else:
            out.extend(random.choices(items, k=num_shots))
    random.setstate(state)
    return out


def check_against(data: ImageFolder, rows: list, image_dir: Path) -> None:
    assert data.root == image_dir
    assert data.paths == [r[0] for r in rows]  # the split file's order is kept
    assert [int(data.classes[y]) for y in data.labels] == [r[1] for r in rows]
    assert all(c.isdigit() and len(c) == 3 for c in data.classes)
    assert data.classes == sorted(data.classes)
    for c in data.classes:
        assert all(n.lower() not in c.lower() for n in NAMES)


@pytest.mark.parametrize(
    "name, folder, images, split_name",
    [
        ("caltech101", "caltech-101", "101_ObjectCategories", "Caltech101"),
        ("oxford_pets", "oxford_pets", "images", "OxfordPets"),
        ("eurosat", "eurosat", "2750", "EuroSAT"),
        ("dtd", "dtd", "images", "DescribableTextures"),
        ("stanford_cars", "stanford_cars", "", "StanfordCars"),
    ],
)
def test_split_file_datasets(tmp_path, name, folder, images, split_name):
    ds = tmp_path / folder
    image_dir = ds / images if images else ds
    labels = [0, 3, 7, 12]  # gaps: keys are the label numbers, not positions
    table = split_tree(
        image_dir, ds / f"split_zhou_{split_name}.json", {"train": 6, "val": 2, "test": 3}, labels
    )
    for split in ("train", "val", "test"):
        data = open_dataset(f"coop:{name}:{tmp_path}", split)
        check_against(data, table[split], image_dir)
        assert data.classes == ["000", "003", "007", "012"]
    # the dataset folder itself works as root too, and @split overrides the default split
    data = open_dataset(f"coop:{name}@test:{ds}")
    check_against(data, table["test"], image_dir)
    # paths resolve: every listed image loads, each with its own pixel value
    pixels, kept = load_images(data, list(range(len(data))), size=8, quiet=True)
    assert kept == list(range(len(data)))
    assert pixels.shape == (len(data), 3, 8, 8)


def test_keys_shared_across_splits_when_a_split_lacks_a_class(tmp_path):
    ds = tmp_path / "eurosat"
    table = split_tree(ds / "2750", ds / "split_zhou_EuroSAT.json", {"train": 3}, [0, 1, 2])
    table["test"] = [r for r in table["train"] if r[1] != 1]
    (ds / "split_zhou_EuroSAT.json").write_text(json.dumps(table))
    train = open_dataset(f"coop:eurosat:{tmp_path}", "train")
    test = open_dataset(f"coop:EuroSAT:{tmp_path}", "test")
    assert train.classes == ["000", "001", "002"]
    assert test.classes == ["000", "002"]  # same key for the same label in both splits
    for i, p in enumerate(test.paths):
        assert test.classes[test.labels[i]] == train.classes[train.labels[train.paths.index(p)]]


def test_imagenet_folders(tmp_path):
    img = tmp_path / "imagenet" / "images"
    wnids = ["n01440764", "n01443537", "n01484850"]
    for k, w in enumerate(wnids):
        for j in range(4):
            png(img / "train" / w / f"{w}_{j}.JPEG", 20 * k + j)
        for j in range(2):
            png(img / "val" / w / f"ILSVRC2012_val_{k}{j}.JPEG", 20 * k + j)
    # CoOp's classnames.txt holds the names; it is never needed nor read
    (tmp_path / "imagenet" / "classnames.txt").write_text(
        "\n".join(f"{w} {n}" for w, n in zip(wnids, NAMES, strict=False))
    )
    train = open_dataset(f"coop:imagenet:{tmp_path}", "train")
    assert train.root == img
    assert train.classes == ["000", "001", "002"]
    assert len(train) == 12
    for p, y in zip(train.paths, train.labels, strict=True):
        assert p.startswith("train/") and p.split("/")[1] == wnids[y]
    for split in ("val", "test"):  # CoOp evaluates on val
        data = open_dataset(f"coop:imagenet:{tmp_path}", split)
        assert len(data) == 6 and all(p.startswith("val/") for p in data.paths)
        assert [wnids[y] for y in data.labels] == [p.split("/")[1] for p in data.paths]
    assert all(w not in c for c in train.classes for w in wnids)
    # a val folder with no training counterpart cannot be labelled consistently
    png(img / "val" / "n99999999" / "x.JPEG", 1)
    with pytest.raises(UserError, match="n99999999"):
        open_dataset(f"coop:imagenet:{tmp_path}", "test")


def test_fgvc_aircraft_variant_lists(tmp_path):
    ds = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (ds / "images").mkdir(parents=True)
    (ds / "variants.txt").write_text("\n".join(variants) + "\n")
    lines = []
    for k, v in enumerate(variants[::-1]):  # listed out of variants.txt order
        for j in range(3):
            image_id = f"{1000 + 10 * k + j:07d}"
            png(ds / "images" / f"{image_id}.jpg", k)
            lines.append(f"{image_id} {v}")
    (ds / "images_variant_train.txt").write_text("\n".join(lines) + "\n")
    data = open_dataset(f"coop:fgvc_aircraft:{tmp_path}", "train")
    assert data.classes == ["000", "001", "002"]
    expect = [variants.index(line.split(" ", 1)[1]) for line in lines]
    assert [int(data.classes[y]) for y in data.labels] == expect
    assert data.paths == [line.split(" ")[0] + ".jpg" for line in lines]
    with pytest.raises(UserError, match="images_variant_test.txt"):
        open_dataset(f"coop:aircraft:{tmp_path}", "test")


def test_coop_few_shot_matches_dassl(tmp_path):
    ds = tmp_path / "oxford_pets"
    table = split_tree(ds / "images", ds / "split_zhou_OxfordPets.json", {"train": 7}, [4, 1, 9, 2])
    data = open_dataset(f"coop:pets:{tmp_path}")
    rows = table["train"]
    for shots in (1, 2, 5):
        for seed in (1, 2, 3):
            picked = coop_few_shot(data, shots, seed)
            assert [data.paths[i] for i in picked] == [
                r[0] for r in dassl_few_shot(rows, shots, seed)
            ]
            assert len(picked) == 4 * shots and len(set(picked)) == 4 * shots
            assert coop_few_shot(data, shots, seed) == picked  # reproducible
            assert pick_shots(data, shots, seed) == picked  # benchmark -> CoOp sampling
    assert coop_few_shot(data, 2, 1) != coop_few_shot(data, 2, 2)
    # more shots than images: Dassl draws with replacement (repeat=True)
    picked = coop_few_shot(data, 10, 0)
    assert [data.paths[i] for i in picked] == [r[0] for r in dassl_few_shot(rows, 10, 0)]
    assert len(picked) == 40 and len(set(picked)) < 40
    assert sorted(data.labels[i] for i in picked) == sorted(list(range(4)) * 10)
    assert len(coop_few_shot(data, 10, 0, repeat=False)) == 28
    with pytest.raises(UserError, match="--shots"):
        coop_few_shot(data, 0, 0)


def test_plain_folder(image_folder):
    data = open_dataset(str(image_folder), "test")  # the split is ignored for a plain folder
    assert data.classes == ["sku-0000", "sku-0001", "sku-0002"]
    assert len(data) == 18
    assert pick_shots(data, 2, 0) == few_shot(data, 2, 0)


def test_errors(tmp_path):
    (tmp_path / "caltech-101" / "101_ObjectCategories").mkdir(parents=True)
    with pytest.raises(UserError, match="split_zhou_Caltech101.json"):
        open_dataset(f"coop:caltech101:{tmp_path}")
    with pytest.raises(UserError, match="unknown dataset 'cifar10'.*caltech101"):
        open_dataset(f"coop:cifar10:{tmp_path}")
    with pytest.raises(UserError, match="expected coop:<dataset>:<root>"):
        open_dataset("coop:caltech101")
    with pytest.raises(UserError, match="split 'dev'"):
        open_dataset(f"coop:caltech101@dev:{tmp_path}")
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(str(tmp_path / "nowhere"))
    split = tmp_path / "caltech-101" / "split_zhou_Caltech101.json"
    split.write_text("{not json")
    with pytest.raises(UserError, match="cannot read split file"):
        open_dataset(f"coop:caltech101:{tmp_path}")
    split.write_text(json.dumps({"train": [["a/b.jpg", 0, "a"], ["c/d.jpg", 1, "c"]]}))
    with pytest.raises(UserError, match="no 'test' list"):
        open_dataset(f"coop:caltech101:{tmp_path}", "test")
    with pytest.raises(UserError, match="a/b.jpg"):  # images not where the split says
        open_dataset(f"coop:caltech101:{tmp_path}")
    for bad in (["../x.jpg", 0, "a"], ["/etc/x.jpg", 0, "a"], ["a.jpg", "0", "a"], ["a.jpg", 0]):
        split.write_text(json.dumps({"train": [bad]}))
        with pytest.raises(UserError, match="caltech101|split file"):
            open_dataset(f"coop:caltech101:{tmp_path}")


def test_every_layout_is_readable(tmp_path):
    """Each split-file dataset opens from its CoOp folder (guards typos in LAYOUTS)."""
    for name, layout in LAYOUTS.items():
        if name in ("imagenet", "fgvc_aircraft"):
            continue
        ds = tmp_path / name / layout.folder
        image_dir = ds / layout.images if layout.images else ds
        split_tree(image_dir, ds / f"split_zhou_{layout.coop_class}.json", {"train": 1}, [0, 1])
        assert len(open_dataset(f"coop:{name}:{tmp_path / name}")) == 2
