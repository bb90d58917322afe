"""`mcti train` saves the open-set thresholds with the tokens; `--reject auto` reads them, and fits
them from the shots only for token sets saved without them (mcti/eval/openset.py)."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from mcti.cli import main
from mcti.core import openset
from tests.conftest import make_image_folder
from tests.mcti.cli.test_cli import run_err

CPU = ["--device", "cpu", "--scorer", "clip"]
TRAIN = ["--model", "tiny-random", "--steps", "2", "--batch-size", "4", "--quiet"]
TRAIN += ["--device", "cpu", "--draws", "1", "--negatives", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("thresholds")
    data = make_image_folder(root / "data", n_classes=3, per_class=6)
    tok = root / "tok"
    assert main(["train", "--data", str(data), "--out", str(tok), "--shots", "4", *TRAIN]) == 0
    return root, data, tok


def eval_json(capsys, tok, data, *extra) -> tuple[dict, str]:
    assert main(["eval", "--tokens", str(tok), "--data", str(data), "--json", *CPU, *extra]) == 0
    out = capsys.readouterr()
    return json.loads(out.out), out.err


def test_train_saves_the_leave_one_out_thresholds(trained):
    _, _, tok = trained
    meta = json.loads((tok / openset.JSON_FILE).read_text())
    state = openset.load(tok, 3)
    assert len(state.loo[openset.DEFAULT_SCORE]) == 12  # 4 shots x 3 classes, leave-one-out
    assert meta["known_recall"] == 0.95
    for score in openset.FEATURE_SCORES:
        assert meta["thresholds"][score] == pytest.approx(state.threshold(score, 0.95), abs=1e-6)
    assert sorted(state.reference.labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_reject_auto_reads_the_saved_thresholds(trained, capsys, tmp_path):
    root, data, tok = trained
    saved = json.loads((tok / openset.JSON_FILE).read_text())["thresholds"]
    # the training images are gone: only the saved state can give the threshold
    moved = tmp_path / "tok"
    shutil.copytree(tok, moved)
    meta = json.loads((moved / "classes.json").read_text())
    meta["data_root"] = str(tmp_path / "gone")
    (moved / "classes.json").write_text(json.dumps(meta))
    stamp = (moved / openset.JSON_FILE).stat().st_mtime_ns
    r, err = eval_json(capsys, moved, data, "--reject", "auto")
    assert r["reject"]["threshold"] == pytest.approx(saved[openset.DEFAULT_SCORE], abs=1e-6)
    assert "note:" not in err and (moved / openset.JSON_FILE).stat().st_mtime_ns == stamp
    image = str(data / "sku-0000" / "img5.png")
    argv = ["classify", "--tokens", str(moved), image, "--json", "--reject", "auto", *CPU]
    assert main(argv) == 0
    assert "note:" not in capsys.readouterr().err


def test_a_token_set_without_saved_thresholds_fits_them_once_with_a_note(trained, capsys, tmp_path):
    _, data, tok = trained
    old = tmp_path / "old"
    shutil.copytree(tok, old)
    for f in old.glob("openset.*"):
        f.unlink()  # as a token set trained before thresholds were saved
    saved = json.loads((tok / openset.JSON_FILE).read_text())["thresholds"]
    r, err = eval_json(capsys, old, data, "--reject", "auto")
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no saved open-set thresholds" in notes[0]
    # fit on the same shots, the lazy fit gives the threshold training saved
    assert r["reject"]["threshold"] == pytest.approx(saved[openset.DEFAULT_SCORE], abs=1e-5)
    assert (old / openset.JSON_FILE).is_file()
    _, err = eval_json(capsys, old, data, "--reject", "auto")
    assert "note:" not in err  # saved now


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_shot")
    data = make_image_folder(root / "data", n_classes=2, per_class=2)
    tok = root / "tok"
    assert main(["train", "--data", str(data), "--out", str(tok), "--shots", "1", *TRAIN]) == 0
    return data, tok


def test_one_shot_training_saves_no_thresholds_and_a_number_still_works(one_shot, capsys):
    data, tok = one_shot
    meta = json.loads((tok / openset.JSON_FILE).read_text())
    assert meta["loo"] == {} and meta["thresholds"] == {}  # nothing to leave out
    base = ["eval", "--tokens", str(tok), "--data", str(data), *CPU]
    err = run_err(capsys, [*base, "--reject", "auto"])
    assert "2 or more training shots" in err and "note:" not in err
    r, _ = eval_json(capsys, tok, data, "--reject=-1e9")
    assert r["reject"]["mode"] == "number" and r["rejected_fraction"] == 0


def test_server_answers_auto_on_a_one_shot_set_with_a_request_error(one_shot):
    from mcti.core.model import load_model
    from mcti.core.scoring import Scores
    from mcti.core.store import read_meta
    from mcti.data.images import load_image
    from serving.http import ApiError
    from serving.openset import OpenSetRejection, open_set_fields

    data, tok = one_shot
    bundle = load_model("tiny-random", device="cpu")
    meta = read_meta(tok)
    entry = {"labels": meta["classes"], "meta": meta, "path": str(tok), "version": 0}
    rejection = OpenSetRejection(bundle, SimpleNamespace(reject="auto", known_recall=0.95))
    rejection.prepare({"tok": entry})  # the set loads: `--reject NUMBER` works on it
    pixels = load_image(data / "sku-0000" / "img1.png", bundle.resolution).unsqueeze(0)
    scores = Scores(torch.tensor([[0.3, 0.1]] * 2), torch.zeros(2, 2, dtype=torch.long))
    items = [{"reject": "auto"}, {"reject": "-1e9"}]
    outs = [{"labels": ["a", "b"]}, {"labels": ["a", "b"]}]
    rejection.apply(entry, pixels.repeat(2, 1, 1, 1), scores, items, outs)
    with pytest.raises(ApiError, match="2 or more training shots") as e:
        open_set_fields(outs[0])
    assert e.value.status == 422
    assert open_set_fields(outs[1])["label"] == "a"
