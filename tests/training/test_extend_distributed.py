"""`--extend` through the DeepSpeed trainer: 2 ranks (torchrun) and 1 rank in-process agree,
and the old tokens come out bit-identical; mistakes fail before any rank starts."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mcti.cli import main as mcti_main
from mcti.errors import UserError
from tests.conftest import make_image_folder
from tests.training.conftest import SMALL, cli_flags, small_args
from training.launch import launch_local, main

pytestmark = pytest.mark.slow


def vectors(tok: Path) -> dict[str, torch.Tensor]:
    classes = json.loads((tok / "classes.json").read_text())["classes"]
    sd = load_file(str(tok / "learned_embeds.safetensors"))
    return {label: sd[t] for label, t in classes.items()}


@pytest.fixture(scope="module")
def extend_case(tmp_path_factory):
    """old/ (2 classes) trained single-process; new/ holds a third class."""
    root = tmp_path_factory.mktemp("dist-extend")
    full = make_image_folder(root / "all", n_classes=3, per_class=4)
    for k, cls in enumerate(sorted(p.name for p in full.iterdir())):
        shutil.copytree(full / cls, root / ("old" if k < 2 else "new") / cls)
    flags = ["--model", "tiny-random", "--data", str(root / "old"), "--out", str(root / "old-tok")]
    assert mcti_main(["train", *flags, "--steps", "2", "--shots", "2", "--batch-size", "2",
                      "--negatives", "1", "--draws", "1", "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    return root / "new", root / "old-tok"


def test_two_ranks_extend_like_one_and_keep_old_tokens(extend_case, tmp_path):
    new, old = extend_case
    two, one = tmp_path / "two", tmp_path / "one"
    launch_local(small_args(new, two, nproc=2, extend=str(old)))
    assert main(cli_flags(new, one, extend=str(old))) == 0  # one rank, in this process
    before = vectors(old)
    for out in (two, one):
        after = vectors(out)
        assert list(after) == ["sku-0000", "sku-0001", "sku-0002"]
        for label, v in before.items():
            assert torch.equal(after[label], v), (out, label)
        meta = json.loads((out / "classes.json").read_text())
        assert meta["history"][-1]["op"] == "extend" and meta["history"][-1]["labels"] == ["sku-0002"]  # fmt: skip
    assert json.loads((two / "classes.json").read_text())["history"][-1]["trainer"]["world_size"] == 2  # fmt: skip
    torch.testing.assert_close(
        vectors(two)["sku-0002"], vectors(one)["sku-0002"], atol=1e-5, rtol=0
    )
    assert not torch.equal(vectors(two)["sku-0002"], before["sku-0000"])


def test_hard_negatives_include_the_frozen_classes(extend_case, tmp_path):
    new, old = extend_case
    out = tmp_path / "hard"
    assert main(cli_flags(new, out, extend=str(old), hard_negatives=True, hard_refresh=2)) == 0
    after = vectors(out)
    for label, v in vectors(old).items():
        assert torch.equal(after[label], v)
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["K"] == 3 and lines[-1]["step"] == SMALL["steps"]


def test_extend_mistakes_fail_before_any_rank_starts(extend_case, tmp_path):
    new, old = extend_case
    out, again = tmp_path / "x", tmp_path / "again"
    shutil.copytree(new / "sku-0002", again / "sku-0001")  # sku-0001 is in the old set
    with pytest.raises(UserError, match="already in .*'sku-0001'.*--replace"):
        launch_local(small_args(again, out, nproc=2, extend=str(old)))
    assert not out.exists()  # refused in the preflight: no rank ran, no lock was taken
