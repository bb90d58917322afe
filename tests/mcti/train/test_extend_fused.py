"""`mcti train --extend` writes the fused scorer's state: OLD's cache (the per-class shot
features) plus the new shots' features, with the fit rerun on the merged cache."""

import json
import shutil

import torch
from safetensors.torch import load_file

from mcti.cli import main
from mcti.core.fused import load_fused
from tests.mcti.train.conftest import SMALL
from tests.mcti.train.test_resume_interop import train_argv


def cache(tok) -> tuple[torch.Tensor, torch.Tensor, dict]:
    sd = load_file(str(tok / "fused.safetensors"))
    return sd["features"], sd["labels"], json.loads((tok / "fused.json").read_text())


def test_extend_writes_old_cache_plus_new_shots(old_set, tmp_path, capsys):
    old_data, new_data, old_tok = old_set
    out = tmp_path / "ext"
    assert main(train_argv(new_data, out, *SMALL, "--reg", "clip", "--extend", str(old_tok))) == 0
    capsys.readouterr()
    f_old, y_old, _ = cache(old_tok)
    f, y, meta = cache(out)
    n = len(y_old)
    assert meta["num_classes"] == 5 and len(y) == n + 4  # 2 new classes x 2 shots
    assert torch.equal(f[:n], f_old) and torch.equal(y[:n], y_old)  # OLD's cache, as stored
    assert sorted(y[n:].tolist()) == [3, 3, 4, 4]
    assert meta["w_tokens"] > 0 and "fused_loo_acc" in meta["evidence"]  # refitted, tokens too
    load_fused(out, 5)
    argv = ["eval", "--tokens", str(out), "--data", str(old_data.parent / "all")]
    assert main([*argv, "--scorer", "fused", "--device", "cpu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["scorer"] == "fused" and r["n_images"] == 15  # all/ is another root: all scored


def test_replace_drops_the_retrained_class_from_the_old_cache(old_set, tmp_path):
    old_data, _, old_tok = old_set
    one = tmp_path / "one"
    shutil.copytree(old_data / "sku-0001", one / "sku-0001")
    out = tmp_path / "rep"
    assert main(train_argv(one, out, *SMALL, "--extend", str(old_tok), "--replace")) == 0
    f_old, y_old, _ = cache(old_tok)
    f, y, meta = cache(out)
    kept = y_old != 1
    assert meta["num_classes"] == 3 and len(y) == int(kept.sum()) + 2
    assert torch.equal(f[: int(kept.sum())], f_old[kept]) and y[-2:].tolist() == [1, 1]


def test_an_old_set_without_fused_state_gets_its_cache_from_its_images(old_set, tmp_path):
    _, new_data, old_tok = old_set
    bare = shutil.copytree(old_tok, tmp_path / "bare")
    for name in ("fused.json", "fused.safetensors"):
        (bare / name).unlink()  # a set saved before the fused scorer existed
    out = tmp_path / "ext"
    assert main(train_argv(new_data, out, *SMALL, "--extend", str(bare))) == 0
    f_old, y_old, _ = cache(old_tok)
    f, y, _ = cache(out)
    n = len(y_old)
    assert torch.equal(y[:n], y_old)  # the same shots, read back from the old data folder
    torch.testing.assert_close(f[:n], f_old, rtol=0, atol=1e-5)
