"""Parsers built from the settings schema: flags, choices and bounds at parse time, templates,
output checks, and the settings objects that check themselves."""

import argparse
import dataclasses
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest

from mcti.cli import build_parser as mcti_parser
from mcti.errors import UserError
from mcti.flags import check_output, to_dataclass
from mcti.settings import (
    ClassifyArgs,
    EvalArgs,
    GenerateArgs,
    ObjectiveSettings,
    ScoreArgs,
    ScorerSettings,
    ServeArgs,
    TrainArgs,
    part,
    template_problem,
)
from training.cli import DistTrainArgs, build_parser
from training.launch import flags_of, torchrun_command


def _sub(name: str) -> argparse.ArgumentParser:
    return mcti_parser()._subparsers._group_actions[0].choices[name]


def test_parser_takes_every_train_flag_and_the_launchers_local_rank():
    parser = build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in fields(TrainArgs)} <= dests
    assert {"deepspeed_config", "grad_accum", "hard_negatives", "timeout_s", "tensorboard"} <= dests
    ns = parser.parse_args(
        [
            "--data",
            "d",
            "--out",
            "o",
            "--deepspeed-config",
            "zero2_fp32",
            "--hard-negatives",
            "--batch-size",
            "32",
            "--local_rank=1",
        ]  # fmt: skip
    )
    assert (ns.deepspeed_config, ns.hard_negatives, ns.batch_size, ns.local_rank) == (
        "zero2_fp32",
        True,
        32,
        1,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "o"])  # --data is required


def test_launch_flags_reproduce_the_arguments():
    from mcti.flags import to_dataclass

    args = DistTrainArgs(
        data="d", out="o", nproc=2, lr=1e-3, hard_negatives=True, deepspeed_config="zero1_fp32",
        grad_accum=2, timeout_s=30.0, clip=None,
    )  # fmt: skip
    back = to_dataclass(DistTrainArgs, build_parser().parse_args(flags_of(args)))
    assert back == DistTrainArgs(**{**args.__dict__, "nproc": 1})  # the children are ranks
    cmd = torchrun_command(args, 2)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[5:7] == ["-m", "training"] and "--nproc" not in cmd


@pytest.mark.parametrize(
    "command,flag,choices",
    [
        ("train", "--method", ("mcti", "ti")),
        ("train", "--reg", ("denoise", "clip")),
        ("train", "--precision", ("fp32", "bf16", "fp16")),
        ("eval", "--scorer", ("diffusion", "clip", "hybrid", "fused")),
        ("classify", "--attention", ("auto", "sdpa", "xformers")),
        ("serve", "--scorer", ("diffusion", "clip", "hybrid", "fused")),
    ],
)
def test_literal_settings_become_argparse_choices(command, flag, choices):
    (action,) = [a for a in _sub(command)._actions if flag in a.option_strings]
    assert tuple(action.choices) == choices
    with pytest.raises(SystemExit) as e:  # refused while parsing: nothing has run yet
        _sub(command).parse_args([flag, "bogus"])
    assert e.value.code == 2


def test_parse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit):
        mcti_parser().parse_args(["train", "--data", "d", "--out", "o", "--lr", "-1"])
    err = capsys.readouterr().err
    assert err == "mcti train: error: --lr must be > 0 (not '-1')\n"


def test_defaults_and_required_flags_come_from_the_dataclass():
    ns = mcti_parser().parse_args(["classify", "--tokens", "t", "a.png", "b.png"])
    a = to_dataclass(ClassifyArgs, ns)
    assert a == ClassifyArgs(tokens="t", images=["a.png", "b.png"])
    ns = mcti_parser().parse_args(["generate", "--tokens", "t", "--label", "x", "--out", "o.png"])
    assert to_dataclass(GenerateArgs, ns).prompt == GenerateArgs().prompt
    with pytest.raises(SystemExit):
        mcti_parser().parse_args(["eval", "--tokens", "t"])  # --data is required


def test_serve_records_which_flags_were_given():
    ns = mcti_parser().parse_args(
        ["serve", "--tokens", "t", "--scorer", "diffusion", "--replicas", "2"]
    )
    a = to_dataclass(ServeArgs, ns)
    assert set(a.given) == {"tokens", "scorer", "num_replicas"}
    assert (a.scorer, a.num_replicas, a.max_batch_size) == ("diffusion", 2, 8)
    assert ServeArgs(tokens="t").given is None  # built in Python


