"""`mcti train` and the token loaders as a user meets them: one line for each mistake."""

import json

import pytest

from mcti.cli import main
from mcti.train.outdir import lock_out_dir
from tests.conftest import make_image_folder
from tests.mcti.train.test_resume_interop import ARGS, train_argv

SMALL = ["--steps", "2", *ARGS[2:]]  # 2 steps, checkpoint every 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step token directory (with its checkpoint) on tiny-random; tests copy it."""
    root = tmp_path_factory.mktemp("trained")
    data = make_image_folder(root / "data", n_classes=2, per_class=3)
    assert main(train_argv(data, root / "tok", *SMALL)) == 0
    return data, root / "tok"


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"mcti {command}: error: "), err
    return lines[0]


def copy_of(tok, tmp_path):
    import shutil

    return shutil.copytree(tok, tmp_path / "tok")


def test_resume_trims_the_run_log_to_the_checkpoint(trained, tmp_path):
    data, tok = trained
    out = copy_of(tok, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:  # steps a killed run logged past its checkpoint
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + '{"step": 4, "lo')
    assert main(train_argv(data, out, "--steps", "4", *ARGS[2:], "--resume")) == 0
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(r["loss"] != 9.0 for r in lines)  # step 3 is the redone one


def test_a_second_run_on_the_same_out_fails_in_one_line(trained, tmp_path, capsys):
    data, _ = trained
    out = tmp_path / "busy"
    with lock_out_dir(out):  # another run holds OUT (flock: a second open conflicts as well)
        assert main(train_argv(data, out, *SMALL)) == 2
        line = one_error_line(capsys, "train")
        assert "is in use by another run" in line and ".lock" in line
        assert main(["train", "--nproc", "2", "--data", str(data), "--out", str(out)]) == 2
        assert "is in use by another run" in one_error_line(capsys, "train")  # no process started
    assert not (out / "checkpoint").exists() and not (out / "metrics.jsonl").exists()


def test_out_that_is_a_file_fails_in_one_line(trained, tmp_path, capsys):
    data, _ = trained
    (tmp_path / "file").write_text("x")
    assert main(train_argv(data, tmp_path / "file", *SMALL)) == 2
    assert "is a file, not a directory" in one_error_line(capsys, "train")


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("classes.json", "{", "classes.json is not valid JSON"),
        ("classes.json", "[]", "classes.json is corrupt"),
        ("classes.json", '{"format": "mcti-tokens/1"}', "classes.json is corrupt"),
        ("classes.json", b"\xff\xfe{", "classes.json is not valid JSON"),
        ("learned_embeds.safetensors", "garbage", "learned_embeds.safetensors is corrupt"),
        ("learned_embeds.safetensors", "", "learned_embeds.safetensors is corrupt"),
    ],
)
def test_corrupt_token_files_are_one_line(trained, tmp_path, capsys, name, content, expected):
    data, tok = trained
    out = copy_of(tok, tmp_path)
    (out / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    image = str(data / "sku-0000" / "img0.png")
    argv = ["classify", "--tokens", str(out), image, "--device", "cpu", "--model", "tiny-random"]
    assert main(argv) == 2
    line = one_error_line(capsys, "classify")
    assert expected in line and str(out) in line


@pytest.mark.parametrize(
    "content,expected",
    [("{", "state.json is corrupt"), ('{"step": 2}', "state.json is corrupt")],
)
def test_a_corrupt_checkpoint_state_is_one_line(trained, tmp_path, capsys, content, expected):
    data, tok = trained
    out = copy_of(tok, tmp_path)
    (out / "checkpoint" / "state.json").write_text(content)
    assert main(train_argv(data, out, "--steps", "4", *ARGS[2:], "--resume")) == 2
    assert expected in one_error_line(capsys, "train")
