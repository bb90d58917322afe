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
from tests.mcti.cli.conftest import TRAIN


def run_err(capsys, argv) -> str:
    """The one error line of a refused command (exit 2), `mcti <cmd>: error: ...`."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mcti {argv[0]}: error: "), err
    return err[0]


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


def _mistakes(data: Path, tok: Path, tmp: Path) -> dict[str, list[str]]:
    """Expected words of the error line (TMP stands for `tmp`) -> argv. Every run that could
    write names tmp/out or tmp/out.png, which must not exist afterwards. The folders named here
    are made by `_make_paths`."""
    empty, one, notmodel, a_file = tmp / "empty", tmp / "one", tmp / "notmodel", tmp / "a-file"
    image = str(data / "sku-0000" / "img0.png")
    out, png = ["--out", str(tmp / "out")], ["--out", str(tmp / "out.png")]
    scorer = ["--tokens", str(tok), "--device", "cpu", "--n-samples", "2,4", "--to-keep", "2,1"]
    return {
        "does not exist": ["train", "--data", str(tmp / "nope"), *out, *TRAIN],
        "is empty": ["train", "--data", str(empty), *out, *TRAIN],
        "need at least 2": ["train", "--data", str(one), *out, *TRAIN],
        "not a diffusers model directory": [
            "train", "--data", str(data), *out, *TRAIN,
            "--model", str(notmodel),  # after TRAIN's --model: the last one wins
        ],
        "not a directory": [
            "eval", "--model", str(tmp / "missing-model"), "--tokens", str(tok), "--data", str(data),
        ],
        "not in the token set": [
            "generate", "--tokens", str(tok), "--label", "sku-9999", *png, "--device", "cpu",
        ],
        "not a token directory": ["classify", "--tokens", str(tmp), image, "--device", "cpu"],
        "no such image": ["classify", "--tokens", str(tok), str(tmp / "nope.png"), "--device", "cpu"],
        "--to-keep must": ["classify", *scorer, image, "--to-keep", "2,2"],
        "needs a CUDA device": [
            "train", "--precision", "bf16", "--device", "cpu", "--data", str(data), *out,
            *TRAIN[:-4],
        ],
        "already holds a checkpoint": ["train", "--data", str(data), "--out", str(tok), *TRAIN],
        "--attention xformers cannot run here": [
            "eval", "--attention", "xformers", "--device", "cpu", "--tokens", str(tok),
            "--data", str(data),
        ],
        # choices, bounds and templates: refused while parsing, before any model loads
        "--method must be one of mcti, ti (not 'dreambooth')": [
            "train", "--method", "dreambooth", "--data", str(data), *out, *TRAIN,
            "--model", str(notmodel),
        ],
        "--scorer must be one of diffusion, clip, hybrid, fused (not 'knn')": [
            "classify", "--scorer", "knn", *scorer, image, "--model", str(notmodel),
        ],
        "--precision must be one of fp32, bf16, fp16": [
            "eval", "--precision", "fp8", *scorer, "--data", str(data),
        ],
        "--shots must be >= 1 (not '0')": [
            "train", "--data", str(data), *out, *TRAIN, "--shots", "0",
        ],
        "--disc-t-max must be <= 1": [
            "train", "--data", str(data), *out, *TRAIN, "--disc-t-max", "1.5",
        ],
        "--n-samples must be comma-separated positive integers": [
            "eval", *scorer, "--data", str(data), "--n-samples", "8,x",
        ],
        "--steps must be an integer (not 'many')": [
            "generate", "--tokens", str(tok), "--label", "sku-0000", *png, "--steps", "many",
        ],
        "the following arguments are required: --out": [
            "generate", "--tokens", str(tok), "--label", "sku-0000",
        ],
        "--template must contain exactly one {}, where the class token goes (not 'a photo')": [
            "eval", *scorer, "--data", str(data), "--template", "a photo",
        ],
        "--template must contain exactly one {}, where the class token goes (not 'a {x}')": [
            "classify", *scorer, image, "--template", "a {x}",
        ],
        "--prompt must contain exactly one {}, where the class token goes (not '{} and {}')": [
            "generate", "--tokens", str(tok), "--label", "sku-0000", *png, "--prompt", "{} and {}",
        ],
        # output paths: checked before the model loads (notmodel would fail otherwise)
        "--out 'TMP/a-file' is a file, not a directory": [
            "train", "--data", str(data), "--out", str(a_file), *TRAIN, "--model", str(notmodel),
        ],
        "--out 'TMP/a-file/sub': 'TMP/a-file' is a file, not a directory": [
            "train", "--data", str(data), "--out", str(a_file / "sub"), *TRAIN,
            "--model", str(notmodel),
        ],
        "--out 'TMP' is a directory; give a file name": [
            "generate", "--tokens", str(tok), "--label", "sku-0000", "--out", str(tmp),
            "--model", str(notmodel),
        ],
        "--plot '/proc/mcti/cm.png': cannot write in '/proc'": [
            "eval", *scorer, "--data", str(data), "--plot", "/proc/mcti/cm.png",
            "--model", str(notmodel),
        ],
        "--out '/proc/mcti-demo': cannot write in '/proc'": [
            "demo", "--quick", "--out", "/proc/mcti-demo", "--model", str(notmodel),
        ],
    }  # fmt: skip


def _make_paths(tmp: Path) -> None:
    (tmp / "empty").mkdir()
    make_image_folder(tmp / "one", n_classes=1, per_class=2)
    (tmp / "notmodel").mkdir()  # any model load fails on this: errors named above come first
    (tmp / "a-file").write_text("not a directory")


MISTAKES = list(_mistakes(Path("d"), Path("t"), Path("TMP")))


@pytest.mark.parametrize("case", range(len(MISTAKES)), ids=MISTAKES)
def test_user_mistake_is_one_line_error(case, trained, capsys, tmp_path):
    data, tok = trained
    _make_paths(tmp_path)
    expected, argv = list(_mistakes(data, tok, tmp_path).items())[case]
    line = run_err(capsys, argv)
    assert expected.replace("TMP", str(tmp_path)) in line, (expected, line)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.png").exists()


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
