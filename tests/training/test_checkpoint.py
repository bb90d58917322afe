"""The checkpoint pointer only ever names a complete save; the metrics log survives a kill."""

import json
from pathlib import Path

import pytest

from mcti.train.runlog import RunLog
from tests.training.conftest import small_args
from training import ds_config, trainer
from training.checkpoint import DistCheckpoint


class FakeEngine:
    """Writes DeepSpeed-like files; can die half-way through a save."""

    def __init__(self):
        self.die = False

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # the pointer is ours to write
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_text(json.dumps({"tag": tag}))
        if self.die:
            raise RuntimeError("killed while saving")
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("x")


@pytest.fixture(scope="module")
def world_of_one(data_dir, tmp_path_factory):
    args = small_args(data_dir, tmp_path_factory.mktemp("w"))
    trainer.init_distributed(args, ds_config.resolve(None, args.batch_size, 1))


def test_latest_switches_only_after_a_complete_save(tmp_path, world_of_one):
    ckpt, engine, seen = DistCheckpoint(tmp_path), FakeEngine(), []
    for step in (2, 4, 6):
        ckpt.save(engine, step, {}, {"run": {}}, on_complete=lambda: seen.append(ckpt.latest()))
    assert seen == [None, "step-000002", "step-000004"]  # export runs before the switch
    assert ckpt.latest() == "step-000006" and ckpt.meta()["step"] == 6
    assert sorted(p.name for p in ckpt.dir.glob("step-*")) == ["step-000004", "step-000006"]

    engine.die = True
    with pytest.raises(RuntimeError):
        ckpt.save(engine, 8, {}, {"run": {}})
    assert ckpt.latest() == "step-000006"  # the partial step-000008 is never pointed at
    assert not (ckpt.dir / "step-000008" / "mcti.json").exists()

    engine.die = False  # a resumed run reaches step 8 again: the partial dir is replaced
    ckpt.save(engine, 8, {}, {"run": {}})
    assert ckpt.latest() == "step-000008"
    assert len(list((ckpt.dir / "step-000008").iterdir())) == 3
    assert sorted(p.name for p in ckpt.dir.glob("step-*")) == ["step-000006", "step-000008"]


def test_trim_log_keeps_steps_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 6)]
    log.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # killed mid-write
    RunLog(log).trim(3)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
