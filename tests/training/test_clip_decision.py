"""--reg clip under the DeepSpeed trainer: the scorer's decision (mcti.core.objectives
.ScorerDecision) is part of every rank's loss, and 2 ranks give the tokens of 1 (each image's
candidate texts depend on the image alone, so shards compute what one process would)."""

import json

import pytest
import torch

from mcti.cli import main as mcti_main
from mcti.settings import TrainArgs
from tests.training.conftest import SMALL, cli_flags, token_matrix
from training.launch import flags_of, main

pytestmark = pytest.mark.slow


def test_two_ranks_train_the_decision_as_one_does(data_dir, tmp_path):
    two = tmp_path / "two"
    keep = {k: v for k, v in SMALL.items() if k != "timeout_s"}  # not a `mcti train` flag
    flags = flags_of(TrainArgs(data=str(data_dir), out=str(two), reg="clip", **keep))
    assert mcti_main(["train", "--nproc", "2", *flags]) == 0
    one = tmp_path / "one"
    assert main(cli_flags(data_dir, one, reg="clip")) == 0  # in this process: a world of one
    lines = [json.loads(s) for s in (two / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["ce_decision"] > 0 and 0 <= lines[-1]["decision_acc"] <= 1
    torch.testing.assert_close(token_matrix(one), token_matrix(two), atol=1e-5, rtol=0)
