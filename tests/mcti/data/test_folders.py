"""Image folders: no class folder dropped without a word, ambiguous labels refused, and shots
drawn among readable files only."""

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcti.cli import main
from mcti.data.folders import few_shot, load_shots, scan_folder
from mcti.errors import UserError
from tests.conftest import make_image_folder


def png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_left_out_class_folders_are_named(tmp_path, capsys):
    root = tmp_path / "data"
    png(root / "a" / "1.png")
    png(root / "b" / "1.png")
    (root / "empty").mkdir()
    png(root / ".hidden" / "1.png")
    png(root / "nested" / "inner" / "1.png")  # images one level down
    png(root / "mixed" / "1.png")
    png(root / "mixed" / "more" / "2.png")  # used: 1.png; not used: more/
    data = scan_folder(root)
    assert data.classes == ["a", "b", "mixed"]
    err = capsys.readouterr().err
    for words in ["'empty' (empty)", "'.hidden' (hidden", "'nested' (only sub-folders", "'more'"]:
        assert words in err, err
    assert scan_folder(root, quiet=True).classes == data.classes
    assert capsys.readouterr().err == ""


def test_too_few_classes_left_names_the_folders_left_out(tmp_path):
    root = tmp_path / "data"
    png(root / "a" / "1.png")
    (root / "empty").mkdir()
    png(root / "nested" / "inner" / "1.png")
    with pytest.raises(UserError, match="need at least 2") as e:
        scan_folder(root, quiet=True)
    assert "'empty'" in str(e.value) and "'nested'" in str(e.value)


@pytest.mark.parametrize(
    "names,words",
    [
        ([unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")], "NFC"),
        (["cat", "line\nbreak"], "control character"),
        (["cat", "tab\there"], "control character"),
    ],
)
def test_ambiguous_or_unprintable_labels_are_refused(tmp_path, names, words):
    root = tmp_path / "data"
    for name in names:
        png(root / name / "1.png")
    assert len({p.name for p in root.iterdir()}) == len(names)  # the filesystem keeps both
    with pytest.raises(UserError, match=words):
        scan_folder(root, quiet=True)


def test_unreadable_shots_are_replaced_by_readable_files(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", n_classes=2, per_class=6, size=8)
    data = scan_folder(root)
    picked = few_shot(data, 3, seed=0)
    # all readable: exactly today's pick, in its order
    _, kept = load_shots(data, picked, seed=0, size=8)
    assert kept == picked and capsys.readouterr().err == ""
    # two of class 0's picks break: two of its unpicked files take their places
    broken = [i for i in picked if data.labels[i] == 0][:2]
    for i in broken:
        (root / data.paths[i]).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    pixels, kept = load_shots(data, picked, seed=0, size=8)
    assert pixels.shape == (6, 3, 8, 8)
    assert [data.labels[i] for i in kept] == [0, 0, 0, 1, 1, 1]
    assert not set(kept) & set(broken) and len(set(kept)) == 6
    assert "skipped 2 unreadable image file(s)" in capsys.readouterr().err
    assert load_shots(data, picked, seed=0, size=8)[1] == kept  # reproducible
    assert any(load_shots(data, picked, seed=s, size=8)[1] != kept for s in range(1, 6))


def test_train_uses_every_readable_shot(tmp_path, capsys):
    """A class with 3 readable and 2 broken files, --shots 3: trained on its 3 readable ones."""
    root = make_image_folder(tmp_path / "data", n_classes=2, per_class=5, size=16)
    data = scan_folder(root)
    seed = next(s for s in range(50) if len({0, 1} & set(few_shot(data, 3, s))) == 2)
    for i in (0, 1):  # both broken files are among class 0's picks for this seed
        (root / data.paths[i]).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    argv = ["train", "--model", "tiny-random", "--data", str(root), "--out", str(tmp_path / "t")]
    argv += ["--shots", "3", "--seed", str(seed), "--steps", "1", "--batch-size", "2"]
    argv += ["--draws", "1", "--negatives", "1", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    assert "skipped 2 unreadable" in capsys.readouterr().err
    meta = json.loads((tmp_path / "t" / "classes.json").read_text())
    class0 = sorted(f for f in meta["train_files"] if f.startswith("sku-0000/"))
    assert class0 == [data.paths[i] for i in (2, 3, 4)] and len(meta["train_files"]) == 6
