"""`mcti synth`: the command writes the folders and synth.json, refuses mistakes in one line,
never overwrites a non-empty --out without --force and leaves no half-written folder."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mcti.cli import main

SMALL = ["--classes", "6", "--per-class", "3", "--train-per-class", "1", "--seed", "4"]


def pngs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def run_err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mcti synth: error: ") and "Traceback" not in err[0]
    return err[0]


def test_writes_splits_and_a_manifest_that_regenerates_it(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["synth", *SMALL, "--out", str(out)]) == 0
    assert "wrote 6 classes" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["synth.json", "test", "train"]
    assert len(list((out / "train").glob("*/*.png"))) == 6
    assert len(list((out / "test").glob("*/*.png"))) == 12
    meta = json.loads((out / "synth.json").read_text())
    assert meta["settings"] == {
        "classes": 6,
        "per_class": 3,
        "train_per_class": 1,
        "seed": 4,
        "size": 32,
    }
    assert meta["splits"] == {"train": 6, "test": 12}
    # the recorded command rebuilds the same bytes
    argv = shlex.split(meta["command"].replace("DIR", str(tmp_path / "again")))
    assert argv[0] == "mcti" and main(argv[1:]) == 0
    assert pngs(tmp_path / "again") == pngs(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "ds"]  # no temporary left


def test_refuses_a_non_empty_out_unless_force(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = run_err(capsys, ["synth", *SMALL, "--out", str(out)])
    assert "not empty" in line and "--force" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert main(["synth", *SMALL, "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["synth.json", "test", "train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["synth", *SMALL, "--out", str(empty)]) == 0  # an empty folder is fine


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--classes", "0"], "--classes must be between 1 and"),
        (["--classes", "100000"], "--classes must be between 1 and"),
        (["--per-class", "1"], "--per-class must be >= 2"),
        (["--per-class", "5", "--train-per-class", "5"], "--train-per-class must be between"),
        (["--train-per-class", "0"], "--train-per-class must be between"),
        (["--size", "4"], "--size must be between"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, capsys, extra, words):
    line = run_err(capsys, ["synth", "--out", str(tmp_path / "ds"), *extra])
    assert words in line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert "is a file, not a directory" in run_err(
        capsys, ["synth", *SMALL, "--out", str(tmp_path / "f")]
    )


def test_console_script_help_and_exit_code(tmp_path):
    exe = Path(sys.executable).with_name("mcti")
    r = subprocess.run([str(exe), "synth", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "--train-per-class" in r.stdout and "the shots" in r.stdout and "--force" in r.stdout
    r = subprocess.run(
        [str(exe), "synth", "--classes", "0", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("mcti synth: error: --classes")
