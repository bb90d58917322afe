"""DeepSpeed config checks, the argument parser, and fail-fast settings (no process is started)."""

import importlib.util
import json

import pytest

from mcti.errors import UserError
from training import ds_config
from training.cli import DistTrainArgs, preflight

SHIPPED = sorted(p.stem for p in ds_config.CONFIG_DIR.glob("*.json"))


def test_auto_batch_keys_are_filled_from_batch_size_world_and_accumulation():
    r = ds_config.resolve("zero0_fp32", batch_size=8, world_size=2)
    assert (r.micro_batch, r.grad_accum, r.zero_stage, r.precision) == (4, 1, 0, "fp32")
    assert r.config["train_batch_size"] == 8
    assert r.config["train_micro_batch_size_per_gpu"] == 4
    assert r.config["gradient_accumulation_steps"] == 1
    r = ds_config.resolve("zero0_fp32", batch_size=8, world_size=2, grad_accum=2)
    assert (r.micro_batch, r.grad_accum) == (2, 2)
    r = ds_config.resolve("zero0_fp32_accum4", batch_size=16, world_size=2)
    assert (r.micro_batch, r.grad_accum) == (2, 4)


@pytest.mark.parametrize(
    "name,batch,world,accum,numbers",
    [
        ("zero0_fp32", 8, 3, 0, ["--batch-size 8", "world size 3", "accumulation 1 = 3", "2.67"]),
        ("zero0_fp32_accum4", 12, 2, 0, ["--batch-size 12", "world size 2", "accumulation 4 = 8"]),
        ("zero1_fp32", 6, 2, 2, ["--batch-size 6", "world size 2", "accumulation 2 = 4"]),
    ],
)
def test_batch_that_does_not_divide_fails_with_the_numbers(name, batch, world, accum, numbers):
    with pytest.raises(UserError) as e:
        ds_config.resolve(name, batch, world, accum)
    for text in numbers:
        assert text in str(e.value)


def test_numbers_in_the_config_must_agree(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2})
    )
    with pytest.raises(UserError, match=r"train_micro_batch_size_per_gpu 3 .* = 2"):
        ds_config.resolve(str(path), 8, 2)
    with pytest.raises(
        UserError, match="--grad-accum 4 disagrees with gradient_accumulation_steps 2"
    ):
        ds_config.resolve(str(path), 8, 2, grad_accum=4)
    path.write_text(json.dumps({"train_batch_size": 16}))
    with pytest.raises(UserError, match="train_batch_size 16 does not match --batch-size 8"):
        ds_config.resolve(str(path), 8, 2)
    assert ds_config.resolve(str(path), 16, 2).micro_batch == 8


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported"),
        ({"optimizer": {"type": "AdamW"}}, "torch.optim.AdamW"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both bf16 and fp16"),
        ({"gradient_accumulation_steps": 0}, "positive integer"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, cfg, match):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=match):
        ds_config.resolve(str(path), 8, 1)


def test_missing_or_broken_config_names_the_shipped_ones(tmp_path):
    with pytest.raises(UserError, match="shipped configs: .*zero1_fp32"):
        ds_config.resolve("nope", 8, 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        ds_config.resolve(str(bad), 8, 1)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_resolves(name, tmp_path):
    tmp_path.joinpath("d").mkdir()
    raw = json.loads((ds_config.CONFIG_DIR / f"{name}.json").read_text())
    r = ds_config.resolve(name, batch_size=16, world_size=2)
    assert r.zero_stage == raw["zero_optimization"]["stage"] == int(name[4])
    assert r.precision == name.split("_")[1]
    assert r.grad_accum == (4 if name.endswith("accum4") else 1)
    assert r.micro_batch * r.grad_accum * 2 == 16
    args = DistTrainArgs(
        data=str(tmp_path / "d"), out=str(tmp_path / "o"), batch_size=16, deepspeed_config=name
    )
    if r.precision == "fp32":
        assert preflight(args, 2).path == r.path
    else:  # half precision configs are for CUDA; on an explicit CPU device they fail at once
        args.device = "cpu"
        with pytest.raises(UserError, match="needs CUDA"):
            preflight(args, 2)


def test_half_precision_needs_zero_1_or_2_and_agrees_with_precision(tmp_path):
    data = str(tmp_path)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}))
    args = DistTrainArgs(data=data, out=str(tmp_path / "o"), deepspeed_config=str(path))
    with pytest.raises(UserError, match="ZeRO stage 1 or 2"):
        preflight(args, 1)
    args = DistTrainArgs(data=data, out="o", deepspeed_config="zero1_bf16", precision="fp16")
    with pytest.raises(UserError, match="--precision fp16 conflicts with bf16"):
        preflight(args, 1)


def test_an_existing_checkpoint_needs_resume(tmp_path):
    data = str(tmp_path)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "latest").write_text("step-000002\n")
    with pytest.raises(UserError, match="--resume"):
        preflight(DistTrainArgs(data=data, out=str(tmp_path)), 1)
    assert preflight(DistTrainArgs(data=data, out=str(tmp_path), resume=True), 1).micro_batch == 8
    (tmp_path / "checkpoint" / "state.json").write_text("{}")
    with pytest.raises(UserError, match="single-process"):
        preflight(DistTrainArgs(data=data, out=str(tmp_path), resume=True), 1)


def test_mcti_train_with_a_bad_batch_split_fails_before_starting_processes(
    image_folder, tmp_path, monkeypatch, capsys
):
    import subprocess

    from mcti.cli import main

    def no_launch(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "run", no_launch)
    out = tmp_path / "tokens"
    argv = ["train", "--nproc", "2", "--data", str(image_folder), "--out", str(out)]
    assert main(argv + ["--batch-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 3 is not divisible by world size 2" in err and "1.5" in err
    assert not out.exists()


def test_missing_data_and_tensorboard_fail_before_any_work(tmp_path, monkeypatch):
    import subprocess

    from training.launch import launch_local

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(UserError, match="data folder .*nothing.* does not exist"):
        launch_local(DistTrainArgs(data=str(tmp_path / "nothing"), out="o", nproc=2))
    args = DistTrainArgs(data=str(tmp_path), out=str(tmp_path / "o"), tensorboard=True)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(UserError, match="pip install tensorboard"):
            preflight(args, 1)
    else:
        assert preflight(args, 1).zero_stage == 0
