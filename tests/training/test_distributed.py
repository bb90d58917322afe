"""Real data-parallel runs on the tiny model: gloo, CPU, several processes.

One 2-rank ZeRO-0 run is the reference; the others must reproduce its tokens:
- 1 rank with twice the micro-batch, and 1 rank with micro-batch 1 x 4 accumulation steps
  (tolerance atol 1e-5; measured ~6e-7: gradients are summed in another order);
- 2 ranks under ZeRO 1 (atol 1e-5);
- a ZeRO-2 run whose rank 1 is SIGKILLed mid-training, resumed from its last checkpoint
  (atol 1e-5 against the ZeRO-0 reference; resuming itself is exact: the resumed run replays
  the same draws on the restored state).
A hard-negative run stopped and resumed between two similarity refreshes must match an
uninterrupted one (atol 1e-6).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.common import free_port
from mcti.core.store import load_tokens
from tests.training.conftest import SMALL, cli_flags, small_args, token_matrix
from training.launch import launch_local, main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """`mcti train --nproc 2`: 2 ranks x micro-batch 2, ZeRO 0, 8 steps, checkpoints every 2."""
    from mcti.cli import main as mcti_main
    from mcti.settings import TrainArgs
    from training.launch import flags_of

    out = tmp_path_factory.mktemp("ref") / "tokens"
    keep = {k: v for k, v in SMALL.items() if k != "timeout_s"}  # not a `mcti train` flag
    flags = flags_of(TrainArgs(data=str(data_dir), out=str(out), **keep))
    assert mcti_main(["train", "--nproc", "2", *flags]) == 0
    return out


def test_two_ranks_end_to_end(reference, tiny_bundle):
    tokens, table, labels, meta = load_tokens(reference, tiny_bundle)
    assert labels == ["sku-0000", "sku-0001", "sku-0002"]
    assert meta["steps"] == 8 and meta["trainer"]["world_size"] == 2
    assert meta["trainer"]["micro_batch"] == 2 and meta["trainer"]["zero_stage"] == 0
    init = tokens.init_vector("object")
    moved = (table.per_class()[:, 0] - init).norm(dim=1)  # (K,)
    assert moved.min() > 1e-3  # every class's token trained
    lines = [json.loads(s) for s in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))
    for key in ("loss", "ti", "ce", "lr", "samples_per_s", "K", "negatives", "peak_mem_mb"):
        assert key in lines[-1], key
    assert lines[-1]["K"] == 3 and lines[-1]["negatives"] == 1 and lines[-1]["world_size"] == 2
    ckpt = reference / "checkpoint"
    assert (ckpt / "latest").read_text().strip() == "step-000008"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-000006", "step-000008"]


@pytest.mark.parametrize(
    "extra",
    [dict(), dict(deepspeed_config="zero0_fp32_accum4")],
    ids=["1rank-micro4", "1rank-micro1-accum4"],
)
def test_one_rank_gives_the_same_tokens_as_two(reference, data_dir, tmp_path, extra):
    out = tmp_path / "tokens"
    assert main(cli_flags(data_dir, out, **extra)) == 0  # in this process: a world of one
    meta = json.loads((out / "classes.json").read_text())["trainer"]
    assert meta["world_size"] == 1 and meta["micro_batch"] == (1 if extra else 4)
    torch.testing.assert_close(token_matrix(out), token_matrix(reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", ["zero1_fp32"])  # ZeRO 2: the kill-and-resume test
def test_zero_stages_give_loadable_and_equal_tokens(
    reference, data_dir, tmp_path, config, tiny_bundle
):
    out = tmp_path / "tokens"
    launch_local(small_args(data_dir, out, nproc=2, deepspeed_config=config))
    _, table, _, meta = load_tokens(out, tiny_bundle)
    assert meta["trainer"]["zero_stage"] == int(config[4])
    parts = {p.name for p in (out / "checkpoint" / "step-000008").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= parts
    torch.testing.assert_close(token_matrix(out), token_matrix(reference), atol=1e-5, rtol=0)


def test_a_killed_rank_stops_the_job_and_resume_ends_where_an_uninterrupted_run_does(
    reference, data_dir, tmp_path, tiny_bundle
):
    """ZeRO 2, two ranks started by hand (no torchrun to stop the survivor): SIGKILL rank 1
    right after the first checkpoint. Rank 0 must exit by itself with a clear message; the
    checkpoint must stay loadable; --resume must end with the reference's (ZeRO 0) tokens."""
    out, zero2 = tmp_path / "tokens", dict(deepspeed_config="zero2_fp32")
    flags = cli_flags(data_dir, out, steps=1000, timeout_s=20.0, **zero2)  # killed mid-run
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "training", *flags],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint" / "latest").is_file():
            assert procs[0].poll() is None, procs[0].communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.02)
        os.kill(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=120)  # bounded: a hang fails the test here
        survived_s = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 1
    assert "another rank died, or stalled" in err and "--resume" in err
    assert survived_s < 20.0, survived_s  # within --timeout-s
    (line,) = [ln for ln in err.splitlines() if "error" in ln.lower()]  # one line, no traceback
    assert line.startswith("training: error (rank 0 of 2): lost rank 1 (its process exited)")

    step = int((out / "checkpoint" / "latest").read_text().split("-")[1])
    assert 2 <= step < 8  # killed mid-run, before the step the reference ends at
    _, table, _, meta = load_tokens(out, tiny_bundle)  # the export of a complete checkpoint
    assert meta["steps"] >= step and meta["trainer"]["zero_stage"] == 2
    parts = {p.name for p in (out / "checkpoint" / f"step-{step:06d}").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= parts

    launch_local(small_args(data_dir, out, nproc=2, resume=True, **zero2))
    torch.testing.assert_close(token_matrix(out), token_matrix(reference), atol=1e-5, rtol=0)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))  # the redone steps are logged once


