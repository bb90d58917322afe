"""`mcti tokens merge|remove|rename` carry the fused scorer's cache (fused.safetensors) with its
classes; without a state in every input, the result has none."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mcti.cli import main
from mcti.core.fused import load_fused
from tests.conftest import make_image_folder
from tests.mcti.train.test_resume_interop import ARGS, train_argv

SMALL = ["--steps", "2", *ARGS[2:]]


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two 2-class sets on tiny-random with disjoint labels (sku-*, part-*)."""
    root = tmp_path_factory.mktemp("tokens-fused")
    a = make_image_folder(root / "a", n_classes=2, per_class=2)
    b = make_image_folder(root / "b", n_classes=2, per_class=2, seed=1)
    for d in sorted(b.iterdir()):
        d.rename(b / d.name.replace("sku", "part"))
    assert main(train_argv(a, root / "A", *SMALL)) == 0
    assert main(train_argv(b, root / "B", *SMALL)) == 0
    return root / "A", root / "B"


def cache(tok) -> tuple[torch.Tensor, torch.Tensor, dict]:
    sd = load_file(str(tok / "fused.safetensors"))
    return sd["features"], sd["labels"], json.loads((tok / "fused.json").read_text())


def test_merge_carries_both_caches(two_sets, tmp_path):
    A, B = two_sets
    assert main(["tokens", "merge", str(A), str(B), "--out", str(tmp_path / "AB")]) == 0
    fa, ya, ma = cache(A)
    fb, yb, mb = cache(B)
    f, y, meta = cache(tmp_path / "AB")
    assert torch.equal(f, torch.cat([fa, fb])) and torch.equal(y, torch.cat([ya, yb + 2]))
    assert meta["num_classes"] == 4
    assert meta["beta"] == pytest.approx((ma["beta"] + mb["beta"]) / 2)  # 2 classes each
    load_fused(tmp_path / "AB", 4)


def test_remove_and_rename_carry_the_cache_with_its_classes(two_sets, tmp_path):
    A, _ = two_sets
    fa, ya, ma = cache(A)
    out = tmp_path / "rm"
    assert main(["tokens", "remove", str(A), "--labels", "sku-0000", "--out", str(out)]) == 0
    f, y, meta = cache(out)
    assert torch.equal(f, fa[ya == 1]) and y.tolist() == [0] * int((ya == 1).sum())
    assert meta["num_classes"] == 1 and meta["w_tokens"] == ma["w_tokens"]  # the fit kept
    out = tmp_path / "rn"
    assert main(["tokens", "rename", str(A), "--map", "sku-0000=x", "--out", str(out)]) == 0
    f, y, meta = cache(out)
    assert torch.equal(f, fa) and torch.equal(y, ya) and meta["num_classes"] == 2


def test_an_input_without_fused_state_gives_none(two_sets, tmp_path):
    A, B = two_sets
    bare = shutil.copytree(B, tmp_path / "bare")
    (bare / "fused.json").unlink()
    out = tmp_path / "AB"
    assert main(["tokens", "merge", str(A), str(bare), "--out", str(out)]) == 0
    assert (out / "classes.json").is_file() and not (out / "fused.json").exists()
