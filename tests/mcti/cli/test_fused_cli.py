"""The fused scorer end to end on tiny-random: `mcti train` writes its state beside the tokens,
`mcti classify/eval --scorer fused` return calibrated `probs`, `mcti eval` reports the ECE, and a
token set without the state is one clear error line."""

import json
import shutil

from mcti.cli import main
from tests.mcti.cli.test_cli import run_err


def test_train_writes_the_fused_state(trained):
    _, tok = trained
    state = json.loads((tok / "fused.json").read_text())
    assert (tok / "fused.safetensors").is_file() and state["num_classes"] == 3
    assert state["w_cache"] >= 0 and state["w_tokens"] >= 0 and state["beta"] > 0
    assert "cache_loo_acc" in state["evidence"]


def test_classify_json_has_probs(trained, capsys):
    data, tok = trained
    imgs = [str(data / "sku-0001" / "img4.png"), str(data / "sku-0002" / "img4.png")]
    argv = ["classify", "--tokens", str(tok), *imgs, "--scorer", "fused", "--device", "cpu"]
    assert main([*argv, "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for o in out:
        assert len(o["probs"]) == 3 and abs(sum(o["probs"]) - 1) < 1e-4
        assert o["probs"] == sorted(o["probs"], reverse=True)  # the labels' order
    # the other scorers have no calibrated probabilities, and say nothing about them
    assert main([*argv[:-4], "--scorer", "clip", "--device", "cpu", "--json"]) == 0
    assert all("probs" not in o for o in json.loads(capsys.readouterr().out))


def test_eval_reports_ece_and_probs(trained, capsys):
    data, tok = trained
    argv = ["eval", "--tokens", str(tok), "--data", str(data), "--scorer", "fused"]
    assert main([*argv, "--device", "cpu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert 0 <= r["ece"] <= 1 and r["scorer"] == "fused" and r["unet_rows_per_image"] == 0
    assert len(r["probs"]) == r["n_images"] == 6
    assert all(abs(sum(p) - 1) < 1e-3 for p in r["probs"])
    assert main([*argv, "--device", "cpu"]) == 0
    assert "ECE" in capsys.readouterr().out


def test_token_set_without_fused_state_is_one_error_line(trained, capsys, tmp_path):
    data, tok = trained
    old = tmp_path / "old"
    shutil.copytree(tok, old)
    (old / "fused.json").unlink()  # a token set saved before the fused scorer existed
    argv = ["eval", "--tokens", str(old), "--data", str(data), "--scorer", "fused"]
    assert "no fused scorer state" in run_err(capsys, [*argv, "--device", "cpu"])