def test_the_engine_holds_and_optimizes_only_the_token_table(data_dir, tmp_path, tiny_bundle):
    from training import ds_config, trainer

    args = small_args(data_dir, tmp_path / "o", deepspeed_config="zero1_fp32")
    resolved = ds_config.resolve("zero1_fp32", args.batch_size, 1)
    trainer.init_distributed(args, resolved)  # in this process: a world of one
    p = trainer.prepare(args, tiny_bundle, quiet=True)
    engine = trainer.build_engine(p, args, resolved)
    params = list(engine.module.parameters())
    assert len(params) == 1 and params[0] is p.table.vectors
    assert type(engine.basic_optimizer) is torch.optim.AdamW
    optimized = sum(q.numel() for g in engine.basic_optimizer.param_groups for q in g["params"])
    assert p.table.vectors.numel() <= optimized < p.table.vectors.numel() + 64  # + ZeRO padding
    assert not any(q.requires_grad for q in p.bundle.unet.parameters())


def test_hard_negative_run_resumed_between_refreshes_matches_an_uninterrupted_one(
    data_dir, tmp_path
):
    hard = dict(hard_negatives=True, hard_refresh=2, hard_temperature=0.05, steps=6, save_every=4)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(cli_flags(data_dir, whole, **hard)) == 0
    assert main(cli_flags(data_dir, parts, **{**hard, "steps": 3})) == 0  # checkpoint at 3
    assert (parts / "checkpoint" / "latest").read_text().strip() == "step-000003"
    assert main(cli_flags(data_dir, parts, **hard, resume=True)) == 0  # 3 -> 6, refresh at 4
    assert json.loads((whole / "metrics.jsonl").read_text().splitlines()[-1])["hard_negatives"]
    torch.testing.assert_close(token_matrix(parts), token_matrix(whole), atol=1e-6, rtol=0)


def test_two_ranks_write_the_fused_scorer_state(reference, data_dir, tiny_bundle):
    """`mcti train --nproc 2` ends like single-process `mcti train`: the fused scorer's state of
    the final tokens is in the token directory, fitted on the run's shots."""
    from mcti.core.fused import load_fused

    state = load_fused(reference, 3)  # refuses a missing or mismatched state
    assert state.labels.tolist() == sorted(state.labels.tolist()) and len(state.labels) == 6
    assert "fused_loo_acc" in state.params.evidence  # the tokens' scores took part in the fit