@pytest.mark.parametrize(
    "template,ok",
    [
        ("a photo of a {}", True),
        ("{}", True),
        ("a {{literal}} photo of {}", True),
        ("a photo", False),
        ("a {x}", False),
        ("{} {}", False),
        ("{0}", False),
        ("a {:>5}", False),
        ("a {", False),
        ("a }", False),
    ],
)
def test_template_needs_exactly_one_empty_slot(template, ok):
    assert (template_problem(template) is None) == ok
    if ok:
        assert template.format("<tok>").count("<tok>") == 1


def test_the_training_templates_are_valid():
    from mcti.core.tokens import TEMPLATES

    assert TEMPLATES and all(template_problem(t) is None for t in TEMPLATES)


@pytest.mark.parametrize(
    "build,words",
    [
        (lambda: ScoreArgs(template="a photo"), "--template must contain exactly one {}"),
        (lambda: EvalArgs(scorer="knn"), "--scorer must be one of diffusion, clip, hybrid"),
        (lambda: TrainArgs(disc_t_min=0.7, disc_t_max=0.6), "--disc-t-min < --disc-t-max"),
        (lambda: TrainArgs(steps=0), "--steps must be >= 1 (not 0)"),
        (lambda: DistTrainArgs(method="dreambooth"), "--method must be one of mcti, ti"),
        (lambda: GenerateArgs(prompt="{} {}"), "--prompt must contain exactly one {}"),
        (lambda: ServeArgs(num_replicas=0), "--replicas must be >= 1"),
    ],
    ids=lambda v: v if isinstance(v, str) else "built",
)
def test_settings_objects_check_themselves(build, words):
    with pytest.raises(UserError) as e:
        build()
    assert words in str(e.value)


def test_groups_are_read_from_composed_settings():
    a = TrainArgs(reg="clip", tau=0.01, gamma=0.5, lr=1e-3)
    s = part(ObjectiveSettings, a)
    assert type(s) is ObjectiveSettings and (s.reg, s.tau, s.gamma) == ("clip", 0.01, 0.5)
    assert {f.name for f in fields(ObjectiveSettings)} <= {f.name for f in fields(TrainArgs)}
    assert s.std_floor == 0.01 and "std_floor" not in dataclasses.asdict(s)
    sc = part(ScorerSettings, EvalArgs(tokens="t", data="d", hybrid_m=3))
    assert sc == ScorerSettings(hybrid_m=3)


def test_train_settings_fields_are_unchanged():
    """Checkpoint fingerprints and classes.json record asdict(TrainArgs): the same keys as
    before the schema was split into groups, so old checkpoints still resume. `extend` and
    `replace` (issue 14) and `hard_negatives` (issue 13) joined later: the fingerprint leaves
    them out while they are off (tests/mcti/train/test_extend.py and
    tests/training/test_many_classes.py check that). `fit_folds`, `fused_m`, `fused_timesteps`
    (issue 12) fit the fused scorer after the run's steps: the fingerprint leaves them out."""
    assert {f.name for f in fields(TrainArgs)} == {
        "model", "clip", "device", "precision", "attention", "data", "out", "method", "reg",
        "shots", "steps", "batch_size", "lr", "weight_decay", "seed", "n_vectors", "init_word",
        "negatives", "draws", "tau", "alpha", "gamma", "standardize", "disc_t_min",
        "disc_t_max", "prototype", "flip", "save_every", "resume", "quiet", "nproc",
        "extend", "replace", "hard_negatives", "fit_folds", "fused_m", "fused_timesteps",
    }  # fmt: skip


def test_output_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    check_output("--out", str(tmp_path / "new" / "deeper"), "dir")  # creatable: fine
    check_output("--out", str(tmp_path / "new" / "x.png"), "file")
    assert not (tmp_path / "new").exists() and os.listdir(tmp_path) == ["f"]  # nothing made
    with pytest.raises(UserError, match="is a file, not a directory"):
        check_output("--out", str(tmp_path / "f"), "dir")
    with pytest.raises(UserError, match="is a directory; give a file name"):
        check_output("--out", str(tmp_path), "file")
    with pytest.raises(UserError, match="'.*/f' is a file, not a directory"):
        check_output("--out", str(tmp_path / "f" / "x.png"), "file")


def test_output_in_a_read_only_directory_is_refused():
    # Root may write anywhere, so as root the check runs with the effective uid of `nobody`
    # (root gets it back: the real uid stays 0), in a directory every user can traverse.
    top = Path(tempfile.mkdtemp())
    ro = top / "ro"
    ro.mkdir()
    top.chmod(0o755)
    ro.chmod(0o555)
    as_root = os.geteuid() == 0
    try:
        if as_root:
            os.seteuid(65534)
        with pytest.raises(UserError, match="cannot write in"):
            check_output("--out", str(ro / "tokens"), "dir")
    finally:
        if as_root:
            os.seteuid(0)
        shutil.rmtree(top)
