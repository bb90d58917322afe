"""The DeepSpeed trainer (`python -m training`) writes the fused scorer's state beside the tokens,
as `mcti train` does: a plain run's shots, and for --extend the old cache plus the new shots."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mcti.core.fused import load_fused
from tests.conftest import make_image_folder
from tests.training.conftest import SMALL, cli_flags
from training.launch import main

pytestmark = pytest.mark.slow


def cache(tok) -> tuple[torch.Tensor, torch.Tensor]:
    sd = load_file(str(tok / "fused.safetensors"))
    return sd["features"], sd["labels"]


def test_a_run_and_its_extension_write_the_fused_state(data_dir, tmp_path):
    out = tmp_path / "tok"
    assert main(cli_flags(data_dir, out)) == 0  # one rank, in this process
    feats, labels = cache(out)
    assert sorted(labels.tolist()) == [k for k in range(3) for _ in range(SMALL["shots"])]
    assert json.loads((out / "fused.json").read_text())["num_classes"] == 3
    load_fused(out, 3)
    more = make_image_folder(tmp_path / "more", n_classes=4, per_class=4)
    shutil.copytree(more / "sku-0003", tmp_path / "new" / "sku-0003")  # a class `out` lacks
    ext = tmp_path / "ext"
    assert main(cli_flags(tmp_path / "new", ext, extend=str(out))) == 0
    f, y = cache(ext)
    n = len(labels)
    assert torch.equal(f[:n], feats) and torch.equal(y[:n], labels)  # the old cache, as stored
    assert y[n:].tolist() == [3] * SMALL["shots"]
    load_fused(ext, 4)
