"""`mcti pretrain --resume` trusts nothing but tensors and plain values; an interrupted resume
continues exactly; the model directory is never left half old, half new."""

import json
import pathlib
import shutil

import pytest
import torch

from mcti.cli import main
from mcti.core.model import load_model
from mcti.errors import UserError
from mcti.pretrain.checkpoint import checkpoint_path
from mcti.settings import PretrainArgs

# a few seconds per run: small networks, the digits dataset, no periodic evaluation
TINY = ["--datasets", "digits", "--channels", "16,32", "--eval-every", "0", "--quiet"]
TINY += ["--clip-steps", "2", "--batch-size", "2", "--clip-batch-size", "4"]


def _pretrain(out, *extra) -> int:
    return main(["pretrain", "--out", str(out), *TINY, *extra])


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "m"
    assert _pretrain(out, "--steps", "2") == 0
    return out


class PlantedCode:
    """Unpickling this creates `marker`: what a planted checkpoint could run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_planted_pickle_does_not_run_on_resume(two_steps, tmp_path, capsys):
    out = tmp_path / "m"
    shutil.copytree(two_steps, out)
    ckpt = checkpoint_path(out)
    state = torch.load(ckpt, weights_only=True)
    marker = tmp_path / "planted-code-ran"
    torch.save({**state, "timing": PlantedCode(marker)}, ckpt)
    capsys.readouterr()
    assert _pretrain(out, "--steps", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.count("\n") == 1 and err.startswith("mcti pretrain: error: cannot resume from")
    assert "nothing in it was run" in err


def test_a_corrupt_or_incomplete_checkpoint_is_one_line(two_steps, tmp_path, capsys):
    out = tmp_path / "m"
    shutil.copytree(two_steps, out)
    ckpt = checkpoint_path(out)
    state = torch.load(ckpt, weights_only=True)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    capsys.readouterr()
    assert _pretrain(out, "--steps", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a checkpoint of tensors and plain values" in err
    del state["opt"]
    torch.save(state, ckpt)
    assert _pretrain(out, "--steps", "3", "--resume") == 2
    assert "incomplete checkpoint (no opt)" in capsys.readouterr().err


def test_resume_continues_exactly(two_steps, tmp_path):
    """2 steps, then --resume to 4, gives the weights of 4 steps in one run (under 20 steps the
    warm-up is one step in both)."""
    resumed = tmp_path / "resumed"
    shutil.copytree(two_steps, resumed)
    assert _pretrain(resumed, "--steps", "4", "--resume") == 0
    assert _pretrain(tmp_path / "straight", "--steps", "4") == 0
    a = load_model(str(resumed), device="cpu")
    b = load_model(str(tmp_path / "straight"), device="cpu")
    for part in ("unet", "clip"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    info = json.loads((resumed / "pretrain.json").read_text())
    assert info["steps_done"] == 4


def test_an_interrupted_save_leaves_no_loadable_mix(tmp_path, monkeypatch):
    from mcti.pretrain.corpus import build_vocab
    from mcti.pretrain.networks import build_parts, save_model_dir, text_encoder_of

    a = PretrainArgs(quick=True, channels="16,32")
    parts = build_parts(a, build_vocab(["cat"]))
    te = text_encoder_of(parts["clip"])
    out = tmp_path / "m"
    save_model_dir(parts, parts["unet"], te, out, {"steps_done": 1})
    assert load_model(str(out), device="cpu").unet.config.block_out_channels == [16, 32]

    with torch.no_grad():
        for p in parts["unet"].parameters():
            p.add_(1.0)
    real_replace, calls = pathlib.Path.replace, []

    def dies_on_the_second_part(self, target):
        calls.append(self.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(self, target)

    monkeypatch.setattr(pathlib.Path, "replace", dies_on_the_second_part)
    with pytest.raises(OSError):
        save_model_dir(parts, parts["unet"], te, out, {"steps_done": 2})
    monkeypatch.undo()
    with pytest.raises(UserError, match="missing model_index.json"):
        load_model(str(out), device="cpu")
    save_model_dir(parts, parts["unet"], te, out, {"steps_done": 2})  # a retry completes it
    assert json.loads((out / "pretrain.json").read_text())["steps_done"] == 2
    loaded = load_model(str(out), device="cpu").unet.state_dict()
    assert all(torch.equal(v, parts["unet"].state_dict()[k]) for k, v in loaded.items())
