"""`mcti demo --quick`: the end-to-end path writes its files and an honest summary."""

import json
from pathlib import Path

import pytest

from mcti.cli import main


def _has_animal() -> bool:
    try:
        import animal_mnist  # noqa: F401

        return True
    except ImportError:
        return False


def test_demo_defaults_to_the_embedded_model():
    from mcti.cli.demo import DemoArgs

    assert DemoArgs().model == "embedded" and DemoArgs().shots == 5


@pytest.mark.skipif(not _has_animal(), reason="animal-mnist not installed")
def test_quick_demo_writes_outputs_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--quick", "--model", "tiny-random", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("confusion", "samples", "summary", "tokens", "data"):
        assert Path(s["files"][key]).exists(), key
    # PNGs are real images
    from PIL import Image

    with Image.open(out / "samples.png") as im:
        assert im.width > 64 and im.height >= 3 * 64
    with Image.open(out / "confusion.png") as im:
        assert im.format == "PNG"
    # the method saw only opaque keys; the names live outside the data folder
    keys = sorted(p.name for p in (out / "data").iterdir())
    assert keys == ["c00", "c01", "c02"]
    assert set(s["classes"]) == set(keys) and set(s["classes"].values()) == {"bear", "bird", "cat"}
    assert s["novel_classes"] == ["c01"]  # bird is a novel (never pretrained) class
    classes_json = json.loads((out / "tokens" / "classes.json").read_text())
    assert not set(classes_json["classes"]) & set(s["classes"].values())
    # accuracy agrees with the per-class numbers (4 test images per class, none a shot)
    assert 0.0 <= s["accuracy"] <= 1.0 and s["n_eval_images"] == 12
    assert abs(s["accuracy"] - sum(s["per_class"].values()) / 3) < 1e-9
    shots = set(classes_json["train_files"])
    assert len(shots) == 15 and len(list((out / "data").rglob("*.png"))) == 27
    printed = capsys.readouterr().out
    assert "summary.json" in printed and "diffusion scorer" in printed
    # a second run refuses to overwrite unless --force
    assert main(["demo", "--quick", "--model", "tiny-random", "--out", str(out)]) == 2
