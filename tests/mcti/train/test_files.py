"""What training writes: file modes, durable renames, the checkpoint switch, the run log, the lock."""

import json
import os
import stat

import pytest
import torch

from mcti.atomic import atomic_save_safetensors, atomic_write, atomic_write_json
from mcti.core.tokens import TokenTable
from mcti.errors import UserError
from mcti.train import checkpoint as checkpoint_module
from mcti.train.checkpoint import Checkpoint, check_same_run
from mcti.train.outdir import lock_out_dir, out_dir_is_free, refuse_unless_resume
from mcti.train.runlog import RunLog


@pytest.fixture
def umask():
    """Set the process umask for a test, and restore it."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_get_the_umasks_mode_not_mkstemps(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_save_safetensors(tmp_path / "b.safetensors", {"t": torch.zeros(2)})
    atomic_write(tmp_path / "c.txt", lambda tmp: open(tmp, "w").write("c"))
    for name in ("a.json", "b.safetensors", "c.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.safetensors", "c.txt"]


def test_atomic_write_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_json(tmp_path / "x.json", {})
    assert synced[-1] == str(tmp_path)  # the directory, after the file itself
    assert str(tmp_path / "x.json") not in synced  # the temp file was synced, under its own name
    assert len(synced) == 2


def _state(value: float) -> tuple[TokenTable, torch.optim.Optimizer, torch.Generator]:
    table = TokenTable(2, 1, torch.zeros(4))
    with torch.no_grad():
        table.vectors.fill_(value)
    opt = torch.optim.AdamW([table.vectors], lr=0.1)
    table.vectors.grad = torch.ones_like(table.vectors)
    opt.step()
    return table, opt, torch.Generator().manual_seed(int(value))


def test_a_save_killed_before_the_switch_leaves_the_previous_checkpoint_whole(
    tmp_path, monkeypatch
):
    ckpt = Checkpoint(tmp_path)
    first, opt, gen = _state(1.0)
    ckpt.save(2, first, opt, gen, {"config": "{}"})
    saved = first.vectors.detach().clone()

    second, opt2, gen2 = _state(5.0)

    def killed(path, obj):
        raise KeyboardInterrupt("killed before state.json switched")

    monkeypatch.setattr(checkpoint_module, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(4, second, opt2, gen2, {"config": "{}"})
    monkeypatch.undo()

    table, opt3, gen3 = _state(0.0)
    assert ckpt.load(table, opt3, gen3, {"config": "{}"}) == 2
    torch.testing.assert_close(table.vectors.detach(), saved, atol=0, rtol=0)  # not step 4's
    ckpt.save(4, second, opt2, gen2, {"config": "{}"})  # the redone save replaces the orphan
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["state-000004.safetensors", "state.json"]


def test_a_checkpoint_of_the_earlier_layout_still_loads(tmp_path):
    """state.json without "tensors" names state.safetensors (checkpoints written before)."""
    ckpt = Checkpoint(tmp_path)
    table, opt, gen = _state(3.0)
    ckpt.save(6, table, opt, gen, {"config": "{}"})
    meta = json.loads(ckpt.state.read_text())
    (ckpt.dir / meta.pop("tensors")).rename(ckpt.dir / "state.safetensors")
    ckpt.state.write_text(json.dumps(meta))
    fresh, opt2, gen2 = _state(0.0)
    assert ckpt.load(fresh, opt2, gen2, {"config": "{}"}) == 6
    torch.testing.assert_close(fresh.vectors, table.vectors)


@pytest.mark.parametrize(
    "text,match",
    [
        ("{", "state.json is corrupt"),
        ("[1]", "state.json is corrupt"),
        ('{"step": "x", "run": {}}', "state.json is corrupt"),
        (b"\xff\xfe", "state.json is corrupt"),
    ],
)
def test_a_corrupt_state_json_is_a_user_error_naming_it(tmp_path, text, match):
    ckpt = Checkpoint(tmp_path)
    table, opt, gen = _state(1.0)
    ckpt.save(2, table, opt, gen, {})
    ckpt.state.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError, match=match):
        ckpt.load(table, opt, gen, {})


def test_corrupt_checkpoint_tensors_are_a_user_error_naming_them(tmp_path):
    ckpt = Checkpoint(tmp_path)
    table, opt, gen = _state(1.0)
    ckpt.save(2, table, opt, gen, {})
    (ckpt.dir / "state-000002.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError, match="state-000002.safetensors is corrupt"):
        ckpt.load(table, opt, gen, {})


def test_the_run_check_names_each_changed_setting():
    old = {"config": json.dumps({"lr": 0.005, "seed": 0, "method": "mcti"}), "shots": "[]"}
    new = {"config": json.dumps({"lr": 0.01, "seed": 0, "method": "ti"}), "shots": "[]"}
    with pytest.raises(UserError) as e:
        check_same_run(old, new, "OUT/checkpoint")
    assert "(differs in: config): --lr 0.005 -> 0.01; --method mcti -> ti." in str(e.value)
    trainer = {"trainer": json.dumps({"hard_negatives": False, "table_precision": "fp32"})}
    with pytest.raises(UserError, match="--hard-negatives false -> true"):
        check_same_run(trainer, {"trainer": json.dumps({"hard_negatives": True, "table_precision": "fp32"})}, "x")  # fmt: skip
    with pytest.raises(UserError, match=r"differs in: base_model\): the base model"):
        check_same_run({"base_model": "ab"}, {"base_model": "cd"}, "x")
    check_same_run(old, dict(old), "x")  # the same run passes


def test_the_run_log_trims_to_a_step_and_appends(tmp_path):
    log = RunLog(tmp_path / "metrics.jsonl")
    log.trim(3)  # no log yet: nothing to do
    for s in range(1, 6):
        log.append({"step": s, "loss": 0.5})
    log.trim(2)
    log.append({"step": 3, "loss": 0.25})
    assert [json.loads(x)["step"] for x in log.path.read_text().splitlines()] == [1, 2, 3]
    log.trim(0)
    assert log.path.read_text() == ""


def test_the_out_lock_admits_one_run_and_is_released(tmp_path):
    out = tmp_path / "tokens"
    with lock_out_dir(out):
        with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} holds"):
            with lock_out_dir(out):
                pass
        with pytest.raises(UserError, match="in use by another run"):
            out_dir_is_free(out)
    with lock_out_dir(out):  # released at the end of the block
        pass
    out_dir_is_free(out)


def test_a_failed_run_leaves_no_directory_it_created_but_keeps_one_it_found(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(UserError):
        with lock_out_dir(out):
            raise UserError("model failed to load")
    assert not out.exists()
    out.mkdir()
    with pytest.raises(UserError):
        with lock_out_dir(out):
            raise UserError("model failed to load")
    assert out.is_dir()


def test_out_that_is_a_file_or_a_checkpoint_without_resume_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a file, not a directory"):
        with lock_out_dir(tmp_path / "f"):
            pass
    with pytest.raises(UserError, match="already holds a checkpoint: pass --resume"):
        refuse_unless_resume(tmp_path, True, False)
    refuse_unless_resume(tmp_path, True, True)
    refuse_unless_resume(tmp_path, False, False)


def test_a_checkpoint_with_a_bad_rng_state_is_a_user_error(tmp_path):
    ckpt = Checkpoint(tmp_path)
    table, opt, gen = _state(1.0)
    ckpt.save(2, table, opt, gen, {})
    atomic_save_safetensors(
        ckpt.dir / "state-000002.safetensors", {"vectors": table.vectors, "rng": torch.zeros(3)}
    )
    with pytest.raises(UserError, match="state-000002.safetensors are corrupt"):
        ckpt.load(table, opt, gen, {})
