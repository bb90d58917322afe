"""`mcti demo --quick`: the end-to-end path writes its files and an honest summary (its
refusals of bad settings and output paths are in test_cli.py's one-line-error cases)."""

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
    # the summary holds every figure the table shows, each a fraction, and how it was made
    assert set(s) >= {
        "dataset", "model", "classes", "novel_classes", "accuracy", "per_class",
        "clip_accuracy", "pixels_logreg_accuracy", "true_names_zero_shot_accuracy",
        "fused_accuracy", "fused_ece", "cache_accuracy", "linear_probe_accuracy",
        "nearest_class_mean_accuracy",
        "n_eval_images", "seen_accuracy", "novel_accuracy", "seconds", "settings", "files",
    }  # fmt: skip
    # tiny-random has a CLIP tower: clip, fused, the cache and the feature references are scored
    for key in (
        "clip_accuracy", "pixels_logreg_accuracy", "seen_accuracy", "novel_accuracy",
        "fused_accuracy", "fused_ece", "cache_accuracy", "linear_probe_accuracy",
        "nearest_class_mean_accuracy",
    ):  # fmt: skip
        assert isinstance(s[key], float) and 0.0 <= s[key] <= 1.0, key
    assert s["true_names_zero_shot_accuracy"] is None  # only with --reference
    assert (s["dataset"], s["model"]) == ("animal-mnist", "tiny-random")
    assert s["novel_accuracy"] == s["per_class"]["c01"]  # one novel class: its own accuracy
    assert abs(s["seen_accuracy"] - (s["per_class"]["c00"] + s["per_class"]["c02"]) / 2) < 1e-9
    times = s["seconds"]
    assert set(times) == {"data_s", "train_s", "eval_s", "generate_s", "total_s"}
    assert all(v >= 0 for v in times.values()) and times["total_s"] >= times["train_s"]
    # --quick's settings were the ones used, and the tokens were trained with them
    st = s["settings"]
    assert (st["quick"], st["steps"], st["eval_per_class"], st["n_samples"]) == (True, 3, 4, "2,4")
    assert classes_json["steps"] == 3 and classes_json["method"] == st["method"] == "mcti"
    assert classes_json["settings"]["reg"] == st["reg"] == "clip"
    assert classes_json["settings"]["gamma"] == st["gamma"] and st["negatives"] == 1
    printed = capsys.readouterr().out
    assert "summary.json" in printed and "diffusion scorer" in printed
    assert "fused scorer" in printed and "linear probe" in printed and "cache alone" in printed
    # a second run refuses to overwrite unless --force
    assert main(["demo", "--quick", "--model", "tiny-random", "--out", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
