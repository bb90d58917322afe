"""The command line as a process: third-party chatter only with --verbose, and a failing
environment (a write the system refuses) as one line and exit 1, never a traceback."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EMBEDDED_DIR = Path(__file__).resolve().parents[3] / "mcti" / "assets" / "embedded-model"


def mcti(*argv: str, preexec_fn=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_VERBOSITY")}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    return subprocess.run(
        [sys.executable, "-B", "-m", "mcti", *argv],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=preexec_fn,
        timeout=300,
    )


@pytest.mark.slow
def test_model_loading_is_quiet_unless_verbose(tmp_path):
    """Loading the embedded model from its directory shows transformers' "Loading weights" bars
    and diffusers' accelerate advice; by default the failing command prints its one line only."""
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    argv = ["classify", "--model", str(EMBEDDED_DIR), "--tokens", str(tmp_path)]
    argv += [str(tmp_path / "x.png"), "--device", "cpu"]
    quiet = mcti(*argv)
    assert quiet.returncode == 2
    (line,) = quiet.stderr.splitlines()
    assert line.startswith("mcti classify: error:") and "not a token directory" in line
    loud = mcti("--verbose", *argv)
    assert loud.returncode == 2 and "Loading weights" in loud.stderr
    assert loud.stderr.splitlines()[-1] == line


def _small_files_only() -> None:
    """In the child: files may not grow past 4 KB (writes fail with EFBIG, as on a full disk)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_write_the_system_refuses_is_one_line_and_exit_1(tmp_path, tiny_bundle):
    from mcti.core.store import save_tokens
    from mcti.core.tokens import TokenTable

    save_tokens(
        tmp_path / "tok",
        TokenTable(2, 1, torch.zeros(tiny_bundle.hidden_size)),
        ["a", "b"],
        tiny_bundle,
    )
    out = tmp_path / "grid.png"
    argv = ["generate", "--tokens", str(tmp_path / "tok"), "--label", "a", "--out", str(out)]
    argv += ["--n", "4", "--steps", "1", "--device", "cpu"]
    r = mcti(*argv, preexec_fn=_small_files_only)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("mcti generate: error: File too large"), lines
    assert "Traceback" not in r.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no debris
    assert mcti(*argv).returncode == 0 and out.stat().st_size > 4096  # the same run, unlimited


def test_eval_prints_its_results_before_a_plot_that_cannot_be_written(tmp_path, tiny_bundle):
    """The plot's path passes the up-front check, then its write fails (EFBIG): the results were
    already printed, the command says what failed in one line and exits 1."""
    from mcti.core.store import save_tokens
    from mcti.core.tokens import TokenTable
    from tests.conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", n_classes=2, per_class=2)
    table = TokenTable(2, 1, torch.zeros(tiny_bundle.hidden_size))
    save_tokens(tmp_path / "tok", table, ["sku-0000", "sku-0001"], tiny_bundle)
    plot = tmp_path / "cm.png"
    argv = ["eval", "--tokens", str(tmp_path / "tok"), "--data", str(data), "--json"]
    argv += ["--plot", str(plot), "--n-samples", "2", "--to-keep", "1", "--device", "cpu"]
    r = mcti(*argv, preexec_fn=_small_files_only)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("mcti eval: error: File too large")
    assert json.loads(r.stdout)["n_images"] == 4 and not plot.exists()
