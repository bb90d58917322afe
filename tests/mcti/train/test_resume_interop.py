"""Kill-and-resume gives the tokens of an uninterrupted run; tokens load into diffusers."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from mcti.cli import main
from mcti.core.model import load_model, save_model
from mcti.core.store import load_tokens
from mcti.core.tiny import build_tiny_random
from tests.conftest import make_image_folder

ARGS = [
    "--steps",
    "12",
    "--save-every",
    "2",
    "--batch-size",
    "2",
    "--shots",
    "2",
    "--draws",
    "1",
    "--negatives",
    "1",
    "--device",
    "cpu",
    "--quiet",
]


def train_argv(data, out, *extra: str, model: str = "tiny-random") -> list[str]:
    """`mcti train` arguments on `model` (never the default: a test names what it trains on)."""
    return ["train", "--model", model, "--data", str(data), "--out", str(out), *extra]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=3)
    assert main(train_argv(data, tmp_path / "full", *ARGS)) == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mcti", *train_argv(data, out, *ARGS)]
    # same intra-op thread count as this process: a different count changes the reduction
    # order of CPU kernels, and then the runs differ in the last bits
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env
    )
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["step"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 4 <= killed_at < 12
    # the last complete checkpoint and token export stay loadable
    assert load_file(str(out / "learned_embeds.safetensors"))
    assert main(train_argv(data, out, *ARGS, "--resume")) == 0

    a = load_file(str(tmp_path / "full" / "learned_embeds.safetensors"))
    b = load_file(str(out / "learned_embeds.safetensors"))
    for k in a:  # same seed, same draws, same AdamW state: bit-identical on CPU
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert json.loads((out / "classes.json").read_text())["steps"] == 12


def test_resume_refuses_a_different_run(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=3)
    out = tmp_path / "tok"
    assert main(train_argv(data, out, "--steps", "2", *ARGS[2:])) == 0
    # the same run but for the learning rate (same model: the refusal must come from --lr)
    assert main(train_argv(data, out, "--steps", "2", *ARGS[2:], "--resume", "--lr", "0.1")) == 2
    err = capsys.readouterr().err
    assert "different run (differs in: config)" in err, err  # not base_model: same model
    assert "--lr 0.005 -> 0.1" in err and err.count("\n") == 1, err  # names the setting


def test_tokens_load_into_a_diffusers_pipeline(tmp_path):
    """A model saved in diffusers format keeps its fingerprint; the multi-class token file loads
    through load_textual_inversion's list form and gives exactly our conditioning."""
    from diffusers import StableDiffusionPipeline

    model_dir = tmp_path / "model"
    save_model(build_tiny_random(), model_dir)
    bundle = load_model(str(model_dir), device="cpu")
    assert bundle.fingerprint == load_model("tiny-random", device="cpu").fingerprint
    data = make_image_folder(tmp_path / "data", n_classes=3, per_class=2)
    tok = tmp_path / "tok"
    argv = train_argv(
        data, tok, "--n-vectors", "2", "--steps", "2", *ARGS[2:], model=str(model_dir)
    )
    assert main(argv) == 0

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    sd = load_file(str(tok / "learned_embeds.safetensors"))
    pipe.load_textual_inversion(list(sd.values()), token=list(sd.keys()))
    tokens, table, labels, meta = load_tokens(tok, bundle)
    k = labels.index("sku-0002")
    prompt = "a photo of a " + meta["classes"]["sku-0002"]
    theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    ours, _ = tokens.encode(table, [tokens.prompt(k)])
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    image = pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
