"""The core without its extras: with Ray (and Serve's web stack), DeepSpeed, Triton, matplotlib,
scikit-learn, and our own training/ and serving/ packages unimportable, every module of the core
imports, and `mcti train`, `eval`, `classify` and `generate` run end to end on tiny-random (CPU).
This is what `pip install mcti` without extras promises (pyproject.toml)."""

import json

import pytest

from tests.blocked_imports import ROOT, run_without

# What the extras add (import names): [serve], [distributed], [triton], [plots]/[demo], [gpu];
# and the layers above the core, which it must never need.
BLOCKED = [
    "ray", "fastapi", "starlette", "uvicorn", "multipart", "python_multipart",  # [serve]
    "deepspeed",  # [distributed]
    "triton",  # [triton]
    "matplotlib", "sklearn",  # [plots], [demo]
    "xformers",  # [gpu]
    "training", "serving",  # the launcher and the server sit above the core
]  # fmt: skip


# Modules that are an extra's own code, and entry points that run on import.
NOT_CORE = {"kernels.denoise_errors_triton", "mcti.__main__"}


def core_modules() -> list[str]:
    """Every module of mcti/ (commands that need an extra import it inside their function) and
    kernels/, but NOT_CORE."""
    out = []
    for pkg in ("mcti", "kernels"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if "__pycache__" not in parts and "assets" not in parts:
                out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return [m for m in out if m not in NOT_CORE]


SCRIPT = """
import importlib, json, sys
for name in MODULES:
    importlib.import_module(name)
assert_still_blocked()

from mcti.cli import main
from tests.conftest import make_image_folder
from pathlib import Path

root = Path.cwd()
data = make_image_folder(root / "data", n_classes=3, per_class=5)
tok = root / "tok"
cpu = ["--device", "cpu"]
train = ["--model", "tiny-random", "--steps", "3", "--batch-size", "4", "--shots", "3", "--quiet",
         "--draws", "1", "--negatives", "1"]
codes = {}
codes["train"] = main(["train", "--data", str(data), "--out", str(tok), *train, *cpu])
codes["eval"] = main(["eval", "--data", str(data), "--tokens", str(tok), "--limit", "1", "--json",
                      *cpu])
img = sorted((data / "sku-0001").glob("*.png"))[0]
codes["classify"] = main(["classify", "--tokens", str(tok), str(img), "--json", *cpu])
codes["generate"] = main(["generate", "--tokens", str(tok), "--label", "sku-0002",
                          "--out", str(root / "g.png"), "--n", "1", "--steps", "2", *cpu])
codes["eval --plot"] = main(["eval", "--data", str(data), "--tokens", str(tok), "--limit", "1",
                             "--json", "--plot", str(root / "cm.png"), *cpu])
assert_still_blocked()
print("RESULT " + json.dumps(codes))
"""


@pytest.mark.slow
def test_core_runs_without_the_extras(tmp_path):
    modules = core_modules()
    assert {"mcti.core.scoring", "mcti.train.loop", "mcti.eval.evaluate", "mcti.cli"} <= set(
        modules
    )
    code = f"MODULES = {modules!r}\n" + SCRIPT
    run = run_without(BLOCKED, code, cwd=tmp_path)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-2000:] + run.stderr[-4000:]
    codes = json.loads(lines[-1].removeprefix("RESULT "))
    assert codes == {"train": 0, "eval": 0, "classify": 0, "generate": 0, "eval --plot": 2}, (
        codes,
        run.stderr[-3000:],
    )
    assert (tmp_path / "tok" / "learned_embeds.safetensors").is_file()
    assert (tmp_path / "g.png").is_file() and not (tmp_path / "cm.png").exists()
    # --plot without matplotlib: one line that names the extra, no traceback
    assert "Traceback" not in run.stderr
    err = [ln for ln in run.stderr.splitlines() if ln.startswith("mcti eval: error:")]
    assert len(err) == 1 and "mcti[plots]" in err[0], run.stderr[-2000:]


def test_blocking_really_blocks(tmp_path):
    """The harness itself: a blocked package cannot be imported and looks absent to find_spec."""
    code = """
import importlib.util
try:
    import ray
except ModuleNotFoundError as e:
    assert e.name == "ray"
else:
    raise SystemExit("ray imported")
assert importlib.util.find_spec("ray") is None
print("ok")
"""
    run = run_without(["ray"], code, cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
