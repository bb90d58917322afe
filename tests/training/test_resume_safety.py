"""What `python -m training --resume` trusts: no pickle runs code, a changed setting is named,
a corrupt checkpoint or a busy --out is one line. Real DeepSpeed, a world of one (gloo, CPU)."""

import shutil
from pathlib import Path

import pytest
import torch

from mcti.train.outdir import lock_out_dir
from tests.training.conftest import cli_flags
from training.checkpoint import safe_deepspeed_classes
from training.launch import main


class CreatesAFile:
    """Unpickling this opens (so creates) `path` for writing: any code could run instead."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def checkpointed(data_dir, tmp_path_factory) -> Path:
    """A real 2-step ZeRO-1 run (its optimizer state holds DeepSpeed's own classes)."""
    out = tmp_path_factory.mktemp("safety") / "tokens"
    assert main(cli_flags(data_dir, out, steps=2, deepspeed_config="zero1_fp32")) == 0
    return out


def copy_of(out: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(out, tmp_path / "tokens"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("training: error")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_real_checkpoint_resumes_with_weights_only_loading(checkpointed, data_dir, tmp_path):
    out = copy_of(checkpointed, tmp_path)
    assert main(cli_flags(data_dir, out, steps=4, deepspeed_config="zero1_fp32", resume=True)) == 0
    assert (out / "checkpoint" / "latest").read_text().strip() == "step-000004"


@pytest.mark.parametrize(
    "part", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
)
def test_a_planted_pickle_is_refused_and_never_runs(checkpointed, data_dir, tmp_path, capsys, part):
    out = copy_of(checkpointed, tmp_path)
    path = out / "checkpoint" / "step-000002" / part
    with torch.serialization.safe_globals(safe_deepspeed_classes()):
        state = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    state["extra"] = CreatesAFile(str(marker))
    torch.save(state, path)

    flags = cli_flags(data_dir, out, steps=4, deepspeed_config="zero1_fp32", resume=True)
    assert main(flags) == 2
    assert not marker.exists()
    line = one_error_line(capsys)
    assert "not plain data" in line and "step-000002" in line and "open" in line


def test_a_refused_resume_names_the_setting_that_changed(checkpointed, data_dir, tmp_path, capsys):
    out = copy_of(checkpointed, tmp_path)
    flags = cli_flags(data_dir, out, steps=4, deepspeed_config="zero1_fp32", resume=True, lr=0.01)
    assert main(flags) == 2
    line = one_error_line(capsys)
    assert "different run (differs in: config): --lr 0.005 -> 0.01" in line


@pytest.mark.parametrize(
    "file,content,expected",
    [
        ("step-000002/mcti.json", "{", "mcti.json is corrupt"),
        ("step-000002/mcti.json", '{"step": 2}', "mcti.json is corrupt"),
        ("latest", "../../etc\n", "checkpoint pointer"),
        ("step-000002/zero_pp_rank_0_mp_rank_00_optim_states.pt", "PK", "step-000002 is corrupt"),
    ],
)
def test_a_corrupt_checkpoint_is_one_line(
    checkpointed, data_dir, tmp_path, capsys, file, content, expected
):
    out = copy_of(checkpointed, tmp_path)
    (out / "checkpoint" / file).write_text(content)
    flags = cli_flags(data_dir, out, steps=4, deepspeed_config="zero1_fp32", resume=True)
    assert main(flags) == 2
    assert expected in one_error_line(capsys)


def test_a_second_run_on_a_busy_out_fails_in_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    with lock_out_dir(out):
        assert main(cli_flags(data_dir, out, steps=2)) == 2
    assert "is in use by another run" in one_error_line(capsys)
    assert not (out / "checkpoint").exists()
