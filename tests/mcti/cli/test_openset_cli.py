"""`mcti eval/classify --reject` and `mcti eval --unknown` end to end on tiny-random."""

import json
import shutil

import pytest
from PIL import Image

from mcti.cli import main
from mcti.core import openset
from tests.conftest import make_image_folder
from tests.mcti.cli.test_cli import run_err

CPU = ["--device", "cpu", "--scorer", "clip"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("openset")
    data = make_image_folder(root / "data", n_classes=3, per_class=8)
    train = ["--model", "tiny-random", "--steps", "2", "--batch-size", "4", "--shots", "4"]
    train += ["--quiet", "--device", "cpu", "--draws", "1", "--negatives", "1"]
    assert main(["train", "--data", str(data), "--out", str(root / "tok"), *train]) == 0
    # unknowns: other colours, in a nested tree, with a non-image and an unreadable image
    other = make_image_folder(root / "other", n_classes=6, per_class=3, seed=1)
    unknown = root / "unknown"
    for k in (3, 4, 5):
        shutil.copytree(other / f"sku-{k:04d}", unknown / "a" / f"deep{k}" / "x")
    (unknown / "notes.txt").write_text("not an image")
    (unknown / "a" / "broken.png").write_bytes(b"not a png")
    return data, root / "tok", unknown


def eval_json(capsys, tok, data, *extra) -> dict:
    assert main(["eval", "--tokens", str(tok), "--data", str(data), "--json", *CPU, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_unknown_reports_open_set_metrics_and_saves_the_state(trained, capsys, tmp_path):
    data, tok, unknown = trained
    assert (tok / openset.JSON_FILE).exists()  # `mcti train` saved it
    plot = tmp_path / "cm.png"
    r = eval_json(capsys, tok, data, "--unknown", str(unknown), "--plot", str(plot))
    assert r["n_unknown"] == 9 and r["n_unknown_skipped"] == 1
    assert 0 <= r["auroc"] <= 1 and 0 <= r["fpr_at_95"] <= 1
    assert r["reject"]["mode"] == "auto" and r["reject"]["score"] == openset.DEFAULT_SCORE
    assert 0 <= r["rejected_fraction"] <= 1 and r["accuracy_with_reject"] <= r["accuracy"]
    assert r["known_rejected"] == r["rejected_fraction"]
    # the threshold is the leave-one-out quantile of the shots, saved beside the tokens
    state = openset.load(tok, 3)
    assert len(state.loo[openset.DEFAULT_SCORE]) == 12  # 4 shots x 3 classes
    assert r["reject"]["threshold"] == pytest.approx(
        state.threshold(openset.DEFAULT_SCORE, 0.95), abs=1e-5
    )
    assert Image.open(plot).size[0] > 100
    assert Image.open(tmp_path / "cm-openset.png").size[0] > 100
    # later runs reuse the saved state; --known-recall moves the threshold
    stamp = (tok / openset.JSON_FILE).stat().st_mtime_ns
    lower = eval_json(capsys, tok, data, "--reject", "auto", "--known-recall", "0.5")
    assert (tok / openset.JSON_FILE).stat().st_mtime_ns == stamp
    assert lower["reject"]["threshold"] > r["reject"]["threshold"]


def test_eval_reject_number_sets_the_threshold(trained, capsys):
    data, tok, unknown = trained
    everything = eval_json(capsys, tok, data, "--reject", "1e9", "--unknown", str(unknown))
    assert everything["rejected_fraction"] == 1 and everything["accuracy_with_reject"] == 0
    assert everything["unknown_rejected"] == 1 and everything["reject"]["mode"] == "number"
    nothing = eval_json(capsys, tok, data, "--reject=-1e9")
    assert nothing["rejected_fraction"] == 0
    assert nothing["accuracy_with_reject"] == nothing["accuracy"]
    assert "auroc" not in nothing


def test_classify_labels_rejected_images_unknown(trained, capsys):
    data, tok, unknown = trained
    imgs = [str(data / "sku-0001" / "img7.png"), str(data / "sku-0002" / "img7.png")]
    argv = ["classify", "--tokens", str(tok), *imgs, "--top-k", "2", *CPU]
    assert main([*argv, "--json", "--reject", "1e9"]) == 0
    rejected = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rejected] == ["unknown", "unknown"]
    assert all(len(r["labels"]) == 2 and len(r["scores"]) == 2 for r in rejected)
    assert main([*argv, "--json", "--reject=-1e9"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in kept] == [r["labels"][0] for r in kept]
    assert main([*argv, "--reject", "1e9"]) == 0
    out = capsys.readouterr().out
    assert out.count(": unknown (rejection score") == 2 and "best known:" in out
    assert main(argv) == 0
    assert "unknown" not in capsys.readouterr().out


def test_open_set_mistakes_are_one_line(trained, capsys, tmp_path):
    data, tok, unknown = trained
    base = ["eval", "--tokens", str(tok), "--data", str(data), *CPU]
    assert "--reject must be off, auto or a number" in run_err(capsys, [*base, "--reject", "x"])
    assert "--known-recall must be > 0" in run_err(capsys, [*base, "--known-recall", "0"])
    err = run_err(capsys, [*base, "--unknown", str(tmp_path / "none")])
    assert "--unknown folder" in err and "does not exist" in err
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert "has no image files" in run_err(capsys, [*base, "--unknown", str(tmp_path / "empty")])
    # a token set whose training images are gone cannot fit its threshold
    moved = tmp_path / "tok"
    shutil.copytree(tok, moved)
    for f in moved.glob("openset.*"):
        f.unlink()
    meta = json.loads((moved / "classes.json").read_text())
    meta["data_root"] = str(tmp_path / "gone")
    (moved / "classes.json").write_text(json.dumps(meta))
    classify_moved = ["classify", "--tokens", str(moved), str(data / "sku-0000" / "img0.png")]
    classify_moved += [*CPU, "--reject", "auto"]
    err = run_err(capsys, classify_moved)
    assert "none of them is readable" in err
    (moved / openset.JSON_FILE).write_text("{")
    (moved / openset.ARRAYS_FILE).write_text("")
    err = run_err(capsys, classify_moved)
    assert "corrupt" in err
