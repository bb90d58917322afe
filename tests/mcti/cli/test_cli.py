"""Every command end to end on tiny-random, and every user mistake as one clear line + exit 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mcti.cli import main
from tests.conftest import make_image_folder

TRAIN = [
    "--model",
    "tiny-random",
    "--steps",
    "4",
    "--batch-size",
    "4",
    "--shots",
    "3",
    "--quiet",
    "--device",
    "cpu",
    "--draws",
    "1",
    "--negatives",
    "1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folder(root / "data", n_classes=3, per_class=5)
    assert main(["train", "--data", str(data), "--out", str(root / "tok"), *TRAIN]) == 0
    return data, root / "tok"


def run_err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "error:" in err[-1] and "Traceback" not in "".join(err)
    return err[-1]


def test_train_writes_tokens_and_metadata(trained):
    data, tok = trained
    meta = json.loads((tok / "classes.json").read_text())
    assert list(meta["classes"]) == ["sku-0000", "sku-0001", "sku-0002"]
    assert meta["base_model"]["spec"] == "tiny-random" and meta["method"] == "mcti"
    assert len(meta["train_files"]) == 9 and meta["steps"] == 4
    lines = (tok / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


def test_eval_json_excludes_training_images_and_plots(trained, capsys, tmp_path):
    data, tok = trained
    plot = tmp_path / "cm.png"
    assert (
        main(
            [
                "eval",
                "--tokens",
                str(tok),
                "--data",
                str(data),
                "--json",
                "--plot",
                str(plot),
                "--n-samples",
                "2,4",
                "--to-keep",
                "2,1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["n_images"] == 15 - 9  # 5 per class, 3 shots each trained on
    assert 0 <= r["accuracy"] <= 1 and set(r["per_class"]) == {"sku-0000", "sku-0001", "sku-0002"}
    # accuracy agrees with the confusion matrix and the per-class numbers
    cm = r["confusion"]
    assert abs(r["accuracy"] - sum(cm[i][i] for i in range(3)) / 6) < 1e-9
    assert Image.open(plot).size[0] > 100
    assert (
        main(
            [
                "eval",
                "--tokens",
                str(tok),
                "--data",
                str(data),
                "--json",
                "--include-train",
                "--scorer",
                "clip",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["n_images"] == 15


def test_classify_json_and_text(trained, capsys):
    data, tok = trained
    imgs = [str(data / "sku-0001" / "img4.png"), str(data / "sku-0002" / "img4.png")]
    assert (
        main(
            [
                "classify",
                "--tokens",
                str(tok),
                *imgs,
                "--top-k",
                "2",
                "--json",
                "--n-samples",
                "2,4",
                "--to-keep",
                "2,1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == imgs
    assert all(len(o["labels"]) == 2 and len(o["scores"]) == 2 for o in out)
    assert all(set(o["labels"]) <= {"sku-0000", "sku-0001", "sku-0002"} for o in out)
    assert (
        main(["classify", "--tokens", str(tok), imgs[0], "--scorer", "clip", "--device", "cpu"])
        == 0
    )
    assert capsys.readouterr().out.startswith(imgs[0] + ": ")


def test_generate_png_grid(trained, tmp_path):
    _, tok = trained
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "generate",
                "--tokens",
                str(tok),
                "--label",
                "sku-0002",
                "--out",
                str(out),
                "--n",
                "4",
                "--steps",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    im = Image.open(out)
    assert im.size == (2 * 128, 2 * 128)  # 2x2 tiles of 32 px upscaled to 128


def test_user_mistakes_are_one_line_errors(trained, capsys, tmp_path):
    data, tok = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    one = make_image_folder(tmp_path / "one", n_classes=1, per_class=2)
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    cases = {
        "does not exist": [
            "train",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o1"),
            *TRAIN,
        ],
        "is empty": ["train", "--data", str(empty), "--out", str(tmp_path / "o2"), *TRAIN],
        "need at least 2": ["train", "--data", str(one), "--out", str(tmp_path / "o3"), *TRAIN],
        "not a diffusers model directory": [
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o4"),
            *TRAIN,
            "--model",  # after TRAIN's --model: the last one wins
            str(notmodel),
        ],
        "not a directory": [
            "eval",
            "--model",
            str(tmp_path / "missing-model"),
            "--tokens",
            str(tok),
            "--data",
            str(data),
        ],
        "not in the token set": [
            "generate",
            "--tokens",
            str(tok),
            "--label",
            "sku-9999",
            "--out",
            str(tmp_path / "g.png"),
            "--device",
            "cpu",
        ],
        "not a token directory": [
            "classify",
            "--tokens",
            str(tmp_path),
            str(data / "sku-0000" / "img0.png"),
            "--device",
            "cpu",
        ],
        "no such image": [
            "classify",
            "--tokens",
            str(tok),
            str(tmp_path / "nope.png"),
            "--device",
            "cpu",
        ],
        "--to-keep must": [
            "classify",
            "--tokens",
            str(tok),
            str(data / "sku-0000" / "img0.png"),
            "--to-keep",
            "2,2",
            "--n-samples",
            "2,4",
            "--device",
            "cpu",
        ],
        "needs a CUDA device": [
            "train",
            "--precision",
            "bf16",
            "--device",
            "cpu",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o5"),
            *TRAIN[:-4],
        ],
        "already holds a checkpoint": ["train", "--data", str(data), "--out", str(tok), *TRAIN],
        "--attention xformers cannot run here": [
            "eval",
            "--attention",
            "xformers",
            "--device",
            "cpu",
            "--tokens",
            str(tok),
            "--data",
            str(data),
        ],
        "--method must be": [
            "train",
            "--method",
            "dreambooth",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o6"),
            *TRAIN,
        ],
        "--scorer must be": [
            "classify",
            "--scorer",
            "knn",
            "--tokens",
            str(tok),
            str(data / "sku-0000" / "img0.png"),
            "--device",
            "cpu",
        ],
    }
    for expected, argv in cases.items():
        line = run_err(capsys, argv)
        assert expected in line, (expected, line)
    assert not (tmp_path / "o4").exists() and not (tmp_path / "g.png").exists()


def test_tokens_from_another_base_model_are_refused(trained, capsys, tmp_path):
    _, tok = trained
    other = tmp_path / "tok-other"
    shutil.copytree(tok, other)
    meta = json.loads((other / "classes.json").read_text())
    meta["base_model"]["fingerprint"] = "0123456789abcdef"
    (other / "classes.json").write_text(json.dumps(meta))
    assert "trained on base model" in run_err(
        capsys,
        [
            "classify",
            "--tokens",
            str(other),
            str(tok.parent / "data" / "sku-0000" / "img0.png"),
            "--device",
            "cpu",
        ],
    )
    meta["base_model"]["hidden_size"] = 768
    (other / "classes.json").write_text(json.dumps(meta))
    assert "width 768" in run_err(
        capsys,
        [
            "generate",
            "--tokens",
            str(other),
            "--label",
            "sku-0000",
            "--out",
            str(tmp_path / "x.png"),
            "--device",
            "cpu",
        ],
    )


def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=4)
    (data / "sku-0000" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "sku-0001" / "notes.txt").write_text("hello")
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "tok"),
                *TRAIN[:6],
                "--shots",
                "5",
                "--quiet",
                "--device",
                "cpu",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "skipped" in err and "unreadable" in err
    meta = json.loads((tmp_path / "tok" / "classes.json").read_text())
    assert len(meta["train_files"]) == 8 and not any(
        "broken" in f or "notes" in f for f in meta["train_files"]
    )


def test_console_script_exit_code_and_help():
    exe = Path(sys.executable).with_name("mcti")
    r = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True)
    assert (
        r.returncode == 0 and "--negatives" in r.stdout and "Negative classes sampled" in r.stdout
    )
    r = subprocess.run(
        [str(exe), "eval", "--tokens", "/nonexistent", "--data", "/nonexistent"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "error:" in r.stderr
